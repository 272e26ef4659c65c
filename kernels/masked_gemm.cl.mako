## Output-masked products for DSG (Liu et al., ICLR 2019): Y = mask * (X @ W), computing
## only the selected outputs, and the backward products that training needs.
##
## The weight is kept as W^T, (N, K) row-major ("wt"), so that the selected output
## (i, j) is the dot product of two contiguous rows: x[i, :] and wt[j, :].  Each
## work-item collects GROUP selected outputs that share one operand row and computes
## their dot products together, loading the shared row once per vector for GROUP FMAs:
##
##   KIND == "vmm"   row-oriented (the VMM): one x row is shared, the selected W rows are
##                   gathered.  The x row stays in L1; the W rows stream from memory.
##   KIND == "gemm"  column-oriented: one W row is shared by the x rows that select it
##                   within a block of rows.  The row block stays in L2 while every
##                   column passes over it, so W is read once per block rather than once
##                   per selecting row.
##   KIND == "dx"    dx = (mask * dy) @ W^T: each row of dx is a sum of the selected rows
##                   of wt, scaled by dy.  A work-item owns one row and one K chunk.
##   KIND == "dw"    dw = x^T @ (mask * dy): column j of dw is a sum of the rows of x that
##                   select j, scaled by dy.  A work-item owns one column and one K chunk.
##   KIND == "util"  the (K, N) -> (N, K) transpose for weights that were not prepared,
##                   and the validation of compact index masks.
##
## The selection comes in one of two forms (MASK): "bool", a (M, N) byte mask, whose
## output is dense (zeros written where the mask is False), or "slot", a (M, N) int map
## holding, for each selected (i, j), the position of j in row i's compact index list
## (-1 elsewhere), whose output is compact (M, n_keep).  The vmm and dx kernels read the
## compact index list ("idx") directly instead of the slot map.
##
## These kernels use no local memory and no barriers: PoCL runs a work-group as a loop over
## its items.  Two GPU-shaped variants, each a kernel family of its own (the op's routine
## chooses; pysparsecl/ops/masked.py), use both:
##
##   KIND == "vmm_split"   SPLIT work-items share each selected output: they read its
##                         weight row in coalesced vectors, x comes from local memory,
##                         and the partial sums meet in a tree in local memory.
##   KIND == "gemm_tiled"  a work-group owns a TILE_M x TILE output tile (SDDMM-like):
##                         x and W^T are staged through local memory KC columns at a
##                         time, and each work-item accumulates a few selected outputs
##                         of one row in registers.
## (pscl_bool_compact, a util kernel, turns a bool mask into the split VMM's list.)
<%namespace name="common" file="common.cl.mako"/>\
## Only KIND is read at the top: each kind's parameters are read inside its def, so a kind
## renders from its own parameters alone.
% if KIND == "util":
${util_kernels()}
% elif KIND == "gemm_tiled":
${gemm_tiled_kernel()}
% else:
${prelude()}
%   if KIND == "vmm":
${vmm_kernel()}
%   elif KIND == "vmm_split":
${vmm_split_kernel()}
%   elif KIND == "gemm":
${gemm_kernel()}
%   elif KIND == "dx":
${dx_kernel()}
%   elif KIND == "dw":
${dw_kernel()}
%   endif
% endif

