"""drs_conv_project_tiled: the convolution search's projection of the windows on GPUs,
f(window) = window . RT for every output pixel, as a dense implicit GEMM (n_pix x C*R*S x
k): masked_gemm_tiled's kernel rendered with ``LAYOUT="conv"`` and every entry selected
(``MASK="all"``), so each tile is computed whole, blocked in registers, from windows staged
through local memory (no im2col matrix)."""

from __future__ import annotations

from ..params import Constraint, ParamSpec
from . import LOCAL_MEM_BYTES, masked_conv_tiled, masked_gemm_tiled

TEMPLATE = masked_gemm_tiled.TEMPLATE

_TILES = {p.name: p for p in masked_gemm_tiled.PARAMS}

#: The unit parameters of the masked kernel, fixed: with every entry selected only the
#: dense tiles run.
_FIXED = dict(GROUP=1, UNITS=1, DENSE=1)


def local_bytes(p) -> int:
    return masked_gemm_tiled.local_bytes(dict(p, **_FIXED), "conv")


SPEC = ParamSpec(
    family="drs_conv_project_tiled",
    params=tuple(_TILES[name] for name in ("WG", "TILE", "TILE_M", "KC", "SPLITK")),
    constraints=(
        Constraint("an_output_per_item", lambda p: p["TILE_M"] * p["TILE"] >= p["WG"],
                   "every work-item owns at least one output of the tile"),
        Constraint("sums_fit_registers", lambda p: p["TILE_M"] * p["TILE"] <= 32 * p["WG"],
                   "a tile's sums, TILE_M * TILE / WG per work-item, stay in registers"),
        Constraint("staging_fits_registers",
                   lambda p: (p["TILE_M"] + p["TILE"]) * p["KC"] <= 32 * p["WG"],
                   "the next chunk, loaded during the FMAs, takes <= 32 registers per item"),
        Constraint("local_memory", lambda p: local_bytes(p) <= LOCAL_MEM_BYTES,
                   "the staged chunks fit 32 KiB of local memory"),
    ),
    work_group_size=lambda p: p["WG"],
    local_memory=local_bytes,
)


def launch(queue, params, xp, rt_rows, k_pad: int, out, n_pix: int, n_ch: int, geom: dict,
           r: int, s: int, wait, events):
    """Enqueue f(window) for every output pixel, (n_pix, k_pad) row-major, from the packed
    NHWC input ``xp`` and RT^T ``rt_rows`` (k_pad, R * S * C), its columns in (r, s, c)
    order and rows k.. zero.  Returns the event of the last kernel (a split-K product's
    own event goes to ``events``)."""
    full = dict(params, **_FIXED)
    d = r * s * n_ch
    return masked_gemm_tiled.enqueue(
        queue, full, masked_gemm_tiled.template_args(full, "all", n_ch % 4 == 0,
                                                     layout="conv"),
        masked_conv_tiled.window_args(xp, geom, n_ch, s), rt_rows, d, None, out, n_pix,
        k_pad, d, k_pad, wait, events)


