"""The small ops of a training step on the device: ``softmax_cross_entropy`` (loss and
gradient in one pass), ``column_sums`` and ``channel_sums`` (bias gradients) and
``sgd_step`` (one update of every parameter at once, over flat arrays).  Kernels:
pysparsecl/families/training.py."""

from __future__ import annotations

import numpy as np
import pyopencl.array as cl_array

from .. import runtime, tuning
from ..families import training
from ._common import (
    INT32_MAX,
    check_alloc,
    check_out,
    deliver,
    is_device_array,
    new_output,
    require_array,
    to_device,
)

__all__ = ["softmax_cross_entropy", "column_sums", "channel_sums", "sgd_step"]


def _params(queue):
    return tuning.lookup(training.SPEC, queue.device, copy=False)


def _finite_number(value, name: str, minimum: float = -np.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


@runtime.capturable_op
def softmax_cross_entropy(logits, labels, *, grad_out=None, mean: bool = True, queue=None,
                          events=None):
    """Softmax cross-entropy of a batch, and its gradient, in one pass over the logits.

    ``loss = sum_i (logsumexp(logits[i]) - logits[i, labels[i]])``, divided by M when
    ``mean``; ``grad = d loss / d logits = (softmax(logits) - onehot(labels))`` (/ M).

    Parameters
    ----------
    logits : float32 (M, N), NumPy or pyopencl array.
    labels : int32 or int64 (M,), each in [0, N), the same kind of container as logits.
    grad_out : float32 (M, N), optional: where the gradient goes.
    mean : bool: average over the batch (as torch's default ``reduction="mean"``).
    queue, events : as for the other ops.

    Returns
    -------
    ``(loss, grad)``.  For NumPy logits, ``loss`` is a Python float and ``grad`` a NumPy
    array, and a label outside [0, N) raises ``ValueError``.  For device logits, ``loss``
    is a (1,) device array and ``grad`` a device array, both returned once enqueued:
    nothing comes to the host until ``loss.get()``; a label outside [0, N) then gives a
    NaN loss and NaN gradient rows.

    The gradient of each row is computed by one work-group from the row's maximum and
    its sum of exponentials (the shifted, overflow-free softmax); the batch loss is the
    sum of the rows' losses, by one more small kernel.  NumPy operands are handled as in
    the other ops (lent in place on a device that shares host memory).
    """
    require_array(logits, "logits", np.float32, ndim=2)
    if not isinstance(labels, (np.ndarray, cl_array.Array)):
        raise TypeError(f"labels must be a numpy.ndarray or pyopencl.array.Array, got "
                        f"{type(labels).__name__}")
    if labels.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"labels must have dtype int32 or int64, got {labels.dtype}")
    n_rows, n_cols = logits.shape
    if tuple(labels.shape) != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},) (a label per row of logits), "
                         f"got {tuple(labels.shape)}")
    if is_device_array(labels) != is_device_array(logits):
        raise TypeError("labels must be the same kind of container as logits (both NumPy "
                        "or both pyopencl arrays)")
    if n_rows == 0 or n_cols == 0:
        raise ValueError(f"logits must have at least one row and one column, got shape "
                         f"{(n_rows, n_cols)}")
    if not isinstance(mean, bool):
        raise TypeError(f"mean must be a bool, got {type(mean).__name__}")
    check_out(grad_out, logits.shape, np.float32, like=logits, name="grad_out")
    host = not is_device_array(logits)
    if host:
        lab = np.asarray(labels)
        if lab.size and (lab.min() < 0 or lab.max() >= n_cols):
            bad = int(np.flatnonzero((lab < 0) | (lab >= n_cols))[0])
            raise ValueError(f"labels must lie in [0, {n_cols}); labels[{bad}] = {lab[bad]}")
        labels = lab.astype(np.int32, copy=False)
    elif labels.dtype != np.int32:
        labels = labels.astype(np.int32)
    queue = runtime.resolve_queue(queue, logits=logits, labels=labels, grad_out=grad_out)
    if host:
        check_alloc(queue, logits.nbytes, "logits")
    params = _params(queue)
    alloc = runtime.memory_pool(queue.context)
    grad_dev, take = new_output(queue, logits.shape, np.float32, grad_out, like=logits,
                                slot="grad", inputs=(logits,))
    x_dev = to_device(logits, queue, "logits", borrow=host)
    lab_dev = to_device(labels, queue, "labels", borrow=host)
    row_loss = runtime.empty(queue, (n_rows, 1), np.float32, allocator=alloc)
    bad = runtime.empty(queue, (1,), np.int32, allocator=alloc)
    fill = runtime.enqueue_fill(queue, bad.data, np.int32(INT32_MAX), 0, 4)
    bad.add_event(fill)
    scale = 1.0 / n_rows if mean else 1.0
    training.launch_xent(queue, params, x_dev, lab_dev, grad_dev, row_loss, bad, scale,
                         events)
    loss = runtime.empty(queue, (1,), np.float32, allocator=alloc)
    training.launch_column_sums(queue, params, row_loss, loss, scale, events)
    grad = deliver(grad_dev, logits, grad_out, queue, take)
    if host:
        return float(loss.get(queue=queue)[0]), grad
    return loss, grad


