"""pysparsecl.tvm.offload_sparse_conv2d: Relax modules whose sparse convolutions (and
linear layers) run as pysparsecl calls, against float64 references (needs apache-tvm;
the torch and ONNX frontend tests also need torch and onnx).

The offloaded calls run on pysparsecl's default OpenCL device.
"""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

import pysparsecl.tvm as pst  # noqa: E402
from pysparsecl.testing.reference import conv2d_reference, relative_error  # noqa: E402

TOL = 1e-4
DEV = tvm.cpu()


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), DEV)


def _run(mod, *inputs):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), DEV)
    out = vm["main"](*[_t(a) for a in inputs])
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()   # a tensor or a tuple


def _ops(mod):
    """The names of the ops and packed functions the module's main function calls."""
    names = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call):
                if v.op == tvm.ir.Op.get("relax.call_dps_packed"):
                    names.append(str(v.args[0].global_symbol))
                elif isinstance(v.op, tvm.ir.Op):
                    names.append(str(v.op.name))
    return names


def _sparse_weight(rng, shape, sparsity):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return w


def _bn_stats(rng, k):
    return (rng.uniform(0.5, 1.5, k).astype(np.float32),          # gamma
            (0.1 * rng.standard_normal(k)).astype(np.float32),    # beta
            (0.1 * rng.standard_normal(k)).astype(np.float32),    # mean
            rng.uniform(0.5, 1.5, k).astype(np.float32))          # var


def _bn_reference(y, stats, eps=1e-5):
    gamma, beta, mean, var = (np.asarray(s, np.float64)[None, :, None, None] for s in stats)
    return (y - mean) / np.sqrt(var + eps) * gamma + beta


