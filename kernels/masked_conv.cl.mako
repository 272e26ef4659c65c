## Output-masked convolution for DSG: out[n, k, p] = mask[n, k, p] ? conv(x, w)[n, k, p] : 0,
## with no im2col.  The input is packed once per call into zero-padded NHWC, so that the
## window under output pixel p for tap (r, s) is C contiguous floats at
##     xp + ((n * Hp + oh * sh + r * dh) * Wp + ow * sw + s * dw) * C
## and the weight is kept as (K, R, S, C) rows, so a tap of output channel k is C
## contiguous floats too: every product is a vector dot product over channels.
##
##   KIND == "pack"      x (N, C, H, W) -> xp (N, Hp, Wp, C), borders zero.
##   KIND == "general"   any mask: work-item (channel k, block of output pixels) scans the
##                       mask plane of k (contiguous) and computes the selected pixels
##                       GROUP at a time, sharing each load of the weight row.
##   KIND == "channels"  a mask constant over each OH x OW plane (a per-sample channel
##                       mask): for each image, the list of its selected channels; a
##                       work-item computes PIX pixels x KB selected channels, a register
##                       tile where each x load feeds KB FMAs and each w load PIX FMAs.
##   KIND == "project"   DRS for convolutions: f(window) = window @ RT for every output
##                       pixel, gathered from xp (RT rows reordered to (r, s, c)).
##
## No local memory and no barriers (PoCL runs a work-group as a loop over its items).
<%namespace name="common" file="common.cl.mako"/>\
% if KIND == "pack":
${pack_kernel()}
% elif KIND == "general":
${general_kernel()}
% elif KIND == "channels":
${channels_kernel()}
% elif KIND == "project":
${project_kernel()}
% endif

<%def name="pack_kernel()">
// Work-item: one padded input pixel (n, ih, iw), all C channels (a contiguous NHWC run).
// Reads are C-strided but a work-group's neighbouring pixels share their lines.
__kernel void pscl_conv_pack(__global const float *restrict x, const long x_off,
                             __global float *restrict xp, const int N, const int C,
                             const int H, const int W, const int Hp, const int Wp,
                             const int pad_h, const int pad_w)
{
    const int iw = get_global_id(0);
    const int ih = get_global_id(1);
    const int n = get_global_id(2);
    if (iw >= Wp || ih >= Hp || n >= N)
        return;
    __global float *dst = xp + (((long)n * Hp + ih) * Wp + iw) * C;
    const int h = ih - pad_h, w = iw - pad_w;
    if (h < 0 || h >= H || w < 0 || w >= W) {
        for (int c = 0; c < C; ++c)
            dst[c] = 0.0f;
        return;
    }
    const __global float *src = x + x_off + ((long)n * C * H + h) * W + w;
    for (int c = 0; c < C; ++c)
        dst[c] = src[(long)c * H * W];
}

// w (K, C, R, S) -> (K, R, S, C): work-item (tap, k) gathers the tap's C weights.
__kernel void pscl_conv_weight_pack(__global const float *restrict w, const long w_off,
                                    __global float *restrict wk, const int K, const int C,
                                    const int taps)
{
    const int t = get_global_id(0);
    const int k = get_global_id(1);
    if (t >= taps || k >= K)
        return;
    const __global float *src = w + w_off + (long)k * C * taps + t;
    __global float *dst = wk + ((long)k * taps + t) * C;
    for (int c = 0; c < C; ++c)
        dst[c] = src[(long)c * taps];
}
</%def>

<%def name="prelude()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
#define PSCL_VEC ${VEC}

inline float pscl_hsum(const pscl_floatv v)
{
% if VEC == 1:
    return v;
% else:
    float total = 0.0f;
%   for e in range(VEC):
    total += ${common.component("v", VEC, e)};
%   endfor
    return total;
% endif
}
</%def>

## G output pixels of one channel: acc_q += x window of pixel q . w row, over taps and C.
<%def name="conv_dot_group(G, base, store)">
            {
% for q in range(G):
                pscl_floatv acc${q} = (pscl_floatv)(0.0f);
                float s${q} = 0.0f;
% endfor
                const int c_vec = C / PSCL_VEC * PSCL_VEC;
                for (int r = 0; r < R; ++r) {
                    for (int s = 0; s < S; ++s) {
                        const long tap = ((long)r * dil_h * Wp + s * dil_w) * C;
                        const __global float *wt = wr + (r * S + s) * C;
% for q in range(G):
                        const __global float *x${q} = xp + ${base(q)} + tap;
% endfor
                        int c = 0;
                        for (; c < c_vec; c += PSCL_VEC) {
                            const pscl_floatv f = PSCL_LOAD_pscl_floatv(0, wt + c);
% for q in range(G):
                            acc${q} = fma(PSCL_LOAD_pscl_floatv(0, x${q} + c), f, acc${q});
% endfor
                        }
                        for (; c < C; ++c) {
% for q in range(G):
                            s${q} = fma(x${q}[c], wt[c], s${q});
% endfor
                        }
                    }
                }
% for q in range(G):
                ${store(q, "s%d + pscl_hsum(acc%d)" % (q, q))};
% endfor
            }
