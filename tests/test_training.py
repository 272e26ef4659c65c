"""The training step's ops (softmax_cross_entropy, column_sums, channel_sums, sgd_step,
relu_backward) against float64 references and finite differences, on every working OpenCL device."""

import numpy as np
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl.testing.reference import (
    central_difference,
    relative_error,
    relu_backward_reference,
    sgd_reference,
    softmax_cross_entropy_reference,
)

TOL = 1e-5


def _xent_loss64(x, labels, mean=True):
    return softmax_cross_entropy_reference(x, labels, mean)[0]


@pytest.mark.parametrize("m, n", [(1, 1), (4, 3), (7, 130), (33, 1000)])
@pytest.mark.parametrize("mean", [True, False])
def test_softmax_cross_entropy_matches_reference(queue, rng, m, n, mean):
    x = (rng.standard_normal((m, n)) * 4).astype(np.float32)
    labels = rng.integers(0, n, m)
    loss, grad = ps.softmax_cross_entropy(x, labels, mean=mean, queue=queue)
    ref_loss, ref_grad = softmax_cross_entropy_reference(x, labels, mean)
    assert isinstance(loss, float) and isinstance(grad, np.ndarray)
    assert abs(loss - ref_loss) <= TOL * max(1.0, abs(ref_loss))
    assert relative_error(grad, ref_grad) < TOL
    # Device arrays in: device arrays out, the loss a (1,) array read when wanted.
    x_dev = cl_array.to_device(queue, x)
    loss_dev, grad_dev = ps.softmax_cross_entropy(
        x_dev, cl_array.to_device(queue, labels.astype(np.int32)), mean=mean)
    assert isinstance(grad_dev, cl_array.Array) and loss_dev.shape == (1,)
    assert abs(float(loss_dev.get()[0]) - ref_loss) <= TOL * max(1.0, abs(ref_loss))
    assert relative_error(grad_dev.get(), ref_grad) < TOL


def test_softmax_cross_entropy_gradient_is_the_loss_derivative(queue, rng):
    """Central finite differences of the float64 loss against the kernel's gradient."""
    x = rng.standard_normal((3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 3)
    _, grad = ps.softmax_cross_entropy(x, labels, queue=queue)
    fd = central_difference(lambda v: _xent_loss64(v, labels), x, 1e-6)
    assert relative_error(grad, fd) < 1e-5


def test_softmax_cross_entropy_is_stable_and_flags_bad_labels(queue, rng):
    x = np.array([[1e4, -1e4, 0.0], [-3e4, -3e4 + 1, -3e4]], np.float32)   # no overflow
    labels = np.array([1, 0])
    canary = np.full_like(x, np.nan)                      # every entry must be written
    loss, grad = ps.softmax_cross_entropy(x, labels, grad_out=canary, queue=queue)
    assert grad is canary
    ref_loss, ref_grad = softmax_cross_entropy_reference(x, labels)
    assert np.isfinite(loss) and abs(loss - ref_loss) <= TOL * abs(ref_loss)
    assert relative_error(grad, ref_grad) < TOL
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\); labels\[1\] = 3"):
        ps.softmax_cross_entropy(x, np.array([0, 3]), queue=queue)
    loss_dev, grad_dev = ps.softmax_cross_entropy(cl_array.to_device(queue, x),
                                                  cl_array.to_device(queue, np.int32([0, -1])))
    assert np.isnan(loss_dev.get()[0]) and np.all(np.isnan(grad_dev.get()[1]))
    assert np.all(np.isfinite(grad_dev.get()[0]))


