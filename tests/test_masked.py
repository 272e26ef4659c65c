"""DSG masked products (masked_matmul, its backward) and the double-mask BatchNorm
(masked_relu_bn) against independent float64 references."""

from dataclasses import dataclass

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
from conftest import SAMPLE_WG_LIMIT

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.families import (
    LOCAL_MEM_BYTES,
    masked_dw,
    masked_dx,
    masked_gemm,
    masked_gemm_tiled,
    masked_util,
    masked_vmm,
    masked_vmm_split,
)
from pysparsecl.ops.masked import (
    MASKED_BN,
    MASKED_DW,
    MASKED_DX,
    MASKED_GEMM,
    MASKED_GEMM_ROUTINE,
    MASKED_GEMM_TILED,
    MASKED_VMM,
    MASKED_VMM_ROUTINE,
    MASKED_VMM_SPLIT,
    shared_selection_lists,
)
from pysparsecl.params import InvalidParamsError
from pysparsecl.testing.reference import (
    conv2d_masked_reference,
    masked_matmul_backward_reference,
    masked_matmul_reference,
    relative_error,
    relu_bn_reference,
)
from pysparsecl.tuning import override

TOL = 1e-4


@dataclass(frozen=True)
class MaskCase:
    M: int
    K: int
    N: int
    keep: float = 0.3          # fraction of each row selected (n_keep = ceil(keep * N))
    form: str = "bool"         # "bool" (M, N) mask or "idx" (M, n_keep) int32 indices
    vector: bool = False       # 1-D x (M must be 1)
    empty_rows: int = 0        # bool rows with nothing selected

    def label(self):
        empty = f" empty{self.empty_rows}" if self.empty_rows else ""
        return (f"{self.M}x{self.K}x{self.N} keep{self.keep} {self.form}"
                f"{' 1-D' if self.vector else ''}{empty}")

    @property
    def n_keep(self):
        return int(np.ceil(self.keep * self.N))

    def make(self, rng):
        """Fresh x (M, K), w (K, N) and a mask with exactly n_keep per row (bool or idx)."""
        x = rng.standard_normal((self.M, self.K), dtype=np.float32)
        w = rng.standard_normal((self.K, self.N), dtype=np.float32)
        idx = np.argsort(rng.random((self.M, self.N)), axis=1)[:, :self.n_keep]
        if self.form == "idx":
            mask = idx.astype(np.int32)
        else:
            mask = np.zeros((self.M, self.N), bool)
            np.put_along_axis(mask, idx, True, axis=1)
            mask[:self.empty_rows] = False
        if self.vector:
            x, mask = x[0], mask[0]
        return x, w, mask


