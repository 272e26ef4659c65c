"""CompactRows (DSG activations kept by their selected entries) and the masked product of
a compact x, against float64 references of the dense batch it stands for."""

from dataclasses import dataclass

import numpy as np
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl import CompactRows
from pysparsecl.ops.masked import MASKED_COMPACT
from pysparsecl.testing.reference import masked_matmul_reference, relative_error
from pysparsecl.tuning import override

TOL = 1e-5


def ascending_idx(rng, n_rows: int, n_cols: int, n_keep: int) -> np.ndarray:
    """Each row's n_keep distinct columns, ascending: a fresh random selection."""
    idx = np.argsort(rng.random((n_rows, n_cols)), axis=1)[:, :n_keep]
    return np.sort(idx, axis=1).astype(np.int32)


def dense_of(values: np.ndarray, idx: np.ndarray, n_cols: int) -> np.ndarray:
    """The dense float64 batch, built independently of CompactRows.to_dense."""
    values2, idx2 = np.atleast_2d(values), np.atleast_2d(idx)
    dense = np.zeros((values2.shape[0], n_cols))
    for i in range(values2.shape[0]):
        for s in range(values2.shape[1]):
            dense[i, idx2[i, s]] = values2[i, s]
    return dense[0] if values.ndim == 1 else dense


# ---------------------------------------------------------------------------------------
# The type and its conversions

@pytest.mark.parametrize("shape,n_keep", [((5, 23), 7), ((1, 40), 40), ((3, 9), 0),
                                          ((23,), 4), ((0, 6), 2)])
def test_conversions_round_trip(queue, rng, shape, n_keep):
    n_rows, n_cols = (1,) + shape if len(shape) == 1 else shape
    idx = ascending_idx(rng, n_rows, n_cols, n_keep)
    dense = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    if len(shape) == 1:
        idx, dense = idx[0], dense[0]
    host = CompactRows.from_dense(dense, idx)
    ref_values = np.take_along_axis(np.atleast_2d(dense), np.atleast_2d(idx), 1)
    assert host.shape == shape and host.n_keep == n_keep and not host.is_device
    assert np.array_equal(np.atleast_2d(host.values), ref_values)
    assert np.array_equal(host.to_dense(), dense_of(host.values, idx, n_cols))

    dev = CompactRows.from_dense(cl_array.to_device(queue, dense),
                                 cl_array.to_device(queue, idx))
    assert dev.is_device and dev.shape == shape
    assert np.array_equal(dev.values.get(), host.values)
    assert np.array_equal(dev.to_dense().get(), host.to_dense())
    back = dev.get()
    assert np.array_equal(back.values, host.values) and np.array_equal(back.idx, idx)
    moved = host.to_device(queue)
    assert np.array_equal(moved.to_dense().get(), host.to_dense())
    assert host.nbytes == 8 * int(np.prod(idx.shape))


def test_to_dense_writes_into_out(queue, rng):
    idx = ascending_idx(rng, 4, 30, 6)
    values = rng.standard_normal((4, 6)).astype(np.float32)
    out = np.full((4, 30), np.nan, np.float32)           # every entry must be written
    assert CompactRows(values, idx, 30).to_dense(out=out) is out
    assert np.array_equal(out, dense_of(values, idx, 30))
    out_dev = cl_array.to_device(queue, np.full((4, 30), np.nan, np.float32))
    CompactRows(cl_array.to_device(queue, values), cl_array.to_device(queue, idx),
                30).to_dense(out=out_dev)
    assert np.array_equal(out_dev.get(), dense_of(values, idx, 30))


BAD_ROWS = [
    ("out of range", lambda idx: idx.__setitem__((1, 2), 40), "must lie in [0, 40)"),
    ("negative", lambda idx: idx.__setitem__((2, 0), -1), "must lie in [0, 40)"),
    ("unsorted", lambda idx: idx.__setitem__((1, slice(0, 2)), idx[1, 1::-1].copy()),
     "ascend strictly"),
    ("duplicate", lambda idx: idx.__setitem__((2, 1), idx[2, 0]), "ascend strictly"),
]


