## masked_gemm (pysparsecl/families/masked_gemm.py): the column-oriented masked GEMM,
## CPU-shaped.  One W row is shared by the x rows that select it within a block of rows:
## the row block stays in L2 while every column passes over it, so W is read once per
## block rather than once per selecting row.
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="m" file="masked_common.cl.mako"/>\
${m.prelude()}
${gemm_kernel()}

<%def name="gemm_kernel()">
% if ZEROED:
// A bool mask's dense output, zeroed row-major before the column kernel runs, which then
// writes only the selected outputs.  Written by the column kernel, one column at a time,
// the zeros of a 4096 x 1024 output took about 5.7 ms on the 2-core PoCL CPU, against
// 0.3-0.6 ms here (the whole product at 10% keep: 19 ms).  A work-item zeroes
// ${ZERO_CHUNK} floats.
__kernel void pscl_zero_fill(${ARGS["pscl_zero_fill"]})
{
    const long begin = (long)get_global_id(0) * ${ZERO_CHUNK};
    const long end = min(n, begin + ${ZERO_CHUNK});
    __global float *o = out + out_off;
    long e = begin;
    for (; e + 16 <= end; e += 16)
        vstore16((float16)(0.0f), 0, o + e);
    for (; e < end; ++e)
        o[e] = 0.0f;
}

% endif
// Column-oriented masked product.  Work-item (j, b) owns column j within row block b: it
// scans the selection of column j down the block and computes the selected outputs
// GROUP rows at a time, each group sharing the loads of wt[j, :].  Dim 0 walks columns,
// so the work-groups that run together share one row block in cache.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_gemm(${ARGS["pscl_masked_gemm"]})
{
    const int j = get_global_id(0);
    if (j >= N)
        return;
    const int i0 = get_global_id(1) * rows_per_block;
    const int i1 = min(M, i0 + rows_per_block);
    const __global float *wr = wt + (long)j * ldw;
    const __global float *xb = x + x_off;
    __global float *o = out + out_off;
    int rows[${GROUP}];
    long dsts[${GROUP}];
    int g = 0;
    for (int i = i0; i < i1; ++i) {
% if MASK == "bool":
        const long e = (long)i * N + j;
        if (!sel[sel_off + e]) {
%   if not ZEROED:
            o[e] = 0.0f;
%   endif
            continue;
        }
        dsts[g] = e;
% else:
        const int slot = sel[sel_off + (long)i * N + j];
        if (slot < 0)
            continue;
        dsts[g] = (long)i * out_cols + slot;
% endif
        rows[g] = i;
        if (++g == ${GROUP}) {
            ${m.dot_group(GROUP, "wr", lambda q: "xb + (long)rows[%d] * ldx" % q,
                        lambda q, v: "o[dsts[%d]] = %s" % (q, v))}
            g = 0;
        }
    }
% if GROUP > 1:
    ${m.flush_tail("wr", lambda q: "xb + (long)rows[%s] * ldx" % q,
                 lambda q, v: "o[dsts[%s]] = %s" % (q, v))}
% endif
}
</%def>
