## masked_compact and masked_compact_tiled (pysparsecl/families/masked_compact*.py): the
## masked product of a compact x (CompactRows: each row's nonzero values and their
## ascending column indices), column-oriented like masked_gemm.  Each selected output is
## the dot product of the row's nx values with the weight row wt[j, :] gathered at the
## row's indices: nx multiply-adds instead of K, but each one a gather.  KIND "compact":
## CPU-shaped, a work-item per column; "compact_tiled": GPU-shaped, a work-group per
## column, the weight row staged in local memory.  Both read the column lists that
## list_kernels() build.  KIND "compact_dw" and "compact_dw_tiled": the weight gradient
## of that product, CPU- and GPU-shaped.
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="m" file="masked_common.cl.mako"/>\
% if KIND == "compact":
${m.prelude()}
% endif
% if not KIND.startswith("compact_dw"):
${list_kernels()}
% endif
% if KIND == "compact":
${compact_kernel()}
% elif KIND == "compact_tiled":
${tiled_kernel()}
% elif KIND == "compact_dw":
${dw_kernel()}
% else:
${dw_tiled_kernel()}
% endif

<%def name="list_kernels()">
// Each column's selecting rows, as (row, output index) pairs in pairs[2 * j * cap ...]
// with their count in counts[j].  From a bool mask: one work-item per column, rows in
// order.  From an index mask: one work-item per entry, appended with an atomic (the order
// within a column varies, the outputs do not); an index outside [0, N) lowers bad[0] to
// its row instead, and a column repeated within a row bad[1].  (Scanning a column of the
// (M, N) selection from the product kernel itself, a strided read per row, cost about 3
// of its 7 ms at 128 x 4096 x 4096, 95% / 95%, on PoCL.)
__kernel void pscl_compact_cols_bool(${ARGS["pscl_compact_cols_bool"]})
{
    const int j = get_global_id(0);
    if (j >= N)
        return;
    const __global uchar *s = sel + sel_off + j;
    __global int *p = pairs + 2L * j * cap;
    int n = 0;
    for (int i = 0; i < M; ++i) {
        if (s[(long)i * N]) {
            p[2 * n] = i;
            p[2 * n + 1] = i * N + j;
            ++n;
        }
    }
    counts[j] = n;
}

__kernel void pscl_compact_cols_idx(${ARGS["pscl_compact_cols_idx"]})
{
    const int e = get_global_id(0);
    const int i = get_global_id(1);
    if (e >= n_keep || i >= M)
        return;
    const int j = sel[sel_off + (long)i * n_keep + e];
    if ((uint)j >= (uint)N) {
        atomic_min(&bad[0], i);
        return;
    }
    // One bit per (row, column), zeroed first: a bit found set is a repeated column.
    const long bit = (long)i * N + j;
    if (atomic_or(&seen[bit >> 5], 1u << (bit & 31)) & (1u << (bit & 31))) {
        atomic_min(&bad[1], i);
        return;
    }
    const long at = 2L * j * cap + 2 * atomic_inc(&counts[j]);
    pairs[at] = i;
    pairs[at + 1] = i * n_keep + e;
}
</%def>

<%def name="compact_kernel()">
// Work-item j owns column j: for each row in its list it gathers wt[j, :] at the row's
// indices.
% if STREAM:
// Gathers land on scattered lines of the weight row, which the prefetcher cannot follow:
// reading the row front to back first, so that the gathers hit the cache, measured 4.0
// against 7.3 ms on PoCL (128 x 4096 x 4096, 95% / 95%, column lists built beforehand).
// The loads of that pass are kept by a store the host never asks for (stream_sink is
// always 0).
% endif
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_compact(${ARGS["pscl_masked_compact"]})
{
    const int j = get_global_id(0);
    if (j >= N)
        return;
    const int n_sel = counts[j];
    if (n_sel == 0)
        return;
    const __global int *p = pairs + 2L * j * cap;
    const __global float *wr = wt + (long)j * ldw;
    const uint last = (uint)(K - 1);     // K >= 1 when any row has an entry
% if STREAM:
    {
        float16 touch = (float16)(0.0f);
        for (int k = 0; k + 16 <= K; k += 16)
            touch += vload16(0, wr + k);
        if (stream_sink)
            out[out_off] = touch.s0 + touch.sf;
    }
% endif
    int q = 0;
% if GROUP > 1:
    for (; q + ${GROUP} <= n_sel; q += ${GROUP})
        ${gather_dots(GROUP)}
% endif
    for (; q < n_sel; ++q)
        ${gather_dots(1)}
}
</%def>

