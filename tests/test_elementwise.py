"""add / mul / axpby / add_relu against NumPy, on every working OpenCL device.

Floating-point results are compared with float64 references (within a few ulps of the
result dtype, relative to the operands' magnitude); integer results exactly.
"""

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
from conftest import SAMPLE_WG_LIMIT

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.families import elementwise as ew_family
from pysparsecl.ops import elementwise as ew
from pysparsecl.ops.elementwise import ELEMENTWISE
from pysparsecl.testing.reference import (
    add_reference,
    add_relu_reference,
    axpby_reference,
    mul_reference,
)
from pysparsecl.tuning import override

ALL_DTYPES = [np.float32, np.int32, np.int64, np.float64, np.float16]
EXTENSION = {np.float64: "cl_khr_fp64", np.float16: "cl_khr_fp16"}


def supports(queue, dtype) -> bool:
    ext = EXTENSION.get(np.dtype(dtype).type)
    return ext is None or ext in queue.device.extensions


def need(queue, *dtypes):
    for dtype in dtypes:
        if not supports(queue, dtype):
            pytest.skip(f"device lacks {EXTENSION[np.dtype(dtype).type]}")


def rand(rng, shape, dtype):
    """Fresh random values, never all zeros; ints small enough that products stay exact."""
    dtype = np.dtype(dtype)
    if dtype.kind == "i":
        return rng.integers(-1000, 1000, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * 4).astype(dtype)


def check(result, ref, dtype, scale=None, ulps=2):
    """``result`` has ``dtype`` and matches ``ref`` (exactly for ints, else within ``ulps``
    of the result dtype, relative to ``scale``: the magnitude of what was summed)."""
    result = result.get() if isinstance(result, cl_array.Array) else np.asarray(result)
    ref = np.asarray(ref)
    assert result.dtype == np.dtype(dtype), (result.dtype, dtype)
    assert result.shape == ref.shape, (result.shape, ref.shape)
    if np.dtype(dtype).kind == "i":
        np.testing.assert_array_equal(result, ref)
        return
    got = result.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref)), "NaN pattern differs"
    finite = ~np.isnan(ref)
    scale = np.abs(ref) if scale is None else np.broadcast_to(scale, ref.shape)
    info = np.finfo(dtype)
    bound = ulps * float(info.eps) * scale + float(info.tiny)
    bad = np.abs(got - ref)[finite] > bound[finite]
    assert not bad.any(), f"{bad.sum()} of {bad.size} elements off, e.g. " \
        f"{got[finite][bad][:3]} vs {ref[finite][bad][:3]}"


