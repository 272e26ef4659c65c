"""2-D pooling (max_pool2d, avg_pool2d and their backward passes) against float64
references, finite differences and, where it is installed, torch, on every working OpenCL
device."""

import numpy as np
import pyopencl.array as cl_array
import pytest
from conftest import SAMPLE_WG_LIMIT

import pysparsecl as ps
from pysparsecl import tuning
from pysparsecl.ops.pooling import POOLING
from pysparsecl.testing.reference import (
    avg_pool2d_backward_reference,
    avg_pool2d_reference,
    central_difference,
    max_pool2d_backward_reference,
    max_pool2d_reference,
    relative_error,
)

TOL = 1e-5

#: (N, C, H, W), kernel_size, stride, padding.
GEOMETRIES = [
    ((2, 3, 7, 9), 3, 2, 1),                    # overlapping windows, padding, odd sizes
    ((2, 2, 8, 8), 2, None, 0),                 # the common 2x2, stride = kernel
    ((1, 2, 6, 11), (2, 3), (3, 1), (1, 1)),    # stride != kernel, per-axis values
    ((3, 2, 9, 11), 4, 3, 2),                   # padding = kernel / 2, overlapping
    ((1, 3, 7, 7), 2, 3, 1),                    # stride > kernel: inputs no window covers
    ((1, 1, 1, 1), 1, None, 0),                 # a 1x1 plane, a 1x1 output
    ((2, 4, 5, 7), (5, 7), None, 0),            # the kernel is the whole plane
    ((1, 2, 3, 37), 3, 1, 1),                   # rows longer than any run, a partial run
]
IDS = ["x".join(map(str, g[0])) + f" k{g[1]} s{g[2]} p{g[3]}" for g in GEOMETRIES]


def _pair(value):
    return (value, value) if isinstance(value, int) else value


def _normal(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _check_max(queue, x, kernel, stride, padding, rng):
    """max_pool2d (values, indices, no-indices call) and its backward against the
    references; values and indices must be exact."""
    y, idx = ps.max_pool2d(x, kernel, stride, padding, return_indices=True, queue=queue)
    want, want_idx = max_pool2d_reference(x, kernel, stride, padding)
    assert y.dtype == np.float32 and idx.dtype == np.int32 and y.shape == want.shape
    np.testing.assert_array_equal(y, want.astype(np.float32))
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(ps.max_pool2d(x, kernel, stride, padding, queue=queue), y)
    dy = _normal(rng, y.shape)
    dx = ps.max_pool2d_backward(dy, idx, x.shape, kernel, stride, padding, queue=queue)
    assert dx.shape == x.shape and dx.dtype == np.float32
    assert relative_error(dx, max_pool2d_backward_reference(dy, want_idx, x.shape)) < TOL


@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES, ids=IDS)
def test_max_pool2d_matches_reference(queue, rng, shape, kernel, stride, padding):
    _check_max(queue, _normal(rng, shape), kernel, stride, padding, rng)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES, ids=IDS)
def test_avg_pool2d_matches_reference(queue, rng, shape, kernel, stride, padding,
                                      count_include_pad):
    x = _normal(rng, shape)
    y = ps.avg_pool2d(x, kernel, stride, padding, count_include_pad=count_include_pad,
                      queue=queue)
    want = avg_pool2d_reference(x, kernel, stride, padding, count_include_pad)
    assert y.dtype == np.float32 and y.shape == want.shape
    assert relative_error(y, want) < TOL
    dy = _normal(rng, y.shape)
    dx = ps.avg_pool2d_backward(dy, shape, kernel, stride, padding,
                                count_include_pad=count_include_pad, queue=queue)
    want_dx = avg_pool2d_backward_reference(dy, shape, kernel, stride, padding,
                                            count_include_pad)
    assert dx.shape == shape and relative_error(dx, want_dx) < TOL


@pytest.mark.parametrize("shape", [(3, 16, 7, 7), (2, 5, 1, 9), (1, 3, 13, 4)])
def test_global_average_pool(queue, rng, shape):
    """avg_pool2d with the whole plane as its kernel: a CNN head's global pool."""
    x = _normal(rng, shape)
    x64 = x.astype(np.float64)
    y = ps.avg_pool2d(x, shape[2:], queue=queue)
    assert y.shape == shape[:2] + (1, 1)
    assert relative_error(y, x64.mean(axis=(2, 3), keepdims=True)) < TOL
    dy = _normal(rng, y.shape)
    dx = ps.avg_pool2d_backward(dy, shape, shape[2:], queue=queue)
    want = np.broadcast_to(dy.astype(np.float64) / (shape[2] * shape[3]), shape)
    assert relative_error(dx, want) < TOL
    # On device arrays, as a network's head runs it.
    y_dev = ps.avg_pool2d(cl_array.to_device(queue, x), shape[2:])
    assert isinstance(y_dev, cl_array.Array)
    assert relative_error(y_dev.get(), x64.mean(axis=(2, 3), keepdims=True)) < TOL


