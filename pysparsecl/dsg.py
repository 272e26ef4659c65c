"""Dynamic Sparse Graph training on the device (Liu et al., ICLR 2019): layers that search
which outputs to compute, compute only those, and train with the same selection.

- :class:`FlatParameters`: every parameter of a model as a view into one flat device
  buffer, with the gradients and the momentum alike, so that one :func:`sgd_step` launch
  updates them all.
- :class:`DSGLinear`: ``y = relu(mask * (x @ w + b))`` with the mask from the
  dimension-reduction search (:func:`drs_mask`), or a random mask, or the oracle's exact
  top-k (the two controls), or none (a dense layer); ``forward`` and ``backward`` on the
  device, the bias in the product and its gradient, dx skippable.
- :class:`DSGConv2d`: a convolution under DSG's per-position channel selection (the
  search on the im2col windows, :func:`drs_mask_conv2d`), computing only the selected
  outputs (:func:`conv2d_masked`), then ReLU and BatchNorm with the double mask
  (:func:`masked_relu_bn`), or ReLU and a bias without BatchNorm.
- :class:`MaxPool2d` and :class:`Flatten`, for a CNN's plumbing.
- :class:`Sequential`: a stack of layers with softmax cross-entropy and SGD, for short
  training scripts: ``model.train_step(x, labels)``, ``model.predict(x)``; :class:`MLP`
  and :class:`CNN` build one.

The search stays on at inference: a model trained with DSG has learned under its masks,
and its dense forward is much worse.  ``predict`` therefore runs the same search.

The search ranks ``x @ w`` without the bias (the bias is added to the selected outputs
only): on the digits at 90%, an oracle mask with the bias and one without trained to the
same accuracy.  The layers' projections default to ``eps=0.3`` (k = 139 for 512 inputs):
on the digits it trained up to a point better than the search's own default, 0.5, at
70-80% (5 seeds; at 90% the two were within their spread).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from . import runtime
from .families import masked_util
from .ops.compact import CompactRows
from .ops.conv2d import conv2d_output_shape
from .ops.drs import (
    SparseRandomProjection,
    drs_mask,
    drs_mask_conv2d,
    keep_count,
    random_mask,
)
from .ops.elementwise import add, add_relu, axpby, relu_backward
from .ops.masked import (
    MaskedLinearWeight,
    conv2d_masked,
    conv2d_masked_backward,
    masked_matmul,
    masked_matmul_backward,
    masked_relu_bn,
    masked_relu_bn_backward,
    shared_selection_lists,
)
from .ops.pooling import max_pool2d, max_pool2d_backward
from .ops.training import channel_sums, column_sums, sgd_step, softmax_cross_entropy

__all__ = ["FlatParameters", "DSGLinear", "DSGConv2d", "MaxPool2d", "Flatten", "Sequential",
           "ReplayedStep", "MLP", "CNN", "MASK_KINDS"]

#: How a layer picks the outputs it computes.
MASK_KINDS = ("drs", "random", "oracle", "dense")


def _check_selection(mask: str, sparsity) -> None:
    if mask not in MASK_KINDS:
        raise ValueError(f"mask must be one of {MASK_KINDS}, got {mask!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or \
            not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def _check_aligned(w: cl_array.Array, name: str, queue) -> None:
    if w.offset % runtime.base_alignment(queue.device):
        # A MaskedLinearWeight would copy it, and the copy would miss every update.
        raise ValueError(f"{name} must start on the device's base alignment (as "
                         "FlatParameters places every parameter)")


def _all_selected(cache: dict, queue, shape) -> cl_array.Array:
    """A device bool mask selecting every output of ``shape`` (a dense layer's), kept in
    ``cache`` per shape."""
    found = cache.get(shape)
    if found is None:
        found = cache[shape] = cl_array.to_device(queue, np.ones(shape, np.bool_))
    return found


def _top_k_along(scores: np.ndarray, n_keep: int, axis: int) -> np.ndarray:
    """The bool mask of the n_keep largest entries along ``axis`` (the oracle's)."""
    keep = np.zeros(scores.shape, bool)
    top = np.argpartition(-scores, n_keep - 1, axis=axis)
    np.put_along_axis(keep, np.take(top, np.arange(n_keep), axis=axis), True, axis=axis)
    return keep


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
    projection : a :class:`SparseRandomProjection` to use (built from ``seed`` and
        ``eps`` when None).

    propagate : bool: pass the sparsity on (a DSG layer only, issue "Sparsity carried
        across layers").  The layer's output is then a :class:`CompactRows` (the selected
        entries and their columns) instead of a dense array with zeros, the next layer
        takes it as it is (its search and its product sum over the nonzero inputs only),
        and ``backward`` takes and returns gradients in that form (dx at the input's
        entries).  The activations kept for the backward shrink alike
        (:meth:`saved_bytes`).  Any layer takes a CompactRows input.

    With ``mask="drs"`` and a parameter ``<name>.fw`` of shape
    ``projection.weight_layout(out_features)`` in ``params``, the layer keeps f(w), the
    search's projection of its weight, as a parameter: its gradient is f(dw) =
    f(x)^T (mask * dh), which costs k x (the selected outputs) given the f(x) the search
    computed, and the same SGD step that updates w updates f(w) to f(w'), f being linear.
    Without it, f(w) is computed again from w on every forward, k x K x N multiply-adds,
    more than the layer's own product when the batch is smaller than k.  (:class:`MLP`
    and :class:`CNN` give their DSG linear layers the parameter on CPU devices.)
    """

    def __init__(self, params: FlatParameters, name: str, sparsity: float, mask: str = "drs",
                 relu: bool = True, seed: int = 0, eps: float = 0.3,
                 projection: Optional[SparseRandomProjection] = None,
                 propagate: bool = False):
        _check_selection(mask, sparsity)
        if not isinstance(propagate, bool):
            raise TypeError(f"propagate must be a bool, got {type(propagate).__name__}")
        self.params, self.name = params, name
        self.w, self.b = params.params[f"{name}.w"], params.params[f"{name}.b"]
        self.dw, self.db = params.grads[f"{name}.w"], params.grads[f"{name}.b"]
        self.out_features, self.in_features = self.w.shape
        _check_aligned(self.w, f"{name}.w", params.queue)
        self.rows = MaskedLinearWeight(self.w, transposed=True, queue=params.queue)
        self.sparsity = float(sparsity) if mask != "dense" else 0.0
        self.kind = mask if self.sparsity > 0 else "dense"
        self.propagate = propagate and self.kind != "dense"
        self.relu = relu
        self.queue = params.queue
        self.rng = np.random.default_rng(seed)
        if self.kind == "drs" and projection is None:
            projection = SparseRandomProjection(self.in_features, eps=eps, seed=seed,
                                                queue=self.queue)
        self.projection = projection if self.kind == "drs" else None
        # f(w) kept as a parameter, updated with w (see the class's docstring).
        self.fw = params.params.get(f"{name}.fw") if self.kind == "drs" else None
        if self.fw is not None:
            self.dfw = params.grads[f"{name}.fw"]
            self.projected = self.projection.project_weight(self.rows, out=self.fw)
        self._saved: Optional[Tuple] = None
        self._full: Dict[Tuple[int, ...], cl_array.Array] = {}

    def _mask(self, x):
        """(the selection for this batch on the device: bool (M, N), or, propagating,
        int32 (M, n_keep) ascending column indices; None for every output; f(x) when the
        layer keeps f(w), else None)."""
        m, n = x.shape[0], self.out_features
        compact = self.propagate
        if self.kind == "dense":
            return None, None
        if self.kind == "drs" and self.fw is not None:
            fx = self.projection.project_rows(x, queue=self.queue)
            return drs_mask(x, None, self.sparsity, projection=self.projected,
                            x_projected=fx, compact=compact, queue=self.queue), fx
        if self.kind == "drs":
            return drs_mask(x, self.rows, self.sparsity, projection=self.projection,
                            compact=compact, queue=self.queue), None
        runtime.refuse_capture(f"a {self.kind} mask (drawn with a seed from the host)"
                               if self.kind == "random" else "the oracle's mask")
        if self.kind == "random":      # a fresh selection each call, on the device
            return random_mask(m, n, self.sparsity, seed=int(self.rng.integers(2 ** 63)),
                               compact=compact, queue=self.queue), None
        # oracle: the true pre-activation, densely, on the host (a control, not a fast path)
        dense_x = x.to_dense() if isinstance(x, CompactRows) else x
        scores = dense_x.get().astype(np.float64) @ self.w.get().T + self.b.get()
        top = _top_k_along(scores, keep_count(self.sparsity, n), 1)
        if compact:
            top = np.sort(np.argsort(~top, axis=1, kind="stable")[:, :keep_count(
                self.sparsity, n)], axis=1).astype(np.int32)
        return cl_array.to_device(self.queue, top), None

    def forward(self, x, training: bool = True):
        """``act(mask * (x @ w + b))`` for a device batch x (M, in_features), a pyopencl
        array or a :class:`CompactRows`; with ``training`` the inputs and the selection
        are kept for :meth:`backward`.  Propagating, the result is a CompactRows."""
        mask, fx = self._mask(x)
        full = mask if mask is not None else _all_selected(
            self._full, self.queue, (x.shape[0], self.out_features))
        # The search's own index masks need no device validation (a sync per call).
        y = masked_matmul(x, self.rows, full, verify_mask=not self.propagate,
                          queue=self.queue)
        if self.propagate:   # y holds the selected outputs, in the order of mask's columns
            y = CompactRows(y, mask, self.out_features, check=False).add_bias(
                self.b, relu=self.relu, out=y)
        elif self.relu:
            add_relu(y, self.b, out=y, mask=mask)   # bias + ReLU on the selection only
        else:
            add(y, self.b, out=y, mask=mask)
        self._saved = (x, y, full, fx) if training else None
        return y

    def saved_bytes(self) -> int:
        """Device bytes of what the last training forward kept for :meth:`backward`: the
        input, the output and the selection (and f(x)), in whichever form they are."""
        if self._saved is None:
            return 0
        x, y, full, fx = self._saved
        held = [x.values, x.idx] if isinstance(x, CompactRows) else [x]
        held += [y.values] if isinstance(y, CompactRows) else [y]   # y.idx is the mask
        held += [a for a in (full, fx) if a is not None]
        return sum(a.nbytes for a in held)

    def backward(self, dy, need_dx: bool = True):
        """Writes d loss / d w and d loss / d b into the layer's gradient buffers (their
        views in :class:`FlatParameters`) and returns d loss / d x (None without
        ``need_dx``).  Only the selected outputs carry gradient.  Propagating, ``dy`` is
        the CompactRows the next layer's backward returned (or its values, (M, n_keep));
        a CompactRows input gets its dx as a CompactRows with the input's indices."""
        if self._saved is None:
            raise RuntimeError(f"{self.name}: backward needs a forward with training=True "
                               "first")
        x, y, full, fx = self._saved
        if self.propagate:
            dyv = dy.values if isinstance(dy, CompactRows) else dy
            dh = relu_backward(dyv, y.values) if self.relu else dyv
        else:
            dh = relu_backward(dy, y, mask=full) if self.relu else \
                relu_backward(dy, 1.0, mask=full)    # dy on the selection, 0 elsewhere
        # dw and f(w)'s gradient select by the same mask and dh: their lists are built once.
        with shared_selection_lists():
            dx, _ = masked_matmul_backward(dh, x, self.rows, full, need_dx=need_dx,
                                           dw_rows=True, dw_out=self.dw,
                                           verify_mask=not self.propagate, queue=self.queue)
            if fx is not None:
                self._projected_gradient(fx, dh, full)
        if self.propagate:
            column_sums(CompactRows(dh, full, self.out_features, check=False).to_dense(),
                        out=self.db, queue=self.queue)
        else:
            column_sums(dh, out=self.db, queue=self.queue)
        self._saved = None
        return dx

    @runtime.capturable_op
    def _projected_gradient(self, fx: cl_array.Array, dh: cl_array.Array,
                            full: cl_array.Array) -> None:
        """f(dw) = f(x)^T (mask * dh) into the gradient of f(w): rows 0..k of its
        (k_pad, ld) layout (the rest stays 0, as it was made).  The kernel gives it as
        (N, k_pad) rows (fx's padding), whose first k columns are transposed straight
        into that layout."""
        n = self.out_features
        _, fdw_rows = masked_matmul_backward(dh, fx, None, full, need_dx=False, dw_rows=True,
                                             n_cols=n if self.propagate else None,
                                             verify_mask=not self.propagate,
                                             queue=self.queue)
        masked_util.transpose(self.queue, fdw_rows, None, into=self.dfw,
                              ld_dst=self.dfw.shape[1], cols=self.projection.k)


class DSGConv2d:
    """A convolution under DSG's per-position channel selection: at each output position
    of each image, the layer computes only the selected output channels.

    With ``bn`` (DSG's CONV -> ReLU -> BN): ``out = mask * BN(ReLU(conv(x, w)))``, the
    BatchNorm over the selected entries with the double mask (:func:`masked_relu_bn`);
    training normalises with the batch's statistics and updates running ones, which
    inference uses.  Without ``bn``: ``out = ReLU(mask * (conv(x, w) + b))``.

    Parameters
    ----------
    params : FlatParameters holding ``<name>.w`` (K, C, R, S), and ``<name>.gamma``,
        ``<name>.beta`` (K,) with ``bn``, or ``<name>.b`` (K,) without.
    name : the layer's name in ``params``.
    sparsity : float in [0, 1): the share of each position's output channels not computed.
    mask : "drs" (the search on the windows), "random" (a fresh random selection per call,
        drawn on the host: a control), "oracle" (the exact top-k of the true conv output,
        computed densely: the control's upper bound) or "dense" (every output).
    stride, padding : as in ``torch.nn.functional.conv2d``.
    bn : bool, see above.  bn_momentum : the running statistics' update weight (torch's
        ``momentum``); the running variance is updated with the biased batch variance of
        the selected entries.  bn_eps : added to the variance.
    seed, eps : the search's random projection (or the random masks' seed), as in
        :class:`DSGLinear`.
    """

    def __init__(self, params: FlatParameters, name: str, sparsity: float, mask: str = "drs",
                 stride=1, padding=0, bn: bool = True, seed: int = 0, eps: float = 0.3,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5):
        _check_selection(mask, sparsity)
        self.params, self.name, self.queue = params, name, params.queue
        self.w, self.dw = params.params[f"{name}.w"], params.grads[f"{name}.w"]
        if self.w.ndim != 4:
            raise ValueError(f"{name}.w must be (K, C, R, S), got shape {self.w.shape}")
        _check_aligned(self.w, f"{name}.w", self.queue)
        self.out_channels, self.in_channels, r, s = self.w.shape
        self.kernel_size = (r, s)
        self.stride, self.padding = stride, padding
        self.bn = bool(bn)
        if self.bn:
            self.gamma, self.beta = params.params[f"{name}.gamma"], params.params[f"{name}.beta"]
            self.dgamma, self.dbeta = params.grads[f"{name}.gamma"], params.grads[f"{name}.beta"]
            self.running_mean = cl_array.zeros(self.queue, self.out_channels, np.float32)
            self.running_var = cl_array.to_device(self.queue,
                                                  np.ones(self.out_channels, np.float32))
            self.bn_momentum, self.bn_eps = float(bn_momentum), float(bn_eps)
        else:
            self.b, self.db = params.params[f"{name}.b"], params.grads[f"{name}.b"]
        self.sparsity = float(sparsity) if mask != "dense" else 0.0
        self.kind = mask if self.sparsity > 0 else "dense"
        self.rng = np.random.default_rng(seed)
        self.projection = SparseRandomProjection(self.in_channels * r * s, eps=eps, seed=seed,
                                                 queue=self.queue) \
            if self.kind == "drs" else None
        self._saved: Optional[Tuple] = None
        self._full: Dict[Tuple[int, ...], cl_array.Array] = {}

    def _conv(self, x, mask):
        return conv2d_masked(x, self.w, mask, self.stride, self.padding, queue=self.queue)

    def _mask(self, x: cl_array.Array):
        """The bool (N, K, OH, OW) selection for this batch, on the device (None: every
        output)."""
        if self.kind == "dense":
            return None
        if self.kind == "drs":
            return drs_mask_conv2d(x, self.w, self.sparsity, stride=self.stride,
                                   padding=self.padding, projection=self.projection,
                                   queue=self.queue)
        runtime.refuse_capture(f"a DSGConv2d's {self.kind} mask (computed on the host)")
        n_keep = keep_count(self.sparsity, self.out_channels)
        if self.kind == "random":
            keys = self.rng.random(self._output_shape(x.shape))
        else:   # oracle: the true conv output, densely
            keys = self._conv(x, self._all_selected(x.shape)).get()
        return cl_array.to_device(self.queue, _top_k_along(keys, n_keep, 1))

    def _output_shape(self, x_shape) -> Tuple[int, int, int, int]:
        oh, ow = conv2d_output_shape(x_shape[2:], self.kernel_size, self.stride, self.padding)
        return (x_shape[0], self.out_channels, oh, ow)

    def _all_selected(self, x_shape) -> cl_array.Array:
        return _all_selected(self._full, self.queue, self._output_shape(x_shape))

    def forward(self, x: cl_array.Array, training: bool = True) -> cl_array.Array:
        """The layer's output for a device batch x (N, C, H, W); with ``training`` the
        batch's statistics normalise it, and what :meth:`backward` needs is kept."""
        mask = self._mask(x)
        full = mask if mask is not None else self._all_selected(x.shape)
        y = self._conv(x, full)
        if not self.bn:
            k = self.out_channels
            out = add_relu(y, self.b.reshape(k, 1, 1), out=y, mask=mask)
            self._saved = (x, out, full, None) if training else None
            return out
        if not training:
            self._saved = None
            return masked_relu_bn(y, full, self.gamma, self.beta, self.running_mean,
                                  self.running_var, self.bn_eps, queue=self.queue)
        out, mean, var = masked_relu_bn(y, full, self.gamma, self.beta, eps=self.bn_eps,
                                        training=True, queue=self.queue)
        m = self.bn_momentum
        axpby(1.0 - m, self.running_mean, m, mean, out=self.running_mean)
        axpby(1.0 - m, self.running_var, m, var, out=self.running_var)
        self._saved = (x, y, full, (mean, var))
        return out

    def backward(self, dout: cl_array.Array, need_dx: bool = True
                 ) -> Optional[cl_array.Array]:
        """Writes the gradients of w and of gamma and beta (or b) into the layer's views
        of the gradient buffer and returns d loss / d x (None without ``need_dx``)."""
        if self._saved is None:
            raise RuntimeError(f"{self.name}: backward needs a forward with training=True "
                               "first")
        x, y, full, stats = self._saved
        if self.bn:
            dy, _, _ = masked_relu_bn_backward(dout, y, full, self.gamma, *stats, self.bn_eps,
                                               dgamma_out=self.dgamma, dbeta_out=self.dbeta,
                                               queue=self.queue)
        else:
            dy = relu_backward(dout, y, mask=full)
            channel_sums(dy, out=self.db, queue=self.queue)
        dx, _ = conv2d_masked_backward(dy, x, self.w, full, self.stride, self.padding,
                                       need_dx=need_dx, dw_out=self.dw, queue=self.queue)
        self._saved = None
        return dx


class MaxPool2d:
    """Max pooling (:func:`max_pool2d`), keeping the winners for the backward."""

    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self._saved = None

    def forward(self, x: cl_array.Array, training: bool = True) -> cl_array.Array:
        y, winners = max_pool2d(x, self.kernel_size, self.stride, self.padding,
                                return_indices=True)
        self._saved = (winners, tuple(x.shape)) if training else None
        return y

    def backward(self, dy: cl_array.Array, need_dx: bool = True) -> Optional[cl_array.Array]:
        if self._saved is None:
            raise RuntimeError("MaxPool2d: backward needs a forward with training=True first")
        winners, shape = self._saved
        self._saved = None
        if not need_dx:
            return None
        return max_pool2d_backward(dy, winners, shape, self.kernel_size, self.stride,
                                   self.padding)


class Flatten:
    """(N, C, H, W) to (N, C * H * W), a view; the backward restores the shape."""

    def __init__(self):
        self._shape = None

    def forward(self, x: cl_array.Array, training: bool = True) -> cl_array.Array:
        self._shape = tuple(x.shape)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: cl_array.Array, need_dx: bool = True) -> Optional[cl_array.Array]:
        return dy.reshape(self._shape) if need_dx else None


