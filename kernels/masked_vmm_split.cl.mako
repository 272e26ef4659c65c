## masked_vmm_split (pysparsecl/families/masked_vmm_split.py): the GPU-shaped masked VMM.
## SPLIT work-items share each selected output: they read its weight row in coalesced
## vectors, x comes from local memory, and the partial sums meet in a tree in local memory.
## A bool mask is listed inside the kernel (LIST_IN_KERNEL) or beforehand by
## pscl_bool_compact (masked_util.cl.mako).
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="m" file="masked_common.cl.mako"/>\
${m.prelude()}
${vmm_split_kernel()}

<%def name="vmm_split_kernel()">
<%
    items = SPLIT * TEAMS       # work-items per work-group
    outs = TEAMS * GROUP        # selected outputs per work-group
    xvecs = XCHUNK // VEC       # vectors of x staged per step
%>\
// Split VMM (GPU-shaped): a team of SPLIT work-items computes GROUP selected outputs
// together.  Item t of a team reads vectors t, t + SPLIT, ... of each of its weight rows,
// so a team's loads are coalesced, and shares each x vector between its GROUP rows.  A
// work-group holds TEAMS teams: TEAMS * GROUP consecutive entries of the row's selection
// list (idx, or the bool mask compacted by pscl_bool_compact), entry e going to team
// e % TEAMS so that a short last list spreads over every team.  The x row is staged in
// local memory XCHUNK floats at a time, read from memory once per work-group.  Partial
// sums meet in a tree in local memory.  ALIGNED: the weight rows start at multiples of
// VEC floats, so a vector is read through a vector pointer (one wide load).
//
// LIST_IN_KERNEL (bool masks up to a host limit on N): no pscl_bool_compact before this
// kernel.  Every work-group scans the whole mask row itself, 16 entries per item and step,
// and an exclusive scan of the items' counts places the selected columns; the group keeps
// only its own TEAMS * GROUP entries of the list, and writes the zeros of its own
// TEAMS * GROUP columns.  On NVIDIA's OpenCL even a tiny kernel takes 6-7 us, which the
// redundant scan (N bytes per work-group, from cache) undercuts while N is small.
% if ALIGNED:
#define PSCL_WLOAD(v, p) (((const __global pscl_floatv *)(p))[v])
% else:
#define PSCL_WLOAD(v, p) PSCL_LOAD_pscl_floatv(v, p)
% endif
__kernel __attribute__((reqd_work_group_size(${items}, 1, 1)))
void pscl_masked_vmm_split(${ARGS["pscl_masked_vmm_split"]})
{
    __local pscl_floatv xs[${xvecs}];
    __local float red[${GROUP * items}];
    __local float *xs1 = (__local float *)xs;
    const int lid = get_local_id(0);
    const int lane = lid & ${SPLIT - 1};      // bit operations, not / and %: common.cl.mako, 1
    const int team = lid >> ${SPLIT.bit_length() - 1};
    const int row = get_global_id(1);
    const long row_base = (long)row * n_entries;
    const int group0 = get_group_id(0) * ${outs};
% if LIST_IN_KERNEL:
    // red and xs are free until the K loop: red holds the scan, xs this group's entries.
    __local int *sums = (__local int *)red;
    __local int *sel = (__local int *)xs;
    const __global uchar *m = mask + mask_off + (long)row * N;
    __global float *o = out + out_off + row_base;
    int n_sel = 0;
    for (int b0 = 0; b0 < N; b0 += ${items * 16}) {
        const int e0 = b0 + lid * 16;
        ${m.bool_bits16("bits", "m", "e0", "N")}
        if (e0 < group0 + ${outs} && e0 + 16 > group0) {  // this group's columns: zeros
            for (int u = max(group0 - e0, 0); u < min(min(16, N - e0), group0 + ${outs} - e0); ++u)
                if (!(bits >> u & 1u))
                    o[e0 + u] = 0.0f;
        }
        const int n = popcount(bits);
        ${common.inclusive_scan("sums", "n", items)}
        int pos = n_sel + sums[lid] - n;
        if (pos < group0 + ${outs} && pos + n > group0) {
            while (bits) {
                const uint low = bits & (0u - bits);
                if (pos >= group0 && pos < group0 + ${outs})
                    sel[pos - group0] = e0 + 31 - (int)clz(low);
                ++pos;
                bits ^= low;
            }
        }
        n_sel += sums[${items - 1}];
        barrier(CLK_LOCAL_MEM_FENCE);   // sums is rewritten by the next step; sel is complete
    }
% else:
    const int n_sel = ${"counts[row]" if MASK == "bool" else "n_entries"};
% endif
    // A work-group past the end of the list skips the K loop (no early return before the
    // barriers: PoCL then mis-runs the work-group).
    const int k_end = group0 < n_sel ? K : 0;
    const int first = group0 + team;          // this team's entries: first + q * TEAMS
    const int ng = clamp((n_sel - first + ${TEAMS - 1}) / ${TEAMS}, 0, ${GROUP});
% for q in range(GROUP):
    int c${q} = 0;
    if (${q} < ng)
%   if LIST_IN_KERNEL:
        c${q} = sel[team + ${q * TEAMS}];
%   else:
        c${q} = list[list_off + row_base + first + ${q * TEAMS}];
%   endif
    const int ok${q} = (uint)c${q} < (uint)N;   // idx is validated before launch;
    const __global float *w${q} = wt + (long)(ok${q} ? c${q} : 0) * ldw;  // memory stays safe
    pscl_floatv acc${q} = (pscl_floatv)(0.0f);
    float tail${q} = 0.0f;
% endfor
    const __global float *xr = x + x_off + (long)row * K;
    for (int k0 = 0; k0 < k_end; k0 += ${XCHUNK}) {
        const int len = min(${XCHUNK}, K - k0);
        barrier(CLK_LOCAL_MEM_FENCE);         // the previous piece of x is consumed
        for (int e = lid; e < len; e += ${items})
            xs1[e] = xr[k0 + e];
        barrier(CLK_LOCAL_MEM_FENCE);
        const int nv = len / PSCL_VEC;
        for (int v = lane; v < nv; v += ${SPLIT}) {
            const pscl_floatv xv = xs[v];
% for q in range(GROUP):
            if (${q} < ng)
                acc${q} = fma(PSCL_WLOAD(v, w${q} + k0), xv, acc${q});
% endfor
        }
        for (int e = nv * PSCL_VEC + lane; e < len; e += ${SPLIT}) {   // K % VEC at the end
            const float xe = xs1[e];
% for q in range(GROUP):
            if (${q} < ng)
                tail${q} = fma(w${q}[k0 + e], xe, tail${q});
% endfor
        }
    }
% for q in range(GROUP):
    red[${q * items} + lid] = pscl_hsum(acc${q}) + tail${q};
% endfor
    barrier(CLK_LOCAL_MEM_FENCE);
    ${common.tree_sum("red", GROUP, items, "lid", "lane", SPLIT)}
    if (lane == 0) {
% for q in range(GROUP):
        if (${q} < ng)
            out[out_off + row_base + ${"c%d" % q if MASK == "bool" else "first + %d" % (q * TEAMS)}] =
                ok${q} ? red[${q * items} + lid] : NAN;
% endfor
    }
}
</%def>