@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES[:5], ids=IDS[:5])
def test_max_pool2d_ties_go_to_the_first_cell(queue, rng, shape, kernel, stride, padding):
    """Inputs of a few values tie in most windows: the first in row-major order wins."""
    x = rng.integers(-2, 3, shape).astype(np.float32) + np.float32(0.5)
    _check_max(queue, x, kernel, stride, padding, rng)
    # A constant plane: every window's index is its first in-bounds cell.
    flat = np.full(shape, rng.standard_normal(), np.float32)
    _, idx = ps.max_pool2d(flat, kernel, stride, padding, return_indices=True, queue=queue)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    top = np.maximum(np.arange(idx.shape[2]) * sh - ph, 0)
    left = np.maximum(np.arange(idx.shape[3]) * sw - pw, 0)
    np.testing.assert_array_equal(idx[0, 0], top[:, None] * shape[3] + left[None, :])


def test_max_pool2d_nan_wins_and_inf(queue, rng):
    """A NaN in a window wins (the last NaN, in row-major order, gives the index, as in
    torch); a window of -inf gives -inf at its first cell; the backward routes dy to it."""
    shape, geometry = (2, 3, 8, 9), (3, 2, 1)
    x = _normal(rng, shape)
    x[rng.random(shape) < 0.08] = np.nan
    x[0, 0, 2, 2] = x[0, 0, 2, 3] = np.nan                  # two NaNs in one window
    x[1, 2] = -np.inf                                       # a plane of -inf
    x[0, 1, :3, :3] = np.inf
    y, idx = ps.max_pool2d(x, *geometry, return_indices=True, queue=queue)
    want, want_idx = max_pool2d_reference(x, *geometry)
    assert np.isnan(y).any() and np.isnan(y[0, 0, 1, 1])
    np.testing.assert_array_equal(y, want.astype(np.float32))      # NaN == NaN here
    np.testing.assert_array_equal(idx, want_idx)
    assert np.all(y[1, 2] == -np.inf) and y[0, 1, 0, 0] == np.inf
    dy = _normal(rng, y.shape)
    dx = ps.max_pool2d_backward(dy, idx, shape, *geometry, queue=queue)
    assert relative_error(dx, max_pool2d_backward_reference(dy, want_idx, shape)) < TOL


def _fd_gradient(forward, x, dy, h):
    """Central differences of L(x) = sum(dy * forward(x)), forward in float64."""
    return central_difference(lambda v: np.sum(dy * forward(v)), x, h)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((1, 2, 5, 6), 3, 2, 1), ((2, 1, 4, 7), (2, 3), (1, 2), (1, 1)),
    ((1, 2, 5, 5), 2, 3, 0)])
def test_avg_backward_is_the_forward_derivative(queue, rng, shape, kernel, stride, padding,
                                                count_include_pad):
    x = _normal(rng, shape)
    out_shape = avg_pool2d_reference(x, kernel, stride, padding).shape
    dy = _normal(rng, out_shape)
    dx = ps.avg_pool2d_backward(dy, shape, kernel, stride, padding,
                                count_include_pad=count_include_pad, queue=queue)
    fd = _fd_gradient(lambda v: avg_pool2d_reference(v, kernel, stride, padding,
                                                     count_include_pad), x, dy, 1e-3)
    assert relative_error(dx, fd) < TOL


def test_max_backward_is_the_forward_derivative(queue, rng):
    """With values far apart, a small step never changes a window's winner."""
    shape, geometry = (1, 2, 6, 7), (3, 2, 1)
    n = int(np.prod(shape))
    x = ((rng.permutation(n) + rng.random(n) * 0.5) * 0.1).reshape(shape).astype(np.float32)
    y, idx = ps.max_pool2d(x, *geometry, return_indices=True, queue=queue)
    dy = _normal(rng, y.shape)
    dx = ps.max_pool2d_backward(dy, idx, shape, *geometry, queue=queue)
    fd = _fd_gradient(lambda v: max_pool2d_reference(v, *geometry)[0], x, dy, 1e-4)
    assert relative_error(dx, fd) < TOL