def _he_init(rng, fan_in: int, shape) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


class Sequential:
    """Layers applied in order, trained with softmax cross-entropy and SGD with momentum,
    every step on the device.

    ``train_step(x, labels)`` takes device arrays (float32 batch, int32 (M,) labels) and
    returns the batch loss as a (1,) device array (read it when needed: nothing else
    comes to the host); ``predict(x)`` returns the classes, with the search on."""

    def __init__(self, params: FlatParameters, layers: Sequence):
        self.params, self.queue, self.layers = params, params.queue, list(layers)

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

    def capture_step(self, x: cl_array.Array, labels: cl_array.Array, lr: float = 0.05,
                     momentum: float = 0.9, weight_decay: float = 0.0) -> "ReplayedStep":
        """Run one :meth:`train_step` on (x, labels) while recording its launches in a
        :class:`~pysparsecl.LaunchGraph`, and return it as a :class:`ReplayedStep`: each
        later step is then one replay, with every kernel argument already set and nothing
        allocated.  The hyperparameters are fixed at capture.  Masks drawn on the host
        (``"random"``, ``"oracle"``) cannot be captured (``NotImplementedError``)."""
        for name, a in (("x", x), ("labels", labels)):
            if not isinstance(a, cl_array.Array):
                raise TypeError(f"{name} must be a pyopencl.array.Array, got "
                                f"{type(a).__name__}")
        graph = runtime.LaunchGraph(self.queue, inputs=(x, labels))
        with graph:
            loss = self.train_step(x, labels, lr, momentum, weight_decay)
        return ReplayedStep(graph, loss)

    def predict(self, x) -> np.ndarray:
        """The predicted classes (NumPy int64) of a batch, the search on as in training."""
        x_dev = x if isinstance(x, cl_array.Array) else \
            cl_array.to_device(self.queue, np.ascontiguousarray(x, np.float32))
        return self.forward(x_dev, training=False).get().argmax(axis=1)


