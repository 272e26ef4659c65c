"""The bad-input catalogue: one table of malformed inputs across every public op, each
with the exception type and message fragment it must produce.  After each one an op must
still work (the library is not left unusable).

Per-op tables elsewhere cover more variants of single ops (tests/test_conv2d_errors.py,
tests/test_masked.py, tests/test_masked_conv.py, tests/test_drs.py,
tests/test_elementwise.py); this one is the cross-op catalogue, plus what they lack:
int32 overflow and buffers above the device's maximum allocation (refused before
anything is enqueued), arrays from another context and used-after-exit queues for every
op, NaN/Inf propagation and empty/zero-size inputs for every op.
"""

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import scipy.sparse as sp

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.testing.reference import (
    conv2d_masked_reference,
    conv2d_reference,
    masked_matmul_backward_reference,
    masked_matmul_reference,
    relu_bn_reference,
)

F = np.float32


def _r(*shape, seed=0, dtype=F):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _csr(k=4, cols=27, seed=0):
    return sp.random(k, cols, density=0.5, format="csr", dtype=F, random_state=seed)


def _csr_with(**arrays):
    bad = _csr().copy()
    for name, value in arrays.items():
        setattr(bad, name, value)
    return bad


def _csr_index(pos, value):
    m = _csr()
    m.indices[pos] = value
    return m


def _csr_indptr_decreasing():
    m = _csr()
    m.indptr[2], m.indptr[3] = m.indptr[3], m.indptr[2] - 1
    return m


def _mask(m=4, n=5):
    return np.random.default_rng(1).random((m, n)) < 0.5


def _idx(rows):
    return np.array(rows, np.int32)


def _bn(y=None, mask=None, c=3, **kw):
    y = _r(2, c, 4, 4) if y is None else y
    mask = np.ones(y.shape, bool) if mask is None else mask
    args = dict(gamma=np.ones(c, F), beta=np.zeros(c, F), mean=np.zeros(c, F),
                var=np.ones(c, F))
    args.update(kw)
    return lambda q: ps.masked_relu_bn(y, mask, args["gamma"], args["beta"], args["mean"],
                                       args["var"], queue=q)


def _big(shape, value=1.0, dtype=F):
    """A huge logical array that costs no memory (a broadcast view)."""
    return np.broadcast_to(np.array(value, dtype), shape)