def test_device_arrays_in_device_arrays_out(queue, rng):
    shape, geometry = (2, 3, 9, 10), (3, 2, 1)
    x = _normal(rng, shape)
    x_dev = cl_array.to_device(queue, x)
    events = []
    y, idx = ps.max_pool2d(x_dev, *geometry, return_indices=True, events=events)
    assert isinstance(y, cl_array.Array) and isinstance(idx, cl_array.Array)
    assert idx.dtype == np.int32 and len(events) == 1
    want, want_idx = max_pool2d_reference(x, *geometry)
    np.testing.assert_array_equal(y.get(), want.astype(np.float32))
    np.testing.assert_array_equal(idx.get(), want_idx)
    dy = _normal(rng, y.shape)
    dx = ps.max_pool2d_backward(cl_array.to_device(queue, dy), idx, shape, *geometry)
    assert isinstance(dx, cl_array.Array)
    assert relative_error(dx.get(), max_pool2d_backward_reference(dy, want_idx, shape)) < TOL
    avg = ps.avg_pool2d(x_dev, *geometry, count_include_pad=False)
    assert relative_error(avg.get(), avg_pool2d_reference(x, *geometry, False)) < TOL
    dx = ps.avg_pool2d_backward(cl_array.to_device(queue, dy), shape, *geometry,
                                count_include_pad=False)
    assert isinstance(dx, cl_array.Array)
    assert relative_error(dx.get(), avg_pool2d_backward_reference(dy, shape, *geometry,
                                                                  False)) < TOL
    # A view into a larger buffer (an offset) works as well.
    big = cl_array.to_device(queue, _normal(rng, (3,) + shape[1:]))
    view = big[1:]
    assert view.offset
    np.testing.assert_array_equal(ps.max_pool2d(view, *geometry).get(),
                                  max_pool2d_reference(big.get()[1:], *geometry)[0]
                                  .astype(np.float32))


def test_out_arguments(queue, rng):
    """``out=`` is written in full (NaN canaries) and returned, NumPy and device alike."""
    shape, geometry = (2, 2, 7, 8), (2, 2, 1)
    x = _normal(rng, shape)
    want, want_idx = max_pool2d_reference(x, *geometry)
    out = np.full(want.shape, np.nan, np.float32)
    y, idx = ps.max_pool2d(x, *geometry, return_indices=True, out=out, queue=queue)
    assert y is out
    np.testing.assert_array_equal(out, want.astype(np.float32))
    out = np.full(want.shape, np.nan, np.float32)
    assert ps.avg_pool2d(x, *geometry, out=out, queue=queue) is out
    assert relative_error(out, avg_pool2d_reference(x, *geometry)) < TOL
    dy = _normal(rng, want.shape)
    dx_out = np.full(shape, np.nan, np.float32)
    assert ps.max_pool2d_backward(dy, idx, shape, *geometry, out=dx_out, queue=queue) \
        is dx_out
    assert relative_error(dx_out, max_pool2d_backward_reference(dy, want_idx, shape)) < TOL
    dx_dev = cl_array.to_device(queue, np.full(shape, np.nan, np.float32))
    assert ps.avg_pool2d_backward(cl_array.to_device(queue, dy), shape, *geometry,
                                  out=dx_dev) is dx_dev
    assert relative_error(dx_dev.get(), avg_pool2d_backward_reference(dy, shape, *geometry)) \
        < TOL
    y_dev = cl_array.to_device(queue, np.full(want.shape, np.nan, np.float32))
    assert ps.max_pool2d(cl_array.to_device(queue, x), *geometry, out=y_dev) is y_dev
    np.testing.assert_array_equal(y_dev.get(), want.astype(np.float32))


