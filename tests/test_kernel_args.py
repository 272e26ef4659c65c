"""Typed kernel arguments (pysparsecl.kernel_args): one declaration renders the C
parameter list and packs the launch arguments by name; disagreements raise, naming the
kernel and the argument."""

import itertools

import numpy as np
import pyopencl.array as cl_array
import pytest
from mako.lookup import TemplateLookup

from pysparsecl import runtime
from pysparsecl.families import (
    conv2d_csr,
    conv2d_pack_flat,
    conv2d_pack_rows,
    drs_fused,
    drs_project,
    drs_project_split,
    drs_scores,
    drs_topk,
    drs_topk_team,
)
from pysparsecl.families import elementwise as ew_family
from pysparsecl.kernel_args import (
    KernelArgError,
    KernelArgs,
    Pointer,
    Scalar,
    Signature,
    kernel_params,
)
from pysparsecl.ops import conv2d
from pysparsecl.ops import drs as drs_op
from pysparsecl.ops import elementwise as ew

AXPB = Signature("pscl_test_axpb", (
    Pointer("y", "float", const=False, restrict=True), Scalar("off", np.int64),
    Scalar("n", np.int32), Scalar("a", np.float32), Pointer("x", "float")))

AXPB_TEMPLATE = """\
__kernel void pscl_test_axpb(${ARGS["pscl_test_axpb"]})
{
    const int i = get_global_id(0);
    if (i < n)
        y[off + i] = a * x[i] + 1.0f;
}
"""
# The same kernel with its parameters written by hand, n and off swapped.
HAND_WRITTEN = """\
__kernel void pscl_test_axpb(__global float *restrict y, const int n, const long off,
                             const float a, __global const float *x)
{
    const int i = get_global_id(0);
    if (i < n)
        y[off + i] = a * x[i] + 1.0f;
}
"""


def _tokens(text):
    return [" ".join(p.split()) for p in text.split(",")]


@pytest.fixture
def templates(tmp_path, monkeypatch):
    """Templates of the tests' own, looked up before the package's."""
    (tmp_path / "axpb.cl.mako").write_text(AXPB_TEMPLATE)
    (tmp_path / "hand.cl.mako").write_text(HAND_WRITTEN)
    monkeypatch.setattr(runtime, "_lookup", TemplateLookup(
        directories=[str(tmp_path), str(runtime.kernel_dir())], strict_undefined=True))
    return tmp_path


def _axpb(queue):
    return runtime.kernels(queue.context, "axpb.cl.mako", ("pscl_test_axpb",),
                           ARGS=KernelArgs(AXPB))["pscl_test_axpb"]


# ---------------------------------------------------------------------------------------------
# (a) The rendered signature is the declaration

def test_c_text_of_each_kind():
    assert Pointer("x", "float").c() == "__global const float *x"
    assert Pointer("y", np.int32, const=False, restrict=True).c() == \
        "__global int *restrict y"
    assert Scalar("n", np.uint32).c() == "const uint n"
    assert _tokens(AXPB.c_params()) == [
        "__global float *restrict y", "const long off", "const int n", "const float a",
        "__global const float *x"]


def _check_rendered(source, args):
    found = kernel_params(source)
    assert sorted(found) == sorted(s.kernel for s in args)
    for sig in args:
        assert _tokens(found[sig.kernel]) == [a.c() for a in sig.args], sig.kernel


@pytest.mark.parametrize("lanes", [0, 1, 32])
@pytest.mark.parametrize("batch", [0, 1])
def test_conv2d_rendered_signatures_are_declared(lanes, batch):
    pack = (conv2d_pack_rows.template_values(dict(PACK_LANES=lanes)) if lanes else
            conv2d_pack_flat.template_values(conv2d_pack_flat.SPEC.defaults()))
    params = dict(conv2d.CONV2D_CSR.defaults(), **pack, BATCH_LAYOUT=batch)
    args = conv2d.template_args(params, has_bias=True, residual=True)
    _check_rendered(runtime.render("conv2d_csr.cl.mako", **args), args["ARGS"])
    assert args["ARGS"].signature("pscl_pack_input") is \
        (conv2d_csr.PACK_FLAT_ARGS if lanes == 0 else conv2d_csr.PACK_ROWS_ARGS)


