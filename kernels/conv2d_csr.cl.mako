## Direct sparse convolution with CSR weights (Park et al. 2017; Escoin 2018).
##
## The host packs the input once per call into `xpack`: zero-padded and split into
## stride phases, so that the input element under output pixel (oh, ow) and weight
## (c, r, s) sits at the precomputed offset w_off[j] (fixed when the weight is prepared)
## plus the flat "virtual" pixel index p = oh * Wq + ow.  Consecutive pixels of a row --
## and across rows -- are then contiguous for every stride: one vector load and one
## vector FMA per nonzero per vector, no im2col and no local memory.  Virtual columns
## ow >= OW are computed and thrown away, unless COMPACT (batch layout only; template_args
## sets it to 0 in the pixel layout): then the work-items walk one flat range of the real
## output pixels of all image blocks, each vector with its own base pointer, so that
## neither the padding columns nor a part-filled last tile per image cost anything.
##
## Where that layout is the input's own (pixel layout or VEC 1, stride 1, no padding),
## xpack is the input itself and there is no packing pass (families/conv2d_csr.py).
##
## Two layouts of the packed input (tile parameter BATCH_LAYOUT):
##   0  [n][c * phases][Hq][Wq]          vectors run along VEC output pixels (any batch);
##   1  [n / VEC][c * phases][Hq][Wq][VEC]  vectors run along VEC images of the batch, so
##      every load is aligned (used when VEC divides the batch; much faster on CPUs,
##      where unaligned vector loads split across cache lines).  The loads go through a
##      vector-typed pointer, not vloadN: vloadN promises only scalar alignment, and
##      NVIDIA's compiler then splits it into VEC scalar loads.
##
## Kernel parameters: declared once, in pysparsecl/families/conv2d_csr.py (PACK_FLAT_ARGS,
## PACK_ROWS_ARGS, CONV_ARGS), rendered here from ARGS and launched by name.
##
## Epilogue, applied in the store (HAS_BIAS, RESIDUAL, RELU): out = act(conv + bias +
## residual), the residual a tensor of the output's shape read at the stored position,
## so that a ResNet block needs no separate elementwise pass.
<%namespace name="common" file="common.cl.mako"/>\
${common.vector_helpers("pscl_floatv", "float", VEC)}
<%
    def epilogue(x, r, relu="pscl_relu1"):
        """The stored value of x (a float; a vector with relu="pscl_reluv"), r the residual
        at the same place."""
        y = "(%s + %s)" % (x, r) if RESIDUAL else x
        return "%s(%s)" % (relu, y) if RELU else y

    def lane(v, e):   # common.component's text (a def writes to the output instead)
        return capture(common.component, v, VEC, e)
%>\
% if RELU:
// max(x, 0) that keeps NaN, as torch.relu does.
inline float pscl_relu1(float x) { return x < 0.0f ? 0.0f : x; }
inline pscl_floatv pscl_reluv(pscl_floatv v)
{
    return select(v, (pscl_floatv)(0.0f), v < (pscl_floatv)(0.0f));
}
% endif
// Tile parameters: declared once, in pysparsecl/families/conv2d_csr.py (SPEC).
#define PSCL_VEC ${VEC}
#define PSCL_PIX_VECS ${PIX_VECS}
#define PSCL_WG_PIX ${WG_PIX}
#define PSCL_WG_CH ${WG_CH}
% if BATCH_LAYOUT:
// Derived: floats per packed pixel; pixels between one work-item's vectors; pixels per
// work-group tile.
#define PSCL_PIX_FLOATS PSCL_VEC
#define PSCL_PIX_STEP PSCL_WG_PIX
#define PSCL_TILE_PIX (PSCL_PIX_VECS * PSCL_WG_PIX)
% else:
#define PSCL_PIX_FLOATS 1
#define PSCL_PIX_STEP (PSCL_WG_PIX * PSCL_VEC)
#define PSCL_TILE_PIX (PSCL_VEC * PSCL_PIX_VECS * PSCL_WG_PIX)
% endif

${common.udiv_helper()}
% if PACK == "flat":
${pack_flat()}
% else:
${pack_rows()}
% endif

% if LOCAL_X:
// Vectors of one input channel's tile (the work-group's pixels), in either layout.
#define PSCL_TILE_VECS (PSCL_PIX_VECS * PSCL_WG_PIX)
% endif
% if CH_FASTEST:
#define PSCL_CH_DIM 0
#define PSCL_PIX_DIM 1
% else:
#define PSCL_CH_DIM 1
#define PSCL_PIX_DIM 0
% endif