def test_outputs_in_the_middle_of_a_buffer_are_written_exactly(queue, rng):
    """Each output a view between guard regions, poisoned with NaN: the kernels write all
    of it and nothing around it (the offsets are odd, not a multiple of any run)."""
    guard = 67
    shape, geometry = (2, 3, 7, 9), (3, 2, 1)
    x = _normal(rng, shape)
    want, want_idx = max_pool2d_reference(x, *geometry)
    dy = cl_array.to_device(queue, _normal(rng, want.shape))
    x_dev = cl_array.to_device(queue, x)

    def guarded(out_shape, dtype, poison):
        n = int(np.prod(out_shape))
        big = cl_array.to_device(queue, np.full(n + 2 * guard, -7, dtype))
        view = big[guard:guard + n].reshape(out_shape)
        view.fill(poison)
        return big, view

    for call, out_shape in [
            (lambda out: ps.max_pool2d(x_dev, *geometry, out=out), want.shape),
            (lambda out: ps.avg_pool2d(x_dev, *geometry, out=out), want.shape),
            (lambda out: ps.avg_pool2d_backward(dy, shape, *geometry, out=out), shape),
            (lambda out: ps.max_pool2d_backward(
                dy, cl_array.to_device(queue, want_idx.astype(np.int32)), shape, *geometry,
                out=out), shape)]:
        big, view = guarded(out_shape, np.float32, np.nan)
        assert call(view) is view
        host = big.get()
        assert np.all(host[:guard] == -7) and np.all(host[-guard:] == -7)
        assert not np.isnan(view.get()).any()


def test_a_launch_graph_replays_the_pooling_ops(queue, rng):
    shape, geometry = (2, 3, 9, 8), (3, 2, 1)
    x_dev = cl_array.to_device(queue, _normal(rng, shape))
    dy_dev = cl_array.to_device(queue, _normal(rng, (2, 3, 5, 4)))
    graph = ps.LaunchGraph(queue, inputs=(x_dev, dy_dev))
    with graph:
        y, idx = ps.max_pool2d(x_dev, *geometry, return_indices=True)
        dx_max = ps.max_pool2d_backward(dy_dev, idx, shape, *geometry)
        avg = ps.avg_pool2d(x_dev, *geometry, count_include_pad=False)
        dx_avg = ps.avg_pool2d_backward(dy_dev, shape, *geometry)
    assert len(graph) == 4
    x, dy = _normal(rng, shape), _normal(rng, (2, 3, 5, 4))
    graph.replay(x, dy)
    want, want_idx = max_pool2d_reference(x, *geometry)
    np.testing.assert_array_equal(y.get(), want.astype(np.float32))
    np.testing.assert_array_equal(idx.get(), want_idx)
    assert relative_error(dx_max.get(), max_pool2d_backward_reference(dy, want_idx, shape)) \
        < TOL
    assert relative_error(avg.get(), avg_pool2d_reference(x, *geometry, False)) < TOL
    assert relative_error(dx_avg.get(), avg_pool2d_backward_reference(dy, shape, *geometry)) \
        < TOL


def test_strided_numpy_input_and_empty_batch(queue, rng):
    base = _normal(rng, (2, 3, 11, 9))
    x = base.transpose(0, 1, 3, 2)[:, :, ::2]                 # (2, 3, 5, 11), strided
    assert not x.flags.c_contiguous
    y = ps.max_pool2d(x, 3, 2, 1, queue=queue)
    np.testing.assert_array_equal(y, max_pool2d_reference(x, 3, 2, 1)[0].astype(np.float32))
    assert relative_error(ps.avg_pool2d(x, 3, 1, 1, queue=queue),
                          avg_pool2d_reference(x, 3, 1, 1)) < TOL
    empty = np.zeros((0, 3, 6, 6), np.float32)
    y, idx = ps.max_pool2d(empty, 2, return_indices=True, queue=queue)
    assert y.shape == idx.shape == (0, 3, 3, 3)
    assert ps.avg_pool2d_backward(np.zeros((0, 3, 3, 3), np.float32), (0, 3, 6, 6), 2,
                                  queue=queue).shape == (0, 3, 6, 6)


def test_every_sampled_tile_configuration(queue, rng):
    """Each template branch at sampled (WG, RUN): rows of 11 and 9 leave partial runs."""
    shape, geometry = (2, 3, 9, 11), ((3, 2), (1, 2), 1)
    x = rng.integers(-3, 4, shape).astype(np.float32) * np.float32(0.75)     # ties too
    want, want_idx = max_pool2d_reference(x, *geometry)
    dy = _normal(rng, want.shape)
    limit = min(SAMPLE_WG_LIMIT, queue.device.max_work_group_size)
    for params in POOLING.sample(4, seed=int(rng.integers(1 << 31)), max_work_group_size=limit):
        with tuning.override("pooling", **params):
            y, idx = ps.max_pool2d(x, *geometry, return_indices=True, queue=queue)
            np.testing.assert_array_equal(y, want.astype(np.float32), err_msg=str(params))
            np.testing.assert_array_equal(idx, want_idx, err_msg=str(params))
            dx = ps.max_pool2d_backward(dy, idx, shape, *geometry, queue=queue)
            assert relative_error(dx, max_pool2d_backward_reference(dy, want_idx, shape)) \
                < TOL, params
            for count_pad in (True, False):
                avg = ps.avg_pool2d(x, *geometry, count_include_pad=count_pad, queue=queue)
                assert relative_error(avg, avg_pool2d_reference(x, *geometry, count_pad)) \
                    < TOL, params
                dx = ps.avg_pool2d_backward(dy, shape, *geometry,
                                            count_include_pad=count_pad, queue=queue)
                assert relative_error(dx, avg_pool2d_backward_reference(
                    dy, shape, *geometry, count_pad)) < TOL, params


