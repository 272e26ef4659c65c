"""Dimension-reduction search (drs_mask, SparseRandomProjection) against float64 references."""

import math

import numpy as np
import pyopencl.array as cl_array
import pytest
from conftest import SAMPLE_WG_LIMIT

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.families import (
    drs_fused,
    drs_project,
    drs_project_split,
    drs_scores,
    drs_topk,
    drs_topk_team,
)
from pysparsecl.ops.drs import (
    DRS_FUSED,
    DRS_PROJECT,
    DRS_PROJECT_SPLIT,
    DRS_SCORES,
    DRS_TOPK,
    DRS_TOPK_TEAM,
    JL_CONSTANT,
    PAD_TRANSPOSE_ARGS,
    default_k,
    keep_count,
    project_shape_class,
)
from pysparsecl.testing.cases import ConvCase
from pysparsecl.testing.reference import drs_scores_reference, relative_error, topk_mask_reference
from pysparsecl.tuning import override


def _dense(mask, n_cols):
    """A bool (M, N) mask from either form (compact indices must ascend in each row)."""
    mask = np.atleast_2d(mask)
    if mask.dtype == np.bool_:
        return mask
    assert np.all(np.diff(mask, axis=1) > 0), "compact indices must ascend"
    dense = np.zeros((mask.shape[0], n_cols), bool)
    np.put_along_axis(dense, mask.astype(np.int64), True, axis=1)
    return dense


def _int_data(rng, m, d, n):
    """Small integers: every product is exact in float32, and ties are frequent."""
    x = rng.integers(-3, 4, (m, d)).astype(np.float32)
    w = rng.integers(-3, 4, (d, n)).astype(np.float32)
    return x, w


# ---------------------------------------------------------------------------------------------
# The projection

def test_projection_entries_have_the_specified_distribution():
    proj = ps.SparseRandomProjection(3000, k=200, seed=7)
    r = proj.matrix().toarray()
    assert r.shape == (200, 3000)
    s3 = math.sqrt(3)
    values, counts = np.unique(r, return_counts=True)
    np.testing.assert_allclose(values, [-s3, 0.0, s3])
    frac = counts / r.size
    # 600 000 entries: the standard error of each fraction is ~5e-4; the bound is 20x that.
    np.testing.assert_allclose(frac, [1 / 6, 2 / 3, 1 / 6], atol=0.01)
    # Signs are balanced within each row too (no row is all positive).
    assert np.all(np.abs((r > 0).sum(1) - (r < 0).sum(1)) < 0.2 * 3000 / 3)
    # Stored sparsely, reproducible from the seed, independent across seeds.
    assert proj.matrix().nnz == np.count_nonzero(r)
    again = ps.SparseRandomProjection(3000, 200, seed=7).matrix().toarray()
    np.testing.assert_array_equal(again, r)
    assert not np.array_equal(ps.SparseRandomProjection(3000, 200, seed=8).matrix().toarray(), r)
    fresh = ps.SparseRandomProjection(50, k=10)
    np.testing.assert_array_equal(
        ps.SparseRandomProjection(50, k=10, seed=fresh.seed).matrix().toarray(),
        fresh.matrix().toarray())


def test_default_k_and_exact_mode():
    for d, eps in ((256, 0.5), (1024, 0.5), (4096, 0.5), (2304, 0.3), (10, 0.5), (1, 0.5)):
        want = min(d, max(1, math.ceil(JL_CONSTANT * math.log(d) / eps ** 2)))
        assert default_k(d, eps) == want
        assert ps.SparseRandomProjection(d, eps=eps, seed=0).k == want
    assert default_k(4096) == 67 and default_k(1024) == 56
    exact = ps.SparseRandomProjection(12, exact=True)
    assert exact.k == 12 and exact.scale == 1.0
    np.testing.assert_array_equal(exact.matrix().toarray(), np.eye(12))
    np.testing.assert_array_equal(ps.SparseRandomProjection(5, k=7, exact=True).matrix()
                                  .toarray(), np.eye(7, 5))


