"""masked_vmm: the CPU-shaped masked VMM (one row of x).  A work-item scans CHUNK entries of
the selection and computes GROUP selected outputs together, each a dot product of the x row
(kept in cache) with one contiguous weight row (W^T, (N, K)), sharing each load of x."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up
from ..params import Constraint, ParamSpec, TileParam

TEMPLATE = "masked_vmm.cl.mako"

SPEC = ParamSpec(
    family="masked_vmm",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "floats per vector load of a row (one FMA each)"),
        TileParam("GROUP", 4, (1, 2, 4, 8),
                  "selected outputs computed together, sharing each load of the x row"),
        TileParam("CHUNK", 128, (8, 16, 32, 64, 128, 256, 512),
                  "mask columns (or idx slots) scanned by one work-item"),
        TileParam("WG", 1, (1, 2, 4, 8, 16, 32, 64, 128), "work-items per work-group"),
    ),
    constraints=(
        Constraint("group_within_chunk", lambda p: p["GROUP"] <= p["CHUNK"],
                   "a work-item cannot fill a group larger than the entries it scans"),
    ),
    work_group_size=lambda p: p["WG"],
)


def kernel_args(p) -> KernelArgs:
    """The kernel's arguments, for the template parameters ``p``."""
    return KernelArgs(Signature("pscl_masked_vmm", (
        Pointer("x", "float", restrict=True), Scalar("x_off", np.int64),        # (M, K)
        Pointer("wt", "float", restrict=True),                                   # (N, K)
        # bool: (M, N); idx: (M, n_keep)
        Pointer("sel", "uchar" if p["MASK"] == "bool" else "int", restrict=True),
        Scalar("sel_off", np.int64),
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("N", np.int32), Scalar("K", np.int32),
        Scalar("ldw", np.int32),                                  # wt's row stride
        Scalar("n_entries", np.int32))))                          # N (bool) or n_keep (idx)


def template_args(params, mask: str = "bool") -> dict:
    """What the template renders from: the tile parameters, the mask's form ("bool" or
    "idx") and the kernel's arguments."""
    return dict(params, KIND="vmm", MASK=mask, ARGS=kernel_args)


def launch(queue, params, x_dev, rows, ldw, form: str, mask_dev, out_dev, n_cols: int,
           k_in: int, n_entries: int, wait):
    """Enqueue the product; returns its event."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_vmm",),
                           **template_args(params, form))["pscl_masked_vmm"]
    n_items = -(-n_entries // params["CHUNK"])
    return kern.launch(queue, (round_up(n_items, params["WG"]), 1), (params["WG"], 1), dict(
        x=x_dev.base_data, x_off=elem_offset(x_dev), wt=rows.data, sel=mask_dev.base_data,
        sel_off=elem_offset(mask_dev), out=out_dev.base_data, out_off=elem_offset(out_dev),
        N=np.int32(n_cols), K=np.int32(k_in), ldw=np.int32(ldw),
        n_entries=np.int32(n_entries)), wait_for=wait or None)
