"""Where the dimension-reduction search's device time goes, kernel by kernel.

``python -m bench drs [--device SPEC] [--sparsity 0.9] [--runs 7]``

For each DSG shape of bench/masked.py, the median (after a warm-up) of each kernel of one
``drs_mask`` call with the weight projected beforehand, by OpenCL profiling events.  The
kernels run in this order: the projection of x's rows and the scores (or, for a few rows,
the fused kernel doing both; or only the scores for an exact projection), then the top-k.

Then the same shapes with a compact x (a :class:`pysparsecl.CompactRows` keeping 10% of
each row, as a DSG layer leaves it) against its dense form: the projection f(x) alone
(drs_project_compact against drs_project, ``project_rows``) and the whole search
(``drs_mask``, every kernel of the call summed), medians of the summed kernel times of
interleaved calls after a warm-up round.  The projection shrinks with x's density; the
scores f(x) f(w) and the top-k do not.

Printed only: no results file (the search's cost per layer, beside the dense layer's, is
in the masked suite's rows: 'DRS ms', 'DRS / dense').
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cl_array

import pysparsecl as ps
from pysparsecl.ops.drs import keep_count
from pysparsecl.testing.cases import compact_rows

from .masked import GEMM_SHAPES, VMM_SHAPES

#: Defaults of the options this suite takes (the driver's are None: "the suite's own").
SPARSITY, RUNS = 0.9, 7
#: The fraction of zeros in the compact x of the second table (the input's sparsity).
X_SPARSITY = 0.9


def run(queue, sparsity: float = SPARSITY, runs: int = RUNS) -> None:
    rng = np.random.default_rng(7)
    print(f"{queue.device.name.strip()}: drs_mask kernels, median ms of {runs} runs, "
          f"sparsity {sparsity}")
    for m, k, n in VMM_SHAPES + GEMM_SHAPES:
        x = cl_array.to_device(queue, rng.standard_normal((m, k), dtype=np.float32))
        w = rng.standard_normal((k, n), dtype=np.float32)
        proj = ps.SparseRandomProjection(k, seed=1, queue=queue)
        pw = proj.project_weight(ps.MaskedLinearWeight(w, queue=queue))
        times = []
        for i in range(runs + 1):
            events = []
            ps.drs_mask(x, None, sparsity, projection=pw, events=events)
            queue.finish()
            if i:   # the first call builds and warms up
                times.append([(e.profile.end - e.profile.start) * 1e-6 for e in events])
        med = np.median(np.array(times), axis=0)
        names = (["project", "scores", "topk"] if len(med) == 3 else
                 ["scores", "topk"] if proj.exact else ["fused", "topk"])
        parts = "  ".join(f"{name} {t:.3f}" for name, t in zip(names, med))
        print(f"  {m}x{k}x{n} (k={proj.k}): total {med.sum():.3f} ms = {parts}", flush=True)
    run_compact(queue, sparsity, runs)


def _kernel_ms(events) -> float:
    return sum((e.profile.end - e.profile.start) * 1e-6 for e in events)


def _medians(queue, calls: dict, runs: int) -> dict:
    """name -> the median over ``runs`` rounds, after a warm-up round, of the summed kernel
    time of one call of ``calls[name](events)``; the calls interleaved in each round."""
    times = {name: [] for name in calls}
    for i in range(runs + 1):
        for name, call in calls.items():
            events = []
            call(events)
            queue.finish()
            if i:
                times[name].append(_kernel_ms(events))
    return {name: float(np.median(t)) for name, t in times.items()}


def run_compact(queue, sparsity: float = SPARSITY, runs: int = RUNS) -> None:
    """The second table: a compact x against its dense form (see the module docstring)."""
    rng = np.random.default_rng(11)
    print(f"{queue.device.name.strip()}: compact x ({X_SPARSITY:.0%} of its entries zero) vs "
          f"its dense form, median kernel ms of {runs} runs: the projection alone and the "
          f"whole drs_mask (sparsity {sparsity})")
    for m, k, n in VMM_SHAPES + GEMM_SHAPES:
        nx = keep_count(X_SPARSITY, k)
        values, idx = compact_rows(rng, m, k, nx)
        x = ps.CompactRows(cl_array.to_device(queue, values), cl_array.to_device(queue, idx),
                           k, check=False)
        dense = x.to_dense()
        w = rng.standard_normal((k, n), dtype=np.float32)
        proj = ps.SparseRandomProjection(k, seed=1, queue=queue)
        pw = proj.project_weight(ps.MaskedLinearWeight(w, queue=queue))
        t = _medians(queue, {
            "project dense": lambda ev: proj.project_rows(dense, events=ev),
            "project compact": lambda ev: proj.project_rows(x, events=ev),
            "search dense": lambda ev: ps.drs_mask(dense, None, sparsity, projection=pw,
                                                   events=ev),
            "search compact": lambda ev: ps.drs_mask(x, None, sparsity, projection=pw,
                                                     events=ev)}, runs)
        print(f"  {m}x{k}x{n} (k={proj.k}, x keeps {nx}): project dense "
              f"{t['project dense']:.3f} / compact {t['project compact']:.3f} ms = "
              f"{t['project dense'] / t['project compact']:.1f}x; search dense "
              f"{t['search dense']:.3f} / compact {t['search compact']:.3f} ms = "
              f"{t['search dense'] / t['search compact']:.1f}x", flush=True)
