## The small kernels of a training step (pysparsecl/families/training.py): the loss and
## its gradient, the bias gradients, and the parameter update.  Each is one pass over
## memory; WG, the work-group size, is their one tile parameter.
##
##   KIND == "xent"    softmax cross-entropy, forward and backward together: a work-group
##                     per row of the (M, N) logits.  It writes the row's loss, and the
##                     gradient  scale * (softmax(row) - onehot(label))  in place of nothing
##                     else: the logits are read, never written.  A label outside [0, N)
##                     gives the row a NaN loss and gradient, and lowers bad[0] to the row.
##   KIND == "colsum"  out[j] = scale * sum_i a[i, j] over an (M, N) array: a work-item per
##                     column, adjacent columns in adjacent work-items (bias gradients; with
##                     N = 1, the batch's loss from the rows' losses).
##   KIND == "chansum" out[c] = scale * sum_{n,p} a[n, c, p] over an (N, C, P) array: a
##                     work-item per channel, planes read in order (a convolution's bias
##                     gradient).
##   KIND == "random_keys"  a uniform 32-bit key per entry of an (M, N) array, a hash of
##                     (seed, row, column): the search's top-k then keeps n_keep random
##                     columns per row (DSG's random-mask control, on the device).
##   KIND == "sgd"     one SGD step over flat arrays, every parameter of a model at once:
##                     g' = g + weight_decay * p;  v = momentum * v + g';  p -= lr * v
##                     (HAS_VELOCITY == 0: p -= lr * g'), 4 elements per work-item.
// Tile parameters: declared once, in pysparsecl/families/training.py.
#define PSCL_WG ${WG}

% if KIND == "xent":
// Reduces v over the work-group with op (max or +); every work-item gets the result.
#define PSCL_GROUP_REDUCE(red, v, op)                                 \
    red[lid] = v;                                                     \
    barrier(CLK_LOCAL_MEM_FENCE);                                     \
    for (int span = PSCL_WG / 2; span > 0; span >>= 1) {              \
        if (lid < span)                                               \
            red[lid] = op(red[lid], red[lid + span]);                 \
        barrier(CLK_LOCAL_MEM_FENCE);                                 \
    }                                                                 \
    v = red[0];                                                       \
    barrier(CLK_LOCAL_MEM_FENCE);

#define PSCL_ADD(a, b) ((a) + (b))

__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_softmax_xent(${ARGS["pscl_softmax_xent"]})
{
    __local float red[PSCL_WG];
    const int lid = get_local_id(0);
    const long row = get_group_id(0);
    const __global float *x = logits + logits_off + row * N;
    __global float *g = grad + grad_off + row * N;
    const int label = labels[labels_off + row];
    const bool valid = label >= 0 && label < N;

    float peak = -INFINITY;
    for (int j = lid; j < N; j += PSCL_WG)
        peak = fmax(peak, x[j]);
    PSCL_GROUP_REDUCE(red, peak, fmax)
    // A row of -inf logits (or NaN) has no finite peak: it gives a NaN loss, as torch.
    float total = 0.0f;
    for (int j = lid; j < N; j += PSCL_WG)
        total += exp(x[j] - peak);
    PSCL_GROUP_REDUCE(red, total, PSCL_ADD)
    const float inv_total = 1.0f / total;
    for (int j = lid; j < N; j += PSCL_WG) {
        const float p = exp(x[j] - peak) * inv_total;
        g[j] = valid ? scale * (p - (j == label ? 1.0f : 0.0f)) : NAN;
    }
    if (lid == 0) {
        row_loss[row] = valid ? log(total) + peak - x[label] : NAN;
        if (!valid)
            atomic_min(&bad[0], (int)row);
    }
}
% elif KIND == "colsum":
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_column_sums(${ARGS["pscl_column_sums"]})
{
    // A work-item sums 4 neighbouring columns with vector loads (a scalar column per
    // work-item ran at a tenth of the memory's speed on PoCL); the last holds the tail.
    const int j = 4 * get_global_id(0);
    if (j >= N)
        return;
    const __global float *col = a + a_off + j;
    if (j + 4 <= N) {
        float4 total = (float4)(0.0f);
        for (long i = 0; i < M; ++i)
            total += vload4(0, col + i * lda);
        vstore4(scale * total, 0, out + out_off + j);
        return;
    }
    for (int e = 0; e < N - j; ++e) {
        float total = 0.0f;
        for (long i = 0; i < M; ++i)
            total += col[i * lda + e];
        out[out_off + j + e] = scale * total;
    }
}
% elif KIND == "chansum":
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_channel_sums(${ARGS["pscl_channel_sums"]})
{
    const int c = get_global_id(0);
    if (c >= C)
        return;
    float total = 0.0f;
    for (long n = 0; n < N; ++n) {
        // A plane's partial sum first: rounding grows with the plane, not the batch.
        const __global float *plane = a + a_off + (n * C + c) * P;
        float part = 0.0f;
        for (long p = 0; p < P; ++p)
            part += plane[p];
        total += part;
    }
    out[out_off + c] = scale * total;
}
% elif KIND == "random_keys":
// A 32-bit key per (row, column), a hash of (seed, row, column): uniform, independent
// across entries, the same for the same seed on every device.  The search's top-k keeps
// each row's n_keep largest keys: n_keep columns uniformly at random.
inline uint pscl_mix(uint h)
{
    // Murmur3's finaliser: every input bit reaches every output bit.
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_random_keys(${ARGS["pscl_random_keys"]})
{
    const int j = get_global_id(0);
    const int row = get_global_id(1);
    if (j >= N)
        return;
    const uint h = pscl_mix(seed_lo ^ pscl_mix((uint)row * 0x9e3779b9u ^ seed_hi));
    keys[(long)row * ldk + j] = pscl_mix(h ^ pscl_mix((uint)j + 0x7f4a7c15u));
}
% elif KIND == "sgd":
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_sgd(${ARGS["pscl_sgd"]})
{
    // 4 neighbouring elements per work-item, with vector loads.  (A grid-stride loop
    // ran 20x slower on PoCL: each work-item's loop strode across the whole array.)
    const long i = 4 * (long)get_global_id(0);
    if (i >= n)
        return;
    if (i + 4 <= n) {
        const float4 w = vload4(0, param + param_off + i);
        const float4 step = vload4(0, grad + grad_off + i) + weight_decay * w;
%   if HAS_VELOCITY:
        const float4 v = momentum * vload4(0, velocity + velocity_off + i) + step;
        vstore4(v, 0, velocity + velocity_off + i);
        vstore4(w - lr * v, 0, param + param_off + i);
%   else:
        vstore4(w - lr * step, 0, param + param_off + i);
%   endif
        return;
    }
    for (long e = i; e < n; ++e) {
        const float w = param[param_off + e];
        const float step = grad[grad_off + e] + weight_decay * w;
%   if HAS_VELOCITY:
        const float v = momentum * velocity[velocity_off + e] + step;
        velocity[velocity_off + e] = v;
        param[param_off + e] = w - lr * v;
%   else:
        param[param_off + e] = w - lr * step;
%   endif
    }
}
% endif
