"""Where the host time of eager calls goes (a diagnostic: it prints, and writes no file).

python -m bench.profile_call [--device SPEC] [--calls 50] [--sparsity 0.9]

1. The driver's own costs: an enqueue with every argument set, and one after setting
   1 or 3 buffer arguments, with the device held back (nothing runs meanwhile).
2. One conv2d_sparse call on device arrays, repeated: enqueue-only, pipelined and blocking
   times, and a cProfile of the blocking calls.
3. The ResNet-50 body of ``bench network`` at batch 1, eager: the host time per call with
   the device held back, the device's time for the whole chain once every launch is
   queued (the floor that host work can hide under), the eager and replayed wall times,
   and a cProfile of the eager forward.
"""

import argparse
import cProfile
import pstats
import sys
import time

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.testing.cases import RESNET50_LAYERS
from pysparsecl.testing.networks import (
    SparseNetwork,
    conv_inputs,
    make_weights,
    resnet50_body,
)

from .timing import held_seconds

_PROBE = """
__kernel void pscl_probe(__global float *a, __global float *b, __global float *c, int n) {
    if ((int)get_global_id(0) < n) a[get_global_id(0)] += b[0] + c[0];
}
"""


def _drained(queue, fn, reps: int = 7) -> float:
    """Median seconds from releasing a held queue, with ``fn()``'s launches all queued,
    to their end: the device's time for them, with no host work in between."""
    times = []
    for _ in range(reps):
        queue.finish()
        gate = cl.UserEvent(queue.context)
        cl.enqueue_barrier(queue, wait_for=[gate])
        fn()
        t0 = time.perf_counter()
        gate.set_status(cl.command_execution_status.COMPLETE)
        queue.finish()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _wall(queue, fn, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    queue.finish()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        queue.finish()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def driver_costs(queue, n: int = 200) -> None:
    kernel = cl.Program(queue.context, _PROBE).build().pscl_probe
    bufs = [cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, 4096) for _ in range(6)]
    kernel.set_args(bufs[0], bufs[1], bufs[2], np.int32(16))
    cl.enqueue_nd_range_kernel(queue, kernel, (64,), None)
    queue.finish()

    def enqueue(set_buffers):
        def run():
            for i in range(n):
                if set_buffers:
                    kernel._set_arg_multi(tuple(
                        v for j in range(set_buffers) for v in (j, bufs[(i + j) % 6])))
                cl.enqueue_nd_range_kernel(queue, kernel, (64,), None)
        return run
    for k in (0, 1, 3):
        us = 1e6 * held_seconds(queue, enqueue(k)) / n
        print(f"  driver: set {k} buffer argument(s) + enqueue: {us:.1f} us")


def one_call(queue, calls: int, sparsity: float) -> None:
    case = RESNET50_LAYERS[1].with_(N=1, sparsity=sparsity)
    x, _, csr, _ = case.make_inputs(np.random.default_rng(0))
    x_dev = cl_array.to_device(queue, x)
    weight = ps.SparseConvWeight(csr, case.C, case.kernel, queue=queue)
    for _ in range(5):
        ps.conv2d_sparse(x_dev, weight, padding=1)
    queue.finish()
    t0 = time.perf_counter()
    for _ in range(calls):
        ps.conv2d_sparse(x_dev, weight, padding=1)
    t1 = time.perf_counter()
    queue.finish()
    t2 = time.perf_counter()
    for _ in range(calls):
        ps.conv2d_sparse(x_dev, weight, padding=1)
        queue.finish()
    t3 = time.perf_counter()
    print(f"  one call ({case.label()}, N=1): enqueue-only "
          f"{1e3 * (t1 - t0) / calls:.3f} ms/call, pipelined {1e3 * (t2 - t0) / calls:.3f} "
          f"ms/call, blocking {1e3 * (t3 - t2) / calls:.3f} ms/call")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        ps.conv2d_sparse(x_dev, weight, padding=1)
        queue.finish()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(10)


def network(queue, sparsity: float) -> None:
    blocks = resnet50_body()
    _, final_hw = conv_inputs(blocks, (56, 56))
    net = SparseNetwork(blocks, make_weights(blocks, sparsity, np.random.default_rng(1)),
                        queue, pool_hw=final_hw)
    calls = sum(len(b.convs()) for b in blocks) + 2
    x_dev = cl_array.to_device(queue, np.random.default_rng(2).standard_normal(
        (1, 64, 56, 56), dtype=np.float32))
    for _ in range(3):
        net(x_dev)
    queue.finish()
    graph = ps.LaunchGraph(queue, inputs=(x_dev,))
    with graph:
        net(x_dev)
    queue.finish()
    host = held_seconds(queue, lambda: net(x_dev), reps=15)
    device = _drained(queue, lambda: net(x_dev))
    device_replay = _drained(queue, graph.replay)
    replay_host = held_seconds(queue, graph.replay, reps=15)
    eager, replay = _wall(queue, lambda: net(x_dev)), _wall(queue, graph.replay)
    print(f"  network (ResNet-50 body, N=1, {sparsity:.0%}, {calls} calls, "
          f"{len(graph)} launches): host {1e6 * host / calls:.1f} us/call eager, "
          f"{1e6 * replay_host / len(graph):.1f} us/launch replayed; device, all queued: "
          f"{1e3 * device:.2f} ms eager's launches, {1e3 * device_replay:.2f} ms replayed; "
          f"wall: eager {1e3 * eager:.2f} ms, replayed {1e3 * replay:.2f} ms")
    queue.finish()
    gate = cl.UserEvent(queue.context)
    cl.enqueue_barrier(queue, wait_for=[gate])
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(10):
        net(x_dev)
    profile.disable()
    gate.set_status(cl.command_execution_status.COMPLETE)
    queue.finish()
    pstats.Stats(profile).sort_stats("tottime").print_stats(14)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    queue = runtime.queue_for(args.device)
    print(f"{queue.device.platform.name.strip()} / {queue.device.name.strip()}")
    driver_costs(queue)
    one_call(queue, args.calls, args.sparsity)
    network(queue, args.sparsity)


if __name__ == "__main__":
    sys.exit(main())
