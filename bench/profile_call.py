"""Where a conv2d_sparse call's host time goes: cProfile over repeated calls on device arrays.

python -m bench.profile_call [--device SPEC] [--calls 50]
"""

import argparse
import cProfile
import pstats
import sys
import time

import numpy as np
import pyopencl.array as cl_array

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.testing.cases import RESNET50_LAYERS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    queue = runtime.queue_for(args.device)
    case = RESNET50_LAYERS[1].with_(N=1, sparsity=0.9)
    x, _, csr, _ = case.make_inputs(np.random.default_rng(0))
    x_dev = cl_array.to_device(queue, x)
    weight = ps.SparseConvWeight(csr, case.C, case.kernel, queue=queue)
    for _ in range(5):
        ps.conv2d_sparse(x_dev, weight, padding=1)
    queue.finish()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        ps.conv2d_sparse(x_dev, weight, padding=1)
    t1 = time.perf_counter()
    queue.finish()
    t2 = time.perf_counter()
    for _ in range(args.calls):
        ps.conv2d_sparse(x_dev, weight, padding=1)
        queue.finish()
    t3 = time.perf_counter()
    print(f"{queue.device.name.strip()}: enqueue-only {1e3 * (t1 - t0) / args.calls:.3f} ms/call, "
          f"pipelined {1e3 * (t2 - t0) / args.calls:.3f} ms/call, "
          f"blocking {1e3 * (t3 - t2) / args.calls:.3f} ms/call")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        ps.conv2d_sparse(x_dev, weight, padding=1)
        queue.finish()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    sys.exit(main())