</%def>

<%def name="general_kernel()">
${prelude()}
// Work-item (output channel k, block of output pixels i = n * P + p): the mask plane of k
// is contiguous, so the scan is cheap; the selected pixels are computed GROUP at a time.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_conv(
    __global const float *restrict xp,                        // (N, Hp, Wp, C)
    __global const float *restrict wk,                        // (K, R, S, C)
    __global const uchar *restrict mask, const long mask_off, // (N, K, OH, OW)
    __global float *restrict out, const long out_off,         // (N, K, OH, OW)
    const int N, const int C, const int K, const int OH, const int OW,
    const int Hp, const int Wp, const int R, const int S, const int str_h, const int str_w,
    const int dil_h, const int dil_w, const int rows_per_block)
{
    const int k = get_global_id(0);
    if (k >= K)
        return;
    const int P = OH * OW;
    const int i0 = get_global_id(1) * rows_per_block;
    const int i1 = min(N * P, i0 + rows_per_block);
    if (i0 >= i1)
        return;
    const __global float *wr = wk + (long)k * R * S * C;
    long bases[${GROUP}], dsts[${GROUP}];
    int g = 0;
    int n = i0 / P, p = i0 - n * P;
    for (int i = i0; i < i1; ++i) {
        const long e = ((long)n * K + k) * P + p;
        if (mask[mask_off + e]) {
            const int oh = p / OW, ow = p - oh * OW;
            bases[g] = (((long)n * Hp + oh * str_h) * Wp + ow * str_w) * C;
            dsts[g] = e;
            if (++g == ${GROUP}) {
                ${conv_dot_group(GROUP, lambda q: "bases[%d]" % q,
                                 lambda q, v: "out[out_off + dsts[%d]] = %s" % (q, v))}
                g = 0;
            }
        } else {
            out[out_off + e] = 0.0f;
        }
        if (++p == P) {
            p = 0;
            ++n;
        }
    }
    int base = 0;
% for piece in [v for v in (8, 4, 2, 1) if v < GROUP]:
    if (g & ${piece}) {
        ${conv_dot_group(piece, lambda q: "bases[base + %d]" % q,
                         lambda q, v: "out[out_off + dsts[base + %d]] = %s" % (q, v))}
        base += ${piece};
    }
% endfor
}
</%def>