@pytest.mark.parametrize("path,ndim,mask,op", [
    ("fast", 1, 0, "add"), ("fast", 1, 2, "axpby"), ("strided", 3, 1, "mul"),
    ("strided", 2, 0, "copy")])
def test_elementwise_rendered_signature_is_declared(path, ndim, mask, op):
    operands = (("a", "array", "float", "n" if path == "strided" else "1"),)
    if op != "copy":
        operands += (("b", "scalar", "float", "0"),)
    params = dict(ew.ELEMENTWISE.defaults(), OP=op, TR="float", PATH=path, NDIM=ndim,
                  OPERANDS=operands, MASK=mask, MASK_INNER="1", OUT_INNER="1",
                  IDX="long", ALIGNED=0, RESTRICT=1)
    args = ew_family.kernel_args(params)
    _check_rendered(runtime.render(ew_family.TEMPLATE, ARGS=ew_family.kernel_args, **params),
                    args)
    names = args.signature(f"pscl_ew_{path}").names
    assert ("a_s0" in names) == (path == "strided")
    assert ("m" in names) == bool(mask) and ("pscl_alpha" in names) == (op == "axpby")


def _drs_variants():
    """(family, template, template arguments) of every DRS kernel variant, each over a
    sample of its tile configurations."""
    forms = [dict(compact=c, plane=p) for c in (False, True) for p in (False, True)]
    for family, variants in ((drs_project, [dict(transposed=t) for t in (False, True)]),
                             (drs_project_split, [dict(transposed=t) for t in (False, True)]),
                             (drs_scores, [{}]),
                             (drs_fused, [dict(k_pad=k) for k in (16, 64, 256)]),
                             (drs_topk, forms), (drs_topk_team, forms)):
        for params in family.SPEC.sample(3, seed=7):
            for variant in variants:
                yield (family.SPEC.family, family.TEMPLATE,
                       family.template_args(params, **variant))
    for params in drs_project.SPEC.sample(3, seed=7):
        yield "windows", drs_project.TEMPLATE, drs_project.windows_template_args(params)
    yield "util", "drs_util.cl.mako", dict(KIND="util", ARGS=drs_op.PAD_TRANSPOSE_ARGS)


def test_drs_rendered_signatures_are_declared():
    """Every DRS kernel, in every variant (output forms, transposed, windows, K_PAD) and a
    sample of tile configurations, renders exactly its declared parameter list."""
    seen = set()
    for family, template, args in _drs_variants():
        assert isinstance(args["ARGS"], KernelArgs), family
        _check_rendered(runtime.render(template, **args), args["ARGS"])
        seen.add((family, tuple(s.kernel for s in args["ARGS"])))
    assert {kernels for _, kernels in seen} == {
        ("pscl_drs_project",), ("pscl_drs_conv_project",), ("pscl_drs_scores",),
        ("pscl_drs_fused",), ("pscl_drs_topk",), ("pscl_drs_pad_transpose",)}
    # The output's form changes the top-k kernel's parameters; the team kernel's are the same.
    sig = drs_topk.kernel_args
    assert "P" in sig(False, True).signature("pscl_drs_topk").names
    assert "P" not in sig(False, False).signature("pscl_drs_topk").names
    assert sig(True, True) == sig(True, False) != sig(False, False)
    assert drs_topk_team.template_args({}, compact=True)["ARGS"] is sig(True, False)


# ---------------------------------------------------------------------------------------------
# (b) Packing by name: a missing, extra, misnamed or wrongly typed argument raises

VALUES = dict(y="Y", off=np.int64(0), n=np.int32(3), a=np.float32(2), x="X")


def test_pack_orders_by_declaration():
    assert AXPB.pack(dict(reversed(list(VALUES.items())))) == tuple(VALUES.values())


@pytest.mark.parametrize("change,match", [
    (lambda v: v.pop("n"), "argument 'n' is missing"),
    (lambda v: v.update(m=np.int32(1)), "no argument 'm'"),
    (lambda v: v.update(N=v.pop("n")), "argument 'n' is missing"),
])
def test_pack_refuses_missing_extra_and_misnamed(change, match):
    values = dict(VALUES)
    change(values)
    with pytest.raises(KernelArgError, match=f"pscl_test_axpb.*{match}"):
        AXPB.pack(values)