# (id, call(queue), exception, message fragment)
CATALOGUE = [
    # --- wrong dtype ---
    ("conv2d_sparse x float64", lambda q: ps.conv2d_sparse(_r(1, 3, 5, 5, dtype=np.float64),
                                                           _csr(), queue=q),
     TypeError, "x must have dtype float32"),
    ("masked_matmul x float64", lambda q: ps.masked_matmul(_r(4, 8, dtype=np.float64),
                                                           _r(8, 5), _mask(), queue=q),
     TypeError, "x must have dtype float32"),
    ("masked_matmul mask float", lambda q: ps.masked_matmul(_r(4, 8), _r(8, 5),
                                                            _mask().astype(F), queue=q),
     TypeError, "mask"),
    ("masked_matmul_backward dy int32", lambda q: ps.masked_matmul_backward(
        np.ones((4, 5), np.int32), _r(4, 8), _r(8, 5), _mask(), queue=q),
     TypeError, "dy must have dtype float32"),
    ("masked_relu_bn y float16", _bn(y=_r(2, 3, 4, 4, dtype=np.float16)),
     TypeError, "y must have dtype float32"),
    ("masked_relu_bn gamma float64", _bn(gamma=np.ones(3)), TypeError, "gamma"),
    ("conv2d_masked w int32", lambda q: ps.conv2d_masked(_r(1, 3, 5, 5), np.ones(
        (4, 3, 3, 3), np.int32), np.ones((1, 4, 3, 3), bool), queue=q),
     TypeError, "w must have dtype float32"),
    ("drs_mask x float64", lambda q: ps.drs_mask(_r(4, 8, dtype=np.float64), _r(8, 5), 0.5,
                                                 queue=q),
     TypeError, "x must have dtype float32"),
    ("add complex64", lambda q: ps.add(np.ones(3, np.complex64), np.ones(3, F), queue=q),
     TypeError, "complex64"),
    ("mul bool", lambda q: ps.mul(np.ones(3, bool), np.ones(3, bool), queue=q),
     TypeError, "bool"),
    ("axpby string coefficient", lambda q: ps.axpby("2", np.ones(3, F), 1, np.ones(3, F),
                                                    queue=q),
     TypeError, "alpha"),
    # --- wrong ndim / shape / channels ---
    ("conv2d_sparse x 3-D", lambda q: ps.conv2d_sparse(_r(3, 5, 5), _csr(), queue=q),
     ValueError, "x must be 4-D"),
    ("conv2d_sparse channel mismatch", lambda q: ps.conv2d_sparse(_r(1, 4, 5, 5), _csr(),
                                                                  queue=q),
     ValueError, "columns"),
    ("masked_matmul inner mismatch", lambda q: ps.masked_matmul(_r(4, 8), _r(7, 5), _mask(),
                                                                queue=q),
     ValueError, "8"),
    ("masked_matmul x 3-D", lambda q: ps.masked_matmul(_r(2, 4, 8), _r(8, 5), _mask(),
                                                       queue=q),
     ValueError, "x must be"),
    ("masked_matmul_backward dy shape", lambda q: ps.masked_matmul_backward(
        _r(4, 6), _r(4, 8), _r(8, 5), _mask(), queue=q), ValueError, "dy"),
    ("masked_relu_bn y 1-D", _bn(y=_r(6), mask=np.ones(6, bool)), ValueError,
     "y must be at least 2-D"),
    ("masked_relu_bn mask shape", _bn(mask=np.ones((2, 3, 4, 5), bool)), ValueError,
     "mask must have y's shape"),
    ("masked_relu_bn gamma length", _bn(gamma=np.ones(4, F)), ValueError,
     "gamma must have shape (3,)"),
    ("conv2d_masked channel mismatch", lambda q: ps.conv2d_masked(
        _r(1, 2, 5, 5), _r(4, 3, 3, 3), np.ones((1, 4, 3, 3), bool), queue=q),
     ValueError, "x has 2 channels"),
    ("conv2d_masked mask shape", lambda q: ps.conv2d_masked(
        _r(1, 3, 5, 5), _r(4, 3, 3, 3), np.ones((1, 4, 2, 3), bool), queue=q),
     ValueError, "mask must have shape"),
    ("conv2d_masked empty kernel", lambda q: ps.conv2d_masked(
        _r(1, 3, 5, 5), np.zeros((4, 3, 0, 3), F), np.ones((1, 4, 6, 3), bool), queue=q),
     ValueError, "w must have a kernel of at least 1x1"),
    ("drs_mask inner mismatch", lambda q: ps.drs_mask(_r(4, 8), _r(9, 5), 0.5, queue=q),
     ValueError, "8"),
    ("drs_mask sparsity 1", lambda q: ps.drs_mask(_r(4, 8), _r(8, 5), 1.0, queue=q),
     ValueError, "sparsity must be in [0, 1)"),
    ("drs_mask_conv2d x 2-D", lambda q: ps.drs_mask_conv2d(_r(3, 5), _r(4, 3, 3, 3), 0.5,
                                                           queue=q),
     ValueError, "x must be 4-D"),
    ("add not broadcastable", lambda q: ps.add(np.ones((3, 4), F), np.ones((5,), F),
                                               queue=q),
     ValueError, "broadcast"),
    ("add_relu mask not broadcastable", lambda q: ps.add_relu(
        np.ones((3, 4), F), np.ones((3, 4), F), mask=np.ones((2, 4), bool), queue=q),
     ValueError, "mask"),
    # --- CSR ---
    ("CSR index out of range", lambda q: ps.conv2d_sparse(_r(1, 3, 5, 5),
                                                          _csr_index(3, 27), queue=q),
     ValueError, "w_csr.indices"),
    ("CSR negative index", lambda q: ps.conv2d_sparse(_r(1, 3, 5, 5), _csr_index(0, -1),
                                                      queue=q),
     ValueError, "w_csr.indices"),
    ("CSR indptr decreasing", lambda q: ps.conv2d_sparse(_r(1, 3, 5, 5),
                                                         _csr_indptr_decreasing(), queue=q),
     ValueError, "w_csr.indptr"),
    ("CSR indptr wrong length", lambda q: ps.conv2d_sparse(
        _r(1, 3, 5, 5), _csr_with(indptr=_csr().indptr[:-1]), queue=q),
     ValueError, "w_csr.indptr"),
    ("CSR nnz mismatch", lambda q: ps.conv2d_sparse(
        _r(1, 3, 5, 5), _csr_with(data=_csr().data[:-1]), queue=q), ValueError, "indptr[-1]"),
    ("SparseConvWeight index out of range", lambda q: ps.SparseConvWeight(
        _csr_index(3, 27), in_channels=3, kernel_size=3, queue=q), ValueError,
     "w_csr.indices"),
    # --- index masks (the CSR-like column lists of masked_matmul) ---
    ("idx out of range (backward)", lambda q: ps.masked_matmul_backward(
        _r(4, 2), _r(4, 8), _r(8, 5), _idx([[0, 1], [2, 5], [0, 1], [0, 1]]), queue=q),
     ValueError, "row 1 holds 5"),
    ("idx negative (backward)", lambda q: ps.masked_matmul_backward(
        _r(4, 2), _r(4, 8), _r(8, 5), _idx([[0, 1], [2, 3], [0, -1], [0, 1]]), queue=q),
     ValueError, "must lie in [0, 5)"),
    ("idx duplicate (backward)", lambda q: ps.masked_matmul_backward(
        _r(4, 2), _r(4, 8), _r(8, 5), _idx([[0, 1], [2, 3], [0, 1], [4, 4]]), queue=q),
     ValueError, "repeats column 4 in row 3"),
    # --- zero output size ---
    ("conv2d_sparse zero output size", lambda q: ps.conv2d_sparse(_r(1, 3, 2, 2), _csr(),
                                                                  queue=q),
     ValueError, "output size would be"),
    ("conv2d_masked zero output size", lambda q: ps.conv2d_masked(
        _r(1, 3, 2, 2), _r(4, 3, 3, 3), np.ones((1, 4, 1, 1), bool), queue=q),
     ValueError, "output size would be"),
    # --- invalid queues ---
    ("queue is a string (conv2d_masked)", lambda q: ps.conv2d_masked(
        _r(1, 3, 5, 5), _r(4, 3, 3, 3), np.ones((1, 4, 3, 3), bool), queue="gpu"),
     TypeError, "queue must be a pyopencl.CommandQueue"),
    ("queue is a context (add)", lambda q: ps.add(np.ones(3, F), 1.0, queue=q.context),
     TypeError, "queue must be a pyopencl.CommandQueue"),
    ("queue is a device (masked_relu_bn)", lambda q: _bn()(q.device), TypeError,
     "queue must be a pyopencl.CommandQueue"),
    ("queue is a string (drs_mask)", lambda q: ps.drs_mask(_r(4, 8), _r(8, 5), 0.5,
                                                           queue=1),
     TypeError, "queue must be a pyopencl.CommandQueue"),
]