@pytest.mark.parametrize("where", ["host", "device"])
@pytest.mark.parametrize("desc,corrupt,fragment", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_indices_are_refused(queue, rng, where, desc, corrupt, fragment):
    idx = ascending_idx(rng, 4, 40, 5)
    corrupt(idx)
    values = rng.standard_normal((4, 5)).astype(np.float32)
    if where == "device":
        values, idx = cl_array.to_device(queue, values), cl_array.to_device(queue, idx)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        CompactRows(values, idx, 40)


@pytest.mark.parametrize("args,exc,fragment", [
    ((np.zeros((2, 3), np.float64), np.zeros((2, 3), np.int32), 5), TypeError, "values"),
    ((np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64), 5), TypeError, "idx"),
    ((np.zeros((2, 3), np.float32), np.zeros((2, 4), np.int32), 5), ValueError, "shape"),
    ((np.zeros((2, 3, 1), np.float32), np.zeros((2, 3, 1), np.int32), 5), ValueError,
     "1-D"),
    ((np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32), 2), ValueError, "n_cols"),
    ((np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32), 5.0), TypeError, "n_cols"),
    ((np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32), True), TypeError, "n_cols"),
    ((np.zeros((2, 3), np.float32), [[0, 1, 2]] * 2, 5), TypeError, "idx"),
])
def test_bad_construction_is_refused(args, exc, fragment):
    with pytest.raises(exc, match=fragment):
        CompactRows(*args)


def test_mixed_containers_are_refused(queue):
    values = np.zeros((2, 3), np.float32)
    idx = np.tile(np.arange(3, dtype=np.int32), (2, 1))
    with pytest.raises(TypeError, match="same kind of container"):
        CompactRows(cl_array.to_device(queue, values), idx, 5)
    with pytest.raises(TypeError, match="same kind of container"):
        CompactRows.from_dense(np.zeros((2, 5), np.float32), cl_array.to_device(queue, idx))
    with pytest.raises(ValueError, match="3 entries per row but dense has only 2"):
        CompactRows.from_dense(np.zeros((2, 2), np.float32), idx)


# ---------------------------------------------------------------------------------------
# The masked product of a compact x

@dataclass(frozen=True)
class CompactCase:
    M: int
    K: int
    N: int
    x_keep: float          # fraction of each x row kept
    keep: float            # fraction of each output row selected
    form: str = "idx"      # the output mask: "idx" (compact) or "bool" (dense)
    vector: bool = False
    empty_rows: int = 0    # bool mask rows selecting nothing

    def label(self):
        return (f"{self.M}x{self.K}x{self.N} x{self.x_keep} keep{self.keep} {self.form}"
                f"{' 1-D' if self.vector else ''}{' empty' if self.empty_rows else ''}")

    def make(self, rng):
        nx = int(np.ceil(self.x_keep * self.K))
        n_keep = int(np.ceil(self.keep * self.N))
        x_idx = ascending_idx(rng, self.M, self.K, nx)
        x_values = rng.standard_normal((self.M, nx)).astype(np.float32)
        w = rng.standard_normal((self.K, self.N)).astype(np.float32)
        sel = np.argsort(rng.random((self.M, self.N)), axis=1)[:, :n_keep]
        if self.form == "idx":
            mask = sel.astype(np.int32)            # any order: only x's must ascend
        else:
            mask = np.zeros((self.M, self.N), bool)
            np.put_along_axis(mask, sel, True, axis=1)
            mask[:self.empty_rows] = False
        if self.vector:
            x_values, x_idx, mask = x_values[0], x_idx[0], mask[0]
        return CompactRows(x_values, x_idx, self.K), w, mask


COMPACT_CASES = [
    CompactCase(1, 64, 48, 0.2, 0.3),
    CompactCase(1, 64, 48, 0.2, 0.3, vector=True),
    CompactCase(1, 64, 48, 0.2, 0.3, form="bool", vector=True),
    CompactCase(1, 300, 97, 0.1, 0.1),
    CompactCase(5, 37, 29, 0.2, 0.2),                   # nothing a multiple of a vector
    CompactCase(5, 37, 29, 1.0, 1.0, form="bool"),      # everything kept
    CompactCase(9, 131, 61, 0.05, 1.0),
    CompactCase(16, 64, 50, 0.5, 0.01),                 # one output per row
    CompactCase(16, 64, 50, 0.01, 0.5, form="bool"),    # one input per row
    CompactCase(12, 70, 40, 0.3, 0.3, form="bool", empty_rows=3),
    CompactCase(33, 96, 130, 0.1, 0.1, form="bool"),
    CompactCase(70, 17, 9, 0.5, 0.5),
    CompactCase(130, 200, 150, 0.1, 0.1),
]


