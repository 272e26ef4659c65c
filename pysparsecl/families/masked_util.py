"""Helper kernels of the masked products (no tile parameters): the (K, N) -> (N, K)
transpose of weights that were not prepared, the validation of compact index masks into
a slot map, the backward's lists of each row's and each column's selection, and the split
VMM's listing of a bool mask (kernels/masked_util.cl.mako)."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import pyopencl.array as cl_array

from .. import runtime, tuning
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import INT32_MAX, check_alloc, elem_offset, round_up, written
from ..params import Constraint
from . import masked_lists

TEMPLATE = "masked_util.cl.mako"
TRANSPOSE_WG = 4      # 16 x 16 tiles per transpose work-group

#: masked_dx's and masked_dw's work-groups: wider than 64 only across K, where the items
#: walk one list in step (side by side, each row or column walks its own list).
ACROSS_CONSTRAINT = Constraint(
    "wide_groups_across_k", lambda p: p["ACROSS"] == 1 or p["WG"] <= 64,
    "more than 64 work-items per work-group only with ACROSS 1")


def backward_sizes(params, n_outer: int, k_in: int):
    """(global, local) sizes of masked_dx and masked_dw: ``n_outer`` rows (dx) or columns
    (dw) by K chunks of VEC * KVEC floats, the work-group along the one ACROSS picks."""
    n_chunks = -(-k_in // (params["VEC"] * params["KVEC"]))
    wg = params["WG"]
    if params["ACROSS"]:
        return (round_up(n_chunks, wg), n_outer), (wg, 1)
    return (round_up(n_outer, wg), n_chunks), (wg, 1)


ARGS = KernelArgs(
    Signature("pscl_transpose", (
        Pointer("src", "float", restrict=True), Scalar("src_off", np.int64),
        Scalar("ld_src", np.int32), Pointer("dst", "float", const=False, restrict=True),
        Scalar("dst_off", np.int64), Scalar("ld_dst", np.int32), Scalar("R", np.int32),
        Scalar("C", np.int32))),
    Signature("pscl_idx_slots", (
        Pointer("idx", "int", restrict=True), Scalar("idx_off", np.int64),
        Pointer("slot", "int", const=False, restrict=True),
        Pointer("bad", "int", const=False, volatile=True),
        Scalar("M", np.int32), Scalar("N", np.int32), Scalar("n_keep", np.int32))),
    Signature("pscl_bool_rows", (
        Pointer("mask", "uchar", restrict=True), Scalar("mask_off", np.int64),
        Pointer("cols", "int", const=False, restrict=True),
        Pointer("counts", "int", const=False, restrict=True),
        Scalar("M", np.int32), Scalar("N", np.int32))),
    masked_lists.cols_signature("pscl_cols_list_bool", "bool"),
    masked_lists.cols_signature("pscl_cols_list_slot", "slot"),
    Signature("pscl_bool_compact", (
        Pointer("mask", "uchar", restrict=True), Scalar("mask_off", np.int64),
        Pointer("cols", "int", const=False, restrict=True),
        Pointer("counts", "int", const=False, restrict=True),
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("N", np.int32))))


def kernels(ctx, *names):
    return runtime.kernels(ctx, TEMPLATE, names, ARGS=ARGS)


def transpose(queue, src: cl_array.Array, events, into=None, ld_dst=None, cols=None):
    """(R, C) contiguous device array -> (C, ld_dst) device array (new, or ``into``, which
    may be a view at an offset into its buffer): dst[c, r] = src[r, c] for the first
    ``cols`` columns of src (all by default); columns r >= R of a wider destination are
    left as they are."""
    n_rows, ld_src = src.shape
    n_cols = ld_src if cols is None else cols
    ld_dst = n_rows if ld_dst is None else ld_dst
    out = into if into is not None else runtime.zeros(
        queue, (n_cols, ld_dst), np.float32, allocator=runtime.memory_pool(queue.context))
    if src.size and n_cols:
        kern = kernels(queue.context, "pscl_transpose")["pscl_transpose"]
        ev = kern.launch(queue, (round_up(-(-n_cols // 16), TRANSPOSE_WG), -(-n_rows // 16)),
                         (TRANSPOSE_WG, 1), dict(
            src=src.base_data, src_off=elem_offset(src), ld_src=np.int32(ld_src),
            dst=out.base_data, dst_off=elem_offset(out), ld_dst=np.int32(ld_dst),
            R=np.int32(n_rows), C=np.int32(n_cols)),
            wait_for=(list(src.events) + list(out.events)) or None)
        written(out, ev)   # (it waited for out's events)
        if events is not None:
            events.append(ev)
    return out


def idx_slots(queue, idx_dev: cl_array.Array, n_rows: int, n_cols: int, n_keep: int,
              events) -> Tuple[cl_array.Array, cl_array.Array]:
    """The (M, N) slot map of a compact index mask, and a 2-int flag array that records
    the first row with an out-of-range value and the first with a repeated column."""
    alloc = runtime.memory_pool(queue.context)
    check_alloc(queue, 4 * n_rows * n_cols, "the slot map of the index mask")
    slots = runtime.empty(queue, (n_rows, n_cols), np.int32, allocator=alloc)
    bad = runtime.empty(queue, (2,), np.int32, allocator=alloc)
    fill_events = [runtime.enqueue_fill(queue, slots.data, np.int32(-1), 0, slots.nbytes),
                   runtime.enqueue_fill(queue, bad.data, np.int32(INT32_MAX), 0, bad.nbytes)]
    kern = kernels(queue.context, "pscl_idx_slots")["pscl_idx_slots"]
    wg = 16
    ev = kern.launch(queue, (round_up(n_keep, wg), n_rows), (wg, 1), dict(
        idx=idx_dev.base_data, idx_off=elem_offset(idx_dev), slot=slots.data, bad=bad.data,
        M=np.int32(n_rows), N=np.int32(n_cols), n_keep=np.int32(n_keep)),
        wait_for=fill_events + list(idx_dev.events))
    slots.add_event(ev)
    if events is not None:
        events.append(ev)
    return slots, bad


class SelectionLists:
    """The backward's lists of a selection, built once: each row's selected columns (for
    dx; an index mask is that list already) and each column's selecting rows with their
    dy values (for dw)."""

    def __init__(self, queue, form: str, mask_dev, dy_dev, n_rows: int, n_cols: int,
                 n_entries: int, wait: list, events):
        ctx = queue.context
        alloc = runtime.memory_pool(ctx)
        scan = tuning.lookup(masked_lists.SPEC, queue.device, copy=False)
        if not scan["SCAN"]:
            util = kernels(ctx, "pscl_bool_rows", "pscl_cols_list_bool", "pscl_cols_list_slot")
        self.events = []
        self.bad = None
        check_alloc(queue, 8 * n_rows * n_cols, "the backward's column lists")
        self.col_rows = runtime.empty(queue, (n_cols, n_rows, 2), np.int32, allocator=alloc)
        self.col_counts = runtime.empty(queue, (n_cols,), np.int32, allocator=alloc)
        if form == "idx":
            slots, self.bad = idx_slots(queue, mask_dev, n_rows, n_cols, n_entries, events)
            wait = wait + list(slots.events)
            self.row_cols = (mask_dev.base_data, elem_offset(mask_dev))
            self.row_counts = None
            sel_form, sel = "slot", (slots.data, np.int64(0))
        else:
            row_list = runtime.empty(queue, (n_rows, n_cols), np.int32, allocator=alloc)
            self.row_counts = runtime.empty(queue, (n_rows,), np.int32, allocator=alloc)
            mask_args = (mask_dev.base_data, elem_offset(mask_dev), row_list.data,
                         self.row_counts.data)
            if scan["SCAN"]:
                ev = masked_lists.launch_rows(queue, scan, *mask_args, n_rows, n_cols,
                                              wait or None)
            else:
                ev = util["pscl_bool_rows"].launch(queue, (n_rows,), None, dict(
                    zip(("mask", "mask_off", "cols", "counts"), mask_args),
                    M=np.int32(n_rows), N=np.int32(n_cols)), wait_for=wait or None)
            self.events.append(ev)
            self.row_cols = (row_list.data, np.int64(0))
            sel_form, sel = "bool", (mask_dev.base_data, elem_offset(mask_dev))
        col_args = dict(sel=sel[0], sel_off=sel[1], dy=dy_dev.base_data,
                        dy_off=elem_offset(dy_dev), rows=self.col_rows.data,
                        counts=self.col_counts.data)
        if scan["SCAN"]:
            ev = masked_lists.launch_cols(queue, scan, sel_form, **col_args, n_rows=n_rows,
                                          n_cols=n_cols, dy_cols=n_entries, wait=wait or None)
        else:
            ev = util[f"pscl_cols_list_{sel_form}"].launch(
                queue, (-(-n_cols // 16),), None, dict(
                    col_args, M=np.int32(n_rows), N=np.int32(n_cols),
                    dy_cols=np.int32(n_entries)), wait_for=wait or None)
        self.events.append(ev)
