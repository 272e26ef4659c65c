"""Property-based tests (hypothesis): every public op against the float64 reference.

Random shapes, sparsities, strides, paddings, dilations, groups, masks, broadcasting
patterns, strided views and dtypes.  Profiles, chosen with the HYPOTHESIS_PROFILE
environment variable:

* ``ci`` (the default): 200 examples per op;
* ``slow``: 5,000 examples per op (``HYPOTHESIS_PROFILE=slow make test``);
* ``dev``: 20 examples per op, for quick iteration.

Shapes stay small so that the ``ci`` profile adds little to ``make test``.  Any failure
hypothesis finds is added to the ``@example`` list of its test, so it is replayed forever.
"""

import math
import os

import numpy as np
import pyopencl.array as cl_array
import scipy.sparse as sp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pysparsecl as ps
from pysparsecl.ops.drs import keep_count
from pysparsecl.testing.reference import (
    add_reference,
    add_relu_reference,
    axpby_reference,
    conv2d_masked_reference,
    conv2d_reference,
    drs_scores_reference,
    masked_matmul_backward_reference,
    masked_matmul_reference,
    mul_reference,
    relative_error,
    relu_bn_reference,
)
from pysparsecl.tuning import override

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("slow", max_examples=5000, **_COMMON)
settings.register_profile("dev", max_examples=20, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
EXAMPLES = PROFILE.max_examples

TOL = 1e-4
seeds = st.integers(0, 2**32 - 1)


def _close(result, reference, tol=TOL):
    err = relative_error(result, reference)
    assert err <= tol, f"relative error {err:.3g}"


def _close_to_product(result, reference, magnitude, tol=TOL):
    """Products are compared with the float32 error bound in mind: the error relative to
    ||(|A| @ |B|)|| (``magnitude``, the same product of absolute values), not to the
    result, which cancellation can make arbitrarily small (one selected output of 18
    products can be 1e5 times smaller than its terms)."""
    scale = np.linalg.norm(np.asarray(magnitude, np.float64))
    err = np.linalg.norm(np.asarray(result, np.float64) - reference)
    assert err <= tol * scale if scale else err == 0, \
        f"error {err:.3g} against a magnitude of {scale:.3g}"


def _host(a):
    return a.get() if isinstance(a, cl_array.Array) else np.asarray(a)


def _maybe_device(queue, a, on_device):
    return cl_array.to_device(queue, a) if on_device else a


# ---------------------------------------------------------------------------------------------
# conv2d_sparse

@st.composite
def conv_problems(draw):
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 3))
    k = groups * draw(st.integers(1, 4))
    r, s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    min_h = max(1, (r - 1) * dil[0] + 1 - 2 * pad[0])
    min_w = max(1, (s - 1) * dil[1] + 1 - 2 * pad[1])
    h = draw(st.integers(min_h, min_h + 6))
    w = draw(st.integers(min_w, min_w + 6))
    n = draw(st.integers(0, 3))
    sparsity = draw(st.sampled_from([0.0, 0.5, 0.8, 0.95, 1.0]))
    return dict(n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride=stride, pad=pad, dil=dil,
                groups=groups, sparsity=sparsity, bias=draw(st.booleans()),
                device=draw(st.booleans()), shuffle=draw(st.booleans()), seed=draw(seeds))


@settings(PROFILE)
@given(p=conv_problems())
@example(p=dict(n=0, c=1, h=1, w=1, k=1, r=1, s=1, stride=(1, 1), pad=(0, 0), dil=(1, 1),
                groups=1, sparsity=1.0, bias=True, device=True, shuffle=False, seed=0))