def test_declaration_refuses_bad_names_and_types():
    with pytest.raises(KernelArgError, match="'n' declared twice"):
        Signature("k", (Scalar("n", np.int32), Scalar("n", np.int64)))
    with pytest.raises(KernelArgError, match="C identifier"):
        Scalar("2n", np.int32)
    with pytest.raises(KernelArgError, match="no OpenCL C scalar type"):
        Scalar("b", np.bool_)
    with pytest.raises(KernelArgError, match="unknown OpenCL element type"):
        Pointer("p", "float5")


def test_locked_kernel_checks_types_by_declaration(queue, templates):
    kern = _axpb(queue)
    x = cl_array.to_device(queue, np.arange(4, dtype=np.float32))
    y = cl_array.zeros(queue, 5, np.float32)
    good = dict(y=y.data, off=np.int64(1), n=np.int32(4), a=np.float32(2), x=x.data)
    kern.launch(queue, (4,), None, good)
    np.testing.assert_array_equal(y.get(), [0, 1, 3, 5, 7])
    for name, bad in [("off", np.int32(1)), ("n", 4), ("a", np.float64(2)), ("x", x),
                      ("y", np.int64(0))]:
        with pytest.raises(KernelArgError, match=f"pscl_test_axpb: argument '{name}' must be"):
            kern.launch(queue, (4,), None, dict(good, **{name: bad}))
        with pytest.raises(KernelArgError, match=f"argument '{name}'"):   # positionally too
            kern(queue, (4,), None, *AXPB.pack(dict(good, **{name: bad})))
    with pytest.raises(KernelArgError, match="takes 5 arguments"):
        kern(queue, (4,), None, *AXPB.pack(good)[:4])
    with pytest.raises(KernelArgError, match="no argument 'z'"):
        kern.launch(queue, (4,), None, dict(good, z=np.int32(0)))
    kern.launch(queue, (4,), None, dict(good, off=np.int64(0), a=np.float32(-1)))
    np.testing.assert_array_equal(y.get(), [1, 0, -1, -2, 7])


def test_bound_kernel_binds_and_launches_by_name(queue, templates):
    kern = _axpb(queue)
    x = cl_array.to_device(queue, np.arange(4, dtype=np.float32))
    y = cl_array.zeros(queue, 6, np.float32)
    bound = runtime.BoundKernel.bind(kern, free=("y", "off"), n=np.int32(4),
                                     a=np.float32(3), x=x.data)
    bound.launch(queue, (4,), None, off=np.int64(2), y=y.data)   # any order
    np.testing.assert_array_equal(y.get(), [0, 0, 1, 4, 7, 10])
    # Python binds the names: each error names the kernel and the argument.
    with pytest.raises(TypeError, match=r"pscl_test_axpb\(\) missing .*'off'"):
        bound.launch(queue, (4,), None, y=y.data)
    with pytest.raises(TypeError, match=r"pscl_test_axpb\(\) got an unexpected .*'n'"):
        bound.launch(queue, (4,), None, y=y.data, off=np.int64(0), n=np.int32(4))
    with pytest.raises(TypeError, match=r"pscl_test_axpb\(\) got an unexpected .*'offset'"):
        bound.launch(queue, (4,), None, y=y.data, offset=np.int64(0))
    with pytest.raises(KernelArgError, match="argument 'off' must be a numpy.int64"):
        bound.launch(queue, (4,), None, y=y.data, off=np.int32(0))
    with pytest.raises(KernelArgError, match="argument 'y' must be a pyopencl buffer"):
        bound.launch(queue, (4,), None, y=y, off=np.int64(0))


def test_bind_refuses_missing_extra_misnamed_and_mistyped(queue, templates):
    kern = _axpb(queue)
    x = cl_array.to_device(queue, np.arange(4, dtype=np.float32))
    fixed = dict(n=np.int32(4), a=np.float32(3), x=x.data)
    bind = runtime.BoundKernel.bind
    with pytest.raises(KernelArgError, match="pscl_test_axpb: argument 'a' is missing"):
        bind(kern, free=("y", "off"), n=fixed["n"], x=fixed["x"])
    with pytest.raises(KernelArgError, match="pscl_test_axpb has no argument 'b'"):
        bind(kern, free=("y", "off"), b=np.float32(0), **fixed)
    with pytest.raises(KernelArgError, match="pscl_test_axpb has no argument 'offset'"):
        bind(kern, free=("y", "offset"), **fixed)
    with pytest.raises(KernelArgError, match="argument 'n' must be a numpy.int32"):
        bind(kern, free=("y", "off"), **dict(fixed, n=np.int64(4)))
    with pytest.raises(KernelArgError, match="'x' given both"):
        bind(kern, free=("y", "off", "x"), **fixed)


