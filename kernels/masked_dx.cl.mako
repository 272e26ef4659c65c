## masked_dx (pysparsecl/families/masked_dx.py): dx = (mask * dy) @ W^T.  Each row of dx is
## a sum of the selected rows of wt, scaled by dy; a work-item owns one row and one K chunk.
## ACROSS 0: a work-group's items take WG rows at one K chunk (CPU: the rows share the
## chunk of W in cache); ACROSS 1: WG consecutive K chunks of one row (GPU: every selected
## row's loads coalesce, and the work-group walks one list in step).
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="m" file="masked_common.cl.mako"/>\
${m.prelude()}
${dx_kernel()}

<%def name="dx_kernel()">
#define PSCL_KCHUNK (${VEC} * ${KVEC})
// dx = (mask * dy) @ W^T.  Work-item (row i, K chunk): dx[i, chunk] is the sum, over the
// columns j that row i selects, of dy[i, j] * wt[j, chunk] -- one contiguous piece of a
// weight row per selected output, nothing for the others.  The row's selection comes as a
// list (idx, or compacted once from a bool mask by pscl_bool_rows), not rescanned per
// chunk.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_dx(${ARGS["pscl_masked_dx"]})
{
    ${m.item_position("i")}
    if (i >= M || k0 >= K)
        return;
    ${m.chunk_begin()}
    const long row = (long)i * ld;
    const int n_sel = ${"counts[i]" if MASK == "bool" else "ld"};
    for (int s = 0; s < n_sel; ++s) {
        const int j = cols[cols_off + row + s];
        if ((uint)j >= (uint)N)   // idx is validated before launch; this keeps memory safe
            continue;
        const float g = dy[dy_off + row + ${"j" if MASK == "bool" else "s"}];
        const __global float *src = wt + (long)j * ldw + k0;
        ${m.chunk_fma("g", "src")}
    }
    __global float *dst = dx + dx_off + (long)i * K + k0;
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