def test_conv2d_sparse(queue, p):
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal((p["n"], p["c"], p["h"], p["w"]), dtype=np.float32)
    wt = rng.standard_normal((p["k"], p["c"] // p["groups"], p["r"], p["s"]), dtype=np.float32)
    wt[rng.random(wt.shape) < p["sparsity"]] = 0
    b = rng.standard_normal(p["k"], dtype=np.float32) if p["bias"] else None
    csr = sp.csr_matrix(wt.reshape(p["k"], -1))
    if p["shuffle"] and csr.nnz > 1:      # unsorted column indices within rows
        coo = csr.tocoo()
        order = rng.permutation(coo.nnz)
        csr = sp.csr_matrix((coo.data[order], (coo.row[order], coo.col[order])),
                            shape=csr.shape)
        csr.has_sorted_indices = False
    y = ps.conv2d_sparse(_maybe_device(queue, x, p["device"]), csr, b,
                         kernel_size=(p["r"], p["s"]), stride=p["stride"], padding=p["pad"],
                         dilation=p["dil"], groups=p["groups"], queue=queue)
    assert isinstance(y, cl_array.Array) == p["device"]
    ref = conv2d_reference(x, wt, b, p["stride"], p["pad"], p["dil"], p["groups"])
    assert y.shape == ref.shape
    _close(_host(y), ref)


# ---------------------------------------------------------------------------------------------
# masked_matmul and its backward

@st.composite
def masked_problems(draw):
    m = draw(st.integers(1, 9))
    k = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    form = draw(st.sampled_from(["bool", "idx"]))
    n_keep = draw(st.integers(1, n))
    return dict(m=m, k=k, n=n, form=form, n_keep=n_keep,
                vector=m == 1 and draw(st.booleans()),
                empty=draw(st.integers(0, m)) if form == "bool" else 0,
                device=draw(st.booleans()), seed=draw(seeds))


def _masked_inputs(p):
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal((p["m"], p["k"]), dtype=np.float32)
    w = rng.standard_normal((p["k"], p["n"]), dtype=np.float32)
    idx = np.argsort(rng.random((p["m"], p["n"])), axis=1)[:, :p["n_keep"]]
    if p["form"] == "idx":
        mask = idx.astype(np.int32)
        dy = rng.standard_normal((p["m"], p["n_keep"]), dtype=np.float32)
    else:
        mask = np.zeros((p["m"], p["n"]), bool)
        np.put_along_axis(mask, idx, True, axis=1)
        mask[:p["empty"]] = False
        dy = rng.standard_normal((p["m"], p["n"]), dtype=np.float32)
    if p["vector"]:
        x, mask, dy = x[0], mask[0], dy[0]
    return x, w, mask, dy


@settings(PROFILE)
@given(p=masked_problems())
def test_masked_matmul(queue, p):
    x, w, mask, _ = _masked_inputs(p)
    y = ps.masked_matmul(_maybe_device(queue, x, p["device"]), w, mask, queue=queue)
    ref = masked_matmul_reference(x, w, mask)
    assert y.shape == ref.shape
    got = _host(y)
    _close_to_product(got, ref, masked_matmul_reference(np.abs(x), np.abs(w), mask))
    if mask.dtype == np.bool_:                   # unselected outputs are exact zeros
        assert np.all(got[~mask] == 0)


@settings(PROFILE)
@given(p=masked_problems())
def test_masked_matmul_backward(queue, p):
    x, w, mask, dy = _masked_inputs(p)
    dx, dw = ps.masked_matmul_backward(_maybe_device(queue, dy, p["device"]), x, w, mask,
                                       queue=queue)
    rdx, rdw = masked_matmul_backward_reference(dy, x, w, mask)
    assert dx.shape == rdx.shape and dw.shape == rdw.shape
    mdx, mdw = masked_matmul_backward_reference(np.abs(dy), np.abs(x), np.abs(w), mask)
    _close_to_product(_host(dx), rdx, mdx)
    _close_to_product(_host(dw), rdw, mdw)


# A compact x (CompactRows): the product and its backward, through the gather kernels or
# with x scattered to dense (the routine's two paths), against the dense batch's reference.

@st.composite
def compact_problems(draw):
    p = draw(masked_problems())
    p["nx"] = draw(st.integers(0, p["k"]))
    p["path"] = draw(st.sampled_from([dict(GATHER_MAX_DENSITY=100, GATHER_MIN_ROWS=1),
                                      dict(GATHER_MAX_DENSITY=0)]))
    return p


def _compact_inputs(p):
    x, w, mask, dy = _masked_inputs(p)
    rng = np.random.default_rng(p["seed"] + 1)
    x2 = np.atleast_2d(x)
    idx = np.sort(np.argsort(rng.random(x2.shape), axis=1)[:, :p["nx"]], axis=1)
    idx = idx.astype(np.int32)
    dense = np.zeros_like(x2)
    np.put_along_axis(dense, idx, np.take_along_axis(x2, idx, 1), axis=1)
    values = np.take_along_axis(x2, idx, 1)
    if p["vector"]:
        values, idx, dense = values[0], idx[0], dense[0]
    return ps.CompactRows(values, idx, p["k"]), dense, w, mask, dy


@settings(PROFILE)
@given(p=compact_problems())
def test_masked_matmul_of_compact_x(queue, p):
    x, dense, w, mask, _ = _compact_inputs(p)
    if p["device"]:
        x = x.to_device(queue)
    with override("masked_compact_routine", **p["path"]):
        y = ps.masked_matmul(x, w, mask, queue=queue)
    ref = masked_matmul_reference(dense, w, mask)
    got = _host(y)
    assert got.shape == ref.shape
    _close_to_product(got, ref, masked_matmul_reference(np.abs(dense), np.abs(w), mask))
    if mask.dtype == np.bool_:
        assert np.all(got[~mask] == 0)


@settings(PROFILE)
@given(p=compact_problems())
@example(p=dict(m=2, k=1, n=1, form="idx", n_keep=1, vector=False, empty=0, device=False,
                seed=0, nx=0, path={}))     # x without entries: dw is zero
def test_masked_matmul_backward_of_compact_x(queue, p):
    x, dense, w, mask, dy = _compact_inputs(p)
    if p["device"]:
        x = x.to_device(queue)
    dx, dw = ps.masked_matmul_backward(_maybe_device(queue, dy, p["device"]), x, w, mask,
                                       queue=queue)
    rdx, rdw = masked_matmul_backward_reference(dy, dense, w, mask)
    mdx, mdw = masked_matmul_backward_reference(np.abs(dy), np.abs(dense), np.abs(w), mask)
    at = np.atleast_2d(_host(x.idx))        # dx is compared at x's entries only
    _close_to_product(np.atleast_2d(_host(dx.values)),
                      np.take_along_axis(np.atleast_2d(rdx), at, 1),
                      np.take_along_axis(np.atleast_2d(mdx), at, 1))
    _close_to_product(_host(dw), rdw, mdw)


# ---------------------------------------------------------------------------------------------
# masked_relu_bn

@st.composite
def bn_problems(draw):
    shape = draw(st.one_of(
        st.tuples(st.integers(1, 9), st.integers(1, 40)),
        st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5)),
        st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7))))
    return dict(shape=shape, density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
                training=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                device=draw(st.booleans()), seed=draw(seeds))


