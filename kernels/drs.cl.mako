## Dimension-reduction search (DSG, Liu et al., ICLR 2019): project the rows of x and the
## columns of w to k dimensions with a sparse random projection, multiply the small
## projections to estimate every output, and keep each row's n_keep largest estimates.
##
##   KIND == "project"  out = A @ RT for the rows of A (x, or the weight rows W^T), where
##                      RT = R^T / sqrt(k) is (d, k_pad) with zero padding columns.  R is
##                      stored sparsely on the host; the device keeps this dense copy
##                      because one vector FMA over k lanes beats gathering d/3 inputs per
##                      output on every device we target (same work, no gathers).
##                      Writes (rows, ld) or, with TRANSPOSED, (k_pad, ld) for the weight.
##   KIND == "scores"   S = Xp @ V: (M, k) times (k, N_pad), a small dense product in
##                      registers (ROWS rows x NVEC vectors of columns per work-item).
##   KIND == "topk"     per row, the n_keep largest scores, ties toward the lower column:
##                      a histogram, then a radix select over the few candidates of the
##                      boundary bin, then one pass that writes the selection.
##   KIND == "util"     (N, d) weight rows -> (d, ld) transposed, zero padded (exact mode).
##
## No local memory and no barriers (PoCL runs a work-group as a loop over its items).
<%namespace name="common" file="common.cl.mako"/>\
% if KIND in ("project", "project_split"):
${project_kernel()}
% elif KIND == "scores":
${scores_kernel()}
% elif KIND == "fused":
${fused_kernel()}
% elif KIND == "topk":
${topk_serial_kernel()}
% elif KIND == "topk_team":
${topk_team_kernel()}
% elif KIND == "util":
${util_kernels()}
% endif

<%def name="project_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/ops/drs.py (DRS_PROJECT, or
// DRS_PROJECT_SPLIT: one body; the unsplit family renders with DSPLIT = 1).
#define PSCL_VEC ${VEC}
#define PSCL_KCHUNK (${VEC} * ${KVEC})

% if DSPLIT == 1:
// Work-item (row block, k chunk): ROWS rows of A times KVEC vectors of RT's columns.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
% else:
// Work-group (row block, k chunk) of DSPLIT items (GPUs): item t sums the products over
// j = t, t + DSPLIT, ... (coalesced reads of A's rows), then the partial sums meet in a
// tree in local memory.  A serial loop over all of d left a GPU mostly idle.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
% endif
void pscl_drs_project(
    __global const float *restrict a, const long a_off,      // (n_rows, d), row stride lda
    const int n_rows, const int d, const int lda,
    __global const float *restrict rt, const int k_pad,        // (d, k_pad)
    __global float *restrict out, const int ld_out)            // (n_rows, ld) or (k_pad, ld)
{
% if DSPLIT == 1:
    const int r0 = get_global_id(0) * ${ROWS};
    const int c0 = get_global_id(1) * PSCL_KCHUNK;
    if (r0 >= n_rows || c0 >= k_pad)
        return;
    const int j0 = 0, j_step = 1;
% else:
    // The grid is exact (one work-group per row block and k chunk): no item returns early.
    const int r0 = get_group_id(0) * ${ROWS};
    const int c0 = get_group_id(1) * PSCL_KCHUNK;
    const int t = get_local_id(0);
    const int j0 = t, j_step = ${DSPLIT};
% endif
% for r in range(ROWS):
    // Rows past the end repeat the last row (no branch in the loop); they are not stored.
    const __global float *a${r} = a + a_off + (long)min(r0 + ${r}, n_rows - 1) * lda;
%   for v in range(KVEC):
    pscl_floatv acc${r}_${v} = (pscl_floatv)(0.0f);
%   endfor
% endfor
    const __global float *rc = rt + (long)j0 * k_pad + c0;
    for (int j = j0; j < d; j += j_step, rc += (long)j_step * k_pad) {
% for v in range(KVEC):
        const pscl_floatv rv${v} = PSCL_LOAD_pscl_floatv(${v}, rc);
% endfor
% for r in range(ROWS):
        {
            const pscl_floatv av = (pscl_floatv)(a${r}[j]);
%   for v in range(KVEC):
            acc${r}_${v} = fma(av, rv${v}, acc${r}_${v});
%   endfor
        }
% endfor
    }
% if DSPLIT > 1:
    __local pscl_floatv red[${DSPLIT * ROWS * KVEC}];   // [slot][t]
%   for r in range(ROWS):
%     for v in range(KVEC):
    red[${(r * KVEC + v) * DSPLIT} + t] = acc${r}_${v};
%     endfor
%   endfor
    barrier(CLK_LOCAL_MEM_FENCE);
    ${common.tree_sum("red", ROWS * KVEC, DSPLIT, "t", "t", DSPLIT)}
    if (t != 0)
        return;
%   for r in range(ROWS):
%     for v in range(KVEC):
    acc${r}_${v} = red[${(r * KVEC + v) * DSPLIT}];
%     endfor
%   endfor
% endif
% for r in range(ROWS):
    if (r0 + ${r} < n_rows) {
%   for v in range(KVEC):
%     if TRANSPOSED:
%       for e in range(VEC):
        out[(long)(c0 + ${v * VEC + e}) * ld_out + r0 + ${r}] = ${common.component("acc%d_%d" % (r, v), VEC, e)};
%       endfor
%     else:
        PSCL_STORE_pscl_floatv(acc${r}_${v}, ${v}, out + (long)(r0 + ${r}) * ld_out + c0);
%     endif
%   endfor
    }
% endfor
}
</%def>