<%def name="channels_kernel()">
${prelude()}
// Work-item (block of PIX output pixels, group of KB selected channels, image n).  The
// output was zero-filled; only the selected channels' planes are written.  Pixels and
// channels past the end repeat the last valid one (no branches in the loop) and are not
// stored.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_conv_channels(
    __global const float *restrict xp,                        // (N, Hp, Wp, C)
    __global const float *restrict wk,                        // (K, R, S, C)
    __global const int *restrict chans,                       // (N, K) selected, compact
    __global const int *restrict counts,                      // (N,)
    __global float *restrict out, const long out_off,         // (N, K, OH, OW)
    const int C, const int K, const int OH, const int OW, const int Hp, const int Wp,
    const int R, const int S, const int str_h, const int str_w, const int dil_h,
    const int dil_w)
{
    const int P = OH * OW;
    const int p0 = get_global_id(0) * ${PIX};
    const int g0 = get_global_id(1) * ${KB};
    const int n = get_global_id(2);
    const int n_sel = counts[n];
    if (p0 >= P || g0 >= n_sel)
        return;
    // Output column = pix - oh * OW, not pix % OW: see common.cl.mako, 1.
% for q in range(PIX):
    const int pix${q} = min(p0 + ${q}, P - 1);
    const int oh${q} = pix${q} / OW;
    const long b${q} = (((long)n * Hp + oh${q} * str_h) * Wp + (pix${q} - oh${q} * OW) * str_w)
                       * C;
% endfor
% for kb in range(KB):
    const int k${kb} = chans[(long)n * K + min(g0 + ${kb}, n_sel - 1)];
    const __global float *w${kb} = wk + (long)k${kb} * R * S * C;
% endfor
% for q in range(PIX):
%   for kb in range(KB):
    pscl_floatv acc${q}_${kb} = (pscl_floatv)(0.0f);
    float s${q}_${kb} = 0.0f;
%   endfor
% endfor
    const int c_vec = C / PSCL_VEC * PSCL_VEC;
    for (int r = 0; r < R; ++r) {
        for (int s = 0; s < S; ++s) {
            const long tap = ((long)r * dil_h * Wp + s * dil_w) * C;
            const int wtap = (r * S + s) * C;
            int c = 0;
            for (; c < c_vec; c += PSCL_VEC) {
% for kb in range(KB):
                const pscl_floatv f${kb} = PSCL_LOAD_pscl_floatv(0, w${kb} + wtap + c);
% endfor
% for q in range(PIX):
                {
                    const pscl_floatv xv = PSCL_LOAD_pscl_floatv(0, xp + b${q} + tap + c);
%   for kb in range(KB):
                    acc${q}_${kb} = fma(xv, f${kb}, acc${q}_${kb});
%   endfor
                }
% endfor
            }
            for (; c < C; ++c) {
% for q in range(PIX):
%   for kb in range(KB):
                s${q}_${kb} = fma(xp[b${q} + tap + c], w${kb}[wtap + c], s${q}_${kb});
%   endfor
% endfor
            }
        }
    }
% for kb in range(KB):
    if (g0 + ${kb} < n_sel) {
        __global float *o = out + out_off + ((long)n * K + k${kb}) * P;
%   for q in range(PIX):
        if (p0 + ${q} < P)
            o[p0 + ${q}] = s${q}_${kb} + pscl_hsum(acc${q}_${kb});
%   endfor
    }
% endfor
}
</%def>

<%def name="project_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
#define PSCL_VEC ${VEC}
#define PSCL_KCHUNK (${VEC} * ${KVEC})
// Work-item (block of ROWS output pixels, k chunk): f(window) for each pixel, the window
// gathered tap by tap from xp (C contiguous floats per tap) and RT read as (R, S, C) rows.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_drs_conv_project(
    __global const float *restrict xp,                        // (N, Hp, Wp, C)
    __global const float *restrict rt, const int k_pad,       // (R * S * C, k_pad)
    __global float *restrict out,                             // (N * P, k_pad)
    const int n_pix, const int C, const int OH, const int OW, const int Hp, const int Wp,
    const int R, const int S, const int str_h, const int str_w, const int dil_h,
    const int dil_w)
{
    const int i0 = get_global_id(0) * ${ROWS};
    const int c0 = get_global_id(1) * PSCL_KCHUNK;
    if (i0 >= n_pix || c0 >= k_pad)
        return;
    const int P = OH * OW;
    // Remainders as x - (x / y) * y, not x % y: see common.cl.mako, 1.
% for q in range(ROWS):
    const int pix${q} = min(i0 + ${q}, n_pix - 1);
    const int n${q} = pix${q} / P;
    const int p${q} = pix${q} - n${q} * P;
    const int oh${q} = p${q} / OW;
    const long b${q} = (((long)n${q} * Hp + oh${q} * str_h) * Wp + (p${q} - oh${q} * OW) * str_w)
                       * C;
%   for v in range(KVEC):
    pscl_floatv acc${q}_${v} = (pscl_floatv)(0.0f);
%   endfor
% endfor
    const __global float *rr = rt + c0;
    for (int r = 0; r < R; ++r) {
        for (int s = 0; s < S; ++s) {
            const long tap = ((long)r * dil_h * Wp + s * dil_w) * C;
            for (int c = 0; c < C; ++c, rr += k_pad) {
% for v in range(KVEC):
                const pscl_floatv rv${v} = PSCL_LOAD_pscl_floatv(${v}, rr);
% endfor
% for q in range(ROWS):
                {
                    const pscl_floatv a = (pscl_floatv)(xp[b${q} + tap + c]);
%   for v in range(KVEC):
                    acc${q}_${v} = fma(a, rv${v}, acc${q}_${v});
%   endfor
                }
% endfor
            }
        }
    }
% for q in range(ROWS):
    if (i0 + ${q} < n_pix) {
%   for v in range(KVEC):
        PSCL_STORE_pscl_floatv(acc${q}_${v}, ${v}, out + (long)(i0 + ${q}) * k_pad + c0);
%   endfor
    }
% endfor
}
</%def>