class Net:
    """A Relax function built op by op (BlockBuilder), with a float64 reference run
    beside it: each method emits an op and applies it to the reference value."""

    def __init__(self, rng, x_shape, extra_inputs=()):
        self.rng = rng
        self.inputs = [rng.standard_normal(x_shape).astype(np.float32)]
        self.inputs += [rng.standard_normal(s).astype(np.float32) for s in extra_inputs]
        self.params = [relax.Var(f"in{i}", relax.TensorType(a.shape, "float32"))
                       for i, a in enumerate(self.inputs)]
        self.bb = relax.BlockBuilder()
        self._func = self.bb.function("main", self.params)
        self._func.__enter__()
        self._block = self.bb.dataflow()
        self._block.__enter__()
        self.ref = {p: np.asarray(a, np.float64) for p, a in zip(self.params, self.inputs)}

    def emit(self, expr, value):
        var = self.bb.emit(expr)
        self.ref[var] = value
        return var

    def conv(self, x, k, kernel=3, sparsity=0.8, stride=1, padding=1, dilation=1, groups=1,
             weight_var=None):
        c = self.ref[x].shape[1]
        w = _sparse_weight(self.rng, (k, c // groups, kernel, kernel), sparsity)
        expr = relax.op.nn.conv2d(x, relax.const(w) if weight_var is None else weight_var,
                                  strides=stride, padding=padding, dilation=dilation,
                                  groups=groups)
        value = conv2d_reference(self.ref[x], w, None, (stride,) * 2, (padding,) * 2,
                                 (dilation,) * 2, groups)
        return self.emit(expr, value), w

    def bias(self, y):
        k = self.ref[y].shape[1]
        b = self.rng.standard_normal(k).astype(np.float32)
        shaped = self.bb.emit(relax.op.reshape(relax.const(b), (1, k, 1, 1)))
        return self.emit(relax.op.add(y, shaped), self.ref[y] + b[None, :, None, None])

    def batch_norm(self, y, eps=1e-2):   # large enough that a lost eps shows
        stats = _bn_stats(self.rng, self.ref[y].shape[1])
        t = self.bb.emit(relax.op.nn.batch_norm(y, *(relax.const(s) for s in stats), axis=1,
                                                epsilon=eps, training=False))
        return self.emit(relax.TupleGetItem(t, 0), _bn_reference(self.ref[y], stats, eps))

    def add(self, a, b):
        return self.emit(relax.op.add(a, b), self.ref[a] + self.ref[b])

    def relu(self, y):
        return self.emit(relax.op.nn.relu(y), np.maximum(self.ref[y], 0))

    def finish(self, y):
        out = self.bb.emit_output(y)
        self._block.__exit__(None, None, None)
        self.bb.emit_func_output(out)
        self._func.__exit__(None, None, None)
        return self.bb.get(), self.ref[y]


def _offload(mod, **kwargs):
    decisions = []
    return pst.offload_sparse_conv2d(mod, decisions=decisions, **kwargs), decisions


# --------------------------------------------------------------------------- fusion

EPILOGUES = {
    "none": ((), lambda n, y, r: y),
    "bias": (("bias",), lambda n, y, r: n.bias(y)),
    "two_biases": (("bias", "bias"), lambda n, y, r: n.bias(n.bias(y))),
    "relu": (("relu",), lambda n, y, r: n.relu(y)),
    "batch_norm": (("batch_norm",), lambda n, y, r: n.batch_norm(y)),
    "residual": (("residual",), lambda n, y, r: n.add(y, r)),
    "residual_first": (("residual",), lambda n, y, r: n.add(r, y)),
    "bias_bn_residual_relu": (("bias", "batch_norm", "residual", "relu"),
                              lambda n, y, r: n.relu(n.add(n.batch_norm(n.bias(y)), r))),
    "bn_relu": (("batch_norm", "relu"), lambda n, y, r: n.relu(n.batch_norm(y))),
}


@pytest.mark.parametrize("name", list(EPILOGUES))
def test_each_epilogue_is_fused_and_right(rng, name):
    fused, build = EPILOGUES[name]
    net = Net(rng, (2, 6, 9, 7), extra_inputs=[(2, 8, 9, 7)])
    x, res = net.params
    y, _ = net.conv(x, 8)
    mod, ref = net.finish(build(net, y, res))
    new, decisions = _offload(mod)
    assert [(d.offloaded, d.fused) for d in decisions] == [(True, fused)]
    assert _ops(new) == [pst.CONV2D_CONSTANT]          # nothing left beside the call
    assert relative_error(_run(new, *net.inputs), ref) < TOL


CONV_GEOMETRIES = [
    dict(kernel=3, stride=2, padding=1),
    dict(kernel=3, groups=2),
    dict(kernel=3, groups=6, k=12),                     # depthwise, multiplier 2
    dict(kernel=3, dilation=2, padding=2),
    dict(kernel=1, padding=0, stride=2),
    dict(kernel=5, padding=2, sparsity=0.95),
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES,
                         ids=["-".join(f"{k}{v}" for k, v in g.items()) for g in CONV_GEOMETRIES])
def test_conv_geometries_with_odd_sizes(rng, geometry):
    geometry = dict(geometry)
    k = geometry.pop("k", 6)
    net = Net(rng, (3, 6, 11, 13))
    y, _ = net.conv(net.params[0], k, **geometry)
    mod, ref = net.finish(net.relu(net.bias(y)))
    new, decisions = _offload(mod)
    assert [d.offloaded for d in decisions] == [True]
    assert relative_error(_run(new, *net.inputs), ref) < TOL


def test_projection_shortcut_two_convs_one_add(rng):
    """A bottleneck's end: conv3 -> BN and proj -> BN meet in one add and a ReLU.  The
    first conv takes the add; the second conv's (BN-fused) output is its residual."""
    net = Net(rng, (2, 8, 7, 7))
    x = net.params[0]
    a, _ = net.conv(x, 6, kernel=1, padding=0)
    main = net.batch_norm(net.conv(a, 16, kernel=1, padding=0)[0])
    short = net.batch_norm(net.conv(x, 16, kernel=1, padding=0)[0])
    mod, ref = net.finish(net.relu(net.add(main, short)))
    new, decisions = _offload(mod)
    assert [d.fused for d in decisions] == [(), ("batch_norm", "residual", "relu"),
                                            ("batch_norm",)]
    assert _ops(new) == [pst.CONV2D_CONSTANT] * 3
    assert relative_error(_run(new, *net.inputs), ref) < TOL


def test_a_conv_output_used_twice_is_not_fused(rng):
    net = Net(rng, (1, 4, 6, 6))
    y, _ = net.conv(net.params[0], 4)
    mod, ref = net.finish(net.add(net.relu(y), y))      # y feeds the relu and the add
    new, decisions = _offload(mod)
    assert [d.fused for d in decisions] == [()]
    assert sorted(_ops(new)) == sorted([pst.CONV2D_CONSTANT, "relax.nn.relu", "relax.add"])
    assert relative_error(_run(new, *net.inputs), ref) < TOL


def test_training_mode_batch_norm_is_not_folded(rng):
    """A batch_norm with training=True normalises by the batch's own statistics: folding
    its running statistics would be wrong, so it stays a TVM op after the conv."""
    net = Net(rng, (2, 4, 6, 6))
    y, _ = net.conv(net.params[0], 4)
    stats = [relax.const(s) for s in _bn_stats(rng, 4)]
    t = net.bb.emit(relax.op.nn.batch_norm(y, *stats, axis=1, training=True))
    mod, _ = net.finish(net.emit(relax.TupleGetItem(t, 0), None))   # no reference
    new, decisions = _offload(mod)
    assert [d.fused for d in decisions] == [()]
    assert _ops(new) == [pst.CONV2D_CONSTANT, "relax.nn.batch_norm"]


def test_fuse_epilogue_false_keeps_the_ops(rng):
    net = Net(rng, (1, 4, 6, 6))
    y, _ = net.conv(net.params[0], 4)
    mod, ref = net.finish(net.relu(net.batch_norm(y)))
    new, decisions = _offload(mod, fuse_epilogue=False)
    assert [d.fused for d in decisions] == [()]
    assert "relax.nn.batch_norm" in _ops(new) and "relax.nn.relu" in _ops(new)
    assert relative_error(_run(new, *net.inputs), ref) < TOL


# --------------------------------------------------------------------------- left alone

def test_dense_and_sub_threshold_convs_stay_tvm_convs(rng):
    net = Net(rng, (1, 4, 6, 6))
    y, w1 = net.conv(net.params[0], 4, sparsity=0.0)     # dense
    y, w2 = net.conv(y, 4, sparsity=0.3)
    y, w3 = net.conv(y, 4, sparsity=0.9)
    mod, ref = net.finish(y)
    new, decisions = _offload(mod, min_sparsity=0.5)
    assert [d.offloaded for d in decisions] == [False, False, True]
    assert "below min_sparsity 0.5" in decisions[1].reason
    assert decisions[1].sparsity == pytest.approx(np.mean(w2 == 0))
    assert _ops(new) == ["relax.nn.conv2d", "relax.nn.conv2d", pst.CONV2D_CONSTANT]
    assert relative_error(_run(new, *net.inputs), ref) < TOL
    # min_sparsity=0 offloads every conv, the dense one included.
    everything, _ = _offload(mod, min_sparsity=0.0)
    assert _ops(everything) == [pst.CONV2D_CONSTANT] * 3
    assert relative_error(_run(everything, *net.inputs), ref) < TOL


def test_weight_that_is_not_a_constant_is_left_alone_until_bound(rng):
    w = _sparse_weight(rng, (4, 3, 3, 3), 0.8)
    net = Net(rng, (1, 3, 5, 5), extra_inputs=[w.shape])
    net.inputs[1] = w
    net.ref[net.params[1]] = w.astype(np.float64)
    x, wv = net.params
    y, _ = net.conv(x, 4, weight_var=wv)
    net.ref[y] = conv2d_reference(net.inputs[0], w, None, (1, 1), (1, 1))
    mod, ref = net.finish(net.relu(y))
    new, decisions = _offload(mod)
    assert [d.offloaded for d in decisions] == [False]
    assert "not a constant" in decisions[0].reason and "BindParams" in decisions[0].reason
    tvm.ir.assert_structural_equal(new, mod)             # untouched
    bound = relax.transform.BindParams("main", {"in1": _t(w)})(mod)
    new, decisions = _offload(bound)
    assert [d.offloaded for d in decisions] == [True]
    assert relative_error(_run(new, net.inputs[0]), ref) < TOL


def test_unsupported_layout_and_padding_are_left_alone(rng, caplog):
    x = relax.Var("x", relax.TensorType((1, 6, 6, 4), "float32"))
    w_hwio = _sparse_weight(rng, (3, 3, 4, 4), 0.8)
    w_oihw = _sparse_weight(rng, (4, 4, 3, 3), 0.8)
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w_hwio), padding=1,
                                           data_layout="NHWC", kernel_layout="HWIO"))
            y = bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(w_oihw), padding=(1, 0, 0, 1)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    with caplog.at_level("DEBUG", logger="pysparsecl.tvm"):
        new, decisions = _offload(mod)
    assert [d.offloaded for d in decisions] == [False, False]
    assert "layouts" in decisions[0].reason and "asymmetric" in decisions[1].reason
    assert "left as a TVM conv2d" in caplog.text
    tvm.ir.assert_structural_equal(new, mod)


