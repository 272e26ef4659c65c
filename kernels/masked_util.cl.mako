## Helper kernels of the masked products (pysparsecl/families/masked_util.py; no tile
## parameters): the (K, N) -> (N, K) transpose for weights that were not prepared, the
## validation of compact index masks into a slot map, the backward's selection lists, and
## pscl_bool_compact, which turns a bool mask into the split VMM's list.
<%namespace name="common" file="common.cl.mako"/>\
<%namespace name="m" file="masked_common.cl.mako"/>\
${util_kernels()}

<%def name="util_kernels()">
// dst[c, r] = src[r, c] for an (R, C) source, both with row strides of their own.  A
// work-item moves one 16 x 16 tile: 16 whole lines in, 16 whole lines out.
__kernel void pscl_transpose(${ARGS["pscl_transpose"]})
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
__kernel void pscl_idx_slots(${ARGS["pscl_idx_slots"]})
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
__kernel void pscl_bool_rows(${ARGS["pscl_bool_rows"]})
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
__kernel void pscl_cols_list_${form}(${ARGS["pscl_cols_list_" + form]})
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
void pscl_bool_compact(${ARGS["pscl_bool_compact"]})
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
        ${m.bool_bits16("bits", "m", "e0", "N")}
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
