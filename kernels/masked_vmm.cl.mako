## masked_vmm (pysparsecl/families/masked_vmm.py): the row-oriented masked VMM, CPU-shaped.
## One x row is shared, the selected W rows are gathered: the x row stays in L1, the W rows
## stream from memory.  See masked_common.cl.mako for the layout and the mask forms.
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="m" file="masked_common.cl.mako"/>\
${m.prelude()}
${vmm_kernel()}

<%def name="vmm_kernel()">
// Row-oriented masked product (the VMM; any number of rows along dim 1).  A work-item
// scans CHUNK entries of one row's selection -- mask columns or idx slots -- and computes
// the selected outputs GROUP at a time, each group sharing the loads of the x row.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_vmm(${ARGS["pscl_masked_vmm"]})
{
    const int row = get_global_id(1);
    const int e0 = get_global_id(0) * ${CHUNK};
    if (e0 >= n_entries)
        return;
    const int e1 = min(e0 + ${CHUNK}, n_entries);
    const __global float *xr = x + x_off + (long)row * K;
    const long row_base = (long)row * n_entries;
    const __global ${"uchar" if MASK == "bool" else "int"} *s = sel + sel_off + row_base;
    __global float *o = out + out_off + row_base;
    int cols[${GROUP}], dsts[${GROUP}];
    int g = 0;
    for (int e = e0; e < e1; ++e) {
% if MASK == "bool":
        if (!s[e]) {
            o[e] = 0.0f;
            continue;
        }
        cols[g] = e;
% else:
        const int j = s[e];
        if ((uint)j >= (uint)N) {   // validated before launch; this keeps memory safe
            o[e] = NAN;
            continue;
        }
        cols[g] = j;
% endif
        dsts[g] = e;
        if (++g == ${GROUP}) {
            ${m.dot_group(GROUP, "xr", lambda q: "wt + (long)cols[%d] * ldw" % q,
                        lambda q, v: "o[dsts[%d]] = %s" % (q, v))}
            g = 0;
        }
    }
% if GROUP > 1:
    ${m.flush_tail("xr", lambda q: "wt + (long)cols[%s] * ldw" % q,
                 lambda q, v: "o[dsts[%s]] = %s" % (q, v))}
% endif
}
</%def>
