"""drs_project: the search's sparse random projection, out = A @ RT, CPU-shaped: a
work-item multiplies ROWS rows of A by KVEC vectors of RT's columns.  RT = R^T / sqrt(k)
is (d, k_pad) with zero padding columns: one vector FMA over k lanes beats gathering d/3
inputs per output on every device we target.  The same tiles drive the convolution
windows' projection (KIND "windows")."""

from __future__ import annotations

import numpy as np

from .. import runtime
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


def template_args(params, transposed: bool = False) -> dict:
    """The tile parameters, whether the output is written transposed (the weight's
    projection), and DSPLIT = 1: the body it shares with drs_project_split, unsplit."""
    return dict(params, KIND="project", DSPLIT=1, TRANSPOSED=int(transposed))


def enqueue(queue, args: dict, sizes, a_dev, n_rows: int, d: int, lda: int, rt, k_pad: int,
            out, ld: int, wait):
    """Render the body with ``args`` and enqueue it over ``sizes`` (global, local): the
    launch both projection families share."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_drs_project",),
                           **args)["pscl_drs_project"]
    return kern(queue, *sizes, a_dev.base_data, elem_offset(a_dev), np.int32(n_rows),
                np.int32(d), np.int32(lda), rt.data, np.int32(k_pad), out.data, np.int32(ld),
                wait_for=wait or None)


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
                           KIND="windows", **params)["pscl_drs_conv_project"]
    items = -(-n_pix // params["ROWS"])
    return kern(queue, (round_up(items, params["WG"]), k_pad // (params["VEC"] * params["KVEC"])),
                (params["WG"], 1), xp.data, rt.data, np.int32(k_pad), out.data,
                np.int32(n_pix), np.int32(n_ch), np.int32(geom["OH"]), np.int32(geom["OW"]),
                np.int32(geom["Hp"]), np.int32(geom["Wp"]), np.int32(r), np.int32(s),
                np.int32(geom["stride"][0]), np.int32(geom["stride"][1]),
                np.int32(geom["dilation"][0]), np.int32(geom["dilation"][1]),
                wait_for=wait or None)
