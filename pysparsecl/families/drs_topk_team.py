"""drs_topk_team: the GPU-shaped top-k, a work-group of TEAM items per row (the serial
kernel leaves a GPU with one thread per row).  The same selection as drs_topk -- exactly
n_keep keys, ties toward the lower column -- by radix passes of 8 bits from the top, each
histogramming in local memory the keys that share the prefix found so far."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..params import ParamSpec, TileParam
from . import drs_topk

TEMPLATE = "drs_topk_team.cl.mako"


#: Bins of a radix pass: the kernel selects 8 bits of the key at a time.
RADIX_BINS = 1 << 8
#: Ints the work-group shares to pass on a pass's result.
SHARED_INTS = 3


def local_bytes(p) -> int:
    """Local memory: the pass's histogram, TEAM partial counts and the shared ints (the
    template declares its arrays from the same constants)."""
    return 4 * (RADIX_BINS + p["TEAM"] + SHARED_INTS)


SPEC = ParamSpec(
    family="drs_topk_team",
    params=(
        TileParam("TEAM", 128, (64, 128, 256),
                  "work-items per row, histograms in local memory"),
    ),
    work_group_size=lambda p: p["TEAM"],
    local_memory=local_bytes,
)


def template_args(params, compact: bool = False, plane: bool = False) -> dict:
    """As drs_topk's: the kernel's arguments are drs_topk's (``cand`` unused here)."""
    return dict(params, KIND="topk_team", COMPACT=int(compact), PLANE=int(plane),
                BINS=RADIX_BINS, SHARED_INTS=SHARED_INTS,
                ARGS=drs_topk.kernel_args(compact, plane))


def launch(queue, params, scores, ldk: int, n_rows: int, n_cols: int, n_keep: int, out_dev,
           compact: bool, plane: int, wait):
    cand = runtime.empty(queue, (1,), np.uint32, allocator=runtime.memory_pool(queue.context))
    team = params["TEAM"]
    return drs_topk.enqueue(queue, TEMPLATE, template_args(params, compact, bool(plane)),
                            ((n_rows * team,), (team,)), scores, ldk, cand, n_rows, n_cols,
                            n_keep, out_dev, plane, wait)
