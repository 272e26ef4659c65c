"""masked_conv_channels: masked convolution with a per-sample output-channel mask (a mask
constant over each OH x OW plane).  The output is zeroed, then the selected planes are
computed in register tiles: PIX output pixels by KB selected channels per work-item."""

from __future__ import annotations

import numpy as np
import pyopencl.array as cl_array

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, is_device_array, round_up, written
from ..params import Constraint, ParamSpec, TileParam
from .masked_conv import SHAPE, shape_args

TEMPLATE = "masked_conv_channels.cl.mako"

SPEC = ParamSpec(
    family="masked_conv_channels",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "floats per vector load of a row (one FMA each)"),
        TileParam("PIX", 4, (1, 2, 4, 8), "output pixels per work-item (each w load feeds them)"),
        TileParam("KB", 4, (1, 2, 4), "selected channels per work-item (each x load feeds them)"),
        TileParam("WG", 4, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
    ),
    constraints=(
        Constraint("accumulators_fit_registers", lambda p: p["PIX"] * p["KB"] <= 16,
                   "PIX * KB vector accumulators must fit the register file"),
    ),
    work_group_size=lambda p: p["WG"],
)


ARGS = KernelArgs(Signature("pscl_masked_conv_channels", (
    Pointer("xp", "float", restrict=True),                     # (N, Hp, Wp, C)
    Pointer("wk", "float", restrict=True),                     # (K, R, S, C)
    Pointer("chans", "int", restrict=True),                    # (N, K) selected, compact
    Pointer("counts", "int", restrict=True),                   # (N,)
    Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
    *SHAPE)))


def template_args(params) -> dict:
    return dict(params, KIND="channels", ARGS=ARGS)


def launch(queue, params, xp, wk, channels, out_dev, geom, n_ch, k_out, r, s, events):
    """Zero the output, then compute the selected planes; ``channels`` is the (N, K, 1, 1)
    mask (a device one is read back: N * K bytes, to build each image's channel list)."""
    n_img = geom["N"]
    # The channel lists are built on the host: a replay could not rebuild them.
    runtime.refuse_capture("conv2d_masked's channel-mask path")
    if is_device_array(channels):
        flags = channels.get(queue=queue).reshape(n_img, k_out)
    else:
        flags = np.asarray(channels).reshape(n_img, k_out)
    counts = flags.sum(axis=1).astype(np.int32)
    chans = np.zeros((n_img, max(k_out, 1)), np.int32)
    for n in range(n_img):
        sel = np.flatnonzero(flags[n])
        chans[n, :sel.size] = sel
    alloc = runtime.memory_pool(queue.context)
    chans_dev = cl_array.to_device(queue, chans, allocator=alloc)
    counts_dev = cl_array.to_device(queue, counts, allocator=alloc)
    fill = runtime.enqueue_fill(queue, out_dev.base_data, np.float32(0), out_dev.offset,
                                out_dev.nbytes, wait_for=out_dev.events or None)
    if not counts.any():
        written(out_dev, fill)
        return
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_conv_channels",),
                           **template_args(params))["pscl_masked_conv_channels"]
    n_pix = geom["OH"] * geom["OW"]
    items = -(-n_pix // params["PIX"])
    groups = -(-int(counts.max()) // params["KB"])
    ev = kern.launch(queue, (round_up(items, params["WG"]), groups, n_img),
                     (params["WG"], 1, 1), dict(
        xp=xp.data, wk=wk.data, chans=chans_dev.data, counts=counts_dev.data,
        out=out_dev.base_data, out_off=elem_offset(out_dev),
        **shape_args(geom, n_ch, k_out, r, s)),
        wait_for=[fill] + list(xp.events) + list(wk.events))
    written(out_dev, ev)
    if events is not None:
        events.append(ev)
