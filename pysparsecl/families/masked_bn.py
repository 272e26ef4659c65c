"""masked_bn: DSG's double-mask BatchNorm, ``mask * BN(ReLU(y))``:
in training, a statistics pass over the selected entries per channel, then the apply
pass; the backward is a per-channel reduction pass, then an elementwise pass.  VEC
elements per vector along pixels (or along channels for (M, C) inputs)."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up, written
from ..params import ParamSpec, TileParam

TEMPLATE = "masked_bn.cl.mako"

SPEC = ParamSpec(
    family="masked_bn",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "elements per vector (pixels, or FC channels)"),
        TileParam("WG", 8, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)


_INPUTS = (Pointer("y", "float", restrict=True), Scalar("y_off", np.int64),
           Pointer("mask", "uchar", restrict=True), Scalar("mask_off", np.int64))
ARGS = {
    "apply": KernelArgs(Signature("pscl_masked_bn_apply", _INPUTS + (
        Pointer("gamma", "float", restrict=True), Pointer("beta", "float", restrict=True),
        Pointer("mean", "float", restrict=True), Pointer("var", "float", restrict=True),
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("n_rows", np.int32), Scalar("row_len", np.int32), Scalar("C", np.int32),
        Scalar("eps", np.float32)))),
    "stats": KernelArgs(Signature("pscl_masked_bn_stats", _INPUTS + (
        Pointer("mean", "float", const=False, restrict=True),
        Pointer("var", "float", const=False, restrict=True),
        Scalar("outer", np.int32), Scalar("C", np.int32), Scalar("inner", np.int32)))),
    "grad_stats": KernelArgs(Signature("pscl_masked_bn_grad_stats", _INPUTS + (
        Pointer("dout", "float", restrict=True), Scalar("dout_off", np.int64),
        Pointer("mean", "float", restrict=True), Pointer("var", "float", restrict=True),
        Pointer("dgamma", "float", const=False, restrict=True), Scalar("dgamma_off", np.int64),
        Pointer("dbeta", "float", const=False, restrict=True), Scalar("dbeta_off", np.int64),
        Pointer("coef", "float", const=False, restrict=True),
        Scalar("outer", np.int32), Scalar("C", np.int32), Scalar("inner", np.int32),
        Scalar("eps", np.float32), Scalar("batch_stats", np.int32)))),
    "grad_apply": KernelArgs(Signature("pscl_masked_bn_grad_apply", _INPUTS + (
        Pointer("dout", "float", restrict=True), Scalar("dout_off", np.int64),
        Pointer("gamma", "float", restrict=True), Pointer("mean", "float", restrict=True),
        Pointer("var", "float", restrict=True), Pointer("coef", "float", restrict=True),
        Pointer("dy", "float", const=False, restrict=True), Scalar("dy_off", np.int64),
        Scalar("n_rows", np.int32), Scalar("row_len", np.int32), Scalar("C", np.int32),
        Scalar("eps", np.float32)))),
}


def template_args(params, kind: str = "apply", channel_last: bool = False) -> dict:
    """The tile parameters, the pass ("stats", "apply", "grad_stats" or "grad_apply"),
    the layout (channels last for (M, C) inputs) and the pass's kernel arguments."""
    return dict(params, KIND=kind, CHANNEL_LAST=int(channel_last), ARGS=ARGS[kind])


