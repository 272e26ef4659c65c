"""masked_dw: the backward's dw = x^T @ (mask * dy), computed as its transpose (N, K): row
j sums the rows of x that select column j, scaled by dy; a work-item owns one column and
one K chunk of KVEC vectors."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset
from ..params import ParamSpec, TileParam
from .masked_util import ACROSS_CONSTRAINT, backward_sizes

TEMPLATE = "masked_dw.cl.mako"

SPEC = ParamSpec(
    family="masked_dw",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "floats per vector load of a row (one FMA each)"),
        TileParam("KVEC", 8, (1, 2, 4, 8, 16), "vectors of dw's row of W^T per work-item"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64, 128, 256),
                  "work-items per work-group: columns (ACROSS 0) or K chunks of one (1)"),
        TileParam("ACROSS", 0, (0, 1), "0: a work-group's items take WG columns at one K chunk "
                  "(CPU); 1: WG consecutive K chunks of one (GPU: coalesced loads)"),
    ),
    constraints=(ACROSS_CONSTRAINT,),
    work_group_size=lambda p: p["WG"],
)


ARGS = KernelArgs(Signature("pscl_masked_dw", (
    Pointer("x", "float", restrict=True), Scalar("x_off", np.int64),     # (M, ldx)
    Pointer("rows", "int2", restrict=True),              # (N, M): (row, bits of dy)
    Pointer("counts", "int", restrict=True),             # (N,) list lengths
    Pointer("dw", "float", const=False, restrict=True),  # (N, K): transposed
    Scalar("M", np.int32), Scalar("N", np.int32), Scalar("K", np.int32),
    Scalar("ldx", np.int32))))                           # x's row stride


def template_args(params, mask: str = "bool") -> dict:
    return dict(params, KIND="dw", MASK=mask, ARGS=ARGS)


def launch(queue, params, form: str, x_rows, lists, dwt, n_rows: int, n_cols: int,
           k_in: int, wait):
    """Enqueue dw^T (N, K) into ``dwt`` from x's rows (buffer, element offset, row stride)
    and the selection's column lists (a masked_util.SelectionLists)."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_dw",),
                           **template_args(params, form))["pscl_masked_dw"]
    x_src, x_off, ldx = x_rows
    return kern.launch(queue, *backward_sizes(params, n_cols, k_in), dict(
        x=x_src, x_off=x_off, rows=lists.col_rows.data, counts=lists.col_counts.data,
        dw=dwt.data, M=np.int32(n_rows), N=np.int32(n_cols), K=np.int32(k_in),
        ldx=np.int32(ldx)), wait_for=wait)


def padded_rows(queue, a_dev, n_rows: int, k_in: int, wait: list, events):
    """(buffer, element offset, row stride) of the (n_rows, k_in) device array ``a_dev``,
    copied with padded rows when they are a multiple of 4 KiB apart and large: rows that
    far apart share cache sets, so the rows a kernel keeps in cache would evict one another.
    The copy, one pass over the array, costs less than those misses.  (The copy's event is
    appended to ``wait``.)"""
    ld = row_stride(k_in)
    if ld == k_in or n_rows * k_in * 4 <= (1 << 20):
        return a_dev.base_data, elem_offset(a_dev), k_in
    padded = runtime.empty(queue, (n_rows, ld), np.float32,
                           allocator=runtime.memory_pool(queue.context))
    ev = runtime.enqueue_copy(queue, padded.data, a_dev.base_data,
                              src_origin=(a_dev.offset, 0, 0), dst_origin=(0, 0, 0),
                              region=(4 * k_in, n_rows, 1), src_pitches=(4 * k_in, 0),
                              dst_pitches=(4 * ld, 0), wait_for=wait or None)
    padded.add_event(ev)
    wait.append(ev)
    if events is not None:
        events.append(ev)
    return padded.data, np.int64(0), ld


def row_stride(k_in: int) -> int:
    """The row stride of (N, K) rows: K, plus one cache line when rows would be a multiple
    of 4 KiB apart (their K chunks would then share cache sets and evict one another in
    the backward)."""
    return k_in + 16 if k_in and k_in % 1024 == 0 else k_in
