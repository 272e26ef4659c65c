"""pysparsecl.tvm: TE externs and Relax calls against float64 references (needs apache-tvm).

The callbacks run on pysparsecl's default OpenCL device (TVM hands them host tensors).
"""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, te  # noqa: E402

import pysparsecl.tvm as pst  # noqa: E402
from pysparsecl.testing.cases import ConvCase  # noqa: E402
from pysparsecl.testing.reference import (  # noqa: E402
    add_reference,
    masked_matmul_reference,
    mul_reference,
    relative_error,
)

TOL = 1e-4
DEV = tvm.cpu()


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), DEV)


def _shape(tensor):
    return tuple(int(d) for d in tensor.shape)


def _conv_primfunc(case, index_dtype="int32", nnz=None, k=None):
    """A compiled PrimFunc (x, w_data, w_indices, w_indptr, [bias], y) for ``case``."""
    k = case.K if k is None else k
    nnz = 1 if nnz is None else nnz
    X = te.placeholder((case.N, case.C, case.H, case.W), "float32", name="x")
    WD = te.placeholder((nnz,), "float32", name="w_data")
    WI = te.placeholder((nnz,), index_dtype, name="w_indices")
    WP = te.placeholder((k + 1,), index_dtype, name="w_indptr")
    args = [X, WD, WI, WP]
    bias = None
    if case.bias:
        bias = te.placeholder((k,), "float32", name="bias")
        args.append(bias)
    Y = pst.conv2d_sparse_extern(X, WD, WI, WP, bias=bias, **case.kwargs())
    return tvm.compile(te.create_prim_func(args + [Y]), target="llvm"), _shape(Y)


def _csr_tensors(csr, index_dtype="int32"):
    return [_t(csr.data), _t(csr.indices.astype(index_dtype)),
            _t(csr.indptr.astype(index_dtype))]


base = ConvCase(N=2, C=6, H=9, W=11, K=4, sparsity=0.6, bias=True)
CONV_CASES = [
    base,
    base.with_(stride=(2, 2), bias=False),
    base.with_(padding=(0, 2), kernel=(3, 5)),
    base.with_(dilation=(2, 1), stride=(1, 2), padding=(2, 1)),
    base.with_(C=6, K=4, groups=2),
    base.with_(C=4, K=8, groups=4, stride=(2, 2)),                  # depthwise multiplier 2
    base.with_(kernel=(1, 1), padding=(0, 0), N=1, sparsity=0.9),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c.label() for c in CONV_CASES])
def test_te_extern_conv2d_matches_reference(rng, case):
    x, w, csr, bias = case.make_inputs(rng)
    index_dtype = "int64" if case.groups == 2 else "int32"      # both index widths pass
    f, out_shape = _conv_primfunc(case, index_dtype, nnz=csr.nnz)
    ref = case.reference(x, w, bias)
    assert out_shape == ref.shape
    y = _t(np.full(out_shape, np.nan, np.float32))
    args = [_t(x)] + _csr_tensors(csr, index_dtype) + ([_t(bias)] if case.bias else [])
    f(*args, y)
    assert relative_error(y.numpy(), ref) < TOL


def test_relax_model_conv_add_relu_masked_matmul(rng):
    """conv2d_sparse -> add (residual) -> relu -> reshape -> masked_matmul on the VM."""
    case = ConvCase(N=2, C=5, H=7, W=6, K=4, stride=(1, 1), padding=(1, 1), sparsity=0.7,
                    bias=True)
    x, w, csr, bias = case.make_inputs(rng)
    oh, ow = case.output_hw
    feat, n_out = case.K * oh * ow, 9
    res = rng.standard_normal((case.N, case.K, oh, ow), dtype=np.float32)
    lin = rng.standard_normal((feat, n_out), dtype=np.float32)
    mask = rng.random((case.N, n_out)) < 0.5

    def var(name, a):
        return relax.Var(name, relax.TensorType(a.shape, str(a.dtype)))

    inputs = dict(x=x, w_data=csr.data, w_indices=csr.indices, w_indptr=csr.indptr,
                  bias=bias, res=res, lin=lin, mask=mask)
    params = {k: var(k, v) for k, v in inputs.items()}
    p = params
    bb = relax.BlockBuilder()
    with bb.function("main", list(params.values())):
        with bb.dataflow():
            y = bb.emit(pst.relax_conv2d_sparse(p["x"], p["w_data"], p["w_indices"],
                                                p["w_indptr"], bias=p["bias"],
                                                **case.kwargs()))
            y = bb.emit(pst.relax_add(y, p["res"]))
            y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit(relax.op.reshape(y, (case.N, feat)))
            y = bb.emit(pst.relax_masked_matmul(y, p["lin"], p["mask"]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), DEV)
    got = vm["main"](*[_t(v) for v in inputs.values()]).numpy()

    hidden = np.maximum(case.reference(x, w, bias) + res, 0.0).reshape(case.N, feat)
    ref = masked_matmul_reference(hidden, lin, mask)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert relative_error(got, ref) < TOL
    assert np.all(got[~mask] == 0)


