"""conv2d_pack_rows: conv2d_csr's input packing, row by row (CPU-shaped).  PACK_LANES
work-items copy one row of the packed input (one lane a whole row on CPUs; index
arithmetic once per row, no division in the copy loop).  The kernel, pscl_pack_input, is
rendered in kernels/conv2d_csr.cl.mako with the convolution it feeds; the op's routine
(conv2d_sparse_routine) chooses it or conv2d_pack_flat."""

from __future__ import annotations

from ..params import ParamSpec, TileParam

SPEC = ParamSpec(
    family="conv2d_pack_rows",
    params=(
        TileParam("PACK_LANES", 1, (1, 8, 32, 64),
                  "work-items copying one row of the packed input"),
    ),
)


def template_values(params) -> dict:
    """What conv2d_csr.cl.mako's packing renders from (pack_rows())."""
    return dict(PACK="rows", PACK_LANES=params["PACK_LANES"])
