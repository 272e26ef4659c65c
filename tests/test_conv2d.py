"""conv2d_sparse against the float64 reference, on every working OpenCL device."""

import sys
import threading

import numpy as np
import pyopencl.array as cl_array
import pytest
import scipy.sparse as sp
from conftest import SAMPLE_WG_LIMIT

import pysparsecl as ps
from pysparsecl import runtime
from pysparsecl.ops import conv2d as conv2d_module
from pysparsecl.ops._common import udiv_magic
from pysparsecl.ops.conv2d import CONV2D_CSR, template_args
from pysparsecl.testing.cases import ConvCase
from pysparsecl.testing.reference import conv2d_epilogue_reference, relative_error
from pysparsecl.tuning import override

TOL = 1e-4

base = ConvCase(N=2, C=6, H=9, W=11, K=5, sparsity=0.5, bias=True)
CASES = [
    base.with_(kernel=(1, 1), padding=(0, 0)),
    base,
    base.with_(kernel=(5, 5), padding=(2, 2)),
    base.with_(kernel=(1, 7), padding=(0, 3)),
    base.with_(stride=(2, 2)),
    base.with_(stride=(2, 2), kernel=(1, 1), padding=(0, 0)),       # ResNet downsample
    base.with_(padding=(0, 0)),
    base.with_(padding=(2, 2)),
    base.with_(padding=(1, 2)),
    base.with_(dilation=(2, 2), padding=(2, 2)),
    base.with_(dilation=(2, 1), stride=(1, 2)),
    base.with_(C=6, K=4, groups=2),
    base.with_(C=6, K=6, groups=6),                                    # depthwise
    base.with_(C=4, K=8, groups=4, stride=(2, 2)),                     # depthwise multiplier 2
    base.with_(N=1),
    base.with_(N=3, H=13, W=7),
    base.with_(H=1, W=1, kernel=(1, 1), padding=(0, 0)),
    base.with_(H=3, W=3, padding=(0, 0)),                              # 1x1 output
    base.with_(sparsity=0.0),
    base.with_(sparsity=0.9, C=16, K=12),
    base.with_(sparsity=0.99, C=32, K=16),
    base.with_(sparsity=0.5, empty_rows=2),
    base.with_(sparsity=1.0),                                          # all-zero weight
    base.with_(sparsity=1.0, bias=False),
    base.with_(bias=False, stride=(3, 2), padding=(1, 0), H=17, W=23),
    base.with_(C=37, K=19, H=15, W=15, sparsity=0.8),
    # Every tap on stride phase 0: only the pixels the taps read are packed.
    base.with_(kernel=(1, 1), stride=(3, 2), padding=(0, 0), H=17, W=23),
    base.with_(kernel=(1, 1), stride=(2, 2), padding=(1, 1)),
    base.with_(dilation=(2, 2), stride=(2, 2), padding=(2, 2)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_matches_reference(queue, rng, case):
    x, w, csr, bias = case.make_inputs(rng)
    y = ps.conv2d_sparse(x, csr, bias, queue=queue, **case.kwargs())
    ref = case.reference(x, w, bias)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y.shape == ref.shape
    assert relative_error(y, ref) < TOL


@pytest.mark.parametrize("params", CONV2D_CSR.sample(
    12, seed=1234, max_work_group_size=SAMPLE_WG_LIMIT), ids=lambda p: ",".join(
    f"{k}={v}" for k, v in p.items()))
def test_every_tile_configuration_is_correct(queue, rng, params):
    if CONV2D_CSR.work_group_size(params) > queue.device.max_work_group_size:
        pytest.skip("work-group larger than this device allows")
    cases = [ConvCase(2, 20, 11, 13, 18, sparsity=0.7, bias=True, empty_rows=3),
             ConvCase(1, 8, 9, 9, 6, stride=(2, 2), groups=2, sparsity=0.3)]
    with override("conv2d_csr", **params):
        for case in cases:
            x, w, csr, bias = case.make_inputs(rng)
            y = ps.conv2d_sparse(x, csr, bias, queue=queue, **case.kwargs())
            assert relative_error(y, case.reference(x, w, bias)) < TOL, case


GPU_SHAPED = dict(VEC=1, PIX_VECS=2, WG_PIX=8, WG_CH=2, WG_IMG=2, CH_FASTEST=0, BATCH_LAYOUT=0,
                  UNROLL=2)


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_flat_packing_and_image_work_groups(queue, rng, case):
    """The GPU configuration's flat packing pass (magic-number divisions) and work-groups
    spanning images, on every geometry: strides, dilations, paddings, groups, odd batches."""
    with override("conv2d_csr", **GPU_SHAPED), override("conv2d_pack_flat", PACK_ITEMS=8):
        x, w, csr, bias = case.make_inputs(rng)
        y = ps.conv2d_sparse(x, csr, bias, queue=queue, **case.kwargs())
    assert relative_error(y, case.reference(x, w, bias)) < TOL


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_channel_blocked_rows(queue, rng, case):
    """Rows cut into barrier-separated input-channel segments (CBLOCK), on every geometry,
    with work-groups that overhang the channels, pixels and images (idle items must still
    reach every barrier)."""
    with override("conv2d_csr", VEC=4, PIX_VECS=2, WG_PIX=2, WG_CH=4, WG_IMG=2, CH_FASTEST=1,
                  BATCH_LAYOUT=0, UNROLL=1, CBLOCK=4), override("conv2d_pack_rows", PACK_LANES=1):
        x, w, csr, bias = case.make_inputs(rng)
        y = ps.conv2d_sparse(x, csr, bias, queue=queue, **case.kwargs())
    assert relative_error(y, case.reference(x, w, bias)) < TOL


ONE_BY_ONE = [ConvCase(4, 37, 7, 9, 21, kernel=(1, 1), padding=(0, 0), sparsity=0.6,
                       bias=True, empty_rows=2),
              ConvCase(4, 20, 9, 9, 13, kernel=(1, 1), stride=(2, 2), padding=(0, 0),
                       sparsity=0.5),
              ConvCase(3, 19, 5, 6, 10, kernel=(1, 1), padding=(0, 0), sparsity=0.4),
              ConvCase(2, 9, 8, 8, 6, kernel=(1, 1), padding=(0, 0), groups=3, sparsity=0.3),
              ConvCase(2, 8, 6, 7, 5, sparsity=0.5)]   # 3x3: LOCAL_X does not apply


@pytest.mark.parametrize("layout", [1, 0])
@pytest.mark.parametrize("ch_fastest", [0, 1])
@pytest.mark.parametrize("case", ONE_BY_ONE, ids=[c.label() for c in ONE_BY_ONE])
def test_local_input_tiles(queue, rng, case, layout, ch_fastest):
    """LOCAL_X on 1x1 layers: the tile of each block of input channels copied into local
    memory, with a last block part-filled (C not a multiple of CBLOCK), idle items past
    the output channels and pixels, stride-2 phases, an odd batch (the pixel layout), and
    the geometries it does not apply to (groups, 3x3); into an output poisoned with NaN,
    with the residual and ReLU."""
    x, w, csr, bias = case.make_inputs(rng)
    ref = case.reference(x, w, bias)
    residual = rng.standard_normal(ref.shape, dtype=np.float32)
    out = cl_array.to_device(queue, np.full(ref.shape, np.nan, np.float32))
    with override("conv2d_csr", VEC=4, PIX_VECS=2, WG_PIX=4, WG_CH=8, WG_IMG=1,
                  CH_FASTEST=ch_fastest, BATCH_LAYOUT=layout, COMPACT=0, UNROLL=2, CBLOCK=8,
                  LOCAL_X=1):
        ps.conv2d_sparse(cl_array.to_device(queue, x), csr, bias, out=out,
                         residual=cl_array.to_device(queue, residual), activation="relu",
                         **case.kwargs())
    assert relative_error(out.get(), conv2d_epilogue_reference(ref, residual, relu=True)) < TOL


COMPACT_SHAPES = {"plain": dict(WG_IMG=1, CBLOCK=0, CH_FASTEST=0),
                  "img-tiles+cblock": dict(WG_IMG=2, CBLOCK=4, CH_FASTEST=1)}


@pytest.mark.parametrize("pix_vecs", [3, 7])
@pytest.mark.parametrize("shape", sorted(COMPACT_SHAPES))
@pytest.mark.parametrize("layout", [1, 0])
@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_compact_pixels(queue, rng, case, layout, shape, pix_vecs):
    """COMPACT on every geometry, into an output poisoned with NaN: each real pixel is
    computed and stored once, from its own place in the packed input, also where a tile
    spans two image blocks, with WG_IMG tiles per work-group and with barrier-separated
    segments (idle items past the last pixel), with 3 and 7 pixel vectors per item (7
    tiles a 7 x 7 plane exactly).  The pixel layout (and odd batches, which fall back to
    it) ignores COMPACT."""
    x, w, csr, bias = case.make_inputs(rng)
    out = cl_array.to_device(queue, np.full(case.reference(x, w, bias).shape, np.nan,
                                            np.float32))
    with override("conv2d_csr", VEC=2, PIX_VECS=pix_vecs, WG_PIX=4, WG_CH=2,
                  BATCH_LAYOUT=layout, COMPACT=1, UNROLL=2, **COMPACT_SHAPES[shape]), \
            override("conv2d_pack_flat"):
        ps.conv2d_sparse(cl_array.to_device(queue, x), csr, bias, out=out, **case.kwargs())
    assert relative_error(out.get(), case.reference(x, w, bias)) < TOL


def test_magic_division_is_exact(rng):
    divisors = np.concatenate([np.arange(1, 600), rng.integers(1, 2 ** 31 - 1, 300),
                               [2 ** k + j for k in range(10, 31) for j in (-1, 0, 1)]])
    for d in divisors[divisors < 2 ** 31].astype(np.int64):
        m, s = udiv_magic(int(d))
        x = np.concatenate([rng.integers(0, 2 ** 31, 200), [0, 1, d - 1, d, d + 1, 2 ** 31 - 1,
                            (2 ** 31 - 1) // d * d, (2 ** 31 - 1) // d * d - 1]])
        x = x[(x >= 0) & (x < 2 ** 31)].astype(np.uint64)
        np.testing.assert_array_equal((x * np.uint64(m)) >> np.uint64(s), x // np.uint64(d),
                                      err_msg=f"divisor {d}")
    for bad in (0, -3, 2 ** 31):
        with pytest.raises(ValueError, match="divisor"):
            udiv_magic(bad)


@pytest.mark.parametrize("compact", [0, 1])
@pytest.mark.parametrize("pack_lanes", [8, 0])
@pytest.mark.parametrize("vec", [2, 4, 8, 16])
def test_batch_layout(queue, rng, vec, pack_lanes, compact):
    """Vectors along the batch when VEC divides it; the pixel layout serves other batches.
    Packed by rows (PACK_LANES 8) and by the flat pass (0); pixels walked virtually or
    compactly (COMPACT)."""
    cases = [ConvCase(vec, 6, 9, 10, 7, sparsity=0.6, bias=True),
             ConvCase(2 * vec, 4, 7, 7, 6, stride=(2, 2), groups=2, sparsity=0.5),
             ConvCase(vec + 1, 3, 5, 6, 4, kernel=(1, 3), padding=(0, 1), sparsity=0.3)]
    pack = (override("conv2d_pack_rows", PACK_LANES=pack_lanes) if pack_lanes else
            override("conv2d_pack_flat"))
    with override("conv2d_csr", BATCH_LAYOUT=1, VEC=vec, PIX_VECS=3, COMPACT=compact), pack:
        for case in cases:
            x, w, csr, bias = case.make_inputs(rng)
            y = ps.conv2d_sparse(x, csr, bias, queue=queue, **case.kwargs())
            assert relative_error(y, case.reference(x, w, bias)) < TOL, case


def test_device_arrays_stay_on_device_and_every_output_is_written(queue, rng):
    case = ConvCase(3, 8, 10, 12, 7, sparsity=0.6, bias=True)
    x, w, csr, bias = case.make_inputs(rng)
    weight = ps.SparseConvWeight(csr, in_channels=8, queue=queue)
    x_dev = cl_array.to_device(queue, x)
    bias_dev = cl_array.to_device(queue, bias)
    out = cl_array.to_device(queue, np.full((3, 7, 10, 12), np.nan, np.float32))
    result = ps.conv2d_sparse(x_dev, weight, bias_dev, padding=1, out=out)
    assert result is out
    y = out.get()
    assert not np.isnan(y).any()
    assert relative_error(y, case.reference(x, w, bias)) < TOL
    # A second call with the prepared weight reuses every built program.
    builds = runtime.build_count
    y2 = ps.conv2d_sparse(x_dev, weight, bias_dev, padding=1).get()
    assert runtime.build_count == builds
    np.testing.assert_array_equal(y2, y)


def test_one_weight_across_geometries_bias_and_parameters(queue, rng):
    """A prepared weight keeps a launch plan per input geometry, bias and tile parameters:
    interleaved calls that differ in any of them each get the right answer, and an override
    that changes the parameters takes effect on the next call."""
    case = ConvCase(2, 6, 9, 11, 5, sparsity=0.5, bias=True)
    _, w, csr, bias = case.make_inputs(rng)
    weight = ps.SparseConvWeight(csr, in_channels=6, queue=queue)
    calls = [dict(shape=(2, 6, 9, 11), padding=1, stride=1, bias=True),
             dict(shape=(3, 6, 7, 5), padding=0, stride=1, bias=False),
             dict(shape=(2, 6, 9, 11), padding=1, stride=2, bias=True),
             dict(shape=(2, 6, 9, 11), padding=1, stride=1, bias=False)]
    for params in ({}, dict(VEC=2, PIX_VECS=3, WG_PIX=2), {}):
        with override("conv2d_csr", **params):
            for call in calls * 2:
                x = rng.standard_normal(call["shape"], dtype=np.float32)
                b = bias if call["bias"] else None
                y = ps.conv2d_sparse(x, weight, b, padding=call["padding"],
                                     stride=call["stride"])
                ref = case.with_(N=x.shape[0], H=x.shape[2], W=x.shape[3],
                                 padding=(call["padding"],) * 2,
                                 stride=(call["stride"],) * 2).reference(x, w, b)
                assert relative_error(y, ref) < TOL, (params, call)
    # Every distinct (geometry, bias, parameters) got its own plan, and only those.
    assert len(weight._plans) == 2 * len(calls)
    for n in range(1, 40):                           # many geometries: the oldest go
        ps.conv2d_sparse(rng.standard_normal((1, 6, n, 3), dtype=np.float32), weight,
                         padding=1)
    assert len(weight._plans) == conv2d_module._PLANS_PER_WEIGHT


def _repeated_layers(queue, rng):
    """Three prepared layers of different input sizes (so different packed-input sizes),
    with their device inputs and float64 references."""
    layers = []
    for n, c, hw, k in ((1, 3, 6, 4), (2, 5, 11, 6), (1, 4, 8, 3)):
        case = ConvCase(n, c, hw, hw, k, sparsity=0.5)
        x, w, csr, _ = case.make_inputs(rng)
        layers.append((ps.SparseConvWeight(csr, c, queue=queue), cl_array.to_device(queue, x),
                       case.reference(x, w, None)))
    return layers


def test_repeated_device_calls_share_the_threads_scratch(queue, rng):
    """Repeated device-array calls on prepared weights pack their input into one scratch
    buffer per thread and queue (runtime.scratch), grown as needed: calls of different
    layers, enqueued back to back with no wait, each get their own right answer."""
    runtime.release_staging()
    layers = _repeated_layers(queue, rng)
    for weight, x_dev, _ in layers:                  # validated once: the path is cached
        ps.conv2d_sparse(x_dev, weight, padding=1)
    queue.finish()
    outputs = [(ps.conv2d_sparse(x_dev, weight, padding=1), ref)
               for _ in range(3) for weight, x_dev, ref in layers]
    for y, ref in outputs:
        assert relative_error(y.get(), ref) < TOL
    biggest = max(plan.xpack_bytes for weight, _, _ in layers
                  for plan in weight._plans.values())
    buf = runtime.scratch(queue, 1)
    assert buf.size >= biggest and runtime.scratch(queue, biggest) is buf
    grown = runtime.scratch(queue, buf.size + 1)
    assert grown.size > buf.size and runtime.scratch(queue, 1) is grown    # grows, is kept
    ps.clear_weight_cache()                                                # and is dropped
    assert runtime.scratch(queue, 1) is not grown


def test_threads_sharing_a_queue_get_their_own_scratch(queue, rng):
    """Two threads enqueue repeated calls on one in-order queue at once: their packing and
    convolution launches interleave, so a scratch buffer shared between the threads would
    let one thread's convolution read the other's packed input."""
    per_thread = [_repeated_layers(queue, np.random.default_rng(seed)) for seed in (1, 2)]
    errors = []

    def work(layers):
        try:
            for _ in range(40):
                outputs = [(ps.conv2d_sparse(x_dev, weight, padding=1), ref)
                           for weight, x_dev, ref in layers]
                for y, ref in outputs:
                    assert relative_error(y.get(), ref) < TOL
        except Exception as exc:   # reported by the main thread
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(layers,)) for layers in per_thread]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)      # switch threads often: between a call's two launches
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]


def test_repeated_device_calls_follow_tuning_changes(queue, rng):
    """A repeated device-array call keeps its launch plan only while the tuning lookups
    answer as they did: an override takes effect on the next call, and leaving it goes
    back to the database's plan."""
    weight, x_dev, ref = _repeated_layers(queue, rng)[1]
    y = ps.conv2d_sparse(x_dev, weight, padding=1)
    assert relative_error(y.get(), ref) < TOL and len(weight._plans) == 1
    with override("conv2d_csr", VEC=2, PIX_VECS=3, WG_PIX=2, BATCH_LAYOUT=0):
        y = ps.conv2d_sparse(x_dev, weight, padding=1)
        assert relative_error(y.get(), ref) < TOL
    assert len(weight._plans) == 2
    plan = next(iter(weight._calls.values())).plan
    y = ps.conv2d_sparse(x_dev, weight, padding=1)
    assert relative_error(y.get(), ref) < TOL
    assert len(weight._plans) == 2 and next(iter(weight._calls.values())).plan is not plan


def test_repeated_device_calls_with_an_empty_weight_or_batch(queue, rng):
    """The repeated path fills the output of a weight with no nonzeros (and no bias or
    residual) with zeros, and enqueues nothing for an empty batch."""
    empty = ps.SparseConvWeight(sp.csr_matrix((4, 27), dtype=np.float32), 3, queue=queue)
    for n in (0, 2):
        x_dev = cl_array.to_device(queue, rng.standard_normal((n, 3, 5, 5), dtype=np.float32))
        for _ in range(3):       # validated, then repeated
            poison = runtime.empty(queue, (n, 4, 5, 5), np.float32,   # the pool's next
                                   allocator=runtime.memory_pool(queue.context))
            if poison.size:
                runtime.fill_array(queue, poison, np.nan)
            del poison
            y = ps.conv2d_sparse(x_dev, empty, padding=1)
            assert y.shape == (n, 4, 5, 5) and not np.any(y.get())


@pytest.mark.parametrize("case", [
    ConvCase(2, 6, 9, 11, 5, kernel=(1, 1), padding=(0, 0), sparsity=0.5, bias=True),
    ConvCase(1, 4, 7, 6, 3, kernel=(3, 3), padding=(0, 0), sparsity=0.5),  # unpadded 3x3
    ConvCase(3, 6, 5, 5, 6, kernel=(1, 1), padding=(0, 0), groups=2, sparsity=0.3),
], ids=["1x1", "3x3-pad0", "1x1-groups"])
def test_direct_plans_read_the_input_in_place(queue, rng, case):
    """Where the packed layout is the input's own (one float per packed pixel, stride 1,
    no padding), the convolution reads x where it lies, with no packing pass, if x's
    buffer also covers the tail the last pixel tile reads: that tail is NaN here and must
    not reach the result.  x at an offset, a buffer without the tail, or an out that is x
    itself take the packing pass."""
    x, w, csr, bias = case.make_inputs(rng)
    ref = case.reference(x, w, bias)
    weight = ps.SparseConvWeight(csr, case.C, case.kernel, case.groups, queue)
    kw = dict(groups=case.groups, padding=0)
    b_dev = cl_array.to_device(queue, bias) if bias is not None else None
    roomy = cl_array.to_device(queue, np.full(x.size + 4096, np.nan, np.float32))
    x_dev = roomy[:x.size].reshape(x.shape)
    x_dev.set(x)
    with override("conv2d_csr", BATCH_LAYOUT=0, VEC=2, PIX_VECS=3, WG_PIX=2):
        events = []
        y = ps.conv2d_sparse(x_dev, weight, b_dev, events=events, **kw)
        assert len(events) == 1                                   # no packing pass
        assert relative_error(y.get(), ref) < TOL
        tight = cl_array.to_device(queue, x)                     # no room for the tail
        offset = cl_array.to_device(queue, np.concatenate([[np.nan], x.ravel()]).astype(
            np.float32))[1:].reshape(x.shape)
        for packed in (tight, offset):
            events = []
            y = ps.conv2d_sparse(packed, weight, b_dev, events=events, **kw)
            assert len(events) == 2
            assert relative_error(y.get(), ref) < TOL
        if case.K == case.C:                                     # in place: out is x
            ps.conv2d_sparse(x_dev, weight, b_dev, out=x_dev, **kw)
            assert relative_error(x_dev.get(), ref) < TOL


def test_phase_zero_layers_pack_only_the_pixels_they_read(queue, rng):
    """A strided layer whose taps all fall on stride phase 0 (a 1x1 kernel, a kernel
    dilated by its stride) packs one phase, the input pixels the taps read, instead of
    stride_h * stride_w phases: a quarter of a stride-2 1x1 layer's input."""
    case = ConvCase(2, 8, 16, 16, 6, kernel=(1, 1), stride=(2, 2), padding=(0, 0),
                    sparsity=0.5)
    x, w, csr, _ = case.make_inputs(rng)
    weight = ps.SparseConvWeight(csr, case.C, case.kernel, queue=queue)
    y = ps.conv2d_sparse(cl_array.to_device(queue, x), weight, stride=2)
    assert relative_error(y.get(), case.reference(x, w, None)) < TOL
    (plan,) = weight._plans.values()
    assert plan.xpack_bytes < x.nbytes / 2          # about a quarter, plus the tile tail
    geometry = conv2d_module._geometry(x.shape, weight, 2, 0, 1)
    assert geometry.phases == 1
    dilated = ps.SparseConvWeight(csr, case.C, case.kernel, queue=queue)
    assert conv2d_module._geometry(x.shape, dilated, 2, 1, 2).phases == 1
    three = ps.SparseConvWeight(sp.random(6, 72, density=0.5, format="csr", dtype=np.float32,
                                          random_state=1), 8, 3, queue=queue)
    assert conv2d_module._geometry(x.shape, three, 2, 1, 1).phases == 4
    assert conv2d_module._geometry(x.shape, three, 2, 2, 2).phases == 1


def test_offset_device_arrays(queue, rng):
    case = ConvCase(4, 5, 8, 8, 6, sparsity=0.5)
    x, w, csr, _ = case.make_inputs(rng)
    x_dev = cl_array.to_device(queue, x)[1:]        # a view that starts inside the buffer
    out_dev = cl_array.empty(queue, (5, 6, 8, 8), np.float32)[2:]
    ps.conv2d_sparse(x_dev, csr, padding=1, out=out_dev)
    assert relative_error(out_dev.get(), case.reference(x[1:], w, None)) < TOL


def test_numpy_out_argument(queue, rng):
    case = ConvCase(2, 4, 7, 7, 3, sparsity=0.5)
    x, w, csr, _ = case.make_inputs(rng)
    out = np.full((2, 3, 7, 7), np.nan, np.float32)
    result = ps.conv2d_sparse(x, csr, padding=1, out=out, queue=queue)
    assert result is out
    assert relative_error(out, case.reference(x, w, None)) < TOL


def test_unsorted_and_duplicate_entries_are_summed(queue, rng):
    """Duplicates are summed and indices sorted: the matrix that toarray() describes."""
    k, c, r = 4, 3, 3
    rows = rng.integers(0, k, 60)
    cols = rng.integers(0, c * r * r, 60)
    vals = rng.standard_normal(60).astype(np.float32)
    order = rng.permutation(60)
    coo = sp.coo_matrix((vals[order], (rows[order], cols[order])), shape=(k, c * r * r))
    # Build CSR by hand so that duplicates and unsorted indices survive into the input.
    perm = np.argsort(rows[order], kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[order], minlength=k))])
    csr = sp.csr_matrix((vals[order][perm], cols[order][perm], indptr), shape=(k, c * r * r))
    assert not csr.has_canonical_format
    w = coo.toarray().reshape(k, c, r, r)
    x = rng.standard_normal((2, c, 6, 6), dtype=np.float32)
    y = ps.conv2d_sparse(x, csr, padding=1, queue=queue)
    ref = ConvCase(2, c, 6, 6, k).reference(x, w, None)
    assert relative_error(y, ref) < TOL
    assert not csr.has_canonical_format  # the caller's matrix is left untouched


