"""Bad input to conv2d_sparse raises a clear error that names the argument."""

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import scipy.sparse as sp

import pysparsecl as ps


def _csr(k=4, cols=27, density=0.5, seed=0):
    return sp.random(k, cols, density=density, format="csr", dtype=np.float32,
                     random_state=seed)


def _x(n=2, c=3, h=6, w=6):
    return np.random.default_rng(0).standard_normal((n, c, h, w), dtype=np.float32)


def _bad_indices():
    m = _csr()
    m.indices[3] = 27
    return m


def _negative_index():
    m = _csr()
    m.indices[0] = -1
    return m


def _bad_indptr():
    m = _csr()
    m.indptr[2], m.indptr[3] = m.indptr[3], m.indptr[2] - 1
    return m


def _with(m, **arrays):
    """A csr_matrix whose raw arrays are replaced without SciPy's checks."""
    bad = m.copy()
    for name, value in arrays.items():
        setattr(bad, name, value)
    return bad


BAD = [
    # (description, call kwargs builder, exception, message fragment)
    ("x float64", lambda: dict(x=_x().astype(np.float64), w_csr=_csr()), TypeError, "x must have dtype float32"),
    ("x 3-D", lambda: dict(x=_x()[0], w_csr=_csr()), ValueError, "x must be 4-D"),
    ("x list", lambda: dict(x=[[1.0]], w_csr=_csr()), TypeError, "x must be a numpy.ndarray"),
    ("dense weight", lambda: dict(x=_x(), w_csr=_csr().toarray()), TypeError, "w_csr must be a scipy.sparse"),
    ("csc weight", lambda: dict(x=_x(), w_csr=_csr().tocsc()), TypeError, "CSR format"),
    ("int weight", lambda: dict(x=_x(), w_csr=sp.csr_matrix(np.ones((4, 27), np.int32))), TypeError, "floating-point"),
    ("channel mismatch", lambda: dict(x=_x(c=4), w_csr=_csr()), ValueError, "columns"),
    ("kernel mismatch", lambda: dict(x=_x(), w_csr=_csr(), kernel_size=2), ValueError, "kernel_size"),
    ("non-square taps", lambda: dict(x=_x(), w_csr=_csr(cols=3 * 6)), ValueError, "pass kernel_size"),
    ("index out of range", lambda: dict(x=_x(), w_csr=_bad_indices()), ValueError, "w_csr.indices"),
    ("negative index", lambda: dict(x=_x(), w_csr=_negative_index()), ValueError, "w_csr.indices"),
    ("indptr decreasing", lambda: dict(x=_x(), w_csr=_bad_indptr()), ValueError, "w_csr.indptr"),
    ("indptr wrong length", lambda: dict(x=_x(), w_csr=_with(_csr(), indptr=_csr().indptr[:-1])), ValueError, "w_csr.indptr"),
    ("nnz mismatch", lambda: dict(x=_x(), w_csr=_with(_csr(), data=_csr().data[:-1])), ValueError, "indptr[-1]"),
    ("groups not dividing C", lambda: dict(x=_x(c=3), w_csr=_csr(k=4, cols=9), groups=2), ValueError, "groups=2 does not divide in_channels"),
    ("groups not dividing K", lambda: dict(x=_x(c=4), w_csr=_csr(k=3, cols=18), groups=2), ValueError, "groups=2 does not divide the output channels"),
    ("output size zero", lambda: dict(x=_x(h=2, w=2), w_csr=_csr()), ValueError, "output size would be"),
    ("stride zero", lambda: dict(x=_x(), w_csr=_csr(), stride=0), ValueError, "stride must be >= 1"),
    ("padding negative", lambda: dict(x=_x(), w_csr=_csr(), padding=(1, -1)), ValueError, "padding must be >= 0"),
    ("dilation float", lambda: dict(x=_x(), w_csr=_csr(), dilation=1.5), TypeError, "dilation must be an int"),
    ("padding triple", lambda: dict(x=_x(), w_csr=_csr(), padding=(1, 1, 1)), TypeError, "padding must be an int or a pair"),
    ("bias shape", lambda: dict(x=_x(), w_csr=_csr(), bias=np.ones(5, np.float32)), ValueError, "bias must have shape (4,)"),
    ("bias dtype", lambda: dict(x=_x(), w_csr=_csr(), bias=np.ones(4)), TypeError, "bias must have dtype float32"),
    ("out shape", lambda: dict(x=_x(), w_csr=_csr(), padding=1, out=np.empty((2, 4, 5, 6), np.float32)), ValueError, "out must have shape"),
    ("queue type", lambda: dict(x=_x(), w_csr=_csr(), queue="gpu"), TypeError, "queue must be a pyopencl.CommandQueue"),
]


