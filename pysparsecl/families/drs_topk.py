"""drs_topk: per row, the n_keep largest scores, ties toward the lower column, CPU-shaped:
one work-item per row.  A histogram of the top
HIST_BITS bits of every key (COPIES interleaved copies), the boundary bin's keys copied as
candidates, radix passes over them, then one pass that writes the selection: a bool mask,
a compact index list, or the convolution layout."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..ops._common import elem_offset, round_up
from ..params import ParamSpec, TileParam

TEMPLATE = "drs_topk.cl.mako"

SPEC = ParamSpec(
    family="drs_topk",
    params=(
        TileParam("HIST_BITS", 9, (8, 9, 10, 11, 12),
                  "top key bits binned by the first pass (capped near 2N bins for short "
                  "rows)"),
        TileParam("COPIES", 4, (1, 2, 4),
                  "interleaved copies of the histogram (runs of one bin do not serialise)"),
        TileParam("WG", 1, (1, 2, 4, 8, 16, 32, 64), "rows (work-items) per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)


def template_args(params, compact: bool = False, plane: bool = False) -> dict:
    """The tile parameters and the output's form: a compact index list, or the
    convolution layout (``plane``), else a bool mask."""
    return dict(params, KIND="topk", COMPACT=int(compact), PLANE=int(plane))


def enqueue(queue, template: str, args: dict, sizes, scores, ldk: int, cand, n_rows: int,
            n_cols: int, n_keep: int, out_dev, plane: int, wait):
    """Render ``template`` with ``args`` and enqueue it over ``sizes`` (global, local): the
    launch both top-k families share (their kernels take the same arguments)."""
    kern = runtime.kernels(queue.context, template, ("pscl_drs_topk",),
                           **args)["pscl_drs_topk"]
    return kern(queue, *sizes, scores.data, np.int32(ldk), cand.data, np.int32(n_rows),
                np.int32(n_cols), np.int32(n_keep), out_dev.base_data, elem_offset(out_dev),
                *((np.int32(plane),) if plane else ()), wait_for=wait)


def launch(queue, params, scores, ldk: int, n_rows: int, n_cols: int, n_keep: int, out_dev,
           compact: bool, plane: int, wait):
    """Enqueue the selection from the (n_rows, ldk) keys ``scores``; ``plane`` = P writes
    a (rows / P, N, P) convolution mask."""
    # Short rows: no more bins than about twice the row (clearing them would dominate).
    params = dict(params, HIST_BITS=min(params["HIST_BITS"], max(8, n_cols.bit_length() + 1)))
    cand = runtime.empty(queue, (n_rows, ldk), np.uint32,
                         allocator=runtime.memory_pool(queue.context))
    sizes = ((round_up(n_rows, params["WG"]),), (params["WG"],))
    return enqueue(queue, TEMPLATE, template_args(params, compact, bool(plane)), sizes, scores,
                   ldk, cand, n_rows, n_cols, n_keep, out_dev, plane, wait)
