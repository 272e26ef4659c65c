#!/usr/bin/env python3
"""Where the dimension-reduction search's device time goes, kernel by kernel.

python bench/drs_breakdown.py [--device SPEC] [--sparsity 0.9] [--runs 7]

For each DSG shape of bench/masked.py, the median (after a warm-up) of each kernel of one
``drs_mask`` call with the weight projected beforehand, by OpenCL profiling events.  The
kernels run in this order: the projection of x's rows and the scores (or, for a few rows,
the fused kernel doing both; or only the scores for an exact projection), then the top-k.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyopencl.array as cl_array  # noqa: E402
from masked import GEMM_SHAPES, VMM_SHAPES  # noqa: E402

import pysparsecl as ps  # noqa: E402
from pysparsecl import runtime  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="'P:D' indices or a name substring")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    queue = runtime.queue_for(args.device)
    rng = np.random.default_rng(7)
    print(f"{queue.device.name.strip()}: drs_mask kernels, median ms of {args.runs} runs, "
          f"sparsity {args.sparsity}")
    for m, k, n in VMM_SHAPES + GEMM_SHAPES:
        x = cl_array.to_device(queue, rng.standard_normal((m, k), dtype=np.float32))
        w = rng.standard_normal((k, n), dtype=np.float32)
        proj = ps.SparseRandomProjection(k, seed=1, queue=queue)
        pw = proj.project_weight(ps.MaskedLinearWeight(w, queue=queue))
        times = []
        for run in range(args.runs + 1):
            events = []
            ps.drs_mask(x, None, args.sparsity, projection=pw, events=events)
            queue.finish()
            if run:   # the first call builds and warms up
                times.append([(e.profile.end - e.profile.start) * 1e-6 for e in events])
        med = np.median(np.array(times), axis=0)
        names = (["project", "scores", "topk"] if len(med) == 3 else
                 ["scores", "topk"] if proj.exact else ["fused", "topk"])
        parts = "  ".join(f"{name} {t:.3f}" for name, t in zip(names, med))
        print(f"  {m}x{k}x{n} (k={proj.k}): total {med.sum():.3f} ms = {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
