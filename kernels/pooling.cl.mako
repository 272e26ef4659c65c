## 2-D max and average pooling of NCHW float32 planes, forward and backward
## (pysparsecl/families/pooling.py), with torch.nn.functional's semantics: floor-mode
## output size, dilation 1, padding <= kernel / 2, so that every window holds at least one
## cell of the input plane.
##
##   KIND == "max"       a work-item per RUN consecutive outputs of one output row: the
##                       window's maximum over its in-bounds cells (padding never wins).  A
##                       NaN wins, and a later NaN replaces an earlier one; ties go to the
##                       first cell in row-major scan order (both as torch on the CPU).
##                       INDICES: also the winner's flat index h * W + w in its plane.
##   KIND == "avg"       the same tiling: the sum over the window's in-bounds cells, divided
##                       by KH * KW (COUNT_PAD) or by the number of in-bounds cells.
##   KIND == "max_grad"  a gather, a work-item per RUN consecutive inputs of one input row:
##                       the sum of dy over the windows that cover the input and whose index
##                       names it, in the windows' row-major order (the order in which
##                       torch's CPU scatter adds them).  No atomics: the same sum on every
##                       run.  An index outside its own window routes nothing.
##   KIND == "avg_grad"  the same gather: the sum of dy / divisor over the covering windows.
##
## The grid is flat: item i covers cells [col0, col0 + RUN) of row i / row_chunks of a
## (rows, row length) view, rows being (plane, output row) forward and (plane, input row)
## backward.  Every array has fewer than 2^31 elements (the op checks): int indices.
// Tile parameters: declared once, in pysparsecl/families/pooling.py.
#define PSCL_WG ${WG}
#define PSCL_RUN ${RUN}

## The item's row, its plane, its row within the plane (`row_in_plane`) and its first
## column `col0`; items past the end return.  (Remainders are written as x - (x / y) * y:
## see common.cl.mako on Oclgrind.)
<%def name="locate(rows_per_plane, row_in_plane)">
    if (get_global_id(0) >= (size_t)n_items)   // (the rounded-up grid may pass 2^31)
        return;
    const int item = get_global_id(0);
    const int row = item / row_chunks;
    const int col0 = (item - row * row_chunks) * PSCL_RUN;
    const int plane = row / ${rows_per_plane};
    const int ${row_in_plane} = row - plane * ${rows_per_plane};
</%def>

% if KIND in ("max", "avg"):
__kernel __attribute__((reqd_work_group_size(PSCL_WG, 1, 1)))
void pscl_${KIND}_pool(${ARGS["pscl_%s_pool" % KIND]})
{
${locate("OH", "oh")}
    // The window's rows inside the plane; padded cells take no part.
    const int h0 = oh * SH - PH;
    const int h_lo = max(h0, 0);
    const int h_hi = min(h0 + KH, H);
    const __global float *src = x + x_off + plane * H * W;
    const int out_row = row * OW;
    const int n_run = min(PSCL_RUN, OW - col0);
    for (int r = 0; r < n_run; ++r) {
        const int ow = col0 + r;
        const int w0 = ow * SW - PW;
        const int w_lo = max(w0, 0);
        const int w_hi = min(w0 + KW, W);
%   if KIND == "max":
        float best = -INFINITY;
        int best_at = h_lo * W + w_lo;      // an all -inf window: its first cell, as torch
        for (int ih = h_lo; ih < h_hi; ++ih) {
            for (int iw = w_lo; iw < w_hi; ++iw) {
                const float v = src[ih * W + iw];
                // Selects, not a branch: the loop stays vectorisable across work-items.
                const bool wins = v > best || isnan(v);
                best = wins ? v : best;
                best_at = wins ? ih * W + iw : best_at;
            }
        }
        y[y_off + out_row + ow] = best;
%     if INDICES:
        idx[idx_off + out_row + ow] = best_at;
%     endif
%   else:
        float total = 0.0f;
        for (int ih = h_lo; ih < h_hi; ++ih)
            for (int iw = w_lo; iw < w_hi; ++iw)
                total += src[ih * W + iw];
%     if COUNT_PAD:
        // Floor mode keeps every window inside the padded plane: all its cells count.
        const int divisor = KH * KW;
%     else:
        const int divisor = (h_hi - h_lo) * (w_hi - w_lo);
%     endif
        y[y_off + out_row + ow] = total / (float)divisor;
%   endif
    }
}
% else:
// The first window (output row or column) that reaches index `at` of the input: window o
// covers [o * stride - pad, o * stride - pad + k), so o >= (at + pad - k + 1) / stride,
// rounded up; `reach` is at + pad - k + 1.
inline int pscl_first_window(const int reach, const int stride)
{
    return reach <= 0 ? 0 : (reach + stride - 1) / stride;
}

__kernel __attribute__((reqd_work_group_size(PSCL_WG, 1, 1)))
void pscl_${KIND}(${ARGS["pscl_%s" % KIND]})
{
${locate("H", "ih")}
    const int oh_lo = pscl_first_window(ih + PH - KH + 1, SH);
    const int oh_hi = min((ih + PH) / SH, OH - 1);
    const __global float *grad = dy + dy_off + plane * OH * OW;
%   if KIND == "max_grad":
    const __global int *winner = idx + idx_off + plane * OH * OW;
%   endif
    const int in_row = row * W;
    const int n_run = min(PSCL_RUN, W - col0);
    for (int r = 0; r < n_run; ++r) {
        const int iw = col0 + r;
        const int ow_lo = pscl_first_window(iw + PW - KW + 1, SW);
        const int ow_hi = min((iw + PW) / SW, OW - 1);
        float total = 0.0f;
%   if KIND == "max_grad":
        const int me = ih * W + iw;
        // A select, not a branch (vectorisable); adding 0 leaves the sum as it was.
        for (int oh = oh_lo; oh <= oh_hi; ++oh)
            for (int ow = ow_lo; ow <= ow_hi; ++ow)
                total += winner[oh * OW + ow] == me ? grad[oh * OW + ow] : 0.0f;
%   else:
        for (int oh = oh_lo; oh <= oh_hi; ++oh) {
%     if COUNT_PAD:
            const int rows_in = KH;
%     else:
            const int h0 = oh * SH - PH;
            const int rows_in = min(h0 + KH, H) - max(h0, 0);
%     endif
            for (int ow = ow_lo; ow <= ow_hi; ++ow) {
%     if COUNT_PAD:
                const int cols_in = KW;
%     else:
                const int w0 = ow * SW - PW;
                const int cols_in = min(w0 + KW, W) - max(w0, 0);
%     endif
                // dy / divisor per window, then summed: torch's order and rounding.
                total += grad[oh * OW + ow] / (float)(rows_in * cols_in);
            }
        }
%   endif
        dx[dx_off + in_row + iw] = total;
    }
}
% endif
