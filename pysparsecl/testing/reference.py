"""Independent float64 NumPy/SciPy references, one per op.

They share no code with the kernels or the op wrappers: each is written from the
op's mathematical definition (PyTorch's semantics where the op mirrors one).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv2d_reference(x, w, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                     groups=1) -> np.ndarray:
    """``torch.nn.functional.conv2d`` in float64: x (N, C, H, W), w (K, C/groups, R, S)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, _, _ = x.shape
    k, cg, r, s = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    # Windows of the dilated kernel's extent, then pick every dilation-th tap and stride.
    win = sliding_window_view(xp, ((r - 1) * dh + 1, (s - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]          # (N, C, OH, OW, R, S)
    kg = k // groups
    out = np.empty((n, k) + win.shape[2:4])
    for g in range(groups):
        xg = win[:, g * cg:(g + 1) * cg]
        wg = w[g * kg:(g + 1) * kg]
        out[:, g * kg:(g + 1) * kg] = np.einsum("ncyxrs,kcrs->nkyx", xg, wg, optimize=True)
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    return out


def conv2d_epilogue_reference(y, residual=None, relu: bool = False) -> np.ndarray:
    """conv2d_sparse's fused epilogue on a float64 convolution ``y`` (bias included):
    ``relu(y + residual)``, each part optional."""
    y = np.asarray(y, np.float64)
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    return np.maximum(y, 0.0) if relu else y


def relative_error(result, reference) -> float:
    """‖result − reference‖ / ‖reference‖ (norm-wise; 0/0 counts as 0)."""
    result = np.asarray(result, np.float64)
    reference = np.asarray(reference, np.float64)
    denom = np.linalg.norm(reference)
    diff = np.linalg.norm(result - reference)
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def central_difference(loss, a, step: float) -> np.ndarray:
    """The gradient of the scalar ``loss`` at ``a`` by central differences, in float64:
    ``(loss(a + step e_i) - loss(a - step e_i)) / (2 step)`` for every entry i, an
    independent check of a kernel's gradient (``loss`` is built on a float64 forward)."""
    a = np.asarray(a, np.float64)
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        up, down = a.copy(), a.copy()
        up[i] += step
        down[i] -= step
        grad[i] = (loss(up) - loss(down)) / (2 * step)
    return grad


# ---------------------------------------------------------------------------------------------
# 2-D pooling: torch.nn.functional's max_pool2d and avg_pool2d (floor mode, dilation 1)

def _pair(value):
    return (value, value) if np.isscalar(value) else tuple(value)


def _pool_windows(in_hw, kernel_size, stride, padding):
    """The output plane's size, and each window as (oh, ow, rows, cols): the ranges of its
    rows and columns that lie inside the (H, W) input plane."""
    (h, w), (kh, kw), (ph, pw) = in_hw, _pair(kernel_size), _pair(padding)
    sh, sw = _pair(kernel_size if stride is None else stride)
    out_hw = ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    windows = []
    for i in range(out_hw[0]):
        top = i * sh - ph
        for j in range(out_hw[1]):
            left = j * sw - pw
            windows.append((i, j, range(max(top, 0), min(top + kh, h)),
                            range(max(left, 0), min(left + kw, w))))
    return out_hw, windows


def max_pool2d_reference(x, kernel_size, stride=None, padding=0):
    """(maxima in float64, int64 flat indices h * W + w of the winners) of x (N, C, H, W).
    Padded cells never win; a NaN wins, the last NaN in row-major order giving the index;
    otherwise the first maximum in row-major order (torch on the CPU)."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    out_hw, windows = _pool_windows((h, w), kernel_size, stride, padding)
    out = np.empty((n, c) + out_hw)
    idx = np.empty((n, c) + out_hw, np.int64)
    for i, j, rows, cols in windows:
        cells = x[:, :, rows.start:rows.stop, cols.start:cols.stop].reshape(n, c, -1)
        where = (np.asarray(rows)[:, None] * w + np.asarray(cols)[None, :]).ravel()
        nan = np.isnan(cells)
        first_max = np.argmax(np.where(nan, -np.inf, cells), axis=-1)
        last_nan = cells.shape[-1] - 1 - np.argmax(nan[..., ::-1], axis=-1)
        pick = np.where(nan.any(axis=-1), last_nan, first_max)
        out[:, :, i, j] = np.take_along_axis(cells, pick[..., None], axis=-1)[..., 0]
        idx[:, :, i, j] = where[pick]
    return out, idx


def max_pool2d_backward_reference(dy, indices, input_shape) -> np.ndarray:
    """dx (N, C, H, W) in float64: each dy entry added at its index in its plane."""
    n, c, h, w = input_shape
    dx = np.zeros((n * c, h * w))
    planes = np.arange(n * c)[:, None]
    np.add.at(dx, (planes, np.asarray(indices, np.int64).reshape(n * c, -1)),
              np.asarray(dy, np.float64).reshape(n * c, -1))
    return dx.reshape(n, c, h, w)


def _divisor(rows, cols, kernel_size, count_include_pad) -> int:
    kh, kw = _pair(kernel_size)
    return kh * kw if count_include_pad else len(rows) * len(cols)


def avg_pool2d_reference(x, kernel_size, stride=None, padding=0,
                         count_include_pad=True) -> np.ndarray:
    """Window means of x (N, C, H, W) in float64: the in-bounds cells' sum divided by
    kh * kw (``count_include_pad``) or by the number of in-bounds cells."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    out_hw, windows = _pool_windows((h, w), kernel_size, stride, padding)
    out = np.empty((n, c) + out_hw)
    for i, j, rows, cols in windows:
        total = x[:, :, rows.start:rows.stop, cols.start:cols.stop].sum(axis=(2, 3))
        out[:, :, i, j] = total / _divisor(rows, cols, kernel_size, count_include_pad)
    return out


def avg_pool2d_backward_reference(dy, input_shape, kernel_size, stride=None, padding=0,
                                  count_include_pad=True) -> np.ndarray:
    """dx (N, C, H, W) in float64: each window's dy / divisor added to its cells."""
    dy = np.asarray(dy, np.float64)
    n, c, h, w = input_shape
    _, windows = _pool_windows((h, w), kernel_size, stride, padding)
    dx = np.zeros((n, c, h, w))
    for i, j, rows, cols in windows:
        share = dy[:, :, i, j] / _divisor(rows, cols, kernel_size, count_include_pad)
        dx[:, :, rows.start:rows.stop, cols.start:cols.stop] += share[:, :, None, None]
    return dx


# ---------------------------------------------------------------------------------------------
# Elementwise ops: float64 for floating-point results, exact (wrapping) NumPy integer
# arithmetic in the result dtype for integer results.

def _elementwise_operands(dtype, *operands):
    work = np.float64 if np.issubdtype(np.dtype(dtype), np.floating) else np.dtype(dtype)
    with np.errstate(over="ignore"):
        return [np.asarray(x).astype(work) for x in operands]


def add_reference(a, b, dtype) -> np.ndarray:
    """``a + b`` broadcast, in float64 (floating ``dtype``) or wrapping ``dtype`` integers."""
    a, b = _elementwise_operands(dtype, a, b)
    return a + b


def mul_reference(a, b, dtype) -> np.ndarray:
    a, b = _elementwise_operands(dtype, a, b)
    return a * b


def axpby_reference(alpha, x, beta, y, dtype) -> np.ndarray:
    alpha, x, beta, y = _elementwise_operands(dtype, alpha, x, beta, y)
    return alpha * x + beta * y


def add_relu_reference(a, b, dtype) -> np.ndarray:
    """``max(a + b, 0)``, NaN propagating (``np.maximum``)."""
    s = add_reference(a, b, dtype)
    return np.maximum(s, np.zeros((), s.dtype))


# ---------------------------------------------------------------------------------------------
# DSG: output-masked products, dimension-reduction search, double-mask BatchNorm

def masked_dense(values, mask, n_cols) -> np.ndarray:
    """A (M, N) float64 array holding ``values`` at the selected entries, 0 elsewhere.

    ``mask`` is a bool (M, N) mask (``values`` is then (M, N)) or int32 (M, n_keep) column
    indices (``values`` is then the compact (M, n_keep) array, in the order of ``mask``).
    """
    values = np.asarray(values, np.float64)
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return np.where(mask, values, 0.0)
    dense = np.zeros((mask.shape[0], n_cols))
    np.put_along_axis(dense, mask.astype(np.int64), values, axis=1)
    return dense


def masked_matmul_reference(x, w, mask) -> np.ndarray:
    """``mask * (x @ w)`` in float64: dense (M, N) for a bool mask, compact (M, n_keep)
    (``(x @ w)[i, mask[i, s]]``) for int32 column indices; 1-D ``x`` gives 1-D results."""
    x = np.asarray(x, np.float64)
    mask = np.asarray(mask)
    y = np.atleast_2d(x) @ np.asarray(w, np.float64)
    m = np.atleast_2d(mask)
    out = np.where(m, y, 0.0) if m.dtype == np.bool_ else np.take_along_axis(
        y, m.astype(np.int64), axis=1)
    return out[0] if x.ndim == 1 else out


def masked_matmul_backward_reference(dy, x, w, mask):
    """(dx, dw) of ``y = mask * (x @ w)`` with the mask held constant, in float64:
    dx = (mask * dy) @ w.T and dw = x.T @ (mask * dy).  ``dy`` is dense (M, N) for a bool
    mask (unselected entries ignored) and compact (M, n_keep) for column indices."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    dym = masked_dense(np.atleast_2d(dy), np.atleast_2d(mask), w.shape[1])
    dx = dym @ w.T
    dw = np.atleast_2d(x).T @ dym
    return (dx[0] if x.ndim == 1 else dx), dw


def topk_mask_reference(scores, n_keep) -> np.ndarray:
    """Bool mask of the ``n_keep`` largest entries of each row of ``scores``; ties go to
    the lower column index and NaN ranks below every number."""
    scores = np.atleast_2d(np.asarray(scores, np.float64))
    key = np.where(np.isnan(scores), np.inf, -scores)    # ascending key; NaN last
    order = np.argsort(key, axis=1, kind="stable")        # stable: equal keys by index
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order[:, :n_keep], True, axis=1)
    return mask


def drs_scores_reference(x, w, r_dense, scale) -> np.ndarray:
    """The approximate output f(x) @ f(w) of the dimension-reduction search, in float64:
    f(z) = scale * R z applied to the rows of x (M, d) and the columns of w (d, N)."""
    r = np.asarray(r_dense, np.float64)
    fx = scale * np.atleast_2d(np.asarray(x, np.float64)) @ r.T
    fw = scale * r @ np.asarray(w, np.float64)
    return fx @ fw


def relu_bn_reference(y, mask, gamma, beta, mean=None, var=None, eps=1e-5, axis=1):
    """``mask * BN(ReLU(y))`` in float64, channels along ``axis``.

    With ``mean`` and ``var`` (running statistics) this is the inference form and returns
    the output.  Without them it is the training form: per-channel mean and biased
    variance of ReLU(y) over the selected entries only (0 for a channel with none), and it
    returns (out, mean, var).
    """
    y = np.asarray(y, np.float64)
    mask = np.asarray(mask, bool)
    shape = [1] * y.ndim
    shape[axis] = y.shape[axis]
    r = np.maximum(y, 0.0)
    training = mean is None
    if training:
        others = tuple(a for a in range(y.ndim) if a != axis)
        count = mask.sum(axis=others)
        safe = np.maximum(count, 1)
        mean = np.where(mask, r, 0.0).sum(axis=others) / safe
        var = np.where(mask, (r - mean.reshape(shape)) ** 2, 0.0).sum(axis=others) / safe
    g, b, m, v = (np.asarray(a, np.float64).reshape(shape) for a in (gamma, beta, mean, var))
    out = np.where(mask, (r - m) / np.sqrt(v + eps) * g + b, 0.0)
    return (out, np.asarray(mean), np.asarray(var)) if training else out


def relu_bn_backward_reference(dout, y, mask, gamma, mean, var, eps=1e-5, batch_stats=True,
                               axis=1):
    """Gradients (dy, dgamma, dbeta) of ``mask * BN(ReLU(y))`` in float64, by the chain
    rule written out term by term: BN's output through xhat, and with ``batch_stats``
    also through the batch mean and variance of the selected entries."""
    y, dout = np.asarray(y, np.float64), np.asarray(dout, np.float64)
    mask = np.asarray(mask, bool)
    shape = [1] * y.ndim
    shape[axis] = y.shape[axis]
    others = tuple(a for a in range(y.ndim) if a != axis)
    g, m, v = (np.asarray(a, np.float64).reshape(shape) for a in (gamma, mean, var))
    z = np.maximum(y, 0.0)
    inv = 1.0 / np.sqrt(v + eps)
    xhat = (z - m) * inv
    d_out = np.where(mask, dout, 0.0)
    dbeta = d_out.sum(axis=others)
    dgamma = (d_out * np.where(mask, xhat, 0.0)).sum(axis=others)
    dxhat = d_out * g
    dz = dxhat * inv                                   # through xhat directly
    if batch_stats:
        n = np.maximum(mask.sum(axis=others), 1).reshape(shape)
        dvar = (dxhat * np.where(mask, z - m, 0.0)).sum(axis=others, keepdims=True) \
            * -0.5 * inv ** 3
        dmean = -(dxhat * inv).sum(axis=others, keepdims=True) \
            - dvar * 2.0 * np.where(mask, z - m, 0.0).sum(axis=others, keepdims=True) / n
        dz = dz + np.where(mask, dvar * 2.0 * (z - m) / n + dmean / n, 0.0)
    dy = np.where(mask & (y > 0), dz, 0.0)
    return dy, dgamma, dbeta


def conv2d_masked_reference(x, w, mask, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """``mask * conv2d(x, w)`` in float64: mask is bool (N, K, OH, OW)."""
    return np.where(np.asarray(mask, bool),
                    conv2d_reference(x, w, None, stride, padding, dilation), 0.0)


def conv2d_masked_backward_reference(dy, x, w, mask, stride=(1, 1), padding=(0, 0),
                                     dilation=(1, 1)):
    """(dx, dw) of ``y = mask * conv2d(x, w)`` with the mask held constant, in float64.
    ``mask`` is (N, K, OH, OW) or a channel mask (N, K, 1, 1), any dtype (nonzero selects);
    g = mask ? dy : 0 is a selection, so Inf/NaN in unselected dy entries stay out.  Each
    tap (r, s) sends g, mixed over k by w[:, :, r, s], to the input pixels
    (oh * sh - ph + r * dh, ow * sw - pw + s * dw), and takes its dw from the same pixels."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    dy = np.asarray(dy, np.float64)
    sel = np.broadcast_to(np.asarray(mask) != 0, dy.shape)
    g = np.where(sel, dy, 0.0)
    (sh, sw), (ph, pw), (dh, dw_) = stride, padding, dilation
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    oh, ow = g.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(r):
        rows = slice(i * dh, i * dh + (oh - 1) * sh + 1, sh)
        for j in range(s):
            cols = slice(j * dw_, j * dw_ + (ow - 1) * sw + 1, sw)
            dxp[:, :, rows, cols] += np.einsum("nkyx,kc->ncyx", g, w[:, :, i, j])
            dw[:, :, i, j] = np.einsum("nkyx,ncyx->kc", g, xp[:, :, rows, cols])
    return dxp[:, :, ph:ph + h, pw:pw + wd], dw


def im2col_reference(x, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1)
                     ) -> np.ndarray:
    """The im2col rows of x (N, C, H, W) in float64: (N * OH * OW, C * R * S), each output
    pixel's window ordered (c, r, s) like ``w.reshape(K, -1)``."""
    x = np.asarray(x, np.float64)
    (r, s), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, ((r - 1) * dh + 1, (s - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]                      # (N, C, OH, OW, R, S)
    n, c, oh, ow = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * r * s)


def drs_conv_mask_reference(x, w, n_keep, r_dense, scale, stride=(1, 1), padding=(0, 0),
                            dilation=(1, 1)) -> np.ndarray:
    """The mask of ``drs_mask_conv2d`` in float64: per sample and output pixel, the
    ``n_keep`` channels with the largest f(window) . f(w_k), f(z) = scale * R z over
    im2col windows ordered (c, r, s); bool (N, K, OH, OW)."""
    k, _, r, s = np.shape(w)
    rows = im2col_reference(x, (r, s), stride, padding, dilation)
    n, _, h, w_in = np.shape(x)
    oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (w_in + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    scores = drs_scores_reference(rows, np.reshape(w, (k, -1)).T, r_dense, scale)
    mask = topk_mask_reference(scores, n_keep)                   # (N * OH * OW, K)
    return mask.reshape(n, oh, ow, k).transpose(0, 3, 1, 2)


def softmax_cross_entropy_reference(logits, labels, mean: bool = True):
    """(loss, d loss / d logits) of softmax cross-entropy, in float64."""
    x = np.asarray(logits, np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(x.shape[0])
    loss = float((log_z - shifted[rows, labels]).sum())
    grad = np.exp(shifted - log_z[:, None])
    grad[rows, labels] -= 1.0
    scale = 1.0 / x.shape[0] if mean else 1.0
    return loss * scale, grad * scale


def sgd_reference(param, grad, velocity, lr, momentum, weight_decay):
    """(param, velocity) after one step of torch.optim.SGD's update, in float64."""
    p, g = np.asarray(param, np.float64), np.asarray(grad, np.float64)
    g = g + weight_decay * p
    if velocity is None:
        return p - lr * g, None
    v = momentum * np.asarray(velocity, np.float64) + g
    return p - lr * v, v


def relu_backward_reference(dy, y) -> np.ndarray:
    """d relu / d its input, times dy, given the ReLU's output y: dy where y > 0."""
    return np.where(np.asarray(y) > 0, np.asarray(dy, np.float64), 0.0)