def _sanity(queue):
    """A call that must work after any bad input."""
    a = np.arange(5, dtype=F)
    np.testing.assert_array_equal(ps.add(a, a, queue=queue), 2 * a)
    x, w, m = _r(4, 8), _r(8, 5), _mask()
    np.testing.assert_allclose(ps.masked_matmul(x, w, m, queue=queue),
                               masked_matmul_reference(x, w, m), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("desc,call,exc,fragment", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue(queue, desc, call, exc, fragment):
    with pytest.raises(exc) as info:
        call(queue)
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert any(f in str(info.value) for f in fragments), f"{desc}: {info.value}"
    _sanity(queue)


# ---------------------------------------------------------------------------------------------
# Limits: int32 index overflow and buffers above the device's maximum allocation are refused
# before anything is enqueued.

def _forbid_enqueueing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was allocated or enqueued before the size check")
    for module, name in [(cl_array, "to_device"), (cl_array, "empty"), (cl_array, "zeros"),
                         (runtime, "kernels")]:
        monkeypatch.setattr(module, name, refuse)


#: On devices with a large maximum allocation (35 GiB on an H200) the same inputs also
#: exceed int32 indexing; either clear refusal is right.
TOO_BIG = ("maximum allocation", "more than int32 indexing allows")


def _limits(q):
    giant = q.device.max_mem_alloc_size // 4 + 1          # float32 elements above the limit
    side = int(np.ceil(np.sqrt(giant)))
    return [
        ("masked_matmul int32 overflow",
         lambda: ps.masked_matmul(_big((2 ** 16, 2 ** 15 + 1)), _big((2 ** 15 + 1, 4)),
                                  _big((2 ** 16, 4), True, bool), queue=q),
         "more than int32 indexing allows"),
        ("drs_mask int32 overflow",
         lambda: ps.drs_mask(_big((2 ** 16, 8)), _big((8, 2 ** 16)), 0.5, queue=q),
         "more than int32 indexing allows"),
        ("masked_matmul above max allocation",
         lambda: ps.masked_matmul(_big((side, side)), _big((side, 4)),
                                  _big((side, 4), True, bool), queue=q),
         TOO_BIG),
        ("masked_matmul_backward above max allocation",
         lambda: ps.masked_matmul_backward(_big((side, 4)), _big((side, side)),
                                           _big((side, 4)), _big((side, 4), True, bool),
                                           queue=q),
         TOO_BIG),
        ("conv2d_sparse above max allocation",
         lambda: ps.conv2d_sparse(_big((1, 3, side, side)), _csr(), queue=q),
         TOO_BIG),
        ("conv2d_masked above max allocation",
         lambda: ps.conv2d_masked(_big((1, 3, side, side)), _r(4, 3, 3, 3),
                                  _big((1, 4, 1, 1), True, bool), queue=q),
         TOO_BIG),
        ("masked_relu_bn above max allocation",
         lambda: ps.masked_relu_bn(_big((side, side)), _big((side, side), True, bool),
                                   np.ones(side, F), np.zeros(side, F), np.zeros(side, F),
                                   np.ones(side, F), queue=q),
         TOO_BIG),
        ("add above max allocation",
         lambda: ps.add(_big((giant,)), 1.0, queue=q), TOO_BIG),
    ]


LIMIT_IDS = ["masked_matmul int32 overflow", "drs_mask int32 overflow",
             "masked_matmul above max allocation",
             "masked_matmul_backward above max allocation",
             "conv2d_sparse above max allocation", "conv2d_masked above max allocation",
             "masked_relu_bn above max allocation", "add above max allocation"]


#: Ops that allocate their output or upload a weight before refusing an input above the
#: device's maximum allocation (the refusal itself is clear; no kernel runs).  Fix: check
#: every host input with check_alloc before allocating or uploading anything.
@pytest.mark.parametrize("which", range(len(LIMIT_IDS)), ids=LIMIT_IDS)
def test_limits_are_refused_before_any_kernel_runs(queue, monkeypatch, which):
    desc, call, fragment = _limits(queue)[which]
    with monkeypatch.context() as mp:
        def refuse(*args, **kwargs):
            raise AssertionError("a kernel was built or launched before the size check")
        mp.setattr(runtime, "kernels", refuse)
        with pytest.raises(ValueError) as info:
            call()
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert any(f in str(info.value) for f in fragments), f"{desc}: {info.value}"
    _sanity(queue)


@pytest.mark.parametrize("which", range(len(LIMIT_IDS)), ids=LIMIT_IDS)
def test_limits_are_refused_before_anything_is_allocated(queue, monkeypatch, which):
    desc, call, fragment = _limits(queue)[which]
    with monkeypatch.context() as mp:
        _forbid_enqueueing(mp)
        with pytest.raises(ValueError) as info:
            call()
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert any(f in str(info.value) for f in fragments), f"{desc}: {info.value}"
    _sanity(queue)


# ---------------------------------------------------------------------------------------------
# Arrays from another OpenCL context, and queues used after their `with` block, for every op

def _device_calls(q, use=None):
    """Every op called with device arrays made on queue q (then bound to ``use`` if given)."""
    d = lambda a: cl_array.to_device(q, a).with_queue(use or q)  # noqa: E731
    return {
        "conv2d_sparse": lambda: ps.conv2d_sparse(d(_r(1, 3, 5, 5)), _csr(), padding=1),
        "masked_matmul": lambda: ps.masked_matmul(d(_r(4, 8)), _r(8, 5), _mask()),
        "masked_matmul_backward": lambda: ps.masked_matmul_backward(
            d(_r(4, 5)), _r(4, 8), _r(8, 5), _mask()),
        "masked_relu_bn": lambda: ps.masked_relu_bn(d(_r(2, 3, 4)), np.ones((2, 3, 4), bool),
                                                    np.ones(3, F), np.zeros(3, F),
                                                    np.zeros(3, F), np.ones(3, F)),
        "conv2d_masked": lambda: ps.conv2d_masked(d(_r(1, 3, 5, 5)), _r(4, 3, 3, 3),
                                                  np.ones((1, 4, 3, 3), bool)),
        "drs_mask": lambda: ps.drs_mask(d(_r(4, 8)), _r(8, 5), 0.5, seed=1),
        "drs_mask_conv2d": lambda: ps.drs_mask_conv2d(d(_r(1, 3, 5, 5)), _r(4, 3, 3, 3), 0.5,
                                                      seed=1),
        "add": lambda: ps.add(d(_r(3, 4)), 1.0),
        "mul": lambda: ps.mul(d(_r(3, 4)), _r(4)),
        "axpby": lambda: ps.axpby(2.0, d(_r(3, 4)), 1.0, _r(3, 4)),
        "add_relu": lambda: ps.add_relu(d(_r(3, 4)), d(_r(3, 4))),
    }


OPS = list(_device_calls(None).keys())


@pytest.mark.parametrize("op", OPS)
def test_array_from_another_context(queue, op):
    other = cl.CommandQueue(cl.Context([queue.device]))
    call = _device_calls(other)[op]
    # the op gets queue=queue explicitly while its device input lives in `other`'s context
    with pytest.raises(ValueError, match="different OpenCL context"):
        _with_queue(call, queue)
    _sanity(queue)


def _with_queue(call, queue):
    """Run ``call`` with every ps op given ``queue=queue``."""
    import pysparsecl
    saved = {}
    try:
        for name in OPS:
            fn = getattr(pysparsecl, name)
            saved[name] = fn
            setattr(pysparsecl, name, (lambda f: lambda *a, **k: f(*a, queue=queue, **k))(fn))
        return call()
    finally:
        for name, fn in saved.items():
            setattr(pysparsecl, name, fn)


_AFTER_EXIT_CHILD = r"""
import sys, warnings
import numpy as np, pyopencl as cl
sys.path.insert(0, sys.argv[1])
import test_bad_inputs as t
import pysparsecl as ps
from pysparsecl import runtime
warnings.simplefilter("ignore")
queue = cl.CommandQueue(cl.Context([runtime.working_devices()[0]]))
for op in t.OPS:
    q = cl.CommandQueue(queue.context)
    with q:
        pass
    print("op", op, flush=True)
    try:
        t._device_calls(queue, use=q)[op]()
    except Exception as exc:  # a clean error is acceptable, a crash is not
        print("raised", type(exc).__name__, str(exc)[:200], flush=True)
    t._sanity(queue)
    print("sane", op, flush=True)
print("all done")
"""


def test_queue_used_after_its_with_block_does_not_crash(queue, tmp_path):
    """Every op on a queue used after its `with` block (pyopencl warns; at the OpenCL level
    the queue may be released), then a normal call on the same context.  In a child process,
    so that a crash is reported instead of killing the test run."""
    import os
    import subprocess
    import sys
    script = tmp_path / "after_exit.py"
    script.write_text(_AFTER_EXIT_CHILD)
    env = dict(os.environ)
    env.setdefault("POCL_CACHE_DIR", str(tmp_path / "pocl-cache"))  # cold: the crashing case
    # The child imports this checkout's pysparsecl, whatever is installed.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "all done" in proc.stdout, (
        f"rc={proc.returncode}; last lines: {proc.stdout.splitlines()[-3:]}")


# ---------------------------------------------------------------------------------------------
# NaN and Inf propagate exactly as in the float64 reference, for every op

def _nan_inf(a, seed=0):
    a = a.copy()
    flat = a.reshape(-1)
    rng = np.random.default_rng(seed)
    pos = rng.choice(flat.size, 3, replace=False)
    flat[pos] = [np.nan, np.inf, -np.inf]
    return a


def _same(got, ref):
    got = got.get() if isinstance(got, cl_array.Array) else np.asarray(got)
    ref = np.asarray(ref)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-4)


