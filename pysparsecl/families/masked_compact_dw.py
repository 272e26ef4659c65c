"""masked_compact_dw: the weight gradient of the masked product of a compact x
(:class:`CompactRows`), CPU-shaped.  From the backward's column lists
(masked_util.SelectionLists, each column's selecting rows with their dy, in row order), a
work-item owns one row j of dw^T (N, K): it zeroes the row, then scatters dy[i, j] times
each listing row's nonzero values into it, nx multiply-adds per selected output instead
of K."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up
from ..params import ParamSpec, TileParam
from . import masked_compact

TEMPLATE = masked_compact.TEMPLATE

SPEC = ParamSpec(
    family="masked_compact_dw",
    params=(
        TileParam("WG", 8, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group, one row "
                  "of dw^T each"),
    ),
    work_group_size=lambda p: p["WG"],
)

#: The arguments of the weight gradient's kernels (this family's and the tiled one's).
DW_ARGS = (
    Pointer("xv", "float", restrict=True), Scalar("xv_off", np.int64),   # (M, nx)
    Pointer("xi", "int", restrict=True), Scalar("xi_off", np.int64),     # (M, nx)
    Scalar("nx", np.int32),
    Pointer("rows", "int", restrict=True),        # (N, M, 2): (row, bits of dy)
    Pointer("counts", "int", restrict=True),      # (N,)
    Pointer("dw", "float", const=False, restrict=True),   # (N, K), from offset 0
    Scalar("M", np.int32), Scalar("N", np.int32), Scalar("K", np.int32))

ARGS = KernelArgs(Signature("pscl_masked_compact_dw", DW_ARGS))


def kernel_values(xv_dev, xi_dev, nx: int, lists, dwt, n_rows: int, n_cols: int,
                  k_in: int) -> dict:
    """The values of DW_ARGS."""
    return dict(xv=xv_dev.base_data, xv_off=elem_offset(xv_dev), xi=xi_dev.base_data,
                xi_off=elem_offset(xi_dev), nx=np.int32(nx), rows=lists.col_rows.data,
                counts=lists.col_counts.data, dw=dwt.data, M=np.int32(n_rows),
                N=np.int32(n_cols), K=np.int32(k_in))


def template_args(params) -> dict:
    """The tile parameters, the kernel's kind and its arguments."""
    return dict(params, KIND="compact_dw", ARGS=ARGS)


def launch(queue, params, xv_dev, xi_dev, nx: int, lists, dwt, n_rows: int, n_cols: int,
           k_in: int, wait):
    """Enqueue dw^T (N, K) into ``dwt`` (a device array at offset 0) from the compact x's
    arrays and the selection's column lists; returns the event."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_compact_dw",),
                           **template_args(params))["pscl_masked_compact_dw"]
    return kern.launch(queue, (round_up(n_cols, params["WG"]),), (params["WG"],),
                       kernel_values(xv_dev, xi_dev, nx, lists, dwt, n_rows, n_cols, k_in),
                       wait_for=wait)