@pytest.mark.parametrize("split,rows_per_tile,vec,kvec",
                         [(32, 1, 4, 1), (64, 2, 8, 2), (128, 4, 4, 4), (256, 1, 16, 1)])
def test_split_d_projection(queue, rng, split, rows_per_tile, vec, kvec):
    """The GPU-shaped projection (DSPLIT items per output tile, reduced in local memory):
    rows and weights, d shorter and longer than DSPLIT, row counts that leave a partial
    row block."""
    with override("drs_project_split", DSPLIT=split, ROWS=rows_per_tile, VEC=vec, KVEC=kvec):
        for d, rows, k in ((17, 3, 5), (300, 7, 21), (1030, 1, 40)):
            proj = ps.SparseRandomProjection(d, k=k, seed=int(rng.integers(1 << 30)),
                                             queue=queue)
            z = rng.standard_normal((rows, d), dtype=np.float32)
            r = proj.matrix().toarray()
            assert relative_error(proj.project(z), proj.scale * z.astype(np.float64) @ r.T) \
                < 1e-5
            w = rng.standard_normal((d, 19), dtype=np.float32)
            assert relative_error(proj.project_weight(w).to_numpy(),
                                  proj.scale * r @ w.astype(np.float64)) < 1e-5


@pytest.mark.parametrize("rows", [1, 5, 37])
def test_project_matches_reference(queue, rng, rows):
    proj = ps.SparseRandomProjection(90, k=21, seed=int(rng.integers(1 << 30)), queue=queue)
    z = rng.standard_normal((rows, 90), dtype=np.float32)
    ref = proj.scale * z.astype(np.float64) @ proj.matrix().toarray().T
    fz = proj.project(z)
    assert fz.shape == (rows, 21) and fz.dtype == np.float32
    assert relative_error(fz, ref) < 1e-5
    fz_dev = proj.project(cl_array.to_device(queue, z))
    assert isinstance(fz_dev, cl_array.Array) and fz_dev.shape == (rows, 21)
    assert relative_error(fz_dev.get(), ref) < 1e-5
    assert relative_error(proj.project(z[0]), ref[0]) < 1e-5
    w = rng.standard_normal((90, 33), dtype=np.float32)
    fw = proj.project_weight(w).to_numpy()
    assert fw.shape == (21, 33)
    assert relative_error(fw, proj.scale * proj.matrix().toarray() @ w.astype(np.float64)) < 1e-5
    weight = ps.MaskedLinearWeight(w, queue=queue)
    np.testing.assert_allclose(proj.project_weight(weight).to_numpy(), fw, rtol=1e-6, atol=1e-6)


def test_inner_product_estimate_is_unbiased_and_improves_with_k(queue):
    """<f(x), f(w)> over independent projections: mean ~ <x, w>, error ~ 1/sqrt(k)."""
    rng = np.random.default_rng(20240601)   # fixed: a statistical test with fixed bounds
    d = 64
    x = rng.standard_normal(d)
    w = rng.standard_normal(d)
    x /= np.linalg.norm(x)
    w -= (w @ x) * x
    w = 0.5 * x + math.sqrt(0.75) * w / np.linalg.norm(w)      # |x| = |w| = 1, <x, w> = 0.5
    pair = np.stack([x, w]).astype(np.float32)
    mse = {}
    for k in (4, 16, 64):
        est = []
        for seed in range(300):
            proj = ps.SparseRandomProjection(d, k=k, seed=1000 * k + seed, queue=queue)
            fx, fw = proj.project(pair)
            est.append(float(np.dot(fx.astype(np.float64), fw)))
        est = np.array(est)
        # Var = (|x|^2 |w|^2 + <x, w>^2) / k = 1.25 / k; the mean's bound is 5 standard errors.
        assert abs(est.mean() - 0.5) < 5 * math.sqrt(1.25 / k / len(est)), (k, est.mean())
        mse[k] = float(np.mean((est - 0.5) ** 2))
        assert 0.4 * 1.25 / k < mse[k] < 2.0 * 1.25 / k, (k, mse[k])
    assert mse[64] < mse[16] < mse[4]


# ---------------------------------------------------------------------------------------------
# The search

