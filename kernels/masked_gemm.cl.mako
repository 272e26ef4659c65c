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
## No local memory and no barriers: PoCL runs a work-group as a loop over its items.
<%namespace name="common" file="common.cl.mako"/>\
## Only KIND is read at the top: each kind's parameters are read inside its def, so a kind
## renders from its own parameters alone.
% if KIND == "util":
${util_kernels()}
% else:
${prelude()}
%   if KIND == "vmm":
${vmm_kernel()}
%   elif KIND == "gemm":
${gemm_kernel()}
%   elif KIND == "dx":
${dx_kernel()}
%   elif KIND == "dw":
${dw_kernel()}
%   endif
% endif

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
        vstore16((float16)(${", ".join("t%d.s%x" % (r, c) for r in range(16))}), 0,
                 d + (long)${c} * ld_dst);
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
    __global int2 *r = rows + (long)j0 * M;
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
            r[${c}L * M + n${c}] = (int2)(i, as_int(g[j0 + ${c}]));
            n${c} += e[${c}] != 0;
%     else:
            r[${c}L * M + n${c}] = (int2)(i, as_int(g[max(e[${c}], 0)]));
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
            r[(long)c * M + n] = (int2)(i, as_int(g[j0 + c]));
            n += v != 0;
%   else:
            r[(long)c * M + n] = (int2)(i, as_int(g[max(v, 0)]));
            n += v >= 0;
%   endif
        }
        counts[j0 + c] = n;
    }
}
% endfor
</%def>

<%def name="prelude()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/ops/masked.py.
#define PSCL_VEC ${VEC}

// Sum of the lanes of a vector, as a tree of half-width adds.
inline float pscl_hsum(const pscl_floatv v)
{
% if VEC == 1:
    return v;
% else:
<%  width = VEC %>\
%   while width > 2:
<%      half = width // 2 %>\
    const float${half} h${half} = ${"v" if width == VEC else "h%d" % width}.lo + ${"v" if width == VEC else "h%d" % width}.hi;
<%      width = half %>\
%   endwhile
    return ${"v" if VEC == 2 else "h2"}.x + ${"v" if VEC == 2 else "h2"}.y;
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

<%def name="gemm_kernel()">
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
            o[e] = 0.0f;
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