@pytest.mark.parametrize("call, error, message", [
    (lambda q: ps.softmax_cross_entropy(np.zeros((2, 3)), np.zeros(2, np.int32), queue=q),
     TypeError, "logits must have dtype float32"),
    (lambda q: ps.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.zeros(3, np.int32),
                                        queue=q), ValueError, r"labels must have shape \(2,\)"),
    (lambda q: ps.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.zeros(2), queue=q),
     TypeError, "labels must have dtype int32 or int64"),
    (lambda q: ps.softmax_cross_entropy(np.zeros((0, 3), np.float32), np.zeros(0, np.int32),
                                        queue=q), ValueError, "at least one row"),
    (lambda q: ps.softmax_cross_entropy(np.zeros((2, 3), np.float32), [0, 1], queue=q),
     TypeError, "labels must be a numpy.ndarray"),
    (lambda q: ps.column_sums(np.zeros((2, 3), np.float64), queue=q), TypeError,
     "a must have dtype float32"),
    (lambda q: ps.column_sums(np.zeros(3, np.float32), queue=q), ValueError, "a must be 2-D"),
    (lambda q: ps.column_sums(np.zeros((2, 3), np.float32), scale=np.nan, queue=q), ValueError,
     "scale must be a finite number"),
    (lambda q: ps.channel_sums(np.zeros((2, 3), np.float64), queue=q), TypeError,
     "a must have dtype float32"),
    (lambda q: ps.channel_sums(np.zeros(3, np.float32), queue=q), ValueError,
     "a must be at least 2-D"),
    (lambda q: ps.channel_sums(np.zeros((2, 3), np.float32), out=np.zeros(2, np.float32),
                               queue=q), ValueError, "out"),
])
def test_bad_input_names_the_argument(queue, call, error, message):
    with pytest.raises(error, match=message):
        call(queue)


def test_column_sums(queue, rng):
    a = rng.standard_normal((37, 21), dtype=np.float32)
    assert relative_error(ps.column_sums(a, queue=queue), a.astype(np.float64).sum(0)) < TOL
    wide = cl_array.to_device(queue, rng.standard_normal((9, 40), dtype=np.float32))
    view = wide[:, 3:30]                                   # strided rows on the device
    out = cl_array.to_device(queue, np.full(27, np.nan, np.float32))   # a canary
    assert ps.column_sums(view, scale=-0.25, out=out) is out
    assert relative_error(out.get(), -0.25 * wide.get()[:, 3:30].astype(np.float64).sum(0)) \
        < TOL
    with pytest.raises(ValueError, match="rows must each be contiguous"):
        ps.column_sums(wide.T)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 37), (1, 1, 1), (3, 2, 300)])
def test_channel_sums(queue, rng, shape):
    a = rng.standard_normal(shape, dtype=np.float32)
    ref = a.astype(np.float64).sum(axis=(0,) + tuple(range(2, a.ndim)))
    assert relative_error(ps.channel_sums(a, queue=queue), ref) < TOL
    flat = cl_array.to_device(queue, np.full(shape[1] + 9, np.nan, np.float32))
    view = flat[5:5 + shape[1]]                            # out inside a gradient buffer
    assert ps.channel_sums(cl_array.to_device(queue, a), scale=-0.5, out=view) is view
    assert relative_error(view.get(), -0.5 * ref) < TOL
    rest = np.delete(flat.get(), np.r_[5:5 + shape[1]])
    assert np.isnan(rest).all()
    with pytest.raises(ValueError, match="contiguous"):
        ps.channel_sums(cl_array.to_device(queue, np.zeros((4, 3, 5), np.float32))[::2])


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4),
                                                    (0.0, 1e-2)])
def test_sgd_step_matches_torch_update(queue, rng, momentum, weight_decay):
    n = 4099
    p0, g, v0 = (rng.standard_normal(n, dtype=np.float32) for _ in range(3))
    p = cl_array.to_device(queue, p0)
    v = cl_array.to_device(queue, v0) if momentum else None
    assert ps.sgd_step(p, cl_array.to_device(queue, g), v, lr=0.03, momentum=momentum,
                       weight_decay=weight_decay) is p
    want_p, want_v = sgd_reference(p0, g, v0 if momentum else None, 0.03, momentum,
                                   weight_decay)
    assert relative_error(p.get(), want_p) < TOL
    if momentum:
        assert relative_error(v.get(), want_v) < TOL


