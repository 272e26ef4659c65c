"""masked_conv: output-masked direct convolution with any mask.
The input is packed once into zero-padded NHWC and the weight into (K, R, S, C); a
work-item takes one output channel and a block of BLOCK_PIX output pixels and computes the
selected ones GROUP at a time, sharing each load of the weight.  The packing kernels
("pack") serve masked_conv_channels and drs_mask_conv2d too."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyopencl.array as cl_array

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import (
    check_alloc,
    elem_offset,
    int_pair,
    is_device_array,
    round_up,
    written,
)
from ..params import ParamSpec, TileParam

TEMPLATE = "masked_conv.cl.mako"

SPEC = ParamSpec(
    family="masked_conv",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "floats per vector load of a row (one FMA each)"),
        TileParam("GROUP", 4, (1, 2, 4, 8),
                  "selected pixels of one channel computed together, sharing each weight load"),
        TileParam("BLOCK_PIX", 512, (64, 128, 256, 512, 1024, 2048, 4096),
                  "output pixels (n, oh, ow) per work-item; every channel passes over them"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64), "output channels per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)


#: The convolution's sizes, as both masked convolution kernels take them (shape_args).
SHAPE = tuple(Scalar(name, np.int32) for name in (
    "C", "K", "OH", "OW", "Hp", "Wp", "R", "S", "str_h", "str_w", "dil_h", "dil_w"))

#: The packing kernels (KIND "pack").
PACK_ARGS = KernelArgs(
    Signature("pscl_conv_pack", (
        Pointer("x", "float", restrict=True), Scalar("x_off", np.int64),
        Pointer("xp", "float", const=False, restrict=True),
        *(Scalar(name, np.int32) for name in ("N", "C", "Cp", "H", "W", "Hp", "Wp",
                                              "pad_h", "pad_w")))),
    Signature("pscl_conv_pack_tiled", (
        Pointer("x", "float", restrict=True), Scalar("x_off", np.int64),
        Pointer("xp", "float", const=False, restrict=True),
        *(Scalar(name, np.int32) for name in ("N", "C", "Cp", "H", "W", "Hp", "Wp",
                                              "pad_h", "pad_w")))),
    Signature("pscl_conv_weight_pack", (
        Pointer("w", "float", restrict=True), Scalar("w_off", np.int64),
        Pointer("wk", "float", const=False, restrict=True),
        Scalar("K", np.int32), Scalar("C", np.int32), Scalar("taps", np.int32))))

ARGS = KernelArgs(Signature("pscl_masked_conv", (
    Pointer("xp", "float", restrict=True),                     # (N, Hp, Wp, C)
    Pointer("wk", "float", restrict=True),                     # (K, R, S, C)
    Pointer("mask", "uchar", restrict=True), Scalar("mask_off", np.int64),  # (N, K, OH, OW)
    Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
    Scalar("N", np.int32), *SHAPE, Scalar("rows_per_block", np.int32))))


def template_args(params) -> dict:
    return dict(params, KIND="general", ARGS=ARGS)


def geometry(x_shape, r: int, s: int, stride, padding, dilation) -> dict:
    """Sizes of a convolution of an (N, C, H, W) input with an R x S kernel: output and
    padded input planes, and the checked stride, padding and dilation pairs."""
    from ..ops.conv2d import conv2d_output_shape
    stride = int_pair(stride, "stride", 1)
    padding = int_pair(padding, "padding", 0)
    dilation = int_pair(dilation, "dilation", 1)
    n, _, h, w = x_shape
    oh, ow = conv2d_output_shape((h, w), (r, s), stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output size would be {oh}x{ow} for input {h}x{w}, kernel {r}x{s}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}; it must "
                         "be positive")
    return dict(N=n, H=h, W=w, OH=oh, OW=ow, Hp=h + 2 * padding[0], Wp=w + 2 * padding[1],
                stride=stride, padding=padding, dilation=dilation)


def pack_input(queue, x_dev, n_ch: int, geom: dict, events, cp: Optional[int] = None,
               tiled: Optional[bool] = None):
    """x (N, C, H, W) -> zero-padded NHWC (N, Hp, Wp, Cp) on the device; ``cp`` (>= C, C
    by default) is the channel stride, channels C..Cp zero.  ``tiled``: transpose through
    local memory (by default on every device but a CPU)."""
    cp = n_ch if cp is None else cp
    size = geom["N"] * geom["Hp"] * geom["Wp"] * cp
    check_alloc(queue, 4 * size, "the packed input")
    xp = runtime.empty(queue, (max(size, 1),), np.float32,
                       allocator=runtime.memory_pool(queue.context))
    if not size:
        return xp
    # A GPU transposes through local memory; a CPU copies a pixel's channels per work-item.
    if tiled is None:
        tiled = runtime.device_kind(queue.device) != "cpu"
    name = "pscl_conv_pack_tiled" if tiled else "pscl_conv_pack"
    kern = runtime.kernels(queue.context, TEMPLATE, (name,), KIND="pack", ARGS=PACK_ARGS)[name]
    grid, local = (((round_up(geom["Wp"], 32), -(-cp // 32) * 8, geom["N"] * geom["Hp"]),
                    (32, 8, 1)) if tiled else
                   ((round_up(geom["Wp"], 16), geom["Hp"], geom["N"]), (16, 1, 1)))
    ev = kern.launch(queue, grid, local, dict(
        x=x_dev.base_data, x_off=elem_offset(x_dev), xp=xp.data, N=np.int32(geom["N"]),
        C=np.int32(n_ch), Cp=np.int32(cp), H=np.int32(geom["H"]), W=np.int32(geom["W"]),
        Hp=np.int32(geom["Hp"]), Wp=np.int32(geom["Wp"]), pad_h=np.int32(geom["padding"][0]),
        pad_w=np.int32(geom["padding"][1])), wait_for=x_dev.events or None)
    xp.add_event(ev)
    if events is not None:
        events.append(ev)
    return xp


def pack_weight(queue, w, events, tiled: Optional[bool] = None):
    """w (K, C, R, S) -> (K, R, S, C) on the device.  A device w is transposed by a kernel:
    ``tiled`` (by default on every device but a CPU) through local memory, as the input's
    pack with each output channel an image of one R * S row."""
    k_out, n_ch, r, s = w.shape
    if not is_device_array(w):
        host = np.ascontiguousarray(np.asarray(w).transpose(0, 2, 3, 1))
        return cl_array.to_device(queue, host, allocator=runtime.memory_pool(queue.context))
    if tiled is None:
        tiled = runtime.device_kind(queue.device) != "cpu"
    if tiled:
        geom = dict(N=k_out, H=1, W=r * s, Hp=1, Wp=r * s, padding=(0, 0))
        return pack_input(queue, w, n_ch, geom, events, tiled=True).reshape(k_out, r, s, n_ch)
    wk = runtime.empty(queue, (k_out, r, s, n_ch), np.float32,
                       allocator=runtime.memory_pool(queue.context))
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_conv_weight_pack",), KIND="pack",
                           ARGS=PACK_ARGS)["pscl_conv_weight_pack"]
    ev = kern.launch(queue, (r * s, k_out), None, dict(
        w=w.base_data, w_off=elem_offset(w), wk=wk.data, K=np.int32(k_out), C=np.int32(n_ch),
        taps=np.int32(r * s)), wait_for=w.events or None)
    wk.add_event(ev)
    if events is not None:
        events.append(ev)
    return wk


def shape_args(geom: dict, n_ch: int, k_out: int, r: int, s: int) -> dict:
    """The values of SHAPE, by name."""
    values = (n_ch, k_out, geom["OH"], geom["OW"], geom["Hp"], geom["Wp"], r, s,
              *geom["stride"], *geom["dilation"])
    return {a.name: np.int32(v) for a, v in zip(SHAPE, values)}


def launch(queue, params, xp, wk, mask_dev, out_dev, geom, n_ch, k_out, r, s, events):
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_conv",),
                           **template_args(params))["pscl_masked_conv"]
    n_pix = geom["N"] * geom["OH"] * geom["OW"]
    block = params["BLOCK_PIX"]
    ev = kern.launch(queue, (round_up(k_out, params["WG"]), -(-n_pix // block)),
                     (params["WG"], 1), dict(
        xp=xp.data, wk=wk.data, mask=mask_dev.base_data, mask_off=elem_offset(mask_dev),
        out=out_dev.base_data, out_off=elem_offset(out_dev), N=np.int32(geom["N"]),
        **shape_args(geom, n_ch, k_out, r, s), rows_per_block=np.int32(block)),
        wait_for=(list(xp.events) + list(wk.events) + list(mask_dev.events)
                  + list(out_dev.events)) or None)
    written(out_dev, ev)
    if events is not None:
        events.append(ev)
