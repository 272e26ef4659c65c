## drs_topk_team (pysparsecl/families/drs_topk_team.py): drs_topk's selection by a
## work-group of TEAM items per row, histograms in local memory (GPUs).  ARGS: the
## kernel's parameters, drs_topk's (pysparsecl/families/drs_topk.py; cand is unused here).
<%namespace name="common" file="common.cl.mako"/>\
% if RANK_N:
${topk_rank_kernel()}
% else:
${topk_team_kernel()}
% endif

## RANK_N > 0 (rows of N <= RANK_N columns, RANK_N a power of two): each column's rank in
## its row, counted against every key of the row in local memory.
<%def name="topk_rank_kernel()">
<%
    rows = max(1, TEAM // RANK_N)        # rows per work-group
    per_item = max(1, RANK_N // TEAM)    # columns per work-item
%>\
// Short rows (N <= ${RANK_N}): the work-group takes ${rows} row(s) of ${RANK_N} slots, each
// work-item ${per_item} column(s), and a column is taken when fewer than n_keep keys of its
// row rank above it: larger, or equal at a lower column (ties toward the lower column, as
// the radix passes choose).  N compares per column replace up to four radix passes, their
// histograms and barriers: on the H200, 100352 rows of 64 took 0.20 ms that way.
__kernel __attribute__((reqd_work_group_size(${TEAM}, 1, 1)))
void pscl_drs_topk(${ARGS["pscl_drs_topk"]})
{
    __local uint key[${rows * RANK_N}];
    __local int taken[${rows * RANK_N}];
    const int lid = get_local_id(0);
    const int slot = lid & ${RANK_N - 1 if RANK_N <= TEAM else TEAM - 1};
    const int r = ${"lid >> %d" % (RANK_N.bit_length() - 1) if RANK_N <= TEAM else "0"};
    const int i = get_group_id(0) * ${rows} + r;   // this item's row
    __local uint *k = key + r * ${RANK_N};
    __local int *t = taken + r * ${RANK_N};
% for q in range(per_item):
    const int n${q} = slot + ${q * TEAM};
    k[n${q}] = i < M && n${q} < N ? keys[(long)i * ldk + n${q}] : 0u;
% endfor
    barrier(CLK_LOCAL_MEM_FENCE);
% for q in range(per_item):
    {
        const uint mine = k[n${q}];
        int above = 0;
        for (int m = 0; m < N; ++m) {
            const uint other = k[m];
            above += other > mine || (other == mine && m < n${q});
        }
        t[n${q}] = n${q} < N && above < n_keep;
    }
% endfor
% if COMPACT:
    barrier(CLK_LOCAL_MEM_FENCE);
%   for q in range(per_item):
    if (i < M && n${q} < N && t[n${q}]) {
        int before = 0;                     // taken columns left of this one
        for (int m = 0; m < n${q}; ++m)
            before += t[m];
        out[out_off + (long)i * n_keep + before] = n${q};
    }
%   endfor
% else:
%   for q in range(per_item):
    if (i < M && n${q} < N) {
%     if PLANE:
        const int image = i / P;           // row i is pixel p of image i / P
        out[out_off + ((long)image * N + n${q}) * P + (i - image * P)] = (uchar)t[n${q}];
%     else:
        out[out_off + (long)i * N + n${q}] = (uchar)t[n${q}];
%     endif
    }
%   endfor
% endif
}
</%def>

<%def name="topk_team_kernel()">
<% per_item = BINS // TEAM %>\
// GPU-shaped top-k: a work-group of TEAM items per row (the serial kernel leaves a GPU
// with one thread per row).  The same selection as the serial kernel -- exactly n_keep
// keys, ties toward the lower column -- found by radix passes of 8 bits from the top:
// each pass histograms, in local memory, the keys that share the prefix found so far;
// a scan over the bins (item t owns ${per_item} bins, counted from the top) finds the
// digit of the n_keep-th key.  The passes stop once the keys sharing the prefix are
// exactly the ones wanted.  Output: coalesced when every key sharing the prefix is
// taken; otherwise (ties) and for compact lists, item t owns a contiguous segment of
// columns and a scan of per-segment counts orders the ties and places the columns.
__kernel __attribute__((reqd_work_group_size(${TEAM}, 1, 1)))
void pscl_drs_topk(${ARGS["pscl_drs_topk"]})
{
    __local uint hist[${BINS}];
    __local int part[${TEAM}];
    __local int pick[${SHARED_INTS}];
    const int i = get_group_id(0);        // the row: the grid is exactly M work-groups
    const int lid = get_local_id(0);
    const __global uint *row = keys + (long)i * ldk;
    uint thresh = 0u, mask = 0u;
    int want = n_keep, matching = N;
    for (int shift = 24; shift >= 0 && matching != want; shift -= 8) {
        for (int b = lid; b < ${BINS}; b += ${TEAM})
            hist[b] = 0u;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int n = lid; n < N; n += ${TEAM}) {
            const uint key = row[n];
            if ((key & mask) == thresh)
                atomic_inc(&hist[(key >> shift) & 255u]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        int own = 0;
        for (int q = 0; q < ${per_item}; ++q)
            own += (int)hist[255 - lid * ${per_item} - q];
        ${common.inclusive_scan("part", "own", TEAM)}
        const int above = part[lid] - own;  // keys in bins above this item's bins
        if (above < want && part[lid] >= want) {   // exactly one item holds the digit
            int b = 255 - lid * ${per_item}, acc = above;
            while (acc + (int)hist[b] < want)
                acc += (int)hist[b--];
            pick[0] = b;
            pick[1] = want - acc;
            pick[2] = (int)hist[b];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        thresh |= (uint)pick[0] << shift;
        mask |= 255u << shift;
        want = pick[1];
        matching = pick[2];
        barrier(CLK_LOCAL_MEM_FENCE);         // pick and hist are read before the next pass
    }
% if not COMPACT:
%   if PLANE:
    // Row i is pixel p of image i / P; its channel n goes to out[image, n, p].
    const int image = i / P;
    __global uchar *o = out + out_off + (long)image * N * P + (i - image * P);
#define PSCL_OUT(n) o[(long)(n) * P]
%   else:
    __global uchar *o = out + out_off + (long)i * N;
#define PSCL_OUT(n) o[n]
%   endif
    if (matching == want) {   // every key sharing the prefix is taken: no ties to order
        for (int n = lid; n < N; n += ${TEAM})
            PSCL_OUT(n) = (row[n] & mask) >= thresh ? 1 : 0;
        return;
    }
% endif
    // Item lid's segment of columns; the ties before it, then (compact) the taken ones.
    const int seg = (N + ${TEAM - 1}) / ${TEAM};
    const int n0 = min(N, lid * seg), n1 = min(N, n0 + seg);
    int ties = 0, above_thresh = 0;
    for (int n = n0; n < n1; ++n) {
        const uint key = row[n] & mask;
        ties += key == thresh;
        above_thresh += key > thresh;
    }
    ${common.inclusive_scan("part", "ties", TEAM)}
    int ties_left = want - (part[lid] - ties);  // ties this segment may still take
% if COMPACT:
    const int taken = above_thresh + clamp(ties_left, 0, ties);
    barrier(CLK_LOCAL_MEM_FENCE);             // part is reused
    ${common.inclusive_scan("part", "taken", TEAM)}
    __global int *o = out + out_off + (long)i * n_keep + (part[lid] - taken);
    int q = 0;
    for (int n = n0; n < n1; ++n) {
        const uint key = row[n] & mask;
        if (key > thresh || (key == thresh && ties_left-- > 0))
            o[q++] = n;
    }
% else:
    for (int n = n0; n < n1; ++n) {
        const uint key = row[n] & mask;
        PSCL_OUT(n) = (key > thresh || (key == thresh && ties_left-- > 0)) ? 1 : 0;
    }
#undef PSCL_OUT
% endif
}
</%def>
