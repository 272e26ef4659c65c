"""NumPy/SciPy operands: the kept weights of the card's call and the host-memory paths.

``conv2d_sparse(x, w_csr)`` with a SciPy matrix keeps the prepared weight for the matrix
object and must never serve it stale: every in-place edit of ``data``, ``indices`` or
``indptr`` between calls is seen.  NumPy operands are copied, or lent in place on devices
that share host memory; each way must give the reference result and leave the inputs as
they were.
"""

import gc
import warnings

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import scipy.sparse as sp

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.ops import _common, _prepared, conv2d, masked
from pysparsecl.testing.cases import ConvCase, row_masks
from pysparsecl.testing.reference import (
    conv2d_epilogue_reference,
    conv2d_reference,
    masked_matmul_reference,
    relative_error,
)

CASE = ConvCase(2, 8, 9, 7, 12, sparsity=0.7)
HOST_MODES = ("copy", "map", "in_place")


def _conv(queue, x, csr, **kw):
    return ps.conv2d_sparse(x, csr, padding=1, queue=queue, **kw)


def _check(queue, x, csr, bias=None, into_out=False):
    """The card's call, returning a new array, or (``into_out``) writing a NumPy ``out``,
    which takes the general path; checked against the float64 reference."""
    if into_out:
        out = np.full((x.shape[0], csr.shape[0]) + x.shape[2:], np.nan, np.float32)
        got = _conv(queue, x, csr, bias=bias, out=out)
        assert got is out
    else:
        got = _conv(queue, x, csr, bias=bias)
    w = csr.toarray().reshape(csr.shape[0], CASE.C, 3, 3)
    assert isinstance(got, np.ndarray)
    assert relative_error(got, conv2d_reference(x, w, bias, (1, 1), (1, 1), (1, 1))) < 1e-5


@pytest.fixture
def counted(count_instances):
    """Counts the SparseConvWeights that conv2d_sparse prepares."""
    made = count_instances(conv2d, "SparseConvWeight")
    ps.clear_weight_cache()
    yield made
    ps.clear_weight_cache()


def test_repeated_calls_reuse_the_prepared_weight(queue, rng, counted):
    x, _, csr, _ = CASE.make_inputs(rng)
    for _ in range(5):
        _check(queue, x, csr)
    # Prepared on the first call, snapshotted on the second, served from then on.
    assert len(counted) == 2


@pytest.mark.parametrize("into_out", [False, True], ids=["result", "out"])
@pytest.mark.parametrize("edit", ["data", "indices", "indptr", "data_replaced", "resized"])
def test_in_place_edits_are_never_served_stale(queue, rng, counted, edit, into_out):
    x, _, csr, _ = CASE.make_inputs(rng)
    for _ in range(3):
        _check(queue, x, csr, into_out=into_out)
    if edit == "data":
        csr.data[rng.integers(csr.nnz)] += 1.5
    elif edit == "indices":
        # Move one nonzero of a row to a column that row does not use yet.
        row = int(np.argmax(np.diff(csr.indptr)))
        lo, hi = csr.indptr[row], csr.indptr[row + 1]
        free = np.setdiff1d(np.arange(csr.shape[1]), csr.indices[lo:hi])
        csr.indices[lo] = free[0]
    elif edit == "indptr":
        # Hand the first nonzero of a row to the row before it (nnz unchanged).
        row = int(np.flatnonzero(np.diff(csr.indptr)[1:])[0]) + 1
        csr.indptr[row] += 1
    elif edit == "data_replaced":
        csr.data = csr.data * 2.0
    elif edit == "resized":
        csr.resize((CASE.K - 1, csr.shape[1]))
    made_before = len(counted)
    _check(queue, x, csr, into_out=into_out)
    assert len(counted) == made_before + 1
    _check(queue, x, csr, into_out=into_out)    # the new content is kept in turn


