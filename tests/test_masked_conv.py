"""conv2d_masked and drs_mask_conv2d against float64 references."""

import numpy as np
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl.ops.conv2d import conv2d_output_shape
from pysparsecl.ops.drs import DRS_CONV_PROJECT_TILED, keep_count
from pysparsecl.ops.masked import MASKED_CONV, MASKED_CONV_CH, MASKED_CONV_TILED
from pysparsecl.testing.reference import (
    conv2d_masked_reference,
    conv2d_reference,
    im2col_reference,
    relative_error,
    topk_mask_reference,
)
from pysparsecl.tuning import override

TOL = 1e-4

# (N, C, H, W, K, R, stride, padding, dilation)
GEOMS = [(2, 5, 9, 11, 7, 3, 1, 1, 1), (1, 16, 8, 8, 20, 3, 2, 1, 1), (2, 3, 10, 10, 4, 1, 1, 0, 1),
         (1, 17, 12, 9, 6, 3, 1, 2, 2), (3, 32, 7, 7, 5, 3, 1, 1, 1), (1, 2, 5, 5, 3, 5, 2, 2, 1)]


def _inputs(rng, geom, integers=False):
    n, c, h, w, k, r, st, pd, dl = geom
    if integers:
        x = rng.integers(-3, 4, (n, c, h, w)).astype(np.float32)
        wt = rng.integers(-3, 4, (k, c, r, r)).astype(np.float32)
    else:
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        wt = rng.standard_normal((k, c, r, r), dtype=np.float32)
    oh, ow = conv2d_output_shape((h, w), (r, r), st, pd, dl)
    return x, wt, (n, k, oh, ow), dict(stride=st, padding=pd, dilation=dl)


def _ref(x, w, mask, kw):
    pair = [(kw[a], kw[a]) for a in ("stride", "padding", "dilation")]
    return conv2d_masked_reference(x, w, mask, *pair)


@pytest.mark.parametrize("geom", GEOMS, ids=[str(g) for g in GEOMS])
def test_conv2d_masked_matches_reference(queue, rng, geom):
    x, w, out_shape, kw = _inputs(rng, geom)
    mask = rng.random(out_shape) < 0.3                              # per-window selection
    y = ps.conv2d_masked(x, w, mask, queue=queue, **kw)
    assert y.shape == out_shape and relative_error(y, _ref(x, w, mask, kw)) < TOL
    assert np.all(y[~mask] == 0)
    channels = rng.random(out_shape[:2] + (1, 1)) < 0.5                # per-sample channels
    full = np.broadcast_to(channels, out_shape)
    ref = _ref(x, w, full, kw)
    for m in (channels, full.copy()):                                 # given, and detected
        y = ps.conv2d_masked(x, w, m, queue=queue, **kw)
        assert relative_error(y, ref) < TOL and np.all(y[~full] == 0)


@pytest.mark.parametrize("form", ["window", "channel"])
def test_conv2d_masked_device_arrays_and_poisoned_out(queue, rng, form):
    x, w, out_shape, kw = _inputs(rng, GEOMS[0])
    mask = (rng.random(out_shape) < 0.4 if form == "window"
            else rng.random(out_shape[:2] + (1, 1)) < 0.4)
    out = cl_array.to_device(queue, np.full(out_shape, np.nan, np.float32))
    dev = [cl_array.to_device(queue, a) for a in (x, w, mask)]
    events = []
    assert ps.conv2d_masked(*dev, out=out, events=events, **kw) is out and events
    got = out.get()
    assert not np.isnan(got).any()
    assert relative_error(got, _ref(x, w, np.broadcast_to(mask, out_shape), kw)) < TOL


@pytest.mark.parametrize("family,spec,form,c", [
    ("masked_conv", MASKED_CONV, "window", 19),
    ("masked_conv_channels", MASKED_CONV_CH, "channel", 19),
    # the implicit GEMM: scalar (C % 4) and float4 staging, both mask forms
    ("masked_conv_tiled", MASKED_CONV_TILED, "window", 19),
    ("masked_conv_tiled", MASKED_CONV_TILED, "window", 20),
    ("masked_conv_tiled", MASKED_CONV_TILED, "channel", 20)])