#: The routine's paths: always gather, always scatter x to dense first, and its own choice.
PATHS = {"gather": dict(GATHER_MAX_DENSITY=100, GATHER_MIN_ROWS=1),
         "dense": dict(GATHER_MAX_DENSITY=0), "routine": {}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", COMPACT_CASES, ids=[c.label() for c in COMPACT_CASES])
def test_compact_product_matches_reference(queue, rng, case, path):
    x, w, mask = case.make(rng)
    ref = masked_matmul_reference(dense_of(x.values, x.idx, case.K), w, mask)
    with override("masked_compact_routine", **PATHS[path]):
        y = ps.masked_matmul(x, w, mask, queue=queue)
        dev = ps.masked_matmul(x.to_device(queue), cl_array.to_device(queue, w),
                               cl_array.to_device(queue, mask), queue=queue)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == ref.shape
    assert relative_error(y, ref) < TOL
    if mask.dtype == np.bool_:
        assert np.all(y[~mask] == 0)
    assert isinstance(dev, cl_array.Array)
    assert relative_error(dev.get(), ref) < TOL


def test_equals_the_dense_input_product(queue, rng):
    """The sparsity carried across a layer changes no result beyond float32 rounding."""
    x, w, mask = CompactCase(40, 256, 192, 0.1, 0.1).make(rng)
    weight = ps.MaskedLinearWeight(w, queue=queue)
    compact = ps.masked_matmul(x, weight, mask)
    dense = ps.masked_matmul(x.to_dense(), weight, mask)
    assert np.allclose(compact, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


CONFIGS = ([("masked_compact", dict(VEC=v, STREAM=s, WG=wg))
            for v in MASKED_COMPACT.params[0].candidates for s in (0, 1) for wg in (1, 16)]
           + [("masked_compact_tiled", p) for p in (
               dict(TEAM=4, TEAMS=2, KCHUNK=1024), dict(TEAM=32, TEAMS=4, KCHUNK=4096),
               dict(TEAM=8, TEAMS=16, KCHUNK=1024))])


@pytest.mark.parametrize("family,params", CONFIGS, ids=[f"{f} {p}" for f, p in CONFIGS])
def test_every_configuration_is_correct(queue, rng, family, params):
    # K = 2500 spans several of the tiled kernel's chunks; N = 37 is no multiple of a tile.
    for case in (CompactCase(7, 53, 37, 0.3, 0.2), CompactCase(7, 53, 37, 0.3, 0.2, "bool"),
                 CompactCase(9, 2500, 37, 0.05, 0.3), CompactCase(1, 70, 20, 0.5, 0.5)):
        x, w, mask = case.make(rng)
        with override(family, **params), override("masked_compact_routine",
                                                   **PATHS["gather"]):
            y = ps.masked_matmul(x, w, mask, queue=queue)
        ref = masked_matmul_reference(dense_of(x.values, x.idx, case.K), w, mask)
        assert relative_error(y, ref) < TOL, params


def test_out_argument_and_offsets(queue, rng):
    x, w, mask = CompactCase(6, 40, 30, 0.25, 0.3).make(rng)
    ref = masked_matmul_reference(dense_of(x.values, x.idx, 40), w, mask)
    out = np.full(ref.shape, np.nan, np.float32)
    assert ps.masked_matmul(x, w, mask, out=out, queue=queue) is out
    assert relative_error(out, ref) < TOL
    # Device arrays at offsets into larger buffers.
    pad = 5
    big_v = cl_array.to_device(queue, np.concatenate([np.zeros(pad, np.float32),
                                                      x.values.ravel()]))
    big_i = cl_array.to_device(queue, np.concatenate([np.zeros(pad, np.int32),
                                                      x.idx.ravel()]))
    xd = CompactRows(big_v[pad:].reshape(x.values.shape), big_i[pad:].reshape(x.idx.shape),
                     40)
    big_out = cl_array.to_device(queue, np.full(ref.size + pad, np.nan, np.float32))
    out_dev = big_out[pad:].reshape(ref.shape)
    ps.masked_matmul(xd, cl_array.to_device(queue, w), cl_array.to_device(queue, mask),
                     out=out_dev, queue=queue)
    assert relative_error(out_dev.get(), ref) < TOL
    assert np.isnan(big_out.get()[:pad]).all()          # nothing written before it


def test_zero_sizes(queue, rng):
    w = rng.standard_normal((8, 6)).astype(np.float32)
    empty_x = CompactRows(np.zeros((3, 0), np.float32), np.zeros((3, 0), np.int32), 8)
    y = ps.masked_matmul(empty_x, w, np.ones((3, 6), bool), queue=queue)
    assert np.array_equal(y, np.zeros((3, 6), np.float32))
    no_rows = CompactRows(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.int32), 8)
    assert ps.masked_matmul(no_rows, w, np.zeros((0, 3), np.int32), queue=queue).shape == (0, 3)


@pytest.mark.parametrize("path", PATHS)
def test_unchecked_bad_index_gives_nan_not_a_crash(queue, rng, path):
    x, w, mask = CompactCase(4, 50, 20, 0.2, 0.5).make(rng)
    idx = x.idx.copy()
    idx[2, -1] = 10 ** 6                         # far outside the weight row
    bad = CompactRows(cl_array.to_device(queue, x.values), cl_array.to_device(queue, idx),
                      50, check=False)
    with override("masked_compact_routine", **PATHS[path]):
        y = ps.masked_matmul(bad, cl_array.to_device(queue, w),
                             cl_array.to_device(queue, mask), queue=queue).get()
    assert np.isnan(y[2]).all()
    ref = masked_matmul_reference(dense_of(x.values, x.idx, 50), w, mask)
    assert relative_error(np.delete(y, 2, 0), np.delete(ref, 2, 0)) < TOL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad,fragment", [("range", "must lie in"), ("repeat", "repeats")])
def test_bad_device_output_masks_are_caught(queue, rng, bad, fragment, path):
    x, w, mask = CompactCase(5, 30, 20, 0.3, 0.3).make(rng)
    if bad == "range":
        mask[3, 1] = 20
    else:
        mask[4, 2] = mask[4, 0]
    with pytest.raises(ValueError, match=fragment), \
            override("masked_compact_routine", **PATHS[path]):
        ps.masked_matmul(x.to_device(queue), cl_array.to_device(queue, w),
                         cl_array.to_device(queue, mask), queue=queue)


def test_routine_gathers_only_where_it_pays(queue, rng, monkeypatch):
    """x denser than GATHER_MAX_DENSITY, or fewer rows than GATHER_MIN_ROWS, is scattered
    to dense; otherwise the gather kernel runs."""
    from pysparsecl.families import compact_util, masked_compact
    launched = []
    monkeypatch.setattr(compact_util, "scatter",
                        lambda *a, real=compact_util.scatter, **k: (launched.append("dense"),
                                                                    real(*a, **k))[1])
    monkeypatch.setattr(masked_compact, "launch",
                        lambda *a, real=masked_compact.launch, **k: (launched.append("gather"),
                                                                     real(*a, **k))[1])
    settings = dict(KERNEL=0, GATHER_MAX_DENSITY=12, GATHER_MIN_ROWS=4)
    for case, want in ((CompactCase(6, 100, 30, 0.1, 0.3), "gather"),
                       (CompactCase(6, 100, 30, 0.13, 0.3), "dense"),
                       (CompactCase(3, 100, 30, 0.1, 0.3), "dense")):
        x, w, mask = case.make(rng)
        launched.clear()
        with override("masked_compact_routine", **settings):
            y = ps.masked_matmul(x, w, mask, queue=queue)
        assert launched == [want], case.label()
        assert relative_error(y, masked_matmul_reference(
            dense_of(x.values, x.idx, case.K), w, mask)) < TOL


def test_bad_product_operands_name_the_argument(queue, rng):
    x, w, mask = CompactCase(4, 30, 20, 0.3, 0.3).make(rng)
    with pytest.raises(ValueError, match=r"K = 30 \(x's n_cols\)"):
        ps.masked_matmul(x, w[:29], mask, queue=queue)
    with pytest.raises(ValueError, match="mask has 3 rows but x has 4"):
        ps.masked_matmul(x, w, mask[:3], queue=queue)
    with pytest.raises(ValueError, match="out must have shape"):
        ps.masked_matmul(x, w, mask, out=np.zeros((4, 5), np.float32), queue=queue)
    with pytest.raises(TypeError, match="same kind of container"):
        ps.masked_matmul(x, w, mask, out=cl_array.zeros(queue, mask.shape, np.float32),
                         queue=queue)


# ---------------------------------------------------------------------------------------
# The backward of the product of a compact x

BACKWARD_CASES = [CompactCase(9, 70, 40, 0.2, 0.25), CompactCase(9, 70, 40, 0.2, 0.25, "bool"),
                  CompactCase(5, 2500, 20, 0.05, 0.3),          # several tiled row chunks
                  CompactCase(1, 50, 30, 0.3, 0.3, vector=True),
                  CompactCase(1, 50, 30, 0.3, 0.3, "bool", vector=True),
                  CompactCase(12, 33, 20, 0.5, 0.3, "bool", empty_rows=4),
                  CompactCase(40, 130, 70, 0.05, 0.1)]


def backward_reference(dy, x: CompactRows, w, mask):
    """(dx at x's entries, dw) in float64, from the dense batch x stands for."""
    from pysparsecl.testing.reference import masked_matmul_backward_reference
    rdx, rdw = masked_matmul_backward_reference(dy, dense_of(x.values, x.idx, x.n_cols), w,
                                                mask)
    rdx_at = np.take_along_axis(np.atleast_2d(rdx), np.atleast_2d(x.idx), 1)
    return rdx_at.reshape(x.values.shape), rdw


DW_FAMILIES = [("masked_compact_dw", {}), ("masked_compact_dw_tiled", dict(WG=32,
                                                                            KCHUNK=1024)),
               ("masked_compact_dw_tiled", dict(WG=128, KCHUNK=4096)),
               ("masked_compact_dw_routine", dict(GATHER_MAX_DENSITY=0))]   # x densified


@pytest.mark.parametrize("family,params", DW_FAMILIES, ids=[f"{f} {p}" for f, p in DW_FAMILIES])
@pytest.mark.parametrize("dw_rows", [False, True])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c.label() for c in BACKWARD_CASES])
def test_backward_matches_reference(queue, rng, case, dw_rows, family, params):
    x, w, mask = case.make(rng)
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    ref_dx, ref_dw = backward_reference(dy, x, w, mask)
    ref_dw = ref_dw.T if dw_rows else ref_dw
    gather = {} if family.endswith("routine") else dict(GATHER_MAX_DENSITY=100)
    with override(family, **params), override("masked_compact_dw_routine", **gather):
        dx, dw = ps.masked_matmul_backward(dy, x, w, mask, dw_rows=dw_rows, queue=queue)
        ddx, ddw = ps.masked_matmul_backward(
            cl_array.to_device(queue, dy), x.to_device(queue), cl_array.to_device(queue, w),
            cl_array.to_device(queue, mask), dw_rows=dw_rows, queue=queue)
    assert isinstance(dx, CompactRows) and dx.idx is x.idx and dx.n_cols == case.K
    assert relative_error(dx.values, ref_dx) < TOL and relative_error(dw, ref_dw) < TOL
    assert ddx.is_device and isinstance(ddw, cl_array.Array)
    assert relative_error(ddx.values.get(), ref_dx) < TOL
    assert relative_error(ddw.get(), ref_dw) < TOL


