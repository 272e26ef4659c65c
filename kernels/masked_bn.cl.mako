## DSG's double-mask selection for BatchNorm: out = mask * BN(ReLU(y)), with the layer
## ordered CONV/FC -> ReLU -> BN and the same mask applied again after BN (Liu et al.).
##
## y is viewed as (outer, C, inner): an FC output (M, C) has inner = 1 and its channels
## run along rows (CHANNEL_LAST: vectors over channels); a conv output (N, C, H, W) has
## inner = H*W (vectors over pixels, one channel per row of the view).
##
##   KIND == "apply"  out = mask ? ReLU(y) * scale[c] + shift[c] : 0, with
##                    scale = gamma / sqrt(var + eps) and shift = beta - mean * scale.
##   KIND == "stats"  per channel, over the selected entries only: the mean and the biased
##                    variance of ReLU(y), in two passes (mean, then centred squares, for
##                    accuracy).  A channel with no selected entry gets 0 and 0.
##
## Unselected entries are never read into the arithmetic (select, not multiply), so they
## come out as exact zeros even where y holds Inf or NaN.  ReLU keeps NaN (as torch does).
## No local memory and no barriers (PoCL runs a work-group as a loop over its items).
<%namespace name="common" file="common.cl.mako"/>\
${common.vector_helpers("pscl_floatv", "float", VEC)}
<% int_v = "int" if VEC == 1 else "int%d" % VEC %>\
// Tile parameters: declared once, in pysparsecl/families/masked_bn.py.
#define PSCL_VEC ${VEC}
typedef ${int_v} pscl_intv;

// VEC mask bytes as lanes of -1 (selected) or 0, what select() reads.
inline pscl_intv pscl_load_mask(const __global uchar *m)
{
% if VEC == 1:
    return m[0] ? -1 : 0;
% else:
    return convert_int${VEC}(vload${VEC}(0, m)) != (pscl_intv)(0);
% endif
}

// ReLU that keeps NaN: max(v, 0) except that NaN stays NaN.
inline pscl_floatv pscl_relu(const pscl_floatv v)
{
    return select(v, (pscl_floatv)(0.0f), ${"-(pscl_intv)" if VEC == 1 else "(pscl_intv)"}(v < 0.0f));
}

inline float pscl_relu1(const float v)
{
    return v < 0.0f ? 0.0f : v;
}

inline float pscl_hsum(const pscl_floatv v)
{
% if VEC == 1:
    return v;
% else:
    float total = 0.0f;
%   for e in range(VEC):
    total += ${common.component("v", VEC, e)};
%   endfor
    return total;
% endif
}

% if KIND == "apply":
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_bn_apply(${ARGS["pscl_masked_bn_apply"]})
{
    // Work-item (vector chunk of a row of the view, row).
    const int row = get_global_id(1);
    const int p0 = get_global_id(0) * PSCL_VEC;
    if (row >= n_rows || p0 >= row_len)
        return;
    const long base = (long)row * row_len + p0;
    const __global float *yr = y + y_off + base;
    const __global uchar *mr = mask + mask_off + base;
    __global float *o = out + out_off + base;
% if CHANNEL_LAST:
    // Channels p0 .. p0 + VEC - 1 (row_len == C).
    if (p0 + PSCL_VEC <= row_len) {
        const pscl_floatv scale = PSCL_LOAD_pscl_floatv(0, gamma + p0)
            * rsqrt(PSCL_LOAD_pscl_floatv(0, var + p0) + eps);
        const pscl_floatv shift = PSCL_LOAD_pscl_floatv(0, beta + p0)
            - PSCL_LOAD_pscl_floatv(0, mean + p0) * scale;
        const pscl_floatv v = fma(pscl_relu(PSCL_LOAD_pscl_floatv(0, yr)), scale, shift);
        PSCL_STORE_pscl_floatv(select((pscl_floatv)(0.0f), v, pscl_load_mask(mr)), 0, o);
        return;
    }
    for (int e = 0; e < row_len - p0; ++e) {
        const int c = p0 + e;
        const float scale = gamma[c] * rsqrt(var[c] + eps);
        o[e] = mr[e] ? fma(pscl_relu1(yr[e]), scale, beta[c] - mean[c] * scale) : 0.0f;
    }
% else:
    // One channel per row of the view: rows are (n, c).
    const int c = row % C;
    const float scale = gamma[c] * rsqrt(var[c] + eps);
    const float shift = beta[c] - mean[c] * scale;
    if (p0 + PSCL_VEC <= row_len) {
        const pscl_floatv v = fma(pscl_relu(PSCL_LOAD_pscl_floatv(0, yr)),
                                  (pscl_floatv)(scale), (pscl_floatv)(shift));
        PSCL_STORE_pscl_floatv(select((pscl_floatv)(0.0f), v, pscl_load_mask(mr)), 0, o);
        return;
    }
    for (int e = 0; e < row_len - p0; ++e)
        o[e] = mr[e] ? fma(pscl_relu1(yr[e]), scale, shift) : 0.0f;
% endif
}
% endif

