## Output-masked convolution for DSG: out[n, k, p] = mask[n, k, p] ? conv(x, w)[n, k, p] : 0,
## with no im2col.  The input is packed once per call into zero-padded NHWC, so that the
## window under output pixel p for tap (r, s) is C contiguous floats at
##     xp + ((n * Hp + oh * sh + r * dh) * Wp + ow * sw + s * dw) * C
## and the weight is kept as (K, R, S, C) rows, so a tap of output channel k is C
## contiguous floats too: every product is a vector dot product over channels.
##
##
##   KIND == "pack"      x (N, C, H, W) -> xp (N, Hp, Wp, Cp), borders and channels >= C
##                       zero (Cp = C here; masked_conv_dw pads to whole vectors); and w (K,
##                       C, R, S) -> (K, R, S, C).  (masked_conv_channels, masked_conv_dw and
##                       drs_mask_conv2d use the packed input too.)
##   KIND == "general"   masked_conv (pysparsecl/families/masked_conv.py), any mask:
##                       work-item (channel k, block of output pixels) scans the mask plane
##                       of k (contiguous) and computes the selected pixels GROUP at a time,
##                       sharing each load of the weight row.
##
## No local memory and no barriers (PoCL runs a work-group as a loop over its items).
<%namespace name="common" file="common.cl.mako"/>\
% if KIND == "pack":
${pack_kernel()}
% else:
${general_kernel()}
% endif

<%def name="pack_kernel()">
// Work-item: one padded input pixel (n, ih, iw), all Cp channels (a contiguous NHWC run).
// Reads are C-strided but a work-group's neighbouring pixels share their lines.
__kernel void pscl_conv_pack(${ARGS["pscl_conv_pack"]})
{
    const int iw = get_global_id(0);
    const int ih = get_global_id(1);
    const int n = get_global_id(2);
    if (iw >= Wp || ih >= Hp || n >= N)
        return;
    __global float *dst = xp + (((long)n * Hp + ih) * Wp + iw) * Cp;
    const int h = ih - pad_h, w = iw - pad_w;
    int c = 0;
    if (h >= 0 && h < H && w >= 0 && w < W) {
        const __global float *src = x + x_off + ((long)n * C * H + h) * W + w;
        for (; c < C; ++c)
            dst[c] = src[(long)c * H * W];
    }
    for (; c < Cp; ++c)      // the border, and channels C..Cp (padding to whole vectors)
        dst[c] = 0.0f;
}

// The same on a GPU, as a transpose through local memory: a work-group takes 32 padded
// pixels of one input row and 32 channels, reads them along the row and writes them along
// the channels, both coalesced.  (The per-pixel kernel above writes C-strided runs: on the
// H200 it took 104 us for res2's input at batch 32, about 7x its bytes at bandwidth.)
__kernel __attribute__((reqd_work_group_size(32, 8, 1)))
void pscl_conv_pack_tiled(${ARGS["pscl_conv_pack_tiled"]})
{
    __local float tile[32][33];
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int iw0 = get_group_id(0) * 32, c0 = get_group_id(1) * 32;
    const int n = get_group_id(2) / Hp, ih = get_group_id(2) - n * Hp;
    const int h = ih - pad_h, w = iw0 + tx - pad_w;
    const int inside = h >= 0 && h < H && w >= 0 && w < W;
    for (int k = ty; k < 32; k += 8) {
        const int c = c0 + k;
        tile[k][tx] = inside && c < C ? x[x_off + (((long)n * C + c) * H + h) * W + w] : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k = ty; k < 32; k += 8) {
        const int iw = iw0 + k, c = c0 + tx;
        if (iw < Wp && c < Cp)
            xp[(((long)n * Hp + ih) * Wp + iw) * Cp + c] = tile[tx][k];
    }
}

// w (K, C, R, S) -> (K, R, S, C): work-item (tap, k) gathers the tap's C weights.
__kernel void pscl_conv_weight_pack(${ARGS["pscl_conv_weight_pack"]})
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
void pscl_masked_conv(${ARGS["pscl_masked_conv"]})
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
