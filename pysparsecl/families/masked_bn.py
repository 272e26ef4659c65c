"""masked_bn: DSG's double-mask BatchNorm, ``mask * BN(ReLU(y))``:
in training, a statistics pass over the selected entries per channel, then the apply
pass; VEC elements per vector along pixels (or along channels for (M, C) inputs)."""

from __future__ import annotations

import numpy as np

from .. import runtime
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


def template_args(params, kind: str = "apply", channel_last: bool = False) -> dict:
    """The tile parameters, the pass ("stats" or "apply") and the layout: channels last
    for (M, C) inputs."""
    return dict(params, KIND=kind, CHANNEL_LAST=int(channel_last))


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
        ev = kern(queue, (round_up(items, wg),), (wg,), y_dev.base_data, elem_offset(y_dev),
                  mask_dev.base_data, elem_offset(mask_dev), dev["mean"].data,
                  dev["var"].data, np.int32(outer), np.int32(n_ch), np.int32(inner),
                  wait_for=wait or None)
        wait.append(ev)
        if events is not None:
            events.append(ev)
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_bn_apply",),
                           **template_args(params, "apply", channel_last)
                           )["pscl_masked_bn_apply"]
    n_rows, row_len = (outer, n_ch) if channel_last else (outer * n_ch, inner)
    ev = kern(queue, (round_up(-(-row_len // vec), wg), n_rows), (wg, 1), y_dev.base_data,
              elem_offset(y_dev), mask_dev.base_data, elem_offset(mask_dev),
              dev["gamma"].data, dev["beta"].data, dev["mean"].data, dev["var"].data,
              out_dev.base_data, elem_offset(out_dev), np.int32(n_rows), np.int32(row_len),
              np.int32(n_ch), np.float32(eps), wait_for=wait or None)
    written(out_dev, ev)
    if events is not None:
        events.append(ev)