% if KIND == "stats":
## The ReLU of the vector at `off` where selected, 0 elsewhere (`v`), and 1/0 (`one`).
<%def name="load_pair(off)">
            const pscl_intv sel = pscl_load_mask(mask + mask_off + (${off}));
            const pscl_floatv v = select((pscl_floatv)(0.0f),
                pscl_relu(PSCL_LOAD_pscl_floatv(0, y + y_off + (${off}))), sel);
            const pscl_floatv one = select((pscl_floatv)(0.0f), (pscl_floatv)(1.0f), sel);
</%def>
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_bn_stats(${ARGS["pscl_masked_bn_stats"]})
{
% if CHANNEL_LAST:
    // Work-item: VEC neighbouring channels (one per lane), down the outer rows.
    const int c0 = get_global_id(0) * PSCL_VEC;
    if (c0 >= C)
        return;
    if (c0 + PSCL_VEC <= C) {
        pscl_floatv sum = (pscl_floatv)(0.0f), cnt = (pscl_floatv)(0.0f);
        for (int n = 0; n < outer; ++n) {
            ${load_pair("(long)n * C + c0")}
            sum += v;
            cnt += one;
        }
        const pscl_floatv mu = sum / fmax(cnt, 1.0f);
        pscl_floatv sq = (pscl_floatv)(0.0f);
        for (int n = 0; n < outer; ++n) {
            ${load_pair("(long)n * C + c0")}
            const pscl_floatv dev = (v - mu) * one;
            sq = fma(dev, dev, sq);
        }
        PSCL_STORE_pscl_floatv(mu, 0, mean + c0);
        PSCL_STORE_pscl_floatv(sq / fmax(cnt, 1.0f), 0, var + c0);
        return;
    }
    for (int c = c0; c < C; ++c) {
        float sum = 0.0f, cnt = 0.0f;
        for (int n = 0; n < outer; ++n) {
            const long e = (long)n * C + c;
            if (mask[mask_off + e]) {
                sum += pscl_relu1(y[y_off + e]);
                cnt += 1.0f;
            }
        }
        const float mu = sum / fmax(cnt, 1.0f);
        float sq = 0.0f;
        for (int n = 0; n < outer; ++n) {
            const long e = (long)n * C + c;
            if (mask[mask_off + e]) {
                const float dev = pscl_relu1(y[y_off + e]) - mu;
                sq = fma(dev, dev, sq);
            }
        }
        mean[c] = mu;
        var[c] = sq / fmax(cnt, 1.0f);
    }
% else:
    // Work-item: one channel, over every image's plane (VEC lanes of partial sums, added
    // into the total once per plane: rounding error grows with the plane, not the batch).
    const int c = get_global_id(0);
    if (c >= C)
        return;
    const int whole = inner / PSCL_VEC * PSCL_VEC;
    float sum = 0.0f, cnt = 0.0f;
    for (int n = 0; n < outer; ++n) {
        const long base = ((long)n * C + c) * inner;
        pscl_floatv s = (pscl_floatv)(0.0f), k = (pscl_floatv)(0.0f);
        for (int p = 0; p < whole; p += PSCL_VEC) {
            ${load_pair("base + p")}
            s += v;
            k += one;
        }
        for (int p = whole; p < inner; ++p) {
            if (mask[mask_off + base + p]) {
                sum += pscl_relu1(y[y_off + base + p]);
                cnt += 1.0f;
            }
        }
        sum += pscl_hsum(s);
        cnt += pscl_hsum(k);
    }
    const float mu = sum / fmax(cnt, 1.0f);
    float sq = 0.0f;
    for (int n = 0; n < outer; ++n) {
        const long base = ((long)n * C + c) * inner;
        pscl_floatv s = (pscl_floatv)(0.0f);
        for (int p = 0; p < whole; p += PSCL_VEC) {
            ${load_pair("base + p")}
            const pscl_floatv dev = (v - mu) * one;
            s = fma(dev, dev, s);
        }
        for (int p = whole; p < inner; ++p) {
            if (mask[mask_off + base + p]) {
                const float dev = pscl_relu1(y[y_off + base + p]) - mu;
                sq = fma(dev, dev, sq);
            }
        }
        sq += pscl_hsum(s);
    }
    mean[c] = mu;
    var[c] = sq / fmax(cnt, 1.0f);
% endif
}
% endif

