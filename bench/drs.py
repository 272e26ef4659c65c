"""Where the dimension-reduction search's device time goes, kernel by kernel.

``python -m bench drs [--device SPEC] [--sparsity 0.9] [--runs 7]``

For each DSG shape of bench/masked.py, the median (after a warm-up) of each kernel of one
``drs_mask`` call with the weight projected beforehand, by OpenCL profiling events.  The
kernels run in this order: the projection of x's rows and the scores (or, for a few rows,
the fused kernel doing both; or only the scores for an exact projection), then the top-k.
Printed only: no results file (the search's cost per layer, beside the dense layer's, is
in the masked suite's rows: 'DRS ms', 'DRS / dense').
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cl_array

import pysparsecl as ps

from .masked import GEMM_SHAPES, VMM_SHAPES

#: Defaults of the options this suite takes (the driver's are None: "the suite's own").
SPARSITY, RUNS = 0.9, 7


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
