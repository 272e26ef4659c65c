## masked_lists (pysparsecl/families/masked_lists.py): the backward's selection lists built
## by work-group scans (GPU-shaped; SCAN 0 keeps masked_util's serial builders).  The lists
## are those masked_util's kernels build, in the same row order.
${lists_kernels()}

<%def name="lists_kernels()">
// Exclusive prefix sums of part[0 .. n), in place, stride apart (a Hillis-Steele scan in
// local memory: log2(n) steps); returns the total.  Every work-item of the group calls it.
inline int pscl_scan_local(__local int *part, const int t, const int n, const int stride)
{
    const int mine = part[t * stride];
    for (int off = 1; off < n; off <<= 1) {
        const int add = t >= off ? part[(t - off) * stride] : 0;
        barrier(CLK_LOCAL_MEM_FENCE);
        part[t * stride] += add;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const int total = part[(n - 1) * stride];
    barrier(CLK_LOCAL_MEM_FENCE);
    part[t * stride] -= mine;    // inclusive -> exclusive
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

// The selected columns of each row of a bool mask (dx's lists): a work-group per row, its
// ROW_WG items each count a contiguous piece of the row, a scan gives each piece its
// place in the list, and a second pass writes the columns there.
__kernel __attribute__((reqd_work_group_size(${ROW_WG}, 1, 1)))
void pscl_rows_scan(${ARGS["pscl_rows_scan"]})
{
    __local int part[${ROW_WG}];
    const int i = get_group_id(0);
    const int t = get_local_id(0);
    const int per = (N + ${ROW_WG} - 1) / ${ROW_WG};
    const int j0 = min(N, t * per), j1 = min(N, j0 + per);
    const __global uchar *m = mask + mask_off + (long)i * N;
    int n = 0;
    for (int j = j0; j < j1; ++j)
        n += m[j] != 0;
    part[t] = n;
    barrier(CLK_LOCAL_MEM_FENCE);
    const int total = pscl_scan_local(part, t, ${ROW_WG}, 1);
    if (t == 0)
        counts[i] = total;
    __global int *c = cols + (long)i * N + part[t];
    for (int j = j0; j < j1; ++j)
        if (m[j])
            *c++ = j;
}

// The rows that select each column, with their dy values (dw's lists), from a bool mask
// (dy (M, N)) or a slot map (dy compact, (M, dy_cols)).  A work-group takes COLS
// neighbouring columns (each row's piece of the mask is one coalesced read) and SEGS
// segments of the rows: an item counts its column's selections in its segment, a scan
// over the segments places them, and a second pass writes (row, dy) pairs in row order.
% for form in ("bool", "slot"):
<%  sel_t = "uchar" if form == "bool" else "int" %>\
__kernel __attribute__((reqd_work_group_size(${COLS}, ${SEGS}, 1)))
void pscl_cols_scan_${form}(${ARGS["pscl_cols_scan_" + form]})
{
    __local int part[${SEGS} * ${COLS}];
    const int c = get_local_id(0), s = get_local_id(1);
    const int j = get_group_id(0) * ${COLS} + c;
    const int seg = (M + ${SEGS} - 1) / ${SEGS};
    const int i0 = min(M, s * seg), i1 = min(M, i0 + seg);
    const int in_range = j < N;
    const __global ${sel_t} *e = sel + sel_off + j;
    int n = 0;
    if (in_range)
        for (int i = i0; i < i1; ++i)
%   if form == "bool":
            n += e[(long)i * N] != 0;
%   else:
            n += e[(long)i * N] >= 0;
%   endif
    part[s * ${COLS} + c] = n;
    barrier(CLK_LOCAL_MEM_FENCE);
    const int total = pscl_scan_local(part + c, s, ${SEGS}, ${COLS});
    if (!in_range)
        return;
    if (s == 0)
        counts[j] = total;
    // (row, dy) pairs are stored with vstore2, not as int2 literals: common.cl.mako, 4.
    __global int *ri = (__global int *)(rows + (long)j * M);
    int o = part[s * ${COLS} + c];
    for (int i = i0; i < i1; ++i) {
        const ${sel_t} v = e[(long)i * N];
%   if form == "bool":
        if (v != 0)
            vstore2((int2)(i, as_int(dy[dy_off + (long)i * dy_cols + j])), o++, ri);
%   else:
        if (v >= 0)
            vstore2((int2)(i, as_int(dy[dy_off + (long)i * dy_cols + v])), o++, ri);
%   endif
    }
}
% endfor
</%def>
