## drs_project and drs_project_split (pysparsecl/families/drs_project*.py): out = A @ RT
## for the rows of A (x, or the weight rows W^T), where RT = R^T / sqrt(k) is (d, k_pad)
## with zero padding columns.  R is stored sparsely on the host; the device keeps this
## dense copy because one vector FMA over k lanes beats gathering d/3 inputs per output on
## every device we target (same work, no gathers).  Writes (rows, ld) or, with TRANSPOSED,
## (k_pad, ld) for the weight.  KIND "windows": the same projection of a convolution's
## windows, gathered from the packed NHWC input (masked_conv.cl.mako's pack) with RT's rows
## in (r, s, c) order, under drs_project's tile parameters.
## ARGS: the kernels' parameters, declared in pysparsecl/families/drs_project.py
## (PROJECT_SIGNATURE, WINDOWS_SIGNATURE).
<%namespace name="common" file="common.cl.mako"/>\
% if KIND == "windows":
${windows_kernel()}
% else:
${project_kernel()}
% endif

<%def name="project_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/families/drs_project.py (or
// drs_project_split.py: one body; the unsplit family renders with DSPLIT = 1).
#define PSCL_VEC ${VEC}
#define PSCL_KCHUNK (${VEC} * ${KVEC})

% if DSPLIT == 1:
// Work-item (row block, k chunk): ROWS rows of A times KVEC vectors of RT's columns.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
% else:
// Work-group (row block, k chunk) of DSPLIT items (GPUs): item t sums the products over
// j = t, t + DSPLIT, ... (coalesced reads of A's rows), then the partial sums meet in a
// tree in local memory.  A serial loop over all of d left a GPU mostly idle.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
% endif
void pscl_drs_project(${ARGS["pscl_drs_project"]})
{
% if DSPLIT == 1:
    const int r0 = get_global_id(0) * ${ROWS};
    const int c0 = get_global_id(1) * PSCL_KCHUNK;
    if (r0 >= n_rows || c0 >= k_pad)
        return;
    const int j0 = 0, j_step = 1;
% else:
    // The grid is exact (one work-group per row block and k chunk): no item returns early.
    const int r0 = get_group_id(0) * ${ROWS};
    const int c0 = get_group_id(1) * PSCL_KCHUNK;
    const int t = get_local_id(0);
    const int j0 = t, j_step = ${DSPLIT};
% endif
% for r in range(ROWS):
    // Rows past the end repeat the last row (no branch in the loop); they are not stored.
    const __global float *a${r} = a + a_off + (long)min(r0 + ${r}, n_rows - 1) * lda;
%   for v in range(KVEC):
    pscl_floatv acc${r}_${v} = (pscl_floatv)(0.0f);
%   endfor
% endfor
    const __global float *rc = rt + (long)j0 * k_pad + c0;
    for (int j = j0; j < d; j += j_step, rc += (long)j_step * k_pad) {
% for v in range(KVEC):
        const pscl_floatv rv${v} = PSCL_LOAD_pscl_floatv(${v}, rc);
% endfor
% for r in range(ROWS):
        {
            const pscl_floatv av = (pscl_floatv)(a${r}[j]);
%   for v in range(KVEC):
            acc${r}_${v} = fma(av, rv${v}, acc${r}_${v});
%   endfor
        }
% endfor
    }
% if DSPLIT > 1:
    __local pscl_floatv red[${RED_VECS}];   // [slot][t]
%   for r in range(ROWS):
%     for v in range(KVEC):
    red[${(r * KVEC + v) * DSPLIT} + t] = acc${r}_${v};
%     endfor
%   endfor
    barrier(CLK_LOCAL_MEM_FENCE);
    ${common.tree_sum("red", ROWS * KVEC, DSPLIT, "t", "t", DSPLIT)}
    if (t != 0)
        return;
%   for r in range(ROWS):
%     for v in range(KVEC):
    acc${r}_${v} = red[${(r * KVEC + v) * DSPLIT}];
%     endfor
%   endfor
% endif
% for r in range(ROWS):
    if (r0 + ${r} < n_rows) {
%   for v in range(KVEC):
%     if TRANSPOSED:
%       for e in range(VEC):
        out[(long)(c0 + ${v * VEC + e}) * ld_out + r0 + ${r}] = ${common.component("acc%d_%d" % (r, v), VEC, e)};
%       endfor
%     else:
        PSCL_STORE_pscl_floatv(acc${r}_${v}, ${v}, out + (long)(r0 + ${r}) * ld_out + c0);
%     endif
%   endfor
    }
% endfor
}
</%def>

<%def name="windows_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
#define PSCL_VEC ${VEC}
#define PSCL_KCHUNK (${VEC} * ${KVEC})
// Work-item (block of ROWS output pixels, k chunk): f(window) for each pixel, the window
// gathered tap by tap from xp (C contiguous floats per tap) and RT read as (R, S, C) rows.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_drs_conv_project(${ARGS["pscl_drs_conv_project"]})
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
