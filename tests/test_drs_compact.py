"""The dimension-reduction search on compact inputs (CompactRows x): the projection by
drs_project_compact against float64 references and against the dense projection of the
same rows, and drs_mask's selection against that of x's dense form."""

import numpy as np
import pyopencl.array as cl_array
import pytest
from conftest import SAMPLE_WG_LIMIT

import pysparsecl as ps
from pysparsecl import CompactRows, runtime
from pysparsecl.families import drs_project_compact
from pysparsecl.ops.drs import DRS_PROJECT_COMPACT, keep_count, project_compact_shape_class
from pysparsecl.testing.cases import compact_rows
from pysparsecl.testing.problems import selection_check
from pysparsecl.testing.reference import relative_error, topk_mask_reference
from pysparsecl.tuning import override


def _batch(rng, m, d, nx):
    """A host CompactRows (m rows of d, nx entries each) and its dense float32 form."""
    values, idx = compact_rows(rng, m, d, nx)
    x = CompactRows(values, idx, d)
    return x, x.to_dense()


def _device(queue, x: CompactRows, offset=False) -> CompactRows:
    """x with pyopencl arrays; ``offset``: views that start one row into their buffers."""
    if not offset:
        return x.to_device(queue)
    pad = [np.concatenate([a[:1], a]) for a in x.rows()]
    values, idx = (cl_array.to_device(queue, a)[1:] for a in pad)
    assert (values.offset and idx.offset) or not x.n_keep
    return CompactRows(values, idx, x.n_cols)


def _reference(proj, dense):
    return proj.scale * np.atleast_2d(dense).astype(np.float64) @ proj.matrix().toarray().T


def _to_dense_mask(mask, n):
    mask = np.atleast_2d(mask)
    if mask.dtype == np.bool_:
        return mask
    out = np.zeros((mask.shape[0], n), bool)
    np.put_along_axis(out, mask.astype(np.int64), True, axis=1)
    return out


#: (M, d, k, entries per row): partial row blocks, k not a multiple of any vector (ragged),
#: no entries, every entry, one row, k above the accumulator budget of one work-item.
SHAPES = [(9, 40, 7, 5), (13, 100, 21, 10), (5, 33, 6, 0), (6, 20, 5, 20), (1, 64, 13, 9),
          (37, 300, 67, 30), (4, 500, 300, 50)]


# ---------------------------------------------------------------------------------------------
# The projection

@pytest.mark.parametrize("m,d,k,nx", SHAPES, ids=[str(s) for s in SHAPES])
def test_projection_matches_float64_reference_and_the_dense_projection(queue, rng, m, d, k,
                                                                        nx):
    x, dense = _batch(rng, m, d, nx)
    proj = ps.SparseRandomProjection(d, k=k, seed=int(rng.integers(1 << 30)), queue=queue)
    want = _reference(proj, dense)
    got = proj.project(x)
    assert isinstance(got, np.ndarray) and got.shape == (m, k) and got.dtype == np.float32
    assert relative_error(got, want) < 1e-5 or not nx
    if not nx:
        assert not got.any()
    # Summed in drs_project's order (over d ascending, from zero): bit for bit.
    with override("drs_project"):
        np.testing.assert_array_equal(got, proj.project(dense))
    for offset in (False, True):
        dev = proj.project(_device(queue, x, offset))
        assert isinstance(dev, cl_array.Array) and dev.shape == (m, k)
        np.testing.assert_array_equal(dev.get(), got)
    # The padded form the search takes: (M, k_pad), padding columns zero.
    padded = proj.project_rows(_device(queue, x)).get()
    assert padded.shape[0] == m and padded.shape[1] >= k
    np.testing.assert_array_equal(padded[:, :k], got)
    assert not padded[:, k:].any()


