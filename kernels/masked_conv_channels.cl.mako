## masked_conv_channels (pysparsecl/families/masked_conv_channels.py): a mask constant over
## each OH x OW plane (a per-sample channel mask): for each image, the list of its selected
## channels; a work-item computes PIX pixels x KB selected channels, a register tile where
## each x load feeds KB FMAs and each w load PIX FMAs.  Reads the packed input and weight
## of masked_conv.cl.mako.
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="conv" file="masked_conv.cl.mako"/>\
${channels_kernel()}

<%def name="channels_kernel()">
${conv.prelude()}
// Work-item (block of PIX output pixels, group of KB selected channels, image n).  The
// output was zero-filled; only the selected channels' planes are written.  Pixels and
// channels past the end repeat the last valid one (no branches in the loop) and are not
// stored.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_conv_channels(${ARGS["pscl_masked_conv_channels"]})
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