def test_every_conv_configuration_is_correct(queue, rng, family, spec, form, c):
    x, w, out_shape, kw = _inputs(rng, (2, c, 8, 9, 11, 3, 1, 1, 1))
    mask = rng.random(out_shape) < 0.3 if form == "window" else \
        np.broadcast_to(rng.random(out_shape[:2] + (1, 1)) < 0.4, out_shape).copy()
    ref = _ref(x, w, mask, kw)
    configs = list(spec.candidates(256))
    # (fewer for the implicit GEMM, whose three cases compile a program per tiling)
    picks = [spec.defaults()] + [configs[i] for i in np.random.default_rng(3).choice(
        len(configs), 3 if family == "masked_conv_tiled" else 6, replace=False)]
    for params in picks:
        with override(family, **params):
            assert relative_error(ps.conv2d_masked(x, w, mask, queue=queue, **kw), ref) < TOL


def _windows(x, r, kw):
    """(N * OH * OW, C * R * S) im2col rows, ordered (c, r, s) as w.reshape(K, -1)."""
    return im2col_reference(x, (r, r), *[(kw[a], kw[a]) for a in ("stride", "padding",
                                                                  "dilation")])


@pytest.mark.parametrize("geom", [GEOMS[0], GEOMS[3], (2, 8, 9, 7, 5, 3, 2, 1, 1)],
                         ids=["C5", "C17 dilated", "C8 strided"])
def test_both_window_projections_match_the_reference(queue, rng, geom):
    """f(window) = scale * window . R^T for every output pixel, by the per-pixel kernel
    (CPUs) and the implicit GEMM (GPUs) at several tilings, against float64 im2col."""
    from pysparsecl.families import masked_conv
    from pysparsecl.ops import drs
    x, w, out_shape, kw = _inputs(rng, geom)
    r = w.shape[2]
    proj = ps.SparseRandomProjection(w[0].size, k=13, seed=int(rng.integers(1 << 30)),
                                     queue=queue)
    want = proj.scale * _windows(x, r, kw) @ proj.matrix().toarray().T     # (n_pix, k)
    g = masked_conv.geometry(x.shape, r, r, kw["stride"], kw["padding"], kw["dilation"])
    xp = masked_conv.pack_input(queue, cl_array.to_device(queue, x), x.shape[1], g, None)
    n_pix = want.shape[0]
    configs = list(DRS_CONV_PROJECT_TILED.candidates(256))
    picks = [configs[i] for i in np.random.default_rng(5).choice(len(configs), 3, replace=False)]
    for family, params in [("drs_project", {})] + [("drs_conv_project_tiled", p) for p in picks]:
        with override(family, **params):
            got, k_pad = drs._project_windows(queue, proj, xp, g, x.shape[1], r, r, n_pix, None)
        got = got.get()
        assert relative_error(got[:, :13], want) < TOL, (family, params)
        assert not got[:, 13:].any(), (family, params)     # the padding columns are zero


def _as_rows(mask):
    """(N, K, OH, OW) -> (N * OH * OW, K)."""
    return mask.transpose(0, 2, 3, 1).reshape(-1, mask.shape[1])


@pytest.mark.parametrize("geom", GEOMS[:4], ids=[str(g) for g in GEOMS[:4]])
def test_drs_mask_conv2d_exact_mode_is_the_true_top_k(queue, rng, geom):
    x, w, out_shape, kw = _inputs(rng, geom, integers=True)
    proj = ps.SparseRandomProjection(w[0].size, exact=True, queue=queue)
    for sparsity in (0.6, 0.0, 0.9):
        mask = ps.drs_mask_conv2d(x, w, sparsity, projection=proj, **kw)
        assert mask.shape == out_shape and mask.dtype == np.bool_
        y = conv2d_reference(x, w, None, *[(kw[a], kw[a]) for a in ("stride", "padding",
                                                                      "dilation")])
        n_keep = keep_count(sparsity, w.shape[0])
        np.testing.assert_array_equal(_as_rows(mask), topk_mask_reference(_as_rows(y), n_keep))


