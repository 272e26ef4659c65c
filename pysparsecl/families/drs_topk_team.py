"""drs_topk_team: the GPU-shaped top-k, a work-group of TEAM items per row (the serial
kernel leaves a GPU with one thread per row).  The same selection as drs_topk -- exactly
n_keep keys, ties toward the lower column -- by radix passes of 8 bits from the top, each
histogramming in local memory the keys that share the prefix found so far; rows of at most
RANK_MAX_N columns instead rank each column against its row in local memory."""

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

#: Rows up to this wide are selected by ranking (N compares per column, no radix passes):
#: a convolution's narrow channel rows (64, 128) over 10^5 output pixels.  At 256 the
#: H200's search on 1568 x 2304 x 256 took 0.209 ms ranked against 0.180 by radix passes
#: (bench masked, two runs), so wider rows keep the passes.
RANK_MAX_N = 128


def local_bytes(p) -> int:
    """Local memory: the pass's histogram, TEAM partial counts and the shared ints (the
    template declares its arrays from the same constants); or, ranking, a key and a flag
    per slot of RANK_MAX_N (or TEAM, if more) slots."""
    return 4 * max(RADIX_BINS + p["TEAM"] + SHARED_INTS, 2 * max(RANK_MAX_N, p["TEAM"]))


SPEC = ParamSpec(
    family="drs_topk_team",
    params=(
        TileParam("TEAM", 128, (64, 128, 256),
                  "work-items per row, histograms in local memory"),
    ),
    work_group_size=lambda p: p["TEAM"],
    local_memory=local_bytes,
)


def template_args(params, compact: bool = False, plane: bool = False, rank_n: int = 0
                  ) -> dict:
    """As drs_topk's: the kernel's arguments are drs_topk's (``cand`` unused here).
    ``rank_n``: the row's slots when ranking (a power of two), 0 for the radix passes."""
    return dict(params, KIND="topk_team", COMPACT=int(compact), PLANE=int(plane),
                BINS=RADIX_BINS, SHARED_INTS=SHARED_INTS, RANK_N=rank_n,
                ARGS=drs_topk.kernel_args(compact, plane))


def launch(queue, params, scores, ldk: int, n_rows: int, n_cols: int, n_keep: int, out_dev,
           compact: bool, plane: int, wait):
    cand = runtime.empty(queue, (1,), np.uint32, allocator=runtime.memory_pool(queue.context))
    team = params["TEAM"]
    rank_n = 1 << max(0, n_cols - 1).bit_length() if n_cols <= RANK_MAX_N else 0
    groups = -(-n_rows // max(1, team // rank_n)) if rank_n else n_rows
    return drs_topk.enqueue(queue, TEMPLATE, template_args(params, compact, bool(plane),
                                                           rank_n),
                            ((groups * team,), (team,)), scores, ldk, cand, n_rows, n_cols,
                            n_keep, out_dev, plane, wait)
