"""masked_compact_tiled: the output-masked product of a compact x (:class:`CompactRows`),
GPU-shaped.  The column lists are masked_compact's; then a work-group takes one column j,
stages the weight row wt[j, :] in local memory (KCHUNK floats at a time), and its teams of
TEAM lanes take the column's rows, the lanes striding along a row's entries: the values
and indices are read coalesced, the gathers hit local memory."""

from __future__ import annotations

from .. import runtime
from ..kernel_args import KernelArgs
from ..params import Constraint, ParamSpec, TileParam
from . import LOCAL_MEM_BYTES, masked_compact

TEMPLATE = masked_compact.TEMPLATE


def local_bytes(p) -> int:
    """Local memory of a work-group: the staged weight chunk and the partial sums."""
    return 4 * (p["KCHUNK"] + p["TEAM"] * p["TEAMS"])


SPEC = ParamSpec(
    family="masked_compact_tiled",
    params=(
        TileParam("TEAM", 32, (4, 8, 16, 32, 64), "lanes sharing one row's dot product"),
        TileParam("TEAMS", 4, (1, 2, 4, 8, 16), "rows of the column computed at once"),
        TileParam("KCHUNK", 4096, (1024, 2048, 4096, 6144),
                  "floats of the weight row staged in local memory at a time"),
    ),
    constraints=(
        Constraint("fits_local_memory", lambda p: local_bytes(p) <= LOCAL_MEM_BYTES,
                   "the staged chunk and the partial sums fit the local memory every "
                   "device has"),
    ),
    work_group_size=lambda p: p["TEAM"] * p["TEAMS"],
    local_memory=local_bytes,
)

ARGS = KernelArgs(*masked_compact.LIST_SIGNATURES,
                  masked_compact.product_signature("pscl_masked_compact_tiled"))


def template_args(params) -> dict:
    """The tile parameters, the kernel's kind and the kernels' arguments."""
    return dict(params, KIND="compact_tiled", ARGS=ARGS)


def launch(queue, params, form: str, xv_dev, xi_dev, nx: int, rows, ldw, mask_dev, out_dev,
           n_rows: int, n_cols: int, k_in: int, n_entries: int, wait, events):
    """Enqueue the column lists and the product; a bool mask's output must already be
    zeroed.  Returns (the product's event, the flag array of
    :func:`masked_compact.column_lists`)."""
    kerns = runtime.kernels(queue.context, TEMPLATE,
                            ("pscl_masked_compact_tiled", f"pscl_compact_cols_{form}"),
                            **template_args(params))
    counts, pairs, ev, bad = masked_compact.column_lists(
        queue, kerns, form, mask_dev, n_rows, n_cols, n_entries, wait, events)
    wg = params["TEAM"] * params["TEAMS"]
    ev = kerns["pscl_masked_compact_tiled"].launch(
        queue, (n_cols * wg,), (wg,),
        masked_compact.product_args(xv_dev, xi_dev, nx, rows, ldw, counts, pairs, out_dev,
                                    n_rows, n_cols, k_in), wait_for=[ev])
    return ev, bad