def test_backward_without_dx_and_into_a_gradient_view(queue, rng):
    x, w, mask = CompactCase(8, 60, 30, 0.2, 0.3, "bool").make(rng)
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    _, ref_dw = backward_reference(dy, x, w, mask)
    dx, dw = ps.masked_matmul_backward(dy, x, None, mask, need_dx=False, queue=queue)
    assert dx is None and relative_error(dw, ref_dw) < TOL
    # dw^T into a view inside a larger buffer, at an offset off and on the alignment.
    for pad in (3, 1024):
        grads = cl_array.to_device(queue, np.full(pad + 30 * 60 + 7, np.nan, np.float32))
        view = grads[pad:pad + 30 * 60].reshape(30, 60)
        ps.masked_matmul_backward(cl_array.to_device(queue, dy), x.to_device(queue),
                                  cl_array.to_device(queue, w), cl_array.to_device(queue, mask),
                                  need_dx=False, dw_rows=True, dw_out=view, queue=queue)
        got = grads.get()
        assert relative_error(got[pad:pad + 30 * 60].reshape(30, 60), ref_dw.T) < TOL
        assert np.isnan(got[:pad]).all() and np.isnan(got[pad + 30 * 60:]).all()


def test_backward_is_deterministic(queue, rng):
    x, w, mask = CompactCase(64, 200, 100, 0.2, 0.3).make(rng)
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    first = ps.masked_matmul_backward(dy, x, w, mask, queue=queue)
    again = ps.masked_matmul_backward(dy, x, w, mask, queue=queue)
    assert np.array_equal(first[1], again[1])
    assert np.array_equal(first[0].values, again[0].values)