CASES = [
    MaskCase(1, 64, 48),
    MaskCase(1, 64, 48, vector=True),
    MaskCase(1, 64, 48, form="idx"),
    MaskCase(1, 64, 48, form="idx", vector=True),
    MaskCase(1, 37, 29, keep=1.0),                      # n_keep = N
    MaskCase(1, 37, 29, keep=0.01, form="idx"),         # n_keep = 1
    MaskCase(1, 300, 97, keep=0.1),
    MaskCase(1, 5, 7),                                   # K below every vector width
    MaskCase(2, 45, 33),
    MaskCase(7, 53, 37, form="idx"),                     # nothing a multiple of a tile
    MaskCase(9, 131, 61, keep=1.0),
    MaskCase(9, 131, 61, keep=1.0, form="idx"),
    MaskCase(16, 64, 50, keep=0.01),                     # n_keep = 1
    MaskCase(16, 64, 50, keep=0.01, form="idx"),
    MaskCase(12, 70, 40, empty_rows=3),                  # all-False rows
    MaskCase(33, 96, 130, keep=0.1),
    MaskCase(33, 96, 130, keep=0.1, form="idx"),
    MaskCase(70, 17, 9, keep=0.5),
    MaskCase(300, 40, 24, keep=0.2, form="idx"),         # several row blocks
    MaskCase(300, 40, 24, keep=0.2),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_matches_reference(queue, rng, case):
    x, w, mask = case.make(rng)
    y = ps.masked_matmul(x, w, mask, queue=queue)
    ref = masked_matmul_reference(x, w, mask)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == ref.shape
    assert relative_error(y, ref) < TOL
    if mask.dtype == np.bool_:
        assert np.all(y[~mask] == 0)                        # exact zeros, not small values
        sel = mask & (ref != 0)
        assert np.all(np.abs(y[sel] - ref[sel]) <= 1e-4 * np.abs(x).max()
                      * np.abs(w).max() * case.K)
    else:
        # Each selected output within 1e-4 of the dense product, relative to its scale.
        scale = np.sqrt((np.atleast_2d(x).astype(np.float64) ** 2).sum(1))[:, None] * \
            np.sqrt((w.astype(np.float64) ** 2).sum(0))[np.atleast_2d(mask)]
        assert np.all(np.abs(np.atleast_2d(y) - np.atleast_2d(ref)) <= 1e-4 * scale)


def _ids(p):
    return ",".join(f"{k}={v}" for k, v in p.items())


@pytest.mark.parametrize("params", MASKED_VMM.sample(
    6, seed=4321, max_work_group_size=SAMPLE_WG_LIMIT), ids=_ids)
def test_every_vmm_configuration_is_correct(queue, rng, params):
    with override("masked_vmm", **params):       # also chooses this kernel on any device
        for case in (MaskCase(1, 83, 300, keep=0.35), MaskCase(1, 40, 77, form="idx")):
            x, w, mask = case.make(rng)
            y = ps.masked_matmul(x, w, mask, queue=queue)
            assert relative_error(y, masked_matmul_reference(x, w, mask)) < TOL, case


@pytest.mark.parametrize("params", MASKED_GEMM.sample(
    6, seed=4321, max_work_group_size=SAMPLE_WG_LIMIT), ids=_ids)
def test_every_gemm_configuration_is_correct(queue, rng, params):
    with override("masked_gemm", **params):
        for case in (MaskCase(45, 83, 70, keep=0.35), MaskCase(150, 20, 33, form="idx"),
                     MaskCase(600, 9, 5, keep=0.5)):
            x, w, mask = case.make(rng)
            y = ps.masked_matmul(x, w, mask, queue=queue)
            assert relative_error(y, masked_matmul_reference(x, w, mask)) < TOL, case


# ---------------------------------------------------------------------------------------------
# The GPU-shaped variants (split VMM, tiled GEMM), chosen by overriding their parameters

def _check(y, x, w, mask):
    ref = masked_matmul_reference(x, w, mask)
    assert y.shape == ref.shape and relative_error(y, ref) < TOL
    if mask.dtype == np.bool_:
        assert np.all(y[~mask] == 0)                    # exact zeros, every one written


def _poisoned_call(queue, x, w, mask):
    """masked_matmul into a device output filled with NaN: every output must be written."""
    out = cl_array.to_device(queue, np.full(np.shape(mask), np.nan, np.float32))
    ps.masked_matmul(cl_array.to_device(queue, x), w, mask, out=out)
    return out.get()


SPLIT_VMM = [dict(SPLIT=16, TEAMS=1, GROUP=1, VEC=1, XCHUNK=512),
             dict(SPLIT=32, TEAMS=2, GROUP=2, VEC=4, XCHUNK=512),
             dict(SPLIT=16, TEAMS=8, GROUP=4, VEC=16, XCHUNK=512),
             dict(SPLIT=64, TEAMS=2, GROUP=8, VEC=8, XCHUNK=1024),
             dict(SPLIT=256, TEAMS=1, GROUP=1, VEC=4, XCHUNK=1024)]
SPLIT_CASES = [MaskCase(1, 1300, 97, keep=0.1),                      # x staged in 2-3 pieces
               MaskCase(1, 1030, 61, keep=0.3, form="idx", vector=True),
               MaskCase(1, 37, 29, keep=1.0),                        # K % VEC, unaligned rows
               MaskCase(1, 5, 3, keep=0.01, form="idx"),             # n_keep = 1, tiny K
               MaskCase(1, 64, 300, keep=0.5, vector=True),          # many work-groups
               MaskCase(1, 48, 40, keep=1.0, form="idx"),
               MaskCase(1, 20, 2100, keep=0.05)]                     # bool scan in 1-9 steps


@pytest.mark.parametrize("list_in_kernel", [True, False], ids=["list-in-kernel", "compact-first"])
@pytest.mark.parametrize("params", SPLIT_VMM, ids=_ids)
def test_split_vmm_variants(queue, rng, params, list_in_kernel):
    """Both ways of listing a bool mask's columns: in the product's kernel, and by
    pscl_bool_compact first (forced by a column limit of 0, a routine setting)."""
    with override("masked_vmm_routine", LIST_IN_KERNEL_MAX_N=32768 if list_in_kernel else 0), \
            override("masked_vmm_split", **params):
        for case in SPLIT_CASES:
            x, w, mask = case.make(rng)
            _check(_poisoned_call(queue, x, w, mask), x, w, mask)
        # An all-False bool mask: nothing selected, every output a zero.
        x, w, _ = MaskCase(1, 70, 45).make(rng)
        y = _poisoned_call(queue, x, w, np.zeros((1, 45), bool))
        np.testing.assert_array_equal(y, np.zeros((1, 45), np.float32))


# (DENSE=0 spelled out: a tuned entry's threshold would otherwise complete these.)
TILED_GEMM = [dict(TILE=32, TILE_M=16, KC=32, GROUP=1, UNITS=1, WG=128, DENSE=0),
              dict(TILE=32, TILE_M=32, KC=32, GROUP=4, UNITS=2, WG=128, SPLITK=2, DENSE=0),
              dict(TILE=64, TILE_M=64, KC=64, GROUP=8, UNITS=1, WG=256, DENSE=0),
              dict(TILE=64, TILE_M=32, KC=32, GROUP=2, UNITS=4, WG=256, SPLITK=4, DENSE=0),
              dict(TILE=128, TILE_M=128, KC=32, GROUP=4, UNITS=1, WG=256, SPLITK=4, DENSE=0),
              dict(TILE=128, TILE_M=64, KC=32, GROUP=8, UNITS=2, WG=256, DENSE=0),
              # Dense tiles (the cases at keep >= 0.5 take that path; the others do not).
              dict(TILE=32, TILE_M=16, KC=32, GROUP=1, UNITS=1, WG=128, DENSE=50),
              dict(TILE=64, TILE_M=32, KC=32, GROUP=2, UNITS=1, WG=256, DENSE=25),
              dict(TILE=128, TILE_M=64, KC=32, GROUP=4, UNITS=1, WG=256, SPLITK=2, DENSE=35)]
TILED_CASES = [MaskCase(2, 45, 33),                                  # one partial tile
               MaskCase(7, 53, 37, form="idx"),                      # K % 4: unaligned rows
               MaskCase(33, 130, 70, keep=0.1),                      # several tiles, K chunks
               MaskCase(45, 96, 130, keep=0.05, form="idx"),
               MaskCase(19, 3, 140, keep=0.3),                       # K below every chunk
               MaskCase(70, 40, 64, keep=1.0),                       # full: several rounds
               MaskCase(40, 71, 35, keep=1.0, form="idx"),
               MaskCase(12, 70, 40, keep=0.5, empty_rows=12),        # all False: zeros only
               MaskCase(37, 40, 128, keep=0.1),                      # N % 16 == 0: whole
               MaskCase(21, 36, 96, keep=0.3, form="idx")]           # 16-entry mask loads


@pytest.mark.parametrize("params", TILED_GEMM, ids=_ids)
def test_tiled_gemm_variants(queue, rng, params):
    with override("masked_gemm_tiled", **params):
        for case in TILED_CASES:
            x, w, mask = case.make(rng)
            _check(_poisoned_call(queue, x, w, mask), x, w, mask)


@pytest.mark.parametrize("form", ["bool", "idx"])
@pytest.mark.parametrize("params", TILED_GEMM[-2:], ids=_ids)
def test_dense_and_sparse_tiles_in_one_launch(queue, rng, form, params):
    """Every row selects all of the first 64 columns and 5 of the rest: the tiles over the
    first columns take the dense path and the others the sparse one, in the same launch."""
    m, k, n = 45, 70, 150
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    rest = 64 + np.argsort(rng.random((m, n - 64)), axis=1)[:, :5]
    idx = np.concatenate([np.tile(np.arange(64), (m, 1)), rest], axis=1).astype(np.int32)
    idx = np.take_along_axis(idx, np.argsort(rng.random(idx.shape), axis=1), axis=1)
    if form == "idx":
        mask = idx
    else:
        mask = np.zeros((m, n), bool)
        np.put_along_axis(mask, idx, True, axis=1)
    with override("masked_gemm_tiled", **params):
        _check(_poisoned_call(queue, x, w, mask), x, w, mask)


@pytest.mark.parametrize("n", [50, 64])
@pytest.mark.parametrize("form", ["bool", "idx"])
def test_gpu_variants_on_device_arrays_with_offsets(queue, rng, form, n):
    """Offset device arrays (x unaligned for float4 loads; a mask one row in, which keeps
    16-entry loads aligned when N = 64), an output poisoned with NaN that must be fully
    overwritten, and repeated calls (split-K included) that agree exactly."""
    for m, family, params in ((1, "masked_vmm_split", SPLIT_VMM[1]),
                              (29, "masked_gemm_tiled", TILED_GEMM[1]),
                              (29, "masked_gemm_tiled", TILED_GEMM[5])):
        x, w, mask = MaskCase(m, 68, n, keep=0.4, form=form).make(rng)
        padded = np.concatenate([np.zeros(1, np.float32), x.ravel()])
        x_dev = cl_array.to_device(queue, padded)[1:].reshape(x.shape)   # offset: 1 float
        mask_dev = cl_array.to_device(queue, np.concatenate([mask[:1], mask]))[1:]
        out = cl_array.to_device(queue, np.full(mask.shape, np.nan, np.float32))
        weight = ps.MaskedLinearWeight(w, queue=queue)
        with override(family, **params):
            ps.masked_matmul(x_dev, weight, mask_dev, out=out)
            first = out.get()
            again = ps.masked_matmul(x_dev, weight, mask_dev).get()
        _check(first, x, w, mask)
        np.testing.assert_array_equal(again, first)


def test_gpu_variants_fit_local_memory_and_render():
    """Every configuration of the GPU-shaped kernels fits 32 KiB of local memory, and the
    tiled GEMM renders its split-K sum exactly when it splits K; the op's routine, not a
    tile parameter, chooses these kernels (index 0, the spec default, is the CPU kernel)."""
    for family in (masked_vmm_split, masked_gemm_tiled):
        assert all(family.local_bytes(c) <= LOCAL_MEM_BYTES
                   for c in family.SPEC.candidates())
    for routine, cpu, gpu in ((MASKED_VMM_ROUTINE, MASKED_VMM, MASKED_VMM_SPLIT),
                              (MASKED_GEMM_ROUTINE, MASKED_GEMM, MASKED_GEMM_TILED)):
        defaults = routine.spec.defaults()
        assert routine.variant(defaults, "KERNEL") is cpu
        assert routine.variant(routine.selecting(gpu.family), "KERNEL") is gpu
    with pytest.raises(InvalidParamsError, match="local_memory"):
        MASKED_GEMM_TILED.check(dict(TILE=128, TILE_M=128, KC=64, WG=512))
    for form in ("bool", "slot"):
        for split in (1, 2):
            params = MASKED_GEMM_TILED.check(dict(TILE=64, WG=256, SPLITK=split))
            source = runtime.render(masked_gemm_tiled.TEMPLATE,
                                    **masked_gemm_tiled.template_args(params, form, True, True))
            assert "pscl_masked_gemm_tiled" in source and "pscl_masked_vmm" not in source
            assert ("pscl_gemm_splitk_sum" in source) == (split > 1)
            assert f"__local float4 lds[{masked_gemm_tiled.local_bytes(params) // 16}]" in source


@pytest.mark.parametrize("form", ["bool", "idx"])
@pytest.mark.parametrize("m", [1, 19])
def test_device_arrays_stay_on_device_and_every_output_is_written(queue, rng, form, m):
    x, w, mask = MaskCase(m, 70, 45, keep=0.4, form=form).make(rng)
    weight = ps.MaskedLinearWeight(w, queue=queue)
    x_dev, mask_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, mask)
    out = cl_array.to_device(queue, np.full(mask.shape, np.nan, np.float32))
    events = []
    result = ps.masked_matmul(x_dev, weight, mask_dev, out=out, events=events)
    assert result is out and events
    y = out.get()
    assert not np.isnan(y).any()            # unselected outputs are written as 0 too
    assert relative_error(y, masked_matmul_reference(x, w, mask)) < TOL
    builds = runtime.build_count
    y2 = ps.masked_matmul(x_dev, weight, mask_dev).get()
    assert runtime.build_count == builds    # a hot call only launches
    np.testing.assert_array_equal(y2, y)