% if KIND == "grad_stats":
## Backward, first pass: per channel, over the selected entries, dbeta = sum(dout) and
## dgamma = sum(dout * xhat), with xhat = (ReLU(y) - mean) / sqrt(var + eps); and the
## two per-channel terms the apply pass subtracts: coef = (dbeta / n | dgamma / n), (2C,), with n
## the channel's selected count when the statistics were the batch's (0, 0 otherwise).
<%def name="load_grad(off)">
            const pscl_intv sel = pscl_load_mask(mask + mask_off + (${off}));
            const pscl_floatv xh = (pscl_relu(PSCL_LOAD_pscl_floatv(0, y + y_off + (${off})))
                                    - mu) * inv;
            const pscl_floatv g = select((pscl_floatv)(0.0f),
                PSCL_LOAD_pscl_floatv(0, dout + dout_off + (${off})), sel);
            const pscl_floatv one = select((pscl_floatv)(0.0f), (pscl_floatv)(1.0f), sel);
</%def>
<%def name="finish(c, db, dg, cnt)">
        dbeta[dbeta_off + (${c})] = ${db};
        dgamma[dgamma_off + (${c})] = ${dg};
        coef[${c}] = batch_stats ? ${db} / fmax(${cnt}, 1.0f) : 0.0f;
        coef[C + (${c})] = batch_stats ? ${dg} / fmax(${cnt}, 1.0f) : 0.0f;
</%def>
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_bn_grad_stats(${ARGS["pscl_masked_bn_grad_stats"]})
{
% if CHANNEL_LAST:
    // Work-item: VEC neighbouring channels (one per lane), down the outer rows.
    const int c0 = get_global_id(0) * PSCL_VEC;
    if (c0 >= C)
        return;
    if (c0 + PSCL_VEC <= C) {
        const pscl_floatv mu = PSCL_LOAD_pscl_floatv(0, mean + c0);
        const pscl_floatv inv = rsqrt(PSCL_LOAD_pscl_floatv(0, var + c0) + eps);
        pscl_floatv db = (pscl_floatv)(0.0f), dg = (pscl_floatv)(0.0f);
        pscl_floatv cnt = (pscl_floatv)(0.0f);
        for (int n = 0; n < outer; ++n) {
            ${load_grad("(long)n * C + c0")}
            db += g;
            dg = fma(g, select((pscl_floatv)(0.0f), xh, sel), dg);
            cnt += one;
        }
%   for e in range(VEC):
        ${finish("c0 + %d" % e, capture(common.component, "db", VEC, e),
                 capture(common.component, "dg", VEC, e), capture(common.component, "cnt", VEC, e))}
%   endfor
        return;
    }
    for (int c = c0; c < C; ++c) {
        const float mu = mean[c], inv = rsqrt(var[c] + eps);
        float db = 0.0f, dg = 0.0f, cnt = 0.0f;
        for (int n = 0; n < outer; ++n) {
            const long e = (long)n * C + c;
            if (mask[mask_off + e]) {
                const float g = dout[dout_off + e];
                db += g;
                dg = fma(g, (pscl_relu1(y[y_off + e]) - mu) * inv, dg);
                cnt += 1.0f;
            }
        }
        ${finish("c", "db", "dg", "cnt")}
    }
% else:
    // Work-item: one channel, over every image's plane (VEC lanes of partial sums).
    const int c = get_global_id(0);
    if (c >= C)
        return;
    const int whole = inner / PSCL_VEC * PSCL_VEC;
    const float mu1 = mean[c], inv1 = rsqrt(var[c] + eps);
    const pscl_floatv mu = (pscl_floatv)(mu1), inv = (pscl_floatv)(inv1);
    float db = 0.0f, dg = 0.0f, cnt = 0.0f;
    for (int n = 0; n < outer; ++n) {
        const long base = ((long)n * C + c) * inner;
        pscl_floatv sdb = (pscl_floatv)(0.0f), sdg = (pscl_floatv)(0.0f);
        pscl_floatv k = (pscl_floatv)(0.0f);
        for (int p = 0; p < whole; p += PSCL_VEC) {
            ${load_grad("base + p")}
            sdb += g;
            sdg = fma(g, select((pscl_floatv)(0.0f), xh, sel), sdg);
            k += one;
        }
        for (int p = whole; p < inner; ++p) {
            if (mask[mask_off + base + p]) {
                const float g = dout[dout_off + base + p];
                db += g;
                dg = fma(g, (pscl_relu1(y[y_off + base + p]) - mu1) * inv1, dg);
                cnt += 1.0f;
            }
        }
        db += pscl_hsum(sdb);
        dg += pscl_hsum(sdg);
        cnt += pscl_hsum(k);
    }
    ${finish("c", "db", "dg", "cnt")}
% endif
}
% endif

