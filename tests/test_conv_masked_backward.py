"""conv2d_masked_backward (families masked_conv_dx and masked_conv_dw) against the float64
reference, finite differences of the float64 forward and, where installed, torch autograd."""

import numpy as np
import pyopencl.array as cl_array
import pytest
from conftest import SAMPLE_WG_LIMIT

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.ops.conv2d import conv2d_output_shape
from pysparsecl.ops.masked import MASKED_CONV_DW, MASKED_CONV_DX
from pysparsecl.testing.reference import (
    central_difference,
    conv2d_masked_backward_reference,
    conv2d_reference,
    relative_error,
)
from pysparsecl.tuning import override

TOL = 1e-4

# (N, C, H, W, K, (R, S), stride, padding, dilation)
GEOMS = [
    (2, 5, 9, 11, 7, (3, 3), 1, 1, 1),
    (1, 16, 8, 8, 20, (3, 3), 2, 1, 1),              # stride 2
    (2, 3, 10, 10, 4, (1, 1), 1, 0, 1),              # 1x1
    (1, 17, 12, 9, 6, (3, 3), 1, 2, 2),              # dilation 2, padding 2
    (3, 1, 8, 8, 16, (3, 3), 1, 1, 1),               # a single input channel
    (2, 33, 7, 7, 13, (3, 3), 2, 0, 1),              # stride 2, no padding, odd C and K
    (1, 2, 5, 5, 3, (5, 5), 2, 2, 1),                # 5x5
    (2, 4, 9, 8, 5, (3, 1), (1, 2), (1, 0), (2, 1)),  # pairs, a non-square kernel
    (64, 16, 8, 8, 32, (3, 3), 1, 1, 1),             # the digits CNN's second layer
]

MASKS = [("window", bool), ("channel", bool), ("window", np.int8), ("channel", np.uint8)]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _case(rng, geom, form="window", dtype=bool, keep=0.4):
    """Fresh random (dy, x, w, mask, kw) for ``geom`` with a ``form`` mask."""
    n, c, h, w_, k, kernel, st, pd, dl = geom
    x = rng.standard_normal((n, c, h, w_), dtype=np.float32)
    w = rng.standard_normal((k, c) + kernel, dtype=np.float32)
    out_shape = (n, k) + conv2d_output_shape((h, w_), kernel, _pair(st), _pair(pd), _pair(dl))
    plane = out_shape if form == "window" else out_shape[:2] + (1, 1)
    mask = (rng.random(plane) < keep).astype(dtype)
    dy = rng.standard_normal(out_shape, dtype=np.float32)
    return dy, x, w, mask, dict(stride=st, padding=pd, dilation=dl)


def _ref(dy, x, w, mask, kw):
    return conv2d_masked_backward_reference(dy, x, w, mask, *(_pair(kw[a]) for a in (
        "stride", "padding", "dilation")))


@pytest.mark.parametrize("form,dtype", MASKS, ids=[f"{f}-{np.dtype(d).name}" for f, d in MASKS])
@pytest.mark.parametrize("geom", GEOMS, ids=[str(g) for g in GEOMS])
def test_matches_reference(queue, rng, geom, form, dtype):
    dy, x, w, mask, kw = _case(rng, geom, form, dtype)
    dx, dw = ps.conv2d_masked_backward(dy, x, w, mask, queue=queue, **kw)
    ref_dx, ref_dw = _ref(dy, x, w, mask, kw)
    assert isinstance(dx, np.ndarray) and dx.shape == x.shape and dx.dtype == np.float32
    assert isinstance(dw, np.ndarray) and dw.shape == w.shape and dw.dtype == np.float32
    assert relative_error(dx, ref_dx) < TOL
    assert relative_error(dw, ref_dw) < TOL


@pytest.mark.parametrize("form", ["window", "channel"])
def test_all_off_and_all_on_masks(queue, rng, form):
    dy, x, w, mask, kw = _case(rng, GEOMS[0], form)
    off = np.zeros_like(mask)
    dx, dw = ps.conv2d_masked_backward(dy, x, w, off, queue=queue, **kw)
    assert not dx.any() and not dw.any()                # exact zeros, not just small
    on = np.ones_like(mask)
    dx, dw = ps.conv2d_masked_backward(dy, x, w, on, queue=queue, **kw)
    ref_dx, ref_dw = _ref(dy, x, w, on, kw)
    assert relative_error(dx, ref_dx) < TOL and relative_error(dw, ref_dw) < TOL