def test_edit_into_a_malformed_matrix_raises_and_recovers(queue, rng):
    x, _, csr, _ = CASE.make_inputs(rng)
    _check(queue, x, csr)
    _check(queue, x, csr)
    good = csr.indices[0]
    csr.indices[0] = csr.shape[1] + 3
    with pytest.raises(ValueError, match="indices"):
        _conv(queue, x, csr)
    csr.indices[0] = good
    _check(queue, x, csr)


def test_collected_matrix_is_forgotten_and_its_id_never_served(queue, rng):
    ps.clear_weight_cache()
    x, _, csr, _ = CASE.make_inputs(rng)
    _check(queue, x, csr)
    _check(queue, x, csr)
    assert len(conv2d._CSR_WEIGHTS) == 1
    old_id = id(csr)
    del csr
    gc.collect()
    assert len(conv2d._CSR_WEIGHTS) == 0
    reused = False
    for _ in range(50):   # CPython hands a freed object's memory to the next one of its kind
        _, _, other, _ = CASE.make_inputs(rng)
        reused = reused or id(other) == old_id
        _check(queue, x, other)
        _check(queue, x, other)
    assert len(conv2d._CSR_WEIGHTS) <= 1


class _Thing:
    """A weak-referencable object with one buffer."""

    def __init__(self, values):
        self.values = values
        self.shape = values.shape


def test_cache_never_serves_a_reused_id():
    cache = _prepared.PreparedCache("test")
    builds = []

    def build(tag):
        builds.append(tag)
        return tag

    first = _Thing(np.arange(4.0))
    for _ in range(3):
        assert cache.get(first, (first.values,), "k", lambda: build("first")) == "first"
    assert builds == ["first", "first"]
    old_id = id(first)
    del first
    assert len(cache) == 0
    for _attempt in range(100):
        second = _Thing(np.arange(4.0))    # the same bytes: only identity tells them apart
        if id(second) == old_id:
            break
    else:
        pytest.skip("CPython did not reuse the id")
    assert cache.get(second, (second.values,), "k", lambda: build("second")) == "second"


def test_cache_stops_snapshotting_an_object_that_always_changes():
    cache = _prepared.PreparedCache("test")
    thing = _Thing(np.zeros(8))
    builds = []
    for step in range(8):
        thing.values[0] = step
        assert cache.get(thing, (thing.values,), "k", lambda: builds.append(step) or step) \
            == step
    assert len(builds) == 8
    assert cache._entry(thing).snapshot is None   # volatile: no copy per call any more
    for _ in range(2):   # once it settles, every call still prepares it (never stale)
        assert cache.get(thing, (thing.values,), "k", lambda: "fresh") == "fresh"


@pytest.mark.parametrize("memcmp", [True, False], ids=["memcmp", "numpy"])
def test_cache_compares_bytes_not_values(monkeypatch, memcmp):
    if not memcmp:   # where ctypes finds no C library: NumPy compares
        monkeypatch.setattr(_prepared, "_MEMCMP", None)
    elif _prepared._MEMCMP is None:
        pytest.skip("ctypes finds no memcmp here")
    cache = _prepared.PreparedCache("test")
    thing = _Thing(np.array([0.0, np.nan, 1.0, 2.0, 3.0], np.float32))
    for _ in range(2):
        cache.get(thing, (thing.values,), "k", lambda: "zero")
    assert cache.get(thing, (thing.values,), "k", lambda: "new") == "zero"   # NaN == NaN
    thing.values[4] = 3.0000002   # the last byte of an odd-sized buffer counts
    assert cache.get(thing, (thing.values,), "k", lambda: "last") == "last"
    cache.get(thing, (thing.values,), "k", lambda: "last")
    thing.values[0] = -0.0
    assert cache.get(thing, (thing.values,), "k", lambda: "negative zero") == "negative zero"


def test_snapshot_follows_the_array_object():
    """A snapshot compares the same array object by its known address (one memcmp), and
    any other array, or the same one re-strided in place, by its current bytes."""
    values = np.arange(16, dtype=np.float32)
    snapshot = _prepared._Snapshot(values)
    assert snapshot.matches(values)
    values[15] = -1.0                                   # edited in place: the fast path
    assert not snapshot.matches(values)
    values[15] = 15.0
    assert snapshot.matches(values.copy())              # another object, the same bytes
    assert not snapshot.matches(values[::-1].copy())
    assert not snapshot.matches(values.reshape(4, 4))   # another shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            values.strides = (0,)                       # every element reads values[0]
        except (AttributeError, TypeError):             # a NumPy that no longer allows it
            return
    assert not snapshot.matches(values)