def f64(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------------------------
# Correctness

SHAPES = [
    ((1000,), (1000,)),                  # contiguous, a multiple of every vector width
    ((4099,), (4099,)),                  # not a multiple: vector tail
    ((3, 1, 5), (4, 1)),                 # broadcasting on both sides
    ((2, 1, 3, 1, 2, 1, 3, 2), (4, 3, 5, 2, 1, 3, 1)),   # rank 8
    ((5, 7), ()),                        # a 0-d array on the right
    ((), (6,)),                          # ... on the left
    ((), ()),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}+{s[1]}")
def test_add_matches_numpy(queue, rng, dtype, shapes):
    need(queue, dtype)
    a, b = rand(rng, shapes[0], dtype), rand(rng, shapes[1], dtype)
    check(ps.add(a, b, queue=queue), add_reference(a, b, dtype), dtype,
          scale=np.abs(f64(a)) + np.abs(f64(b)))


@pytest.mark.parametrize("dtype", [np.float32, np.int64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shapes", SHAPES[1:4], ids=lambda s: f"{s[0]}+{s[1]}")
def test_mul_axpby_add_relu_match_numpy(queue, rng, dtype, shapes):
    a, b = rand(rng, shapes[0], dtype), rand(rng, shapes[1], dtype)
    check(ps.mul(a, b, queue=queue), mul_reference(a, b, dtype), dtype)
    check(ps.add_relu(a, b, queue=queue), add_relu_reference(a, b, dtype), dtype,
          scale=np.abs(f64(a)) + np.abs(f64(b)))
    alpha, beta = (3, -2) if np.dtype(dtype).kind == "i" else (0.75, -1.5)
    check(ps.axpby(alpha, a, beta, b, queue=queue), axpby_reference(alpha, a, beta, b, dtype),
          dtype, scale=abs(alpha) * np.abs(f64(a)) + abs(beta) * np.abs(f64(b)), ulps=3)


@pytest.mark.parametrize("dtype", [np.float32, np.int32], ids=lambda d: np.dtype(d).name)
def test_python_and_numpy_scalars_on_either_side(queue, rng, dtype):
    a = rand(rng, (257,), dtype)
    s = 3 if np.dtype(dtype).kind == "i" else 2.5
    for got, ref in [(ps.add(a, s, queue=queue), add_reference(a, s, dtype)),
                     (ps.add(s, a, queue=queue), add_reference(s, a, dtype)),
                     (ps.mul(np.dtype(dtype).type(s), a, queue=queue), mul_reference(s, a, dtype)),
                     (ps.mul(a, np.array([s], dtype), queue=queue), mul_reference(a, s, dtype))]:
        check(got, ref, dtype, scale=np.abs(f64(a)) + abs(s))
    both = ps.mul(4, 5, queue=queue)
    assert isinstance(both, np.ndarray) and both.shape == () and both == 20
    assert both.dtype == np.result_type(4, 5)


RESULT_TYPES = [
    (np.float32, 2.0, np.float32), (np.int32, 3, np.int32), (np.int32, 0.5, np.float64),
    (np.int32, np.int64, np.int64), (np.int32, np.float32, np.float64),
    (np.float32, np.float64, np.float64), (np.float16, np.float32, np.float32),
    (np.float32, np.float64(2.0), np.float64),
]


@pytest.mark.parametrize("left,right,expected", RESULT_TYPES,
                         ids=[f"{np.dtype(a).name}-{r!r}" for a, r, _ in RESULT_TYPES])
def test_result_dtype_follows_numpy(queue, rng, left, right, expected):
    a = rand(rng, (33,), left)
    b = rand(rng, (33,), right) if isinstance(right, type) else right
    assert np.result_type(a, b) == expected
    if not (supports(queue, left) and supports(queue, expected)
            and (not isinstance(right, type) or supports(queue, right))):
        with pytest.raises(TypeError, match="does not report cl_khr_fp"):
            ps.add(a, b, queue=queue)
        return
    check(ps.add(a, b, queue=queue), add_reference(a, b, expected), expected,
          scale=np.abs(f64(a)) + np.abs(f64(b)))


def test_strong_coefficients_promote_device_arrays(queue, rng):
    """A NumPy float64 coefficient makes axpby of float32 device arrays float64, as NumPy
    would; a Python float does not."""
    x, y = rand(rng, (300,), np.float32), rand(rng, (300,), np.float32)
    x_dev, y_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, y)
    weak = ps.axpby(0.5, x_dev, 2.0, y_dev)
    assert weak.dtype == np.float32
    check(weak, axpby_reference(0.5, x, 2.0, y, np.float32), np.float32,
          scale=0.5 * np.abs(f64(x)) + 2 * np.abs(f64(y)), ulps=3)
    if not supports(queue, np.float64):
        with pytest.raises(TypeError, match="does not report cl_khr_fp64"):
            ps.axpby(np.float64(0.5), x_dev, 2.0, y_dev)
        return
    strong = ps.axpby(np.float64(0.5), x_dev, 2.0, y_dev)
    assert strong.dtype == np.float64
    check(strong, axpby_reference(np.float64(0.5), x, 2.0, y, np.float64), np.float64,
          scale=0.5 * np.abs(f64(x)) + 2 * np.abs(f64(y)), ulps=3)


def test_zero_d_device_arrays(queue, rng):
    x = rand(rng, (4, 33), np.float32)
    s = rand(rng, (), np.float32)
    x_dev, s_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, s)
    got = ps.mul(x_dev, s_dev)
    assert isinstance(got, cl_array.Array)
    check(got, mul_reference(x, s, np.float32), np.float32)
    both = ps.add(s_dev, s_dev)
    assert isinstance(both, cl_array.Array) and both.shape == ()
    check(both, add_reference(s, s, np.float32), np.float32)


@pytest.mark.parametrize("shapes", [((0,), (0,)), ((3, 0, 2), (2,)), ((0, 4), (1, 4)),
                                    ((5, 0), ())], ids=str)
def test_empty_arrays(queue, rng, shapes):
    a, b = rand(rng, shapes[0], np.float32), rand(rng, shapes[1], np.float32)
    expected = np.broadcast_shapes(*shapes)
    got = ps.add(a, b, queue=queue)
    assert isinstance(got, np.ndarray) and got.shape == expected and got.dtype == np.float32
    dev = ps.add(cl_array.to_device(queue, a), b, mask=np.ones(expected, bool))
    assert isinstance(dev, cl_array.Array) and dev.shape == expected


def test_device_arrays_stay_on_device(queue, rng):
    a, b = rand(rng, (50, 40), np.float32), rand(rng, (40,), np.float32)
    a_dev, b_dev = cl_array.to_device(queue, a), cl_array.to_device(queue, b)
    for mixed in [(a_dev, b_dev), (a_dev, b), (a, b_dev)]:
        got = ps.add(*mixed)
        assert isinstance(got, cl_array.Array) and got.queue.context == queue.context
        check(got, add_reference(a, b, np.float32), np.float32)
    views = ps.add(a_dev[3:], a_dev[:-3])  # views that start inside their buffers
    check(views, add_reference(a[3:], a[:-3], np.float32), np.float32)


def test_in_place_aliasing(queue, rng):
    a, b = rand(rng, (1001,), np.float32), rand(rng, (1001,), np.float32)
    # NumPy in, NumPy out (written in place).
    x = a.copy()
    assert ps.add(x, b, out=x, queue=queue) is x
    check(x, add_reference(a, b, np.float32), np.float32)
    # Device arrays: out is one of the inputs, for each op.
    x_dev = cl_array.to_device(queue, a)
    assert ps.mul(b, x_dev, out=x_dev) is x_dev
    check(x_dev, mul_reference(b, a, np.float32), np.float32)
    y_dev = cl_array.to_device(queue, a)
    ps.add_relu(y_dev, y_dev, out=y_dev)
    check(y_dev, add_relu_reference(a, a, np.float32), np.float32)
    z_dev = cl_array.to_device(queue, a)
    ps.axpby(0.5, z_dev, 2.0, b, out=z_dev)
    check(z_dev, axpby_reference(0.5, a, 2.0, b, np.float32), np.float32,
          scale=0.5 * np.abs(f64(a)) + 2 * np.abs(f64(b)))


def test_overlapping_views_give_numpy_semantics(queue, rng):
    """An input that overlaps `out` other than element-for-element is read before any
    write, as NumPy guarantees (the wrapper copies it first)."""
    a = rand(rng, (1000,), np.float32)
    for src, dst in [(slice(0, -1), slice(1, None)), (slice(1, None), slice(0, -1)),
                     (slice(None, None, -1), slice(None))]:
        host = a.copy()
        np.add(host[src], 1.0, out=host[dst])
        dev = cl_array.to_device(queue, a)
        ps.add(dev[src], 1.0, out=dev[dst])
        np.testing.assert_array_equal(dev.get(), host)
    # Two contiguous device operands of out's shape, one a shifted view of out: not the
    # contiguous fast path's in-place case.
    other = rand(rng, (999,), np.float32)
    for src, dst in [(slice(0, -1), slice(1, None)), (slice(1, None), slice(0, -1))]:
        host = a.copy()
        np.multiply(host[src], other, out=host[dst])
        dev = cl_array.to_device(queue, a)
        ps.mul(dev[src], cl_array.to_device(queue, other), out=dev[dst])
        np.testing.assert_array_equal(dev.get(), host)
        host = a.copy()
        np.add(host[dst], host[src], out=host[dst])       # one input is out itself
        dev = cl_array.to_device(queue, a)
        ps.add(dev[dst], dev[src], out=dev[dst])
        np.testing.assert_array_equal(dev.get(), host)
    # A broadcast view of out's own first row, and a transposed view of itself.
    m = rand(rng, (8, 8), np.float32)
    host = m.copy()
    np.add(host[:1], host.T, out=host)
    dev = cl_array.to_device(queue, m)
    ps.add(dev[:1], dev.T, out=dev)
    np.testing.assert_array_equal(dev.get(), host)


@pytest.mark.parametrize("dtype", [np.float32, np.int64], ids=lambda d: np.dtype(d).name)
def test_masks(queue, rng, dtype):
    a, b = rand(rng, (6, 1, 37), dtype), rand(rng, (5, 37), dtype)
    full = rng.random((6, 5, 37)) < 0.5
    ref = add_reference(a, b, dtype)
    zero = np.zeros((), ref.dtype)
    # Without out: 0 where the mask is False.
    for mask in [full, full[:, :1, :], full[0, 0, :]]:
        check(ps.add(a, b, mask=mask, queue=queue), np.where(mask, ref, zero), dtype)
    # With out: its values are kept there (NumPy out and device out; device mask).
    before = rand(rng, (6, 5, 37), dtype)
    out = before.copy()
    assert ps.add(a, b, mask=full, out=out, queue=queue) is out
    check(out, np.where(full, ref, before.astype(ref.dtype)), dtype)
    out_dev = cl_array.to_device(queue, before)
    mask_dev = cl_array.to_device(queue, np.ascontiguousarray(full[:, :1]))
    ps.add(cl_array.to_device(queue, a), b, mask=mask_dev, out=out_dev)
    check(out_dev, np.where(full[:, :1], ref, before.astype(ref.dtype)), dtype)
    # A contiguous same-shape mask takes the vectorised path.
    flat_a, flat_b = rand(rng, (1003,), dtype), rand(rng, (1003,), dtype)
    flat_m = rng.random(1003) < 0.3
    check(ps.mul(flat_a, flat_b, mask=flat_m, queue=queue),
          np.where(flat_m, mul_reference(flat_a, flat_b, dtype), 0), dtype)
    check(ps.mul(flat_a, flat_b, mask=np.True_, queue=queue),
          mul_reference(flat_a, flat_b, dtype), dtype)


def test_non_contiguous_inputs_and_outputs(queue, rng):
    base = rand(rng, (24, 30), np.float32)
    other = rand(rng, (30, 24), np.float32)
    dev, dev_other = cl_array.to_device(queue, base), cl_array.to_device(queue, other)
    views = [(lambda x: x.T, lambda y: y),                             # transposed
             (lambda x: x[::2, 1::3], lambda y: y.T[::2, :10]),        # stepped
             (lambda x: x[::-1, ::-2], lambda y: y.T[::-1, ::-2])]     # negative steps
    for fa, fb in views:
        ref = add_reference(fa(base), fb(other), np.float32)
        check(ps.add(fa(base), fb(other), queue=queue), ref, np.float32)   # NumPy views
        check(ps.add(fa(dev), fb(dev_other)), ref, np.float32)            # device views
    # Strided outputs: a transposed NumPy out and a stepped device out.
    ref = add_reference(base, 1.5, np.float32)
    out_t = np.full((30, 24), np.nan, np.float32).T
    ps.add(base, 1.5, out=out_t, queue=queue)
    check(out_t, ref, np.float32)
    big = cl_array.to_device(queue, np.full((48, 30), np.nan, np.float32))
    ps.add(dev, 1.5, out=big[::2])
    host = big.get()
    check(host[::2], ref, np.float32)
    assert np.isnan(host[1::2]).all()  # untouched rows stay untouched


def test_sizes_around_vector_widths(queue, rng):
    vec = ELEMENTWISE.defaults()["VEC"]
    for n in sorted({1, 2, 3, vec - 1, vec + 1, 2 * vec + 3, 1023, 65537}):
        a, b = rand(rng, (n,), np.float32), rand(rng, (n,), np.float32)
        check(ps.add(a, b, queue=queue), add_reference(a, b, np.float32), np.float32)
        # ... and along a broadcast row (the strided kernel's per-row tail).
        c = rand(rng, (3, 1), np.float32)
        check(ps.add(c, b, queue=queue), add_reference(c, b, np.float32), np.float32)


def test_integer_overflow_wraps_like_numpy(queue, rng):
    for dtype in (np.int32, np.int64):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=999, dtype=dtype)
        b = rng.integers(info.min, info.max, size=999, dtype=dtype)
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(ps.add(a, b, queue=queue), a + b)
            np.testing.assert_array_equal(ps.mul(a, b, queue=queue), a * b)
            np.testing.assert_array_equal(ps.add_relu(a, b, queue=queue),
                                          np.maximum(a + b, 0))


