#!/usr/bin/env python3
"""Time many conv2d_csr tile configurations on one device (a precursor of the autotuner).

Every configuration is first checked against the spec-default configuration's output; a
configuration that fails to build or disagrees scores as infinitely slow and is reported.
Example: python bench/sweep.py --device nvidia --batch 32 --n 40 --space gpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pyopencl.array as cl_array  # noqa: E402

import pysparsecl as ps  # noqa: E402
from pysparsecl import runtime, tuning  # noqa: E402
from pysparsecl.ops.conv2d import CONV2D_CSR  # noqa: E402
from pysparsecl.testing.cases import RESNET50_LAYERS  # noqa: E402
from pysparsecl.testing.reference import relative_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import event_ms  # noqa: E402

SPACES = {
    "all": lambda p: True,
    # GPUs: scalar or short vectors, warps along pixels, registers only.
    "gpu": lambda p: (p["WG_PIX"] >= 32 and p["CH_FASTEST"] == 0
                      and p["PACK_LANES"] in (0, 32)
                      and (p["VEC"] <= 2 or p["BATCH_LAYOUT"] and p["VEC"] <= 4)),
    # CPUs: wide vectors, one item along pixels.
    "cpu": lambda p: p["VEC"] >= 8 and p["WG_PIX"] == 1 and p["PACK_LANES"] <= 8,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--layers", type=int, default=4, help="first L ResNet-50 layers")
    parser.add_argument("--n", type=int, default=30, help="random configurations to try")
    parser.add_argument("--space", choices=sorted(SPACES), default="all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--best-env", type=Path,
                        help="write the best configuration as a PYSPARSECL_PARAMS value")
    args = parser.parse_args(argv)

    queue = runtime.queue_for(args.device)
    device = queue.device
    rng = np.random.default_rng(args.seed)
    # A random draw from the (millions-strong) space, filtered to the chosen region.
    space = CONV2D_CSR.random_candidates(200 * args.n, args.seed, device.max_work_group_size)
    picks = [c for c in space if SPACES[args.space](c)][:args.n]
    current = tuning.lookup(CONV2D_CSR, device)
    configs = [CONV2D_CSR.defaults(), current] + picks
    problems = []
    for layer in RESNET50_LAYERS[:args.layers]:
        case = layer.with_(N=args.batch, sparsity=args.sparsity)
        x, w, csr, _ = case.make_inputs(rng)
        weight = ps.SparseConvWeight(csr, case.C, case.kernel, case.groups, queue)
        problems.append((case, cl_array.to_device(queue, x), weight,
                         case.reference(x, w, None)))
    print(f"device: {device.platform.name.strip()} / {device.name.strip()}; "
          f"{len(space)} configurations in space '{args.space}', trying {len(configs)}",
          flush=True)
    results = []
    for params in configs:
        times, status = [], "ok"
        try:
            with tuning.override("conv2d_csr", **params):
                for case, x_dev, weight, ref in problems:
                    kw = dict(stride=case.stride, padding=case.padding)
                    y = ps.conv2d_sparse(x_dev, weight, **kw).get()
                    err = relative_error(y, ref)
                    if not err < 1e-4:
                        raise ArithmeticError(f"relative error {err:.2e} on {case.label()}")
                    timer = event_ms(lambda ev: ps.conv2d_sparse(x_dev, weight, events=ev,
                                                                 **kw), queue)
                    timer()
                    times.append(float(np.median([timer() for _ in range(args.reps)])))
        except Exception as exc:  # a failed candidate scores as infinitely slow
            status = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            times = [float("inf")] * len(problems)
        results.append(dict(params=params, times_ms=times, total_ms=sum(times), status=status))
        print(f"{sum(times):9.3f} ms  {' '.join(f'{t:8.3f}' for t in times)}  {params}"
              + ("" if status == "ok" else f"  FAILED {status}"), flush=True)
    results.sort(key=lambda r: r["total_ms"])
    print("\nbest:")
    for r in results[:5]:
        print(f"{r['total_ms']:9.3f} ms  {r['params']}")
    if args.best_env and results[0]["status"] == "ok":
        args.best_env.write_text("conv2d_csr:" + ",".join(
            f"{k}={v}" for k, v in results[0]["params"].items()) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"device": device.name.strip(), "batch": args.batch,
                                         "sparsity": args.sparsity, "results": results},
                                        indent=1))


if __name__ == "__main__":
    sys.exit(main())
