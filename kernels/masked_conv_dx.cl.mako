## masked_conv_dx (pysparsecl/families/masked_conv_dx.py): the input gradient of DSG's
## output-masked convolution y = mask * conv2d(x, w),
##     dx[n, c, h, w] = sum over taps (r, s) and output pixels (oh, ow) with
##                      oh * sh - ph + r * dh = h and ow * sw - pw + s * dw = w, of
##                      sum over k selected at (n, oh, ow) of w[k, c, r, s] * dy[n, k, oh, ow].
## A gather per input pixel: no atomics, every dx element written once, deterministic.
##
##   KIND == "pack"    w (K, C, R, S) -> wk (K, R, S, Cp), channels >= C zero, Cp a multiple
##                     of VEC: the weights of one (k, tap) are Cp contiguous floats.
##   KIND == "lists"   per output pixel (n, oh, ow), the list of its selected channels k
##                     with their dy (int2: k, bits of dy) and the list's length; built once
##                     and read by every input pixel whose window covers (oh, ow).
##                     MASK == "window": (N, K, OH, OW) bytes; "channel": (N, K, 1, 1).
##                     An unselected dy entry is never read, so Inf/NaN there cannot leak.
##   KIND == "dx"      work-item (input pixel (n, h, w), chunk of CVEC channel vectors): for
##                     each tap whose output pixel exists (the stride divides the offset),
##                     walks that pixel's list and FMAs the selected channels' weight rows.
##
## No local memory and no barriers (PoCL runs a work-group as a loop over its items).
<%namespace name="common" file="common.cl.mako"/>\
% if KIND == "pack":
${pack_kernel()}
% elif KIND == "lists":
${lists_kernel()}
% else:
${dx_kernel()}
% endif

<%def name="pack_kernel()">
// w (K, C, R, S) -> (K, R, S, Cp): work-item (tap, k) gathers the tap's C weights.
__kernel void pscl_conv_dx_weight_pack(${ARGS["pscl_conv_dx_weight_pack"]})
{
    const int t = get_global_id(0);
    const int k = get_global_id(1);
    if (t >= taps || k >= K)
        return;
    const __global float *src = w + w_off + (long)k * C * taps + t;
    __global float *dst = wk + ((long)k * taps + t) * Cp;
    int c = 0;
    for (; c < C; ++c)
        dst[c] = src[(long)c * taps];
    for (; c < Cp; ++c)
        dst[c] = 0.0f;
}
</%def>

<%def name="lists_kernel()">
// Work-item: output pixel p of image n.  Its mask and dy entries are P apart; the
// neighbouring work-items read the neighbouring bytes, so the lines are shared.
// (k, dy) pairs are stored with vstore2, not as int2 literals: common.cl.mako, 4.
__kernel void pscl_conv_dx_lists(${ARGS["pscl_conv_dx_lists"]})
{
    const int p = get_global_id(0);
    const int n = get_global_id(1);
    if (p >= P || n >= N)
        return;
    const long q = (long)n * P + p;
    __global int *list = lists + 2 * q * K;
    int count = 0;
    for (int k = 0; k < K; ++k) {
        const long e = ((long)n * K + k) * P + p;
% if MASK == "channel":
        if (mask[mask_off + (long)n * K + k])
% else:
        if (mask[mask_off + e])
% endif
            vstore2((int2)(k, as_int(dy[dy_off + e])), count++, list);
    }
    counts[q] = count;
}
</%def>

<%def name="dx_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
#define PSCL_VEC ${VEC}

// Work-item (i = w * chunks + j, h, n): input pixel (n, h, w), channel vectors j * CVEC ..
// + CVEC - 1 (those of a partial last chunk that lie past Cp are skipped: has<v>).
// The chunks of one pixel are neighbours, so they share the reads of its lists.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_conv_dx(${ARGS["pscl_masked_conv_dx"]})
{
    const int n_vec = Cp / PSCL_VEC;
    const int chunks = (n_vec + ${CVEC - 1}) / ${CVEC};
    const int i = get_global_id(0);
    const int h = get_global_id(1);
    const int n = get_global_id(2);
    if (i >= W * chunks)
        return;
    const int w = i / chunks;
    const int v0 = (i - w * chunks) * ${CVEC};
% for v in range(CVEC):
    const int cv${v} = (v0 + ${v}) * PSCL_VEC;
%   if v:
    const bool has${v} = v0 + ${v} < n_vec;
%   endif
    pscl_floatv acc${v} = (pscl_floatv)(0.0f);
% endfor
    const long tap_stride = (long)R * S * Cp;           // from one k's weights to the next
    for (int r = 0; r < R; ++r) {
        const int th = h + pad_h - r * dil_h;           // = oh * str_h where oh exists
        if (th < 0)
            break;                                      // and stays negative for larger r
        const int oh = th / str_h;                      // (no %: common.cl.mako, 1)
        if (oh * str_h != th || oh >= OH)
            continue;
        for (int s = 0; s < S; ++s) {
            const int tw = w + pad_w - s * dil_w;
            if (tw < 0)
                break;
            const int ow = tw / str_w;
            if (ow * str_w != tw || ow >= OW)
                continue;
            const long q = ((long)n * OH + oh) * OW + ow;
            const __global int2 *list = lists + q * K;
            const int count = counts[q];
            const __global float *wt = wk + (r * S + s) * Cp;
            for (int e = 0; e < count; ++e) {
                const int2 entry = list[e];
                const pscl_floatv g = (pscl_floatv)(as_float(entry.y));
                const __global float *row = wt + entry.x * tap_stride;
                acc0 = fma(g, PSCL_LOAD_pscl_floatv(0, row + cv0), acc0);
% for v in range(1, CVEC):
                if (has${v})
                    acc${v} = fma(g, PSCL_LOAD_pscl_floatv(0, row + cv${v}), acc${v});
% endfor
            }
        }
    }
    // dx (N, C, H, W): channel c at ((n * C + c) * H + h) * W + w.
    __global float *dst = dx + dx_off + ((long)n * C * H + h) * W + w;
    const long plane = (long)H * W;
    float lanes[PSCL_VEC];
% for v in range(CVEC):
    if (v0 + ${v} < n_vec) {
        PSCL_STORE_pscl_floatv(acc${v}, 0, lanes);
        for (int e = 0; e < PSCL_VEC && cv${v} + e < C; ++e)
            dst[(cv${v} + e) * plane] = lanes[e];
    }
% endfor
}
</%def>