def test_nan_and_inf_propagate(queue, rng):
    a = rand(rng, (64,), np.float32)
    b = rand(rng, (64,), np.float32)
    a[3], a[9], b[20], a[30] = np.nan, np.inf, -np.inf, -np.inf
    with np.errstate(invalid="ignore"):
        for fn, ref in [(ps.add, a + b), (ps.mul, a * b), (ps.add_relu, np.maximum(a + b, 0))]:
            got = fn(a, b, queue=queue)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
            np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])


def test_axpby_broadcasts_and_follows_numpy_types(queue, rng):
    x = rand(rng, (4, 1, 9), np.float32)
    y = rand(rng, (3, 9), np.float32)
    check(ps.axpby(np.float32(1.25), x, -0.5, y, queue=queue),
          axpby_reference(1.25, x, -0.5, y, np.float32), np.float32,
          scale=1.25 * np.abs(f64(x)) + 0.5 * np.abs(f64(y)), ulps=3)
    xi = rand(rng, (100,), np.int32)
    check(ps.axpby(3, xi, -7, 11, queue=queue), axpby_reference(3, xi, -7, 11, np.int32),
          np.int32)


# ---------------------------------------------------------------------------------------------
# Tile configurations, poison, indexing

CONFIGS = ELEMENTWISE.sample(2, seed=4321, max_work_group_size=SAMPLE_WG_LIMIT) + [
    dict(VEC=4, ITEMS=2, WG=256, INTERLEAVE=1)]   # the interleaved (GPU) layout