def test_matches_finite_differences_of_the_forward(queue, rng):
    """Central differences of L(x, w) = sum(dy * mask * conv2d(x, w)), the float64 forward
    (conv2d_reference, not the backward's reference), at every entry of x and w."""
    dy, x, w, mask, kw = _case(rng, (2, 3, 5, 6, 4, (3, 3), 2, 1, 1), keep=0.5)
    st, pd, dl = (_pair(kw[a]) for a in ("stride", "padding", "dilation"))
    sel = mask.astype(bool)

    def loss(xv, wv):
        return float(np.sum(np.where(sel, dy, 0.0) * conv2d_reference(xv, wv, None, st, pd, dl)))

    dx, dw = ps.conv2d_masked_backward(dy, x, w, mask, queue=queue, **kw)
    assert relative_error(dx, central_difference(lambda xv: loss(xv, w), x, 1e-3)) < 1e-4
    assert relative_error(dw, central_difference(lambda wv: loss(x, wv), w, 1e-3)) < 1e-4


@pytest.mark.parametrize("form", ["window", "channel"])
def test_unselected_inf_and_nan_in_dy_never_leak(queue, rng, form):
    dy, x, w, mask, kw = _case(rng, GEOMS[3], form, keep=0.5)
    unselected = np.broadcast_to(mask == 0, dy.shape)
    clean = np.where(unselected, 0, dy).astype(np.float32)
    poisoned = clean.copy()
    poisoned[unselected] = rng.choice([np.inf, -np.inf, np.nan], int(unselected.sum()))
    dx, dw = ps.conv2d_masked_backward(clean, x, w, mask, queue=queue, **kw)
    dx2, dw2 = ps.conv2d_masked_backward(poisoned, x, w, mask, queue=queue, **kw)
    assert np.isfinite(dx2).all() and np.isfinite(dw2).all()
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(dw2, dw)


def test_device_arrays_in_device_arrays_out_and_deterministic(queue, rng):
    dy, x, w, mask, kw = _case(rng, GEOMS[1], keep=0.3)
    dev = [cl_array.to_device(queue, a) for a in (dy, x, w, mask)]
    events = []
    dx, dw = ps.conv2d_masked_backward(*dev, events=events, **kw)
    assert isinstance(dx, cl_array.Array) and isinstance(dw, cl_array.Array) and events
    ref_dx, ref_dw = _ref(dy, x, w, mask, kw)
    assert relative_error(dx.get(), ref_dx) < TOL and relative_error(dw.get(), ref_dw) < TOL
    dx2, dw2 = ps.conv2d_masked_backward(*dev, **kw)
    np.testing.assert_array_equal(dx2.get(), dx.get())           # no atomics: bitwise equal
    np.testing.assert_array_equal(dw2.get(), dw.get())
    hx, hw = ps.conv2d_masked_backward(dy, x, w, mask, queue=queue, **kw)   # NumPy alike
    np.testing.assert_array_equal(hx, dx.get())
    np.testing.assert_array_equal(hw, dw.get())


def test_outputs_into_views_of_larger_buffers(queue, rng):
    """dw_out and dx_out as views inside NaN-poisoned device buffers, starting on and off
    the base alignment: the views are written in place and nothing else is."""
    dy, x, w, mask, kw = _case(rng, GEOMS[0])
    ref_dx, ref_dw = _ref(dy, x, w, mask, kw)
    dev = [cl_array.to_device(queue, a) for a in (dy, x, w, mask)]
    align = runtime.base_alignment(queue.device) // 4
    for start in (align, align + 1, 3):
        grads = cl_array.to_device(queue, np.full(2 * start + w.size + x.size + 7, np.nan,
                                                  np.float32))
        dw_out = grads[start:start + w.size].reshape(w.shape)
        dx_out = grads[2 * start + w.size:2 * start + w.size + x.size].reshape(x.shape)
        dx, dw = ps.conv2d_masked_backward(*dev, dw_out=dw_out, dx_out=dx_out, **kw)
        assert dw is dw_out and dx is dx_out
        flat = grads.get()
        assert relative_error(flat[start:start + w.size].reshape(w.shape), ref_dw) < TOL
        assert relative_error(flat[2 * start + w.size:2 * start + w.size + x.size]
                              .reshape(x.shape), ref_dx) < TOL
        untouched = np.concatenate([flat[:start], flat[start + w.size:2 * start + w.size],
                                    flat[2 * start + w.size + x.size:]])
        assert np.isnan(untouched).all()


