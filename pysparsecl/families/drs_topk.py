"""drs_topk: per row, the n_keep largest scores, ties toward the lower column, CPU-shaped:
one work-item per row.  A histogram of the top
HIST_BITS bits of every key (COPIES interleaved copies), the boundary bin's keys copied as
candidates, radix passes over them, then one pass that writes the selection: a bool mask,
a compact index list, or the convolution layout."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
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


_I32 = np.int32


def signature(compact: bool, plane: bool) -> Signature:
    """pscl_drs_topk's arguments for the output's form (drs_topk_team's kernel takes the
    same): the output's element type, and P for the convolution layout (a compact list
    has none: COMPACT wins over PLANE, as in the template)."""
    if compact:
        # (M, n_keep) ascending columns
        out = (Pointer("out", "int", const=False, restrict=True), Scalar("out_off", np.int64))
    elif plane:
        # (M / P, N, P): the convolution layout; rows are (image, pixel)
        out = (Pointer("out", "uchar", const=False, restrict=True), Scalar("out_off", np.int64),
               Scalar("P", _I32))
    else:
        # (M, N) mask
        out = (Pointer("out", "uchar", const=False, restrict=True), Scalar("out_off", np.int64))
    return Signature("pscl_drs_topk", (
        Pointer("keys", "uint", restrict=True), Scalar("ldk", _I32),  # (M, ldk) from drs_scores
        Pointer("cand", "uint", const=False, restrict=True),          # (M, ldk) scratch
        Scalar("M", _I32), Scalar("N", _I32), Scalar("n_keep", _I32)) + out)


#: The kernel's arguments per (compact, plane) (compact wins: its output has no plane).
_ARGS = {(c, p): KernelArgs(signature(c, p)) for c in (False, True) for p in (False, True)}


def kernel_args(compact: bool, plane: bool) -> KernelArgs:
    return _ARGS[bool(compact), bool(plane)]


def template_args(params, compact: bool = False, plane: bool = False) -> dict:
    """The tile parameters and the output's form: a compact index list, or the
    convolution layout (``plane``), else a bool mask."""
    return dict(params, KIND="topk", COMPACT=int(compact), PLANE=int(plane),
                ARGS=kernel_args(compact, plane))


def enqueue(queue, template: str, args: dict, sizes, scores, ldk: int, cand, n_rows: int,
            n_cols: int, n_keep: int, out_dev, plane: int, wait):
    """Render ``template`` with ``args`` and enqueue it over ``sizes`` (global, local): the
    launch both top-k families share (their kernels take the same arguments)."""
    kern = runtime.kernels(queue.context, template, ("pscl_drs_topk",),
                           **args)["pscl_drs_topk"]
    values = {"keys": scores.data, "ldk": _I32(ldk), "cand": cand.data, "M": _I32(n_rows),
              "N": _I32(n_cols), "n_keep": _I32(n_keep), "out": out_dev.base_data,
              "out_off": elem_offset(out_dev)}
    if "P" in kern.signature.names:   # the convolution layout
        values["P"] = _I32(plane)
    return kern.launch(queue, *sizes, values, wait_for=wait)


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