def test_sgd_step_bad_input(queue):
    p = cl_array.zeros(queue, 8, np.float32)
    g = cl_array.zeros(queue, 8, np.float32)
    with pytest.raises(TypeError, match="param must be a pyopencl.array.Array"):
        ps.sgd_step(np.zeros(8, np.float32), g, lr=0.1)
    with pytest.raises(ValueError, match="grad must have param's shape"):
        ps.sgd_step(p, cl_array.zeros(queue, 7, np.float32), lr=0.1)
    with pytest.raises(ValueError, match="momentum needs a velocity"):
        ps.sgd_step(p, g, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        ps.sgd_step(p, g, lr=-1.0)
    with pytest.raises(ValueError, match="velocity must not share its buffer"):
        ps.sgd_step(p, g, p, lr=0.1, momentum=0.5)


@pytest.mark.parametrize("shape", [(5,), (3, 70), (2, 3, 129)])
def test_relu_backward_with_masks(queue, rng, shape):
    dy = rng.standard_normal(shape, dtype=np.float32)
    y = np.maximum(rng.standard_normal(shape, dtype=np.float32), 0)
    y.reshape(-1)[0] = np.nan                                # NaN is not > 0
    ref = relu_backward_reference(dy, y)
    assert relative_error(ps.relu_backward(dy, y, queue=queue), ref) < TOL
    # On the device, with a pyopencl comparison (int8) and a bool mask as the selection.
    dy_dev, y_dev = cl_array.to_device(queue, dy), cl_array.to_device(queue, y)
    keep = rng.random(shape) < 0.5
    compared = cl_array.to_device(queue, keep.astype(np.float32)) > 0.5     # int8
    assert compared.dtype == np.int8
    for mask in (cl_array.to_device(queue, keep), compared,
                 cl_array.to_device(queue, keep.astype(np.uint8) * 7)):   # nonzero selects
        got = ps.relu_backward(dy_dev, y_dev, mask=mask)
        assert relative_error(got.get(), np.where(keep, ref, 0.0)) < TOL
    with pytest.raises(TypeError, match="mask must have dtype bool, int8 or uint8"):
        ps.relu_backward(dy, y, mask=keep.astype(np.int32), queue=queue)


def test_random_mask_is_uniform_exact_and_reproducible(queue, rng):
    seed = int(rng.integers(2 ** 63))
    m, n, sparsity = 4000, 12, 0.75                       # keep 3 of 12 per row
    sel = ps.random_mask(m, n, sparsity, seed=seed, queue=queue).get()
    assert sel.dtype == np.bool_ and np.all(sel.sum(1) == 3)
    # Each column is kept with probability 1/4: within 5 sigma of it in 4000 rows.
    freq = sel.mean(0)
    assert np.all(np.abs(freq - 0.25) < 5 * np.sqrt(0.25 * 0.75 / m)), freq
    # Pairs of columns are kept together as often as independent choice predicts.
    both = (sel[:, 0] & sel[:, 1]).mean()
    assert abs(both - 3 / 12 * 2 / 11) < 5 * np.sqrt(both / m) + 1e-3
    again = ps.random_mask(m, n, sparsity, seed=seed, queue=queue).get()
    assert np.array_equal(sel, again)
    other = ps.random_mask(m, n, sparsity, seed=seed + 1, queue=queue).get()
    assert not np.array_equal(sel, other)
    idx = ps.random_mask(m, n, sparsity, seed=seed, compact=True, queue=queue).get()
    assert np.array_equal(np.sort(idx, axis=1), idx)
    assert np.array_equal(np.take_along_axis(sel, idx, axis=1), np.ones_like(idx, bool))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(n_rows=0, n_cols=4, sparsity=0.5, seed=1), ValueError, "n_rows"),
    (dict(n_rows=2, n_cols=4, sparsity=1.0, seed=1), ValueError, "sparsity"),
    (dict(n_rows=2, n_cols=4, sparsity=0.5, seed=-1), ValueError, r"seed must be an int"),
    (dict(n_rows=2, n_cols=4, sparsity=0.5, seed=1, compact=1), TypeError, "compact"),
])
def test_random_mask_bad_input(queue, kwargs, error, message):
    with pytest.raises(error, match=message):
        ps.random_mask(queue=queue, **kwargs)