@pytest.mark.parametrize("name", ["add", "mul"])
def test_te_extern_elementwise_broadcasts(rng, name):
    a = rng.standard_normal((3, 4, 5), dtype=np.float32)
    b = rng.standard_normal((4, 1), dtype=np.float32)
    A = te.placeholder(a.shape, "float32", name="a")
    B = te.placeholder(b.shape, "float32", name="b")
    C = getattr(pst, f"{name}_extern")(A, B)
    f = tvm.compile(te.create_prim_func([A, B, C]), target="llvm")
    c = _t(np.zeros(_shape(C), np.float32))
    f(_t(a), _t(b), c)
    ref = (add_reference if name == "add" else mul_reference)(a, b, np.float32)
    assert relative_error(c.numpy(), ref) < 1e-6


def test_te_extern_masked_matmul_index_mask(rng):
    x = rng.standard_normal((6, 10), dtype=np.float32)
    w = rng.standard_normal((10, 12), dtype=np.float32)
    mask = np.stack([rng.choice(12, 4, replace=False) for _ in range(6)]).astype(np.int32)
    X, W, M = (te.placeholder(a.shape, str(a.dtype), name=n)
               for a, n in ((x, "x"), (w, "w"), (mask, "mask")))
    Y = pst.masked_matmul_extern(X, W, M)
    assert _shape(Y) == (6, 4)
    f = tvm.compile(te.create_prim_func([X, W, M, Y]), target="llvm")
    y = _t(np.zeros((6, 4), np.float32))
    f(_t(x), _t(w), _t(mask), y)
    assert relative_error(y.numpy(), masked_matmul_reference(x, w, mask)) < TOL


def test_as_numpy_reads_owned_and_borrowed_tensors(rng):
    # Owned (as from the Relax VM): a view of the same memory, no DLPack involved.
    a = rng.standard_normal((3, 4), dtype=np.float32)
    t = _t(a)
    view = pst._as_numpy(t, "t")
    assert view.dtype == np.float32 and view.shape == (3, 4)
    np.testing.assert_array_equal(view, a)
    view[0, 0] = 42.0
    assert t.numpy()[0, 0] == 42.0
    assert pst._as_numpy(_t(np.zeros((0, 3), np.int64)), "e").shape == (0, 3)
    with pytest.raises(TypeError, match="t must be float64"):
        pst._as_numpy(t, "t", [np.float64])
    with pytest.raises(TypeError, match="q must be a tensor"):
        pst._as_numpy([1, 2], "q")
    # Borrowed views (TE call_packed) go through the same path: the TE tests above run it.


def test_device_tensors_are_refused_by_name():
    """A TVM built with OpenCL or CUDA hands device tensors: refused, naming the argument
    (the callbacks move host data to pysparsecl's own device)."""
    class OpenCLDevice:
        def dlpack_device_type(self):
            return 4                       # kDLOpenCL

    class DeviceTensor:
        device, shape, dtype = OpenCLDevice(), (2, 2), "float32"

        def data_ptr(self):
            return 0
    with pytest.raises(ValueError, match="x must be a host \\(CPU\\) tensor"):
        pst._as_numpy(DeviceTensor(), "x")