def test_nan_inf_masked_matmul_and_backward(queue):
    x, w, m = _nan_inf(_r(4, 8)), _r(8, 5), _mask()
    _same(ps.masked_matmul(x, w, m, queue=queue), masked_matmul_reference(x, w, m))
    idx = _idx([[0, 1], [2, 3], [0, 4], [1, 4]])
    _same(ps.masked_matmul(x, w, idx, queue=queue), masked_matmul_reference(x, w, idx))
    dy = _nan_inf(_r(4, 5), seed=1)
    dx, dw = ps.masked_matmul_backward(dy, _r(4, 8), _r(8, 5), m, queue=queue)
    rdx, rdw = masked_matmul_backward_reference(dy, _r(4, 8), _r(8, 5), m)
    _same(dx, rdx)
    _same(dw, rdw)


def test_nan_inf_masked_relu_bn(queue):
    y = _nan_inf(_r(2, 3, 4, 4))
    mask = np.random.default_rng(2).random(y.shape) < 0.6
    mask.reshape(-1)[np.flatnonzero(~np.isfinite(y.reshape(-1)))[:2]] = True
    g, b, mean = np.ones(3, F), np.zeros(3, F), np.zeros(3, F)
    var = np.ones(3, F)
    _same(ps.masked_relu_bn(y, mask, g, b, mean, var, queue=queue),
          relu_bn_reference(y, mask, g, b, mean, var))
    out, bm, bv = ps.masked_relu_bn(y, mask, g, b, training=True, queue=queue)
    rout, rm, rv = relu_bn_reference(y, mask, g, b)
    _same(bm, rm)
    _same(bv, rv)
    _same(out, rout)


