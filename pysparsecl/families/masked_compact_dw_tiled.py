"""masked_compact_dw_tiled: the weight gradient of the product of a compact x, GPU-shaped.
From the backward's column lists, a work-group owns one row j of dw^T (N, K) and
accumulates it in local memory, KCHUNK columns at a time: the listed rows one after the
other, the lanes striding along a row's entries (distinct columns, so no two lanes add to
one entry), then the row is written whole, coalesced."""

from __future__ import annotations

from .. import runtime
from ..kernel_args import KernelArgs, Signature
from ..params import Constraint, ParamSpec, TileParam
from . import LOCAL_MEM_BYTES, masked_compact, masked_compact_dw

TEMPLATE = masked_compact.TEMPLATE


def local_bytes(p) -> int:
    """Local memory of a work-group: the row chunk (and a flag)."""
    return 4 * p["KCHUNK"] + 4


SPEC = ParamSpec(
    family="masked_compact_dw_tiled",
    params=(
        TileParam("WG", 128, (32, 64, 128, 256), "work-items per work-group, along a row's "
                  "entries"),
        TileParam("KCHUNK", 4096, (1024, 2048, 4096, 7168),
                  "columns of the dw^T row accumulated in local memory at a time"),
    ),
    constraints=(
        Constraint("fits_local_memory", lambda p: local_bytes(p) <= LOCAL_MEM_BYTES,
                   "the row chunk fits the local memory every device has"),
    ),
    work_group_size=lambda p: p["WG"],
    local_memory=local_bytes,
)

ARGS = KernelArgs(Signature("pscl_masked_compact_dw_tiled", masked_compact_dw.DW_ARGS))


def template_args(params) -> dict:
    """The tile parameters, the kernel's kind and its arguments."""
    return dict(params, KIND="compact_dw_tiled", ARGS=ARGS)


def launch(queue, params, xv_dev, xi_dev, nx: int, lists, dwt, n_rows: int, n_cols: int,
           k_in: int, wait):
    """Enqueue dw^T (N, K) into ``dwt`` (a device array at offset 0); returns the event."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_masked_compact_dw_tiled",),
                           **template_args(params))["pscl_masked_compact_dw_tiled"]
    return kern.launch(queue, (n_cols * params["WG"],), (params["WG"],),
                       masked_compact_dw.kernel_values(xv_dev, xi_dev, nx, lists, dwt,
                                                       n_rows, n_cols, k_in),
                       wait_for=wait)