@pytest.mark.parametrize("form", ["bool", "idx"])
def test_offset_device_arrays(queue, rng, form):
    x, w, mask = MaskCase(9, 33, 21, form=form).make(rng)
    x_dev = cl_array.to_device(queue, np.concatenate([x[:2], x]))[2:]
    mask_dev = cl_array.to_device(queue, np.concatenate([mask[:1], mask]))[1:]
    w_dev = cl_array.to_device(queue, np.concatenate([w[:3], w]))[3:]
    out_dev = cl_array.empty(queue, (12,) + mask.shape[1:], np.float32)[3:]
    ps.masked_matmul(x_dev, w_dev, mask_dev, out=out_dev)
    assert relative_error(out_dev.get(), masked_matmul_reference(x, w, mask)) < TOL


def test_numpy_out_argument(queue, rng):
    x, w, mask = MaskCase(5, 30, 20).make(rng)
    out = np.full(mask.shape, np.nan, np.float32)
    assert ps.masked_matmul(x, w, mask, out=out, queue=queue) is out
    assert relative_error(out, masked_matmul_reference(x, w, mask)) < TOL


def test_prepared_weight_layouts(queue, rng):
    x, w, mask = MaskCase(6, 40, 25).make(rng)
    ref = masked_matmul_reference(x, w, mask)
    wt = np.ascontiguousarray(w.T)
    for weight in (ps.MaskedLinearWeight(w, queue=queue),
                   ps.MaskedLinearWeight(cl_array.to_device(queue, w)),
                   ps.MaskedLinearWeight(wt, transposed=True, queue=queue),
                   ps.MaskedLinearWeight(cl_array.to_device(queue, wt), transposed=True)):
        assert weight.shape == (40, 25)
        np.testing.assert_array_equal(weight.to_numpy(), w)
        assert relative_error(ps.masked_matmul(x, weight, mask), ref) < TOL
    # A device array given as rows is used in place: a weight update is seen.
    rows = cl_array.to_device(queue, wt)
    weight = ps.MaskedLinearWeight(rows, transposed=True)
    rows.set(2 * wt)
    assert relative_error(ps.masked_matmul(x, weight, mask), 2 * ref) < TOL