def test_numpy_outputs(queue, rng):
    dy, x, w, mask, kw = _case(rng, GEOMS[2])
    dx_out = np.full(x.shape, np.nan, np.float32)
    dw_out = np.full(w.shape, np.nan, np.float32)
    dx, dw = ps.conv2d_masked_backward(dy, x, w, mask, dx_out=dx_out, dw_out=dw_out,
                                       queue=queue, **kw)
    assert dx is dx_out and dw is dw_out
    ref_dx, ref_dw = _ref(dy, x, w, mask, kw)
    assert relative_error(dx, ref_dx) < TOL and relative_error(dw, ref_dw) < TOL


@pytest.mark.parametrize("need_dx,need_dw", [(True, False), (False, True), (False, False)])
def test_need_flags(queue, rng, need_dx, need_dw):
    dy, x, w, mask, kw = _case(rng, GEOMS[0])
    ref_dx, ref_dw = _ref(dy, x, w, mask, kw)
    for args in ((dy, x, w, mask), [cl_array.to_device(queue, a) for a in (dy, x, w, mask)]):
        dx, dw = ps.conv2d_masked_backward(*args, need_dx=need_dx, need_dw=need_dw,
                                           queue=queue, **kw)
        assert (dx is None) != need_dx and (dw is None) != need_dw
        if need_dx:
            assert relative_error(np.asarray(dx.get() if hasattr(dx, "get") else dx),
                                  ref_dx) < TOL
        if need_dw:
            assert relative_error(np.asarray(dw.get() if hasattr(dw, "get") else dw),
                                  ref_dw) < TOL


def test_empty_batch_and_no_output_channels(queue, rng):
    x = rng.standard_normal((0, 3, 5, 5), dtype=np.float32)
    w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    dx, dw = ps.conv2d_masked_backward(np.zeros((0, 4, 5, 5), np.float32), x, w,
                                       np.zeros((0, 4, 5, 5), bool), padding=1, queue=queue)
    assert dx.shape == x.shape and dw.shape == w.shape and not dw.any()
    x = rng.standard_normal((2, 3, 5, 5), dtype=np.float32)
    w = np.zeros((0, 3, 3, 3), np.float32)
    dx, dw = ps.conv2d_masked_backward(np.zeros((2, 0, 5, 5), np.float32), x, w,
                                       np.zeros((2, 0, 1, 1), bool), padding=1, queue=queue)
    assert dx.shape == x.shape and not dx.any() and dw.shape == w.shape


@pytest.mark.parametrize("family,spec", [("masked_conv_dx", MASKED_CONV_DX),
                                         ("masked_conv_dw", MASKED_CONV_DW)])
def test_every_configuration_is_correct(queue, rng, family, spec):
    cases = [_case(rng, (2, 19, 8, 9, 11, (3, 3), 1, 1, 1)),
             _case(rng, (2, 37, 6, 7, 5, (3, 3), 2, 1, 1), "channel", keep=0.5),
             _case(rng, (1, 5, 6, 6, 3, (1, 1), 1, 0, 1))]
    refs = [_ref(*c) for c in cases]
    for params in spec.sample(6, seed=2024, max_work_group_size=SAMPLE_WG_LIMIT):
        with override(family, **params):
            for (dy, x, w, mask, kw), (ref_dx, ref_dw) in zip(cases, refs):
                dx, dw = ps.conv2d_masked_backward(dy, x, w, mask, queue=queue, **kw)
                assert relative_error(dx, ref_dx) < TOL, params
                assert relative_error(dw, ref_dw) < TOL, params