def test_vector_projection(queue, rng):
    x, dense = _batch(rng, 1, 50, 7)
    vec = CompactRows(x.values[0], x.idx[0], 50)
    proj = ps.SparseRandomProjection(50, k=11, seed=2, queue=queue)
    got = proj.project(vec)
    assert got.shape == (11,)
    with override("drs_project"):     # the CPU-shaped dense kernel sums in the same order
        np.testing.assert_array_equal(got, proj.project(dense)[0])
    dev = proj.project(vec.to_device(queue))
    assert dev.shape == (11,)
    np.testing.assert_array_equal(dev.get(), got)


CONFIGS = DRS_PROJECT_COMPACT.sample(6, seed=31, max_work_group_size=SAMPLE_WG_LIMIT)


@pytest.mark.parametrize("params", CONFIGS,
                         ids=[",".join(f"{k}={v}" for k, v in p.items()) for p in CONFIGS])
def test_every_tile_configuration_is_bitwise_the_dense_projection(queue, rng, params):
    for m, d, k, nx in ((1, 70, 19, 9), (13, 70, 19, 30), (8, 200, 67, 20)):
        x, dense = _batch(rng, m, d, nx)
        proj = ps.SparseRandomProjection(d, k=k, seed=5, queue=queue)
        with override("drs_project"):
            want = proj.project(dense)
        with override("drs_project_compact", **params):
            got = proj.project(_device(queue, x, offset=True)).get()
            padded = proj.project_rows(x.to_device(queue)).get()
        np.testing.assert_array_equal(got, want)
        k_pad = padded.shape[1]
        assert k_pad % drs_project_compact.k_chunk(params, k) == 0 and k <= k_pad
        assert not padded[:, k:].any()


