"""Runtime: device probing, template rendering, the program cache, parameter lookup."""

import json
import re

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

from pysparsecl import runtime, tuning
from pysparsecl.ops.conv2d import CONV2D_CSR, template_args
from pysparsecl.params import (
    SPECS,
    Constraint,
    InvalidParamsError,
    ParamSpec,
    TileParam,
    parse_overrides,
)


def test_probe_accepts_working_device(queue):
    assert runtime.probe_device(queue.device) is None


def test_broken_device_is_skipped_with_a_warning(monkeypatch):
    devices = runtime.working_devices(warn=False)
    assert devices, "no working OpenCL device"
    victim = devices[0]
    real = runtime._cached_probe
    monkeypatch.setattr(runtime, "_cached_probe",
                        lambda d: "simulated build failure" if d == victim else real(d))
    # The name is escaped: device names hold regex characters ("Intel(R) Xeon(R)").
    expected = "skipping OpenCL device " + re.escape(repr(victim.name.strip()))
    with pytest.warns(RuntimeWarning, match=expected):
        remaining = runtime.working_devices()
    assert victim not in remaining


@pytest.mark.filterwarnings("ignore::pyopencl.CommandQueueUsedAfterExit")
def test_queue_found_open_is_refused_once_its_with_block_ends(queue):
    """A queue found open is not tested again until some queue's `with` block ends: the
    end of its own block must still make the next call refuse it, on the op's repeated
    (fast) path too."""
    import scipy.sparse as sp

    import pysparsecl as ps
    q = cl.CommandQueue(queue.context)
    rng = np.random.default_rng(3)
    weight = ps.SparseConvWeight(sp.random(4, 9, density=0.5, random_state=rng,
                                           format="csr", dtype=np.float32), 1, 3, queue=q)
    x = cl_array.to_device(q, rng.standard_normal((1, 1, 5, 5)).astype(np.float32))
    for _ in range(2):   # the second call takes the repeated path
        ps.conv2d_sparse(x, weight)
        assert runtime.get_queue(q) is q
    q.finish()
    with q:
        pass
    with pytest.raises(ValueError, match="released"):
        runtime.get_queue(q)
    with pytest.raises(ValueError, match="released"):
        ps.conv2d_sparse(x, weight)
    other = cl.CommandQueue(queue.context)   # other queues are still served
    assert runtime.get_queue(other) is other


def test_list_devices_reports_limits():
    infos = runtime.list_devices()
    assert any(info.works for info in infos)
    for info in infos:
        assert info.max_work_group_size > 0 and info.name


def test_build_failure_carries_the_log(queue):
    with pytest.raises(runtime.KernelBuildError) as info:
        runtime.build_program(queue.context, "__kernel void broken(__global float *y) "
                                             "{ y[0] = undefined_name; }")
    assert "undefined_name" in info.value.build_log
    # The runtime still builds and caches good programs afterwards.
    src = "__kernel void ok(__global float *y) { y[0] = 1.0f; }"
    first = runtime.build_program(queue.context, src)
    count = runtime.build_count
    assert runtime.build_program(queue.context, src) is first
    assert runtime.build_count == count
    assert runtime.build_program(queue.context, src, ("-cl-fast-relaxed-math",)) is not first


def test_render_is_strict():
    with pytest.raises(NameError):
        runtime.render("conv2d_csr.cl.mako", VEC=4)  # the other parameters are undefined
    params = CONV2D_CSR.defaults()
    assert "#define PSCL_VEC %d" % params["VEC"] in runtime.render(
        "conv2d_csr.cl.mako", **template_args(params, has_bias=True))


def test_param_spec_checks_names_and_constraints():
    spec = ParamSpec("demo", (TileParam("A", 2, (1, 2, 4), "a"), TileParam("B", 1, (1, 2), "b")),
                     (Constraint("a_times_b_small", lambda p: p["A"] * p["B"] <= 4, "doc"),),
                     work_group_size=lambda p: p["A"] * 64)
    assert spec.check({"B": 2}) == {"A": 2, "B": 2}
    with pytest.raises(InvalidParamsError, match="unknown tile parameter"):
        spec.check({"C": 1})
    with pytest.raises(InvalidParamsError, match="a_times_b_small"):
        spec.check({"A": 4, "B": 2})
    with pytest.raises(InvalidParamsError, match="work_group_size<=128"):
        spec.check({"A": 4, "B": 1}, max_work_group_size=128)
    assert {tuple(c.values()) for c in spec.candidates()} == {(1, 1), (1, 2), (2, 1), (2, 2),
                                                              (4, 1)}
    with pytest.raises(ValueError, match="not among its candidates"):
        TileParam("X", 3, (1, 2), "x")


