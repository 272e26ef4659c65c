"""masked_vmm: the CPU-shaped masked VMM (one row of x).  A work-item scans CHUNK entries of
the selection and computes GROUP selected outputs together, each a dot product of the x row
(kept in cache) with one contiguous weight row (W^T, (N, K)), sharing each load of x."""

from __future__ import annotations

import numpy as np

from .. import runtime
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


def template_args(params, mask: str = "bool") -> dict:
    """What the template renders from: the tile parameters and the mask's form ("bool"
    or "idx")."""
    return dict(params, KIND="vmm", MASK=mask)


def launch(queue, params, x_dev, rows, ldw, form: str, mask_dev, out_dev, n_cols: int,
           k_in: int, n_entries: int, wait):
    """Enqueue the product; returns its event."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_vmm",),
                           **template_args(params, form))["pscl_masked_vmm"]
    n_items = -(-n_entries // params["CHUNK"])
    return kern(queue, (round_up(n_items, params["WG"]), 1), (params["WG"], 1),
                x_dev.base_data, elem_offset(x_dev), rows.data, mask_dev.base_data,
                elem_offset(mask_dev), out_dev.base_data, elem_offset(out_dev),
                np.int32(n_cols), np.int32(k_in), np.int32(ldw), np.int32(n_entries),
                wait_for=wait or None)