def test_keep_count_is_exact():
    assert keep_count(0.8, 10) == 2          # float arithmetic would give 3
    assert keep_count(0.9, 4096) == 410
    assert keep_count(0.0, 37) == 37
    assert keep_count(0.999, 10) == 1
    assert keep_count(0.5, 0) == 0


EXACT_CASES = [(1, 24, 40, 0.5), (1, 24, 40, 0.0), (1, 24, 40, 0.99), (3, 17, 33, 0.7),
               (9, 30, 100, 0.9), (40, 12, 20, 0.25), (70, 8, 257, 0.97)]


@pytest.mark.parametrize("compact", [False, True], ids=["bool", "compact"])
@pytest.mark.parametrize("m,d,n,sparsity", EXACT_CASES, ids=[str(c) for c in EXACT_CASES])
def test_exact_mode_gives_the_true_top_k(queue, rng, m, d, n, sparsity, compact):
    x, w = _int_data(rng, m, d, n)
    proj = ps.SparseRandomProjection(d, exact=True, queue=queue)
    mask = ps.drs_mask(x, w, sparsity, projection=proj, compact=compact)
    n_keep = keep_count(sparsity, n)
    assert mask.dtype == (np.int32 if compact else np.bool_)
    assert mask.shape == (m, n_keep if compact else n)
    dense = _dense(mask, n)
    np.testing.assert_array_equal(dense.sum(1), n_keep)
    np.testing.assert_array_equal(dense, topk_mask_reference(x.astype(np.float64) @ w, n_keep))


def _check_search(mask, x, w, proj, sparsity):
    """Exactly n_keep per row, and the kept entries are the largest reference scores (up to
    float32 rounding at the boundary)."""
    n = w.shape[1]
    n_keep = keep_count(sparsity, n)
    dense = _dense(mask, n)
    np.testing.assert_array_equal(dense.sum(1), n_keep)
    scores = drs_scores_reference(np.atleast_2d(x), w, proj.matrix().toarray(), proj.scale)
    tol = 1e-4 * np.abs(scores).max(axis=1)
    kth = -np.sort(-scores, axis=1)[:, n_keep - 1]
    assert np.all(np.where(dense, scores, np.inf) >= (kth - tol)[:, None])
    assert np.all(np.where(dense, -np.inf, scores) <= (kth + tol)[:, None])
    return dense


@pytest.mark.parametrize("m", [1, 2, 3, 6, 50])
def test_random_projection_search_matches_reference(queue, rng, m):
    d, n = 96, 131
    x = rng.standard_normal((m, d), dtype=np.float32)
    w = rng.standard_normal((d, n), dtype=np.float32)
    proj = ps.SparseRandomProjection(d, k=24, seed=int(rng.integers(1 << 30)), queue=queue)
    for sparsity in (0.9, 0.5):
        dense = _check_search(ps.drs_mask(x, w, sparsity, projection=proj), x, w, proj,
                              sparsity)
        idx = ps.drs_mask(x, w, sparsity, projection=proj, compact=True)
        np.testing.assert_array_equal(_dense(idx, n), dense)


def test_row_and_weight_projections_use_their_own_shape_classes(queue, rng, monkeypatch):
    """The weight's projection and the rows' look up DRS_PROJECT under their own shape
    classes; entries that differ (here in the padding of k, VEC * KVEC) still give the
    reference search."""
    from pysparsecl import tuning
    weight_p = DRS_PROJECT.check(dict(VEC=16, KVEC=4, ROWS=2, WG=2))      # k padded to 64
    rows_p = DRS_PROJECT.check(dict(VEC=4, KVEC=1, ROWS=4, WG=1))         # k padded to 4s
    kind = runtime.device_kind(queue.device)
    entry = {"params": DRS_PROJECT.defaults(),
             "shapes": {project_shape_class(None, 96): {"params": weight_p},
                        project_shape_class(40, 96): {"params": rows_p}}}
    monkeypatch.setattr(tuning, "_shipped", {"drs_project": {kind: entry}})
    monkeypatch.setattr(tuning, "_memo", {})
    monkeypatch.setattr(tuning, "read_user_database", lambda device: {})
    seen = []
    real_lookup = tuning.lookup

    def spy(spec, device, shape_class=None, copy=True):
        if spec is DRS_PROJECT:
            seen.append(shape_class)
        return real_lookup(spec, device, shape_class, copy)

    monkeypatch.setattr(tuning, "lookup", spy)
    d, n, m = 96, 131, 40
    x = rng.standard_normal((m, d), dtype=np.float32)
    w = rng.standard_normal((d, n), dtype=np.float32)
    proj = ps.SparseRandomProjection(d, k=22, seed=int(rng.integers(1 << 30)), queue=queue)
    pw = proj.project_weight(w)
    assert seen == ["weight"]
    with override("drs_mask_routine", FUSED_MAX_ROWS=0):   # the rows' own projection
        _check_search(ps.drs_mask(x, None, 0.8, projection=pw), x, w, proj, 0.8)
    assert seen == ["weight", "rows-m32-d64"]


