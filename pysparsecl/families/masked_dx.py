"""masked_dx: the backward's dx = (mask * dy) @ W^T.  Each row of dx sums the selected
weight rows (W^T, (N, K)), scaled by dy; a work-item owns one row and one K chunk of KVEC
vectors."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..ops._common import elem_offset, round_up
from ..params import ParamSpec, TileParam

TEMPLATE = "masked_dx.cl.mako"

SPEC = ParamSpec(
    family="masked_dx",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "floats per vector load of a row (one FMA each)"),
        TileParam("KVEC", 16, (1, 2, 4, 8, 16), "vectors of dx's row per work-item (a K chunk)"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64), "rows per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)


def template_args(params, mask: str = "bool") -> dict:
    """The tile parameters and the mask's form ("bool": per-row lists with counts; "idx":
    the index mask itself)."""
    return dict(params, KIND="dx", MASK=mask)


def launch(queue, params, form: str, dy_dev, rows, ldw, lists, dx_dev, n_rows: int,
           n_cols: int, k_in: int, n_entries: int, wait):
    """Enqueue dx from the selection's row lists (a masked_util.SelectionLists)."""
    chunk = params["VEC"] * params["KVEC"]
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_dx",),
                           **template_args(params, form))["pscl_masked_dx"]
    counts = () if lists.row_counts is None else (lists.row_counts.data,)
    return kern(queue, (round_up(n_rows, params["WG"]), -(-k_in // chunk)), (params["WG"], 1),
                dy_dev.base_data, elem_offset(dy_dev), rows.data, *lists.row_cols, *counts,
                dx_dev.data, np.int64(0), np.int32(n_rows), np.int32(n_cols), np.int32(k_in),
                np.int32(ldw), np.int32(n_entries), wait_for=wait)
