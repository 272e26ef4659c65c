"""drs_scores: the search's estimated outputs S = Xp @ V, (M, k) times (k, N_pad), a small
dense product in registers: ROWS rows by NVEC vectors of columns per work-item, written as
order-preserving uint keys for the top-k."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import round_up
from ..params import Constraint, ParamSpec, TileParam
from .drs_project import PAD

TEMPLATE = "drs_scores.cl.mako"

SPEC = ParamSpec(
    family="drs_scores",
    params=(
        TileParam("VEC", 16, (4, 8, 16), "output columns per vector (one FMA each)"),
        TileParam("ROWS", 4, (1, 2, 4, 8), "rows per work-item, sharing each load of f(w)"),
        TileParam("NVEC", 4, (1, 2, 4), "vectors of output columns per work-item"),
        TileParam("WG", 1, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
    ),
    constraints=(
        Constraint("tile_within_padding", lambda p: p["VEC"] * p["NVEC"] <= PAD,
                   "a work-item's column chunk must divide the padded N"),
        Constraint("accumulators_fit_registers", lambda p: p["ROWS"] * p["NVEC"] <= 16,
                   "ROWS * NVEC vector accumulators must fit the register file"),
    ),
    work_group_size=lambda p: p["WG"],
)


_I32 = np.int32

#: pscl_drs_scores's arguments.
SIGNATURE = Signature("pscl_drs_scores", (
    Pointer("xp", "float", restrict=True), Scalar("xp_off", np.int64),
    Scalar("ldx", _I32),                                           # (M, >= k)
    Pointer("v", "float", restrict=True), Scalar("ldv", _I32),     # (k, ldv)
    Pointer("s", "uint", const=False, restrict=True),
    Scalar("lds", _I32),                                           # (M, lds) keys
    Scalar("M", _I32), Scalar("k", _I32), Scalar("n_cols", _I32)))  # n_cols <= ldv
ARGS = KernelArgs(SIGNATURE)


def template_args(params) -> dict:
    return dict(params, KIND="scores", ARGS=ARGS)


def launch(queue, params, xp, xp_off, ldx: int, pw, scores, n_rows: int, k: int, n_cols: int,
           wait):
    """Enqueue the scores of the projected rows ``xp`` (buffer's array, element offset,
    row stride) against the projected weight ``pw`` into ``scores``."""
    chunk = params["VEC"] * params["NVEC"]
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_drs_scores",),
                           **template_args(params))["pscl_drs_scores"]
    items = -(-n_rows // params["ROWS"])
    return kern.launch(
        queue, (round_up(-(-n_cols // chunk), params["WG"]), items), (params["WG"], 1), {
            "xp": xp.base_data, "xp_off": xp_off, "ldx": _I32(ldx), "v": pw.values.data,
            "ldv": _I32(pw.ld), "s": scores.data, "lds": _I32(pw.ld), "M": _I32(n_rows),
            "k": _I32(k), "n_cols": _I32(n_cols)}, wait_for=wait or None)