# --------------------------------------------------------------------------- linear

def test_sparse_linear_layers_with_leading_dims(rng):
    x_np = rng.standard_normal((2, 3, 10)).astype(np.float32)
    w = _sparse_weight(rng, (7, 10), 0.8)                # torch's (out, in)
    b = rng.standard_normal(7).astype(np.float32)
    x = relax.Var("x", relax.TensorType(x_np.shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(w), [1, 0]))
            y = bb.emit(relax.op.matmul(x, wt))
            y = bb.emit(relax.op.add(relax.const(b), y))
            y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    new, decisions = _offload(bb.get())
    assert [(d.op, d.fused) for d in decisions] == [("matmul", ("bias", "relu"))]
    ref = np.maximum(x_np.astype(np.float64) @ w.T.astype(np.float64) + b, 0)
    assert relative_error(_run(new, x_np), ref) < TOL
    untouched, decisions = _offload(bb.get(), linear=False)
    assert decisions == [] and pst.CONV2D_CONSTANT not in _ops(untouched)


# --------------------------------------------------------------------------- frontends

def test_small_torch_model_matches_torch_in_float64(rng):
    torch = pytest.importorskip("torch")
    from tvm.relax.frontend.torch import from_exported_program

    from pysparsecl.testing.torch_models import SmallResidualCNN, prunable, prune, randomise
    model = prune(randomise(SmallResidualCNN(), int(rng.integers(2**31))), 0.7)
    x = rng.standard_normal((2, 3, 13, 11)).astype(np.float32)
    exported = torch.export.export(model, (torch.from_numpy(x),))
    mod = from_exported_program(exported, keep_params_as_input=False)
    new, decisions = _offload(mod)
    sparse = len(prunable(model))
    assert sum(d.offloaded for d in decisions) == sparse
    ops = _ops(new)
    assert ops.count(pst.CONV2D_CONSTANT) == sparse
    assert ops.count("relax.nn.conv2d") == 1                     # the dense conv stays
    assert ops.count("relax.nn.batch_norm") == 0                 # folded
    with torch.no_grad():
        ref = model.double()(torch.from_numpy(x).double()).numpy()
    assert relative_error(_run(new, x), ref) < TOL


