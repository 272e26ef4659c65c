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


def relative_error(result, reference) -> float:
    """‖result − reference‖ / ‖reference‖ (norm-wise; 0/0 counts as 0)."""
    result = np.asarray(result, np.float64)
    reference = np.asarray(reference, np.float64)
    denom = np.linalg.norm(reference)
    diff = np.linalg.norm(result - reference)
    if denom == 0:
        return float(diff)
    return float(diff / denom)


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