def test_k_chunk_with_kvec_zero_covers_k_within_the_register_budget():
    for vec, rows, k, want in ((16, 2, 67, 80), (16, 4, 67, 96), (16, 1, 56, 64),
                               (4, 1, 67, 72), (16, 8, 300, 320), (1, 1, 5, 5)):
        p = DRS_PROJECT_COMPACT.check(dict(VEC=vec, ROWS=rows, KVEC=0))
        per_item = drs_project_compact.vectors_per_item(p, k)
        assert rows * per_item <= drs_project_compact.MAX_ACCUMULATORS
        assert -(-k // drs_project_compact.k_chunk(p, k)) * drs_project_compact.k_chunk(p, k) \
            == want
    assert project_compact_shape_class(128, 410) == "rows-m128-nnz256"
    assert project_compact_shape_class(1, 0) == "rows-m1-nnz1"


def test_an_index_outside_d_gives_nan_and_reads_nothing_out_of_bounds(queue, rng):
    x, dense = _batch(rng, 6, 30, 4)
    idx = x.idx.copy()
    idx[1, 3], idx[4, 0] = 30, -7
    proj = ps.SparseRandomProjection(30, k=9, seed=1, queue=queue)
    for container in ("host", "device"):
        if container == "host":
            bad = CompactRows(x.values, idx, 30, check=False)
        else:
            bad = CompactRows(cl_array.to_device(queue, x.values),
                              cl_array.to_device(queue, idx), 30, check=False)
        got = proj.project(bad)
        got = got if container == "host" else got.get()
        assert np.isnan(got[[1, 4]]).all()
        fine = [0, 2, 3, 5]
        with override("drs_project"):
            np.testing.assert_array_equal(got[fine], proj.project(dense[fine]))


# ---------------------------------------------------------------------------------------------
# The search

#: (M, d, N, k, entries per row, sparsity): one row (drs_fused for the dense x), a few,
#: many; no entries, every entry; ragged k; keep-everything.
SEARCHES = [(1, 96, 131, 24, 10, 0.9), (3, 96, 131, 24, 10, 0.5), (50, 96, 131, 24, 10, 0.9),
            (9, 40, 30, 7, 0, 0.7), (6, 20, 70, 5, 20, 0.9), (128, 400, 256, 41, 40, 0.9),
            (4, 30, 12, 6, 3, 0.0)]


@pytest.mark.parametrize("m,d,n,k,nx,sparsity", SEARCHES, ids=[str(s) for s in SEARCHES])
def test_selection_equals_that_of_the_dense_x(queue, rng, m, d, n, k, nx, sparsity):
    x, dense = _batch(rng, m, d, nx)
    w = rng.standard_normal((d, n), dtype=np.float32)
    proj = ps.SparseRandomProjection(d, k=k, seed=int(rng.integers(1 << 30)), queue=queue)
    pw = proj.project_weight(w)
    n_keep = keep_count(sparsity, n)
    for compact in (False, True):
        got = ps.drs_mask(x, w, sparsity, projection=proj, compact=compact)
        assert isinstance(got, np.ndarray)
        assert got.shape == ((m, n_keep) if compact else (m, n))
        np.testing.assert_array_equal(_to_dense_mask(got, n).sum(1), n_keep)
        # The dense search with drs_project (or drs_fused for a few rows): the same sums.
        with override("drs_project"):
            np.testing.assert_array_equal(got, ps.drs_mask(dense, w, sparsity,
                                                           projection=proj, compact=compact))
        # The device's own routine (drs_project_split on GPUs sums in another order).
        assert selection_check()(_to_dense_mask(got, n), _to_dense_mask(
            ps.drs_mask(dense, w, sparsity, projection=proj, compact=compact), n)) == ""
        dev = ps.drs_mask(_device(queue, x, offset=True), None, sparsity, projection=pw,
                          compact=compact)
        assert isinstance(dev, cl_array.Array)
        np.testing.assert_array_equal(dev.get(), got)


def test_vector_compact_x_gives_a_one_dimensional_mask(queue, rng):
    x, dense = _batch(rng, 1, 80, 8)
    vec = CompactRows(x.values[0], x.idx[0], 80)
    w = rng.standard_normal((80, 60), dtype=np.float32)
    proj = ps.SparseRandomProjection(80, seed=4, queue=queue)
    mask = ps.drs_mask(vec, w, 0.8, projection=proj)
    assert mask.shape == (60,) and mask.dtype == np.bool_
    with override("drs_project"):
        np.testing.assert_array_equal(mask, ps.drs_mask(dense[0], w, 0.8, projection=proj))
    out = cl_array.empty(queue, (keep_count(0.8, 60),), np.int32)
    got = ps.drs_mask(vec.to_device(queue), w, 0.8, projection=proj, compact=True, out=out)
    assert got is out
    np.testing.assert_array_equal(_to_dense_mask(out.get(), 60)[0], mask)
    host_out = np.zeros(60, bool)
    assert ps.drs_mask(vec, w, 0.8, projection=proj, out=host_out) is host_out
    np.testing.assert_array_equal(host_out, mask)


def test_exact_projection_gives_the_true_top_k(queue, rng):
    m, d, n = 7, 30, 40
    values, idx = compact_rows(rng, m, d, 6)
    values = rng.integers(-3, 4, values.shape).astype(np.float32)   # exact products, ties
    x = CompactRows(values, idx, d)
    dense = x.to_dense()
    w = rng.integers(-3, 4, (d, n)).astype(np.float32)
    proj = ps.SparseRandomProjection(d, exact=True, queue=queue)
    want = topk_mask_reference(dense.astype(np.float64) @ w, keep_count(0.7, n))
    np.testing.assert_array_equal(ps.drs_mask(x, w, 0.7, projection=proj), want)
    pw = proj.project_weight(w)
    got = ps.drs_mask(x.to_device(queue), None, 0.7, projection=pw, compact=True)
    np.testing.assert_array_equal(_to_dense_mask(got.get(), n), want)
    wide = ps.SparseRandomProjection(d, k=d + 5, exact=True, queue=queue)
    np.testing.assert_array_equal(wide.project(x), wide.project(dense))
    np.testing.assert_array_equal(wide.project(x.to_device(queue)).get(), wide.project(dense))
    with pytest.raises(ValueError, match="exact projection has no padded form"):
        proj.project_rows(x.to_device(queue))


def test_x_projected_from_project_rows(queue, rng):
    x, dense = _batch(rng, 20, 64, 8)
    w = rng.standard_normal((64, 90), dtype=np.float32)
    proj = ps.SparseRandomProjection(64, seed=9, queue=queue)
    pw = proj.project_weight(w)
    xd = x.to_device(queue)
    events = []
    xp = proj.project_rows(xd, events=events)
    assert len(events) == 1            # one launch: drs_project_compact
    builds = runtime.build_count
    got = ps.drs_mask(xd, None, 0.9, projection=pw, x_projected=xp, compact=True)
    assert runtime.build_count == builds
    np.testing.assert_array_equal(got.get(), ps.drs_mask(x, w, 0.9, projection=proj,
                                                         compact=True))
    with pytest.raises(ValueError, match="x_projected needs a 2-D device x"):
        ps.drs_mask(x, None, 0.9, projection=pw, x_projected=xp)


def test_search_events_and_hot_call(queue, rng):
    x, _ = _batch(rng, 16, 128, 12)
    w = rng.standard_normal((128, 64), dtype=np.float32)
    proj = ps.SparseRandomProjection(128, seed=3, queue=queue)
    pw = proj.project_weight(w)
    xd = x.to_device(queue)
    ps.drs_mask(xd, None, 0.9, projection=pw).get()
    builds, events = runtime.build_count, []
    ps.drs_mask(xd, None, 0.9, projection=pw, events=events).get()
    assert runtime.build_count == builds          # a hot call only launches
    assert len(events) == 3                       # projection, scores, top-k


# ---------------------------------------------------------------------------------------------
# Bad input

def _cx(m=4, d=6, nx=2):
    return CompactRows(np.ones((m, nx), np.float32), np.tile(np.arange(nx, dtype=np.int32),
                                                            (m, 1)), d)


def test_bad_inputs_raise_clearly(queue):
    proj = ps.SparseRandomProjection(6, k=3, seed=0, queue=queue)
    w = np.ones((6, 10), np.float32)
    with pytest.raises(ValueError, match=r"z \(a CompactRows\) must have n_cols = d = 6, got 7"):
        proj.project(_cx(d=7))
    with pytest.raises(ValueError, match=r"x \(a CompactRows\) must have n_cols = d = 6, got 5"):
        proj.project_rows(_cx(d=5).to_device(queue))
    with pytest.raises(TypeError, match="x must be a CompactRows of pyopencl arrays"):
        proj.project_rows(_cx())
    with pytest.raises(ValueError, match="x must be 2-D"):
        proj.project_rows(CompactRows(cl_array.zeros(queue, 2, np.float32),
                                      cl_array.arange(queue, 2, dtype=np.int32), 6))
    with pytest.raises(ValueError, match=r"w must have shape \(d, N\) with d = 7 \(the columns "
                                         r"of x, its n_cols\)"):
        ps.drs_mask(_cx(d=7), w, 0.5, queue=queue)
    with pytest.raises(ValueError, match=r"x \(a CompactRows\) has n_cols = 7 but the "
                                         r"projection has d = 6"):
        ps.drs_mask(_cx(d=7), None, 0.5, projection=proj.project_weight(w))
    with pytest.raises(ValueError, match=r"out must have shape \(4, 5\)"):
        ps.drs_mask(_cx(), w, 0.5, compact=True, out=np.zeros((4, 10), np.int32), seed=1,
                    queue=queue)
    with pytest.raises(TypeError, match="out must be the same kind of container"):
        ps.drs_mask(_cx().to_device(queue), w, 0.5, out=np.zeros((4, 10), bool), seed=1)
    # and the library still works
    assert ps.drs_mask(_cx(), w, 0.5, seed=1, queue=queue).sum() == 4 * 5


def test_defaults_and_samples_render_and_build(queue):
    for params in [DRS_PROJECT_COMPACT.defaults()] + CONFIGS:
        for k in (1, 7, 67, 300):
            runtime.build_program(queue.context, runtime.render(
                drs_project_compact.TEMPLATE, **drs_project_compact.template_args(params, k)))