def test_unselected_outputs_are_exact_zeros_even_with_nan_and_inf(queue, rng):
    x, w, mask = MaskCase(6, 32, 20, keep=0.5).make(rng)
    x[2, 5] = np.nan
    w[3, 7] = np.inf
    mask[:, 7] = False
    y = ps.masked_matmul(x, w, mask, queue=queue)
    assert np.all(y[~mask] == 0)
    assert np.isnan(y[2][mask[2]]).all()                 # NaN reaches every selected output
    others = mask.copy()
    others[2] = False
    assert np.isfinite(y[others]).all()


def test_zero_sizes(queue, rng):
    w = rng.standard_normal((8, 5), dtype=np.float32)
    assert ps.masked_matmul(np.zeros((0, 8), np.float32), w, np.zeros((0, 5), bool),
                            queue=queue).shape == (0, 5)
    assert ps.masked_matmul(np.ones((3, 8), np.float32), w, np.zeros((3, 0), np.int32),
                            queue=queue).shape == (3, 0)
    y = ps.masked_matmul(np.ones((3, 0), np.float32), np.ones((0, 5), np.float32),
                         np.ones((3, 5), bool), queue=queue)
    np.testing.assert_array_equal(y, np.zeros((3, 5), np.float32))


def test_defaults_render_and_build(queue):
    """Every masked-product family, in every selection form, and the helper kernels."""
    for family, forms in ((masked_vmm, ("bool", "idx")), (masked_vmm_split, ("bool", "idx")),
                          (masked_gemm, ("bool", "slot")),
                          (masked_gemm_tiled, ("bool", "slot")),
                          (masked_dx, ("bool", "idx")), (masked_dw, ("bool", "idx"))):
        for form in forms:
            source = runtime.render(family.TEMPLATE,
                                    **family.template_args(family.SPEC.defaults(), form))
            assert f"pscl_{family.SPEC.family}" in source
            runtime.build_program(queue.context, source)
    runtime.build_program(queue.context,
                          runtime.render(masked_util.TEMPLATE, ARGS=masked_util.ARGS))


# ---------------------------------------------------------------------------------------------
# Bad input

def _x(m=4, k=6):
    return np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)


def _w(k=6, n=5):
    return np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)


def _mask(m=4, n=5):
    return np.random.default_rng(2).random((m, n)) < 0.5


def _idx(rows):
    return np.array(rows, np.int32)


BAD = [
    ("x float64", dict(x=_x().astype(np.float64)), TypeError, "x must have dtype float32"),
    ("x 3-D", dict(x=_x()[None]), ValueError, "x must be 1-D (K,) or 2-D"),
    ("x list", dict(x=[[1.0]]), TypeError, "x must be a numpy.ndarray"),
    ("w float64", dict(w=_w().astype(np.float64)), TypeError, "w must have dtype float32"),
    ("w 1-D", dict(w=_w()[0]), ValueError, "w must be 2-D"),
    ("w K mismatch", dict(w=_w(k=7)), ValueError, "w must have shape (K, N) with K = 6"),
    ("mask float", dict(mask=_mask().astype(np.float32)), TypeError, "mask must have dtype bool"),
    ("mask int64", dict(mask=np.zeros((4, 2), np.int64)), TypeError, "mask must have dtype bool"),
    ("mask list", dict(mask=[[True]]), TypeError, "mask must be a numpy.ndarray"),
    ("mask shape", dict(mask=_mask(n=6)), ValueError, "mask (bool) must have shape (4, 5)"),
    ("mask rows", dict(mask=_mask(m=3)), ValueError, "mask has 3 rows but x has 4"),
    ("mask 1-D for 2-D x", dict(mask=_mask()[0]), ValueError, "mask must be 2-D"),
    ("mask 2-D for 1-D x", dict(x=_x()[0], mask=_mask()[:1]), ValueError, "mask must be 1-D"),
    ("idx too many", dict(mask=np.zeros((4, 6), np.int32)), ValueError, "only N = 5 columns"),
    ("idx out of range", dict(mask=_idx([[0, 1], [2, 5], [0, 1], [0, 1]])), ValueError,
     "row 1 holds 5"),
    ("idx negative", dict(mask=_idx([[0, 1], [2, 3], [0, -1], [0, 1]])), ValueError,
     "must lie in [0, 5)"),
    ("idx duplicate", dict(mask=_idx([[0, 1], [2, 3], [0, 1], [4, 4]])), ValueError,
     "repeats column 4 in row 3"),
    ("out shape", dict(out=np.empty((4, 6), np.float32)), ValueError, "out must have shape (4, 5)"),
    ("out dtype", dict(out=np.empty((4, 5))), TypeError, "out must have dtype float32"),
    ("queue type", dict(queue="cpu"), TypeError, "queue must be a pyopencl.CommandQueue"),
]