// Each work-item owns one output channel and PIX_VECS vectors; the CSR row loop keeps
// the accumulators in registers.  Rows are visited heaviest first (row_order).
//
// CBLOCK > 0 (CPUs): each row is cut into segments of CBLOCK input channels (row_ptr then
// holds n_seg + 1 offsets per row) with a barrier between segments, so that the
// work-group's items all finish one block of input channels before any starts the next:
// PoCL runs the items one after another between barriers, and the block's input tile
// stays in L1 for all of them.
//
// LOCAL_X (1x1 kernels, one group, with CBLOCK; GPUs): the work-group first copies the
// block's input tile into local memory, coalesced, and its WG_CH output channels read it
// there: a 1x1 layer reuses each input element only across output channels (a 3x3 one
// also across its nine taps, through the cache), so reading it from global memory once per
// nonzero bounded the kernel by cache bandwidth.
__kernel __attribute__((reqd_work_group_size(
    ${"PSCL_WG_CH, PSCL_WG_PIX" if CH_FASTEST else "PSCL_WG_PIX, PSCL_WG_CH"}, ${WG_IMG})))
void pscl_conv2d_csr(${ARGS["pscl_conv2d_csr"]})
{
    const int slot = get_global_id(PSCL_CH_DIM);
% if COMPACT:
    // The image blocks are part of the flat pixel range; dim 2 splits a work-group's share
    // of it into WG_IMG tiles.
<%  item_works = "slot < K" %>
% else:
    const int n = get_global_id(2);           // image, or image block of VEC images
<%  item_works = "slot < K && n < n_blocks" %>
% endif
% if CBLOCK:
    // Every item reaches every barrier; the ones past the edges do no work.
    const int active = ${item_works};
    const int k = active ? row_order[slot] : 0;
% else:
    if (!(${item_works}))
        return;
    const int k = row_order[slot];
% endif
    const int lane = get_local_id(PSCL_PIX_DIM);
% if COMPACT:
    // Real output pixel (block * OH * OW + oh * OW + ow) of this work-item's first vector;
    // its vectors are PSCL_PIX_STEP pixels apart, so that neighbouring work-items read
    // neighbouring memory (coalesced on GPUs).  Each vector has its own base in the packed
    // input, at virtual pixel oh * Wq + ow of its block; one past the last pixel reads
    // pixel 0 and is not stored.  The divisions are pscl_udiv by host magic numbers.
    const int p0 = (get_group_id(PSCL_PIX_DIM) * ${WG_IMG} + get_local_id(2)) * PSCL_TILE_PIX
                   + lane * (PSCL_PIX_STEP / PSCL_WG_PIX);
    const int out_plane = OH * OW;
    const __global float *xgroup = xpack + (k / k_per_group) * x_group_stride;
%   for b in range(PIX_VECS):
    const int live${b} = p0 + ${b} * PSCL_PIX_STEP < n_blocks * out_plane;
    const uint v${b} = live${b} ? p0 + ${b} * PSCL_PIX_STEP : 0;
    const uint blk${b} = pscl_udiv(v${b}, div_plane_m, div_plane_s);
    const uint q${b} = v${b} - blk${b} * out_plane;  // oh * OW + ow
    const uint oh${b} = pscl_udiv(q${b}, div_ow_m, div_ow_s);
    const __global float *xb${b} = xgroup + blk${b} * x_image_stride
        + ((long)oh${b} * Wq + (q${b} - oh${b} * OW)) * PSCL_PIX_FLOATS;
%   endfor
% else:
    // Virtual pixel of this work-item's first vector, as above.
    const int p0 = get_group_id(PSCL_PIX_DIM) * PSCL_TILE_PIX
                   + lane * (PSCL_PIX_STEP / PSCL_WG_PIX);
    const __global float *xbase = xpack + n * x_image_stride
        + (k / k_per_group) * x_group_stride + (long)p0 * PSCL_PIX_FLOATS;
% endif

% for b in range(PIX_VECS):
    pscl_floatv acc${b} = (pscl_floatv)(0.0f);
% endfor
% if CBLOCK:
    const __global int *seg = row_ptr + (long)k * (n_seg + 1);
%   if LOCAL_X:
    __local pscl_floatv xtile[${CBLOCK} * PSCL_TILE_VECS];
    const int lid = get_local_id(0) + get_local_id(1) * get_local_size(0);
    // The tile's first float in channel 0 of this image (block); channel c is
    // c * x_chan_stride floats on.
    const __global float *xsrc = xpack + n * x_image_stride
        + (long)get_group_id(PSCL_PIX_DIM) * PSCL_TILE_PIX * PSCL_PIX_FLOATS;
%   endif
    for (int blk = 0; blk < n_seg; ++blk) {
%   if LOCAL_X:
        for (int v = lid; v < ${CBLOCK} * PSCL_TILE_VECS; v += PSCL_WG_PIX * PSCL_WG_CH) {
            const int cl = v / PSCL_TILE_VECS;
            const int c = blk * ${CBLOCK} + cl;
            const __global float *from = xsrc + (long)c * x_chan_stride
                                         + (v - cl * PSCL_TILE_VECS) * PSCL_VEC;
%     if BATCH_LAYOUT:
            xtile[v] = c < c_per_group ? *(const __global pscl_floatv *)from
                                       : (pscl_floatv)(0.0f);
%     else:
            xtile[v] = c < c_per_group ? PSCL_LOAD_pscl_floatv(0, from) : (pscl_floatv)(0.0f);
%     endif
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        const int j_end = active ? seg[blk + 1] : 0;
        ${local_row_loop("active ? seg[blk] : 0", "j_end")}
%   else:
        const int j_end = active ? seg[blk + 1] : 0;
        ${row_loop("active ? seg[blk] : 0", "j_end")}
%   endif
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (!active)
        return;
% else:
    const int j_end = row_ptr[k + 1];
    ${row_loop("row_ptr[k]", "j_end")}
% endif

% if HAS_BIAS:
    const pscl_floatv b_k = (pscl_floatv)(bias[k]);
% endif
% if COMPACT:
    // Vector element e belongs to image blk * VEC + e: scatter each pixel to VEC images.
    const long image = (long)K * out_plane;
%   for b in range(PIX_VECS):
    if (live${b}) {
        const long at = ((long)blk${b} * PSCL_VEC * K + k) * out_plane + q${b};
        __global float *dst = out + out_offset + at;
%     if RESIDUAL:
        __global const float *rdst = residual + res_offset + at;
%     endif
        const pscl_floatv v = acc${b}${" + b_k" if HAS_BIAS else ""};
%     for e in range(VEC):
        dst[${e} * image] = ${epilogue(lane("v", e), "rdst[%d * image]" % e)};
%     endfor
    }
%   endfor
% elif BATCH_LAYOUT:
    // Vector element e belongs to image n * VEC + e: scatter each pixel to VEC images.
    const long at = ((long)n * PSCL_VEC * K + k) * OH * OW;
    __global float *dst = out + out_offset + at;
%   if RESIDUAL:
    __global const float *rdst = residual + res_offset + at;
%   endif
    const long image = (long)K * OH * OW;
%   for b in range(PIX_VECS):
    {
        const int p = p0 + ${b} * PSCL_PIX_STEP;
        const int oh = p / Wq;
        const int ow = p - oh * Wq;
        if (oh < OH && ow < OW) {
            const int q = oh * OW + ow;
            const pscl_floatv v = acc${b}${" + b_k" if HAS_BIAS else ""};
%     for e in range(VEC):
            dst[${e} * image + q] = ${epilogue(lane("v", e), "rdst[%d * image + q]" % e)};
%     endfor
        }
    }
%   endfor
% else:
    // Whole vectors where they fall inside one output row; element by element at row
    // ends and in the thrown-away virtual columns.
    __global float *dst = out + out_offset + ((long)n * K + k) * OH * OW;
%   if RESIDUAL:
    __global const float *rdst = residual + res_offset + ((long)n * K + k) * OH * OW;
%   endif
%   for b in range(PIX_VECS):
    {
        const int p = p0 + ${b} * PSCL_PIX_STEP;
        const pscl_floatv v = acc${b}${" + b_k" if HAS_BIAS else ""};
        const int oh = p / Wq;
        const int ow = p - oh * Wq;
%     if VEC > 1:
        // Where the packed rows are the output's (Wq == OW: stride 1, no padding) the
        // plane is contiguous, so a vector that wraps a row is still whole.
        if (Wq == OW ? p + PSCL_VEC <= OH * OW : (oh < OH && ow + PSCL_VEC <= OW)) {
            PSCL_STORE_pscl_floatv(${epilogue("v", "PSCL_LOAD_pscl_floatv(0, rdst + oh * OW + ow)", "pscl_reluv")}, 0,
                                   dst + oh * OW + ow);
        } else {
            int qh = oh, qw = ow;  // walk the elements, wrapping rows without dividing
%       for e in range(VEC):
            if (qh < OH && qw < OW)
                dst[qh * OW + qw] = ${epilogue(lane("v", e), "rdst[qh * OW + qw]")};
%         if e < VEC - 1:
            if (++qw == Wq) { qw = 0; ++qh; }
%         endif
%       endfor
        }
%     else:
        if (oh < OH && ow < OW)
            dst[oh * OW + ow] = ${epilogue("v", "rdst[oh * OW + ow]")};
%     endif
    }
%   endfor
% endif
}

## acc_b += w * x over the nonzeros [begin, end) of row k.
<%def name="row_loop(begin, end)">
% if UNROLL > 1:
    __attribute__((opencl_unroll_hint(${UNROLL})))
% endif
    for (int j = ${begin}; j < ${end}; ++j) {
        const int2 nz = w_nz[j];
        const pscl_floatv w = (pscl_floatv)(as_float(nz.y));
% if not COMPACT:
        const __global float *src = xbase + nz.x;
% endif
% for b in range(PIX_VECS):
%   if COMPACT:
        acc${b} = fma(w, *(const __global pscl_floatv *)(xb${b} + nz.x), acc${b});
%   elif BATCH_LAYOUT:
        acc${b} = fma(w, *(const __global pscl_floatv *)(src + ${b} * PSCL_PIX_STEP * PSCL_PIX_FLOATS), acc${b});
%   else:
        acc${b} = fma(w, PSCL_LOAD_pscl_floatv(0, src + ${b} * PSCL_PIX_STEP * PSCL_PIX_FLOATS), acc${b});
%   endif
% endfor
    }
</%def>


## row_loop reading the block's tile from local memory (LOCAL_X): a nonzero's offset is
## its input channel times x_chan_stride (a 1x1 kernel), the channel found by pscl_udiv.
<%def name="local_row_loop(begin, end)">
% if UNROLL > 1:
    __attribute__((opencl_unroll_hint(${UNROLL})))
% endif
    for (int j = ${begin}; j < ${end}; ++j) {
        const int2 nz = w_nz[j];
        const pscl_floatv w = (pscl_floatv)(as_float(nz.y));
        const int cl = (int)pscl_udiv(nz.x, div_chan_m, div_chan_s) - blk * ${CBLOCK};
        const __local pscl_floatv *src = xtile + cl * PSCL_TILE_VECS + lane;
% for b in range(PIX_VECS):
        acc${b} = fma(w, src[${b} * PSCL_WG_PIX], acc${b});
% endfor
    }
</%def>

## The input packing, by the routine's choice: a flat pass (conv2d_pack_flat, GPUs) or
## PACK_LANES work-items per row (conv2d_pack_rows).
<%def name="pack_flat()">
// GPUs: one flat NDRange over the whole packed array, PACK_ITEMS packed pixels per
// work-item PACK_WG apart (coalesced), so that the work-groups are few and full however
// small the planes (one work-group per plane row was launch-bound).  Packed pixel q lies in
// plane q / plane_size (plane = (image or image block) * C * phases + channel * phases +
// phase); with the batch layout a packed pixel is VEC floats, one per image of its block,
// so the index arithmetic is paid once per VEC floats (it, not memory, bounded the pass
// when it was paid per float) and the store is one aligned vector.  Pixels past n_packed
// are the slack that the last pixel tile reads, zeroed.  The divisions are
// multiplications by host-computed magic numbers (pscl_udiv).
% if BATCH_LAYOUT:
typedef pscl_floatv pscl_packed;
% else:
typedef float pscl_packed;
% endif
__kernel __attribute__((reqd_work_group_size(${PACK_WG}, 1, 1)))
void pscl_pack_input(${ARGS["pscl_pack_input"]})
{
    const uint first = get_group_id(0) * (${PACK_WG} * ${PACK_ITEMS}) + get_local_id(0);
    __attribute__((opencl_unroll_hint(${PACK_ITEMS})))
    for (int u = 0; u < ${PACK_ITEMS}; ++u) {
        const uint q = first + u * ${PACK_WG};
        if (q >= n_total)
            return;
        pscl_packed v = (pscl_packed)(0.0f);
        if (q < n_packed) {
            const uint plane = pscl_udiv(q, div_plane_m, div_plane_s);
            const uint i = q - plane * plane_size;
            const uint iq = pscl_udiv(i, div_wq_m, div_wq_s);
            const uint nc = pscl_udiv(plane, div_phases_m, div_phases_s);
            const uint phase = plane - nc * phases;
            const uint ph = pscl_udiv(phase, div_sw_m, div_sw_s);
            const int row = (int)(iq * stride_h + ph) - pad_top;
            const int col = (int)((i - iq * Wq) * stride_w + (phase - ph * stride_w)) - pad_left;
            if (row >= 0 && row < H && col >= 0 && col < W) {
% if BATCH_LAYOUT:
                // nc = block * C + c: image e of the block is C * H * W floats after image 0.
                const uint block = pscl_udiv(nc, div_c_m, div_c_s);
                const long image = (long)C * H * W;
                const __global float *src = x + x_offset
                    + (((long)block * ${VEC} * C + (nc - block * C)) * H + row) * W + col;
%   for e in range(VEC):
                ${common.component("v", VEC, e)} = src[${e} * image];
%   endfor
% else:
                v = x[x_offset + ((long)nc * H + row) * W + col];
% endif
            }
        }
        ((__global pscl_packed *)xpack)[q] = v;
    }
}
</%def>

<%def name="pack_rows()">
// PACK_LANES work-items per packed row (dim 0), rows along dim 1.  Rows are
// [image block][c * phases + phase][iq]; a row holds Wq pixels of PSCL_PIX_FLOATS floats.
// One lane copies a whole row on CPUs; 32 lanes write neighbouring columns on GPUs.
// Index arithmetic is per row, keeping integer division out of the copy loop.  Rows
// past n_rows zero the slack that the last pixel tile reads beyond the packed input.
__kernel __attribute__((reqd_work_group_size(${PACK_LANES}, ${PACK_ROWS}, 1)))
void pscl_pack_input(${ARGS["pscl_pack_input"]})
{
    const int row_id = get_global_id(1);
    const int lane = get_local_id(0);
    if (row_id >= n_rows_total)
        return;
    __global float *dst = xpack + (long)row_id * Wq * PSCL_PIX_FLOATS;
    const int plane = row_id / Hq;
    const int iq = row_id - plane * Hq;     // not row_id % Hq: see common.cl.mako, 1.
    const int nc = plane / phases;          // image (block) * C + channel
    const int phase = plane - nc * phases;
    const int ph = phase / stride_w;
    const int pw = phase - ph * stride_w;
    const int row = iq * stride_h + ph - pad_top;
    if (row_id >= n_rows || row < 0 || row >= H) {
        for (int f = lane; f < Wq * PSCL_PIX_FLOATS; f += ${PACK_LANES})
            dst[f] = 0.0f;
        return;
    }
    // Columns jq whose source column jq * stride_w + pw - pad_left lies inside [0, W):
    // zero borders and a copy loop with no per-element test.
    const int jq_lo = min(Wq, max(0, (pad_left - pw + stride_w - 1) / stride_w));
    const int last_col = W - 1 + pad_left - pw;  // C division truncates: keep it >= 0
    const int jq_hi = last_col < 0 ? jq_lo : min(Wq, max(jq_lo, last_col / stride_w + 1));
    for (int f = lane; f < jq_lo * PSCL_PIX_FLOATS; f += ${PACK_LANES})
        dst[f] = 0.0f;
% if BATCH_LAYOUT:
    // nc = block * C + c: the VEC images of the block are C * H * W floats apart.
    const int c = nc % C;
    const __global float *src = x + x_offset
        + ((long)(nc - c) * PSCL_VEC * H + (long)c * H + row) * W + pw - pad_left;
    const long image = (long)C * H * W;
    for (int jq = jq_lo + lane; jq < jq_hi; jq += ${PACK_LANES}) {
        pscl_floatv v;
%   for e in range(VEC):
        ${common.component("v", VEC, e)} = src[${e} * image + jq * stride_w];
%   endfor
        PSCL_STORE_pscl_floatv(v, jq, dst);
    }
% else:
    const __global float *src = x + x_offset + ((long)nc * H + row) * W + pw - pad_left;
    if (stride_w == 1) {
        for (int jq = jq_lo + lane; jq < jq_hi; jq += ${PACK_LANES})
            dst[jq] = src[jq];
    } else {
        for (int jq = jq_lo + lane; jq < jq_hi; jq += ${PACK_LANES})
            dst[jq] = src[jq * stride_w];
    }
% endif
    for (int f = jq_hi * PSCL_PIX_FLOATS + lane; f < Wq * PSCL_PIX_FLOATS; f += ${PACK_LANES})
        dst[f] = 0.0f;
}
</%def>