def test_overrides_env_and_context(queue, monkeypatch):
    assert parse_overrides("conv2d_csr:VEC=4, PIX_VECS=2;other:A=1") == {
        "conv2d_csr": {"VEC": 4, "PIX_VECS": 2}, "other": {"A": 1}}
    with pytest.raises(InvalidParamsError):
        parse_overrides("conv2d_csr:VEC")
    monkeypatch.setenv("PYSPARSECL_PARAMS", "conv2d_csr:VEC=2")
    assert tuning.lookup(CONV2D_CSR, queue.device)["VEC"] == 2
    with tuning.override("conv2d_csr", VEC=4):
        assert tuning.lookup(CONV2D_CSR, queue.device)["VEC"] == 4
    monkeypatch.setenv("PYSPARSECL_PARAMS", "conv2d_csr:NOPE=2")
    with pytest.raises(InvalidParamsError, match="NOPE"):
        tuning.lookup(CONV2D_CSR, queue.device)


def test_override_that_clashes_with_the_database_entry(queue, monkeypatch):
    """A partial override completes with the database entry; where the two together break
    a constraint, with the spec defaults instead (warned); an override invalid on its own
    still raises."""
    from pysparsecl.ops.masked import MASKED_GEMM_TILED as TILED
    kind = runtime.device_kind(queue.device)
    entry = TILED.check(dict(TILE=128, TILE_M=64, WG=256, DENSE=35, UNITS=4))
    monkeypatch.setattr(tuning, "_shipped", {"masked_gemm_tiled": {kind: {"params": entry}}})
    monkeypatch.setattr(tuning, "_memo", {})
    monkeypatch.setattr(tuning, "read_user_database", lambda device: {})
    assert tuning.lookup(TILED, queue.device) == entry
    with tuning.override("masked_gemm_tiled", UNITS=2):        # fits the entry: completed
        assert tuning.lookup(TILED, queue.device) == dict(entry, UNITS=2)
    with tuning.override("masked_gemm_tiled", GROUP=8):        # 4 units x 8: too many sums
        with pytest.warns(RuntimeWarning, match="accumulators_fit_registers"):
            got = tuning.lookup(TILED, queue.device)
    assert got == TILED.check(dict(GROUP=8)) and got["UNITS"] == 1 and got["TILE"] == 64
    with tuning.override("masked_gemm_tiled", TILE=128, TILE_M=128, WG=128, DENSE=25):
        with pytest.raises(InvalidParamsError, match="staging_fits_registers"):
            tuning.lookup(TILED, queue.device)


def test_corrupt_database_entry_is_ignored(queue, monkeypatch, tmp_path):
    kind = runtime.device_kind(queue.device)
    monkeypatch.setattr(tuning, "_shipped", {"conv2d_csr": {kind: {"params": {"VEC": 3}}}})
    monkeypatch.setattr(tuning, "_memo", {})
    with pytest.warns(RuntimeWarning, match="ignoring tuning entry"):
        assert tuning.lookup(CONV2D_CSR, queue.device) == CONV2D_CSR.defaults()
    bad_file = tmp_path / "shipped.json"
    bad_file.write_text("{not json")
    monkeypatch.setattr(tuning, "_DATABASE", bad_file)
    monkeypatch.setattr(tuning, "_shipped", None)
    monkeypatch.setattr(tuning, "_memo", {})
    with pytest.warns(RuntimeWarning, match="unreadable tuning database"):
        assert tuning.lookup(CONV2D_CSR, queue.device) == CONV2D_CSR.defaults()


def test_shipped_database_entries_are_valid():
    data = json.loads(tuning._DATABASE.read_text())
    assert set(data) <= set(SPECS), set(data) - set(SPECS)
    for family, entries in data.items():
        for entry in entries.values():
            # An entry may hold per-class entries alone (a family a device only uses on
            # some shape classes).
            assert "params" in entry or entry.get("shapes"), (family, entry)
            SPECS[family].check(entry.get("params", {}))
            for per_class in (entry.get("shapes") or {}).values():
                SPECS[family].check(per_class["params"])