def test_one_dimensional_x_and_device_arrays(queue, rng):
    d, n = 40, 70
    x = rng.standard_normal(d, dtype=np.float32)
    w = rng.standard_normal((d, n), dtype=np.float32)
    proj = ps.SparseRandomProjection(d, seed=3, queue=queue)
    mask = ps.drs_mask(x, w, 0.8, projection=proj)
    assert mask.shape == (n,)
    _check_search(mask, x, w, proj, 0.8)
    x_dev = cl_array.to_device(queue, np.concatenate([x, x]))[d:]     # offset view
    pw = proj.project_weight(ps.MaskedLinearWeight(w, queue=queue))
    out = cl_array.empty(queue, (keep_count(0.8, n),), np.int32)
    assert ps.drs_mask(x_dev, None, 0.8, projection=pw, compact=True, out=out) is out
    np.testing.assert_array_equal(_dense(out.get(), n)[0], mask)
    host_out = np.zeros(n, bool)
    assert ps.drs_mask(x, w, 0.8, projection=proj, out=host_out) is host_out
    np.testing.assert_array_equal(host_out, mask)


def test_ties_go_to_the_lower_column_and_nan_ranks_last(queue):
    proj = ps.SparseRandomProjection(3, exact=True, queue=queue)
    w = np.array([[-0.0, 0.0, 1.0, 1.0, -1.0, 1.0, 0.0]] * 3, np.float32) / 3
    x = np.array([[1.0, 1.0, 1.0],          # scores -0, 0, 1, 1, -1, 1, 0
                  [0.0, 0.0, 0.0],          # all zero: the first columns win
                  [np.nan, 1.0, 1.0]], np.float32)   # all NaN: as ties
    idx = ps.drs_mask(x, w, 0.5, projection=proj, compact=True)   # n_keep = 4
    np.testing.assert_array_equal(idx, [[0, 2, 3, 5], [0, 1, 2, 3], [0, 1, 2, 3]])
    x = np.array([[1.0, 1.0, 1.0]], np.float32)
    w2 = w.copy()
    w2[:, 3] = np.nan                                          # NaN below every number
    np.testing.assert_array_equal(ps.drs_mask(x, w2, 0.5, projection=proj, compact=True),
                                  [[0, 1, 2, 5]])


def test_projection_reuse(queue, rng):
    d, n = 50, 64
    x = rng.standard_normal((8, d), dtype=np.float32)
    w = rng.standard_normal((d, n), dtype=np.float32)
    fresh = ps.drs_mask(x, w, 0.75, seed=11, k=12, queue=queue)
    proj = ps.SparseRandomProjection(d, k=12, seed=11, queue=queue)
    np.testing.assert_array_equal(ps.drs_mask(x, w, 0.75, projection=proj), fresh)
    pw = proj.project_weight(w)
    np.testing.assert_array_equal(ps.drs_mask(x, w, 0.75, projection=pw, k=12, seed=11), fresh)
    builds = runtime.build_count
    np.testing.assert_array_equal(ps.drs_mask(x, None, 0.75, projection=pw), fresh)
    assert runtime.build_count == builds                      # a hot call only launches
    _check_search(fresh, x, w, proj, 0.75)