@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: ",".join(
    f"{k}={v}" for k, v in p.items()))
def test_every_tile_configuration_is_correct(queue, rng, params):
    if ELEMENTWISE.work_group_size(params) > queue.device.max_work_group_size:
        pytest.skip("work-group larger than this device allows")
    n = 3 * params["VEC"] * params["ITEMS"] * params["WG"] + 5   # several groups and a tail
    a, b = rand(rng, (n,), np.float32), rand(rng, (n,), np.float32)
    m = rng.random(n) < 0.5
    x, y = rand(rng, (7, 1, 301), np.float32), rand(rng, (5, 1), np.float32)
    with override("elementwise", **params):
        check(ps.add(a, b, queue=queue), add_reference(a, b, np.float32), np.float32)
        check(ps.add(a, b, mask=m, queue=queue), np.where(m, add_reference(a, b, np.float32), 0),
              np.float32)
        check(ps.add(x, y, queue=queue), add_reference(x, y, np.float32), np.float32)


@pytest.mark.parametrize("shapes,transpose_b", [(((100003,), (100003,)), False),
                                                (((37, 1, 2051), (9, 1)), False),
                                                (((300, 301), (301, 300)), True)], ids=str)
def test_poison_out_is_fully_written(queue, rng, shapes, transpose_b):
    a, b = rand(rng, shapes[0], np.float32), rand(rng, shapes[1], np.float32)
    if transpose_b:
        b = b.T  # an operand strided innermost: the scalar strided kernel
    out_shape = np.broadcast_shapes(a.shape, b.shape)
    out = cl_array.to_device(queue, np.full(out_shape, np.nan, np.float32))
    ps.add(cl_array.to_device(queue, a), b, out=out)
    got = out.get()
    assert not np.isnan(got).any()
    check(got, add_reference(a, b, np.float32), np.float32)