def test_csr_array_and_kernel_size_inference(queue, rng):
    case = ConvCase(1, 3, 9, 9, 4, kernel=(5, 5), padding=(2, 2), sparsity=0.4)
    x, w, csr, _ = case.make_inputs(rng)
    y = ps.conv2d_sparse(x, sp.csr_array(csr), padding=2, queue=queue)
    assert relative_error(y, case.reference(x, w, None)) < TOL


def test_zero_batch_and_zero_channels(queue, rng):
    csr = sp.random(4, 27, density=0.5, format="csr", dtype=np.float32, random_state=1)
    x = np.zeros((0, 3, 5, 5), np.float32)
    assert ps.conv2d_sparse(x, csr, padding=1, queue=queue).shape == (0, 4, 5, 5)
    x = rng.standard_normal((2, 3, 5, 5), dtype=np.float32)
    empty = sp.csr_matrix((0, 27), dtype=np.float32)
    assert ps.conv2d_sparse(x, empty, padding=1, queue=queue).shape == (2, 0, 5, 5)


def test_defaults_render_and_build(queue):
    source = runtime.render("conv2d_csr.cl.mako",
                            **template_args(CONV2D_CSR.defaults(), has_bias=False))
    assert "pscl_conv2d_csr" in source
    runtime.build_program(queue.context, source)
