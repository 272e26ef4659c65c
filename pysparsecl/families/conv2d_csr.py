"""conv2d_csr: direct sparse convolution with CSR weights (Park et al. 2017; Escoin 2018).

The input is packed once per call into ``xpack``, zero-padded and split into stride phases
(pscl_pack_input), so that each nonzero weight reads its input vector at a precomputed
offset; a work-item owns a block of output pixels of some output channels and does one
vector FMA per nonzero per vector (pscl_conv2d_csr), with the epilogue (bias, residual,
ReLU) applied in the store.  See kernels/conv2d_csr.cl.mako.  The prepared weight
(:class:`pysparsecl.ops.conv2d.SparseConvWeight`) holds the nonzeros, row pointers and
row order; a :class:`Plan` holds the two kernels with every argument that a call does not
change already set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import runtime, tuning
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import (
    INT32_MAX,
    check_alloc,
    elem_offset,
    int_pair,
    round_up,
    udiv_magic,
    written,
)
from ..params import Constraint, ParamSpec, TileParam
from . import conv2d_pack_rows

TEMPLATE = "conv2d_csr.cl.mako"

PACK_WG = 64  # work-items per packing work-group, whatever their shape

SPEC = ParamSpec(
    family="conv2d_csr",
    params=(
        TileParam("VEC", 8, (1, 2, 4, 8, 16),
                  "floats per vector (one load + FMA each): output pixels, or images of the "
                  "batch with BATCH_LAYOUT"),
        TileParam("PIX_VECS", 4, (1, 2, 3, 4, 6, 7, 8),
                  "vectors of pixels held per work-item (7 tiles the 7 x 2^k planes of "
                  "ResNet's layers with no part-filled tile)"),
        TileParam("WG_PIX", 1, (1, 2, 4, 8, 16, 32, 64, 128, 256),
                  "work-items along pixels in a work-group"),
        TileParam("WG_CH", 1, (1, 2, 4, 8, 16, 32, 64, 128),
                  "work-items along output channels"),
        TileParam("CH_FASTEST", 0, (0, 1),
                  "1: NDRange dim 0 walks output channels (input tile reused from cache)"),
        TileParam("BATCH_LAYOUT", 0, (0, 1),
                  "1: vectors run along VEC images (aligned loads) when VEC divides the batch"),
        TileParam("COMPACT", 0, (0, 1),
                  "1: in the batch layout, work-items walk one flat range over the real "
                  "output pixels of all image blocks: no padding columns (2 of 9 on a 7x7 "
                  "layer), no part-filled tile per image; ignored in the pixel layout, so "
                  "that an override of the layout never clashes"),
        TileParam("UNROLL", 1, (1, 2, 4), "unroll hint for the loop over a row's nonzeros"),
        TileParam("CBLOCK", 0, (0, 4, 8, 16, 32, 64),
                  "input channels per barrier-separated segment of each row, so a work-group "
                  "shares each block's input tile in cache (CPUs); 0: no segments"),
        TileParam("WG_IMG", 1, (1, 2, 4, 8),
                  "work-items along images (or image blocks): fuller work-groups on small "
                  "planes"),
        TileParam("LOCAL_X", 0, (0, 1),
                  "1: with CBLOCK, a 1x1 layer's work-group copies each block's input tile "
                  "into local memory and reads it there (GPUs); ignored for other kernels, "
                  "groups, COMPACT or WG_IMG > 1"),
    ),
    constraints=(
        Constraint("accumulators_fit_registers", lambda p: p["VEC"] * p["PIX_VECS"] <= 96,
                   "VEC * PIX_VECS float accumulators must fit the register file "
                   "(96 = 12 of an x86 core's 16 AVX2 registers)"),
        Constraint("local_tile_needs_blocks", lambda p: not p["LOCAL_X"] or p["CBLOCK"] > 0,
                   "LOCAL_X stages the tile of each CBLOCK block: CBLOCK must be > 0"),
        Constraint("local_tile_fits", lambda p: not p["LOCAL_X"] or
                   4 * p["CBLOCK"] * p["VEC"] * p["PIX_VECS"] * p["WG_PIX"] <= 32768,
                   "LOCAL_X's tile (4 * CBLOCK * VEC * PIX_VECS * WG_PIX bytes) must fit "
                   "the 32 KiB of local memory every OpenCL device has"),
    ),
    work_group_size=lambda p: max(p["WG_PIX"] * p["WG_CH"] * p["WG_IMG"], PACK_WG),
)


def pack_rows(pack_lanes: int) -> int:
    """Rows per packing work-group when PACK_LANES work-items share a row (0: the flat
    pass)."""
    return max(1, PACK_WG // pack_lanes) if pack_lanes else 1


# The kernels' arguments, declared once: the template renders its parameter lists from
# these (ARGS) and the plans bind and launch them by name.
_I32, _U32, _I64 = np.int32, np.uint32, np.int64
_PACK_HEAD = (Pointer("x", "float", restrict=True), Scalar("x_offset", _I64),
              Pointer("xpack", "float", const=False, restrict=True))
_STRIDE_PAD = tuple(Scalar(n, _I32) for n in ("stride_h", "stride_w", "pad_top", "pad_left"))


def _magic(*names):
    """Scalars (m, s) of pscl_udiv for each divisor name: div_<name>_m, div_<name>_s."""
    return tuple(Scalar(f"div_{n}_{part}", _U32) for n in names for part in "ms")


#: The flat packing pass (conv2d_pack_flat): packed pixels, divisions by magic numbers.
PACK_FLAT_ARGS = Signature("pscl_pack_input", _PACK_HEAD + (
    Scalar("n_packed", _U32), Scalar("n_total", _U32), Scalar("C", _I32), Scalar("H", _I32),
    Scalar("W", _I32), Scalar("plane_size", _U32), Scalar("Wq", _U32), Scalar("phases", _U32),
    *_STRIDE_PAD, *_magic("plane", "wq", "phases", "sw", "c")))
#: The row packing pass (conv2d_pack_rows): PACK_LANES work-items per packed row.
PACK_ROWS_ARGS = Signature("pscl_pack_input", _PACK_HEAD + (
    Scalar("n_rows", _I32), Scalar("n_rows_total", _I32), Scalar("C", _I32),
    Scalar("H", _I32), Scalar("W", _I32), Scalar("Hq", _I32), Scalar("Wq", _I32),
    Scalar("phases", _I32), *_STRIDE_PAD))
CONV_ARGS = Signature("pscl_conv2d_csr", (
    Pointer("xpack", "float", restrict=True),
    Pointer("w_nz", "int2", restrict=True),        # nnz (offset in floats into a group's
                                                   # packed input, float bits): one load
    Pointer("row_ptr", "int", restrict=True),      # K + 1, or K * (n_seg + 1) with CBLOCK
    Pointer("row_order", "int", restrict=True),    # K rows, heaviest first (load balance)
    Pointer("bias", "float", restrict=True),       # K (read only when HAS_BIAS)
    Pointer("out", "float", const=False, restrict=True), Scalar("out_offset", _I64),
    Pointer("residual", "float"), Scalar("res_offset", _I64),   # read only when RESIDUAL
    Scalar("K", _I32), Scalar("k_per_group", _I32), Scalar("n_blocks", _I32),
    Scalar("n_seg", _I32), Scalar("OH", _I32), Scalar("OW", _I32), Scalar("Wq", _I32),
    Scalar("x_image_stride", _I64), Scalar("x_group_stride", _I64),
    Scalar("x_chan_stride", _I32), Scalar("c_per_group", _I32),   # read only with LOCAL_X
    *_magic("plane", "ow", "chan")))
_ARGS = {True: KernelArgs(PACK_FLAT_ARGS, CONV_ARGS), False: KernelArgs(PACK_ROWS_ARGS, CONV_ARGS)}


def kernel_args(params) -> KernelArgs:
    """The signatures of conv2d_csr.cl.mako's kernels for the template values ``params``
    (the packing's among them: PACK)."""
    return _ARGS[params["PACK"] == "flat"]


def template_args(params, has_bias: bool, relu: bool = False, residual: bool = False) -> dict:
    """Everything conv2d_csr.cl.mako renders from: the tile parameters with the packing
    family's values (``PACK`` and its parameter, see conv2d_pack_rows/conv2d_pack_flat;
    the row pass by default), the epilogue variant (bias, residual, ReLU), derived sizes
    and the kernels' signatures (ARGS).  COMPACT is the one that applies: it is ignored in
    the pixel layout."""
    if "PACK" not in params:   # the row pass: the packing routine's default
        params = {**conv2d_pack_rows.template_values(conv2d_pack_rows.SPEC.defaults()),
                  **params}
    return dict(params, HAS_BIAS=int(has_bias), RELU=int(relu), RESIDUAL=int(residual),
                ARGS=kernel_args(params),
                PACK_WG=PACK_WG,
                PACK_ROWS=pack_rows(params.get("PACK_LANES", 0)),
                COMPACT=int(bool(params["COMPACT"] and params["BATCH_LAYOUT"])))


def shape_class(batch: int, cin_per_group: int, out_hw, kernel_size, stride) -> str:
    """The tuning database's shape class of a convolution: kernel, stride, and input
    channels per group, output pixels per image and batch, each rounded down to a power of
    two (batch capped at 32), e.g. ``k3x3-s1x1-c64-px2048-b32``."""
    (r, s), (sh, sw) = int_pair(kernel_size, "kernel_size", 1), int_pair(stride, "stride", 1)
    return (f"k{r}x{s}-s{sh}x{sw}-c{tuning.pow2_floor(cin_per_group)}"
            f"-px{tuning.pow2_floor(out_hw[0] * out_hw[1])}-b{tuning.pow2_floor(min(batch, 32))}")


@dataclass(frozen=True)
class Plan:
    """Everything one launch needs that depends only on the device, the input geometry,
    the tile parameters and the epilogue's variant: built once per such key and kept by
    the weight, so that a repeated call does no host arithmetic beyond the enqueues.  Its
    kernels have every argument that the call does not change set already."""
    pack: runtime.BoundKernel   # free: x, x offset, xpack
    conv: runtime.BoundKernel   # free: xpack, bias, out, out offset, residual, its offset
    pack_sizes: tuple           # (global, local)
    conv_sizes: tuple
    xpack_bytes: int
    #: The packed input is the input itself, laid out as it comes (one float per packed
    #: pixel, stride 1, no padding: 1x1 layers mostly), so the convolution can read the
    #: input where it lies, with no packing pass, if its buffer covers ``xpack_bytes``
    #: from the start (the tail a last pixel tile reads and throws away).
    direct: bool



def build_plan(queue, weight, geom, variant: tuple, params) -> Plan:
    """The launch plan of ``weight`` (a SparseConvWeight) on an input of geometry ``geom``
    for tile parameters ``params`` (with the packing family's template values) and the
    epilogue ``variant`` (has_bias, relu, residual)."""
    vec = params["VEC"]
    # The batch layout needs whole vectors of images; otherwise vectors run along pixels.
    batched = bool(params["BATCH_LAYOUT"]) and geom.N % vec == 0
    # The local tile serves 1x1 kernels of one group, one image (block) per work-group.
    local_x = bool(params["LOCAL_X"] and params["CBLOCK"] and weight.kernel_size == (1, 1)
                   and weight.groups == 1 and params["WG_IMG"] == 1
                   and not (batched and params["COMPACT"]))
    params = dict(params, BATCH_LAYOUT=int(batched), LOCAL_X=int(local_x))
    args = template_args(params, *variant)
    pixel_floats = vec if batched else 1
    n_blocks = geom.N // vec if batched else geom.N  # NDRange dim 2: images or image blocks
    K, C = weight.out_channels, weight.in_channels
    plane = geom.Hq * geom.Wq
    group_stride = (C // weight.groups) * geom.phases * plane * pixel_floats
    image_stride = C * geom.phases * plane * pixel_floats
    tile = params["PIX_VECS"] * params["WG_PIX"] * (1 if batched else vec)  # pixels
    compact = bool(args["COMPACT"])
    # Pixels the tiles cover: the real ones of all image blocks in one range (COMPACT), or
    # the virtual ones of each image (padding columns too).
    n_tiles = -(-(geom.OH * geom.OW * n_blocks if compact else geom.OH * geom.Wq) // tile)
    row_floats = geom.Wq * pixel_floats
    n_rows = n_blocks * C * geom.phases * geom.Hq
    # Slack rows that the last pixel tile of an image may read past the packed input
    # (none with COMPACT, whose vectors past the end read pixel 0).
    n_rows_total = n_rows + (0 if compact else -(-(n_tiles * tile * pixel_floats) // row_floats))
    n_total = n_rows_total * row_floats
    if group_stride + n_tiles * tile * pixel_floats > INT32_MAX or n_total > INT32_MAX:
        raise ValueError("the padded input is too large for int32 indexing "
                         f"({n_total} elements); split the batch")
    check_alloc(queue, 4 * n_total, "the padded input")

    kern = runtime.kernels(queue.context, TEMPLATE,
                           ("pscl_pack_input", "pscl_conv2d_csr"), **args)
    lanes = params["PACK_LANES"] if args["PACK"] == "rows" else 0
    rows = pack_rows(lanes)
    stride_pad = dict(stride_h=np.int32(geom.stride[0]), stride_w=np.int32(geom.stride[1]),
                      pad_top=np.int32(geom.padding[0]), pad_left=np.int32(geom.padding[1]))
    if lanes:
        pack_sizes = ((lanes, round_up(n_rows_total, rows)), (lanes, rows))
        pack_args = dict(n_rows=np.int32(n_rows), n_rows_total=np.int32(n_rows_total),
                         C=np.int32(C), H=np.int32(geom.H), W=np.int32(geom.W),
                         Hq=np.int32(geom.Hq), Wq=np.int32(geom.Wq),
                         phases=np.int32(geom.phases), **stride_pad)
    else:
        # Counted in packed pixels (pixel_floats floats each), as the flat pass walks them.
        per_group = PACK_WG * params["PACK_ITEMS"]
        n_pixels = n_total // pixel_floats
        magic = {f"div_{name}_{part}": value
                 for name, d in (("plane", plane), ("wq", geom.Wq), ("phases", geom.phases),
                                 ("sw", geom.stride[1]), ("c", C))
                 for part, value in zip("ms", udiv_magic(d))}
        pack_sizes = ((-(-n_pixels // per_group) * PACK_WG,), (PACK_WG,))
        pack_args = dict(n_packed=np.uint32(n_rows * geom.Wq), n_total=np.uint32(n_pixels),
                         C=np.int32(C), H=np.int32(geom.H), W=np.int32(geom.W),
                         plane_size=np.uint32(plane), Wq=np.uint32(geom.Wq),
                         phases=np.uint32(geom.phases), **stride_pad, **magic)

    wg_pix, wg_ch, wg_img = params["WG_PIX"], params["WG_CH"], params["WG_IMG"]
    if compact:  # WG_IMG consecutive tiles per work-group, one per dim-2 slice
        pix_size, img_size = -(-n_tiles // wg_img) * wg_pix, wg_img
    else:
        pix_size, img_size = n_tiles * wg_pix, round_up(n_blocks, wg_img)
    ch_size = round_up(K, wg_ch)
    if params["CH_FASTEST"]:
        conv_sizes = ((ch_size, pix_size, img_size), (wg_ch, wg_pix, wg_img))
    else:
        conv_sizes = ((pix_size, ch_size, img_size), (wg_pix, wg_ch, wg_img))
    cblock = params["CBLOCK"]
    row_ptr, n_seg = ((weight.segments(cblock), weight.n_segments(cblock)) if cblock
                      else (weight.row_ptr, 0))
    (plane_m, plane_s), (ow_m, ow_s) = udiv_magic(geom.OH * geom.OW), udiv_magic(geom.OW)
    chan_stride = geom.phases * plane * pixel_floats   # a 1x1 nonzero's offset per channel
    chan_m, chan_s = udiv_magic(chan_stride)
    pack = runtime.BoundKernel.bind(kern["pscl_pack_input"], free=("x", "x_offset", "xpack"),
                                    **pack_args)
    conv = runtime.BoundKernel.bind(
        kern["pscl_conv2d_csr"],
        free=("xpack", "bias", "out", "out_offset", "residual", "res_offset"),
        w_nz=weight.nonzeros(geom, pixel_floats).data, row_ptr=row_ptr.data,
        row_order=weight.row_order.data, K=np.int32(K), k_per_group=np.int32(K // weight.groups),
        n_blocks=np.int32(n_blocks), n_seg=np.int32(n_seg), OH=np.int32(geom.OH),
        OW=np.int32(geom.OW), Wq=np.int32(geom.Wq), x_image_stride=np.int64(image_stride),
        x_group_stride=np.int64(group_stride), div_plane_m=plane_m, div_plane_s=plane_s,
        div_ow_m=ow_m, div_ow_s=ow_s, x_chan_stride=np.int32(chan_stride),
        c_per_group=np.int32(C // weight.groups), div_chan_m=chan_m, div_chan_s=chan_s)
    direct = (pixel_floats == 1 and geom.stride == (1, 1) and geom.padding == (0, 0)
              and (geom.Hq, geom.Wq) == (geom.H, geom.W))
    return Plan(pack, conv, pack_sizes, conv_sizes, 4 * n_total, direct)




def launch(queue, plan: Plan, x_dev, bias_buf, out_dev, residual, events, xpack,
           in_order: bool) -> None:
    """Enqueue the packing and the convolution of ``plan``; ``bias_buf`` is the bias's
    buffer (any buffer when the variant has none), ``residual`` the residual device array
    or None; ``xpack`` the packed input's buffer (``runtime.scratch``), else one from the
    memory pool (None).  A direct plan reads ``x_dev`` in place instead, where it can.
    ``in_order``: whether ``queue`` is in order (``runtime.in_order``; callers keep it)."""
    x_buf = x_dev.base_data
    if plan.direct and not x_dev.offset and x_buf.size >= plan.xpack_bytes and \
            out_dev.base_data.int_ptr != x_buf.int_ptr:   # (an in-place out needs the copy)
        xpack, ev_pack, waits = x_buf, None, list(x_dev.events)
    else:
        if xpack is None:
            xpack = runtime.memory_pool(queue.context)(plan.xpack_bytes)  # a bare buffer
        filled = []
        if plan.direct:
            # The packing is a plain copy, and zeros for the tail that the last pixel tile
            # reads (its results are not stored, but nothing reads unwritten memory).
            tail = plan.xpack_bytes - x_dev.nbytes
            if tail:
                filled.append(runtime.enqueue_fill(queue, xpack, np.float32(0),
                                                   x_dev.nbytes, tail))
            ev_pack = runtime.enqueue_copy(queue, xpack, x_buf, byte_count=x_dev.nbytes,
                                           src_offset=x_dev.offset,
                                           wait_for=x_dev.events or None)
        else:
            ev_pack = plan.pack.launch(queue, *plan.pack_sizes, x=x_buf,
                                       x_offset=elem_offset(x_dev), xpack=xpack,
                                       wait_for=x_dev.events or None)
        # An in-order queue already runs the convolution after the packing.
        waits = [] if in_order else [ev_pack] + filled
    res_buf, res_offset = ((residual.base_data, elem_offset(residual)) if residual is not None
                           else (out_dev.base_data, np.int64(0)))   # unread
    ev_conv = plan.conv.launch(
        queue, *plan.conv_sizes, xpack=xpack, bias=bias_buf, out=out_dev.base_data,
        out_offset=elem_offset(out_dev), residual=res_buf, res_offset=res_offset,
        wait_for=(waits + list(out_dev.events)
                  + (list(residual.events) if residual is not None else [])) or None)
    written(out_dev, ev_conv)
    # A pooled xpack goes back to the pool when this returns; that is safe because every
    # later use of the pool's buffers is enqueued on an in-order queue behind ev_conv.
    if events is not None:
        events.extend([ev_pack, ev_conv] if ev_pack is not None else [ev_conv])
