"""Eight threads call every public op at once on one shared queue, through the shared
program, kernel and tuning caches: every result is correct and no program is built twice
for the same key."""

import threading

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import scipy.sparse as sp

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.ops.drs import keep_count
from pysparsecl.testing.reference import (
    conv2d_masked_reference,
    conv2d_reference,
    masked_matmul_backward_reference,
    masked_matmul_reference,
    relative_error,
    relu_bn_reference,
)

THREADS = 8
ITERATIONS = 6
TOL = 1e-4


def _calls(queue, rng):
    """(name, thunk) pairs: each runs one op on fresh inputs and checks it."""

    def close(got, ref, what):
        got = got.get() if isinstance(got, cl_array.Array) else got
        err = relative_error(got, ref)
        assert err <= TOL, f"{what}: relative error {err}"

    def conv():
        x = rng.standard_normal((2, 4, 6, 5), dtype=np.float32)
        w = rng.standard_normal((6, 2, 3, 3), dtype=np.float32)
        w[rng.random(w.shape) < 0.7] = 0
        close(ps.conv2d_sparse(cl_array.to_device(queue, x), sp.csr_matrix(w.reshape(6, -1)),
                               padding=1, groups=2, queue=queue),
              conv2d_reference(x, w, None, (1, 1), (1, 1), (1, 1), 2), "conv2d_sparse")

    def matmul():
        for m in (1, 5):
            x = rng.standard_normal((m, 37), dtype=np.float32)
            w = rng.standard_normal((37, 29), dtype=np.float32)
            mask = rng.random((m, 29)) < 0.3
            close(ps.masked_matmul(x, w, mask, queue=queue),
                  masked_matmul_reference(x, w, mask), "masked_matmul")
            idx = np.sort(np.argsort(rng.random((m, 29)), axis=1)[:, :7], axis=1)
            close(ps.masked_matmul(x, w, idx.astype(np.int32), queue=queue),
                  masked_matmul_reference(x, w, idx), "masked_matmul idx")

    def backward():
        x = rng.standard_normal((5, 37), dtype=np.float32)
        w = rng.standard_normal((37, 29), dtype=np.float32)
        mask = rng.random((5, 29)) < 0.3
        dy = rng.standard_normal((5, 29), dtype=np.float32)
        dx, dw = ps.masked_matmul_backward(dy, x, w, mask, queue=queue)
        rdx, rdw = masked_matmul_backward_reference(dy, x, w, mask)
        close(dx, rdx, "dx")
        close(dw, rdw, "dw")

    def bn():
        y = rng.standard_normal((2, 3, 4, 5), dtype=np.float32)
        mask = rng.random(y.shape) < 0.5
        g, b, mean = (rng.standard_normal(3, dtype=np.float32) for _ in range(3))
        var = rng.random(3, dtype=np.float32) + 0.5
        close(ps.masked_relu_bn(y, mask, g, b, mean, var, queue=queue),
              relu_bn_reference(y, mask, g, b, mean, var), "masked_relu_bn")
        out, _, _ = ps.masked_relu_bn(y, mask, g, b, training=True, queue=queue)
        close(out, relu_bn_reference(y, mask, g, b)[0], "masked_relu_bn training")

    def masked_conv():
        x = rng.standard_normal((2, 3, 5, 6), dtype=np.float32)
        w = rng.standard_normal((5, 3, 3, 3), dtype=np.float32)
        for shape in ((2, 5, 5, 6), (2, 5, 1, 1)):
            mask = rng.random(shape) < 0.5
            full = np.broadcast_to(mask, (2, 5, 5, 6))
            close(ps.conv2d_masked(x, w, mask, 1, 1, queue=queue),
                  conv2d_masked_reference(x, w, full, (1, 1), (1, 1), (1, 1)), "conv2d_masked")

    def drs():
        for m in (1, 9):
            x = rng.standard_normal((m, 40), dtype=np.float32)
            w = rng.standard_normal((40, 30), dtype=np.float32)
            mask = ps.drs_mask(x, w, 0.7, seed=1, queue=queue)
            assert np.all(mask.sum(1) == keep_count(0.7, 30))
        x = rng.standard_normal((1, 2, 4, 5), dtype=np.float32)
        wc = rng.standard_normal((6, 2, 3, 3), dtype=np.float32)
        assert np.all(ps.drs_mask_conv2d(x, wc, 0.5, padding=1, seed=3,
                                         queue=queue).sum(1) == 3)

    def elementwise():
        a = rng.standard_normal((3, 1, 37), dtype=np.float32)
        b = rng.standard_normal((4, 37), dtype=np.float32)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        ad = cl_array.to_device(queue, a)
        close(ps.add(ad, b, queue=queue), a64 + b64, "add")
        close(ps.mul(a, b, queue=queue), a64 * b64, "mul")
        close(ps.axpby(2, a, -1, b, queue=queue), 2 * a64 - b64, "axpby")
        close(ps.add_relu(a, b, queue=queue), np.maximum(a64 + b64, 0), "add_relu")
        ai = rng.integers(-9, 9, (5, 7), dtype=np.int32)
        assert np.array_equal(ps.add(ai, ai.T[:1].T, queue=queue), ai + ai[:, :1])

    return [("conv2d_sparse", conv), ("masked_matmul", matmul),
            ("masked_matmul_backward", backward), ("masked_relu_bn", bn),
            ("conv2d_masked", masked_conv), ("drs_mask", drs), ("elementwise", elementwise)]


def test_eight_threads_call_every_op_at_once(queue):
    # A fresh context: every program is uncached, so the threads race to build each one.
    ctx = cl.Context([queue.device])
    queue = cl.CommandQueue(ctx)
    builds_before = runtime.build_count
    start = threading.Barrier(THREADS)
    errors, done = [], []

    def worker(tid):
        rng = np.random.default_rng(1000 + tid)
        calls = _calls(queue, rng)
        try:
            start.wait()
            for _ in range(ITERATIONS):
                # each thread walks the ops in a different order
                for name, call in calls[tid % len(calls):] + calls[:tid % len(calls)]:
                    call()
                    done.append(name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(f"thread {tid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, "\n".join(errors)
    assert len(done) == THREADS * ITERATIONS * 7
    print(f"{THREADS} threads x {ITERATIONS} iterations x 7 op groups = {len(done)} "
          "concurrent calls survived")
    # No program was built twice for the same key: each build added exactly one entry.
    mine = [k for k in runtime._program_cache if k[3] == ctx.int_ptr]
    assert runtime.build_count - builds_before == len(mine), (
        f"{runtime.build_count - builds_before} builds for {len(mine)} distinct programs")
    # A second round builds nothing at all.
    builds = runtime.build_count
    for _, call in _calls(queue, np.random.default_rng(0)):
        call()
    assert runtime.build_count == builds