@settings(PROFILE)
@given(p=bn_problems())
def test_masked_relu_bn(queue, p):
    rng = np.random.default_rng(p["seed"])
    shape, c = p["shape"], p["shape"][1]
    y = rng.standard_normal(shape, dtype=np.float32)
    mask = rng.random(shape) < p["density"]
    g, b, mean = (rng.standard_normal(c, dtype=np.float32) for _ in range(3))
    var = rng.random(c, dtype=np.float32) + 0.5
    y_in = _maybe_device(queue, y, p["device"])
    if p["training"]:
        out, bm, bv = ps.masked_relu_bn(y_in, mask, g, b, eps=p["eps"], training=True,
                                        queue=queue)
        rout, rm, rv = relu_bn_reference(y, mask, g, b, eps=p["eps"])
        _close(_host(bm), rm)
        _close(_host(bv), rv, 1e-3)
        _close(_host(out), rout, 1e-3)
    else:
        out = ps.masked_relu_bn(y_in, mask, g, b, mean, var, eps=p["eps"], queue=queue)
        _close(_host(out), relu_bn_reference(y, mask, g, b, mean, var, eps=p["eps"]))
    assert np.all(_host(out)[~mask] == 0)


# ---------------------------------------------------------------------------------------------
# conv2d_masked and drs_mask_conv2d

@st.composite
def masked_conv_problems(draw):
    c, k = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    r = draw(st.integers(1, 3))
    stride, pad, dil = draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    min_hw = max(1, (r - 1) * dil + 1 - 2 * pad)
    return dict(n=draw(st.integers(1, 2)), c=c, k=k, r=r, stride=stride, pad=pad, dil=dil,
                h=draw(st.integers(min_hw, min_hw + 5)), w=draw(st.integers(min_hw, min_hw + 5)),
                channels=draw(st.booleans()), density=draw(st.sampled_from([0.0, 0.4, 1.0])),
                device=draw(st.booleans()), seed=draw(seeds))