class ReplayedStep:
    """A training step recorded by :meth:`Sequential.capture_step`.

    ``step(x, labels)`` copies the batch into the recorded inputs (NumPy or device arrays
    of the captured shapes and dtypes; others raise ``ValueError``), replays every launch
    of the step and returns the loss as the same (1,) device array each time, overwritten
    by the next replay: read it (``.get()``) before then when it is wanted."""

    def __init__(self, graph: "runtime.LaunchGraph", loss: cl_array.Array):
        self.graph, self.loss = graph, loss

    def __call__(self, x, labels) -> cl_array.Array:
        self.graph.replay(x, labels)
        return self.loss


def _keeps_projection(queue, keep_projection: Optional[bool]) -> bool:
    """Whether search layers keep f(w) as a parameter: by default on CPU devices, where
    it measured 8% faster per step (the digits MLP and the compute-bound set, PoCL); on
    the H200 the gradient f(dw) through the CPU-shaped masked backward cost more than the
    GPU's projection of w (1.66 against 1.32 ms per digits step)."""
    if keep_projection is None:
        return runtime.device_kind(queue.device) == "cpu"
    if not isinstance(keep_projection, bool):
        raise TypeError(f"keep_projection must be a bool or None, got {keep_projection!r}")
    return keep_projection


def _linear_stack(queue, rng, widths, sparsity, mask, seed, eps, keep_projection,
                  propagate=False):
    """The initial parameters and the DSGLinear arguments of linear layers ``widths[0] ->
    ... -> widths[-1]``: DSG (ReLU, the selection) on all but the last, a dense output
    layer; with ``keep_projection`` a search layer also keeps f(w) as a parameter
    ``fc<i>.fw``; with ``propagate`` the DSG layers pass compact activations on."""
    keep = _keeps_projection(queue, keep_projection)
    initial, specs = {}, []
    last = len(widths) - 2
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        initial[f"fc{i}.w"] = _he_init(rng, a, (b, a))
        initial[f"fc{i}.b"] = np.zeros(b, np.float32)
        kind = mask if i < last and sparsity > 0 else "dense"
        spec = dict(name=f"fc{i}", sparsity=sparsity if i < last else 0.0, mask=kind,
                    relu=i < last, seed=seed + i, eps=eps, propagate=propagate and i < last)
        if kind == "drs":
            spec["projection"] = SparseRandomProjection(a, eps=eps, seed=seed + i, queue=queue)
        if kind == "drs" and keep:
            initial[f"fc{i}.fw"] = np.zeros(spec["projection"].weight_layout(b, queue),
                                            np.float32)
        specs.append(spec)
    return initial, specs


