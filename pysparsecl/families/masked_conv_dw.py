"""masked_conv_dw: the weight gradient of the output-masked convolution (the backward of
conv2d_masked).  The input is packed once into zero-padded NHWC with Cp channels (C
rounded up to VEC, zeros beyond C); a work-item owns one output channel k and a chunk of
CVEC channel vectors, keeps the accumulators of all R x S taps of its chunk, and walks
k's mask plane, reading dy only where the mask selects."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up, written
from ..params import Constraint, ParamSpec, TileParam
from . import masked_conv

TEMPLATE = "masked_conv_dw.cl.mako"

SPEC = ParamSpec(
    family="masked_conv_dw",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16),
                  "floats per vector load of a packed input pixel (one FMA each)"),
        TileParam("CVEC", 2, (1, 2, 4),
                  "channel vectors per work-item; each has R x S accumulators"),
        TileParam("WG", 4, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
    ),
    constraints=(
        Constraint("chunk_at_most_64_channels", lambda p: p["VEC"] * p["CVEC"] <= 64,
                   "a 3x3 kernel's 9 * CVEC vector accumulators must fit the register file"),
    ),
    work_group_size=lambda p: p["WG"],
)


ARGS = KernelArgs(Signature("pscl_masked_conv_dw", (
    Pointer("xp", "float", restrict=True),                                # (N, Hp, Wp, Cp)
    Pointer("mask", "uchar", restrict=True), Scalar("mask_off", np.int64),
    Pointer("dy", "float", restrict=True), Scalar("dy_off", np.int64),   # (N, K, OH, OW)
    Pointer("dw", "float", const=False, restrict=True), Scalar("dw_off", np.int64),
    *(Scalar(name, np.int32) for name in ("N", "C", "Cp", "K", "OH", "OW", "Hp", "Wp",
                                          "str_h", "str_w", "dil_h", "dil_w")))))


def padded_channels(n_ch: int, params) -> int:
    """Cp: the packed input's channel stride, C rounded up to whole vectors."""
    return round_up(n_ch, params["VEC"])


def template_args(params, mask: str = "window", r: int = 3, s: int = 3) -> dict:
    """The tile parameters, the mask's form ("window": (N, K, OH, OW); "channel":
    (N, K, 1, 1)) and the kernel's size (its taps' accumulators are unrolled)."""
    return dict(params, MASK=mask, R=int(r), S=int(s), ARGS=ARGS)


def pack_input(queue, params, x_dev, n_ch: int, geom: dict, events):
    """x (N, C, H, W) -> zero-padded NHWC (N, Hp, Wp, Cp) on the device: the forward's
    packing (masked_conv.pack_input) with the channel stride padded to whole vectors."""
    return masked_conv.pack_input(queue, x_dev, n_ch, geom, events,
                                  cp=padded_channels(n_ch, params))


def launch(queue, params, form: str, xp, mask_dev, dy_dev, dw_dev, geom: dict, n_ch: int,
           k_out: int, r: int, s: int, events):
    """Enqueue dw (K, C, R, S) into ``dw_dev`` (any offset: every element is written) from
    the packed input ``xp`` (:func:`pack_input` with the same ``params``)."""
    cp = padded_channels(n_ch, params)
    chunks = -(-(cp // params["VEC"]) // params["CVEC"])
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_conv_dw",),
                           **template_args(params, form, r, s))["pscl_masked_conv_dw"]
    ev = kern.launch(queue, (round_up(k_out * chunks, params["WG"]),), (params["WG"],), dict(
        xp=xp.data, mask=mask_dev.base_data, mask_off=elem_offset(mask_dev),
        dy=dy_dev.base_data, dy_off=elem_offset(dy_dev), dw=dw_dev.base_data,
        dw_off=elem_offset(dw_dev), N=np.int32(geom["N"]), C=np.int32(n_ch), Cp=np.int32(cp),
        K=np.int32(k_out), OH=np.int32(geom["OH"]), OW=np.int32(geom["OW"]),
        Hp=np.int32(geom["Hp"]), Wp=np.int32(geom["Wp"]), str_h=np.int32(geom["stride"][0]),
        str_w=np.int32(geom["stride"][1]), dil_h=np.int32(geom["dilation"][0]),
        dil_w=np.int32(geom["dilation"][1])),
        wait_for=(list(xp.events) + list(mask_dev.events) + list(dy_dev.events)
                  + list(dw_dev.events)) or None)
    written(dw_dev, ev)
    if events is not None:
        events.append(ev)