@pytest.mark.parametrize("desc,make,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clearly(queue, desc, make, exc, fragment):
    kwargs = make()
    kwargs.setdefault("queue", queue)
    x = kwargs.pop("x")
    w = kwargs.pop("w_csr")
    with pytest.raises(exc, match=None) as info:
        ps.conv2d_sparse(x, w, **kwargs)
    assert fragment in str(info.value), str(info.value)
    # The library stays usable after the error.
    y = ps.conv2d_sparse(_x(), _csr(), padding=1, queue=queue)
    assert y.shape == (2, 4, 6, 6) and np.isfinite(y).all()


def test_device_array_from_another_context(queue):
    other = cl.CommandQueue(cl.Context([queue.device]))
    x_dev = cl_array.to_device(other, _x())
    with pytest.raises(ValueError, match="^x belongs to a different OpenCL context"):
        ps.conv2d_sparse(x_dev, _csr(), padding=1, queue=queue)
    weight = ps.SparseConvWeight(_csr(), in_channels=3, queue=other)
    with pytest.raises(ValueError, match="different OpenCL context"):
        ps.conv2d_sparse(cl_array.to_device(queue, _x()), weight, padding=1)


def test_mixed_containers_rejected(queue):
    with pytest.raises(TypeError, match="out must be the same kind of container"):
        ps.conv2d_sparse(_x(), _csr(), padding=1, queue=queue,
                         out=cl_array.empty(queue, (2, 4, 6, 6), np.float32))


def test_prepared_weight_disagreements(queue):
    weight = ps.SparseConvWeight(_csr(), in_channels=3, queue=queue)
    with pytest.raises(ValueError, match="x has 4 channels"):
        ps.conv2d_sparse(_x(c=4), weight, padding=1)
    with pytest.raises(ValueError, match="groups=3 disagrees"):
        ps.conv2d_sparse(_x(), weight, padding=1, groups=3)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        ps.SparseConvWeight(_csr(), in_channels=0, queue=queue)


def test_nan_and_inf_propagate(queue):
    x = _x()
    x[0, 1, 2, 3] = np.nan
    x[1, 0, 0, 0] = np.inf
    w = np.ones((2, 3, 3, 3), np.float32)
    y = ps.conv2d_sparse(x, sp.csr_matrix(w.reshape(2, -1)), padding=1, queue=queue)
    assert np.isnan(y[0, :, 1:4, 2:5]).all() and not np.isnan(y[0, :, 5:, :]).any()
    assert np.isposinf(y[1, :, 0:2, 0:2]).all()


def test_repeated_device_calls_are_checked_like_the_first(queue):
    """A device-array call that repeats a validated one skips most checks; one that differs
    in any argument must still be refused, by name, and a good one still computes."""
    weight = ps.SparseConvWeight(_csr(), 3, 3, queue=queue)
    x = cl_array.to_device(queue, _x())
    bias = cl_array.to_device(queue, np.ones(4, np.float32))
    want = ps.conv2d_sparse(x, weight, bias, padding=1, activation="relu").get()
    for _ in range(2):
        got = ps.conv2d_sparse(x, weight, bias, padding=1, activation="relu").get()
        np.testing.assert_array_equal(got, want)
    good = dict(bias=bias, padding=1, activation="relu")
    bad = [   # the good call with one argument changed
        (dict(bias=cl_array.to_device(queue, np.ones(5, np.float32))), ValueError, "bias"),
        (dict(bias=bias.astype(np.float64)), TypeError, "bias"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(residual=cl_array.to_device(queue, np.ones((2, 4, 5, 5), np.float32))),
         ValueError, "residual"),
        (dict(groups=3), ValueError, "groups"),
        (dict(kernel_size=5), ValueError, "kernel_size"),
    ]
    for change, error, name in bad:
        with pytest.raises(error, match=name):
            ps.conv2d_sparse(x, weight, **{**good, **change})
    with pytest.raises(ValueError, match="channels"):
        ps.conv2d_sparse(cl_array.to_device(queue, _x(c=4)), weight, **good)
