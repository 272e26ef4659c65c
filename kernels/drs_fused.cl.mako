## drs_fused (pysparsecl/families/drs_fused.py): for a few rows, projection and scores in one
## launch, the projected row in registers, parallel over columns.  ARGS: the kernel's
## parameters, declared in pysparsecl/families/drs_fused.py (SIGNATURE).
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="drs" file="drs_common.cl.mako"/>\
${fused_kernel()}

<%def name="fused_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/families/drs_fused.py.  K_PAD, the
// padded k, is compile-time so that the projected row stays in registers.
#define PSCL_VEC ${VEC}
#define PSCL_NCHUNK (${VEC} * ${NVEC})
#define PSCL_K_PAD ${K_PAD}

${drs.key_function()}

// Projection and scores in one launch, for a few rows.  Work-item (column range, row)
// projects its row itself -- R^T is read once per item, a small redundancy for a few
// items -- then scores its columns NCHUNK at a time.  The row-parallel kernels would
// leave all but one core idle on a single row.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_drs_fused(${ARGS["pscl_drs_fused"]})
{
    const int c0 = get_global_id(0) * cols_per_item;
    const int i = get_global_id(1);
    if (c0 >= n_cols || i >= M)
        return;
    const int c1 = min(n_cols, c0 + cols_per_item);
    const __global float *xr = x + x_off + (long)i * d;
% for q in range(K_PAD // VEC):
    pscl_floatv p${q} = (pscl_floatv)(0.0f);
% endfor
    const __global float *rr = rt;
    for (int j = 0; j < d; ++j, rr += PSCL_K_PAD) {
        const pscl_floatv a = (pscl_floatv)(xr[j]);
% for q in range(K_PAD // VEC):
        p${q} = fma(a, PSCL_LOAD_pscl_floatv(${q}, rr), p${q});
% endfor
    }
    float xp[PSCL_K_PAD];
% for q in range(K_PAD // VEC):
    PSCL_STORE_pscl_floatv(p${q}, ${q}, xp);
% endfor
    __global uint *kr = keys + (long)i * ldk;
    for (int n = c0; n < c1; n += PSCL_NCHUNK) {
% for c in range(NVEC):
        pscl_floatv acc${c} = (pscl_floatv)(0.0f);
% endfor
        const __global float *vc = v + n;
        for (int t = 0; t < k; ++t, vc += ldv) {
            const pscl_floatv xv = (pscl_floatv)(xp[t]);
% for c in range(NVEC):
            acc${c} = fma(xv, PSCL_LOAD_pscl_floatv(${c}, vc), acc${c});
% endfor
        }
% for c in range(NVEC):
        ${"vstore%d(pscl_key%d(acc%d), %d, kr + n);" % (VEC, VEC, c, c) if VEC > 1 else "kr[n + %d] = pscl_key1(acc%d);" % (c, c)}
% endfor
    }
}
</%def>
