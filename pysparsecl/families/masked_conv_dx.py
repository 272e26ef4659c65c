"""masked_conv_dx: the input gradient of the output-masked convolution (the backward of
conv2d_masked).  Each output pixel's selected channels are listed once with their dy
("lists"); the weight is packed as (K, R, S, Cp), C rounded up to VEC; a work-item owns
one input pixel and a chunk of CVEC channel vectors and gathers, over the taps whose
output pixel exists, the weight rows of that pixel's listed channels scaled by dy."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import check_alloc, elem_offset, round_up, written
from ..params import ParamSpec, TileParam

TEMPLATE = "masked_conv_dx.cl.mako"

SPEC = ParamSpec(
    family="masked_conv_dx",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16),
                  "floats per vector load of a packed weight row (one FMA each)"),
        TileParam("CVEC", 4, (1, 2, 4, 8), "channel vectors of dx's pixel per work-item"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)


PACK_ARGS = KernelArgs(Signature("pscl_conv_dx_weight_pack", (
    Pointer("w", "float", restrict=True), Scalar("w_off", np.int64),     # (K, C, R, S)
    Pointer("wk", "float", const=False, restrict=True),                  # (K, R, S, Cp)
    Scalar("K", np.int32), Scalar("C", np.int32), Scalar("Cp", np.int32),
    Scalar("taps", np.int32))))


LISTS_ARGS = KernelArgs(Signature("pscl_conv_dx_lists", (
    Pointer("mask", "uchar", restrict=True), Scalar("mask_off", np.int64),
    Pointer("dy", "float", restrict=True), Scalar("dy_off", np.int64),   # (N, K, OH, OW)
    Pointer("lists", "int", const=False, restrict=True),     # (N * P, K) int2 pairs
    Pointer("counts", "int", const=False, restrict=True),    # (N * P,)
    Scalar("N", np.int32), Scalar("K", np.int32), Scalar("P", np.int32))))


ARGS = KernelArgs(Signature("pscl_masked_conv_dx", (
    Pointer("wk", "float", restrict=True),                                # (K, R, S, Cp)
    Pointer("lists", "int2", restrict=True), Pointer("counts", "int", restrict=True),
    Pointer("dx", "float", const=False, restrict=True), Scalar("dx_off", np.int64),
    *(Scalar(name, np.int32) for name in ("C", "Cp", "K", "H", "W", "OH", "OW", "R", "S",
                                          "pad_h", "pad_w", "str_h", "str_w", "dil_h",
                                          "dil_w")))))


def padded_channels(n_ch: int, params) -> int:
    """Cp: the packed weight's channel stride, C rounded up to whole vectors."""
    return round_up(n_ch, params["VEC"])


def template_args(params) -> dict:
    return dict(params, KIND="dx", ARGS=ARGS)


def pack_weight(queue, params, w_dev, events):
    """w (K, C, R, S) -> (K, R, S, Cp) on the device."""
    k_out, n_ch, r, s = w_dev.shape
    cp = padded_channels(n_ch, params)
    wk = runtime.empty(queue, (max(k_out * r * s * cp, 1),), np.float32,
                       allocator=runtime.memory_pool(queue.context))
    if not k_out * r * s * cp:
        return wk
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_conv_dx_weight_pack",),
                           KIND="pack", ARGS=PACK_ARGS)["pscl_conv_dx_weight_pack"]
    ev = kern.launch(queue, (r * s, k_out), None, dict(
        w=w_dev.base_data, w_off=elem_offset(w_dev), wk=wk.data, K=np.int32(k_out),
        C=np.int32(n_ch), Cp=np.int32(cp), taps=np.int32(r * s)),
        wait_for=w_dev.events or None)
    wk.add_event(ev)
    if events is not None:
        events.append(ev)
    return wk


def selection_lists(queue, form: str, mask_dev, dy_dev, geom: dict, k_out: int, events):
    """(lists, counts): for each output pixel (n, oh, ow), its selected channels with their
    dy as int2 (k, bits of dy), K slots per pixel, and how many there are."""
    n_pix = geom["N"] * geom["OH"] * geom["OW"]
    check_alloc(queue, 8 * n_pix * k_out, "the selection lists")
    alloc = runtime.memory_pool(queue.context)
    lists = runtime.empty(queue, (max(n_pix * k_out, 1), 2), np.int32, allocator=alloc)
    counts = runtime.empty(queue, (max(n_pix, 1),), np.int32, allocator=alloc)
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_conv_dx_lists",), KIND="lists",
                           MASK=form, ARGS=LISTS_ARGS)["pscl_conv_dx_lists"]
    plane = geom["OH"] * geom["OW"]
    ev = kern.launch(queue, (round_up(plane, 16), geom["N"]), (16, 1), dict(
        mask=mask_dev.base_data, mask_off=elem_offset(mask_dev), dy=dy_dev.base_data,
        dy_off=elem_offset(dy_dev), lists=lists.data, counts=counts.data,
        N=np.int32(geom["N"]), K=np.int32(k_out), P=np.int32(plane)),
        wait_for=(list(mask_dev.events) + list(dy_dev.events)) or None)
    lists.add_event(ev)
    counts.add_event(ev)
    if events is not None:
        events.append(ev)
    return lists, counts


def launch(queue, params, wk, lists, counts, dx_dev, geom: dict, n_ch: int, k_out: int,
           r: int, s: int, events):
    """Enqueue dx (N, C, H, W) into ``dx_dev`` (any offset: every element is written) from
    the packed weight (:func:`pack_weight` with the same ``params``) and the lists."""
    cp = padded_channels(n_ch, params)
    chunks = -(-(cp // params["VEC"]) // params["CVEC"])
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_conv_dx",),
                           **template_args(params))["pscl_masked_conv_dx"]
    (st_h, st_w), (pad_h, pad_w), (dil_h, dil_w) = (geom["stride"], geom["padding"],
                                                    geom["dilation"])
    ev = kern.launch(queue, (round_up(geom["W"] * chunks, params["WG"]), geom["H"], geom["N"]),
                     (params["WG"], 1, 1), dict(
        wk=wk.data, lists=lists.data, counts=counts.data, dx=dx_dev.base_data,
        dx_off=elem_offset(dx_dev), C=np.int32(n_ch), Cp=np.int32(cp), K=np.int32(k_out),
        H=np.int32(geom["H"]), W=np.int32(geom["W"]), OH=np.int32(geom["OH"]),
        OW=np.int32(geom["OW"]), R=np.int32(r), S=np.int32(s), pad_h=np.int32(pad_h),
        pad_w=np.int32(pad_w), str_h=np.int32(st_h), str_w=np.int32(st_w),
        dil_h=np.int32(dil_h), dil_w=np.int32(dil_w)),
        wait_for=(list(wk.events) + list(lists.events) + list(counts.events)
                  + list(dx_dev.events)) or None)
    written(dx_dev, ev)
    if events is not None:
        events.append(ev)
