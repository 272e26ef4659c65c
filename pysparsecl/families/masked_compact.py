"""masked_compact: the output-masked product of a compact x (:class:`CompactRows`), CPU-
shaped and column-oriented.  A first kernel lists each column's selecting rows; then a
work-item takes one column j and, for each row in its list, gathers the weight row
wt[j, :] (W^T, (N, K): the layout the dense-input products use, so one prepared weight
serves both) at the row's nonzero columns: nx multiply-adds per output instead of K, each
a gather.  A bool mask's zeros are filled first; the kernel writes the selected outputs
only."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import INT32_MAX, check_alloc, elem_offset, round_up
from ..params import ParamSpec, TileParam

TEMPLATE = "masked_compact.cl.mako"
LIST_WG = 16     # work-items per work-group of the column-list kernels

SPEC = ParamSpec(
    family="masked_compact",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "gathered weights per vector FMA"),
        TileParam("GROUP", 1, (1, 2, 4), "listed rows whose dot products run together, "
                  "each its own chain of gathers"),
        TileParam("STREAM", 1, (0, 1),
                  "read each weight row front to back before its gathers, so that they hit "
                  "the cache (1), or not (0)"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group, one "
                  "column each"),
    ),
    work_group_size=lambda p: p["WG"],
)


_LISTS = (Pointer("counts", "int", const=False), Pointer("pairs", "int", const=False),
          Scalar("cap", np.int32))

#: The column-list kernels' arguments (rendered with either family).
LIST_SIGNATURES = (
    Signature("pscl_compact_cols_bool", (
        Pointer("sel", "uchar", restrict=True), Scalar("sel_off", np.int64),
        Scalar("M", np.int32), Scalar("N", np.int32)) + _LISTS),
    Signature("pscl_compact_cols_idx", (
        Pointer("sel", "int", restrict=True), Scalar("sel_off", np.int64),
        Scalar("M", np.int32), Scalar("N", np.int32), Scalar("n_keep", np.int32))
        + _LISTS + (Pointer("seen", "uint", const=False, volatile=True),
                    Pointer("bad", "int", const=False, volatile=True))))


def product_signature(name: str, *extra) -> Signature:
    """The product kernel's arguments (both families'), and ``extra`` ones."""
    return Signature(name, (
        Pointer("xv", "float", restrict=True), Scalar("xv_off", np.int64),  # (M, nx)
        Pointer("xi", "int", restrict=True), Scalar("xi_off", np.int64),    # (M, nx)
        Scalar("nx", np.int32),
        Pointer("wt", "float", restrict=True), Scalar("ldw", np.int32),     # (N, K)
        Pointer("counts", "int", restrict=True),                            # (N,)
        Pointer("pairs", "int", restrict=True), Scalar("cap", np.int32),    # (N, cap, 2)
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("N", np.int32), Scalar("K", np.int32)) + extra)


ARGS = KernelArgs(*LIST_SIGNATURES, product_signature("pscl_masked_compact",
                                                      Scalar("stream_sink", np.int32)))


def template_args(params) -> dict:
    """The tile parameters, the kernel's kind and the kernels' arguments."""
    return dict(params, KIND="compact", ARGS=ARGS)


def column_lists(queue, kerns, form: str, mask_dev, n_rows: int, n_cols: int,
                 n_entries: int, wait, events):
    """Enqueue the column lists of the selection with ``kerns`` (either family's kernels):
    returns (counts, pairs, the event to wait for, the 2-int flag array: the first row with
    an index outside [0, N), the first with a repeated column; INT32_MAX where none)."""
    alloc = runtime.memory_pool(queue.context)
    check_alloc(queue, 8 * n_rows * n_cols, "the product's column lists")
    counts = runtime.empty(queue, (n_cols,), np.int32, allocator=alloc)
    pairs = runtime.empty(queue, (n_cols, n_rows, 2), np.int32, allocator=alloc)
    bad = runtime.empty(queue, (2,), np.int32, allocator=alloc)
    fills = [runtime.enqueue_fill(queue, bad.data, np.int32(INT32_MAX), 0, bad.nbytes)]
    lists = dict(counts=counts.data, pairs=pairs.data, cap=np.int32(n_rows))
    mask_args = dict(sel=mask_dev.base_data, sel_off=elem_offset(mask_dev),
                     M=np.int32(n_rows), N=np.int32(n_cols))
    if form == "bool":
        ev = kerns["pscl_compact_cols_bool"].launch(
            queue, (round_up(n_cols, LIST_WG),), (LIST_WG,), dict(mask_args, **lists),
            wait_for=wait or None)
    else:
        seen = runtime.empty(queue, (-(-n_rows * n_cols // 32),), np.uint32, allocator=alloc)
        fills += [runtime.enqueue_fill(queue, counts.data, np.int32(0), 0, counts.nbytes),
                  runtime.enqueue_fill(queue, seen.data, np.uint32(0), 0, seen.nbytes)]
        ev = kerns["pscl_compact_cols_idx"].launch(
            queue, (round_up(n_entries, LIST_WG), n_rows), (LIST_WG, 1),
            dict(mask_args, n_keep=np.int32(n_entries), seen=seen.data, bad=bad.data,
                 **lists), wait_for=fills + list(wait))
    if events is not None:
        events.append(ev)
    bad.add_event(ev)
    return counts, pairs, ev, bad


def product_args(xv_dev, xi_dev, nx: int, rows, ldw, counts, pairs, out_dev, n_rows: int,
                 n_cols: int, k_in: int) -> dict:
    """The product kernel's arguments (both families')."""
    return dict(xv=xv_dev.base_data, xv_off=elem_offset(xv_dev), xi=xi_dev.base_data,
                xi_off=elem_offset(xi_dev), nx=np.int32(nx), wt=rows.data, ldw=np.int32(ldw),
                counts=counts.data, pairs=pairs.data, cap=np.int32(n_rows),
                out=out_dev.base_data, out_off=elem_offset(out_dev), N=np.int32(n_cols),
                K=np.int32(k_in))


def launch(queue, params, form: str, xv_dev, xi_dev, nx: int, rows, ldw, mask_dev, out_dev,
           n_rows: int, n_cols: int, k_in: int, n_entries: int, wait, events):
    """Enqueue the column lists and the product; a bool mask's output must already be
    zeroed.  Returns (the product's event, the flag array of :func:`column_lists`)."""
    kerns = runtime.kernels(queue.context, TEMPLATE,
                            ("pscl_masked_compact", f"pscl_compact_cols_{form}"),
                            **template_args(params))
    counts, pairs, ev, bad = column_lists(queue, kerns, form, mask_dev, n_rows, n_cols,
                                          n_entries, wait, events)
    ev = kerns["pscl_masked_compact"].launch(
        queue, (round_up(n_cols, params["WG"]),), (params["WG"],),
        dict(product_args(xv_dev, xi_dev, nx, rows, ldw, counts, pairs, out_dev, n_rows,
                          n_cols, k_in), stream_sink=np.int32(0)), wait_for=[ev])
    return ev, bad