def _check_sizes(sizes, name: str) -> None:
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
           for s in sizes):
        raise ValueError(f"{name} must be positive ints, got {sizes!r}")


class MLP(Sequential):
    """A DSG multilayer perceptron: hidden :class:`DSGLinear` layers with ReLU under the
    chosen selection, then a dense output layer.

    ``sizes`` = (in, hidden..., classes).  ``mask`` and ``sparsity`` apply to the hidden
    layers.  Inputs are float32 (M, in).  ``keep_projection``: whether the search layers
    keep f(w) as a parameter (see :class:`DSGLinear`); None: on CPU devices, where it
    measured faster.  ``propagate``: the hidden layers pass their outputs on as
    :class:`CompactRows` (see :class:`DSGLinear`), forward and backward; the results are
    those of the dense form up to float32 rounding."""

    def __init__(self, sizes: Sequence[int], sparsity: float, mask: str = "drs", seed: int = 0,
                 queue=None, eps: float = 0.3, keep_projection: Optional[bool] = None,
                 propagate: bool = False):
        if len(sizes) < 2:
            raise ValueError(f"sizes must be two or more positive ints, got {sizes!r}")
        _check_sizes(sizes, "sizes")
        if not isinstance(propagate, bool):
            raise TypeError(f"propagate must be a bool, got {type(propagate).__name__}")
        queue = runtime.get_queue(queue)
        initial, specs = _linear_stack(queue, np.random.default_rng(seed), sizes, sparsity,
                                       mask, seed + 1, eps, keep_projection, propagate)
        params = FlatParameters(queue, initial)
        super().__init__(params, [DSGLinear(params, **spec) for spec in specs])