def test_backward_is_deterministic(queue, rng):
    """A gather, no atomics: the same bits on every run."""
    shape, geometry = (4, 8, 15, 17), (3, 1, 1)                # each input in 9 windows
    x = cl_array.to_device(queue, _normal(rng, shape))
    y, idx = ps.max_pool2d(x, *geometry, return_indices=True)
    dy = cl_array.to_device(queue, _normal(rng, y.shape))
    for backward in (lambda: ps.max_pool2d_backward(dy, idx, shape, *geometry),
                     lambda: ps.avg_pool2d_backward(dy, shape, *geometry)):
        first = backward().get()
        assert all(np.array_equal(first, backward().get()) for _ in range(3))


X = np.ones((1, 2, 6, 6), np.float32)
DY = np.ones((1, 2, 3, 3), np.float32)
IDX = np.zeros((1, 2, 3, 3), np.int32)


@pytest.mark.parametrize("call, error, message", [
    # x
    (lambda q: ps.max_pool2d([[1.0]], 2, queue=q), TypeError, "x must be a numpy.ndarray"),
    (lambda q: ps.max_pool2d(X.astype(np.float64), 2, queue=q), TypeError,
     "x must have dtype float32"),
    (lambda q: ps.avg_pool2d(X[0], 2, queue=q), ValueError, "x must be 4-D"),
    # kernel_size, stride, padding, the output size
    (lambda q: ps.max_pool2d(X, 0, queue=q), ValueError, "kernel_size must be >= 1"),
    (lambda q: ps.avg_pool2d(X, 2.5, queue=q), TypeError, "kernel_size must be an int or"),
    (lambda q: ps.max_pool2d(X, (2, 2, 2), queue=q), TypeError, "kernel_size must be an int"),
    (lambda q: ps.max_pool2d(X, 2, 0, queue=q), ValueError, "stride must be >= 1"),
    (lambda q: ps.avg_pool2d(X, 2, (1, -1), queue=q), ValueError, "stride must be >= 1"),
    (lambda q: ps.max_pool2d(X, 3, 1, 2, queue=q), ValueError,
     "padding must be at most half the kernel size"),
    (lambda q: ps.avg_pool2d(X, 2, 1, -1, queue=q), ValueError, "padding must be >= 0"),
    (lambda q: ps.max_pool2d(X, 7, queue=q), ValueError, r"does not fit the 6x6 input plane"),
    # flags
    (lambda q: ps.max_pool2d(X, 2, return_indices=1, queue=q), TypeError,
     "return_indices must be a bool"),
    (lambda q: ps.avg_pool2d(X, 2, count_include_pad="no", queue=q), TypeError,
     "count_include_pad must be a bool"),
    # out
    (lambda q: ps.max_pool2d(X, 2, out=np.zeros((1, 2, 2, 2), np.float32), queue=q),
     ValueError, r"out must have shape \(1, 2, 3, 3\)"),
    (lambda q: ps.avg_pool2d(X, 2, out=np.zeros((1, 2, 3, 3)), queue=q), TypeError,
     "out must have dtype float32"),
    (lambda q: ps.avg_pool2d(X, 2, out=cl_array.zeros(q, (1, 2, 3, 3), np.float32), queue=q),
     TypeError, "out must be the same kind of container"),
    (lambda q: ps.max_pool2d_backward(DY, IDX, X.shape, 2, out=np.zeros(X.shape[1:],
                                                                          np.float32), queue=q),
     ValueError, r"out must have shape \(1, 2, 6, 6\)"),
    # dy
    (lambda q: ps.avg_pool2d_backward(DY.astype(np.float16), X.shape, 2, queue=q), TypeError,
     "dy must have dtype float32"),
    (lambda q: ps.max_pool2d_backward(DY[0], IDX, X.shape, 2, queue=q), ValueError,
     "dy must be 4-D"),
    # indices
    (lambda q: ps.max_pool2d_backward(DY, IDX.astype(np.int64), X.shape, 2, queue=q),
     TypeError, "indices must have dtype int32, got int64"),
    (lambda q: ps.max_pool2d_backward(DY, IDX.astype(np.float32), X.shape, 2, queue=q),
     TypeError, "indices must have dtype int32"),
    (lambda q: ps.max_pool2d_backward(DY, IDX[:, :1], X.shape, 2, queue=q), ValueError,
     r"indices must have dy's shape \(1, 2, 3, 3\)"),
    (lambda q: ps.max_pool2d_backward(cl_array.to_device(q, DY), IDX, X.shape, 2), TypeError,
     "indices must be the same kind of container as dy"),
    (lambda q: ps.max_pool2d_backward(DY, IDX + 36, X.shape, 2, queue=q), ValueError,
     r"indices must lie in \[0, 36\)"),
    (lambda q: ps.max_pool2d_backward(DY, IDX - 1, X.shape, 2, queue=q), ValueError,
     r"indices must lie in \[0, 36\)"),
    # input_shape
    (lambda q: ps.avg_pool2d_backward(DY, (1, 2, 6), 2, queue=q), TypeError,
     "input_shape must be a tuple of 4 ints"),
    (lambda q: ps.avg_pool2d_backward(DY, (1, 2, 6.0, 6), 2, queue=q), TypeError,
     "input_shape must be a tuple of 4 ints"),
    (lambda q: ps.avg_pool2d_backward(DY, (2, 2, 6, 6), 2, queue=q), ValueError,
     r"input_shape \(2, 2, 6, 6\) must have dy's N and C"),
    (lambda q: ps.max_pool2d_backward(DY, IDX, (1, 2, 8, 6), 2, queue=q), ValueError,
     r"pools to 4x3, but dy is 3x3"),
    (lambda q: ps.avg_pool2d_backward(DY, (1, 2, 6, 6), 2, 1, queue=q), ValueError,
     r"pools to 5x5, but dy is 3x3"),
    (lambda q: ps.avg_pool2d_backward(DY, (1, 2, -6, 6), 2, queue=q), ValueError,
     "input_shape must not be negative"),
    # the backward's geometry
    (lambda q: ps.avg_pool2d_backward(DY, X.shape, 2, 2, 2, queue=q), ValueError,
     "padding must be at most half"),
    (lambda q: ps.avg_pool2d_backward(DY, X.shape, 2, count_include_pad=None, queue=q),
     TypeError, "count_include_pad must be a bool"),
])
def test_bad_input_names_the_argument(queue, call, error, message):
    with pytest.raises(error, match=message):
        call(queue)