def launch(queue, params, y_dev, mask_dev, dev, out_dev, outer: int, n_ch: int, inner: int,
           eps: float, training: bool, events) -> None:
    """Enqueue the passes; ``dev`` holds the device gamma, beta, mean and var."""
    channel_last = inner == 1
    wait = [e for a in (y_dev, mask_dev, out_dev, *dev.values()) for e in a.events]
    vec, wg = params["VEC"], params["WG"]
    if training:
        kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_bn_stats",),
                               **template_args(params, "stats", channel_last)
                               )["pscl_masked_bn_stats"]
        items = -(-n_ch // vec) if channel_last else n_ch
        ev = kern.launch(queue, (round_up(items, wg),), (wg,), dict(
            y=y_dev.base_data, y_off=elem_offset(y_dev), mask=mask_dev.base_data,
            mask_off=elem_offset(mask_dev), mean=dev["mean"].data, var=dev["var"].data,
            outer=np.int32(outer), C=np.int32(n_ch), inner=np.int32(inner)),
            wait_for=wait or None)
        wait.append(ev)
        if events is not None:
            events.append(ev)
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_bn_apply",),
                           **template_args(params, "apply", channel_last)
                           )["pscl_masked_bn_apply"]
    n_rows, row_len = (outer, n_ch) if channel_last else (outer * n_ch, inner)
    ev = kern.launch(queue, (round_up(-(-row_len // vec), wg), n_rows), (wg, 1), dict(
        y=y_dev.base_data, y_off=elem_offset(y_dev), mask=mask_dev.base_data,
        mask_off=elem_offset(mask_dev), gamma=dev["gamma"].data, beta=dev["beta"].data,
        mean=dev["mean"].data, var=dev["var"].data, out=out_dev.base_data,
        out_off=elem_offset(out_dev), n_rows=np.int32(n_rows), row_len=np.int32(row_len),
        C=np.int32(n_ch), eps=np.float32(eps)), wait_for=wait or None)
    written(out_dev, ev)
    if events is not None:
        events.append(ev)


def launch_backward(queue, params, y_dev, mask_dev, dout_dev, dev, coef, dy_dev,
                    outer: int, n_ch: int, inner: int, eps: float, batch_stats: bool,
                    events) -> None:
    """Enqueue the backward's two passes.  ``dev`` holds the device gamma, mean, var (the
    forward's) and the dgamma, dbeta outputs; ``coef`` is a (2C,) scratch array."""
    channel_last = inner == 1
    wait = [e for a in (y_dev, mask_dev, dout_dev, dy_dev, coef, *dev.values())
            for e in a.events]
    vec, wg = params["VEC"], params["WG"]
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_bn_grad_stats",),
                           **template_args(params, "grad_stats", channel_last)
                           )["pscl_masked_bn_grad_stats"]
    items = -(-n_ch // vec) if channel_last else n_ch
    ev = kern.launch(queue, (round_up(items, wg),), (wg,), dict(
        y=y_dev.base_data, y_off=elem_offset(y_dev), mask=mask_dev.base_data,
        mask_off=elem_offset(mask_dev), dout=dout_dev.base_data,
        dout_off=elem_offset(dout_dev), mean=dev["mean"].data, var=dev["var"].data,
        dgamma=dev["dgamma"].base_data, dgamma_off=elem_offset(dev["dgamma"]),
        dbeta=dev["dbeta"].base_data, dbeta_off=elem_offset(dev["dbeta"]), coef=coef.data,
        outer=np.int32(outer), C=np.int32(n_ch), inner=np.int32(inner),
        eps=np.float32(eps), batch_stats=np.int32(batch_stats)), wait_for=wait or None)
    for name in ("dgamma", "dbeta"):
        written(dev[name], ev)
    if events is not None:
        events.append(ev)
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_bn_grad_apply",),
                           **template_args(params, "grad_apply", channel_last)
                           )["pscl_masked_bn_grad_apply"]
    n_rows, row_len = (outer, n_ch) if channel_last else (outer * n_ch, inner)
    ev = kern.launch(queue, (round_up(-(-row_len // vec), wg), n_rows), (wg, 1), dict(
        y=y_dev.base_data, y_off=elem_offset(y_dev), mask=mask_dev.base_data,
        mask_off=elem_offset(mask_dev), dout=dout_dev.base_data,
        dout_off=elem_offset(dout_dev), gamma=dev["gamma"].data, mean=dev["mean"].data,
        var=dev["var"].data, coef=coef.data, dy=dy_dev.base_data, dy_off=elem_offset(dy_dev),
        n_rows=np.int32(n_rows), row_len=np.int32(row_len), C=np.int32(n_ch),
        eps=np.float32(eps)), wait_for=[ev])
    written(dy_dev, ev)
    if events is not None:
        events.append(ev)
