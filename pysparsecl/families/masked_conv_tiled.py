"""masked_conv_tiled: the GPU-shaped conv2d_masked, an implicit GEMM that computes only the
selected outputs.  It is masked_gemm_tiled's kernel rendered with ``LAYOUT="conv"``: rows are
output pixels (n, oh, ow), columns output channels, and the reduction runs over the window
(r, s, c) of the zero-padded NHWC input (masked_conv's pack), staged through local memory a
chunk at a time without an im2col matrix.  The tile parameters are the GEMM's, tuned on
convolutions."""

from __future__ import annotations

import numpy as np

from ..ops._common import elem_offset, written
from . import masked_gemm_tiled

TEMPLATE = masked_gemm_tiled.TEMPLATE

SPEC = masked_gemm_tiled.tiled_spec("masked_conv_tiled", "conv")


def template_args(params, mask: str = "window", aligned: bool = False) -> dict:
    """The GEMM template's arguments for the convolution: ``mask`` "window" (N, K, OH, OW)
    or "channel" (N, K, 1, 1); ``aligned`` when C % 4 == 0 (whole float4 staging loads)."""
    return masked_gemm_tiled.template_args(params, "bool" if mask == "window" else mask,
                                           aligned, layout="conv")


def window_args(xp, geom: dict, n_ch: int, s: int) -> dict:
    """The implicit GEMM's x arguments: the packed input and the convolution's geometry."""
    (sh, sw), (dh, dw) = geom["stride"], geom["dilation"]
    values = (n_ch, s, geom["OW"], geom["OH"] * geom["OW"], geom["Hp"], geom["Wp"], sh, sw,
              dh, dw)
    return dict(x=xp.data, x_off=np.int64(0), ldx=np.int32(0), **{
        a.name: np.int32(v) for a, v in zip(masked_gemm_tiled.CONV_GEOMETRY, values)})


def launch(queue, params, form: str, xp, wk, mask_dev, out_dev, geom: dict, n_ch: int,
           k_out: int, r: int, s: int, events) -> None:
    """Enqueue the implicit GEMM (and its split-K sum) on the packed input ``xp`` (N, Hp,
    Wp, C) and packed weight ``wk`` (K, R, S, C), ``form`` "window" or "channel"."""
    n_pix = geom["OH"] * geom["OW"]
    k_red = r * s * n_ch
    x_args = window_args(xp, geom, n_ch, s)
    wait = list(xp.events) + list(wk.events) + list(mask_dev.events) + list(out_dev.events)
    ev = masked_gemm_tiled.enqueue(
        queue, params, template_args(params, form, n_ch % 4 == 0), x_args, wk, k_red,
        (mask_dev.base_data, elem_offset(mask_dev)), out_dev,
        geom["N"] * n_pix, k_out, k_red, k_out, wait, events,
        splitk_args=dict(P=np.int32(n_pix)) if form == "channel" else None)
    written(out_dev, ev)
    if events is not None:
        events.append(ev)