# ---------------------------------------------------------------------------------------------
# torch (optional): the ops it mirrors, forward and gradients


@pytest.mark.parametrize("data", ["normal", "ties", "nan"])
@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES, ids=IDS)
def test_max_pool2d_matches_torch(queue, rng, shape, kernel, stride, padding, data):
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    x = _normal(rng, shape)
    if data == "ties":
        x = np.round(x * 2) / 2
    elif data == "nan":
        x[rng.random(shape) < 0.1] = np.nan
    xt = torch.from_numpy(x).requires_grad_()
    yt, it = f.max_pool2d(xt, kernel, stride, padding, return_indices=True)
    y, idx = ps.max_pool2d(x, kernel, stride, padding, return_indices=True, queue=queue)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(idx, it.numpy().astype(np.int32))
    dy = _normal(rng, y.shape)
    yt.backward(torch.from_numpy(dy))
    dx = ps.max_pool2d_backward(dy, idx, shape, kernel, stride, padding, queue=queue)
    assert relative_error(dx, xt.grad.numpy()) < TOL


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES, ids=IDS)
def test_avg_pool2d_matches_torch(queue, rng, shape, kernel, stride, padding,
                                  count_include_pad):
    torch = pytest.importorskip("torch")
    x = _normal(rng, shape)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.nn.functional.avg_pool2d(xt, kernel, stride, padding,
                                        count_include_pad=count_include_pad)
    y = ps.avg_pool2d(x, kernel, stride, padding, count_include_pad=count_include_pad,
                      queue=queue)
    assert relative_error(y, yt.detach().numpy()) < TOL
    dy = _normal(rng, y.shape)
    yt.backward(torch.from_numpy(dy))
    dx = ps.avg_pool2d_backward(dy, shape, kernel, stride, padding,
                                count_include_pad=count_include_pad, queue=queue)
    assert relative_error(dx, xt.grad.numpy()) < TOL
