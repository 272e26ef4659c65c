"""conv2d_sparse's fused epilogue (bias, residual, ReLU) and fold_batchnorm, against float64
references, in every store path of the kernel (pixel and batch layouts, COMPACT)."""

import itertools

import numpy as np
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl.testing.cases import ConvCase
from pysparsecl.testing.reference import conv2d_epilogue_reference, relative_error
from pysparsecl.tuning import override

TOL = 1e-5
CASE = ConvCase(N=8, C=12, H=9, W=11, K=10, sparsity=0.6)

#: The kernel's three store paths: vectors along pixels, along images, and COMPACT.
LAYOUTS = {
    "pixels": dict(BATCH_LAYOUT=0, VEC=4),
    "images": dict(BATCH_LAYOUT=1, COMPACT=0, VEC=4),
    "compact": dict(BATCH_LAYOUT=1, COMPACT=1, VEC=4),
}


def _reference(case, x, w, bias, residual, relu):
    return conv2d_epilogue_reference(case.reference(x, w, bias), residual, relu)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias,residual,relu", list(itertools.product((False, True),
                                                                        repeat=3)))
def test_epilogue_matches_reference(queue, rng, layout, bias, residual, relu):
    case = CASE.with_(bias=bias)
    x, w, csr, b = case.make_inputs(rng)
    res = rng.standard_normal((case.N, case.K) + case.output_hw, dtype=np.float32) \
        if residual else None
    with override("conv2d_csr", **LAYOUTS[layout]):
        y = ps.conv2d_sparse(x, csr, b, padding=1, residual=res,
                             activation="relu" if relu else None, queue=queue)
    want = _reference(case, x, w, b, res, relu)
    assert relative_error(y, want) < TOL
    if relu:
        assert (y >= 0).all() and (want > 0).any() and (want == 0).any()


@pytest.mark.parametrize("case", [
    CASE.with_(N=3, stride=(2, 2)),
    CASE.with_(kernel=(1, 1), padding=(0, 0), sparsity=1.0),      # no nonzeros at all
    CASE.with_(C=12, K=12, groups=3),
], ids=["stride2", "empty-weight", "groups"])
def test_epilogue_edge_cases(queue, rng, case):
    x, w, csr, _ = case.make_inputs(rng)
    res = rng.standard_normal((case.N, case.K) + case.output_hw, dtype=np.float32)
    y = ps.conv2d_sparse(x, csr, residual=res, activation="relu", queue=queue,
                         **case.kwargs())
    assert relative_error(y, _reference(case, x, w, None, res, True)) < TOL


def test_residual_may_be_out_itself(queue, rng):
    x, w, csr, b = CASE.with_(bias=True).make_inputs(rng)
    res = rng.standard_normal((CASE.N, CASE.K) + CASE.output_hw, dtype=np.float32)
    res_dev = cl_array.to_device(queue, res)
    got = ps.conv2d_sparse(cl_array.to_device(queue, x), csr, cl_array.to_device(queue, b),
                           padding=1, residual=res_dev, activation="relu", out=res_dev)
    assert got is res_dev
    want = _reference(CASE, x, w, b, res, True)
    assert relative_error(res_dev.get(), want) < TOL


def test_nan_propagates_through_relu(queue, rng):
    x, w, csr, _ = CASE.make_inputs(rng)
    res = np.zeros((CASE.N, CASE.K) + CASE.output_hw, np.float32)
    res[0, 0, 0, 0] = np.nan
    res[0, 1, 0, 0] = -np.inf
    y = ps.conv2d_sparse(x, csr, padding=1, residual=res, activation="relu", queue=queue)
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 1, 0, 0] == 0.0
    assert np.isfinite(np.delete(y.ravel(), 0)).all()


def test_bad_epilogue_arguments(queue, rng):
    x, _, csr, _ = CASE.make_inputs(rng)
    shape = (CASE.N, CASE.K) + CASE.output_hw
    good = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="activation"):
        ps.conv2d_sparse(x, csr, padding=1, activation="gelu", queue=queue)
    with pytest.raises(ValueError, match="activation"):
        ps.conv2d_sparse(x, csr, padding=1, activation=True, queue=queue)
    with pytest.raises(ValueError, match="residual"):
        ps.conv2d_sparse(x, csr, padding=1, residual=good[:, :-1], queue=queue)
    with pytest.raises(TypeError, match="residual"):
        ps.conv2d_sparse(x, csr, padding=1, residual=good.astype(np.float64), queue=queue)
    with pytest.raises(TypeError, match="residual"):
        ps.conv2d_sparse(x, csr, padding=1, residual=good.tolist(), queue=queue)
    with pytest.raises(TypeError, match="residual"):
        ps.conv2d_sparse(x, csr, padding=1, residual=cl_array.to_device(queue, good),
                         queue=queue)
    x_dev = cl_array.to_device(queue, x)
    big = cl_array.zeros(queue, (2,) + shape, np.float32)
    with pytest.raises(ValueError, match="overlaps out"):
        ps.conv2d_sparse(x_dev, csr, padding=1, residual=big[0], out=_shifted(big, shape),
                         queue=queue)


def _shifted(big, shape):
    """A view of ``big`` that overlaps big[0] without being it."""
    flat = big.reshape(-1)
    n = int(np.prod(shape))
    return flat[1:n + 1].reshape(shape)


def test_fold_batchnorm_matches_conv_then_bn(queue, rng):
    case = CASE.with_(bias=True)
    x, w, csr, b = case.make_inputs(rng)
    k = case.K
    gamma, beta = rng.standard_normal(k), rng.standard_normal(k)
    mean, var = rng.standard_normal(k), rng.random(k) + 0.1
    folded, fb = ps.fold_batchnorm(csr, b, gamma, beta, mean, var, eps=1e-3)
    assert folded.nnz == csr.nnz and fb.dtype == np.float32
    y = ps.conv2d_sparse(x, folded, fb, padding=1, queue=queue)
    conv = case.reference(x, w, b)
    bn = ((conv - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3)
          * gamma[:, None, None] + beta[:, None, None])
    assert relative_error(y, bn) < TOL
    folded0, fb0 = ps.fold_batchnorm(csr, None, gamma, beta, mean, var)
    want0 = (-mean) * gamma / np.sqrt(var + 1e-5) + beta
    np.testing.assert_allclose(fb0, want0, rtol=1e-6, atol=1e-6)


def test_fold_batchnorm_rejects_bad_statistics(rng):
    _, _, csr, _ = CASE.make_inputs(rng)
    ones = np.ones(CASE.K)
    with pytest.raises(ValueError, match="gamma"):
        ps.fold_batchnorm(csr, None, ones[:-1], ones, ones, ones)
    with pytest.raises(ValueError, match="var"):
        ps.fold_batchnorm(csr, None, ones, ones, ones, -ones)
    with pytest.raises(ValueError, match="eps"):
        ps.fold_batchnorm(csr, None, ones, ones, ones, ones, eps=-1.0)
    with pytest.raises(TypeError, match="w_csr"):
        ps.fold_batchnorm(np.ones((3, 3)), None, ones, ones, ones, ones)