<%!
def staging(tile_m, tile, items, kc, aligned):
    """How the tiled GEMM's work-group stages a KC-column chunk of its x and wt rows: floats
    per load, loads per row, rows per pass of the group, and each item's loads of x and wt
    (the px* / pw* registers)."""
    width = 4 if aligned else 1
    per_row = kc // width
    step = items // per_row
    return dict(width=width, per_row=per_row, step=step, nx=-(-tile_m // step),
                nw=-(-tile // step), ptype="float4" if aligned else "float")
%>\
## uint `bits`: bit u set where bool entry m[e0 + u] of a row of N is true, u < 16 (one
## vector load for a whole 16, entry by entry at the row's end).
<%def name="bool_bits16(bits, m, e0, N)">uint ${bits} = 0;
        if (${e0} + 16 <= ${N}) {
            const uchar16 v = vload16(0, ${m} + ${e0});
% for u in range(16):
            ${bits} |= (uint)(v.s${"%x" % u} != 0) << ${u};
% endfor
        } else {
            for (int u = 0; u < ${N} - ${e0}; ++u)
                ${bits} |= (uint)(${m}[${e0} + u] != 0) << u;
        }\
</%def>\
<%def name="util_kernels()">
// dst[c, r] = src[r, c] for an (R, C) source, both with row strides of their own.  A
// work-item moves one 16 x 16 tile: 16 whole lines in, 16 whole lines out.
__kernel void pscl_transpose(__global const float *restrict src, const long src_off,
                             const int ld_src, __global float *restrict dst,
                             const long dst_off, const int ld_dst, const int R, const int C)
{
    const int c0 = get_global_id(0) * 16;
    const int r0 = get_global_id(1) * 16;
    if (c0 >= C || r0 >= R)
        return;
    const __global float *s = src + src_off + (long)r0 * ld_src + c0;
    __global float *d = dst + dst_off + (long)c0 * ld_dst + r0;
    if (c0 + 16 <= C && r0 + 16 <= R) {
% for r in range(16):
        const float16 t${r} = vload16(0, s + (long)${r} * ld_src);
% endfor
% for c in range(16):
        {   // column c, assembled in a private array (not a float16 literal of lanes of
            // other vectors, which Oclgrind's uninitialised-value check crashes on:
            // common.cl.mako, 2)
            float col[16];
%   for r in range(16):
            col[${r}] = t${r}.s${"%x" % c};
%   endfor
            vstore16(vload16(0, col), 0, d + (long)${c} * ld_dst);
        }
% endfor
        return;
    }
    for (int c = 0; c < min(16, C - c0); ++c)
        for (int r = 0; r < min(16, R - r0); ++r)
            d[(long)c * ld_dst + r] = s[(long)r * ld_src + c];
}

// Validates a compact index mask idx (M, n_keep) and builds its slot map (M, N):
// slot[i, idx[i, s]] = s.  A value outside [0, N) or a column repeated within a row
// lowers bad[0] or bad[1] to the first offending row (both start at INT_MAX).
__kernel void pscl_idx_slots(__global const int *restrict idx, const long idx_off,
                             __global int *restrict slot, volatile __global int *bad,
                             const int M, const int N, const int n_keep)
{
    const int s = get_global_id(0);
    const int i = get_global_id(1);
    if (s >= n_keep || i >= M)
        return;
    const int j = idx[idx_off + (long)i * n_keep + s];
    if ((uint)j >= (uint)N) {
        atomic_min(&bad[0], i);
        return;
    }
    if (atomic_cmpxchg((volatile __global int *)&slot[(long)i * N + j], -1, s) != -1)
        atomic_min(&bad[1], i);
}

// The selected columns of each row of a bool mask, as a list (backward's dx): one scan
// per row instead of one per K chunk.  Branch-free: store always, advance on a selection.
__kernel void pscl_bool_rows(__global const uchar *restrict mask, const long mask_off,
                             __global int *restrict cols, __global int *restrict counts,
                             const int M, const int N)
{
    const int i = get_global_id(0);
    if (i >= M)
        return;
    const __global uchar *m = mask + mask_off + (long)i * N;
    __global int *c = cols + (long)i * N;
    int n = 0;
    for (int j = 0; j < N; ++j) {
        c[n] = j;
        n += m[j] != 0;
    }
    counts[i] = n;
}

// The rows that select each column, with their dy value (backward's dw), from a bool
// mask (dy dense, (M, N)) or a slot map (dy compact, (M, dy_cols)): each dy value is
// read once here, in row order, instead of once per K chunk, scattered.  A work-item walks
// the rows once for 16 neighbouring columns (one line of the mask), its 16 list lengths
// in registers; branch-free: store always, advance on a selection.
% for form in ("bool", "slot"):
<%  sel_t = "uchar" if form == "bool" else "int" %>\
__kernel void pscl_cols_list_${form}(
    __global const ${sel_t} *restrict sel, const long sel_off,
    __global const float *restrict dy, const long dy_off,
    __global int2 *restrict rows, __global int *restrict counts,
    const int M, const int N, const int dy_cols)
{
    const int j0 = get_global_id(0) * 16;
    if (j0 >= N)
        return;
    // (row, dy) pairs are stored with vstore2, not as int2 literals: common.cl.mako, 4.
    __global int *ri = (__global int *)(rows + (long)j0 * M);
    const int width = min(16, N - j0);
    if (width == 16) {
%   for c in range(16):
        int n${c} = 0;
%   endfor
        for (int i = 0; i < M; ++i) {
            const __global ${sel_t} *e = sel + sel_off + (long)i * N + j0;
            const __global float *g = dy + dy_off + (long)i * dy_cols;
%   for c in range(16):
%     if form == "bool":
            vstore2((int2)(i, as_int(g[j0 + ${c}])), ${c}L * M + n${c}, ri);
            n${c} += e[${c}] != 0;
%     else:
            vstore2((int2)(i, as_int(g[max(e[${c}], 0)])), ${c}L * M + n${c}, ri);
            n${c} += e[${c}] >= 0;
%     endif
%   endfor
        }
%   for c in range(16):
        counts[j0 + ${c}] = n${c};
%   endfor
        return;
    }
    for (int c = 0; c < width; ++c) {
        int n = 0;
        for (int i = 0; i < M; ++i) {
            const ${sel_t} v = sel[sel_off + (long)i * N + j0 + c];
            const __global float *g = dy + dy_off + (long)i * dy_cols;
%   if form == "bool":
            vstore2((int2)(i, as_int(g[j0 + c])), (long)c * M + n, ri);
            n += v != 0;
%   else:
            vstore2((int2)(i, as_int(g[max(v, 0)])), (long)c * M + n, ri);
            n += v >= 0;
%   endif
        }
        counts[j0 + c] = n;
    }
}
% endfor

// The selected columns of each row of a bool mask, in column order, and zeros for the
// unselected outputs (the split VMM's list).  A work-group per row: each work-item takes
// 16 neighbouring entries, and an exclusive scan of the items' counts places its columns,
// so the list comes out in order without atomics.
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void pscl_bool_compact(__global const uchar *restrict mask, const long mask_off,
                       __global int *restrict cols, __global int *restrict counts,
                       __global float *restrict out, const long out_off, const int N)
{
    __local int sums[256];
    const int lid = get_local_id(0);
    const long row = get_group_id(0);
    const __global uchar *m = mask + mask_off + row * N;
    __global float *o = out + out_off + row * N;
    __global int *c = cols + row * N;
    int total = 0;
    for (int b0 = 0; b0 < N; b0 += 256 * 16) {
        const int e0 = b0 + lid * 16;
        ${bool_bits16("bits", "m", "e0", "N")}
        for (int u = 0; u < min(16, N - e0); ++u)
            if (!(bits >> u & 1u))
                o[e0 + u] = 0.0f;
        const int n = popcount(bits);
        ${common.inclusive_scan("sums", "n", 256)}
        int pos = total + sums[lid] - n;
        while (bits) {
            const uint low = bits & (0u - bits);
            c[pos++] = e0 + 31 - (int)clz(low);
            bits ^= low;
        }
        total += sums[255];
        barrier(CLK_LOCAL_MEM_FENCE);   // sums is rewritten by the next step
    }
    if (lid == 0)
        counts[row] = total;
}
</%def>

<%def name="prelude()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/ops/masked.py.
#define PSCL_VEC ${VEC}

// Sum of the lanes of a vector, as a tree of half-width adds: lane i + lane i + width / 2,
// written lane by lane, each add as fma(a, 1.0f, b) (exactly a + b), so that no vector
// shuffle appears for Oclgrind to mishandle (common.cl.mako, 2 and 3).
inline float pscl_hsum(const pscl_floatv v)
{
% if VEC == 1:
    return v;
% else:
<%
    terms = ["v.s%x" % i for i in range(VEC)]
    level = 0
%>\
%   while len(terms) > 1:
<%
        half = len(terms) // 2
        pairs = [(terms[i], terms[i + half]) for i in range(half)]
        terms = ["h%d_%d" % (level, i) for i in range(half)]
        level += 1
%>\
%     for name, (a, b) in zip(terms, pairs):
    const float ${name} = fma(${a}, 1.0f, ${b});
%     endfor
%   endwhile
    return ${terms[0]};
% endif
}
</%def>

## G dot products of length K that share the row `fixed`: one vector load of `fixed` per
## G vector FMAs.  `gathered(q)` is the q-th partner row, `store(q, value)` writes result q.
<%def name="dot_group(G, fixed, gathered, store)">
            {
% for q in range(G):
                const __global float *g${q} = ${gathered(q)};
                pscl_floatv acc${q} = (pscl_floatv)(0.0f);
% endfor
                int k = 0;
                for (; k + PSCL_VEC <= K; k += PSCL_VEC) {
                    const pscl_floatv f = PSCL_LOAD_pscl_floatv(0, ${fixed} + k);
% for q in range(G):
                    acc${q} = fma(PSCL_LOAD_pscl_floatv(0, g${q} + k), f, acc${q});
% endfor
                }
% for q in range(G):
                float s${q} = pscl_hsum(acc${q});
% endfor
                for (; k < K; ++k) {
                    const float f = ${fixed}[k];
% for q in range(G):
                    s${q} = fma(g${q}[k], f, s${q});
% endfor
                }
% for q in range(G):
                ${store(q, "s%d" % q)};
% endfor
            }
</%def>

## Flush the g < GROUP collected outputs left at the end of a scan: binary pieces, so
## every piece runs a full-width dot_group with no padding work.
<%def name="flush_tail(fixed, gathered, store)">
    {
        int base = 0;
% for piece in [p for p in (32, 16, 8, 4, 2, 1) if p < GROUP]:
        if (g & ${piece}) {
            ${dot_group(piece, fixed, lambda q: gathered("base + %d" % q),
                        lambda q, v: store("base + %d" % q, v))}
            base += ${piece};
        }
% endfor
    }
</%def>

<%def name="vmm_kernel()">
// Row-oriented masked product (the VMM; any number of rows along dim 1).  A work-item
// scans CHUNK entries of one row's selection -- mask columns or idx slots -- and computes
// the selected outputs GROUP at a time, each group sharing the loads of the x row.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_vmm(
    __global const float *restrict x, const long x_off,     // (M, K)
    __global const float *restrict wt,                       // (N, K)
    __global const ${"uchar" if MASK == "bool" else "int"} *restrict sel, const long sel_off,
                                                             // bool: (M, N); idx: (M, n_keep)
    __global float *restrict out, const long out_off,        // (M, N) or (M, n_keep)
    const int N, const int K, const int ldw,                 // ldw: wt's row stride
    const int n_entries)                                     // N (bool) or n_keep (idx)
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
            ${dot_group(GROUP, "xr", lambda q: "wt + (long)cols[%d] * ldw" % q,
                        lambda q, v: "o[dsts[%d]] = %s" % (q, v))}
            g = 0;
        }
    }