def test_nan_inf_conv2d_masked(queue):
    x, w = _nan_inf(_r(1, 3, 5, 5)), _r(4, 3, 3, 3)
    for mshape in ((1, 4, 5, 5), (1, 4, 1, 1)):
        mask = np.random.default_rng(3).random(mshape) < 0.6
        full = np.broadcast_to(mask, (1, 4, 5, 5))
        _same(ps.conv2d_masked(x, w, mask, padding=1, queue=queue),
              conv2d_masked_reference(x, w, full, (1, 1), (1, 1), (1, 1)))


def test_nan_inf_conv2d_sparse_dense_weights(queue):
    # With a dense (all-nonzero) weight the sparse op must equal the dense reference.
    x, w = _nan_inf(_r(2, 3, 5, 5)), _r(4, 3, 3, 3) + 5.0
    _same(ps.conv2d_sparse(x, sp.csr_matrix(w.reshape(4, -1)), padding=1, queue=queue),
          conv2d_reference(x, w, None, (1, 1), (1, 1), (1, 1), 1))


def test_nan_in_drs_search_ranks_last(queue):
    x, w = _r(3, 8), _r(8, 6)
    w[:, 2] = np.nan
    mask = ps.drs_mask(x, w, 0.5, seed=1, queue=queue)
    assert mask.sum(1).tolist() == [3, 3, 3]
    assert not mask[:, 2].any()                 # NaN scores rank below every number


