## masked_conv_dw (pysparsecl/families/masked_conv_dw.py): the weight gradient of DSG's
## output-masked convolution y = mask * conv2d(x, w),
##     dw[k, c, r, s] = sum over (n, oh, ow) selected for k of
##                      dy[n, k, oh, ow] * x[n, c, oh * sh - ph + r * dh, ow * sw - pw + s * dw].
## The input is packed once (masked_conv.cl.mako's pscl_conv_pack) into zero-padded NHWC
## with its channels padded with zeros to Cp, a multiple of VEC, so that the window under
## output pixel (oh, ow) at tap (r, s) is Cp contiguous floats that vector loads read whole:
##     xp + ((n * Hp + oh * sh + r * dh) * Wp + ow * sw + s * dw) * Cp
##
## Work-item (output channel k, chunk of CVEC channel vectors) holds the R x S taps'
## accumulators of its chunk (R, S are compile-time), walks the mask plane of k
## (contiguous per image) and, at each selected position, reads dy once and FMAs the
## R x S windows of its chunk.  MASK == "window": (N, K, OH, OW) bytes, tested per
## position; MASK == "channel": (N, K, 1, 1) bytes, tested per image.  An unselected dy
## entry is never read, so Inf/NaN there cannot leak.
##
## Every dw element is written exactly once (no atomics, no zero-fill, deterministic); no
## local memory and no barriers (PoCL runs a work-group as a loop over its items).
<%namespace name="common" file="common.cl.mako"/>\
${dw_kernel()}

<%def name="dw_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
#define PSCL_VEC ${VEC}

// Work-item i = k * chunks + j: output channel k, channel vectors j * CVEC .. + CVEC - 1
// (those of a partial last chunk that lie past Cp are skipped: has<v>).  The
// work-items of one k are neighbours, so they share the reads of its mask and dy planes.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_conv_dw(${ARGS["pscl_masked_conv_dw"]})
{
    const int n_vec = Cp / PSCL_VEC;
    const int chunks = (n_vec + ${CVEC - 1}) / ${CVEC};
    const int i = get_global_id(0);
    if (i >= K * chunks)
        return;
    const int k = i / chunks;
    const int v0 = (i - k * chunks) * ${CVEC};
% for v in range(CVEC):
    const int cv${v} = (v0 + ${v}) * PSCL_VEC;
%   if v:
    const bool has${v} = v0 + ${v} < n_vec;
%   endif
% endfor
% for r in range(R):
%   for s in range(S):
%     for v in range(CVEC):
    pscl_floatv acc${r}_${s}_${v} = (pscl_floatv)(0.0f);
%     endfor
%   endfor
% endfor
    const int P = OH * OW;
    for (int n = 0; n < N; ++n) {
        const long plane = ((long)n * K + k) * P;
% if MASK == "channel":
        if (!mask[mask_off + (long)n * K + k])
            continue;
% else:
        const __global uchar *m = mask + mask_off + plane;
% endif
        const __global float *g_row = dy + dy_off + plane;
        int p = 0;
        for (int oh = 0; oh < OH; ++oh) {
            const __global float *x_row = xp + ((long)n * Hp + oh * str_h) * Wp * Cp;
            for (int ow = 0; ow < OW; ++ow, ++p) {
% if MASK == "window":
                if (!m[p])
                    continue;
% endif
                const pscl_floatv g = (pscl_floatv)(g_row[p]);
                const __global float *base = x_row + (long)ow * str_w * Cp;
% for r in range(R):
%   for s in range(S):
                {
                    const __global float *tap = base + ((long)${r} * dil_h * Wp + ${s} * dil_w) * Cp;
                    acc${r}_${s}_0 = fma(g, PSCL_LOAD_pscl_floatv(0, tap + cv0), acc${r}_${s}_0);
%     for v in range(1, CVEC):
                    if (has${v})
                        acc${r}_${s}_${v} = fma(g, PSCL_LOAD_pscl_floatv(0, tap + cv${v}),
                                                acc${r}_${s}_${v});
%     endfor
                }
%   endfor
% endfor
            }
        }
    }
    // dw (K, C, R, S): channel c of tap (r, s) at ((k * C + c) * R + r) * S + s.
    __global float *dst = dw + dw_off + (long)k * C * ${R * S};
    float lanes[PSCL_VEC];
% for v in range(CVEC):
    if (v0 + ${v} < n_vec) {
%   for r in range(R):
%     for s in range(S):
        PSCL_STORE_pscl_floatv(acc${r}_${s}_${v}, 0, lanes);
        for (int e = 0; e < PSCL_VEC && cv${v} + e < C; ++e)
            dst[(long)(cv${v} + e) * ${R * S} + ${r * S + s}] = lanes[e];
%     endfor
%   endfor
    }
% endfor
}
</%def>