@pytest.mark.parametrize("geom", [GEOMS[0], GEOMS[3], GEOMS[7]], ids=str)
@pytest.mark.parametrize("form", ["window", "channel"])
def test_matches_torch_autograd(queue, rng, geom, form):
    torch = pytest.importorskip("torch")
    dy, x, w, mask, kw = _case(rng, geom, form)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(mask.astype(bool)) * torch.nn.functional.conv2d(
        xt, wt, stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"])
    y.backward(torch.tensor(dy, dtype=torch.float64))
    dx, dw = ps.conv2d_masked_backward(dy, x, w, mask, queue=queue, **kw)
    assert relative_error(dx, xt.grad.numpy()) < TOL
    assert relative_error(dw, wt.grad.numpy()) < TOL


# ---------------------------------------------------------------------------------------------
# Bad input: each argument, with an error that names it

def _dy(shape=(1, 4, 4, 4)):
    return np.ones(shape, np.float32)


def _x(shape=(1, 3, 6, 6)):
    return np.ones(shape, np.float32)


def _w(shape=(4, 3, 3, 3)):
    return np.ones(shape, np.float32)


def _m(shape=(1, 4, 4, 4), dtype=bool):
    return np.ones(shape, dtype)


def _call(q, dy=None, x=None, w=None, mask=None, **kw):
    return ps.conv2d_masked_backward(_dy() if dy is None else dy, _x() if x is None else x,
                                     _w() if w is None else w, _m() if mask is None else mask,
                                     queue=q, **kw)


BAD = [
    ("dy list", lambda q: _call(q, dy=[[1.0]]), TypeError, "dy must be a numpy.ndarray"),
    ("dy float64", lambda q: _call(q, dy=_dy().astype(np.float64)), TypeError,
     "dy must have dtype float32"),
    ("dy 3-D", lambda q: _call(q, dy=np.ones((4, 4, 4), np.float32)), ValueError,
     "dy must be 4-D"),
    ("dy shape", lambda q: _call(q, dy=_dy((1, 4, 5, 4))), ValueError,
     "dy must have shape (1, 4, 4, 4)"),
    ("x int32", lambda q: _call(q, x=_x().astype(np.int32)), TypeError,
     "x must have dtype float32"),
    ("x 3-D", lambda q: _call(q, x=np.ones((3, 6, 6), np.float32)), ValueError, "x must be 4-D"),
    ("x channels", lambda q: _call(q, x=_x((1, 2, 6, 6))), ValueError,
     "x has 2 channels but w expects C = 3"),
    ("w float64", lambda q: _call(q, w=_w().astype(np.float64)), TypeError,
     "w must have dtype float32"),
    ("w 2-D", lambda q: _call(q, w=np.ones((4, 27), np.float32)), ValueError, "w must be 4-D"),
    ("w empty kernel", lambda q: _call(q, w=_w((4, 3, 0, 3))), ValueError,
     "w must have a kernel of at least 1x1"),
    ("mask float32", lambda q: _call(q, mask=np.ones((1, 4, 4, 4), np.float32)), TypeError,
     "mask must have dtype bool"),
    ("mask tuple", lambda q: _call(q, mask=(1, 2)), TypeError, "mask must be a numpy.ndarray"),
    ("mask shape", lambda q: _call(q, mask=_m((1, 4, 4, 3))), ValueError,
     "mask must have shape (1, 4, 4, 4) (N, K, OH, OW) or (1, 4, 1, 1)"),
    ("mask 2-D", lambda q: _call(q, mask=_m((4, 16))), ValueError, "mask must be 4-D"),
    ("stride 0", lambda q: _call(q, stride=0), ValueError, "stride must be >= 1"),
    ("stride float", lambda q: _call(q, stride=1.5), TypeError, "stride must be an int"),
    ("padding negative", lambda q: _call(q, padding=-1), ValueError, "padding must be >= 0"),
    ("padding triple", lambda q: _call(q, padding=(1, 1, 1)), TypeError,
     "padding must be an int or a pair"),
    ("dilation 0", lambda q: _call(q, dilation=0), ValueError, "dilation must be >= 1"),
    ("output empty", lambda q: _call(q, x=_x((1, 3, 2, 2))), ValueError,
     "output size would be 0x0"),
    ("need_dx int", lambda q: _call(q, need_dx=1), TypeError, "need_dx must be a bool"),
    ("need_dw None", lambda q: _call(q, need_dw=None), TypeError, "need_dw must be a bool"),
    ("dx_out shape", lambda q: _call(q, dx_out=np.zeros((1, 3, 6, 5), np.float32)), ValueError,
     "dx_out must have shape (1, 3, 6, 6)"),
    ("dx_out float64", lambda q: _call(q, dx_out=np.zeros((1, 3, 6, 6))), TypeError,
     "dx_out must have dtype float32"),
    ("dw_out shape", lambda q: _call(q, dw_out=np.zeros((4, 3, 3, 2), np.float32)), ValueError,
     "dw_out must have shape (4, 3, 3, 3)"),
    ("dw_out device for NumPy x", lambda q: _call(
        q, dw_out=cl_array.zeros(q, (4, 3, 3, 3), np.float32)), TypeError,
     "dw_out must be the same kind of container as the input"),
    ("dw_out strided", lambda q: _call(
        q, x=cl_array.to_device(q, _x()),
        dw_out=cl_array.zeros(q, (4, 3, 3, 6), np.float32)[..., ::2]), ValueError,
     "dw_out: non-contiguous pyopencl arrays are not supported"),
]


@pytest.mark.parametrize("desc,call,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clearly(queue, desc, call, exc, fragment):
    with pytest.raises(exc) as info:
        call(queue)
    assert fragment in str(info.value), str(info.value)