@pytest.mark.parametrize("desc,changes,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clearly(queue, desc, changes, exc, fragment):
    kwargs = dict(x=_x(), w=_w(), mask=_mask(), queue=queue)
    kwargs.update(changes)
    with pytest.raises(exc) as info:
        ps.masked_matmul(kwargs.pop("x"), kwargs.pop("w"), kwargs.pop("mask"), **kwargs)
    assert fragment in str(info.value), str(info.value)
    # The library stays usable after the error.
    assert np.isfinite(ps.masked_matmul(_x(), _w(), _mask(), queue=queue)).all()


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("bad,fragment", [([3, 9], "row 0 holds a value outside"),
                                          ([2, 2], "repeats a column in row 0")])
def test_bad_device_indices_are_caught_on_the_device(queue, m, bad, fragment):
    idx = np.tile(np.array([[0, 1]], np.int32), (m, 1))
    idx[0] = bad
    with pytest.raises(ValueError, match=fragment):
        ps.masked_matmul(cl_array.to_device(queue, _x(m=m)), _w(),
                         cl_array.to_device(queue, idx))
    good = cl_array.to_device(queue, np.tile(np.array([[4, 0]], np.int32), (m, 1)))
    y = ps.masked_matmul(cl_array.to_device(queue, _x(m=m)), _w(), good).get()
    assert relative_error(y, masked_matmul_reference(_x(m=m), _w(), good.get())) < TOL


def test_device_array_from_another_context(queue):
    other = cl.CommandQueue(cl.Context([queue.device]))
    with pytest.raises(ValueError, match="different OpenCL context"):
        ps.masked_matmul(cl_array.to_device(other, _x()), _w(), _mask(), queue=queue)
    weight = ps.MaskedLinearWeight(_w(), queue=other)
    with pytest.raises(ValueError, match="different OpenCL context"):
        ps.masked_matmul(cl_array.to_device(queue, _x()), weight, _mask())


def test_mixed_containers_and_prepared_weight_mismatch(queue):
    with pytest.raises(TypeError, match="out must be the same kind of container"):
        ps.masked_matmul(_x(), _w(), _mask(), queue=queue,
                         out=cl_array.empty(queue, (4, 5), np.float32))
    weight = ps.MaskedLinearWeight(_w(k=7), queue=queue)
    with pytest.raises(ValueError, match="K = 6"):
        ps.masked_matmul(_x(), weight, _mask())
    with pytest.raises(TypeError, match="w must have dtype float32"):
        ps.MaskedLinearWeight(_w().astype(np.float16), queue=queue)


# ---------------------------------------------------------------------------------------------
# Backward

BWD_CASES = [MaskCase(1, 40, 30), MaskCase(1, 40, 30, vector=True), MaskCase(1, 40, 30, form="idx"),
             MaskCase(9, 53, 37, keep=0.2), MaskCase(9, 53, 37, keep=0.2, form="idx"),
             MaskCase(12, 70, 40, empty_rows=4), MaskCase(40, 1024, 20, keep=0.1),
             MaskCase(20, 33, 50, keep=1.0), MaskCase(70, 17, 90, keep=0.01, form="idx")]


@pytest.mark.parametrize("case", BWD_CASES, ids=[c.label() for c in BWD_CASES])
def test_backward_matches_dense_autograd_formula(queue, rng, case):
    x, w, mask = case.make(rng)
    dy = rng.standard_normal(np.shape(masked_matmul_reference(x, w, mask)), dtype=np.float32)
    dx, dw = ps.masked_matmul_backward(dy, x, w, mask, queue=queue)
    ref_dx, ref_dw = masked_matmul_backward_reference(dy, x, w, mask)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert relative_error(dx, ref_dx) < TOL and relative_error(dw, ref_dw) < TOL
    if mask.dtype == np.bool_:       # unselected dy entries are ignored, whatever they hold
        poisoned = np.where(mask, dy, np.nan).astype(np.float32)
        dx2, dw2 = ps.masked_matmul_backward(poisoned, x, w, mask, queue=queue)
        np.testing.assert_array_equal(dx2, dx)
        np.testing.assert_array_equal(dw2, dw)


def test_backward_device_arrays_and_prepared_weight(queue, rng):
    x, w, mask = MaskCase(30, 64, 40, keep=0.25, form="idx").make(rng)
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    weight = ps.MaskedLinearWeight(np.ascontiguousarray(w.T), transposed=True, queue=queue)
    events = []
    dx, dw = ps.masked_matmul_backward(cl_array.to_device(queue, dy), cl_array.to_device(queue, x),
                                       weight, cl_array.to_device(queue, mask), events=events)
    assert isinstance(dx, cl_array.Array) and isinstance(dw, cl_array.Array) and events
    ref_dx, ref_dw = masked_matmul_backward_reference(dy, x, w, mask)
    assert relative_error(dx.get(), ref_dx) < TOL and relative_error(dw.get(), ref_dw) < TOL


@pytest.mark.parametrize("form", ["bool", "idx"])
def test_backward_rows_layout_into_views_and_without_dx(queue, rng, form):
    """dw as (N, K) rows, written into a view of a larger buffer (at the base alignment:
    in place; off it: through a copy), and dx skipped; the weight itself a view."""
    x, w, mask = MaskCase(13, 37, 29, keep=0.3, form=form).make(rng)
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    ref_dx, ref_dw = masked_matmul_backward_reference(dy, x, w, mask)
    align = runtime.base_alignment(queue.device) // 4
    n, k = w.shape[1], w.shape[0]
    for start in (align, align + 1):
        pool = cl_array.to_device(queue, np.full(2 * align + 2 * n * k, np.nan, np.float32))
        rows = pool[start:start + n * k].reshape(n, k)
        rows.set(np.ascontiguousarray(w.T))
        weight = ps.MaskedLinearWeight(rows, transposed=True, queue=queue)
        grads = cl_array.to_device(queue, np.full(2 * align + 2 * n * k, np.nan, np.float32))
        dw_out = grads[start:start + n * k].reshape(n, k)
        dx, dw = ps.masked_matmul_backward(
            cl_array.to_device(queue, dy), cl_array.to_device(queue, x), weight,
            cl_array.to_device(queue, mask), need_dx=False, dw_rows=True, dw_out=dw_out)
        assert dx is None and dw is dw_out
        assert relative_error(dw_out.get(), ref_dw.T) < TOL
        untouched = np.concatenate([grads.get()[:start], grads.get()[start + n * k:]])
        assert np.all(np.isnan(untouched))                    # only the view was written
    dx, dw = ps.masked_matmul_backward(dy, x, w, mask, dw_rows=True, queue=queue)  # NumPy
    assert relative_error(dx, ref_dx) < TOL and relative_error(dw, ref_dw.T) < TOL
    with pytest.raises(TypeError, match="dw_out is for device calls"):
        ps.masked_matmul_backward(dy, x, w, mask, dw_out=np.zeros_like(w), queue=queue)
    with pytest.raises(TypeError, match="need_dx must be a bool"):
        ps.masked_matmul_backward(dy, x, w, mask, need_dx=0, queue=queue)


@pytest.mark.parametrize("start", [0, 3])
def test_backward_dw_into_a_view_in_the_kn_layout(queue, rng, start):
    """dw as (K, N) into a view of a larger buffer, at the buffer's start or off it (it
    raised ArrayHasOffsetError there): only the view is written."""
    x, w, mask = MaskCase(13, 37, 29, keep=0.3).make(rng)
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    k, n = w.shape
    grads = cl_array.to_device(queue, np.full(2 * k * n + 64, np.nan, np.float32))
    dw_out = grads[start:start + k * n].reshape(k, n)
    _, dw = ps.masked_matmul_backward(cl_array.to_device(queue, dy), cl_array.to_device(queue, x),
                                      w, cl_array.to_device(queue, mask), dw_out=dw_out)
    assert dw is dw_out
    want = masked_matmul_backward_reference(dy, x, w, mask)[1]
    assert relative_error(dw_out.get(), want) < TOL
    after = grads.get()
    assert np.all(np.isnan(after[:start])) and np.all(np.isnan(after[start + k * n:]))


def test_transpose_into_a_view_of_the_first_columns(queue, rng):
    """masked_util.transpose of an (R, C) array's first ``cols`` columns into a view at
    an offset into a larger buffer, with a wider row stride: only that block is
    written."""
    src = rng.standard_normal((37, 21), dtype=np.float32)
    pool = cl_array.to_device(queue, np.full(3000, np.nan, np.float32))
    start, cols, ld = 100, 13, 40
    view = pool[start:start + cols * ld].reshape(cols, ld)
    got = masked_util.transpose(queue, cl_array.to_device(queue, src), None, into=view,
                                ld_dst=ld, cols=cols)
    assert got is view and len(view.events) == 1
    after = pool.get()
    block = after[start:start + cols * ld].reshape(cols, ld)
    np.testing.assert_array_equal(block[:, :37], src[:, :cols].T)
    assert np.all(np.isnan(block[:, 37:])) and np.all(np.isnan(after[:start]))
    assert np.all(np.isnan(after[start + cols * ld:]))


@pytest.mark.parametrize("form", ["bool", "idx"])
def test_backward_calls_share_a_selections_lists(queue, rng, count_instances, form):
    """Inside shared_selection_lists, backward calls with the same mask and dy device
    arrays build the lists once, and each call's dw is its own x's; calls with other dy,
    NumPy operands or outside the block build their own."""
    built = count_instances(masked_util, "SelectionLists")
    x, w, mask = MaskCase(21, 30, 26, keep=0.3, form=form).make(rng)
    x2 = rng.standard_normal((21, 11), dtype=np.float32)
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    dy2 = rng.standard_normal(mask.shape, dtype=np.float32)
    xd, x2d, dyd, dy2d, maskd = (cl_array.to_device(queue, a) for a in (x, x2, dy, dy2, mask))
    n_cols = dict(n_cols=w.shape[1]) if form == "idx" else {}   # w=None: N from the mask
    with shared_selection_lists():
        dx, dw = ps.masked_matmul_backward(dyd, xd, w, maskd, queue=queue)
        _, dw2 = ps.masked_matmul_backward(dyd, x2d, None, maskd, need_dx=False, **n_cols)
        assert len(built) == 1
        _, dw3 = ps.masked_matmul_backward(dy2d, x2d, None, maskd, need_dx=False, **n_cols)
        ps.masked_matmul_backward(dy, x, w, mask, queue=queue)    # NumPy: its own
        ps.masked_matmul_backward(dy, x, w, mask, queue=queue)
        assert len(built) == 4
    ps.masked_matmul_backward(dyd, xd, w, maskd, queue=queue)
    assert len(built) == 5
    ref_dx, ref_dw = masked_matmul_backward_reference(dy, x, w, mask)
    assert relative_error(dx.get(), ref_dx) < TOL and relative_error(dw.get(), ref_dw) < TOL
    for got, g in ((dw2, dy), (dw3, dy2)):     # (dw does not depend on w)
        want = masked_matmul_backward_reference(g, x2, w[:11], mask)[1]
        assert relative_error(got.get(), want) < TOL


@pytest.mark.parametrize("family,spec", [("masked_dx", MASKED_DX), ("masked_dw", MASKED_DW)])
def test_every_backward_configuration_is_correct(queue, rng, family, spec):
    cases = [MaskCase(33, 200, 45, keep=0.3), MaskCase(20, 37, 70, keep=0.2, form="idx")]
    data = [(c, *c.make(rng)) for c in cases]
    for params in spec.sample(4, seed=4321, max_work_group_size=SAMPLE_WG_LIMIT):
        with override(family, **params):
            for case, x, w, mask in data:
                dy = rng.standard_normal(np.shape(masked_matmul_reference(x, w, mask)),
                                         dtype=np.float32)
                dx, dw = ps.masked_matmul_backward(dy, x, w, mask, queue=queue)
                ref_dx, ref_dw = masked_matmul_backward_reference(dy, x, w, mask)
                assert relative_error(dx, ref_dx) < TOL, (params, case)
                assert relative_error(dw, ref_dw) < TOL, (params, case)


def _check_backward(queue, rng, case):
    """masked_matmul_backward on fresh inputs of ``case`` against the float64 reference."""
    x, w, mask = case.make(rng)
    dy = rng.standard_normal(np.shape(masked_matmul_reference(x, w, mask)), dtype=np.float32)
    dx, dw = ps.masked_matmul_backward(dy, x, w, mask, queue=queue)
    ref_dx, ref_dw = masked_matmul_backward_reference(dy, x, w, mask)
    assert relative_error(dx, ref_dx) < TOL, case
    assert relative_error(dw, ref_dw) < TOL, case


@pytest.mark.parametrize("family", ["masked_dx", "masked_dw"])
@pytest.mark.parametrize("tiles", [dict(VEC=4, KVEC=2, WG=8), dict(VEC=16, KVEC=1, WG=4),
                                   dict(VEC=1, KVEC=1, WG=64)])
@pytest.mark.parametrize("across", [0, 1])
def test_backward_work_group_layouts(queue, rng, family, tiles, across):
    """Both work-group layouts (rows or columns side by side, or K chunks of one), with
    partial chunks (K = 37, 200), partial work-groups and an empty row."""
    cases = [MaskCase(33, 200, 45, keep=0.3, empty_rows=1),
             MaskCase(20, 37, 70, keep=0.2, form="idx")]
    with override(family, ACROSS=across, **tiles):
        for case in cases:
            _check_backward(queue, rng, case)


@pytest.mark.parametrize("tiles", [dict(ROW_WG=32, COLS=16, SEGS=4),
                                   dict(ROW_WG=256, COLS=32, SEGS=32),
                                   dict(ROW_WG=64, COLS=64, SEGS=8)])
def test_backward_lists_by_work_group_scans(queue, rng, tiles):
    """masked_lists' scans (SCAN 1) give the backward's lists: bool and index masks,
    an empty row, fewer rows than segments, N not a multiple of COLS and rows longer
    than a work-group's items."""
    cases = [MaskCase(33, 20, 45, keep=0.3, empty_rows=1), MaskCase(3, 16, 70, keep=0.5),
             MaskCase(70, 8, 300, keep=0.1, form="idx"), MaskCase(40, 9, 600, keep=0.05)]
    with override("masked_lists", SCAN=1, **tiles):
        for case in cases:
            _check_backward(queue, rng, case)


def test_backward_bad_input(queue):
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 5\)"):
        ps.masked_matmul_backward(np.zeros((4, 6), np.float32), _x(), _w(), _mask(), queue=queue)
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 2\)"):
        ps.masked_matmul_backward(np.zeros((4, 5), np.float32), _x(), _w(),
                                  _idx([[0, 1]] * 4), queue=queue)
    with pytest.raises(TypeError, match="dy must have dtype float32"):
        ps.masked_matmul_backward(np.zeros((4, 5)), _x(), _w(), _mask(), queue=queue)
    with pytest.raises(ValueError, match="repeats column 1 in row 2"):
        ps.masked_matmul_backward(np.zeros((4, 2), np.float32), _x(), _w(),
                                  _idx([[0, 1], [0, 1], [1, 1], [0, 1]]), queue=queue)
    with pytest.raises(ValueError, match="repeats a column in row 0"):
        ps.masked_matmul_backward(cl_array.zeros(queue, (1, 2), np.float32),
                                  cl_array.to_device(queue, _x(m=1)), _w(),
                                  cl_array.to_device(queue, _idx([[3, 3]])))


