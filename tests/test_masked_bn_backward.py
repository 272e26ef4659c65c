"""masked_relu_bn_backward: the gradients of DSG's double-mask BatchNorm against a float64
chain-rule reference and against finite differences of the float64 forward, on every
working OpenCL device."""

import numpy as np
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl.testing.reference import (
    central_difference,
    relative_error,
    relu_bn_backward_reference,
    relu_bn_reference,
)

TOL = 2e-5

# (N, C, H, W) convolution outputs (vectors along pixels, with partial tails), (M, C)
# linear outputs (vectors along channels), and a 3-D (N, C, L).
SHAPES = [(2, 3, 4, 5), (3, 5, 7, 7), (1, 1, 1, 1), (5, 37), (64, 16), (1, 3), (2, 3, 17)]


def _case(rng, shape, keep=0.5):
    c = shape[1]
    y = rng.standard_normal(shape).astype(np.float32)
    mask = rng.random(shape) < keep
    gamma = rng.standard_normal(c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    dout = rng.standard_normal(shape).astype(np.float32)
    return y, mask, gamma, beta, dout


def _stats(queue, rng, y, mask, gamma, beta, batch_stats):
    if batch_stats:
        _, mean, var = ps.masked_relu_bn(y, mask, gamma, beta, training=True, queue=queue)
        return mean, var
    c = y.shape[1]
    return (rng.standard_normal(c).astype(np.float32),
            (rng.random(c) + 0.5).astype(np.float32))


def _check(got, y, dout, mask, gamma, mean, var, batch_stats, eps=1e-5):
    ref = relu_bn_backward_reference(dout, y, mask, gamma, mean, var, eps, batch_stats)
    for a, r, name in zip(got, ref, ("dy", "dgamma", "dbeta")):
        a = a.get() if isinstance(a, cl_array.Array) else a
        assert a.shape == r.shape, name
        assert relative_error(a, r) < TOL, name
    dy = got[0].get() if isinstance(got[0], cl_array.Array) else got[0]
    off = ~(np.asarray(mask, bool) & (y > 0))
    assert np.all(dy[off] == 0), "dy must be an exact zero off the selection and at y <= 0"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False])
def test_matches_reference(queue, rng, shape, batch_stats):
    y, mask, gamma, beta, dout = _case(rng, shape)
    mean, var = _stats(queue, rng, y, mask, gamma, beta, batch_stats)
    got = ps.masked_relu_bn_backward(dout, y, mask, gamma, mean, var,
                                     batch_stats=batch_stats, queue=queue)
    assert all(isinstance(a, np.ndarray) for a in got)
    _check(got, y, dout, mask, gamma, mean, var, batch_stats)
    # Device arrays in, device arrays out; int8 and uint8 masks select like bool.
    dev = [cl_array.to_device(queue, a) for a in (dout, y, gamma, mean, var)]
    for m in (mask, mask.astype(np.int8), (mask * 7).astype(np.uint8)):
        got = ps.masked_relu_bn_backward(dev[0], dev[1], cl_array.to_device(queue, m),
                                         dev[2], dev[3], dev[4], batch_stats=batch_stats)
        assert all(isinstance(a, cl_array.Array) for a in got)
        _check(got, y, dout, mask, gamma, mean, var, batch_stats)


@pytest.mark.parametrize("batch_stats", [True, False])
def test_is_the_derivative_of_the_forward(queue, rng, batch_stats):
    """Central finite differences of the float64 forward, the statistics recomputed from y
    when they are the batch's."""
    shape = (2, 3, 3, 2)
    y, mask, gamma, beta, dout = _case(rng, shape, keep=0.6)
    y[np.abs(y) < 0.05] = 0.3                  # no kink of ReLU inside the step
    mean, var = _stats(queue, rng, y, mask, gamma, beta, batch_stats)
    eps = 1e-3

    def loss(yy, gg, bb):
        if batch_stats:
            out = relu_bn_reference(yy, mask, gg, bb, eps=eps)[0]
        else:
            out = relu_bn_reference(yy, mask, gg, bb, mean, var, eps=eps)
        return float((out * dout).sum())

    y64, g64, b64 = (a.astype(np.float64) for a in (y, gamma, beta))
    h = 1e-6

    def numeric(which):
        base = [y64, g64, b64]

        def loss_of(v):
            return loss(*(v if j == which else a for j, a in enumerate(base)))
        return central_difference(loss_of, base[which], h)

    dy, dgamma, dbeta = ps.masked_relu_bn_backward(dout, y, mask, gamma, mean, var, eps,
                                                   batch_stats=batch_stats, queue=queue)
    assert relative_error(dy, numeric(0)) < 1e-4
    assert relative_error(dgamma, numeric(1)) < 1e-4
    assert relative_error(dbeta, numeric(2)) < 1e-4