def test_onnx_model_conv_bias_batchnorm_relu(rng):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from tvm.relax.frontend.onnx import from_onnx
    w = _sparse_weight(rng, (8, 4, 3, 3), 0.75)
    b = rng.standard_normal(8).astype(np.float32)
    stats = _bn_stats(rng, 8)
    inits = [numpy_helper.from_array(a, n) for a, n in
             zip((w, b) + stats, ("W", "B", "g", "b", "m", "v"))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"],
                              epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod = from_onnx(model, keep_params_in_input=False)
    new, decisions = _offload(mod)
    assert [d.fused for d in decisions] == [("bias", "batch_norm", "relu")]
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    ref = np.maximum(_bn_reference(conv2d_reference(x, w, b, (2, 2), (1, 1)), stats), 0)
    assert relative_error(_run(new, x), ref) < TOL
    assert onnx is not None


# --------------------------------------------------------------------------- callback

def test_constant_weights_are_prepared_once(rng):
    net = Net(rng, (1, 4, 6, 6))
    y, _ = net.conv(net.params[0], 4)
    y, _ = net.conv(y, 4)
    mod, ref = net.finish(y)
    new, _ = _offload(mod)
    pst.clear_cache()
    vm = relax.VirtualMachine(tvm.compile(new, target="llvm"), DEV)
    for _ in range(3):
        got = vm["main"](_t(net.inputs[0])).numpy()
        assert relative_error(got, ref) < TOL
    assert pst.constant_stats == {"builds": 2, "hits": 4}


def _constant_call_args(rng, token=None):
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = _sparse_weight(rng, (3, 2 * 9), 0.6)
    import scipy.sparse as sp
    csr = sp.csr_matrix(w)
    arrays = (csr.data, csr.indices.astype(np.int32), csr.indptr.astype(np.int32))
    token = pst.weight_token(*arrays) if token is None else token
    scalars = [3, 3, 1, 1, 1, 1, 1, 1, 1, 0, token]
    return x, w, arrays, scalars


def test_callback_errors_reach_the_caller(rng):
    fn = tvm.get_global_func(pst.CONV2D_CONSTANT)
    x, w, arrays, scalars = _constant_call_args(rng)
    out = _t(np.zeros((1, 3, 5, 5), np.float32))
    fn(_t(x), *(_t(a) for a in arrays), *scalars, out)
    ref = conv2d_reference(x, w.reshape(3, 2, 3, 3), None, (1, 1), (1, 1))
    assert relative_error(out.numpy(), ref) < TOL
    with pytest.raises(ValueError, match="weight_token 12345 is not the token"):
        fn(_t(x), *(_t(a) for a in arrays), *scalars[:-1], 12345, out)
    with pytest.raises(TypeError, match="16 to 18 arguments"):
        fn(_t(x), *(_t(a) for a in arrays), out)
    with pytest.raises(ValueError, match="relu must be 0 or 1"):
        fn(_t(x), *(_t(a) for a in arrays), *scalars[:9], 2, scalars[-1], out)
    with pytest.raises(TypeError, match="x must be float32"):
        fn(_t(x.astype(np.float64)), *(_t(a) for a in arrays), *scalars, out)
    with pytest.raises(ValueError, match="a 1-D bias and/or a 4-D residual"):
        fn(_t(x), *(_t(a) for a in arrays), _t(np.zeros((3, 3), np.float32)), *scalars, out)


def test_callback_error_inside_a_compiled_module(rng):
    """A module calling the packed function with a token that does not match its arrays:
    the VM raises the callback's ValueError, message intact."""
    x, w, arrays, scalars = _constant_call_args(rng, token=7)
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [xv]):
        with bb.dataflow():
            args = [xv, *(relax.const(a) for a in arrays)]
            args += [relax.prim_value(tvm.tirx.IntImm("int64", v)) for v in scalars]
            y = bb.emit(relax.call_dps_packed(pst.CONV2D_CONSTANT, args,
                                              out_ty=relax.TensorType((1, 3, 5, 5),
                                                                      "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with pytest.raises(ValueError, match="weight_token 7 is not the token"):
        _run(bb.get(), x)


def test_offload_rejects_bad_arguments():
    with pytest.raises(TypeError, match="mod must be a tvm.IRModule"):
        pst.offload_sparse_conv2d("main")
    mod = tvm.IRModule()
    with pytest.raises(ValueError, match="min_sparsity must be a number in"):
        pst.offload_sparse_conv2d(mod, min_sparsity=1.5)
    with pytest.raises(TypeError, match="decisions must be a list"):
        pst.offload_sparse_conv2d(mod, decisions=())
    with pytest.raises(TypeError, match="linear must be a bool"):
        pst.offload_sparse_conv2d(mod, linear=1)
