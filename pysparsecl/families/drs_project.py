"""drs_project: the search's sparse random projection, out = A @ RT, CPU-shaped: a
work-item multiplies ROWS rows of A by KVEC vectors of RT's columns.  RT = R^T / sqrt(k)
is (d, k_pad) with zero padding columns: one vector FMA over k lanes beats gathering d/3
inputs per output on every device we target.  The same tiles drive the convolution
windows' projection (KIND "windows")."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up
from ..params import Constraint, ParamSpec, TileParam

TEMPLATE = "drs_project.cl.mako"

#: Padding of k (projection output) and N (projected weight columns): every candidate
#: tile (VEC * KVEC, VEC * NVEC <= PAD) then reads whole vectors inside the buffers.
PAD = 64

#: Constraints every projection tile obeys (drs_project_split's too).
TILE_CONSTRAINTS = (
    Constraint("tile_within_padding", lambda p: p["VEC"] * p["KVEC"] <= PAD,
               "a work-item's k chunk must divide the padded k"),
    Constraint("accumulators_fit_registers", lambda p: p["ROWS"] * p["KVEC"] <= 16,
               "ROWS * KVEC vector accumulators must fit the register file"),
)

SPEC = ParamSpec(
    family="drs_project",
    params=(
        TileParam("VEC", 16, (4, 8, 16), "projected dimensions per vector (one FMA each)"),
        TileParam("ROWS", 8, (1, 2, 4, 8), "input rows per work-item, sharing each load of R"),
        TileParam("KVEC", 1, (1, 2, 4), "vectors of projected dimensions per work-item"),
        TileParam("WG", 1, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
    ),
    constraints=TILE_CONSTRAINTS,
    work_group_size=lambda p: p["WG"],
)

_I32, _I64 = np.int32, np.int64

#: pscl_drs_project's arguments (KIND "project" and "project_split": one body).
PROJECT_SIGNATURE = Signature("pscl_drs_project", (
    Pointer("a", "float", restrict=True), Scalar("a_off", _I64),   # (n_rows, d), row stride lda
    Scalar("n_rows", _I32), Scalar("d", _I32), Scalar("lda", _I32),
    Pointer("rt", "float", restrict=True), Scalar("k_pad", _I32),  # (d, k_pad)
    Pointer("out", "float", const=False, restrict=True),           # (n_rows, ld) or (k_pad, ld)
    Scalar("ld_out", _I32)))
#: pscl_drs_conv_project's arguments (KIND "windows").
WINDOWS_SIGNATURE = Signature("pscl_drs_conv_project", (
    Pointer("xp", "float", restrict=True),                         # (N, Hp, Wp, C)
    Pointer("rt", "float", restrict=True), Scalar("k_pad", _I32),  # (R * S * C, k_pad)
    Pointer("out", "float", const=False, restrict=True),           # (N * P, k_pad)
    *(Scalar(n, _I32) for n in ("n_pix", "C", "OH", "OW", "Hp", "Wp", "R", "S", "str_h",
                                "str_w", "dil_h", "dil_w"))))
PROJECT_ARGS = KernelArgs(PROJECT_SIGNATURE)
WINDOWS_ARGS = KernelArgs(WINDOWS_SIGNATURE)


def template_args(params, transposed: bool = False) -> dict:
    """The tile parameters, whether the output is written transposed (the weight's
    projection), and DSPLIT = 1: the body it shares with drs_project_split, unsplit (no
    reduction buffer)."""
    return dict(params, KIND="project", DSPLIT=1, RED_VECS=0, TRANSPOSED=int(transposed),
                ARGS=PROJECT_ARGS)


def windows_template_args(params) -> dict:
    """The tile parameters of the convolution windows' projection (KIND "windows")."""
    return dict(params, KIND="windows", ARGS=WINDOWS_ARGS)


def enqueue(queue, args: dict, sizes, a_dev, n_rows: int, d: int, lda: int, rt, k_pad: int,
            out, ld: int, wait):
    """Render the body with ``args`` and enqueue it over ``sizes`` (global, local): the
    launch both projection families share."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_drs_project",),
                           **args)["pscl_drs_project"]
    return kern.launch(queue, *sizes, {
        "a": a_dev.base_data, "a_off": elem_offset(a_dev), "n_rows": _I32(n_rows),
        "d": _I32(d), "lda": _I32(lda), "rt": rt.data, "k_pad": _I32(k_pad), "out": out.data,
        "ld_out": _I32(ld)}, wait_for=wait or None)


def launch(queue, params, a_dev, n_rows: int, d: int, lda: int, rt, k_pad: int, out, ld: int,
           transposed: bool, wait):
    """Enqueue out = A @ RT ((n_rows, ld), or (k_pad, ld) when ``transposed``)."""
    items, chunks = -(-n_rows // params["ROWS"]), k_pad // (params["VEC"] * params["KVEC"])
    sizes = ((round_up(items, params["WG"]), chunks), (params["WG"], 1))
    return enqueue(queue, template_args(params, transposed), sizes, a_dev, n_rows, d, lda, rt,
                   k_pad, out, ld, wait)


def launch_windows(queue, params, xp, rt, k_pad: int, out, n_pix: int, n_ch: int, geom: dict,
                   r: int, s: int, wait):
    """Enqueue f(window) for every output pixel of a convolution, (n_pix, k_pad), from the
    packed NHWC input ``xp`` (masked_conv.pack_input) and RT with rows in (r, s, c) order:
    the windows are gathered on the device, the im2col matrix never formed."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_drs_conv_project",),
                           **windows_template_args(params))["pscl_drs_conv_project"]
    items = -(-n_pix // params["ROWS"])
    return kern.launch(
        queue, (round_up(items, params["WG"]), k_pad // (params["VEC"] * params["KVEC"])),
        (params["WG"], 1), {
            "xp": xp.data, "rt": rt.data, "k_pad": _I32(k_pad), "out": out.data,
            "n_pix": _I32(n_pix), "C": _I32(n_ch), "OH": _I32(geom["OH"]),
            "OW": _I32(geom["OW"]), "Hp": _I32(geom["Hp"]), "Wp": _I32(geom["Wp"]),
            "R": _I32(r), "S": _I32(s), "str_h": _I32(geom["stride"][0]),
            "str_w": _I32(geom["stride"][1]), "dil_h": _I32(geom["dilation"][0]),
            "dil_w": _I32(geom["dilation"][1])}, wait_for=wait or None)