def test_drs_mask_conv2d_random_projection(queue, rng):
    x, w, out_shape, kw = _inputs(rng, (2, 6, 9, 8, 24, 3, 1, 1, 1))
    d = w[0].size
    proj = ps.SparseRandomProjection(d, k=16, seed=int(rng.integers(1 << 30)), queue=queue)
    mask = ps.drs_mask_conv2d(x, w, 0.75, projection=proj, **kw)
    r = proj.matrix().toarray()
    scores = (proj.scale * _windows(x, 3, kw) @ r.T) @ (proj.scale * r @ w.reshape(24, d).T)
    rows = _as_rows(mask)
    n_keep = keep_count(0.75, 24)
    np.testing.assert_array_equal(rows.sum(1), n_keep)
    kth = -np.sort(-scores, axis=1)[:, n_keep - 1]
    tol = 1e-4 * np.abs(scores).max(axis=1)
    assert np.all(np.where(rows, scores, np.inf) >= (kth - tol)[:, None])
    assert np.all(np.where(rows, -np.inf, scores) <= (kth + tol)[:, None])
    # Reusing the projected filters gives the same mask, on device arrays too.
    pw = proj.project_weight(ps.MaskedLinearWeight(w.reshape(24, d), transposed=True,
                                                   queue=queue))
    again = ps.drs_mask_conv2d(cl_array.to_device(queue, x), w, 0.75, projection=pw, **kw)
    np.testing.assert_array_equal(again.get(), mask)
    # The projected filters alone, with the kernel size, as the docstring promises.
    np.testing.assert_array_equal(
        ps.drs_mask_conv2d(x, None, 0.75, projection=pw, kernel_size=3, **kw), mask)
    # And the mask drives conv2d_masked.
    y = ps.conv2d_masked(x, w, mask, queue=queue, **kw)
    assert relative_error(y, _ref(x, w, mask, kw)) < TOL


def _cx():
    return np.ones((1, 3, 6, 6), np.float32)


def _cw(k=4, c=3, r=3):
    return np.ones((k, c, r, r), np.float32)


def _projected(queue):
    """f(w) of a (4, 3, 3, 3) filter bank."""
    proj = ps.SparseRandomProjection(27, seed=0, queue=queue)
    return proj.project_weight(ps.MaskedLinearWeight(_cw().reshape(4, 27), transposed=True,
                                                     queue=queue))


