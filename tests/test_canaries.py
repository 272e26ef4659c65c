"""Canary buffers: every op writes exactly its output, all of it, and nothing around it.

Each output is a view into the middle of a larger device buffer.  The guard regions on
either side hold a known pattern and the view itself is poisoned (NaN, or an impossible
value for integer and bool outputs) before the call.  Afterwards every guard must be
intact and no poison may be left in the output.
"""

import numpy as np
import pyopencl.array as cl_array
import pytest
import scipy.sparse as sp

import pysparsecl as ps
from pysparsecl.ops.drs import keep_count
from pysparsecl.testing.reference import (
    conv2d_masked_reference,
    conv2d_reference,
    masked_matmul_reference,
    relative_error,
    relu_bn_reference,
)

GUARD = 67  # elements on each side; odd, so the view's offset is not a vector multiple


def _guard_value(dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.uint8(0xA5)
    if dtype.kind == "f":
        return dtype.type(-1234.5)
    return dtype.type(-0x5A5A5A5)


def _poison(dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.uint8(0x7E)      # neither 0 nor 1: a kernel must overwrite it
    if dtype.kind == "f":
        return dtype.type(np.nan)
    return dtype.type(np.iinfo(dtype).min)


def _canary(queue, shape, dtype):
    """(whole buffer, the output view): guards filled, the view poisoned."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    store = np.uint8 if dtype == np.bool_ else dtype
    host = np.full(n + 2 * GUARD, _guard_value(dtype), store)
    host[GUARD:GUARD + n] = _poison(dtype)
    whole = cl_array.to_device(queue, host)
    if dtype == np.bool_:
        whole = whole.view(np.bool_)
    view = whole[GUARD:GUARD + n].reshape(shape)
    return whole, view


def _check(whole, view, dtype):
    dtype = np.dtype(dtype)
    store = np.uint8 if dtype == np.bool_ else dtype
    host = whole.get().view(store)
    n = view.size
    guards = np.concatenate([host[:GUARD], host[GUARD + n:]])
    assert np.all(guards == _guard_value(dtype)), "a guard region was overwritten"
    inner = host[GUARD:GUARD + n]
    if dtype == np.bool_:
        assert np.all(inner <= 1), "some bool outputs were not written"
    elif dtype.kind == "f":
        assert not np.any(np.isnan(inner)), "some outputs were not written (NaN poison left)"
    else:
        assert not np.any(inner == _poison(dtype)), "some outputs were not written"
    return view.get()


def _close(result, reference, tol=1e-4):
    assert relative_error(result, reference) <= tol


def test_conv2d_sparse(queue, rng):
    for (n, c, h, w_, k, stride, pad, groups) in [(1, 3, 5, 7, 5, 1, 1, 1),
                                                  (2, 4, 6, 5, 6, 2, 0, 2)]:
        x = rng.standard_normal((n, c, h, w_), dtype=np.float32)
        w = rng.standard_normal((k, c // groups, 3, 3), dtype=np.float32)
        w[rng.random(w.shape) < 0.7] = 0
        w[0] = 0                                                   # an empty row
        oh, ow = ps.conv2d_output_shape((h, w_), (3, 3), (stride,) * 2, (pad,) * 2)
        whole, out = _canary(queue, (n, k, oh, ow), np.float32)
        res = ps.conv2d_sparse(cl_array.to_device(queue, x), sp.csr_matrix(w.reshape(k, -1)),
                               stride=stride, padding=pad, groups=groups, out=out, queue=queue)
        assert res is out
        _close(_check(whole, out, np.float32),
               conv2d_reference(x, w, None, (stride,) * 2, (pad,) * 2, (1, 1), groups))


@pytest.mark.parametrize("m,form", [(1, "bool"), (1, "idx"), (5, "bool"), (7, "idx")])
def test_masked_matmul(queue, rng, m, form):
    k, n = 37, 29
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    idx = np.argsort(rng.random((m, n)), axis=1)[:, :9]
    if form == "idx":
        mask = idx.astype(np.int32)
        shape = (m, 9)
    else:
        mask = np.zeros((m, n), bool)
        np.put_along_axis(mask, idx, True, axis=1)
        mask[0] = False                                            # an empty row
        shape = (m, n)
    whole, out = _canary(queue, shape, np.float32)
    res = ps.masked_matmul(cl_array.to_device(queue, x), w, mask, out=out, queue=queue)
    assert res is out
    _close(_check(whole, out, np.float32), masked_matmul_reference(x, w, mask))


def test_masked_matmul_backward_outputs_fully_written(queue, rng):
    # No out= argument: the results are fresh arrays; every element must still be
    # written (the memory pool hands back recycled, NaN-poisoned buffers).
    from pysparsecl import runtime
    alloc = runtime.memory_pool(queue.context)
    for _ in range(3):   # recycle pool blocks poisoned with NaN
        junk = cl_array.empty(queue, (4096,), np.float32, allocator=alloc)
        junk.fill(np.nan)
        del junk
    m, k, n = 5, 37, 29
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    mask = rng.random((m, n)) < 0.3
    mask[1] = False
    dy = rng.standard_normal((m, n), dtype=np.float32)
    dx, dw = ps.masked_matmul_backward(cl_array.to_device(queue, dy),
                                       cl_array.to_device(queue, x), w, mask, queue=queue)
    from pysparsecl.testing.reference import masked_matmul_backward_reference
    rdx, rdw = masked_matmul_backward_reference(dy, x, w, mask)
    for got, ref in ((dx.get(), rdx), (dw.get(), rdw)):
        assert not np.any(np.isnan(got))
        _close(got, ref)


@pytest.mark.parametrize("shape,training", [((2, 3, 4, 5), False), ((2, 3, 4, 5), True),
                                            ((6, 37), False), ((6, 37), True)])
def test_masked_relu_bn(queue, rng, shape, training):
    y = rng.standard_normal(shape, dtype=np.float32)
    mask = rng.random(shape) < 0.5
    c = shape[1]
    g, b, mean = (rng.standard_normal(c, dtype=np.float32) for _ in range(3))
    var = rng.random(c, dtype=np.float32) + 0.5
    whole, out = _canary(queue, shape, np.float32)
    y_dev = cl_array.to_device(queue, y)
    if training:
        res, bm, bv = ps.masked_relu_bn(y_dev, mask, g, b, training=True, out=out, queue=queue)
        ref = relu_bn_reference(y, mask, g, b)[0]
    else:
        res = ps.masked_relu_bn(y_dev, mask, g, b, mean, var, out=out, queue=queue)
        ref = relu_bn_reference(y, mask, g, b, mean, var)
    assert res is out
    _close(_check(whole, out, np.float32), ref)


@pytest.mark.parametrize("channels", [False, True])
def test_conv2d_masked(queue, rng, channels):
    n, c, h, w_, k = 2, 3, 5, 6, 5
    x = rng.standard_normal((n, c, h, w_), dtype=np.float32)
    w = rng.standard_normal((k, c, 3, 3), dtype=np.float32)
    mask = rng.random((n, k, 1, 1) if channels else (n, k, h, w_)) < 0.5
    full = np.broadcast_to(mask, (n, k, h, w_))
    whole, out = _canary(queue, (n, k, h, w_), np.float32)
    res = ps.conv2d_masked(cl_array.to_device(queue, x), w, mask, padding=1, out=out,
                           queue=queue)
    assert res is out
    _close(_check(whole, out, np.float32),
           conv2d_masked_reference(x, w, full, (1, 1), (1, 1), (1, 1)))


@pytest.mark.parametrize("m,compact", [(1, False), (2, True), (9, False), (9, True)])
def test_drs_mask(queue, rng, m, compact):
    d, n, sparsity = 40, 30, 0.7
    x = rng.standard_normal((m, d), dtype=np.float32)
    w = rng.standard_normal((d, n), dtype=np.float32)
    proj = ps.SparseRandomProjection(d, k=7, seed=5, queue=queue)
    n_keep = keep_count(sparsity, n)
    shape, dtype = ((m, n_keep), np.int32) if compact else ((m, n), np.bool_)
    whole, out = _canary(queue, shape, dtype)
    res = ps.drs_mask(cl_array.to_device(queue, x), w, sparsity, projection=proj,
                      compact=compact, out=out, queue=queue)
    assert res is out
    got = _check(whole, out, dtype)
    expected = ps.drs_mask(x, w, sparsity, projection=proj, compact=compact, queue=queue)
    np.testing.assert_array_equal(got, expected)


def test_drs_mask_conv2d(queue, rng):
    x = rng.standard_normal((1, 2, 4, 5), dtype=np.float32)
    w = rng.standard_normal((6, 2, 3, 3), dtype=np.float32)
    whole, out = _canary(queue, (1, 6, 4, 5), np.bool_)
    res = ps.drs_mask_conv2d(cl_array.to_device(queue, x), w, 0.5, padding=1, seed=3,
                             out=out, queue=queue)
    assert res is out
    got = _check(whole, out, np.bool_)
    assert np.all(got.sum(1) == keep_count(0.5, 6))


@pytest.mark.parametrize("op", ["add", "mul", "axpby", "add_relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
@pytest.mark.parametrize("masked", [False, True])
def test_elementwise(queue, rng, op, dtype, masked):
    a = (rng.standard_normal((3, 1, 37)) * 100).astype(dtype)
    b = (rng.standard_normal((4, 37)) * 100).astype(dtype)
    mask = rng.random((3, 4, 1)) < 0.5 if masked else None
    whole, out = _canary(queue, (3, 4, 37), dtype)
    if masked:
        # With out= a mask keeps out's values where it is False (README): they must be
        # kept exactly, and only the selected elements written.
        out.fill(dtype(7))
    a_dev = cl_array.to_device(queue, a)
    if op == "axpby":
        res = ps.axpby(2, a_dev, -3, b, out=out, mask=mask, queue=queue)
        ref = 2 * a.astype(np.float64) - 3 * b
    else:
        res = getattr(ps, op)(a_dev, b, out=out, mask=mask, queue=queue)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        ref = {"add": a64 + b64, "mul": a64 * b64,
               "add_relu": np.maximum(a64 + b64, 0)}[op]
    if mask is not None:
        ref = np.where(mask, ref, 7)
    assert res is out
    got = _check(whole, out, dtype)
    _close(got, ref)
    if mask is not None:
        assert np.all(np.broadcast_to(mask, got.shape) | (got == 7))