@settings(PROFILE)
@given(p=masked_conv_problems())
def test_conv2d_masked(queue, p):
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal((p["n"], p["c"], p["h"], p["w"]), dtype=np.float32)
    w = rng.standard_normal((p["k"], p["c"], p["r"], p["r"]), dtype=np.float32)
    oh, ow = ps.conv2d_output_shape((p["h"], p["w"]), (p["r"], p["r"]), (p["stride"],) * 2,
                                    (p["pad"],) * 2, (p["dil"],) * 2)
    mshape = (p["n"], p["k"], 1, 1) if p["channels"] else (p["n"], p["k"], oh, ow)
    mask = rng.random(mshape) < p["density"]
    y = ps.conv2d_masked(_maybe_device(queue, x, p["device"]), w, mask, p["stride"], p["pad"],
                         p["dil"], queue=queue)
    full = np.broadcast_to(mask, (p["n"], p["k"], oh, ow))
    ref = conv2d_masked_reference(x, w, full, (p["stride"],) * 2, (p["pad"],) * 2,
                                  (p["dil"],) * 2)
    got = _host(y)
    assert got.shape == ref.shape
    _close(got, ref)
    assert np.all(got[~full] == 0)


@settings(PROFILE)
@given(p=masked_conv_problems(), sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_drs_mask_conv2d(queue, p, sparsity):
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal((p["n"], p["c"], p["h"], p["w"]), dtype=np.float32)
    w = rng.standard_normal((p["k"], p["c"], p["r"], p["r"]), dtype=np.float32)
    mask = _host(ps.drs_mask_conv2d(_maybe_device(queue, x, p["device"]), w, sparsity,
                                    stride=p["stride"], padding=p["pad"], dilation=p["dil"],
                                    seed=int(p["seed"] % 1000), queue=queue))
    oh, ow = ps.conv2d_output_shape((p["h"], p["w"]), (p["r"], p["r"]), (p["stride"],) * 2,
                                    (p["pad"],) * 2, (p["dil"],) * 2)
    assert mask.shape == (p["n"], p["k"], oh, ow) and mask.dtype == np.bool_
    assert np.all(mask.sum(1) == keep_count(sparsity, p["k"]))


# ---------------------------------------------------------------------------------------------
# drs_mask

@st.composite
def drs_problems(draw):
    d = draw(st.integers(2, 40))
    return dict(m=draw(st.integers(1, 12)), d=d, n=draw(st.integers(1, 60)),
                k=draw(st.integers(1, d)), sparsity=draw(st.sampled_from([0.0, 0.5, 0.8, 0.97])),
                compact=draw(st.booleans()), vector=draw(st.booleans()),
                device=draw(st.booleans()), seed=draw(seeds))


@settings(PROFILE)
@given(p=drs_problems())
def test_drs_mask(queue, p):
    rng = np.random.default_rng(p["seed"])
    m = 1 if p["vector"] else p["m"]
    x = rng.standard_normal((m, p["d"]), dtype=np.float32)
    w = rng.standard_normal((p["d"], p["n"]), dtype=np.float32)
    proj = ps.SparseRandomProjection(p["d"], k=p["k"], seed=int(p["seed"] % 1000), queue=queue)
    xin = x[0] if p["vector"] else x
    got = _host(ps.drs_mask(_maybe_device(queue, xin, p["device"]), w, p["sparsity"],
                            projection=proj, compact=p["compact"], queue=queue))
    n_keep = keep_count(p["sparsity"], p["n"])
    got = np.atleast_2d(got)
    if p["compact"]:
        assert got.shape == (m, n_keep) and got.dtype == np.int32
        assert np.all(np.diff(got, axis=1) > 0)
        dense = np.zeros((m, p["n"]), bool)
        np.put_along_axis(dense, got.astype(np.int64), True, axis=1)
    else:
        assert got.shape == (m, p["n"]) and got.dtype == np.bool_
        dense = got
    assert np.all(dense.sum(1) == n_keep)
    scores = drs_scores_reference(x, w, proj.matrix().toarray(), proj.scale)
    slack = 1e-4 * np.abs(scores).max(axis=1) + 1e-6
    kth = -np.sort(-scores, axis=1)[:, n_keep - 1]
    assert np.all(np.where(dense, scores, np.inf) >= (kth - slack)[:, None])
    assert np.all(np.where(dense, -np.inf, scores) <= (kth + slack)[:, None])


# ---------------------------------------------------------------------------------------------
# Elementwise: broadcasting, dtypes, scalars, masks, strided views

def _dtypes(queue):
    out = [np.float32, np.int32, np.int64]
    if "cl_khr_fp64" in queue.device.extensions:
        out.append(np.float64)
    return out


@st.composite
def elementwise_problems(draw, n_operands):
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=n_operands, min_dims=0,
                                                    max_dims=4, min_side=0, max_side=5))
    return dict(shapes=shapes.input_shapes, out_shape=shapes.result_shape,
                dtypes=[draw(st.sampled_from(["f32", "i32", "i64", "f64"]))
                        for _ in range(n_operands)],
                scalar=[draw(st.sampled_from([None, None, None, "int", "float"]))
                        for _ in range(n_operands)],
                transpose=[draw(st.booleans()) for _ in range(n_operands)],
                device=[draw(st.booleans()) for _ in range(n_operands)],
                masked=draw(st.booleans()), seed=draw(seeds))