<%def name="tiled_kernel()">
// Work-group j owns column j.  It stages wt[j, :] in local memory, KCHUNK floats at a time;
// then its TEAMS teams of TEAM lanes take the column's rows TEAMS at a time, the lanes of a
// team striding along the row's entries (coalesced reads of values and indices, gathers
// from local memory), and lane 0 adds the team's partial sums in lane order.  A chunk
// after the first adds to the output the first wrote: the work-group owns those outputs.
__kernel __attribute__((reqd_work_group_size(${TEAM * TEAMS}, 1, 1)))
void pscl_masked_compact_tiled(${ARGS["pscl_masked_compact_tiled"]})
{
    __local float row[${KCHUNK}];
    __local float part[${TEAM * TEAMS}];
    const int j = get_group_id(0);
    const int lid = get_local_id(0);
    const int team = lid >> ${TEAM.bit_length() - 1};    // TEAM is a power of two
    const int lane = lid & ${TEAM - 1};
    const int n_sel = j < N ? counts[j] : 0;     // the same for the whole work-group
    if (n_sel == 0)
        return;
    const __global int *p = pairs + 2L * j * cap;
    const __global float *wr = wt + (long)j * ldw;
    for (int c0 = 0; c0 < K; c0 += ${KCHUNK}) {
        const uint width = (uint)min(${KCHUNK}, K - c0);
        barrier(CLK_LOCAL_MEM_FENCE);           // the previous chunk's readers are done
        for (int k = lid; k < (int)width; k += ${TEAM * TEAMS})
            row[k] = wr[c0 + k];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int q0 = 0; q0 < n_sel; q0 += ${TEAMS}) {
            const int q = q0 + team;
            float sum = 0.0f;
            if (q < n_sel) {
                const int r = p[2 * q];
                const __global float *v = xv + xv_off + (long)r * nx;
                const __global int *ix = xi + xi_off + (long)r * nx;
                uint outside = 0;  // an index outside [0, K): only an unchecked batch
                for (int t = lane; t < nx; t += ${TEAM}) {
                    const uint k = (uint)ix[t];
                    outside |= k >= (uint)K;
                    const uint at = k - (uint)c0;
                    if (at < width)
                        sum = fma(v[t], row[at], sum);
                }
                if (outside)
                    sum = NAN;
            }
            part[lid] = sum;
            barrier(CLK_LOCAL_MEM_FENCE);
            if (lane == 0 && q < n_sel) {
                float dot = 0.0f;
                for (int l = 0; l < ${TEAM}; ++l)
                    dot += part[lid + l];
                __global float *o = out + out_off + p[2 * q + 1];
                *o = c0 == 0 ? dot : *o + dot;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
    }
}
</%def>

<%def name="dw_kernel()">
// dw^T (N, K) of y = mask * (x @ w) for a compact x: row j of dw^T sums, over the rows i
// that select output j (the backward's column lists, in row order: deterministic), dy[i, j]
// times x's row i, scattered to the row's columns.  A work-item owns row j: it zeroes it,
// then adds into it, so the row stays in cache and no other work-item writes it.  An
// index outside [0, K) (only an unchecked batch holds one) makes the row NaN.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_compact_dw(${ARGS["pscl_masked_compact_dw"]})
{
    const int j = get_global_id(0);
    if (j >= N)
        return;
    __global float *d = dw + (long)j * K;
    int k = 0;
    for (; k + 16 <= K; k += 16)
        vstore16((float16)(0.0f), 0, d + k);
    for (; k < K; ++k)
        d[k] = 0.0f;
    const int n_sel = counts[j];
    const __global int *p = rows + 2L * j * M;
    uint outside = 0;
    for (int q = 0; q < n_sel; ++q) {
        const int i = p[2 * q];
        const float g = as_float(p[2 * q + 1]);
        const __global float *v = xv + xv_off + (long)i * nx;
        const __global int *ix = xi + xi_off + (long)i * nx;
        for (int t = 0; t < nx; ++t) {
            const uint c = (uint)ix[t];
            if (c < (uint)K)
                d[c] = fma(g, v[t], d[c]);
            else
                outside = 1;
        }
    }
    if (outside && K > 0)
        d[0] = NAN;
}
</%def>

## The dot products of G listed rows (pairs q .. q + G - 1) with the weight row wr, gathered
## at each row's indices: G independent chains, so that G gathers are in flight at once.
<%def name="gather_dots(G)">{
% for g in range(G):
        const int row${g} = p[2 * (q + ${g})];
        const __global float *v${g} = xv + xv_off + (long)row${g} * nx;
        const __global int *ix${g} = xi + xi_off + (long)row${g} * nx;
        pscl_floatv acc${g} = (pscl_floatv)(0.0f);
% endfor
        uint outside = 0;      // an index outside [0, K): only an unchecked batch has one
        int t = 0;
        for (; t + PSCL_VEC <= nx; t += PSCL_VEC) {
% for g in range(G):
            {
                float gathered[PSCL_VEC];
%   for u in range(VEC):
                {
                    const uint k = (uint)ix${g}[t + ${u}];
                    outside |= (uint)(k > last) << ${g};
                    gathered[${u}] = wr[min(k, last)];
                }
%   endfor
                acc${g} = fma(PSCL_LOAD_pscl_floatv(0, v${g} + t),
                              PSCL_LOAD_pscl_floatv(0, gathered), acc${g});
            }
% endfor
        }
% for g in range(G):
        float dot${g} = pscl_hsum(acc${g});
% endfor
        for (; t < nx; ++t) {
% for g in range(G):
            {
                const uint k = (uint)ix${g}[t];
                outside |= (uint)(k > last) << ${g};
                dot${g} = fma(v${g}[t], wr[min(k, last)], dot${g});
            }
% endfor
        }
% for g in range(G):
        out[out_off + p[2 * (q + ${g}) + 1]] = (outside >> ${g}) & 1 ? NAN : dot${g};
% endfor
    }</%def>

<%def name="dw_tiled_kernel()">
// dw^T (N, K) of the product of a compact x, GPU-shaped: work-group j owns row j of dw^T
// and accumulates it in local memory, KCHUNK columns at a time.  The listed rows go one
// after the other, the lanes striding along a row's entries: a row's indices are
// distinct, so no two lanes add to one column, and a barrier separates the rows.  Row j
// is then written whole, coalesced.  An index outside [0, K) (only an unchecked batch
// holds one) makes the row NaN.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_compact_dw_tiled(${ARGS["pscl_masked_compact_dw_tiled"]})
{
    __local float acc[${KCHUNK}];
    __local int outside;
    const int j = get_group_id(0);
    const int lid = get_local_id(0);
    if (j >= N)
        return;
    if (lid == 0)
        outside = 0;
    const int n_sel = counts[j];
    const __global int *p = rows + 2L * j * M;
    __global float *d = dw + (long)j * K;
    for (int c0 = 0; c0 < K; c0 += ${KCHUNK}) {
        const uint width = (uint)min(${KCHUNK}, K - c0);
        for (uint k = lid; k < width; k += ${WG})
            acc[k] = 0.0f;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int q = 0; q < n_sel; ++q) {
            const int i = p[2 * q];
            const float g = as_float(p[2 * q + 1]);
            const __global float *v = xv + xv_off + (long)i * nx;
            const __global int *ix = xi + xi_off + (long)i * nx;
            for (int t = lid; t < nx; t += ${WG}) {
                const uint c = (uint)ix[t];
                const uint at = c - (uint)c0;
                if (c >= (uint)K)
                    outside = 1;
                else if (at < width)
                    acc[at] = fma(g, v[t], acc[at]);
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        for (uint k = lid; k < width; k += ${WG})
            d[c0 + k] = acc[k];
        barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);
    }
    if (lid == 0 && outside && K > 0)
        d[0] = NAN;
}
</%def>