def test_wrong_dtype_reaches_the_caller_as_type_error(rng):
    case = base.with_(bias=False)
    x, _, csr, _ = case.make_inputs(rng)
    conv = tvm.get_global_func(pst.CONV2D)
    y = _t(np.zeros((case.N, case.K) + case.output_hw, np.float32))
    scalars = [3, 3, 1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        conv(_t(x.astype(np.float64)), *_csr_tensors(csr), *scalars, y)
    with pytest.raises(TypeError, match="w_indices must be int32 or int64, got float32"):
        conv(_t(x), _t(csr.data), _t(csr.indices.astype(np.float32)), _t(csr.indptr),
             *scalars, y)
    with pytest.raises(TypeError, match="14 or 15 arguments"):
        conv(_t(x), *_csr_tensors(csr), 3, 3, y)
    # At build time, the builders refuse wrong dtypes before anything compiles.
    X64 = te.placeholder((1, 2, 3, 3), "float64", name="x")
    D = te.placeholder((1,), "float32", name="d")
    ind = te.placeholder((1,), "int32", name="i")
    with pytest.raises(TypeError, match="data must be float32, got float64"):
        pst.conv2d_sparse_extern(X64, D, ind, ind, kernel_size=1)


@pytest.mark.parametrize("corrupt, message", [
    (lambda d, i, p: i.__setitem__(0, 10**6), r"w_indices must lie in \[0, 54\)"),
    (lambda d, i, p: i.__setitem__(-1, -1), r"w_indices must lie in"),
    (lambda d, i, p: p.__setitem__(-1, p[-1] - 1), r"w_indptr\[-1\] = \d+ but w_indices"),
    (lambda d, i, p: p.__setitem__(0, 1), "w_indptr must start at 0 and never decrease"),
])
def test_malformed_csr_reaches_the_caller_as_value_error(rng, corrupt, message):
    case = base.with_(bias=False)
    x, _, csr, _ = case.make_inputs(rng)
    data, indices, indptr = csr.data.copy(), csr.indices.copy(), csr.indptr.copy()
    corrupt(data, indices, indptr)
    f, out_shape = _conv_primfunc(case, nnz=csr.nnz)
    y = _t(np.zeros(out_shape, np.float32))
    with pytest.raises(ValueError, match=message):
        f(_t(x), _t(data), _t(indices), _t(indptr), y)
    # The process and the integration are still fine afterwards.
    f(_t(x), *_csr_tensors(csr), y)


def test_register_twice_is_harmless_and_foreign_names_are_protected():
    pst.register()
    before = tvm.get_global_func(pst.ADD)
    pst.register()
    pst.register()
    assert tvm.get_global_func(pst.ADD).same_as(before)
    try:
        tvm.register_global_func(pst.ADD, lambda a, b, out: None, override=True)
        with pytest.raises(RuntimeError, match="already registered"):
            pst.register()
    finally:
        pst.register(override=True)
    a = np.arange(6, dtype=np.float32)
    out = _t(np.zeros(6, np.float32))
    tvm.get_global_func(pst.ADD)(_t(a), _t(a), out)
    np.testing.assert_array_equal(out.numpy(), 2 * a)


def test_weight_cache_reuses_and_detects_changed_contents(rng):
    case = base.with_(sparsity=0.5)
    x, w, csr, bias = case.make_inputs(rng)
    f, out_shape = _conv_primfunc(case, nnz=csr.nnz)
    wd, wi, wp = _csr_tensors(csr)
    xt, bt = _t(x), _t(bias)
    y = _t(np.zeros(out_shape, np.float32))
    pst.clear_cache()
    f(xt, wd, wi, wp, bt, y)
    f(xt, wd, wi, wp, bt, y)
    assert pst.cache_stats == {"hits": 1, "builds": 1}
    assert relative_error(y.numpy(), case.reference(x, w, bias)) < TOL

    # A weight update written into the same buffers: same pattern, new values.
    csr2 = csr.copy()
    csr2.data = rng.standard_normal(csr.nnz, dtype=np.float32)
    wd.copyfrom(csr2.data)
    f(xt, wd, wi, wp, bt, y)
    assert pst.cache_stats == {"hits": 1, "builds": 2}
    w2 = csr2.toarray().reshape(w.shape)
    assert relative_error(y.numpy(), case.reference(x, w2, bias)) < TOL
    f(xt, wd, wi, wp, bt, y)
    assert pst.cache_stats == {"hits": 2, "builds": 2}


def test_importing_pysparsecl_does_not_import_tvm():
    import subprocess
    import sys
    code = "import sys, pysparsecl; assert 'tvm' not in sys.modules, 'tvm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
