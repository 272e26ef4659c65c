"""masked_lists: the backward's selection lists (each row's selected columns for dx, each
column's selecting rows with their dy values for dw), built by work-group scans: a
GPU-shaped alternative to masked_util's serial builders, which walk a whole row or 16
whole columns per work-item and leave a GPU nearly idle (1 ms for a 128 x 4096 mask on
the H200, 9 ms for 4096 x 1024).  SCAN 0 keeps the serial builders (CPU)."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..params import Constraint, ParamSpec, TileParam

TEMPLATE = "masked_lists.cl.mako"

SPEC = ParamSpec(
    family="masked_lists",
    params=(
        TileParam("SCAN", 0, (0, 1), "0: masked_util's serial builders (CPU); 1: the "
                  "work-group scans of this family (GPU)"),
        TileParam("ROW_WG", 128, (32, 64, 128, 256), "work-items scanning one row"),
        TileParam("COLS", 32, (16, 32, 64), "neighbouring columns per work-group"),
        TileParam("SEGS", 16, (4, 8, 16, 32), "row segments per column, scanned in parallel"),
    ),
    constraints=(
        Constraint("column_group_fits", lambda p: p["COLS"] * p["SEGS"] <= 1024,
                   "COLS * SEGS work-items per work-group"),
    ),
    work_group_size=lambda p: max(p["ROW_WG"], p["COLS"] * p["SEGS"]),
    local_memory=lambda p: 4 * max(p["ROW_WG"], p["COLS"] * p["SEGS"]),
)


def cols_signature(name: str, form: str) -> Signature:
    """The arguments of a column-list builder ``name`` (this family's scan, masked_util's
    serial builder) for a bool mask or a slot map."""
    return Signature(name, (
        Pointer("sel", "uchar" if form == "bool" else "int", restrict=True),
        Scalar("sel_off", np.int64),
        Pointer("dy", "float", restrict=True), Scalar("dy_off", np.int64),
        Pointer("rows", "int2", const=False, restrict=True),
        Pointer("counts", "int", const=False, restrict=True),
        Scalar("M", np.int32), Scalar("N", np.int32), Scalar("dy_cols", np.int32)))


ARGS = KernelArgs(
    Signature("pscl_rows_scan", (
        Pointer("mask", "uchar", restrict=True), Scalar("mask_off", np.int64),
        Pointer("cols", "int", const=False, restrict=True),
        Pointer("counts", "int", const=False, restrict=True),
        Scalar("M", np.int32), Scalar("N", np.int32))),
    cols_signature("pscl_cols_scan_bool", "bool"), cols_signature("pscl_cols_scan_slot", "slot"))


def template_args(params) -> dict:
    return dict(params, ARGS=ARGS)


def _kernels(ctx, params):
    return runtime.kernels(ctx, TEMPLATE, ("pscl_rows_scan", "pscl_cols_scan_bool",
                                           "pscl_cols_scan_slot"), **template_args(params))


def launch_rows(queue, params, mask, mask_off, cols, counts, n_rows: int, n_cols: int,
                wait):
    """Each row's selected columns of a bool mask into ``cols`` (n_rows, n_cols) and their
    number into ``counts``: a work-group per row."""
    kern = _kernels(queue.context, params)["pscl_rows_scan"]
    wg = params["ROW_WG"]
    return kern.launch(queue, (n_rows * wg,), (wg,), dict(
        mask=mask, mask_off=mask_off, cols=cols, counts=counts, M=np.int32(n_rows),
        N=np.int32(n_cols)), wait_for=wait)


def launch_cols(queue, params, form: str, sel, sel_off, dy, dy_off, rows, counts,
                n_rows: int, n_cols: int, dy_cols: int, wait):
    """Each column's selecting rows, with their dy values, into ``rows`` (n_cols, n_rows)
    int2 pairs and their number into ``counts``, from a bool mask (``form`` "bool") or a
    slot map ("slot")."""
    kern = _kernels(queue.context, params)[f"pscl_cols_scan_{form}"]
    cols, segs = params["COLS"], params["SEGS"]
    return kern.launch(queue, (-(-n_cols // cols) * cols, segs), (cols, segs), dict(
        sel=sel, sel_off=sel_off, dy=dy, dy_off=dy_off, rows=rows, counts=counts,
        M=np.int32(n_rows), N=np.int32(n_cols), dy_cols=np.int32(dy_cols)), wait_for=wait)