@runtime.capturable_op
def column_sums(a, *, scale=1.0, out=None, queue=None, events=None):
    """``scale * a.sum(axis=0)`` of a float32 (M, N) array: the bias gradient of a layer
    ``y = x @ w + b`` is ``column_sums(dy)``.

    ``a`` may be a NumPy array or a pyopencl array whose rows are strided (a column slice
    of a wider array); ``out`` (N,) float32, optional, of the same kind of container.  A
    NumPy call returns a NumPy array when the result is ready; a device call returns once
    enqueued.  A work-item sums one column, in row order (the same order on every run).
    """
    if not isinstance(a, (np.ndarray, cl_array.Array)):
        raise TypeError(f"a must be a numpy.ndarray or pyopencl.array.Array, got "
                        f"{type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"a must have dtype float32, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"a must be 2-D (M, N), got shape {tuple(a.shape)}")
    if is_device_array(a) and (a.strides[1] != 4 or a.strides[0] % 4 or a.strides[0] < 0):
        raise ValueError("a: a device array's rows must each be contiguous (column slices "
                         "are fine; transposes are not)")
    return _sums(training.launch_column_sums, a, a.shape[1], scale, out, queue, events)


@runtime.capturable_op
def channel_sums(a, *, scale=1.0, out=None, queue=None, events=None):
    """``scale * a.sum(axis=(0, 2, 3, ...))`` of a float32 (N, C, ...) array: the bias
    gradient of a convolution ``y = conv(x, w) + b[:, None, None]`` is
    ``channel_sums(dy)``.

    ``a`` is a NumPy array or a contiguous pyopencl array, at least 2-D; ``out`` (C,)
    float32, optional, of the same kind of container.  A NumPy call returns a NumPy array
    when the result is ready; a device call returns once enqueued.  A work-item sums one
    channel, plane by plane in order (the same order on every run).
    """
    require_array(a, "a", np.float32)
    if a.ndim < 2:
        raise ValueError(f"a must be at least 2-D (N, C, ...), got shape {tuple(a.shape)}")
    if is_device_array(a) and not a.flags.c_contiguous:
        raise ValueError("a: a device array must be contiguous")
    return _sums(training.launch_channel_sums, a, a.shape[1], scale, out, queue, events)


def _sums(launch, a, n_out: int, scale, out, queue, events):
    """The shared body of the sums: ``launch`` writes n_out sums of ``a`` (validated by
    the caller but for ``scale`` and ``out``), delivered in a's container kind."""
    scale = _finite_number(scale, "scale")
    check_out(out, (n_out,), np.float32, like=a)
    queue = runtime.resolve_queue(queue, a=a, out=out)
    host = not is_device_array(a)
    if host:
        a = np.ascontiguousarray(a)
        check_alloc(queue, a.nbytes, "a")
    out_dev, take = new_output(queue, (n_out,), np.float32, out, like=a, inputs=(a,))
    if n_out:
        launch(queue, _params(queue), to_device(a, queue, "a", borrow=host), out_dev, scale,
               events)
    return deliver(out_dev, a, out, queue, take)


@runtime.capturable_op
def sgd_step(param, grad, velocity=None, *, lr, momentum=0.0, weight_decay=0.0, queue=None,
             events=None):
    """One SGD step, in place, with one launch for every parameter of a model:
    ``g = grad + weight_decay * param``; with ``velocity``: ``velocity = momentum *
    velocity + g`` and ``param -= lr * velocity`` (torch.optim.SGD's update); without:
    ``param -= lr * g``.

    Give every parameter of a model as a view into one flat buffer
    (:class:`pysparsecl.dsg.FlatParameters` does) and call this once per step on the flat
    ``param``, ``grad`` and ``velocity``: a step is then one launch, whatever the number
    of tensors.

    Parameters
    ----------
    param, grad, velocity : float32 pyopencl arrays of one shape, contiguous; ``param``
        and ``velocity`` are updated in place.  (Device arrays only: an optimizer's state
        lives on the device.)
    lr : float >= 0; momentum : float >= 0 (needs ``velocity`` when nonzero);
    weight_decay : float >= 0.

    Returns ``param``, once the update is enqueued.
    """
    for name, a in (("param", param), ("grad", grad), ("velocity", velocity)):
        if a is None and name == "velocity":
            continue
        if not is_device_array(a):
            raise TypeError(f"{name} must be a pyopencl.array.Array (sgd_step updates "
                            f"device state in place), got {type(a).__name__}")
        require_array(a, name, np.float32)
        if tuple(a.shape) != tuple(param.shape):
            raise ValueError(f"{name} must have param's shape {tuple(param.shape)}, got "
                             f"{tuple(a.shape)}")
    lr = _finite_number(lr, "lr", 0.0)
    momentum = _finite_number(momentum, "momentum", 0.0)
    weight_decay = _finite_number(weight_decay, "weight_decay", 0.0)
    if momentum and velocity is None:
        raise ValueError("momentum needs a velocity array")
    if velocity is not None and (velocity.base_data == param.base_data or
                                 velocity.base_data == grad.base_data):
        raise ValueError("velocity must not share its buffer with param or grad")
    queue = runtime.resolve_queue(queue, param=param, grad=grad, velocity=velocity)
    if param.size:
        training.launch_sgd(queue, _params(queue), param, grad, velocity, lr, momentum,
                            weight_decay, events)
    return param