CONV_BAD = [
    ("x 3-D", lambda q: ps.conv2d_masked(_cx()[0], _cw(), np.ones((1, 4, 4, 4), bool), queue=q),
     ValueError, "x must be 4-D"),
    ("w float64", lambda q: ps.conv2d_masked(_cx(), _cw().astype(np.float64),
                                             np.ones((1, 4, 4, 4), bool), queue=q),
     TypeError, "w must have dtype float32"),
    ("channels", lambda q: ps.conv2d_masked(_cx(), _cw(c=2), np.ones((1, 4, 4, 4), bool),
                                            queue=q), ValueError, "x has 3 channels"),
    ("mask shape", lambda q: ps.conv2d_masked(_cx(), _cw(), np.ones((1, 4, 6, 6), bool),
                                              queue=q), ValueError, "mask must have shape"),
    ("mask dtype", lambda q: ps.conv2d_masked(_cx(), _cw(), np.ones((1, 4, 4, 4), np.int32),
                                              queue=q), TypeError, "mask must have dtype bool"),
    ("stride", lambda q: ps.conv2d_masked(_cx(), _cw(), np.ones((1, 4, 4, 4), bool), stride=0,
                                          queue=q), ValueError, "stride must be >= 1"),
    ("output empty", lambda q: ps.conv2d_masked(_cx(), _cw(r=7), np.ones((1, 4, 1, 1), bool),
                                                queue=q), ValueError, "output size would be"),
    ("drs sparsity", lambda q: ps.drs_mask_conv2d(_cx(), _cw(), 1.0, queue=q), ValueError,
     "sparsity must be in [0, 1)"),
    ("drs channels", lambda q: ps.drs_mask_conv2d(_cx(), _cw(c=2), 0.5, queue=q), ValueError,
     "x has 3 channels"),
    ("drs projection d", lambda q: ps.drs_mask_conv2d(
        _cx(), _cw(), 0.5, projection=ps.SparseRandomProjection(26, seed=0), queue=q),
     ValueError, "d = C * R * S = 27"),
    ("drs eps disagrees", lambda q: ps.drs_mask_conv2d(
        _cx(), _cw(), 0.5, eps=0.3, projection=ps.SparseRandomProjection(27, seed=0), queue=q),
     ValueError, "eps=0.3 disagrees with the projection's eps=0.5"),
    ("drs eps range", lambda q: ps.drs_mask_conv2d(_cx(), _cw(), 0.5, eps=1.5, queue=q),
     ValueError, "eps must be a number in (0, 1)"),
    ("drs w None, no kernel_size", lambda q: ps.drs_mask_conv2d(
        _cx(), None, 0.5, projection=_projected(q), queue=q), TypeError,
     "kernel_size is required when w is None"),
    ("drs kernel_size disagrees", lambda q: ps.drs_mask_conv2d(
        _cx(), _cw(), 0.5, kernel_size=(3, 1), queue=q), ValueError,
     "kernel_size=(3, 1) disagrees with w's (3, 3)"),
    ("drs kernel_size vs projected", lambda q: ps.drs_mask_conv2d(
        _cx(), None, 0.5, projection=_projected(q), kernel_size=1, queue=q), ValueError,
     "w.reshape(K, -1).T is (3, 4)"),
    ("drs out shape", lambda q: ps.drs_mask_conv2d(_cx(), _cw(), 0.5, out=np.zeros(
        (1, 4, 5, 5), bool), queue=q), ValueError, "out must have shape (1, 4, 4, 4)"),
]


@pytest.mark.parametrize("desc,call,exc,fragment", CONV_BAD, ids=[b[0] for b in CONV_BAD])
def test_bad_input_raises_clearly(queue, desc, call, exc, fragment):
    with pytest.raises(exc) as info:
        call(queue)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("n,c,h,w,pad,cp", [(2, 5, 9, 11, 1, 5), (1, 40, 7, 33, 2, 44),
                                           (3, 3, 1, 1, 0, 4)])
def test_both_input_packs_give_the_padded_nhwc_input(queue, rng, n, c, h, w, pad, cp):
    """The per-pixel pack (CPUs) and the transposing one (GPUs), on every device, against
    NumPy: partial 32 x 32 tiles, a channel stride beyond C, borders zero."""
    from pysparsecl.families import masked_conv
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    want = np.zeros((n, h + 2 * pad, w + 2 * pad, cp), np.float32)
    want[:, pad:pad + h, pad:pad + w, :c] = x.transpose(0, 2, 3, 1)
    geom = masked_conv.geometry(x.shape, 1, 1, 1, pad, 1)
    x_dev = cl_array.to_device(queue, x)
    for tiled in (False, True):
        got = masked_conv.pack_input(queue, x_dev, c, geom, None, cp, tiled=tiled).get()
        np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"tiled={tiled}")


@pytest.mark.parametrize("k,c,r,s", [(7, 5, 3, 3), (40, 33, 1, 1), (3, 70, 5, 2)])
def test_both_weight_packs_give_krsc(queue, rng, k, c, r, s):
    """A device weight (K, C, R, S) -> (K, R, S, C), by the per-tap kernel (CPUs) and the
    transposing one (GPUs), on every device, and a host weight by NumPy."""
    from pysparsecl.families import masked_conv
    w = rng.standard_normal((k, c, r, s), dtype=np.float32)
    want = w.transpose(0, 2, 3, 1)
    w_dev = cl_array.to_device(queue, w)
    for tiled in (False, True):
        got = masked_conv.pack_weight(queue, w_dev, None, tiled=tiled).get()
        np.testing.assert_array_equal(got, want, err_msg=f"tiled={tiled}")
    np.testing.assert_array_equal(masked_conv.pack_weight(queue, w, None).get(), want)