# ---------------------------------------------------------------------------------------------
# Double-mask BatchNorm

BN_SHAPES = [(1, 16), (7, 37), (64, 256), (2, 5, 7, 9), (3, 16, 8, 8), (1, 3, 1, 1), (4, 6, 5)]


def _bn_inputs(rng, shape, keep=0.4):
    y = rng.standard_normal(shape, dtype=np.float32)
    mask = rng.random(shape) < keep
    c = shape[1]
    gamma, beta, mean = (rng.standard_normal(c, dtype=np.float32) for _ in range(3))
    var = rng.random(c, dtype=np.float32) + 0.1
    return y, mask, gamma, beta, mean, var


@pytest.mark.parametrize("shape", BN_SHAPES, ids=[str(s) for s in BN_SHAPES])
def test_relu_bn_inference_and_training(queue, rng, shape):
    y, mask, gamma, beta, mean, var = _bn_inputs(rng, shape)
    out = ps.masked_relu_bn(y, mask, gamma, beta, mean, var, queue=queue)
    assert relative_error(out, relu_bn_reference(y, mask, gamma, beta, mean, var)) < TOL
    assert np.all(out[~mask] == 0)
    mask[:, 0] = False                       # a channel with nothing selected
    out, bmean, bvar = ps.masked_relu_bn(y, mask, gamma, beta, eps=1e-3, training=True,
                                         queue=queue)
    ref, rmean, rvar = relu_bn_reference(y, mask, gamma, beta, eps=1e-3)
    assert relative_error(out, ref) < TOL
    assert relative_error(bmean, rmean) < TOL and relative_error(bvar, rvar) < TOL
    assert bmean[0] == 0 and bvar[0] == 0 and np.all(out[~mask] == 0)


