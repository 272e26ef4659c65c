## Helper kernels of CompactRows (pysparsecl/families/compact_util.py; no tile
## parameters): the validation of the index rows, and the conversions to and from dense.
## A compact batch holds, per row i, n_keep values and their column indices, strictly
## ascending in [0, N): values (M, n_keep) float, idx (M, n_keep) int.
${util_kernels()}

<%def name="util_kernels()">
// A work-item per entry (s, i): an index outside [0, N) lowers bad[0] to its row, one
// not above its left neighbour (unsorted or repeated) lowers bad[1] (both start at
// INT_MAX).
__kernel void pscl_compact_check(${ARGS["pscl_compact_check"]})
{
    const int s = get_global_id(0);
    const int i = get_global_id(1);
    if (s >= n_keep || i >= M)
        return;
    const __global int *row = idx + idx_off + (long)i * n_keep;
    const int j = row[s];
    if ((uint)j >= (uint)N)
        atomic_min(&bad[0], i);
    else if (s > 0 && row[s - 1] >= j)
        atomic_min(&bad[1], i);
}

// values[i, s] = dense[i, idx[i, s]]; an index outside [0, N) gives NaN (only an
// unchecked batch can hold one).
__kernel void pscl_compact_gather(${ARGS["pscl_compact_gather"]})
{
    const int s = get_global_id(0);
    const int i = get_global_id(1);
    if (s >= n_keep || i >= M)
        return;
    const long e = (long)i * n_keep + s;
    const int j = idx[idx_off + e];
    values[values_off + e] = (uint)j < (uint)N ? dense[dense_off + (long)i * N + j] : NAN;
}

// dense[i, idx[i, s]] = values[i, s] into a zeroed dense (M, N), a work-group per row.
// An index outside [0, N) (only an unchecked batch holds one) is not written; its row gets
// a NaN at column 0 after the barrier, which orders it after the row's other values, so
// that every product over that row comes out NaN rather than silently without the entry.
__kernel __attribute__((reqd_work_group_size(${SCATTER_WG}, 1, 1)))
void pscl_compact_scatter(${ARGS["pscl_compact_scatter"]})
{
    __local int outside;
    const int i = get_group_id(0);
    const int lid = get_local_id(0);
    if (lid == 0)
        outside = 0;
    barrier(CLK_LOCAL_MEM_FENCE);
    const __global int *ix = idx + idx_off + (long)i * n_keep;
    const __global float *v = values + values_off + (long)i * n_keep;
    __global float *d = dense + dense_off + (long)i * N;
    for (int s = lid; s < n_keep; s += ${SCATTER_WG}) {
        const int j = ix[s];
        if ((uint)j < (uint)N)
            d[j] = v[s];
        else
            outside = 1;
    }
    barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);
    if (lid == 0 && outside && N > 0)
        d[0] = NAN;
}

// out[i, s] = act(values[i, s] + b[idx[i, s]]): a layer's bias on its compact output (act:
// ReLU or none, RELU an argument).  An index outside [0, N) gives NaN.
__kernel void pscl_compact_bias(${ARGS["pscl_compact_bias"]})
{
    const int s = get_global_id(0);
    const int i = get_global_id(1);
    if (s >= n_keep || i >= M)
        return;
    const long e = (long)i * n_keep + s;
    const int j = idx[idx_off + e];
    const float y = (uint)j < (uint)N ? values[values_off + e] + b[b_off + j] : NAN;
    out[out_off + e] = relu ? fmax(y, 0.0f) : y;
}
</%def>