% if KIND == "grad_apply":
## Backward, second pass: dy = gamma / sqrt(var + eps) * (dout - coef0 - xhat * coef1) where
## selected and y > 0 (the ReLU's gradient, 0 at y == 0 as torch's), exact 0 elsewhere.
__kernel __attribute__((reqd_work_group_size(${WG}, 1, 1)))
void pscl_masked_bn_grad_apply(${ARGS["pscl_masked_bn_grad_apply"]})
{
    const int row = get_global_id(1);
    const int p0 = get_global_id(0) * PSCL_VEC;
    if (row >= n_rows || p0 >= row_len)
        return;
    const long base = (long)row * row_len + p0;
    const __global float *yr = y + y_off + base;
    const __global float *gr = dout + dout_off + base;
    const __global uchar *mr = mask + mask_off + base;
    __global float *o = dy + dy_off + base;
% if CHANNEL_LAST:
    if (p0 + PSCL_VEC <= row_len) {
        const pscl_floatv inv = rsqrt(PSCL_LOAD_pscl_floatv(0, var + p0) + eps);
        const pscl_floatv scale = PSCL_LOAD_pscl_floatv(0, gamma + p0) * inv;
        const pscl_floatv mu = PSCL_LOAD_pscl_floatv(0, mean + p0);
        const pscl_floatv c0 = PSCL_LOAD_pscl_floatv(0, coef + p0);
        const pscl_floatv c1 = PSCL_LOAD_pscl_floatv(0, coef + C + p0);
        const pscl_floatv v = PSCL_LOAD_pscl_floatv(0, yr);
        const pscl_floatv d = scale * (PSCL_LOAD_pscl_floatv(0, gr) - c0 - (v - mu) * inv * c1);
        const pscl_intv on = pscl_load_mask(mr) & ${"-(pscl_intv)" if VEC == 1 else "(pscl_intv)"}(v > 0.0f);
        PSCL_STORE_pscl_floatv(select((pscl_floatv)(0.0f), d, on), 0, o);
        return;
    }
    for (int e = 0; e < row_len - p0; ++e) {
        const int c = p0 + e;
        const float inv = rsqrt(var[c] + eps);
        const float v = yr[e];
        o[e] = (mr[e] && v > 0.0f) ? gamma[c] * inv * (gr[e] - coef[c]
                                                       - (v - mean[c]) * inv * coef[C + c])
                                   : 0.0f;
    }
% else:
    const int c = row % C;
    const float inv1 = rsqrt(var[c] + eps);
    const float scale1 = gamma[c] * inv1, mu1 = mean[c];
    const float c0 = coef[c], c1 = coef[C + c];
    if (p0 + PSCL_VEC <= row_len) {
        const pscl_floatv v = PSCL_LOAD_pscl_floatv(0, yr);
        const pscl_floatv d = (pscl_floatv)(scale1) * (PSCL_LOAD_pscl_floatv(0, gr)
            - (pscl_floatv)(c0) - (v - (pscl_floatv)(mu1)) * (pscl_floatv)(inv1 * c1));
        const pscl_intv on = pscl_load_mask(mr) & ${"-(pscl_intv)" if VEC == 1 else "(pscl_intv)"}(v > 0.0f);
        PSCL_STORE_pscl_floatv(select((pscl_floatv)(0.0f), d, on), 0, o);
        return;
    }
    for (int e = 0; e < row_len - p0; ++e) {
        const float v = yr[e];
        o[e] = (mr[e] && v > 0.0f) ? scale1 * (gr[e] - c0 - (v - mu1) * inv1 * c1) : 0.0f;
    }
% endif
}
% endif
