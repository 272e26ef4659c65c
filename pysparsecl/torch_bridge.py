"""A bridge to torch autograd: DSG's masked linear layer as a ``torch.autograd.Function``
whose forward and backward run our kernels, for torch CPU tensors.

torch is an optional extra: importing :mod:`pysparsecl` never imports it, and this module
needs it.  The tensors reach the kernels as NumPy views of their memory: on a device that
shares host memory (PoCL's CPU device) they are lent to the kernels in place, elsewhere
copied to and from the device per call.

::

    import torch
    from pysparsecl.torch_bridge import DSGLinear

    layer = DSGLinear(512, 256, sparsity=0.9)        # an nn.Module
    y = layer(x)                                     # relu(mask * (x @ W^T + b))
    y.sum().backward()                               # dx, dW, db by our kernels

The search (:func:`drs_mask`) chooses each row's outputs in the forward; the backward
holds that selection constant, as DSG does.  Only the selected outputs carry gradient.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import runtime
from .ops.drs import SparseRandomProjection, drs_mask
from .ops.elementwise import add, add_relu, relu_backward
from .ops.masked import MaskedLinearWeight, masked_matmul, masked_matmul_backward
from .ops.training import column_sums

__all__ = ["MaskedLinearFunction", "DSGLinear"]


def _host(t: torch.Tensor, name: str) -> np.ndarray:
    """A float32 CPU tensor as a NumPy view of its memory (contiguous first)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (the bridge lends host memory to the "
                         f"OpenCL device), got one on {t.device}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    return t.detach().contiguous().numpy()


def _tensor(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    return None if a is None else torch.from_numpy(a)


class MaskedLinearFunction(torch.autograd.Function):
    """``y = act(mask * (x @ weight.T + bias))`` with ``mask`` the search's selection of
    each row's outputs (``sparsity`` of them skipped), computed only where selected.

    ``apply(x, weight, bias, sparsity, projection, relu, queue)``: x (M, K), weight
    (N, K) as ``torch.nn.Linear`` stores it, bias (N,) or None; ``projection`` a
    :class:`SparseRandomProjection` with d = K; ``relu`` a bool.  The mask is a constant
    of the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, sparsity, projection, relu, queue):
        x_np, w_np = _host(x, "x"), _host(weight, "weight")
        if x_np.ndim != 2 or w_np.ndim != 2 or x_np.shape[1] != w_np.shape[1]:
            raise ValueError(f"x must be (M, K) and weight (N, K) with the same K, got "
                             f"{tuple(x_np.shape)} and {tuple(w_np.shape)}")
        n_out = w_np.shape[0]
        b_np = None if bias is None else _host(bias, "bias")
        if b_np is not None and b_np.shape != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(b_np.shape)}")
        rows = MaskedLinearWeight(w_np, transposed=True, queue=queue)   # (N, K) as stored
        mask = drs_mask(x_np, rows, sparsity, projection=projection, queue=queue)
        y = masked_matmul(x_np, rows, mask, queue=queue)
        shift = np.float32(0) if b_np is None else b_np
        (add_relu if relu else add)(y, shift, out=y, mask=mask)   # on the selection only
        ctx.save_for_backward(x)
        ctx.state = (mask, y, rows, bias is not None, relu, queue)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        mask, y, rows, has_bias, relu, queue = ctx.state
        dy_np = _host(dy, "dy")
        dh = relu_backward(dy_np, y if relu else np.float32(1), mask=mask, queue=queue)
        dx, dw = masked_matmul_backward(dh, _host(x, "x"), rows, mask, dw_rows=True,
                                        need_dx=ctx.needs_input_grad[0], queue=queue)
        db = column_sums(dh, queue=queue) if has_bias and ctx.needs_input_grad[2] else None
        return (_tensor(dx), _tensor(dw) if ctx.needs_input_grad[1] else None,
                _tensor(db), None, None, None, None)


class DSGLinear(torch.nn.Module):
    """A linear layer trained with DSG through torch autograd: ``relu(mask * (x @ W^T +
    b))`` (``relu=False``: no activation), with the search's mask for each row.

    Parameters: ``in_features``, ``out_features``, ``sparsity`` in [0, 1), ``bias``,
    ``relu``, ``eps`` and ``seed`` of the projection, ``queue`` (an OpenCL queue; the
    default device's otherwise).  The weight is initialised as torch.nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, sparsity: float,
                 bias: bool = True, relu: bool = True, eps: float = 0.3,
                 seed: Optional[int] = 0, queue=None):
        super().__init__()
        reference = torch.nn.Linear(in_features, out_features, bias=bias)
        self.weight = reference.weight
        self.bias = reference.bias
        self.sparsity = float(sparsity)
        self.relu = bool(relu)
        self.queue = runtime.get_queue(queue)
        self.projection = SparseRandomProjection(in_features, eps=eps, seed=seed,
                                                 queue=self.queue)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MaskedLinearFunction.apply(x, self.weight, self.bias, self.sparsity,
                                          self.projection, self.relu, self.queue)

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, "
                f"sparsity={self.sparsity}, relu={self.relu}")
