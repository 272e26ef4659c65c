"""Dynamic Sparse Graph training on the device (Liu et al., ICLR 2019): layers that search
which outputs to compute, compute only those, and train with the same selection.

- :class:`FlatParameters`: every parameter of a model as a view into one flat device
  buffer, with the gradients and the momentum alike, so that one :func:`sgd_step` launch
  updates them all.
- :class:`DSGLinear`: ``y = relu(mask * (x @ w + b))`` with the mask from the
  dimension-reduction search (:func:`drs_mask`), or a random mask, or the oracle's exact
  top-k (the two controls), or none (a dense layer); ``forward`` and ``backward`` on the
  device, the bias in the product and its gradient, dx skippable.
- :class:`MLP`: a stack of them with a dense output layer, softmax cross-entropy and SGD,
  for short training scripts: ``model.train_step(x, labels)``, ``model.predict(x)``.

The search stays on at inference: a model trained with DSG has learned under its masks,
and its dense forward is much worse.  ``predict`` therefore runs the same search.

The search ranks ``x @ w`` without the bias (the bias is added to the selected outputs
only): on the digits at 90%, an oracle mask with the bias and one without trained to the
same accuracy.  The layers' projections default to ``eps=0.3`` (k = 139 for 512 inputs):
on the digits it trained up to a point better than the search's own default, 0.5, at
70-80% (5 seeds; at 90% the two were within their spread).  Not yet here: conv layers,
BatchNorm and pooling.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from . import runtime
from .ops.drs import SparseRandomProjection, drs_mask, keep_count, random_mask
from .ops.elementwise import add, add_relu, relu_backward
from .ops.masked import MaskedLinearWeight, masked_matmul, masked_matmul_backward
from .ops.training import column_sums, sgd_step, softmax_cross_entropy

__all__ = ["FlatParameters", "DSGLinear", "MLP", "MASK_KINDS"]

#: How a layer picks the outputs it computes.
MASK_KINDS = ("drs", "random", "oracle", "dense")


class FlatParameters:
    """Named parameters as views into one flat float32 device buffer, with a gradient
    buffer and a momentum buffer of the same layout.

    ``params[name]`` and ``grads[name]`` are device arrays of the shapes given; ``step``
    updates every parameter with one :func:`sgd_step` launch.  Each parameter starts on
    the device's base alignment, so that kernels which take a buffer without an offset
    (a :class:`MaskedLinearWeight`'s rows, the backward's dw) use the views in place."""

    def __init__(self, queue: cl.CommandQueue, initial: Dict[str, np.ndarray]):
        if not initial:
            raise ValueError("initial must name at least one parameter")
        self.queue = queue
        sizes = {name: int(np.prod(a.shape)) for name, a in initial.items()}
        align = runtime.base_alignment(queue.device) // 4        # in floats
        starts, total = {}, 0
        for name, n in sizes.items():
            starts[name] = total
            total += -(-n // align) * align
        flat = np.zeros(total, np.float32)
        self.data = cl_array.empty(queue, total, np.float32)
        self.grad = cl_array.zeros(queue, total, np.float32)
        self.velocity = cl_array.zeros(queue, total, np.float32)
        self.params: Dict[str, cl_array.Array] = {}
        self.grads: Dict[str, cl_array.Array] = {}
        for name, a in initial.items():
            start, n = starts[name], sizes[name]
            flat[start:start + n] = np.asarray(a, np.float32).reshape(-1)
            self.params[name] = self.data[start:start + n].reshape(a.shape)
            self.grads[name] = self.grad[start:start + n].reshape(a.shape)
        self.data.set(flat)

    def step(self, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        """One SGD step of every parameter (torch.optim.SGD's update), one launch."""
        sgd_step(self.data, self.grad, self.velocity if momentum else None, lr=lr,
                 momentum=momentum, weight_decay=weight_decay, queue=self.queue)

    def numpy(self) -> Dict[str, np.ndarray]:
        """Every parameter, copied to the host."""
        return {name: p.get() for name, p in self.params.items()}


class DSGLinear:
    """A fully connected layer under a DSG selection: ``y = act(mask * (x @ w + b))``.

    Parameters
    ----------
    params : FlatParameters holding ``<name>.w`` (out_features, in_features), rows as in
        torch's ``Linear.weight`` (a selected output reads one contiguous row, and the
        backward writes its gradient in the same layout), and ``<name>.b``
        (out_features,).
    name : the layer's name in ``params``.
    sparsity : float in [0, 1): the share of each row's outputs not computed.
    mask : "drs" (the search), "random" (a fresh random selection per step, drawn on the
        device by :func:`random_mask`: the control),
        "oracle" (the exact top-k of the true pre-activation, computed densely: the
        control's upper bound) or "dense" (every output).
    relu : bool: apply ReLU (DSG's layers) or not (an output layer).
    seed : int: the search's random projection, or the random masks.
    eps : the projection's accuracy (see :class:`SparseRandomProjection`).
    """

    def __init__(self, params: FlatParameters, name: str, sparsity: float, mask: str = "drs",
                 relu: bool = True, seed: int = 0, eps: float = 0.3):
        if mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {mask!r}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or \
                not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        self.params, self.name = params, name
        self.w, self.b = params.params[f"{name}.w"], params.params[f"{name}.b"]
        self.dw, self.db = params.grads[f"{name}.w"], params.grads[f"{name}.b"]
        self.out_features, self.in_features = self.w.shape
        if self.w.offset % runtime.base_alignment(params.queue.device):
            # MaskedLinearWeight would copy it, and the copy would miss every update.
            raise ValueError(f"{name}.w must start on the device's base alignment (as "
                             "FlatParameters places every parameter)")
        self.rows = MaskedLinearWeight(self.w, transposed=True, queue=params.queue)
        self.sparsity = float(sparsity) if mask != "dense" else 0.0
        self.kind = mask if self.sparsity > 0 else "dense"
        self.relu = relu
        self.queue = params.queue
        self.rng = np.random.default_rng(seed)
        self.projection = SparseRandomProjection(self.in_features, eps=eps, seed=seed,
                                                 queue=self.queue) \
            if self.kind == "drs" else None
        self._saved: Optional[Tuple] = None
        self._full: Dict[int, cl_array.Array] = {}

    def _mask(self, x: cl_array.Array):
        """The bool (M, N) selection for this batch, on the device (None: every output)."""
        m, n = x.shape[0], self.out_features
        if self.kind == "dense":
            return None
        if self.kind == "drs":
            return drs_mask(x, self.rows, self.sparsity, projection=self.projection,
                            queue=self.queue)
        if self.kind == "random":      # a fresh selection each call, on the device
            return random_mask(m, n, self.sparsity, seed=int(self.rng.integers(2 ** 63)),
                               queue=self.queue)
        n_keep = keep_count(self.sparsity, n)
        # oracle: the true pre-activation, densely, on the host (a control, not a fast path)
        scores = x.get().astype(np.float64) @ self.w.get().T + self.b.get()
        keep = np.zeros((m, n), bool)
        np.put_along_axis(keep, np.argpartition(-scores, n_keep - 1, axis=1)[:, :n_keep],
                          True, axis=1)
        return cl_array.to_device(self.queue, keep)

    def _all_selected(self, n_rows: int) -> cl_array.Array:
        """A bool mask selecting every output (a dense layer's), kept per batch size."""
        found = self._full.get(n_rows)
        if found is None:
            found = self._full[n_rows] = cl_array.to_device(
                self.queue, np.ones((n_rows, self.out_features), np.bool_))
        return found

    def forward(self, x: cl_array.Array, training: bool = True) -> cl_array.Array:
        """``act(mask * (x @ w + b))`` for a device batch x (M, in_features); with
        ``training`` the inputs and the selection are kept for :meth:`backward`."""
        mask = self._mask(x)
        full = mask if mask is not None else self._all_selected(x.shape[0])
        y = masked_matmul(x, self.rows, full, queue=self.queue)
        if self.relu:
            add_relu(y, self.b, out=y, mask=mask)   # bias + ReLU on the selection only
        else:
            add(y, self.b, out=y, mask=mask)
        self._saved = (x, y, full) if training else None
        return y

    def backward(self, dy: cl_array.Array, need_dx: bool = True) -> Optional[cl_array.Array]:
        """Writes d loss / d w and d loss / d b into the layer's gradient buffers (their
        views in :class:`FlatParameters`) and returns d loss / d x (None without
        ``need_dx``).  Only the selected outputs carry gradient."""
        if self._saved is None:
            raise RuntimeError(f"{self.name}: backward needs a forward with training=True "
                               "first")
        x, y, full = self._saved
        dh = relu_backward(dy, y, mask=full) if self.relu else \
            relu_backward(dy, 1.0, mask=full)    # dy on the selection, 0 elsewhere
        dx, _ = masked_matmul_backward(dh, x, self.rows, full, need_dx=need_dx,
                                       dw_rows=True, dw_out=self.dw, queue=self.queue)
        column_sums(dh, out=self.db, queue=self.queue)
        self._saved = None
        return dx


def _he_init(rng, fan_in: int, shape) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


class MLP:
    """A DSG multilayer perceptron: hidden :class:`DSGLinear` layers with ReLU under the
    chosen selection, a dense output layer, softmax cross-entropy and SGD with momentum,
    every step on the device.

    ``sizes`` = (in, hidden..., classes).  ``mask`` and ``sparsity`` apply to the hidden
    layers.  ``train_step(x, labels)`` takes device arrays (float32 (M, in), int32 (M,))
    and returns the batch loss as a (1,) device array (read it when needed: nothing else
    comes to the host); ``predict(x)`` returns the classes, with the search on."""

    def __init__(self, sizes: Sequence[int], sparsity: float, mask: str = "drs", seed: int = 0,
                 queue=None, eps: float = 0.3):
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                                 or s < 1 for s in sizes):
            raise ValueError(f"sizes must be two or more positive ints, got {sizes!r}")
        self.queue = runtime.get_queue(queue)
        rng = np.random.default_rng(seed)
        initial = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            initial[f"fc{i}.w"] = _he_init(rng, a, (b, a))
            initial[f"fc{i}.b"] = np.zeros(b, np.float32)
        self.params = FlatParameters(self.queue, initial)
        last = len(sizes) - 2
        self.layers: List[DSGLinear] = [
            DSGLinear(self.params, f"fc{i}", sparsity if i < last else 0.0,
                      mask if i < last else "dense", relu=i < last, seed=seed + 1 + i,
                      eps=eps)
            for i in range(len(sizes) - 1)]

    def forward(self, x: cl_array.Array, training: bool = False) -> cl_array.Array:
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def train_step(self, x: cl_array.Array, labels: cl_array.Array, lr: float = 0.05,
                   momentum: float = 0.9, weight_decay: float = 0.0) -> cl_array.Array:
        """Forward, loss, backward and one SGD step; returns the loss, on the device."""
        logits = self.forward(x, training=True)
        loss, grad = softmax_cross_entropy(logits, labels, queue=self.queue)
        for i, layer in reversed(list(enumerate(self.layers))):
            grad = layer.backward(grad, need_dx=i > 0)
        self.params.step(lr, momentum, weight_decay)
        return loss

    def predict(self, x) -> np.ndarray:
        """The predicted classes (NumPy int64) of a batch, the search on as in training."""
        x_dev = x if isinstance(x, cl_array.Array) else \
            cl_array.to_device(self.queue, np.ascontiguousarray(x, np.float32))
        return self.forward(x_dev, training=False).get().argmax(axis=1)
