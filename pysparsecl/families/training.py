"""training: the small kernels of a training step (kernels/training.cl.mako), each one
pass over memory: softmax cross-entropy forward and backward (a work-group per row), column
sums (bias gradients, and the batch loss from the rows' losses), channel sums (a
convolution's bias gradients) and one SGD step over flat
parameter arrays.  They share one tile parameter, the work-group size."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up, written
from ..params import Constraint, ParamSpec, TileParam

TEMPLATE = "training.cl.mako"

SPEC = ParamSpec(
    family="training",
    params=(
        TileParam("WG", 64, (16, 32, 64, 128, 256),
                  "work-items per work-group (a row's team for the loss)"),
    ),
    constraints=(
        Constraint("wg_power_of_two", lambda p: p["WG"] & (p["WG"] - 1) == 0,
                   "the loss's tree reduction halves the work-group"),
    ),
    work_group_size=lambda p: p["WG"],
    local_memory=lambda p: 4 * p["WG"],
)

ARGS = {
    "xent": KernelArgs(Signature("pscl_softmax_xent", (
        Pointer("logits", "float", restrict=True), Scalar("logits_off", np.int64),
        Pointer("labels", "int", restrict=True), Scalar("labels_off", np.int64),
        Pointer("grad", "float", const=False, restrict=True), Scalar("grad_off", np.int64),
        Pointer("row_loss", "float", const=False, restrict=True),
        Pointer("bad", "int", const=False),
        Scalar("N", np.int32), Scalar("scale", np.float32)))),
    "colsum": KernelArgs(Signature("pscl_column_sums", (
        Pointer("a", "float", restrict=True), Scalar("a_off", np.int64),
        Scalar("lda", np.int64),
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("M", np.int64), Scalar("N", np.int32), Scalar("scale", np.float32)))),
    "chansum": KernelArgs(Signature("pscl_channel_sums", (
        Pointer("a", "float", restrict=True), Scalar("a_off", np.int64),
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("N", np.int64), Scalar("C", np.int32), Scalar("P", np.int64),
        Scalar("scale", np.float32)))),
    "random_keys": KernelArgs(Signature("pscl_random_keys", (
        Pointer("keys", "uint", const=False, restrict=True), Scalar("ldk", np.int32),
        Scalar("N", np.int32), Scalar("seed_lo", np.uint32), Scalar("seed_hi", np.uint32)))),
    "sgd": KernelArgs(Signature("pscl_sgd", (
        Pointer("param", "float", const=False, restrict=True), Scalar("param_off", np.int64),
        Pointer("grad", "float", restrict=True), Scalar("grad_off", np.int64),
        Pointer("velocity", "float", const=False, restrict=True),
        Scalar("velocity_off", np.int64), Scalar("n", np.int64), Scalar("lr", np.float32),
        Scalar("momentum", np.float32), Scalar("weight_decay", np.float32)))),
}
KERNEL = {"xent": "pscl_softmax_xent", "colsum": "pscl_column_sums", "sgd": "pscl_sgd",
          "chansum": "pscl_channel_sums", "random_keys": "pscl_random_keys"}


def template_args(params, kind: str = "xent", has_velocity: bool = True) -> dict:
    """The tile parameters, the kernel (``kind``: "xent", "colsum", "chansum",
    "random_keys" or "sgd"), whether the SGD step keeps a velocity, and the kernel's
    arguments."""
    return dict(params, KIND=kind, HAS_VELOCITY=int(has_velocity), ARGS=ARGS[kind])


def _kernel(queue, params, kind: str, **variant):
    name = KERNEL[kind]
    return runtime.kernels(queue.context, TEMPLATE, (name,),
                           **template_args(params, kind, **variant))[name]


def _done(ev, out, events) -> None:
    written(out, ev)
    if events is not None:
        events.append(ev)


def launch_xent(queue, params, logits, labels, grad, row_loss, bad, scale: float,
                events) -> None:
    """The rows' losses and the logits' gradient (scaled by ``scale``); ``bad`` (1 int,
    preset to INT32_MAX) gets the first row with a label outside [0, N)."""
    n_rows, n_cols = logits.shape
    wait = [e for a in (logits, labels, grad, row_loss, bad) for e in a.events]
    # A row's team is no wider than the row: idle work-items still pay for each barrier
    # of the reductions (10 classes took 2.5x longer with a team of 64 than of 16, PoCL).
    wg = min(params["WG"], 1 << max(0, n_cols - 1).bit_length())
    params = dict(params, WG=wg)
    ev = _kernel(queue, params, "xent").launch(queue, (n_rows * wg,), (wg,), dict(
        logits=logits.base_data, logits_off=elem_offset(logits), labels=labels.base_data,
        labels_off=elem_offset(labels), grad=grad.base_data, grad_off=elem_offset(grad),
        row_loss=row_loss.data, bad=bad.data, N=np.int32(n_cols),
        scale=np.float32(scale)), wait_for=wait or None)
    _done(ev, grad, events)
    written(row_loss, ev)
    written(bad, ev)


def launch_column_sums(queue, params, a, out, scale: float, events) -> None:
    """``out[j] = scale * sum_i a[i, j]`` for a 2-D ``a`` whose rows may be strided."""
    n_rows, n_cols = a.shape
    lda = a.strides[0] // a.dtype.itemsize
    wg = params["WG"]
    wait = [e for x in (a, out) for e in x.events]
    items = round_up(-(-n_cols // 4), wg)                 # 4 columns per work-item
    ev = _kernel(queue, params, "colsum").launch(queue, (items,), (wg,), dict(
        a=a.base_data, a_off=elem_offset(a), lda=np.int64(lda), out=out.base_data,
        out_off=elem_offset(out), M=np.int64(n_rows), N=np.int32(n_cols),
        scale=np.float32(scale)), wait_for=wait or None)
    _done(ev, out, events)


def launch_channel_sums(queue, params, a, out, scale: float, events) -> None:
    """``out[c] = scale * sum a[:, c, ...]`` for a contiguous (N, C, ...) ``a``."""
    n_img, n_ch = a.shape[:2]
    plane = int(np.prod(a.shape[2:], dtype=np.int64))
    wg = params["WG"]
    wait = [e for x in (a, out) for e in x.events]
    ev = _kernel(queue, params, "chansum").launch(queue, (round_up(n_ch, wg),), (wg,), dict(
        a=a.base_data, a_off=elem_offset(a), out=out.base_data, out_off=elem_offset(out),
        N=np.int64(n_img), C=np.int32(n_ch), P=np.int64(plane), scale=np.float32(scale)),
        wait_for=wait or None)
    _done(ev, out, events)


def launch_sgd(queue, params, param, grad, velocity, lr: float, momentum: float,
               weight_decay: float, events) -> None:
    """One SGD step over flat arrays; ``velocity`` None: plain SGD (no momentum)."""
    n = param.size
    wg = params["WG"]
    items = round_up(max(1, -(-n // 4)), wg)                 # 4 elements per work-item
    has_velocity = velocity is not None
    v = velocity if has_velocity else param      # an unused argument still needs a buffer
    wait = [e for x in (param, grad, v) for e in x.events]
    ev = _kernel(queue, params, "sgd", has_velocity=has_velocity).launch(
        queue, (items,), (wg,), dict(
            param=param.base_data, param_off=elem_offset(param), grad=grad.base_data,
            grad_off=elem_offset(grad), velocity=v.base_data, velocity_off=elem_offset(v),
            n=np.int64(n), lr=np.float32(lr), momentum=np.float32(momentum),
            weight_decay=np.float32(weight_decay)), wait_for=wait or None)
    _done(ev, param, events)
    if has_velocity:
        written(velocity, ev)


def launch_random_keys(queue, params, keys, n_rows: int, n_cols: int, seed: int,
                       events) -> None:
    """Fill the (n_rows, ld) uint32 ``keys`` with the hash keys of ``seed`` (64-bit)."""
    wg = params["WG"]
    ev = _kernel(queue, params, "random_keys").launch(
        queue, (round_up(n_cols, wg), n_rows), (wg, 1), dict(
            keys=keys.base_data, ldk=np.int32(keys.shape[1]), N=np.int32(n_cols),
            seed_lo=np.uint32(seed & 0xFFFFFFFF), seed_hi=np.uint32(seed >> 32)),
        wait_for=list(keys.events) or None)
    _done(ev, keys, events)
