"""pooling: 2-D max and average pooling of NCHW float32 planes, forward and backward
(kernels/pooling.cl.mako).  The forward gives a work-item RUN consecutive outputs of one
output row; the backward is a gather with the same tiling over the input: a work-item
sums, for RUN consecutive inputs of one input row, the gradient of the windows that cover
each, with no atomics and the same result on every run."""

from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up, written
from ..params import ParamSpec, TileParam

TEMPLATE = "pooling.cl.mako"

SPEC = ParamSpec(
    family="pooling",
    params=(
        TileParam("WG", 64, (16, 32, 64, 128, 256), "work-items per work-group"),
        TileParam("RUN", 4, (1, 2, 4, 8, 16),
                  "consecutive cells of one row per work-item (outputs forward, inputs "
                  "backward), sharing the item's index arithmetic and its window rows"),
    ),
    work_group_size=lambda p: p["WG"],
)

#: The kernels, by KIND.
KERNEL = {"max": "pscl_max_pool", "avg": "pscl_avg_pool", "max_grad": "pscl_max_grad",
          "avg_grad": "pscl_avg_grad"}


class Window(NamedTuple):
    """A pooling's geometry: the input and output planes and the window, as (h, w)."""
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]

    def scalars(self) -> dict:
        """The kernels' geometry arguments."""
        names = ("H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW")
        values = self.in_hw + self.out_hw + self.kernel + self.stride + self.padding
        return {name: np.int32(v) for name, v in zip(names, values)}


_GEOMETRY = tuple(Scalar(name, np.int32) for name in
                  ("H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW"))
_GRID = (Scalar("row_chunks", np.int32), Scalar("n_items", np.int32))


def _array(name: str, ctype: str = "float", writes: bool = False) -> tuple:
    return (Pointer(name, ctype, const=not writes, restrict=True), Scalar(f"{name}_off", np.int64))


@functools.lru_cache(maxsize=None)
def kernel_args(kind: str, with_indices: bool = False) -> KernelArgs:
    """The arguments of the kernel of ``kind``; the max forward takes ``idx`` only
    ``with_indices``."""
    arrays = {
        "max": _array("x") + _array("y", writes=True) + (
            _array("idx", "int", writes=True) if with_indices else ()),
        "avg": _array("x") + _array("y", writes=True),
        "max_grad": _array("dy") + _array("idx", "int") + _array("dx", writes=True),
        "avg_grad": _array("dy") + _array("dx", writes=True),
    }[kind]
    return KernelArgs(Signature(KERNEL[kind], arrays + _GEOMETRY + _GRID))


def template_args(params, kind: str = "max", with_indices: bool = True,
                  count_include_pad: bool = True) -> dict:
    """The tile parameters, the kernel (``kind``: "max", "avg", "max_grad" or
    "avg_grad"), whether the max forward writes the winners' indices and whether an
    average counts padded cells, and the kernel's arguments.  A variant that does not
    apply to ``kind`` is rendered as 0, so that it builds no second program."""
    indices = kind == "max" and bool(with_indices)
    count_pad = kind in ("avg", "avg_grad") and bool(count_include_pad)
    return dict(params, KIND=kind, INDICES=int(indices), COUNT_PAD=int(count_pad),
                ARGS=kernel_args(kind, indices))


def _launch(queue, params, kind: str, arrays: dict, outputs: tuple, window: Window,
            rows: int, row_len: int, events, **variant) -> None:
    """Enqueue ``kind`` over ``rows`` rows of ``row_len`` cells; ``arrays`` maps each array
    argument to its device array, ``outputs`` names those the kernel writes."""
    name = KERNEL[kind]
    kernel = runtime.kernels(queue.context, TEMPLATE, (name,),
                             **template_args(params, kind, **variant))[name]
    run, wg = params["RUN"], params["WG"]
    row_chunks = -(-row_len // run)
    n_items = rows * row_chunks
    args = {}
    for arg, a in arrays.items():
        args[arg] = a.base_data
        args[f"{arg}_off"] = elem_offset(a)
    args.update(window.scalars(), row_chunks=np.int32(row_chunks), n_items=np.int32(n_items))
    wait = [e for a in arrays.values() for e in a.events]
    ev = kernel.launch(queue, (round_up(n_items, wg),), (wg,), args, wait_for=wait or None)
    for arg in outputs:
        written(arrays[arg], ev)
    if events is not None:
        events.append(ev)


def launch_forward(queue, params, kind: str, x, y, window: Window, events, *, indices=None,
                   count_include_pad: bool = True) -> None:
    """Pool the (N, C, H, W) ``x`` into the (N, C, OH, OW) ``y`` (``kind`` "max" or
    "avg"); a max also writes the winners' flat indices into the int32 ``indices`` when
    given.  Every array is a device array with N * C * H * W > 0."""
    arrays = {"x": x, "y": y}
    if indices is not None:
        arrays["idx"] = indices
    planes = x.shape[0] * x.shape[1]
    out_h, out_w = window.out_hw
    _launch(queue, params, kind, arrays, tuple(arrays)[1:], window, planes * out_h, out_w,
            events, with_indices=indices is not None, count_include_pad=count_include_pad)


def launch_backward(queue, params, kind: str, dy, dx, window: Window, events, *,
                    indices=None, count_include_pad: bool = True) -> None:
    """The input gradient ``dx`` (N, C, H, W) from ``dy`` (N, C, OH, OW): ``kind``
    "max_grad" (with the forward's int32 ``indices``) or "avg_grad"."""
    arrays = {"dy": dy}
    if kind == "max_grad":
        arrays["idx"] = indices
    arrays["dx"] = dx
    planes = dx.shape[0] * dx.shape[1]
    in_h, in_w = window.in_hw
    _launch(queue, params, kind, arrays, ("dx",), window, planes * in_h, in_w, events,
            count_include_pad=count_include_pad)
