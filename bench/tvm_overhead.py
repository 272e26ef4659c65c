"""The overhead TVM adds over a direct pysparsecl call, for one convolution.

``python -m bench tvm [--layer 0..4] [--batch N] [--rounds N]`` times, in the same run and in
interleaved rounds (bench/timing.py), the wall time of:

- ``direct``: ``pysparsecl.conv2d_sparse`` on NumPy arrays with a prepared
  ``SparseConvWeight`` and a preallocated ``out`` (the best a Python caller can do);
- ``te``: the same layer through a compiled TE PrimFunc built by
  ``pysparsecl.tvm.conv2d_sparse_extern`` (packed call, tensor views, weight-cache lookup
  with its content hash);
- ``callback``: our packed function's Python body called directly on TVM tensors (no
  TVM dispatch), which splits the overhead into ours and TVM's;
- ``relax``: a one-op Relax function on ``relax.VirtualMachine`` (adds output allocation);
- ``offload``: the path a whole network takes: a Relax ``R.nn.conv2d`` on a constant
  weight, rewritten by ``pysparsecl.tvm.offload_sparse_conv2d`` and run on the VM (the
  constant weight is prepared once and found by its token, with no hashing per call).

Both TVM paths copy the input to the OpenCL device and the output back, exactly as the
direct call does, so the difference is TVM's and the callback's own cost.
"""

from __future__ import annotations

import json

import numpy as np

import pysparsecl as ps
from pysparsecl import runtime, tuning
from pysparsecl.testing.cases import RESNET50_LAYERS
from pysparsecl.testing.reference import relative_error

from .timing import interleaved_medians, thread_ms, wall_ms

#: Defaults of the options this suite takes (the driver's are None: "the suite's own").
LAYER, SPARSITY, ROUNDS, BATCH = 0, 0.9, 10, 8


def available() -> bool:
    """Whether apache-tvm can be imported (the suite needs it)."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


def run(layer: int, sparsity: float, rounds: int, out_dir, batch: int = BATCH) -> dict:
    """The suite: writes ``out_dir``/tvm-overhead-<device>.{json,md} and returns the results.
    It runs on the runtime's default queue, the one TVM's packed functions use."""
    try:
        import tvm
        from tvm import relax, te

        import pysparsecl.tvm as pst
    except ImportError:
        raise SystemExit("the tvm suite needs apache-tvm: pip install -e '.[tvm]'") from None

    case = RESNET50_LAYERS[layer].with_(sparsity=sparsity, N=batch)
    rng = np.random.default_rng(0)
    x, w, csr, _ = case.make_inputs(rng)
    queue = runtime.get_queue()
    out_shape = (case.N, case.K) + case.output_hw
    kw = case.kwargs()

    # (a) direct
    weight = ps.SparseConvWeight(csr, case.C, case.kernel, case.groups, queue)
    y_direct = np.empty(out_shape, np.float32)

    def direct():
        ps.conv2d_sparse(x, weight, out=y_direct, **kw)

    # (b) TE extern PrimFunc
    X = te.placeholder(x.shape, "float32", name="x")
    WD = te.placeholder(csr.data.shape, "float32", name="w_data")
    WI = te.placeholder(csr.indices.shape, "int32", name="w_indices")
    WP = te.placeholder(csr.indptr.shape, "int32", name="w_indptr")
    Y = pst.conv2d_sparse_extern(X, WD, WI, WP, **kw)
    f_te = tvm.compile(te.create_prim_func([X, WD, WI, WP, Y]), target="llvm")
    dev = tvm.cpu()
    tx, twd, twi, twp = (tvm.runtime.tensor(a, dev) for a in
                         (x, csr.data, csr.indices, csr.indptr))
    ty = tvm.runtime.tensor(np.empty(out_shape, np.float32), dev)

    def via_te():
        f_te(tx, twd, twi, twp, ty)

    def callback():          # the callback alone, without TVM's dispatch: splits the cost
        pst._conv2d_callback(tx, twd, twi, twp, *pst._conv_scalars(**{
            k: kw[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}), ty)

    # (c) Relax VM
    params = [relax.Var(n, relax.TensorType(a.shape, str(a.dtype))) for n, a in
              (("x", x), ("w_data", csr.data), ("w_indices", csr.indices),
               ("w_indptr", csr.indptr))]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(pst.relax_conv2d_sparse(*params, **kw)))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), dev)
    relax_main = vm["main"]
    y_relax = []

    def via_relax():
        y_relax[:] = [relax_main(tx, twd, twi, twp)]

    # (d) offloaded from a Relax conv2d on a constant weight
    w_oihw = w.reshape(case.K, case.C // case.groups, *case.kernel)
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [xv]):
        with bb.dataflow():
            conv = relax.op.nn.conv2d(xv, relax.const(w_oihw), strides=case.stride,
                                      padding=case.padding, dilation=case.dilation,
                                      groups=case.groups)
            out = bb.emit_output(bb.emit(conv))
        bb.emit_func_output(out)
    decisions = []
    offloaded = pst.offload_sparse_conv2d(bb.get(), decisions=decisions)
    assert [d.offloaded for d in decisions] == [True], decisions
    offload_main = relax.VirtualMachine(tvm.compile(offloaded, target="llvm"), dev)["main"]
    y_offload = []

    def via_offload():
        y_offload[:] = [offload_main(tx)]

    for fn in (direct, via_te, via_relax, via_offload):
        fn()
    ref = case.reference(x, w, None)
    for name, got in (("direct", y_direct), ("te", ty.numpy()), ("relax", y_relax[0].numpy()),
                      ("offload", y_offload[0].numpy())):
        err = relative_error(got, ref)
        assert err < 1e-4, f"{name} result is wrong: relative error {err:.2e}"

    pst.clear_cache()
    paths = {"direct": direct, "callback": callback, "te": via_te, "relax": via_relax,
             "offload": via_offload}
    med = interleaved_medians({name: wall_ms(fn) for name, fn in paths.items()},
                              rounds=rounds, block=5)
    host = interleaved_medians({name: thread_ms(fn) for name, fn in paths.items()},
                               rounds=rounds, block=5)
    assert pst.cache_stats["builds"] <= 1, pst.cache_stats   # the weight was reused

    device = queue.device
    header = (f"device: {device.platform.name.strip()} / {device.name.strip()}; "
              f"tvm {tvm.__version__}; layer: {case.label()}, batch {case.N}, sparsity "
              f"{sparsity:.0%}, nnz {csr.nnz}; medians of {rounds} interleaved "
              "rounds x 5 calls. 'median ms': wall clock; 'host ms': the calling thread's "
              "CPU time (time.thread_time), the host work alone; 'host overhead %': its "
              "excess over direct's, as a share of direct's wall time")
    rows = [dict(path=name, median_ms=med[name], overhead_ms=med[name] - med["direct"],
                 overhead_pct=100 * (med[name] - med["direct"]) / med["direct"],
                 host_ms=host[name],
                 host_overhead_pct=100 * (host[name] - host["direct"]) / med["direct"])
            for name in paths]
    lines = [header, "", "| path | median ms | overhead ms | overhead % | host ms | "
             "host overhead % |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['median_ms']:.3f} | {r['overhead_ms']:.3f} | "
              f"{r['overhead_pct']:.1f}% | {r['host_ms']:.3f} | {r['host_overhead_pct']:.1f}% |"
              for r in rows]
    print("\n".join(lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"tvm-overhead-{tuning.device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text("# TVM overhead over a direct call\n\n"
                                       + "\n".join(lines) + "\n")
    print(f"wrote {stem}.{{json,md}}")
    return {"header": header, "rows": rows}