# ---------------------------------------------------------------------------------------------
# Empty tensors and zero-size batches: a correctly shaped empty (or zero) result

EMPTY = [
    ("conv2d_sparse zero batch",
     lambda q: ps.conv2d_sparse(_r(0, 3, 5, 5), _csr(), padding=1, queue=q), (0, 4, 5, 5)),
    ("conv2d_masked zero batch",
     lambda q: ps.conv2d_masked(_r(0, 3, 5, 5), _r(4, 3, 3, 3), np.ones((0, 4, 5, 5), bool),
                                padding=1, queue=q), (0, 4, 5, 5)),
    ("masked_matmul zero rows",
     lambda q: ps.masked_matmul(_r(0, 8), _r(8, 5), np.ones((0, 5), bool), queue=q), (0, 5)),
    ("masked_matmul_backward zero rows",
     lambda q: ps.masked_matmul_backward(_r(0, 5), _r(0, 8), _r(8, 5), np.ones((0, 5), bool),
                                         queue=q)[1], (8, 5)),
    ("masked_relu_bn zero batch",
     lambda q: ps.masked_relu_bn(_r(0, 3), np.ones((0, 3), bool), np.ones(3, F),
                                 np.zeros(3, F), np.zeros(3, F), np.ones(3, F), queue=q),
     (0, 3)),
    ("drs_mask zero rows", lambda q: ps.drs_mask(_r(0, 8), _r(8, 5), 0.5, seed=1, queue=q),
     (0, 5)),
    ("drs_mask_conv2d zero batch",
     lambda q: ps.drs_mask_conv2d(_r(0, 3, 5, 5), _r(4, 3, 3, 3), 0.5, seed=1, queue=q),
     (0, 4, 3, 3)),
    ("add empty", lambda q: ps.add(np.ones((0, 3), F), np.ones(3, F), queue=q), (0, 3)),
    ("add_relu empty with mask", lambda q: ps.add_relu(np.ones((2, 0), F), 1.0,
                                                       mask=np.ones((2, 0), bool), queue=q),
     (2, 0)),
]


@pytest.mark.parametrize("desc,call,shape", EMPTY, ids=[e[0] for e in EMPTY])
def test_empty_inputs(queue, desc, call, shape):
    result = call(queue)
    result = result.get() if isinstance(result, cl_array.Array) else np.asarray(result)
    assert result.shape == shape
    assert not np.any(result)         # empty, or (a weight gradient over no rows) all zeros
    _sanity(queue)
