## drs_project_compact (pysparsecl/families/drs_project_compact.py): the search's projection
## of compact rows (CompactRows: per row, n_keep values and their column indices),
## out[i, :] = sum_t values[i, t] * RT[idx[i, t], :], an axpy of contiguous rows of
## RT = R^T / sqrt(k) ((d, k_pad), zero padding columns): n_keep x k_pad multiply-adds per
## row instead of drs_project's d x k_pad.  Writes (n_rows, ld_out), the layout
## drs_project gives: the padding columns come out zero (0 * a zero column).
## The sum runs over t ascending, one fma per entry from 0, the order drs_project's
## (unsplit) sum over j ascending takes for the nonzero entries of the dense row -- its
## zeros add exactly nothing (fma(0, r, acc) = acc, up to the sign of a zero sum) -- so
## for ascending indices the two agree bit for bit.  An index outside [0, d) (only an
## unchecked batch can hold one) reads RT's row 0 and multiplies it by NaN: its row comes
## out NaN, padding included.
## UNROLL > 1 issues that many entries' loads before their FMAs (still in entry order).
## No barriers, no local memory.  ARGS: the kernel's parameters, declared in
## pysparsecl/families/drs_project_compact.py (SIGNATURE).
<%namespace name="common" file="common.cl.mako"/>\
${compact_project_kernel()}

<%def name="compact_project_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/families/drs_project_compact.py.
#define PSCL_VEC ${VEC}
#define PSCL_KCHUNK (${VEC} * ${KVEC})

// Work-item (row block, k chunk): ROWS rows, each times KVEC vectors of the RT rows its
// indices name: ROWS * KVEC independent accumulators.  K_FASTEST = 1 puts the k chunks on
// the grid's first dimension, so that a work-group's items read one RT row side by side
// (coalesced, on GPUs) and share each index and value load (a broadcast).
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_drs_project_compact(${ARGS["pscl_drs_project_compact"]})
{
% if K_FASTEST:
    const int c0 = get_global_id(0) * PSCL_KCHUNK;
    const int r0 = get_global_id(1) * ${ROWS};
% else:
    const int r0 = get_global_id(0) * ${ROWS};
    const int c0 = get_global_id(1) * PSCL_KCHUNK;
% endif
    if (r0 >= n_rows || c0 >= k_pad)
        return;
    const __global float *rc = rt + c0;
% for r in range(ROWS):
    // Rows past the end repeat the last row (no branch in the loop); they are not stored.
    const long e${r} = (long)min(r0 + ${r}, n_rows - 1) * n_keep;
    const __global float *v${r} = values + values_off + e${r};
    const __global int *i${r} = idx + idx_off + e${r};
%   for v in range(KVEC):
    pscl_floatv acc${r}_${v} = (pscl_floatv)(0.0f);
%   endfor
% endfor
    int t = 0;
% if UNROLL > 1:
    // UNROLL entries a step: every load first (UNROLL * ROWS gathers in flight: a GPU
    // otherwise waits out an index load and then its RT load per entry), then the FMAs
    // in entry order, so the sums keep their order.
    for (; t + ${UNROLL} <= n_keep; t += ${UNROLL}) {
%   for r in range(ROWS):
%     for u in range(UNROLL):
        ${load(r, u, "t + %d" % u)}
%     endfor
%   endfor
%   for r in range(ROWS):
%     for u in range(UNROLL):
%       for v in range(KVEC):
        acc${r}_${v} = fma(a${r}_${u}, rv${r}_${u}_${v}, acc${r}_${v});
%       endfor
%     endfor
%   endfor
    }
% endif
    for (; t < n_keep; ++t) {
% for r in range(ROWS):
        ${load(r, 0, "t")}
%   for v in range(KVEC):
        acc${r}_${v} = fma(a${r}_0, rv${r}_0_${v}, acc${r}_${v});
%   endfor
% endfor
    }
% for r in range(ROWS):
    if (r0 + ${r} < n_rows) {
%   for v in range(KVEC):
        PSCL_STORE_pscl_floatv(acc${r}_${v}, ${v}, out + (long)(r0 + ${r}) * ld_out + c0);
%   endfor
    }
% endfor
}
</%def>

## Entry ``at`` of row r into a{r}_{u} (its value, broadcast; NaN for an index outside
## [0, d)) and rv{r}_{u}_{v} (the KVEC vectors of its RT row; row 0 for a bad index).
<%def name="load(r, u, at)">
        const uint j${r}_${u} = (uint)i${r}[${at}];
        const bool ok${r}_${u} = j${r}_${u} < (uint)d;
        const pscl_floatv a${r}_${u} = (pscl_floatv)(ok${r}_${u} ? v${r}[${at}] : NAN);
        const __global float *rj${r}_${u} = rc + (long)(ok${r}_${u} ? j${r}_${u} : 0u) * k_pad;
% for v in range(KVEC):
        const pscl_floatv rv${r}_${u}_${v} = PSCL_LOAD_pscl_floatv(${v}, rj${r}_${u});
% endfor
</%def>
