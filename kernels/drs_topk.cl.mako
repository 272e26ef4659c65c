## drs_topk (pysparsecl/families/drs_topk.py): per row, the n_keep largest keys, ties
## toward the lower column: a histogram, then a radix select over the few candidates of
## the boundary bin, then one pass that writes the selection (a bool mask, a compact list
## or the convolution layout).  One work-item per row; no local memory, no barriers.
## ARGS: the kernel's parameters, declared in pysparsecl/families/drs_topk.py (signature:
## the output's form, COMPACT or PLANE, changes them).
<%namespace name="common" file="common.cl.mako"/>\
${topk_serial_kernel()}

<%def name="topk_serial_kernel()">
// Tile parameters (declared once, in pysparsecl/families/drs_topk.py; the wrapper caps
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
void pscl_drs_topk(${ARGS["pscl_drs_topk"]})
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
