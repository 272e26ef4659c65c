"""masked_dx: the backward's dx = (mask * dy) @ W^T.  Each row of dx sums the selected
weight rows (W^T, (N, K)), scaled by dy; a work-item owns one row and one K chunk of KVEC
vectors."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset
from ..params import ParamSpec, TileParam
from .masked_util import ACROSS_CONSTRAINT, backward_sizes

TEMPLATE = "masked_dx.cl.mako"

SPEC = ParamSpec(
    family="masked_dx",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "floats per vector load of a row (one FMA each)"),
        TileParam("KVEC", 16, (1, 2, 4, 8, 16), "vectors of dx's row per work-item (a K chunk)"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64, 128, 256),
                  "work-items per work-group: rows (ACROSS 0) or K chunks of one (1)"),
        TileParam("ACROSS", 0, (0, 1), "0: a work-group's items take WG rows at one K chunk "
                  "(CPU); 1: WG consecutive K chunks of one (GPU: coalesced loads)"),
    ),
    constraints=(ACROSS_CONSTRAINT,),
    work_group_size=lambda p: p["WG"],
)


def kernel_args(p) -> KernelArgs:
    return KernelArgs(Signature("pscl_masked_dx", (
        Pointer("dy", "float", restrict=True), Scalar("dy_off", np.int64),  # (M, ld)
        Pointer("wt", "float", restrict=True),                               # (N, K)
        Pointer("cols", "int", restrict=True), Scalar("cols_off", np.int64),  # (M, ld)
        *((Pointer("counts", "int", restrict=True),) if p["MASK"] == "bool" else ()),
        Pointer("dx", "float", const=False, restrict=True), Scalar("dx_off", np.int64),
        Scalar("M", np.int32), Scalar("N", np.int32), Scalar("K", np.int32),
        Scalar("ldw", np.int32), Scalar("ld", np.int32))))        # ld: N (bool) or n_keep


def template_args(params, mask: str = "bool") -> dict:
    """The tile parameters, the mask's form ("bool": per-row lists with counts; "idx":
    the index mask itself) and the kernel's arguments."""
    return dict(params, KIND="dx", MASK=mask, ARGS=kernel_args)


def launch(queue, params, form: str, dy_dev, rows, ldw, lists, dx_dev, n_rows: int,
           n_cols: int, k_in: int, n_entries: int, wait):
    """Enqueue dx from the selection's row lists (a masked_util.SelectionLists)."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_dx",),
                           **template_args(params, form))["pscl_masked_dx"]
    counts = {} if lists.row_counts is None else dict(counts=lists.row_counts.data)
    return kern.launch(queue, *backward_sizes(params, n_rows, k_in), dict(
        dy=dy_dev.base_data, dy_off=elem_offset(dy_dev), wt=rows.data,
        cols=lists.row_cols[0], cols_off=lists.row_cols[1], **counts, dx=dx_dev.data,
        dx_off=np.int64(0), M=np.int32(n_rows), N=np.int32(n_cols), K=np.int32(k_in),
        ldw=np.int32(ldw), ld=np.int32(n_entries)), wait_for=wait)
