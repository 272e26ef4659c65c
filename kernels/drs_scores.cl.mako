## drs_scores (pysparsecl/families/drs_scores.py): S = Xp @ V, (M, k) times (k, N_pad), a
## small dense product in registers (ROWS rows x NVEC vectors of columns per work-item),
## stored as order-preserving keys for the top-k.  ARGS: the kernel's parameters, declared
## in pysparsecl/families/drs_scores.py (SIGNATURE).
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="drs" file="drs_common.cl.mako"/>\
${scores_kernel()}

<%def name="scores_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/families/drs_scores.py.
#define PSCL_VEC ${VEC}
#define PSCL_NCHUNK (${VEC} * ${NVEC})

${drs.key_function()}

// Work-item (column chunk, row block): ROWS rows of Xp times NVEC vectors of V's columns;
// each V vector load feeds ROWS FMAs and each Xp element is broadcast to NVEC FMAs.  The
// scores are stored as order-preserving keys (pscl_key), what the top-k kernel ranks.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_drs_scores(${ARGS["pscl_drs_scores"]})
{
    const int n0 = get_global_id(0) * PSCL_NCHUNK;
    const int i0 = get_global_id(1) * ${ROWS};
    if (n0 >= n_cols || i0 >= M)
        return;
% for r in range(ROWS):
    const __global float *x${r} = xp + xp_off + (long)min(i0 + ${r}, M - 1) * ldx;
%   for c in range(NVEC):
    pscl_floatv acc${r}_${c} = (pscl_floatv)(0.0f);
%   endfor
% endfor
    const __global float *vc = v + n0;
    for (int t = 0; t < k; ++t, vc += ldv) {
% for c in range(NVEC):
        const pscl_floatv v${c} = PSCL_LOAD_pscl_floatv(${c}, vc);
% endfor
% for r in range(ROWS):
        {
            const pscl_floatv xv = (pscl_floatv)(x${r}[t]);
%   for c in range(NVEC):
            acc${r}_${c} = fma(xv, v${c}, acc${r}_${c});
%   endfor
        }
% endfor
    }
% for r in range(ROWS):
    if (i0 + ${r} < M) {
%   for c in range(NVEC):
        ${"vstore%d(pscl_key%d(acc%d_%d), %d, s + (long)(i0 + %d) * lds + n0);" % (VEC, VEC, r, c, c, r) if VEC > 1 else "s[(long)(i0 + %d) * lds + n0 + %d] = pscl_key1(acc%d_%d);" % (r, c, r, c)}
%   endfor
    }
% endfor
}
</%def>