% if GROUP > 1:
    ${flush_tail("xr", lambda q: "wt + (long)cols[%s] * ldw" % q,
                 lambda q, v: "o[dsts[%s]] = %s" % (q, v))}
% endif
}
</%def>

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
void pscl_masked_vmm_split(
    __global const float *restrict x, const long x_off,     // (M, K)
    __global const float *restrict wt,                       // (N, K), row stride ldw
% if LIST_IN_KERNEL:
    __global const uchar *restrict mask, const long mask_off, // (M, N) bool
% else:
    __global const int *restrict list, const long list_off,  // (M, n_entries) columns
%   if MASK == "bool":
    __global const int *restrict counts,                     // (M,) list lengths
%   endif
% endif
    __global float *restrict out, const long out_off,        // (M, N) or (M, n_keep)
    const int N, const int K, const int ldw,
    const int n_entries)                                     // N (bool) or n_keep (idx)
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
        ${bool_bits16("bits", "m", "e0", "N")}
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

<%def name="gemm_kernel()">
% if ZEROED:
// A bool mask's dense output, zeroed row-major before the column kernel runs, which then
// writes only the selected outputs.  Written by the column kernel, one column at a time,
// the zeros of a 4096 x 1024 output took about 5.7 ms on the 2-core PoCL CPU, against
// 0.3-0.6 ms here (the whole product at 10% keep: 19 ms).  A work-item zeroes
// ${ZERO_CHUNK} floats.
__kernel void pscl_zero_fill(__global float *restrict out, const long out_off, const long n)
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
void pscl_masked_gemm(
    __global const float *restrict x, const long x_off,     // (M, K), row stride ldx
    __global const float *restrict wt,                       // (N, K), row stride ldw
    __global const ${"uchar" if MASK == "bool" else "int"} *restrict sel, const long sel_off,
                                                             // bool mask or slot map, (M, N)
    __global float *restrict out, const long out_off,        // (M, N) or (M, n_keep)
    const int M, const int N, const int K, const int ldx, const int ldw,
    const int out_cols, const int rows_per_block)
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
            ${dot_group(GROUP, "wr", lambda q: "xb + (long)rows[%d] * ldx" % q,
                        lambda q, v: "o[dsts[%d]] = %s" % (q, v))}
            g = 0;
        }
    }