def test_unselected_entries_never_leak(queue, rng):
    y, mask, gamma, beta, dout = _case(rng, (3, 4, 5, 6))
    mean, var = _stats(queue, rng, y, mask, gamma, beta, True)
    poisoned_dout, poisoned_y = dout.copy(), y.copy()
    poisoned_dout[~mask] = np.nan
    poisoned_y[~mask] = np.inf
    got = ps.masked_relu_bn_backward(poisoned_dout, poisoned_y, mask, gamma, mean, var,
                                     queue=queue)
    assert all(np.isfinite(a).all() for a in got)
    _check(got, np.where(mask, y, -1.0).astype(np.float32), dout, mask, gamma, mean, var, True)


def test_channels_with_nothing_selected_and_an_empty_batch(queue, rng):
    y, mask, gamma, beta, dout = _case(rng, (4, 5, 3, 3))
    mask[:, 2] = False
    mean, var = _stats(queue, rng, y, mask, gamma, beta, True)
    dy, dgamma, dbeta = ps.masked_relu_bn_backward(dout, y, mask, gamma, mean, var,
                                                   queue=queue)
    assert dgamma[2] == 0 and dbeta[2] == 0 and np.all(dy[:, 2] == 0)
    _check((dy, dgamma, dbeta), y, dout, mask, gamma, mean, var, True)
    empty = np.zeros((0, 5), np.float32)
    dy, dgamma, dbeta = ps.masked_relu_bn_backward(empty, empty, empty.astype(bool), gamma,
                                                   mean, var, queue=queue)
    assert dy.shape == (0, 5) and np.all(dgamma == 0) and np.all(dbeta == 0)


def test_writes_into_views_of_a_gradient_buffer(queue, rng):
    """dgamma_out and dbeta_out as views inside one flat device buffer (a trainer's
    gradients), at offsets that are not on the base alignment; nothing else is written."""
    y, mask, gamma, beta, dout = _case(rng, (4, 6, 5, 5))
    mean, var = _stats(queue, rng, y, mask, gamma, beta, True)
    flat = cl_array.to_device(queue, np.full(40, 7.0, np.float32))
    dg_view, db_view = flat[3:9], flat[17:23]
    dy_out = cl_array.empty(queue, y.shape, np.float32)
    got = ps.masked_relu_bn_backward(*(cl_array.to_device(queue, a) for a in (dout, y, mask)),
                                     *(cl_array.to_device(queue, a) for a in (gamma, mean, var)),
                                     dy_out=dy_out, dgamma_out=dg_view, dbeta_out=db_view)
    assert got[0] is dy_out and got[1] is dg_view and got[2] is db_view
    _check(got, y, dout, mask, gamma, mean, var, True)
    rest = np.delete(flat.get(), np.r_[3:9, 17:23])
    assert np.all(rest == 7.0)


def test_bad_input(queue, rng):
    y, mask, gamma, beta, dout = _case(rng, (2, 3, 4, 4))
    mean, var = _stats(queue, rng, y, mask, gamma, beta, True)
    call = ps.masked_relu_bn_backward
    with pytest.raises(TypeError, match="y"):
        call(dout, y.astype(np.float64), mask, gamma, mean, var, queue=queue)
    with pytest.raises(ValueError, match="dout"):
        call(dout[:1], y, mask, gamma, mean, var, queue=queue)
    with pytest.raises(ValueError, match="mask"):
        call(dout, y, mask[:, :2], gamma, mean, var, queue=queue)
    with pytest.raises(TypeError, match="mask"):
        call(dout, y, mask.astype(np.float32), gamma, mean, var, queue=queue)
    with pytest.raises(ValueError, match="gamma"):
        call(dout, y, mask, gamma[:2], mean, var, queue=queue)
    with pytest.raises(ValueError, match="var"):
        call(dout, y, mask, gamma, mean, var[:2], queue=queue)
    with pytest.raises(ValueError, match="eps"):
        call(dout, y, mask, gamma, mean, var, -1.0, queue=queue)
    with pytest.raises(TypeError, match="batch_stats"):
        call(dout, y, mask, gamma, mean, var, batch_stats=1, queue=queue)
    with pytest.raises(ValueError, match="dgamma_out"):
        call(dout, y, mask, gamma, mean, var, dgamma_out=np.zeros(2, np.float32), queue=queue)
    with pytest.raises(ValueError, match="y"):
        call(dout[0, 0, 0], y[0, 0, 0], mask[0, 0, 0], gamma, mean, var, queue=queue)
