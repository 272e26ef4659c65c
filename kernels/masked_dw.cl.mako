## masked_dw (pysparsecl/families/masked_dw.py): dw = x^T @ (mask * dy), as its transpose:
## column j of dw is a sum of the rows of x that select j, scaled by dy; a work-item owns
## one column and one K chunk.  ACROSS as in masked_dx: WG columns at one K chunk (CPU) or
## WG consecutive K chunks of one column (GPU: coalesced loads of each selecting row of x).
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="m" file="masked_common.cl.mako"/>\
${m.prelude()}
${dw_kernel()}

<%def name="dw_kernel()">
#define PSCL_KCHUNK (${VEC} * ${KVEC})
// dw = x^T @ (mask * dy).  Work-item (column j, K chunk): dw[j, chunk] is the sum, over
// the rows i that select column j, of dy[i, j] * x[i, chunk].  Each column's selecting
// rows come as a list (pscl_cols_list: row and dy value), built once.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_dw(${ARGS["pscl_masked_dw"]})
{
    ${m.item_position("j")}
    if (j >= N || k0 >= K)
        return;
    ${m.chunk_begin()}
    const __global int2 *list = rows + (long)j * M;
    const int n_sel = counts[j];
    for (int s = 0; s < n_sel; ++s) {
        const int2 r = list[s];
        const float g = as_float(r.y);
        const __global float *src = x + x_off + (long)r.x * ldx + k0;
        ${m.chunk_fma("g", "src")}
    }
    // dw is written transposed, (N, K): whole vectors (strided column stores cost more
    // than the product at high sparsity); the wrapper transposes it once.
    __global float *dst = dw + (long)j * K + k0;
    if (whole) {
% for v in range(KVEC):
        PSCL_STORE_pscl_floatv(acc${v}, ${v}, dst);
% endfor
    } else {
        for (int e = 0; e < part; ++e)
            dst[e] = tail[e];
    }
}
</%def>