# ---------------------------------------------------------------------------------------------
# (c) A template that disagrees with its declaration cannot build

def test_hand_written_parameters_are_refused_before_building(queue, templates):
    before = runtime.build_count
    with pytest.raises(KernelArgError, match=r"pscl_test_axpb: the template's parameter 1 "
                                             r"is 'const int n' but the declaration says "
                                             r"'const long off'"):
        runtime.kernels(queue.context, "hand.cl.mako", ("pscl_test_axpb",),
                        ARGS=KernelArgs(AXPB))
    assert runtime.build_count == before


@pytest.mark.parametrize("source,match", [
    (HAND_WRITTEN, "parameter 1 is 'const int n'"),
    (HAND_WRITTEN.replace("const long off", "const int off").replace(
        "const int n, const int off", "const long off, const int n"), "nothing"),
    (HAND_WRITTEN.replace("pscl_test_axpb", "pscl_other"), "pscl_other.*not declare"),
    ("", "declared but the rendered template does not define it"),
    (AXPB_TEMPLATE.replace('${ARGS["pscl_test_axpb"]}', AXPB.c_params()) + "\n"
     + HAND_WRITTEN, "defined twice"),
])
def test_check_source_names_the_disagreement(source, match):
    if "nothing" in match:   # a parameter short: the declaration has one more
        source = source.replace(", __global const float *x", "")
        match = "parameter 4 is 'missing' but the declaration says '__global const float"
    with pytest.raises(KernelArgError, match=match):
        KernelArgs(AXPB).check_source(source)


def test_check_source_accepts_the_declared_list_however_spaced():
    spaced = AXPB_TEMPLATE.replace(
        '${ARGS["pscl_test_axpb"]}',
        "__global float*restrict y,const long off ,\n const int n, // count\n"
        "const float a, __global const float * x")
    KernelArgs(AXPB).check_source(spaced)


def test_built_kernel_with_other_arity_is_refused(queue):
    source = HAND_WRITTEN.replace(", __global const float *x", "").replace("x[i]", "1.0f")
    program = runtime.build_program(queue.context, source)
    with pytest.raises(KernelArgError, match="built with 4 arguments but is declared "
                                             "with 5"):
        runtime.LockedKernel(program, "pscl_test_axpb", AXPB)


def test_conv2d_plan_launches_by_name(queue, rng):
    """The convolution's plan binds its kernels by name: a launch with a misnamed free
    argument is refused, naming the kernel, before anything is set."""
    import scipy.sparse as sp
    w = sp.random(4, 3 * 9, density=0.5, format="csr", dtype=np.float32, random_state=1)
    weight = conv2d.SparseConvWeight(w, 3, 3, queue=queue)
    x = cl_array.to_device(queue, rng.standard_normal((2, 3, 5, 5), dtype=np.float32))
    conv2d.conv2d_sparse(x, weight, padding=1)
    plan = next(iter(weight._plans.values()))
    for bound, free in ((plan.pack, ("x", "x_offset", "xpack")),
                        (plan.conv, ("xpack", "bias", "out", "out_offset", "residual",
                                     "res_offset"))):
        assert tuple(bound.locked.signature.names[i] for i in bound.free) == free
    with pytest.raises(TypeError, match=r"pscl_pack_input\(\) missing .*'x_offset'"):
        plan.pack.launch(queue, *plan.pack_sizes, x=x.base_data, xpack=x.base_data)


def test_kernel_args_is_hashable_and_compares_by_declaration():
    again = Signature("pscl_test_axpb", tuple(AXPB.args))
    assert KernelArgs(AXPB) == KernelArgs(again)
    assert hash(KernelArgs(AXPB)) == hash(KernelArgs(again))
    assert len({KernelArgs(AXPB), KernelArgs(again)}) == 1
    assert KernelArgs(AXPB) != KernelArgs(Signature("pscl_test_axpb", tuple(
        itertools.islice(AXPB.args, 4))))