def test_backward_bad_operands_name_the_argument(queue, rng):
    x, w, mask = CompactCase(4, 30, 20, 0.3, 0.3).make(rng)
    dy = rng.standard_normal(mask.shape, dtype=np.float32)
    with pytest.raises(ValueError, match="dy must have shape"):
        ps.masked_matmul_backward(dy[:, :-1], x, w, mask, queue=queue)
    with pytest.raises(ValueError, match=r"K = 30"):
        ps.masked_matmul_backward(dy, x, w[:20], mask, queue=queue)
    with pytest.raises(TypeError, match="w is required"):
        ps.masked_matmul_backward(dy, x, None, mask, queue=queue)
    with pytest.raises(TypeError, match="dw_out is for device calls"):
        ps.masked_matmul_backward(dy, x, w, mask, dw_out=cl_array.zeros(queue, (30, 20),
                                                                        np.float32))


@pytest.mark.parametrize("relu", [False, True])
def test_add_bias(queue, rng, relu):
    idx = ascending_idx(rng, 5, 30, 8)
    values = rng.standard_normal((5, 8)).astype(np.float32)
    b = rng.standard_normal(30).astype(np.float32)
    want = values + b[idx]
    want = np.maximum(want, 0) if relu else want
    host = CompactRows(values, idx, 30).add_bias(b, relu=relu)
    assert host.idx is idx and np.allclose(host.values, want, atol=1e-6)
    dev = CompactRows(cl_array.to_device(queue, values), cl_array.to_device(queue, idx), 30)
    same = dev.add_bias(cl_array.to_device(queue, b), relu=relu, out=dev.values)
    assert same.values is dev.values and np.allclose(dev.values.get(), want, atol=1e-6)
    with pytest.raises(ValueError, match=r"b must have shape \(30,\)"):
        CompactRows(values, idx, 30).add_bias(b[:5])
    with pytest.raises(TypeError, match="same kind of container"):
        dev.add_bias(b)


def test_unverified_device_mask_needs_no_read_back(queue, rng):
    """verify_mask=False: a good device index mask gives the same result without the
    validation's read back, so the call can be recorded in a LaunchGraph."""
    x, w, mask = CompactCase(6, 40, 30, 0.25, 0.3).make(rng)
    xd, wd, md = x.to_device(queue), cl_array.to_device(queue, w), \
        cl_array.to_device(queue, mask)
    want = ps.masked_matmul(xd, wd, md, queue=queue).get()
    graph = ps.LaunchGraph(queue, inputs=(xd.values,))
    with graph:
        got = ps.masked_matmul(xd, wd, md, verify_mask=False, queue=queue)
    graph.replay(xd.values)
    assert np.array_equal(got.get(), want)
    with pytest.raises(NotImplementedError), ps.LaunchGraph(queue, inputs=(xd.values,)):
        ps.masked_matmul(xd, wd, md, queue=queue)      # verifying needs the host
    with pytest.raises(TypeError, match="verify_mask must be a bool"):
        ps.masked_matmul(xd, wd, md, verify_mask=None, queue=queue)