def test_relu_bn_device_arrays_poison_and_nan(queue, rng):
    y, mask, gamma, beta, mean, var = _bn_inputs(rng, (3, 8, 6, 6))
    y[~mask] = np.inf                        # unselected entries never reach the arithmetic
    y[0, 1, 2, 3], mask[0, 1, 2, 3] = np.nan, True
    dev = [cl_array.to_device(queue, a) for a in (y, mask, gamma, beta, mean, var)]
    out = cl_array.to_device(queue, np.full(y.shape, np.nan, np.float32))
    assert ps.masked_relu_bn(*dev, out=out) is out
    got = out.get()
    assert np.all(got[~mask] == 0) and np.isnan(got[0, 1, 2, 3])
    ref = relu_bn_reference(np.where(mask, y, 0), mask, gamma, beta, mean, var)
    ok = ~np.isnan(ref)
    assert relative_error(got[ok], ref[ok]) < TOL
    y, mask, gamma, beta, _, _ = _bn_inputs(rng, (40, 24))
    res = ps.masked_relu_bn(*(cl_array.to_device(queue, a) for a in (y, mask, gamma, beta)),
                            training=True)
    assert all(isinstance(a, cl_array.Array) for a in res)
    ref = relu_bn_reference(y, mask, gamma, beta)
    for a, r in zip(res, ref):
        assert relative_error(a.get(), r) < TOL