def test_64bit_indexing_path(queue, rng, monkeypatch):
    """Force the 64-bit index kernels on small arrays (the path large arrays take)."""
    monkeypatch.setattr(ew_family, "INDEX32_LIMIT", 1)
    a, b = rand(rng, (4099,), np.float32), rand(rng, (6, 1, 33), np.float32)
    check(ps.add(a, 2.0, queue=queue), add_reference(a, 2.0, np.float32), np.float32)
    check(ps.add(b, b[0, 0], queue=queue), add_reference(b, b[0, 0], np.float32), np.float32)
    check(ps.add(b, b.reshape(6, 33, 1), queue=queue),
          add_reference(b, b.reshape(6, 33, 1), np.float32), np.float32)


def _forbid_enqueueing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was enqueued before the size check")
    for module, name in [(cl_array, "to_device"), (cl_array, "empty"), (runtime, "kernels")]:
        monkeypatch.setattr(module, name, refuse)


def test_above_2gib(queue, monkeypatch):
    """> 2^31 bytes: computed correctly where the device can hold it, else refused with a
    clear error before anything is enqueued."""
    device = queue.device
    n = 2 ** 30 + 2 ** 20 + 2                        # 4 GiB of int32: 64-bit element indices
    nbytes = 4 * n
    if device.max_mem_alloc_size < nbytes or device.global_mem_size < 4 * nbytes:
        # A broadcast NumPy view: 2^31+ bytes of operand without the host memory, and more
        # than the device's largest buffer (PoCL's limit moves with the host's free memory).
        big = np.broadcast_to(np.float32(1.5),
                              (max(2 ** 29, device.max_mem_alloc_size // 4) + 8,))
        _forbid_enqueueing(monkeypatch)
        with pytest.raises(ValueError, match="maximum allocation"):
            ps.add(big, 2.0, queue=queue)
        with pytest.raises(ValueError, match="maximum allocation"):
            ps.add(big.reshape(2, -1), np.float32([[1.0], [2.0]]), queue=queue)
        return
    a = cl_array.arange(queue, 0, n, dtype=np.int32)
    b = cl_array.empty(queue, (n,), np.int32)
    b.fill(np.int32(7))
    starts = [0, n // 2 - 3, n - 1025]          # the last ones lie beyond 2^31 bytes
    results = [(lambda: ps.add(a, b), lambda i: i + 7),                        # contiguous
               (lambda: ps.mul(a, 3), lambda i: (3 * i).astype(np.int32)),     # wraps
               (lambda: ps.add(a.reshape(2, n // 2), np.int32([[5], [-5]])).reshape(n),
                lambda i: i + np.where(i < n // 2, 5, -5))]                   # broadcasting
    for compute, expected in results:
        out = compute()
        for lo in starts:
            idx = np.arange(lo, lo + 1024, dtype=np.int64)
            np.testing.assert_array_equal(out[lo:lo + 1024].get(), expected(idx))
        del out


# ---------------------------------------------------------------------------------------------
# Bad input

def _f(*shape, dtype=np.float32):
    return np.arange(1, 1 + int(np.prod(shape)), dtype=dtype).reshape(shape)


BAD = [
    # (description, call, exception, message fragment)
    ("incompatible shapes", lambda q: ps.add(_f(3, 4), _f(5), queue=q), ValueError,
     "a has shape (3, 4), b has shape (5,)"),
    ("uint8 operand", lambda q: ps.add(_f(3), _f(3, dtype=np.uint8), queue=q), TypeError,
     "b has unsupported dtype uint8"),
    ("bool operand", lambda q: ps.mul(np.ones(3, bool), _f(3), queue=q), TypeError,
     "a has unsupported dtype bool"),
    ("bool scalar", lambda q: ps.add(_f(3), True, queue=q), TypeError, "b is a bool"),
    ("complex scalar", lambda q: ps.add(1j, _f(3), queue=q), TypeError, "a must be a numpy"),
    ("list operand", lambda q: ps.add([1.0, 2.0], _f(2), queue=q), TypeError, "a must be a numpy"),
    ("rank 9", lambda q: ps.add(np.ones((1,) * 9, np.float32), 1.0, queue=q), ValueError,
     "a has 9 dimensions"),
    ("mask wrong shape", lambda q: ps.add(_f(3, 4), 1.0, mask=np.ones((4, 3), bool), queue=q),
     ValueError, "mask with shape (4, 3) cannot be broadcast to the output shape (3, 4)"),
    ("mask would grow output", lambda q: ps.add(_f(4), 1.0, mask=np.ones((2, 4), bool),
                                                queue=q), ValueError, "mask with shape (2, 4)"),
    ("mask not bool", lambda q: ps.add(_f(3), 1.0, mask=np.ones(3, np.int32), queue=q),
     TypeError, "mask must have dtype bool"),
    ("mask list", lambda q: ps.add(_f(3), 1.0, mask=[True, False, True], queue=q), TypeError,
     "mask must be a bool"),
    ("out shape", lambda q: ps.add(_f(3, 4), 1.0, out=np.empty((4, 3), np.float32), queue=q),
     ValueError, "out must have the broadcast shape (3, 4)"),
    ("out dtype", lambda q: ps.add(_f(3), _f(3), out=np.empty(3, np.int32), queue=q), TypeError,
     "out has dtype int32 but the result dtype is float32"),
    ("out read-only", lambda q: ps.add(_f(3), 1.0, out=np.broadcast_to(np.float32(0), (3,)),
                                       queue=q), ValueError, "out is read-only"),
    ("out device for host inputs", lambda q: ps.add(_f(3), 1.0, queue=q,
                                                    out=cl_array.empty(q, (3,), np.float32)),
     TypeError, "out must be a pyopencl.array.Array when an input is one"),
    ("out host for device inputs", lambda q: ps.add(cl_array.to_device(q, _f(3)), 1.0,
                                                    out=np.empty(3, np.float32)),
     TypeError, "out must be a pyopencl.array.Array when an input is one"),
    ("int scalar overflows int32", lambda q: ps.add(_f(3, dtype=np.int32), 2 ** 40, queue=q),
     ValueError, "b=1099511627776 does not fit the result dtype int32"),
    ("alpha not a scalar", lambda q: ps.axpby(_f(3), _f(3), 1.0, _f(3), queue=q), TypeError,
     "alpha must be a real scalar"),
    ("beta overflows", lambda q: ps.axpby(1, _f(3, dtype=np.int32), 2 ** 40, _f(3, dtype=np.int32),
                                          queue=q), ValueError, "beta=1099511627776"),
    ("queue type", lambda q: ps.add(_f(3), 1.0, queue="gpu"), TypeError,
     "queue must be a pyopencl.CommandQueue"),
]


@pytest.mark.parametrize("desc,call,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clearly(queue, desc, call, exc, fragment):
    with pytest.raises(exc) as info:
        call(queue)
    assert fragment in str(info.value), str(info.value)
    # The library stays usable after the error.
    np.testing.assert_array_equal(ps.add(_f(3), 1.0, queue=queue), _f(3) + 1)


def test_queues_from_different_contexts(queue):
    other = cl.CommandQueue(cl.Context([queue.device]))
    a = cl_array.to_device(queue, _f(4))
    b = cl_array.to_device(other, _f(4))
    for kwargs, name in [(dict(a=a, b=b), "b"), (dict(a=b, b=a), "b")]:
        with pytest.raises(ValueError, match=f"^{name} belongs to a different OpenCL context"):
            ps.add(kwargs["a"], kwargs["b"])
    with pytest.raises(ValueError, match="^a belongs to a different OpenCL context"):
        ps.add(a, 1.0, queue=other)
    with pytest.raises(ValueError, match="^mask belongs to a different OpenCL context"):
        ps.add(a, 1.0, mask=cl_array.to_device(other, np.ones(4, bool)))
    with pytest.raises(ValueError, match="^out belongs to a different OpenCL context"):
        ps.add(a, 1.0, out=cl_array.empty(other, (4,), np.float32))


def test_dtype_the_device_lacks_is_refused(queue):
    for dtype in (np.float16, np.float64):
        if supports(queue, dtype):
            continue
        with pytest.raises(TypeError, match=f"does not report {EXTENSION[dtype]}"):
            ps.add(_f(3, dtype=dtype), _f(3, dtype=dtype), queue=queue)

    class NoFp64:  # a stand-in device: the check itself, whatever this device supports
        name = "stand-in"
        extensions = "cl_khr_byte_addressable_store"
    with pytest.raises(TypeError, match="the result dtype .* does not report cl_khr_fp64"):
        ew._check_device_dtype(NoFp64(), np.dtype(np.float64), "the result dtype is")


# ---------------------------------------------------------------------------------------------
# Runtime behaviour

def test_defaults_render_and_build(queue):
    source = runtime.render(
        "elementwise.cl.mako", OP="add", TR="float", PATH="fast", NDIM=1,
        OPERANDS=(("a", "array", "float", "1"), ("b", "array", "float", "1")), MASK=0,
        MASK_INNER="1", OUT_INNER="1", IDX="int", ALIGNED=0, RESTRICT=1,
        ARGS=ew_family.kernel_args, **ELEMENTWISE.defaults())
    assert "pscl_ew_fast" in source
    runtime.build_program(queue.context, source)


def test_events_and_program_cache(queue, rng):
    a = cl_array.to_device(queue, rand(rng, (5000,), np.float32))
    events = []
    ps.add(a, a, events=events)
    assert len(events) == 1
    events[0].wait()
    assert events[0].profile.end >= events[0].profile.start
    builds = runtime.build_count
    ps.add(a, a)
    assert runtime.build_count == builds