% if GROUP > 1:
    ${flush_tail("wr", lambda q: "xb + (long)rows[%s] * ldx" % q,
                 lambda q, v: "o[dsts[%s]] = %s" % (q, v))}
% endif
}
</%def>

<%def name="gemm_tiled_kernel()">
<%
    TM, TN, P, UN, IT = TILE_M, TILE, GROUP, UNITS, WG
    words = TN // 32            # selection bits per tile row, in uints
    g4 = KC // 4                # float4s per staged row
    cap = IT * UN               # units per round
    st = staging(TM, TN, IT, KC, ALIGNED)
    sel_t = "uchar" if MASK == "bool" else "int"
    picked = "!= 0" if MASK == "bool" else ">= 0"
    chunks = TN // 16           # 16-entry pieces of a tile row (one 16-bit word each)
    # One local buffer, used in turn for the selection bits and the scan (side by side),
    # a round's units and the staged chunks: LDS_F4 float4s (masked.gemm_local_bytes).
    lds_f4 = LDS_F4
%>\
// Tiled masked product (GPU-shaped, SDDMM-like).  A work-group owns the TILE_M x TILE
// output tile (i0.., j0..) and, with SPLITK > 1, one slice of K.  Work-item r < TILE_M
// reads the selection of tile row r into registers (a bit per entry) and cuts it into
// "units": up to GROUP selected columns of the row, so that each x value read feeds GROUP
// FMAs.  The selection is read by the whole group, coalesced, 16 entries per work-item
// and step (one 16-byte load of a bool mask when MASK_ALIGNED), into 16-bit words in
// local memory that the row owners then collect.  (Read row by row by the owners, a
// 4096 x 1024 mask with nothing selected kept the H100 busy 47 us; read this way, 19 us.)
// An exclusive scan over the rows places each row's units, in order, without atomics.
// Each work-item owns UNITS units per round (a tile with more units than
// WG * UNITS runs the K loop once per round).  The K loop stages x[tile rows, chunk]
// and wt[tile columns, chunk] in local memory KC columns at a time, with coalesced loads
// issued one chunk ahead; the sums stay in registers.
//
// Bank conflicts: the columns of a work-item's units are arbitrary, so neighbouring items
// would hit the same bank in lock-step.  Each item instead walks the chunk's float4s
// starting at its own offset (item id mod KC / 4): at every step the items of a
// quarter-warp read distinct float4 slots, whatever rows or columns they hold.
__kernel __attribute__((reqd_work_group_size(${IT}, 1, 1)))
void pscl_masked_gemm_tiled(
    __global const float *restrict x, const long x_off,     // (M, K), row stride ldx
    __global const float *restrict wt,                       // (N, K), row stride ldw
    __global const ${sel_t} *restrict sel, const long sel_off,
                                                             // bool mask or slot map, (M, N)
% if SPLITK > 1:
    __global float *restrict part, const long part_stride,   // (slices, M, out_cols) sums
% else:
    __global float *restrict out, const long out_off,        // (M, N) or (M, n_keep)
% endif
    const int M, const int N, const int K, const int ldx, const int ldw,
    const int out_cols, const int k_len)                     // k_len: K per slice
{
    __local float4 lds[${lds_f4}];
    __local float4 *xs = lds;                // x[i0 + r, k0 + k] at r * KC + k
    __local float4 *ws = lds + ${TM * g4};   // wt[j0 + c, k0 + k] at c * KC + k
    __local float *xs1 = (__local float *)xs;
    __local float *ws1 = (__local float *)ws;
    __local int *scan = (__local int *)lds;
    __local uchar *urow = (__local uchar *)lds;
    __local uchar *ucnt = urow + ${cap};
    __local uchar *ucol = ucnt + ${cap};
    const int lid = get_local_id(0);
    const int j0 = get_group_id(0) * ${TN};
    const int i0 = get_group_id(1) * ${TM};
    const int kb = get_group_id(2) * k_len;
    const int ke = min(K, kb + k_len);

    // The tile's selection, 16 entries per step: bit e of mbits[r * ${chunks} + q] is entry
    // (i0 + r, j0 + 16 q + e).  Outside the matrix: no bits.
    __local ushort *mbits = (__local ushort *)(scan + ${IT});   // beside the scan's ints
    for (int c = lid; c < ${TM * chunks}; c += ${IT}) {
        const int i = i0 + (c >> ${chunks.bit_length() - 1});
        const int j = j0 + (c & ${chunks - 1}) * 16;
        uint m = 0;
        if (i < M && j < N) {
            const __global ${sel_t} *s = sel + sel_off + (long)i * N + j;
% if MASK_ALIGNED:
            // N and the mask's offset are multiples of 16 entries: whole aligned vectors.
%   if MASK == "bool":
            const uchar16 v = *(const __global uchar16 *)s;
%     for e in range(16):
            m |= (uint)(v.s${"%x" % e} != 0) << ${e};
%     endfor
%   else:
%     for h in range(4):
            const int4 v${h} = *(const __global int4 *)(s + ${4 * h});
%       for e, comp in enumerate("xyzw"):
            m |= (uint)(v${h}.${comp} >= 0) << ${4 * h + e};
%       endfor
%     endfor
%   endif
% else:
            const int n = min(16, N - j);
            for (int e = 0; e < n; ++e)
                m |= (uint)(s[e] ${picked}) << e;
% endif
        }
        mbits[c] = (ushort)m;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
% if MASK == "bool" and SPLITK == 1:
    // Dense output: zeros where nothing is selected (the owners write the rest), an entry
    // per work-item and step so that the stores coalesce.
    for (int e = lid; e < ${TM * TN}; e += ${IT}) {
        const int r = e >> ${TN.bit_length() - 1}, q = e & ${TN - 1};
        const int i = i0 + r, j = j0 + q;
        if (i < M && j < N && !((mbits[r * ${chunks} + (q >> 4)] >> (q & 15)) & 1))
            out[out_off + (long)i * N + j] = 0.0f;
    }
% endif
    // Work-item r < TILE_M: the selection of tile row r, a bit per entry, in registers.
% for w in range(words):
    uint b${w} = 0;
% endfor
    if (lid < ${TM}) {
% for w in range(words):
        b${w} = (uint)mbits[lid * ${chunks} + ${2 * w}]
            | ((uint)mbits[lid * ${chunks} + ${2 * w + 1}] << 16);
% endfor
    }
    const int cnt = ${" + ".join("popcount(b%d)" % w for w in range(words))};
    const int nu = (cnt + ${P - 1}) >> ${P.bit_length() - 1};  // units of this row
    ${common.inclusive_scan("scan", "nu", IT)}
    const int first_unit = scan[lid] - nu;
    const int n_units = scan[${IT - 1}];

    // This work-item's part of the staging: rows sr + n * step, columns sk .. sk + width.
    const int sk = (lid & ${st["per_row"] - 1}) * ${st["width"]};   // bit operations: common.cl.mako, 1
    const int sr = lid >> ${st["per_row"].bit_length() - 1};
    const int rot = lid & ${g4 - 1};
% if DENSE:
    // The same for the whole group.  A dense tile then skips the unit loop below rather than
    // returning early: with an early return here, PoCL 3.1 left outputs of the *sparse*
    // tiles unwritten.
    const int dense = n_units * ${P * 100} >= ${DENSE * TM * TN};
${dense_tile()}
% endif

    for (int base = 0; base < ${"(dense ? 0 : n_units)" if DENSE else "n_units"}; base += ${cap}) {
        barrier(CLK_LOCAL_MEM_FENCE);         // the scan, or the last chunk, is consumed
        // The units of this round: row owners write those inside [base, base + cap).
        if (nu > 0 && first_unit < base + ${cap} && first_unit + nu > base) {
            int n = 0;
% for w in range(words):
            for (uint b = b${w}; b; ) {
                const uint low = b & (0u - b);
                b ^= low;
                const int u = first_unit + (n >> ${P.bit_length() - 1}) - base;
                if (u >= 0 && u < ${cap}) {
                    ucol[u * ${P} + (n & ${P - 1})] = (uchar)(${32 * w} + 31 - (int)clz(low));
                    if ((n & ${P - 1}) == 0) {
                        urow[u] = (uchar)lid;
                        ucnt[u] = (uchar)min(${P}, cnt - n);
                    }
                }
                ++n;
            }
% endfor
        }
        barrier(CLK_LOCAL_MEM_FENCE);
% for s in range(UN):
        const int un${s} = lid + ${s * IT};
        const int n${s} = base + un${s} < n_units ? ucnt[un${s}] : 0;
        const int r${s} = n${s} ? urow[un${s}] : 0;
        const int xo${s} = r${s} * ${g4};
%   for q in range(P):
        const int c${s}_${q} = ${q} < n${s} ? ucol[un${s} * ${P} + ${q}] : 0;
        const int wo${s}_${q} = c${s}_${q} * ${g4};
        float acc${s}_${q} = 0.0f;
%   endfor
% endfor

        // The K loop; the first chunk is loaded here, each next one during the FMAs.
${stage_registers()}
        ${stage_load("kb")}
        for (int k0 = kb; k0 < ke; k0 += ${KC}) {
            barrier(CLK_LOCAL_MEM_FENCE);     // the units, or the previous chunk, are read
${stage_store()}
            barrier(CLK_LOCAL_MEM_FENCE);
            if (k0 + ${KC} < ke) {
                ${stage_load("k0 + %d" % KC)}
            }
% for g in range(g4):
            {
                const int kk = (${g} + rot) & ${g4 - 1};
%   for s in range(UN):
                if (n${s}) {
                    const float4 xv = xs[xo${s} + kk];
%     for q in range(P):
                    if (${q} < n${s}) {
                        const float4 wv = ws[wo${s}_${q} + kk];
                        acc${s}_${q} = fma(xv.x, wv.x, acc${s}_${q});
                        acc${s}_${q} = fma(xv.y, wv.y, acc${s}_${q});
                        acc${s}_${q} = fma(xv.z, wv.z, acc${s}_${q});
                        acc${s}_${q} = fma(xv.w, wv.w, acc${s}_${q});
                    }
%     endfor
                }
%   endfor
            }
% endfor
        }
% for s in range(UN):
%   for q in range(P):
        if (${q} < n${s}) {
            const long i = i0 + r${s}, j = j0 + c${s}_${q};
%     if MASK == "bool":
            const long dst = i * N + j;
%     else:
            const long dst = i * out_cols + sel[sel_off + i * N + j];
%     endif
%     if SPLITK > 1:
            part[get_group_id(2) * part_stride + dst] = acc${s}_${q};
%     else:
            out[out_off + dst] = acc${s}_${q};
%     endif
        }
%   endfor
% endfor
    }
}
% if SPLITK > 1:

// The sum of the K slices' partial products, in slice order (deterministic); a bool mask's
// unselected outputs get zeros.
__kernel void pscl_gemm_splitk_sum(
    __global const float *restrict part, const long part_stride, const int n_slices,
% if MASK == "bool":
    __global const uchar *restrict sel, const long sel_off,
% endif
    __global float *restrict out, const long out_off, const long total)
{
    const long e = get_global_id(0);
    if (e >= total)
        return;
% if MASK == "bool":
    if (!sel[sel_off + e]) {
        out[out_off + e] = 0.0f;
        return;
    }
% endif
    float s = part[e];
    for (int t = 1; t < n_slices; ++t)
        s += part[t * part_stride + e];
    out[out_off + e] = s;
}
% endif
</%def>

## DENSE > 0: a tile whose units cover at least DENSE% of its entries is computed whole, as
## a dense product blocked in registers, and only its selected entries are written.  There
## every LDS value feeds DR (or DC) FMAs instead of about one, which beats skipping the
## unselected work once the tile is dense enough.  The choice is per tile and inside the
## kernel, since the host does not know how dense a device mask is.
<%def name="dense_tile()">
<%
    TM, TN, IT, P = TILE_M, TILE, WG, GROUP
    g4 = KC // 4
    per_item = TM * TN // IT     # outputs per work-item
    DC = min(8, per_item)        # columns per work-item: dc + c * n_col
    DR = per_item // DC          # rows per work-item: dr + r * n_row
    n_col = TN // DC
    n_row = IT // n_col
%>    if (dense) {
        // Work-item (dr, dc) owns rows dr + r * ${n_row} and columns dc + c * ${n_col}: the
        // neighbours of a row write neighbouring outputs.
        const int dc = lid & ${n_col - 1};
        const int dr = lid >> ${n_col.bit_length() - 1};
% for r in range(DR):
%   for c in range(DC):
        float d${r}_${c} = 0.0f;
%   endfor
% endfor
${stage_registers()}
        ${stage_load("kb")}
        for (int k0 = kb; k0 < ke; k0 += ${KC}) {
            barrier(CLK_LOCAL_MEM_FENCE);     // the scan, or the previous chunk, is read
${stage_store()}
            barrier(CLK_LOCAL_MEM_FENCE);
            if (k0 + ${KC} < ke) {
                ${stage_load("k0 + %d" % KC)}
            }
% for g in range(g4):
            {
                const int kk = (${g} + rot) & ${g4 - 1};   // bank-conflict free, as above
%   for r in range(DR):
                const float4 xv${r} = xs[(dr + ${r * n_row}) * ${g4} + kk];
%   endfor
%   for c in range(DC):
                {
                    const float4 wv = ws[(dc + ${c * n_col}) * ${g4} + kk];
%     for r in range(DR):
                    d${r}_${c} = fma(xv${r}.x, wv.x, d${r}_${c});
                    d${r}_${c} = fma(xv${r}.y, wv.y, d${r}_${c});
                    d${r}_${c} = fma(xv${r}.z, wv.z, d${r}_${c});
                    d${r}_${c} = fma(xv${r}.w, wv.w, d${r}_${c});
%     endfor
                }
%   endfor
            }
% endfor
        }
% for r in range(DR):
%   for c in range(DC):
        {
            const long i = i0 + dr + ${r * n_row}, j = j0 + dc + ${c * n_col};
            if (i < M && j < N) {
                const ${"uchar" if MASK == "bool" else "int"} s = sel[sel_off + i * N + j];
%     if MASK == "bool":
                const long dst = i * N + j;
                if (s)
%     else:
                const long dst = i * out_cols + s;
                if (s >= 0)
%     endif
%     if SPLITK > 1:
                    part[get_group_id(2) * part_stride + dst] = d${r}_${c};
%     else:
                    out[out_off + dst] = d${r}_${c};
%     endif
            }
        }
%   endfor
% endfor
    }
</%def>

## The registers that carry a chunk from its load to its store (px*: x, pw*: wt).
<%def name="stage_registers()">
<% st = staging(TILE_M, TILE, WG, KC, ALIGNED) %>\
% for n in range(st["nx"]):
        ${st["ptype"]} px${n};
% endfor
% for n in range(st["nw"]):
        ${st["ptype"]} pw${n};
% endfor
</%def>

## Store the chunk in px*, pw* to local memory: x rows at xs, wt rows at ws, KC floats each.
<%def name="stage_store()">
<% st = staging(TILE_M, TILE, WG, KC, ALIGNED); step, per_row = st["step"], st["per_row"] %>\
% for name, dst, n_rows, count in (("px", "xs", TILE_M, st["nx"]), ("pw", "ws", TILE, st["nw"])):
%   for n in range(count):
%     if n_rows % step:
            if (sr + ${n * step} < ${n_rows})
%     endif
            ${dst if ALIGNED else dst + "1"}[(sr + ${n * step}) * ${per_row} + (lid & ${per_row - 1})] = ${name}${n};
%   endfor
% endfor
</%def>

## Load one chunk (columns kb.. of the tile's x rows and wt rows) into px*, pw*: zeros
## past the matrix edges, so the FMAs need no bounds.  ALIGNED: whole float4s (every row
## and kb start at a multiple of 4 floats, and so does K).
<%def name="stage_load(kb)">
<%
    st = staging(TILE_M, TILE, WG, KC, ALIGNED)
    step, ptype = st["step"], st["ptype"]
%>\
            {
                const int kq = ${kb} + sk;
% for name, rows, n_rows, limit, src in (("px", "i", TILE_M, "M", "x + x_off + (long)i * ldx"), ("pw", "j", TILE, "N", "wt + (long)j * ldw")):
%   for n in range(-(-n_rows // step)):
                {
                    const int ${rows} = ${"i0" if rows == "i" else "j0"} + sr + ${n * step};
                    ${name}${n} = ${"sr + %d < %d && " % (n * step, n_rows) if n_rows % step else ""}${rows} < ${limit} && kq < ke ?
                        *(const __global ${ptype} *)(${src} + kq) : (${ptype})(0.0f);
                }
%   endfor
% endfor
            }
</%def>

## acc_v += a * src[v * VEC ...] over one K chunk (KVEC vectors), whole or, at the end of a
## row, element by element (`part` = the valid length, < KVEC * VEC).
<%def name="chunk_fma(scale, src)">
            if (whole) {
% for v in range(KVEC):
                acc${v} = fma((pscl_floatv)(${scale}), PSCL_LOAD_pscl_floatv(${v}, ${src}), acc${v});
% endfor
            } else {
                for (int e = 0; e < part; ++e)
                    tail[e] = fma(${scale}, (${src})[e], tail[e]);
            }
</%def>

<%def name="chunk_begin()">
% for v in range(KVEC):
    pscl_floatv acc${v} = (pscl_floatv)(0.0f);
% endfor
    float tail[PSCL_KCHUNK];
    const int whole = k0 + PSCL_KCHUNK <= K;
    const int part = K - k0;
    if (!whole)
        for (int e = 0; e < PSCL_KCHUNK; ++e)
            tail[e] = 0.0f;
</%def>

<%def name="dx_kernel()">
#define PSCL_KCHUNK (${VEC} * ${KVEC})
// dx = (mask * dy) @ W^T.  Work-item (row i, K chunk): dx[i, chunk] is the sum, over the
// columns j that row i selects, of dy[i, j] * wt[j, chunk] -- one contiguous piece of a
// weight row per selected output, nothing for the others.  The row's selection comes as a
// list (idx, or compacted once from a bool mask by pscl_bool_rows), not rescanned per
// chunk.  Dim 0 walks rows, so the work-groups that run together share one K chunk of W.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_dx(
    __global const float *restrict dy, const long dy_off,   // (M, N) or compact (M, n_keep)
    __global const float *restrict wt,                       // (N, K)
    __global const int *restrict cols, const long cols_off,  // (M, ld) selected columns
% if MASK == "bool":
    __global const int *restrict counts,                     // (M,) list lengths
% endif
    __global float *restrict dx, const long dx_off,          // (M, K)
    const int M, const int N, const int K, const int ldw,
    const int ld)                                            // ld: N (bool) or n_keep
{
    const int i = get_global_id(0);
    const int k0 = get_global_id(1) * PSCL_KCHUNK;
    if (i >= M || k0 >= K)
        return;
    ${chunk_begin()}
    const long row = (long)i * ld;
    const int n_sel = ${"counts[i]" if MASK == "bool" else "ld"};
    for (int s = 0; s < n_sel; ++s) {
        const int j = cols[cols_off + row + s];
        if ((uint)j >= (uint)N)   // idx is validated before launch; this keeps memory safe
            continue;
        const float g = dy[dy_off + row + ${"j" if MASK == "bool" else "s"}];
        const __global float *src = wt + (long)j * ldw + k0;
        ${chunk_fma("g", "src")}
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

<%def name="dw_kernel()">
#define PSCL_KCHUNK (${VEC} * ${KVEC})
// dw = x^T @ (mask * dy).  Work-item (column j, K chunk): dw[j, chunk] is the sum, over
// the rows i that select column j, of dy[i, j] * x[i, chunk].  Each column's selecting
// rows come as a list (pscl_cols_list: row and dy value), built once.  Dim 0 walks
// columns, so the work-groups that run together share one K chunk of x in cache.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_dw(
    __global const float *restrict x, const long x_off,     // (M, ldx)
    __global const int2 *restrict rows,                      // (N, M): (row, bits of dy)
    __global const int *restrict counts,                     // (N,) list lengths
    __global float *restrict dw,                             // (N, K): transposed
    const int M, const int N, const int K, const int ldx)    // ldx: x's row stride
{
    const int j = get_global_id(0);
    const int k0 = get_global_id(1) * PSCL_KCHUNK;
    if (j >= N || k0 >= K)
        return;
    ${chunk_begin()}
    const __global int2 *list = rows + (long)j * M;
    const int n_sel = counts[j];
    for (int s = 0; s < n_sel; ++s) {
        const int2 r = list[s];
        const float g = as_float(r.y);
        const __global float *src = x + x_off + (long)r.x * ldx + k0;
        ${chunk_fma("g", "src")}
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