def test_clear_weight_cache(queue, rng):
    x, _, csr, _ = CASE.make_inputs(rng)
    _check(queue, x, csr)
    _check(queue, x, csr)
    assert len(conv2d._CSR_WEIGHTS) >= 1
    ps.clear_weight_cache()
    assert len(conv2d._CSR_WEIGHTS) == 0
    _check(queue, x, csr)


def test_numpy_weight_of_masked_matmul_is_kept_and_checked(queue, rng):
    x = rng.standard_normal((5, 24), dtype=np.float32)
    w = rng.standard_normal((24, 10), dtype=np.float32)
    mask = row_masks(rng, 5, 10, 3)[0]
    ps.clear_weight_cache()
    for _ in range(3):
        got = ps.masked_matmul(x, w, mask, queue=queue)
        assert relative_error(got, mask * (x.astype(np.float64) @ w)) < 1e-5
    assert len(masked._DENSE_ROWS) == 1
    w[3, 4] += 2.0
    got = ps.masked_matmul(x, w, mask, queue=queue)
    assert relative_error(got, mask * (x.astype(np.float64) @ w)) < 1e-5


def test_numpy_weight_of_conv2d_masked_is_kept_and_checked(queue, rng):
    """A NumPy weight is packed once and served while its bytes are unchanged; an edit in
    place is seen on the next call."""
    from pysparsecl.testing.reference import conv2d_masked_reference
    x = rng.standard_normal((2, 5, 7, 6), dtype=np.float32)
    w = rng.standard_normal((4, 5, 3, 3), dtype=np.float32)
    mask = rng.random((2, 4, 7, 6)) < 0.5
    ps.clear_weight_cache()

    def check():
        got = ps.conv2d_masked(x, w, mask, 1, 1, queue=queue)
        assert relative_error(got, conv2d_masked_reference(x, w, mask, (1, 1), (1, 1))) < 1e-5
    for _ in range(3):
        check()
    assert len(masked._PACKED_CONV_WEIGHTS) == 1
    w[2, 1, 0, 2] += 3.0
    check()


# ---------------------------------------------------------------------------------------
# The host-memory paths: copied, lent and mapped, lent and read in place