_NP = {"f32": np.float32, "i32": np.int32, "i64": np.int64, "f64": np.float64}


def _operands(queue, p):
    rng = np.random.default_rng(p["seed"])
    ops, hosts = [], []
    for shape, dt, scalar, transpose, dev in zip(p["shapes"], p["dtypes"], p["scalar"],
                                                 p["transpose"], p["device"]):
        if dt == "f64" and "cl_khr_fp64" not in queue.device.extensions:
            dt = "f32"
        if scalar == "int":
            v = int(rng.integers(-5, 6))
            ops.append(v)
            hosts.append(v)
            continue
        if scalar == "float":
            v = float(rng.standard_normal())
            ops.append(v)
            hosts.append(v)
            continue
        dtype = _NP[dt]
        if np.issubdtype(dtype, np.integer):
            a = rng.integers(-100, 100, shape[::-1] if transpose else shape).astype(dtype)
        else:
            a = (rng.standard_normal(shape[::-1] if transpose else shape) * 10).astype(dtype)
        if transpose:
            a = a.T                      # a strided (transposed) view
        hosts.append(a)
        ops.append(cl_array.to_device(queue, a.copy(order="C")) if dev and not transpose
                   else a)
    return ops, hosts


def _result_dtype(hosts):
    return np.result_type(*hosts)


def _elementwise_check(queue, p, call, reference, coefficients=()):
    ops, hosts = _operands(queue, p)
    if all(not isinstance(h, np.ndarray) for h in hosts):
        return                                   # all-scalar calls are not ops on arrays
    rng = np.random.default_rng(p["seed"] + 1)
    out_shape = np.broadcast_shapes(*(np.shape(h) for h in hosts))
    mask = rng.random(out_shape) < 0.5 if p["masked"] else None
    dtype = _result_dtype(list(coefficients) + hosts)
    if dtype == np.float64 and "cl_khr_fp64" not in queue.device.extensions:
        return
    got = _host(call(ops, mask))
    ref = reference(hosts, dtype)
    if mask is not None:
        ref = np.where(mask, ref, 0)
    assert got.dtype == dtype, (got.dtype, dtype)
    assert got.shape == out_shape
    if np.issubdtype(dtype, np.integer):
        np.testing.assert_array_equal(got, ref.astype(dtype))
    else:
        _close(got, ref, 1e-6)


@settings(PROFILE)
@given(p=elementwise_problems(2), op=st.sampled_from(["add", "mul", "add_relu"]))
def test_binary_elementwise(queue, p, op):
    reference = {"add": add_reference, "mul": mul_reference, "add_relu": add_relu_reference}[op]
    _elementwise_check(queue, p,
                       lambda ops, mask: getattr(ps, op)(*ops, mask=mask, queue=queue),
                       lambda hosts, dtype: reference(*hosts, dtype))


@settings(PROFILE)
@given(p=elementwise_problems(2), alpha=st.sampled_from([2, -1, 0.5]),
       beta=st.sampled_from([3, 0, -0.25]))
def test_axpby(queue, p, alpha, beta):
    _elementwise_check(queue, p,
                       lambda ops, mask: ps.axpby(alpha, ops[0], beta, ops[1], mask=mask,
                                                  queue=queue),
                       lambda hosts, dtype: axpby_reference(alpha, hosts[0], beta, hosts[1],
                                                            dtype), (alpha, beta))


def test_profile_sizes():
    """The profile in use, so a log shows how many examples each op ran."""
    assert EXAMPLES >= 20
    print(f"hypothesis profile {os.environ.get('HYPOTHESIS_PROFILE', 'ci')}: "
          f"{EXAMPLES} examples per op")
    assert math.isfinite(EXAMPLES)