@pytest.mark.parametrize("params", MASKED_BN.sample(
    3, seed=4321, max_work_group_size=SAMPLE_WG_LIMIT), ids=_ids)
def test_every_bn_configuration_is_correct(queue, rng, params):
    with override("masked_bn", **params):
        for shape in ((9, 45), (2, 5, 7, 9)):
            y, mask, gamma, beta, mean, var = _bn_inputs(rng, shape)
            out = ps.masked_relu_bn(y, mask, gamma, beta, mean, var, queue=queue)
            assert relative_error(out, relu_bn_reference(y, mask, gamma, beta, mean, var)) < TOL
            out, m, v = ps.masked_relu_bn(y, mask, gamma, beta, training=True, queue=queue)
            ref, rm, rv = relu_bn_reference(y, mask, gamma, beta)
            assert relative_error(out, ref) < TOL and relative_error(v, rv) < TOL


BN_BAD = [
    ("y 1-D", dict(y=np.zeros(5, np.float32), mask=np.zeros(5, bool)), ValueError,
     "y must be at least 2-D"),
    ("mask shape", dict(mask=np.zeros((4, 6), bool)), ValueError, "mask must have y's shape"),
    ("mask dtype", dict(mask=np.zeros((4, 5), np.int32)), TypeError, "mask must have dtype bool"),
    ("gamma shape", dict(gamma=np.ones(4, np.float32)), ValueError, "gamma must have shape (5,)"),
    ("var dtype", dict(var=np.ones(5)), TypeError, "var must have dtype float32"),
    ("mean missing", dict(mean=None), ValueError, "needs the running mean and var"),
    ("training with stats", dict(training=True), ValueError, "pass mean=None and var=None"),
    ("eps negative", dict(eps=-1.0), ValueError, "eps must be a non-negative number"),
]


@pytest.mark.parametrize("desc,changes,exc,fragment", BN_BAD, ids=[b[0] for b in BN_BAD])
def test_relu_bn_bad_input(queue, desc, changes, exc, fragment):
    kwargs = dict(y=np.ones((4, 5), np.float32), mask=np.ones((4, 5), bool),
                  gamma=np.ones(5, np.float32), beta=np.zeros(5, np.float32),
                  mean=np.zeros(5, np.float32), var=np.ones(5, np.float32), queue=queue)
    kwargs.update(changes)
    with pytest.raises(exc) as info:
        ps.masked_relu_bn(**kwargs)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_byte_masks_select_like_bool(queue, rng, dtype):
    """int8/uint8 masks (pyopencl's comparisons give int8) select where nonzero, in the
    products, the backward, the BatchNorm and the masked convolution, on the host and
    the device alike."""
    x, w, mask = MaskCase(9, 33, 21, keep=0.4, form="bool").make(rng)
    byte = mask.astype(dtype) * dtype(5)                   # nonzero, not only 1
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    want = masked_matmul_reference(x, w, mask)
    assert relative_error(ps.masked_matmul(x, w, byte, queue=queue), want) < TOL
    got = ps.masked_matmul(cl_array.to_device(queue, x), cl_array.to_device(queue, w),
                           cl_array.to_device(queue, byte))
    assert relative_error(got.get(), want) < TOL
    ref_dx, ref_dw = masked_matmul_backward_reference(dy, x, w, mask)
    dx, dw = ps.masked_matmul_backward(dy, x, w, byte, queue=queue)
    assert relative_error(dx, ref_dx) < TOL and relative_error(dw, ref_dw) < TOL
    gamma, beta, mean = (rng.standard_normal(21, dtype=np.float32) for _ in range(3))
    var = rng.random(21, dtype=np.float32) + 0.5
    ref_bn = relu_bn_reference(want, mask, gamma, beta, mean, var)
    got_bn = ps.masked_relu_bn(want.astype(np.float32), byte, gamma, beta, mean, var,
                               queue=queue)
    assert relative_error(got_bn, ref_bn) < TOL
    xc = rng.standard_normal((2, 3, 6, 5), dtype=np.float32)
    wc = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    mc = rng.random((2, 4, 6, 5)) < 0.4
    ref_c = conv2d_masked_reference(xc, wc, mc, (1, 1), (1, 1))
    got_c = ps.conv2d_masked(xc, wc, mc.astype(dtype) * dtype(3), padding=1, queue=queue)
    assert relative_error(got_c, ref_c) < TOL