<%def name="scores_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/ops/drs.py (DRS_SCORES).
#define PSCL_VEC ${VEC}
#define PSCL_NCHUNK (${VEC} * ${NVEC})

${key_function()}

// Work-item (column chunk, row block): ROWS rows of Xp times NVEC vectors of V's columns;
// each V vector load feeds ROWS FMAs and each Xp element is broadcast to NVEC FMAs.  The
// scores are stored as order-preserving keys (pscl_key), what the top-k kernel ranks.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_drs_scores(
    __global const float *restrict xp, const long xp_off, const int ldx,  // (M, >= k)
    __global const float *restrict v, const int ldv,                       // (k, ldv)
    __global uint *restrict s, const int lds,                              // (M, lds) keys
    const int M, const int k, const int n_cols)                            // n_cols <= ldv
{
    const int n0 = get_global_id(0) * PSCL_NCHUNK;
    const int i0 = get_global_id(1) * ${ROWS};
    if (n0 >= n_cols || i0 >= M)
        return;
% for r in range(ROWS):
    const __global float *x${r} = xp + xp_off + (long)min(i0 + ${r}, M - 1) * ldx;
%   for c in range(NVEC):
    pscl_floatv acc${r}_${c} = (pscl_floatv)(0.0f);
%   endfor
% endfor
    const __global float *vc = v + n0;
    for (int t = 0; t < k; ++t, vc += ldv) {
% for c in range(NVEC):
        const pscl_floatv v${c} = PSCL_LOAD_pscl_floatv(${c}, vc);
% endfor
% for r in range(ROWS):
        {
            const pscl_floatv xv = (pscl_floatv)(x${r}[t]);
%   for c in range(NVEC):
            acc${r}_${c} = fma(xv, v${c}, acc${r}_${c});
%   endfor
        }
% endfor
    }
% for r in range(ROWS):
    if (i0 + ${r} < M) {
%   for c in range(NVEC):
        ${"vstore%d(pscl_key%d(acc%d_%d), %d, s + (long)(i0 + %d) * lds + n0);" % (VEC, VEC, r, c, c, r) if VEC > 1 else "s[(long)(i0 + %d) * lds + n0 + %d] = pscl_key1(acc%d_%d);" % (r, c, r, c)}
%   endfor
    }
% endfor
}
</%def>

<%def name="fused_kernel()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in pysparsecl/ops/drs.py (DRS_FUSED).  K_PAD, the
// padded k, is compile-time so that the projected row stays in registers.
#define PSCL_VEC ${VEC}
#define PSCL_NCHUNK (${VEC} * ${NVEC})
#define PSCL_K_PAD ${K_PAD}

${key_function()}

