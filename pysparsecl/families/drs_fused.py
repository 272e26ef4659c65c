"""drs_fused: the search for a few rows in one launch -- each row's projection kept in
registers, then its scores -- parallel over columns.
The op's routine enables it up to ``FUSED_MAX_ROWS`` rows and k <= MAX_K."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up
from ..params import Constraint, ParamSpec, TileParam
from .drs_project import PAD

TEMPLATE = "drs_fused.cl.mako"

#: The kernel keeps the projected row in registers; beyond this k it spills.
MAX_K = 256

SPEC = ParamSpec(
    family="drs_fused",
    params=(
        TileParam("VEC", 16, (4, 8, 16), "projected dimensions / output columns per vector"),
        TileParam("NVEC", 4, (1, 2, 4), "vectors of output columns per step"),
        TileParam("ITEMS_PER_CU", 1, (1, 2, 4, 8),
                  "work-items per compute unit over the columns of one row"),
        TileParam("WG", 1, (1, 2, 4), "work-items per work-group"),
    ),
    constraints=(
        Constraint("tile_within_padding", lambda p: p["VEC"] * p["NVEC"] <= PAD,
                   "a column step must divide the padded N"),
    ),
    work_group_size=lambda p: p["WG"],
)


_I32 = np.int32

#: pscl_drs_fused's arguments.
SIGNATURE = Signature("pscl_drs_fused", (
    Pointer("x", "float", restrict=True), Scalar("x_off", np.int64),
    Scalar("d", _I32),                                             # (M, d)
    Pointer("rt", "float", restrict=True),                         # (d, K_PAD)
    Pointer("v", "float", restrict=True), Scalar("ldv", _I32),     # (k, ldv)
    Pointer("keys", "uint", const=False, restrict=True),
    Scalar("ldk", _I32),                                           # (M, ldk)
    *(Scalar(n, _I32) for n in ("M", "k", "n_cols", "cols_per_item"))))
ARGS = KernelArgs(SIGNATURE)


def template_args(params, k_pad: int = 64) -> dict:
    """The tile parameters and k padded to whole vectors (the projected row's length)."""
    return dict(params, KIND="fused", K_PAD=k_pad, ARGS=ARGS)


def launch(queue, params, x_dev, proj, pw, scores, n_rows: int, n_cols: int, wait):
    """Enqueue projection and scores of the rows of ``x_dev`` with the projection
    ``proj`` against the projected weight ``pw``."""
    k_pad = round_up(proj.k, params["VEC"])
    step = params["VEC"] * params["NVEC"]
    per_row = max(1, -(-params["ITEMS_PER_CU"] * queue.device.max_compute_units // n_rows))
    cols_per_item = round_up(-(-n_cols // per_row), step)
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_drs_fused",),
                           **template_args(params, k_pad))["pscl_drs_fused"]
    rt = proj.device_rt(k_pad)
    return kern.launch(
        queue, (round_up(-(-n_cols // cols_per_item), params["WG"]), n_rows),
        (params["WG"], 1), {
            "x": x_dev.base_data, "x_off": elem_offset(x_dev), "d": _I32(proj.d),
            "rt": rt.data, "v": pw.values.data, "ldv": _I32(pw.ld), "keys": scores.data,
            "ldk": _I32(pw.ld), "M": _I32(n_rows), "k": _I32(proj.k), "n_cols": _I32(n_cols),
            "cols_per_item": _I32(cols_per_item)},
        wait_for=(list(wait) + list(rt.events)) or None)