@pytest.mark.parametrize("team", [64, 128, 256])
def test_team_topk_selects_exactly_what_the_serial_kernel_does(queue, rng, team):
    """The GPU-shaped top-k (a work-group per row) against the serial one and the float64
    reference, on scores full of ties (duplicated weight columns, small integers), for
    every output form: a bool mask, compact lists and the convolution layout; rows shorter
    and longer than TEAM, ranked (<= RANK_MAX_N columns) and by radix passes."""
    # The serial kernel with this device's parameters, and the team kernel.
    TEAMS = {1: ("drs_topk", {}), team: ("drs_topk_team", dict(TEAM=team))}
    for n, n_rows in ((7, 3), (100, 4), (150, 5), (1000, 4)):   # ranked x 2, radix x 2
        d = 6
        proj = ps.SparseRandomProjection(d, exact=True, queue=queue)
        base = rng.integers(-2, 3, (d, max(1, n // 3))).astype(np.float32)
        w = base[:, rng.integers(0, base.shape[1], n)]        # many equal scores per row
        x = rng.integers(-2, 3, (n_rows, d)).astype(np.float32)
        for sparsity in (0.0, 0.5, 0.9, 0.99):
            got = {}
            for t in (1, team):
                with override(TEAMS[t][0], **TEAMS[t][1]):
                    got[t] = (ps.drs_mask(x, w, sparsity, projection=proj),
                              ps.drs_mask(x, w, sparsity, projection=proj, compact=True))
            for serial, teamed in zip(got[1], got[team]):
                np.testing.assert_array_equal(teamed, serial, err_msg=f"n={n} s={sparsity}")
            # The scores are small integers, exact in float32: the float64 reference's
            # selection (ties to the lower column) must come out bit for bit.
            reference = topk_mask_reference(x.astype(np.float64) @ w,
                                            keep_count(sparsity, n))
            np.testing.assert_array_equal(got[team][0], reference, err_msg=f"n={n}")
    case = ConvCase(2, 3, 5, 6, 40, sparsity=0.0)
    x, w4, _, _ = case.make_inputs(rng)
    w4 = np.round(w4 * 2)                                       # ties across channels
    masks = []
    for t in (1, team):
        with override(TEAMS[t][0], **TEAMS[t][1]):
            masks.append(ps.drs_mask_conv2d(x, w4, 0.7, padding=1, k=8, seed=3))
    np.testing.assert_array_equal(masks[1], masks[0])


CONFIGS = [(spec.family, p) for spec in (DRS_PROJECT, DRS_PROJECT_SPLIT, DRS_SCORES, DRS_FUSED,
                                         DRS_TOPK, DRS_TOPK_TEAM)
           for p in spec.sample(3, seed=99, max_work_group_size=SAMPLE_WG_LIMIT)]


@pytest.mark.parametrize("family,params", CONFIGS,
                         ids=[f"{f}:" + ",".join(f"{k}={v}" for k, v in p.items())
                              for f, p in CONFIGS])
def test_every_tile_configuration_is_correct(queue, rng, family, params):
    d, n = 70, 150
    w = rng.standard_normal((d, n), dtype=np.float32)
    with override(family, **params):
        proj = ps.SparseRandomProjection(d, k=19, seed=5, queue=queue)
        pw = proj.project_weight(w)
        for m in (1, 2, 13):
            x = rng.standard_normal((m, d), dtype=np.float32)
            for compact in (False, True):
                _check_search(ps.drs_mask(x, w, 0.8, projection=pw, compact=compact), x, w,
                              proj, 0.8)


def test_defaults_render_and_build(queue):
    for family, variants in ((drs_project, ({}, dict(transposed=True))),
                             (drs_project_split, ({}, dict(transposed=True))),
                             (drs_scores, ({},)), (drs_fused, ({},)),
                             (drs_topk, ({}, dict(compact=True), dict(plane=True))),
                             (drs_topk_team, ({}, dict(compact=True), dict(plane=True)))):
        for variant in variants:
            args = family.template_args(family.SPEC.defaults(), **variant)
            runtime.build_program(queue.context, runtime.render(family.TEMPLATE, **args))
    runtime.build_program(queue.context, runtime.render(
        drs_project.TEMPLATE, **drs_project.windows_template_args(DRS_PROJECT.defaults())))
    runtime.build_program(queue.context, runtime.render("drs_util.cl.mako",
                                                        ARGS=PAD_TRANSPOSE_ARGS))


# ---------------------------------------------------------------------------------------------
# Bad input

def _x(m=4, d=6):
    return np.random.default_rng(0).standard_normal((m, d), dtype=np.float32)


def _w(d=6, n=10):
    return np.random.default_rng(1).standard_normal((d, n), dtype=np.float32)


BAD = [
    ("sparsity 1", dict(sparsity=1.0), ValueError, "sparsity must be in [0, 1)"),
    ("sparsity negative", dict(sparsity=-0.1), ValueError, "sparsity must be in [0, 1)"),
    ("sparsity nan", dict(sparsity=float("nan")), ValueError, "sparsity must be in [0, 1)"),
    ("sparsity bool", dict(sparsity=True), TypeError, "sparsity must be a real number"),
    ("sparsity str", dict(sparsity="0.5"), TypeError, "sparsity must be a real number"),
    ("eps zero", dict(eps=0.0), ValueError, "eps must be a number in (0, 1)"),
    ("eps large", dict(eps=1.5), ValueError, "eps must be a number in (0, 1)"),
    ("k zero", dict(k=0), ValueError, "k must be a positive int"),
    ("seed negative", dict(seed=-1), ValueError, "seed must be a non-negative int"),
    ("x float64", dict(x=_x().astype(np.float64)), TypeError, "x must have dtype float32"),
    ("x 3-D", dict(x=_x()[None]), ValueError, "x must be 1-D (d,) or 2-D"),
    ("w float16", dict(w=_w().astype(np.float16)), TypeError, "w must have dtype float32"),
    ("w rows", dict(w=_w(d=7)), ValueError, "w must have shape (d, N) with d = 6"),
    ("w missing", dict(w=None), TypeError, "w is required"),
    ("projection d", dict(projection=ps.SparseRandomProjection(7, seed=0)), ValueError,
     "the projection has d = 7"),
    ("projection type", dict(projection="R"), TypeError, "projection must be a"),
    ("projection k conflict", dict(projection=ps.SparseRandomProjection(6, k=3, seed=0), k=4),
     ValueError, "k=4 disagrees"),
    ("projection seed conflict", dict(projection=ps.SparseRandomProjection(6, k=3, seed=0),
                                      seed=2), ValueError, "seed=2 disagrees"),
    ("projected weight shape", dict(projection=ps.SparseRandomProjection(6, k=3, seed=0)
                                    .project_weight(_w(n=9))), ValueError, "projected weight"),
    ("out dtype", dict(out=np.zeros((4, 10), np.int32)), TypeError, "out must have dtype bool"),
    ("out shape compact", dict(compact=True, out=np.zeros((4, 10), np.int32)), ValueError,
     "out must have shape (4, 5)"),
]


@pytest.mark.parametrize("desc,changes,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clearly(queue, desc, changes, exc, fragment):
    kwargs = dict(x=_x(), w=_w(), sparsity=0.5, queue=queue)
    kwargs.update(changes)
    with pytest.raises(exc) as info:
        ps.drs_mask(kwargs.pop("x"), kwargs.pop("w"), kwargs.pop("sparsity"), **kwargs)
    assert fragment in str(info.value), str(info.value)
    assert ps.drs_mask(_x(), _w(), 0.5, seed=1, queue=queue).sum() == 4 * 5


def test_bad_projection_arguments():
    with pytest.raises(ValueError, match="exact=True makes R the identity"):
        ps.SparseRandomProjection(8, k=4, exact=True)
    with pytest.raises(ValueError, match="d must be a positive int"):
        ps.SparseRandomProjection(0)
    proj = ps.SparseRandomProjection(6, k=3, seed=0)
    with pytest.raises(ValueError, match="z must have shape"):
        proj.project(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="w has 5 rows"):
        proj.project_weight(np.zeros((5, 3), np.float32))