class CNN(Sequential):
    """A DSG convolutional network: 3x3 :class:`DSGConv2d` layers (padding 1, ReLU and
    BatchNorm with the double mask), each after the first followed by 2x2 max pooling,
    then hidden :class:`DSGLinear` layers and a dense output layer.

    ``in_shape`` = (C, H, W) of an image; ``channels``: the conv layers' output channels;
    ``hidden``: the hidden linear layers' widths; ``mask`` and ``sparsity`` apply to every
    conv and hidden layer.  Inputs are float32 (N, C, H, W).  ``keep_projection``: as
    for :class:`MLP`, for the hidden linear layers."""

    def __init__(self, in_shape: Sequence[int], channels: Sequence[int], hidden: Sequence[int],
                 classes: int, sparsity: float, mask: str = "drs", seed: int = 0, queue=None,
                 eps: float = 0.3, keep_projection: Optional[bool] = None):
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {in_shape!r}")
        _check_sizes(in_shape, "in_shape")
        _check_sizes(channels, "channels")
        _check_sizes(hidden, "hidden")
        _check_sizes([classes], "classes")
        if not channels:
            raise ValueError("channels must name at least one conv layer")
        queue = runtime.get_queue(queue)
        rng = np.random.default_rng(seed)
        c, h, w = in_shape
        initial, plan = {}, []
        for i, k in enumerate(channels):
            initial[f"conv{i}.w"] = _he_init(rng, c * 9, (k, c, 3, 3))
            initial[f"conv{i}.gamma"] = np.ones(k, np.float32)
            initial[f"conv{i}.beta"] = np.zeros(k, np.float32)
            plan.append(("conv", i))
            c = k
            if i > 0:
                if h < 2 or w < 2:
                    raise ValueError(f"in_shape {tuple(in_shape)} is too small for "
                                     f"{len(channels)} conv layers (each after the first "
                                     "halves the image)")
                h, w = h // 2, w // 2
                plan.append(("pool", i))
        fc_initial, specs = _linear_stack(queue, rng, [c * h * w, *hidden, classes], sparsity,
                                          mask, seed + 101, eps, keep_projection)
        initial.update(fc_initial)
        params = FlatParameters(queue, initial)
        layers: List = []
        for what, i in plan:
            layers.append(DSGConv2d(params, f"conv{i}", sparsity, mask, padding=1,
                                    seed=seed + 1 + i, eps=eps) if what == "conv"
                          else MaxPool2d(2))
        layers.append(Flatten())
        layers += [DSGLinear(params, **spec) for spec in specs]
        super().__init__(params, layers)