@pytest.fixture(params=HOST_MODES)
def host_mode(request, queue):
    device = queue.device
    if request.param != "copy" and not runtime.shares_host_memory(device):
        pytest.skip("the device does not share host memory")
    if request.param == "in_place" and not runtime.kernels_use_host_memory(device):
        pytest.skip("the device's kernels do not work in lent memory itself")
    runtime.set_host_memory_mode(device, request.param)
    yield request.param
    runtime.set_host_memory_mode(device, None)


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` that starts 4 bytes past a 128-byte boundary."""
    raw = np.empty(a.nbytes + 256, np.uint8)
    start = (-raw.ctypes.data % 128) + 4
    view = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    view[...] = a
    return view


#: Operands below and above runtime.STAGING_MAX_BYTES (staged, or lent in place).
SIZES = {"small": CASE, "large": ConvCase(2, 40, 40, 40, 48, sparsity=0.8)}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_conv2d_host_paths(queue, rng, host_mode, aligned, size):
    case = SIZES[size].with_(bias=True)
    assert (case.N * case.C * case.H * case.W * 4 > runtime.STAGING_MAX_BYTES) == \
        (size == "large")
    x, w, csr, bias = case.make_inputs(rng)
    if not aligned:
        x, bias = _misaligned(x), _misaligned(bias)
    x_before, bias_before = x.copy(), bias.copy()
    for _ in range(3):
        got = _conv(queue, x, csr, bias=bias)
        assert relative_error(got, conv2d_reference(x, w, bias, (1, 1), (1, 1), (1, 1))) < 1e-5
    assert np.array_equal(x, x_before) and np.array_equal(bias, bias_before)
    out = np.full_like(got, np.nan)
    assert _conv(queue, x, csr, bias=bias, out=out) is out
    assert relative_error(out, conv2d_reference(x, w, bias, (1, 1), (1, 1), (1, 1))) < 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_conv2d_numpy_out_overlapping_its_operands(queue, rng, host_mode, size):
    """A NumPy ``out``, written in place where the kernels work in host memory unless it
    overlaps an operand (see the next test): each case gives the reference's answer."""
    case = SIZES[size].with_(K=SIZES[size].C, bias=True)       # out has x's shape
    x, w, csr, bias = case.make_inputs(rng)
    ref = conv2d_reference(x, w, bias, (1, 1), (1, 1), (1, 1))
    # An out that starts off the device's base alignment.
    out = _misaligned(np.zeros_like(x))
    assert _conv(queue, x, csr, bias=bias, out=out) is out
    assert relative_error(out, ref) < 1e-5
    # The residual is out itself.
    residual = rng.standard_normal(x.shape, dtype=np.float32)
    expected = conv2d_epilogue_reference(ref, residual, relu=True)
    out = residual
    assert _conv(queue, x, csr, bias=bias, residual=residual, activation="relu",
                 out=out) is out
    assert relative_error(out, expected) < 1e-5
    # out starts half-way into x's memory.
    raw = np.empty(x.size + x.size // 2, np.float32)
    x_view = raw[:x.size].reshape(x.shape)
    x_view[...] = x
    out = raw[x.size // 2:].reshape(x.shape)
    _conv(queue, x_view, csr, bias=bias, out=out)
    assert relative_error(out, ref) < 1e-5


def test_lent_memory_reused_with_new_contents(queue, rng, host_mode):
    """Calls that lend the same x and out again, with new values in them (as TVM's
    planned storage does): every call computes from the values it was given."""
    case = SIZES["large"].with_(bias=False)
    x, w, csr, _ = case.make_inputs(rng)
    weight = ps.SparseConvWeight(csr, case.C, 3, queue=queue)
    out = np.empty((case.N, case.K) + case.output_hw, np.float32)
    for step in range(3):
        x[...] = rng.standard_normal(x.shape, dtype=np.float32)
        out[...] = np.nan
        assert _conv(queue, x, weight, out=out) is out
        ref = conv2d_reference(x, w, None, (1, 1), (1, 1), (1, 1))
        assert relative_error(out, ref) < 1e-5, step
    if host_mode == "in_place":            # the kept buffers served the later calls
        start = x.__array_interface__["data"][0]
        lead = start % runtime.base_alignment(queue.device)
        assert any(key[1] == start - lead for key in runtime._lent)


def test_lent_buffers_are_kept_per_address_range(queue):
    host = np.zeros(4096, np.uint8)
    start = host.__array_interface__["data"][0]
    flags = cl.mem_flags.USE_HOST_PTR | cl.mem_flags.READ_ONLY
    a = runtime._lent_buffer(queue.context, start, 1024, flags)
    assert runtime._lent_buffer(queue.context, start, 1024, flags) is a
    assert runtime._lent_buffer(queue.context, start, 2048, flags) is not a
    assert runtime._lent_buffer(queue.context, start + 64, 1024, flags) is not a


def test_staging_pairs_are_kept_per_shape_and_follow_a_grown_buffer(queue):
    runtime.release_staging()
    dev, view = runtime.staging(queue, "t", (5, 3), np.float32)
    assert runtime.staging(queue, "t", [5, 3], np.float32)[0] is dev   # made once
    other, other_view = runtime.staging(queue, "t", (15,), np.float32)
    assert other is not dev and np.shares_memory(view, other_view)  # one buffer per slot
    view[...] = 7.0
    np.testing.assert_array_equal(dev.get(), view)
    big, big_view = runtime.staging(queue, "t", (4096,), np.float32)  # the buffer grows
    again, again_view = runtime.staging(queue, "t", (5, 3), np.float32)
    assert again is not dev and again.base_data is big.base_data
    assert np.shares_memory(again_view, big_view) and not np.shares_memory(again_view, view)
    runtime.release_staging()
    assert runtime.staging(queue, "t", (5, 3), np.float32)[0] is not again


def test_realign_stages_large_operands_off_a_cache_line(queue, rng, host_mode):
    """A large operand that an op asks to realign (the masked GEMM's x) is lent as it is
    when it starts on a cache line, and copied into a staging buffer otherwise; an op
    that does not ask lends it misaligned."""
    x = rng.standard_normal((400, 300), dtype=np.float32)   # past the staging size
    lined = runtime.aligned_empty(x.shape, np.float32, 64)
    lined[...] = x
    for a in (lined, _misaligned(x)):
        got = _common.to_device(a, queue, "x", borrow=True, realign=True)
        np.testing.assert_array_equal(got.get(), x)
        stage = runtime.staging(queue, "x", x.shape, x.dtype)[0].base_data
        staged = host_mode == "in_place" and a is not lined
        assert (got.base_data.int_ptr == stage.int_ptr) == staged
        if host_mode != "copy":
            assert getattr(got, "lent_host", None) is (None if staged else a)
            assert _common.to_device(a, queue, "x", borrow=True).lent_host is a


def test_small_masked_vmm_results_are_the_callers_own(queue, rng, host_mode):
    """Consecutive NumPy VMM calls stage x, the mask and the result in the same thread
    buffers: each result is its own array with its own call's values."""
    k, n = 300, 200
    w = rng.standard_normal((k, n), dtype=np.float32)
    weight = ps.MaskedLinearWeight(w, queue=queue)
    calls = [(rng.standard_normal(k, dtype=np.float32), row_masks(rng, 1, n, 40)[0][0])
             for _ in range(3)]
    results = [ps.masked_matmul(x, weight, mask, queue=queue) for x, mask in calls]
    for (x, mask), got in zip(calls, results):
        assert relative_error(got, mask * (x.astype(np.float64) @ w)) < 1e-5
    assert not np.shares_memory(results[0], results[1])


def test_only_an_out_apart_from_the_operands_is_lent():
    raw = np.zeros(1000, np.float32)
    x, out = raw[:400], raw[500:]
    assert _common._lendable(out, (x, None))
    assert not _common._lendable(raw[300:], (x, None))            # overlaps x
    assert not _common._lendable(out, (None, raw[900:]))          # overlaps the residual
    assert not _common._lendable(raw[500::2], (x,))               # strided
    read_only = raw[500:].copy()
    read_only.flags.writeable = False
    assert not _common._lendable(read_only, (x,))


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_masked_ops_host_paths(queue, rng, host_mode, aligned, m):
    k, n = 400, 240    # at M = 300, x, mask, dy, dx and dw are past the staging size
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    mask = row_masks(rng, m, n, 50)[0]
    dy = rng.standard_normal((m, n), dtype=np.float32)
    if not aligned:
        x, mask, dy = _misaligned(x), _misaligned(mask), _misaligned(dy)
    saved = [a.copy() for a in (x, mask, dy)]
    weight = ps.MaskedLinearWeight(w, queue=queue)
    y = ps.masked_matmul(x, weight, mask, queue=queue)
    assert relative_error(y, mask * (x.astype(np.float64) @ w)) < 1e-5
    dx, dw = ps.masked_matmul_backward(dy, x, weight, mask, queue=queue)
    g = mask * dy.astype(np.float64)
    assert relative_error(dx, g @ w.T) < 1e-5
    assert relative_error(dw, x.T.astype(np.float64) @ g) < 1e-5
    proj = ps.SparseRandomProjection(d=k, seed=1, queue=queue)
    got = ps.drs_mask(x, w, 0.5, projection=proj, queue=queue)
    want = ps.drs_mask(cl_array.to_device(queue, np.ascontiguousarray(x)), w, 0.5,
                       projection=proj, queue=queue).get()
    assert np.array_equal(got, want)
    for a, before in zip((x, mask, dy), saved):
        assert np.array_equal(a, before)


@pytest.mark.parametrize("shape", [(33, 65), (301, 257)], ids=["small", "large"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_elementwise_host_paths(queue, rng, host_mode, aligned, shape):
    a = rng.standard_normal(shape, dtype=np.float32)
    b = rng.standard_normal(shape, dtype=np.float32)
    if not aligned:
        a, b = _misaligned(a), _misaligned(b)
    saved = a.copy(), b.copy()
    np.testing.assert_array_equal(ps.add(a, b, queue=queue), a + b)
    np.testing.assert_array_equal(ps.add_relu(a, b[0], queue=queue), np.maximum(a + b[0], 0))
    out = np.empty_like(a)
    assert ps.mul(a, b, out=out, queue=queue) is out
    np.testing.assert_array_equal(out, a * b)
    assert ps.add(a, b, out=a, queue=queue) is a        # in place, into a lent input
    np.testing.assert_array_equal(a, saved[0] + saved[1])
    c = ps.add(b, 1.0, queue=queue)   # staged inputs and results of consecutive calls
    d = ps.add(b, 2.0, queue=queue)
    np.testing.assert_array_equal(c, b + 1.0)
    np.testing.assert_array_equal(d, b + 2.0)
    np.testing.assert_array_equal(b, saved[1])


def test_results_are_the_callers_own(queue, rng, host_mode):
    x, _, csr, _ = CASE.make_inputs(rng)
    got = _conv(queue, x, csr)
    again = _conv(queue, x, csr)    # a small result is staged: each call's is its own
    assert got is not again and not np.shares_memory(got, again)
    assert got.flags.c_contiguous and got.flags.writeable
    got[...] = 0   # the caller's to change: no device still writes it
    assert again.any() and _conv(queue, x, csr).any()


def test_large_results_reuse_only_memory_nothing_refers_to(queue, rng, host_mode):
    """A large NumPy result is written in place into memory kept from an earlier result
    (runtime.result_empty): never one the caller still holds, through the result itself
    or a view of it, and always with the new call's values."""
    case = SIZES["large"]
    x, w, csr, _ = case.make_inputs(rng)
    x2 = rng.standard_normal(x.shape).astype(np.float32)
    ref, ref2 = case.reference(x, w, None), case.reference(x2, w, None)
    first = _conv(queue, x, csr)
    second = _conv(queue, x2, csr)               # first is alive: new memory
    assert not np.shares_memory(first, second)
    row = first[1, 3]                            # a view keeps first's memory
    del first
    gc.collect()
    third = _conv(queue, x2, csr)
    assert not np.shares_memory(row, third) and not np.shares_memory(second, third)
    np.testing.assert_allclose(row, ref[1, 3], rtol=1e-4, atol=1e-4)
    address = third.__array_interface__["data"][0]
    del third
    gc.collect()
    fourth = _conv(queue, x, csr)                # third's memory is free: taken again
    if host_mode == "in_place":   # (mapped, a buffer holds the memory a while longer)
        assert fourth.__array_interface__["data"][0] == address
    for got, want in ((row, ref[1, 3]), (second, ref2), (fourth, ref)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(24, 30), (400, 300)], ids=["small", "large"])
def test_strided_operands_lent_as_temporaries_outlive_the_call(queue, rng, host_mode, size):
    """A strided NumPy operand is lent as a contiguous copy made for the call: the copy must
    live until the kernels have read it, also when its memory range was lent before (a
    small operand is then lent, not staged) and whatever the allocator does meanwhile."""
    base = rng.standard_normal(size).astype(np.float32)
    other = rng.standard_normal(size[::-1]).astype(np.float32)
    views = [lambda a: a.T, lambda a: a[::-1, ::-2].T, lambda a: a[1::2].T]
    for _ in range(3):
        for view in views:
            x, y = view(base), view(other.T)
            got = ps.add(x, y, queue=queue)
            np.testing.assert_allclose(got, x.astype(np.float64) + y, rtol=1e-6)


def test_set_host_memory_mode_rejects_unknown_modes(queue):
    with pytest.raises(ValueError, match="mode"):
        runtime.set_host_memory_mode(queue.device, "zero")


def test_in_place_probe_decides_per_device_type(queue):
    device = queue.device
    runtime.set_host_memory_mode(device, None)
    if not device.type & cl.device_type.CPU:
        assert not runtime.kernels_use_host_memory(device)
    else:
        assert runtime.kernels_use_host_memory(device) == runtime._probe_in_place(device)


def test_cache_checks_identity_even_if_an_entry_outlived_its_object():
    # As if a weak reference's callback had not run yet when a new object took the id.
    cache = _prepared.PreparedCache("test")
    first, second = _Thing(np.arange(4.0)), _Thing(np.arange(4.0))
    for _ in range(2):
        cache.get(first, (first.values,), "k", lambda: "first")
    cache._entries[id(second)] = cache._entries.pop(id(first))
    assert cache.get(second, (second.values,), "k", lambda: "second") == "second"


def test_repeated_calls_into_one_out_array_hold_one_event(queue, rng):
    """An op that writes a reused ``out=`` array leaves it one event, the one that waited
    for all before it: a growing list makes pyopencl's add_event wait on the host every
    fourth call.  Results stay right throughout."""
    x = rng.standard_normal((6, 40), dtype=np.float32)
    w = rng.standard_normal((40, 30), dtype=np.float32)
    mask = rng.random((6, 30)) < 0.4
    x_dev, mask_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, mask)
    weight = ps.MaskedLinearWeight(w, queue=queue)
    y = cl_array.empty(queue, (6, 30), np.float32)
    y4 = cl_array.to_device(queue, rng.standard_normal((2, 3, 4, 5), dtype=np.float32))
    m4 = cl_array.to_device(queue, rng.random((2, 3, 4, 5)) < 0.5)
    g, b, mean = (rng.standard_normal(3, dtype=np.float32) for _ in range(3))
    var = rng.random(3, dtype=np.float32) + 0.5
    bn_out = cl_array.empty_like(y4)
    xc = cl_array.to_device(queue, rng.standard_normal((1, 2, 5, 5), dtype=np.float32))
    wc = rng.standard_normal((3, 2, 3, 3), dtype=np.float32)
    conv_out = cl_array.empty(queue, (1, 3, 5, 5), np.float32)
    conv_mask = cl_array.to_device(queue, rng.random((1, 3, 5, 5)) < 0.5)
    drs_out = cl_array.empty(queue, (6, 30), np.bool_)
    proj = ps.SparseRandomProjection(40, k=8, seed=1, queue=queue)
    csr = sp.csr_matrix(np.where(rng.random((3, 18)) < 0.5, 1.0, 0.0).astype(np.float32))
    sparse_out = cl_array.empty(queue, (1, 3, 5, 5), np.float32)
    add_out = cl_array.empty_like(x_dev)
    for _ in range(20):
        ps.masked_matmul(x_dev, weight, mask_dev, out=y)
        ps.masked_relu_bn(y4, m4, g, b, mean, var, out=bn_out)
        ps.conv2d_masked(xc, wc, conv_mask, padding=1, out=conv_out)
        ps.drs_mask(x_dev, w, 0.5, projection=proj, out=drs_out)
        ps.conv2d_sparse(xc, csr, kernel_size=3, padding=1, out=sparse_out)
        ps.add(x_dev, x_dev, out=add_out)
    for name, arr in (("masked_matmul", y), ("masked_relu_bn", bn_out),
                      ("conv2d_masked", conv_out), ("drs_mask", drs_out),
                      ("conv2d_sparse", sparse_out), ("add", add_out)):
        assert len(arr.events) == 1, (name, len(arr.events))
    assert relative_error(y.get(), masked_matmul_reference(x, w, mask)) < 1e-4
    assert relative_error(sparse_out.get(), conv2d_reference(
        xc.get(), csr.toarray().reshape(3, 2, 3, 3), None, padding=(1, 1))) < 1e-4