// Projection and scores in one launch, for a few rows.  Work-item (column range, row)
// projects its row itself -- R^T is read once per item, a small redundancy for a few
// items -- then scores its columns NCHUNK at a time.  The row-parallel kernels would
// leave all but one core idle on a single row.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_drs_fused(
    __global const float *restrict x, const long x_off, const int d,  // (M, d)
    __global const float *restrict rt,                                  // (d, K_PAD)
    __global const float *restrict v, const int ldv,                    // (k, ldv)
    __global uint *restrict keys, const int ldk,                        // (M, ldk)
    const int M, const int k, const int n_cols, const int cols_per_item)
{
    const int c0 = get_global_id(0) * cols_per_item;
    const int i = get_global_id(1);
    if (c0 >= n_cols || i >= M)
        return;
    const int c1 = min(n_cols, c0 + cols_per_item);
    const __global float *xr = x + x_off + (long)i * d;
% for q in range(K_PAD // VEC):
    pscl_floatv p${q} = (pscl_floatv)(0.0f);
% endfor
    const __global float *rr = rt;
    for (int j = 0; j < d; ++j, rr += PSCL_K_PAD) {
        const pscl_floatv a = (pscl_floatv)(xr[j]);
% for q in range(K_PAD // VEC):
        p${q} = fma(a, PSCL_LOAD_pscl_floatv(${q}, rr), p${q});
% endfor
    }
    float xp[PSCL_K_PAD];
% for q in range(K_PAD // VEC):
    PSCL_STORE_pscl_floatv(p${q}, ${q}, xp);
% endfor
    __global uint *kr = keys + (long)i * ldk;
    for (int n = c0; n < c1; n += PSCL_NCHUNK) {
% for c in range(NVEC):
        pscl_floatv acc${c} = (pscl_floatv)(0.0f);
% endfor
        const __global float *vc = v + n;
        for (int t = 0; t < k; ++t, vc += ldv) {
            const pscl_floatv xv = (pscl_floatv)(xp[t]);
% for c in range(NVEC):
            acc${c} = fma(xv, PSCL_LOAD_pscl_floatv(${c}, vc), acc${c});
% endfor
        }
% for c in range(NVEC):
        ${"vstore%d(pscl_key%d(acc%d), %d, kr + n);" % (VEC, VEC, c, c) if VEC > 1 else "kr[n + %d] = pscl_key1(acc%d);" % (c, c)}
% endfor
    }
}
</%def>

<%def name="key_function()">
// Order-preserving map of float to uint: a larger key is a larger float.  Negative floats
// have every bit flipped, the others only the sign bit; -0 counts as +0 (equal values
// tie) and NaN maps to 0, below every number.
inline uint pscl_key1(const float f)
{
    const uint bits = (f == 0.0f) ? 0u : as_uint(f);
    const uint key = bits ^ (as_uint(as_int(bits) >> 31) | 0x80000000u);
    return isnan(f) ? 0u : key;
}
% if VEC > 1:
inline uint${VEC} pscl_key${VEC}(const float${VEC} f)
{
    const uint${VEC} bits = as_uint${VEC}(f) & ~as_uint${VEC}(f == 0.0f);
    const uint${VEC} key = bits ^ (as_uint${VEC}(as_int${VEC}(bits) >> 31) | 0x80000000u);
    return select(key, (uint${VEC})(0u), as_uint${VEC}(isnan(f)));
}
% endif
</%def>

<%def name="topk_serial_kernel()">
// Tile parameters (declared once, in pysparsecl/ops/drs.py: DRS_TOPK; the wrapper caps
// HIST_BITS for short rows).
#define PSCL_HIST_BITS ${HIST_BITS}
#define PSCL_BINS (1 << PSCL_HIST_BITS)
#define PSCL_COPIES ${COPIES}

// One work-item per row of keys (1 <= n_keep < N; the wrapper handles n_keep == N).  It
// finds the prefix `thresh` (its bits given by `mask`) of the n_keep-th largest key, and
// `want`, how many of the keys sharing that prefix are still to be taken:
//   1. a histogram of the top HIST_BITS bits of every key, in COPIES interleaved copies
//      (runs of equal bins would otherwise serialise on one counter): the boundary bin;
//   2. the keys of the boundary bin are copied to `cand` (usually a small fraction);
//   3. radix passes over the candidates refine the prefix 8 bits at a time, stopping
//      once the keys sharing it are exactly the ones wanted;
//   4. one pass in column order keeps every key whose prefix is larger and the first
//      `want` keys with an equal prefix: exactly n_keep, ties toward the lower column.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_drs_topk(
    __global const uint *restrict keys, const int ldk,    // (M, ldk) from pscl_drs_scores
    __global uint *restrict cand,                          // (M, ldk) scratch
    const int M, const int N, const int n_keep,
% if COMPACT:
    __global int *restrict out, const long out_off        // (M, n_keep) ascending columns
% elif PLANE:
    __global uchar *restrict out, const long out_off,     // (M / P, N, P): conv layout
    const int P                                           // rows are (image, pixel)
% else:
    __global uchar *restrict out, const long out_off      // (M, N) mask
% endif
    )
{
    const int i = get_global_id(0);
    if (i >= M)
        return;
    const __global uint *row = keys + (long)i * ldk;
    __global uint *cr = cand + (long)i * ldk;
    uint hist[PSCL_COPIES * PSCL_BINS];
    for (int b = 0; b < PSCL_COPIES * PSCL_BINS; ++b)
        hist[b] = 0u;
    int n = 0;
    for (; n + PSCL_COPIES <= N; n += PSCL_COPIES) {
% for c in range(COPIES):
        ++hist[${c} * PSCL_BINS + (row[n + ${c}] >> (32 - PSCL_HIST_BITS))];
% endfor
    }
    for (; n < N; ++n)
        ++hist[row[n] >> (32 - PSCL_HIST_BITS)];
% if COPIES > 1:
    for (int b = 0; b < PSCL_BINS; ++b)
        hist[b] += ${" + ".join("hist[%d * PSCL_BINS + b]" % c for c in range(1, COPIES))};
% endif
    int want = n_keep;
    uint top = PSCL_BINS - 1;
    while ((int)hist[top] < want)
        want -= (int)hist[top--];
    // Branch-free compaction: always store, advance only for a candidate.
    int n_cand = 0;
    for (n = 0; n < N; ++n) {
        const uint key = row[n];
        cr[n_cand] = key;
        n_cand += (key >> (32 - PSCL_HIST_BITS)) == top;
    }
    uint thresh = top << (32 - PSCL_HIST_BITS);
    uint mask = ~0u << (32 - PSCL_HIST_BITS);
    int matching = n_cand;
    for (int shift = 32 - PSCL_HIST_BITS; shift > 0 && matching != want;) {
        const int bits = min(8, shift);
        shift -= bits;
        const uint digit_mask = (1u << bits) - 1u;
        for (uint b = 0; b <= digit_mask; ++b)
            hist[b] = 0u;
        for (int q = 0; q < n_cand; ++q) {
            const uint key = cr[q];
            if ((key & mask) == thresh)
                ++hist[(key >> shift) & digit_mask];
        }
        uint digit = digit_mask;
        while ((int)hist[digit] < want)
            want -= (int)hist[digit--];
        thresh |= digit << shift;
        mask |= digit_mask << shift;
        matching = (int)hist[digit];
    }
% if COMPACT:
    __global int *o = out + out_off + (long)i * n_keep;
    int taken = 0;
    for (n = 0; n < N; ++n) {
        const uint key = row[n] & mask;
        if (key > thresh || (key == thresh && want-- > 0))
            o[taken++] = n;
    }
% elif PLANE:
    // Row i is pixel p of image i / P; its channel n goes to out[image, n, p].  (No i % P:
    // see common.cl.mako, 1.)
    const int image = i / P;
    __global uchar *o = out + out_off + (long)image * N * P + (i - image * P);
    for (n = 0; n < N; ++n) {
        const uint key = row[n] & mask;
        o[(long)n * P] = (key > thresh || (key == thresh && want-- > 0)) ? 1 : 0;
    }
% else:
    __global uchar *o = out + out_off + (long)i * N;
    n = 0;
    for (; n + 16 <= N; n += 16) {
        const uint16 key = vload16(0, row + n) & mask;
        const int16 eq = key == thresh;
        if (!any(eq)) {
            vstore16(as_uchar16(convert_char16(key > thresh)) & (uchar16)(1), 0, o + n);
            continue;
        }
        for (int e = n; e < n + 16; ++e) {
            const uint ke = row[e] & mask;
            o[e] = (ke > thresh || (ke == thresh && want-- > 0)) ? 1 : 0;
        }
    }
    for (; n < N; ++n) {
        const uint key = row[n] & mask;
        o[n] = (key > thresh || (key == thresh && want-- > 0)) ? 1 : 0;
    }
% endif
}
</%def>

<%def name="topk_team_kernel()">
<% per_item = 256 // TEAM %>\
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
void pscl_drs_topk(
    __global const uint *restrict keys, const int ldk,    // (M, ldk) from pscl_drs_scores
    __global uint *restrict cand,                          // unused (the serial kernel's)
    const int M, const int N, const int n_keep,
% if COMPACT:
    __global int *restrict out, const long out_off        // (M, n_keep) ascending columns
% elif PLANE:
    __global uchar *restrict out, const long out_off,     // (M / P, N, P): conv layout
    const int P                                           // rows are (image, pixel)
% else:
    __global uchar *restrict out, const long out_off      // (M, N) mask
% endif
    )
{
    __local uint hist[256];
    __local int part[${TEAM}];
    __local int pick[3];
    const int i = get_group_id(0);        // the row: the grid is exactly M work-groups
    const int lid = get_local_id(0);
    const __global uint *row = keys + (long)i * ldk;
    uint thresh = 0u, mask = 0u;
    int want = n_keep, matching = N;
    for (int shift = 24; shift >= 0 && matching != want; shift -= 8) {
        for (int b = lid; b < 256; b += ${TEAM})
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

<%def name="util_kernels()">
// (N, d) rows -> (d, ld) with columns N..ld-1 zero: the weight in the layout the scores
// kernel reads, when the projection is the identity (exact mode).
__kernel void pscl_drs_pad_transpose(__global const float *restrict src, const long src_off,
                                     __global float *restrict dst, const int N, const int d,
                                     const int ld_src, const int ld)
{
    const int n = get_global_id(0);
    const int t = get_global_id(1);
    if (n >= ld || t >= d)
        return;
    dst[(long)t * ld + n] = n < N ? src[src_off + (long)n * ld_src + t] : 0.0f;
}
</%def>