def test_device_local_memory_limit_drops_configurations():
    from pysparsecl.families import masked_gemm_tiled
    from pysparsecl.ops.masked import MASKED_GEMM, MASKED_GEMM_TILED
    tiled = dict(TILE=128, TILE_M=128, KC=32, GROUP=4, UNITS=1, WG=512, SPLITK=4)
    need = masked_gemm_tiled.local_bytes(MASKED_GEMM_TILED.check(tiled))
    assert MASKED_GEMM_TILED.check(tiled, max_local_memory=need)["TILE"] == 128
    with pytest.raises(InvalidParamsError, match="local_memory<="):
        MASKED_GEMM_TILED.check(tiled, max_local_memory=need - 1)
    MASKED_GEMM.check({}, max_local_memory=0)      # the CPU kernel uses none


def test_kernel_declares_scalar_kinds_on_first_call_and_holds_to_them(queue):
    src = ("__kernel void axpb(__global float *y, const long off, const int n, const float a,"
           " const uint b) { int i = get_global_id(0); if (i < n) y[off + i] = a * i + b; }")
    kern = runtime.LockedKernel(runtime.build_program(queue.context, src), "axpb")
    y = cl_array.zeros(queue, 10, np.float32)
    kern(queue, (8,), None, y.data, np.int64(2), np.int32(7), np.float32(1.5), np.uint32(3))
    expected = np.zeros(10, np.float32)
    expected[2:9] = 1.5 * np.arange(7) + 3
    np.testing.assert_array_equal(y.get(), expected)
    # The declared kinds are the first call's: another kind is the caller's bug, not a
    # value for pyopencl to convert silently.
    with pytest.raises(TypeError, match="argument kinds"):
        kern(queue, (8,), None, y.data, np.int32(2), np.int32(7), np.float32(1.5),
             np.uint32(3))
    with pytest.raises(TypeError, match="argument kinds"):
        kern(queue, (8,), None, y.data, y.data, np.int32(7), np.float32(1.5), np.uint32(3))
    kern(queue, (8,), None, y.data, np.int64(0), np.int32(2), np.float32(-1.0), np.uint32(5))
    expected[0:2] = [5.0, 4.0]
    np.testing.assert_array_equal(y.get(), expected)
    # A buffer of another Python type (a pool's) is the same kind of argument.
    pooled = runtime.memory_pool(queue.context)(40)
    cl.enqueue_copy(queue, pooled, np.zeros(10, np.float32))
    kern(queue, (8,), None, pooled, np.int64(1), np.int32(3), np.float32(2.0), np.uint32(1))
    got = np.empty(10, np.float32)
    cl.enqueue_copy(queue, got, pooled)
    np.testing.assert_array_equal(got, [0, 1, 3, 5, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 0, 4), (3, 7, 2), (1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.bool_], ids=lambda d: d.__name__)
def test_empty_is_pyopencls_empty(queue, shape, dtype):
    """runtime.empty makes what pyopencl.array.empty makes (through pyopencl's internal
    fast path), and the arrays work: written, read back, on their own buffers."""
    pool = runtime.memory_pool(queue.context)
    for allocator in (None, pool):
        ours = runtime.empty(queue, shape, dtype, allocator=allocator)
        ref = cl_array.empty(queue, shape, dtype, allocator=allocator)
        for attr in ("shape", "dtype", "strides", "nbytes", "size", "offset", "queue",
                     "context", "allocator"):
            assert getattr(ours, attr) == getattr(ref, attr), attr
        assert ours.flags.c_contiguous and ours.events == []
        if ours.size:
            assert ours.base_data.int_ptr != ref.base_data.int_ptr
            values = (np.arange(ours.size) % 3).astype(dtype).reshape(shape)
            ours.set(values)
            np.testing.assert_array_equal(ours.get(), values)


def test_empty_without_pyopencls_fast_path(queue, monkeypatch):
    """A pyopencl without the constructor's fast path gets the public constructor."""
    real = cl_array.Array

    class NoFastPath(real):
        def __init__(self, *args, _fast=False, **kwargs):
            if _fast:
                raise TypeError("unexpected keyword argument '_fast'")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cl_array, "Array", NoFastPath)
    got = runtime.empty(queue, (4, 3), np.float32)
    assert isinstance(got, real) and got.shape == (4, 3) and got.strides == (12, 4)
