"""conv2d_pack_flat: conv2d_csr's input packing as one flat pass (GPU-shaped): PACK_ITEMS
packed pixels per work-item, a work-group apart (coalesced), so that the work-groups are
few and full however small the planes; the divisions are multiplications by host-computed
magic numbers.  The kernel, pscl_pack_input, is rendered in kernels/conv2d_csr.cl.mako
with the convolution it feeds; the op's routine (conv2d_sparse_routine) chooses it or
conv2d_pack_rows."""

from __future__ import annotations

from ..params import ParamSpec, TileParam

SPEC = ParamSpec(
    family="conv2d_pack_flat",
    params=(
        TileParam("PACK_ITEMS", 4, (1, 2, 4, 8, 16), "packed pixels per work-item"),
    ),
)


def template_values(params) -> dict:
    """What conv2d_csr.cl.mako's packing renders from (pack_flat())."""
    return dict(PACK="flat", PACK_ITEMS=params["PACK_ITEMS"])
