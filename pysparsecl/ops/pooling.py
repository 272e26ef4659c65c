"""2-D pooling on the device: ``max_pool2d`` and ``avg_pool2d`` and their backward passes,
with torch.nn.functional's semantics (floor-mode output size, dilation 1).  A global
average pool is ``avg_pool2d(x, (H, W))``.  Kernels: pysparsecl/families/pooling.py."""

from __future__ import annotations

import math
import numbers
from typing import Tuple

import numpy as np

from .. import runtime, tuning
from ..families import pooling
from ._common import (
    check_int32_sizes,
    check_out,
    deliver,
    int_pair,
    is_device_array,
    new_output,
    require_array,
    to_device,
)

__all__ = ["POOLING", "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward"]

POOLING = pooling.SPEC

_COPIES = """
    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends its inputs and its new results to the kernel in place, with no copy (a
    non-contiguous NumPy input is made contiguous first), except that operands up to
    256 KiB go through a staging buffer the thread keeps (a memcpy); elsewhere they are
    copied to and from the device.  A NumPy call returns when its result is ready; a
    device-array call returns once it is enqueued.  Nothing is cached but the built
    kernels: the geometry travels as kernel arguments, so every shape shares one program
    per kind of pooling."""


def _documented(fn):
    """``fn`` with the paragraph on copies and caching at the end of its docstring."""
    if fn.__doc__ is not None:        # None under python -OO
        fn.__doc__ = fn.__doc__.rstrip() + "\n" + _COPIES
    return fn


def _params(queue):
    return tuning.lookup(POOLING, queue.device, copy=False)


def _flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _window(in_hw: Tuple[int, int], kernel_size, stride, padding) -> pooling.Window:
    """The validated geometry of a pooling of an (H, W) plane."""
    kernel = int_pair(kernel_size, "kernel_size", 1)
    stride = kernel if stride is None else int_pair(stride, "stride", 1)
    padding = int_pair(padding, "padding", 0)
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise ValueError(f"padding must be at most half the kernel size (kernel_size "
                         f"{kernel}), got {padding}")
    out_hw = tuple((n + 2 * p - k) // s + 1
                   for n, k, s, p in zip(in_hw, kernel, stride, padding))
    if min(out_hw) < 1:
        raise ValueError(f"kernel_size {kernel} with padding {padding} does not fit the "
                         f"{in_hw[0]}x{in_hw[1]} input plane: the output would be "
                         f"{out_hw[0]}x{out_hw[1]}")
    return pooling.Window(tuple(in_hw), out_hw, kernel, stride, padding)


def _backward_window(dy, input_shape, kernel_size, stride, padding):
    """(input_shape as a tuple, the geometry), checked against ``dy``'s shape."""
    if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 4 and
            all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
                for v in input_shape)):
        raise TypeError(f"input_shape must be a tuple of 4 ints (N, C, H, W), got "
                        f"{input_shape!r}")
    shape = tuple(int(v) for v in input_shape)
    if min(shape) < 0:
        raise ValueError(f"input_shape must not be negative, got {shape}")
    if shape[:2] != tuple(dy.shape[:2]):
        raise ValueError(f"input_shape {shape} must have dy's N and C, "
                         f"{tuple(dy.shape[:2])}")
    window = _window(shape[2:], kernel_size, stride, padding)
    if window.out_hw != tuple(dy.shape[2:]):
        raise ValueError(f"input_shape {shape} with kernel_size {window.kernel}, stride "
                         f"{window.stride} and padding {window.padding} pools to "
                         f"{window.out_hw[0]}x{window.out_hw[1]}, but dy is "
                         f"{dy.shape[2]}x{dy.shape[3]}")
    return shape, window


def _forward(kind, x, window, out, with_indices, count_include_pad, queue, events):
    out_shape = tuple(x.shape[:2]) + window.out_hw
    check_out(out, out_shape, np.float32, like=x)
    check_int32_sizes(x=x.size, out=math.prod(out_shape))
    queue = runtime.resolve_queue(queue, x=x, out=out)
    host = not is_device_array(x)
    y_dev, take = new_output(queue, out_shape, np.float32, out, like=x, inputs=(x,))
    idx_dev = take_idx = None
    if with_indices:
        idx_dev, take_idx = new_output(queue, out_shape, np.int32, None, like=x,
                                       slot="indices")
    if y_dev.size:
        x_dev = to_device(x, queue, "x", borrow=host)
        pooling.launch_forward(queue, _params(queue), kind, x_dev, y_dev, window, events,
                               indices=idx_dev, count_include_pad=count_include_pad)
    y = deliver(y_dev, x, out, queue, take)
    if idx_dev is None:
        return y
    return y, deliver(idx_dev, x, None, queue, take_idx)


def _backward(kind, dy, indices, input_shape, window, out, count_include_pad, queue, events):
    check_out(out, input_shape, np.float32, like=dy)
    check_int32_sizes(dy=dy.size, dx=math.prod(input_shape))
    queue = runtime.resolve_queue(queue, dy=dy, indices=indices, out=out)
    host = not is_device_array(dy)
    inputs = (dy,) if indices is None else (dy, indices)
    dx_dev, take = new_output(queue, input_shape, np.float32, out, like=dy, inputs=inputs)
    if dx_dev.size:
        dy_dev = to_device(dy, queue, "dy", borrow=host)
        idx_dev = None if indices is None else to_device(indices, queue, "indices",
                                                         borrow=host)
        pooling.launch_backward(queue, _params(queue), kind, dy_dev, dx_dev, window, events,
                                indices=idx_dev, count_include_pad=count_include_pad)
    return deliver(dx_dev, dy, out, queue, take)


@runtime.capturable_op
@_documented
def max_pool2d(x, kernel_size, stride=None, padding=0, *, return_indices=False, out=None,
               queue=None, events=None):
    """2-D max pooling, as ``torch.nn.functional.max_pool2d`` (dilation 1, floor mode).

    Parameters
    ----------
    x : float32 (N, C, H, W), NumPy or pyopencl array.
    kernel_size : int or (kh, kw) pair, each >= 1.
    stride : int or (sh, sw) pair, each >= 1; default ``kernel_size``.
    padding : int or (ph, pw) pair, each at most half its kernel size (as torch requires).
        Padded cells never win: they act as -inf.
    return_indices : bool: also return where each maximum came from.
    out : float32 (N, C, OH, OW), optional; the same kind of container as ``x``.
    queue : pyopencl.CommandQueue, optional; events : list, optional (the kernel's event
        is appended, for profiling).

    Returns
    -------
    The (N, C, OH, OW) float32 maxima, ``OH = (H + 2 ph - kh) // sh + 1`` (OW alike), in
    the kind of container ``x`` came in; with ``return_indices``, ``(out, indices)``:
    int32 (N, C, OH, OW), the winner's flat index ``h * W + w`` into its (unpadded) input
    plane, torch's convention (torch gives int64; these are int32), the input of
    :func:`max_pool2d_backward`.

    A NaN in a window wins, as in torch (the last NaN in the window, in row-major order,
    gives the index); among equal maxima the first in row-major order wins, as torch on
    the CPU.  A window of -inf gives -inf and its first in-bounds cell.
    """
    require_array(x, "x", np.float32, ndim=4)
    window = _window(tuple(x.shape[2:]), kernel_size, stride, padding)
    with_indices = _flag(return_indices, "return_indices")
    return _forward("max", x, window, out, with_indices, False, queue, events)


@runtime.capturable_op
@_documented
def avg_pool2d(x, kernel_size, stride=None, padding=0, *, count_include_pad=True, out=None,
               queue=None, events=None):
    """2-D average pooling, as ``torch.nn.functional.avg_pool2d`` (floor mode, no
    divisor override).  A global average pool, the usual head of a CNN, is
    ``avg_pool2d(x, x.shape[2:])``: (N, C, 1, 1).

    Parameters
    ----------
    x : float32 (N, C, H, W), NumPy or pyopencl array.
    kernel_size, stride, padding : as for :func:`max_pool2d`; padded cells hold zeros.
    count_include_pad : bool: divide by ``kh * kw`` (True, torch's default) or by the
        number of the window's cells inside the input.
    out : float32 (N, C, OH, OW), optional; the same kind of container as ``x``.
    queue, events : as for :func:`max_pool2d`.

    Returns
    -------
    The (N, C, OH, OW) float32 averages, in the kind of container ``x`` came in.  Each is
    the window's sum in row-major order, divided once, as torch on the CPU computes it.
    """
    require_array(x, "x", np.float32, ndim=4)
    window = _window(tuple(x.shape[2:]), kernel_size, stride, padding)
    count_pad = _flag(count_include_pad, "count_include_pad")
    return _forward("avg", x, window, out, False, count_pad, queue, events)


@runtime.capturable_op
@_documented
def max_pool2d_backward(dy, indices, input_shape, kernel_size, stride=None, padding=0, *,
                        out=None, queue=None, events=None):
    """The input gradient of :func:`max_pool2d`: each ``dy`` entry goes to its window's
    winner, summed where windows overlap.

    Parameters
    ----------
    dy : float32 (N, C, OH, OW), NumPy or pyopencl array: the gradient of the output.
    indices : int32 (N, C, OH, OW), the forward's ``return_indices`` result, the same
        kind of container as ``dy``.  (Convert torch's int64 indices to int32 first.)
    input_shape : (N, C, H, W), the forward's input shape.
    kernel_size, stride, padding : the forward's; they must pool ``input_shape`` to
        ``dy``'s (OH, OW).  The kernel needs them to find the windows that cover an input.
    out : float32 (N, C, H, W), optional; the same kind of container as ``dy``.
    queue, events : as for :func:`max_pool2d`.

    Returns
    -------
    The (N, C, H, W) float32 gradient of the input, in the kind of container ``dy`` came
    in.  It is a gather: a work-item per input sums, over the windows that cover it, the
    ``dy`` of those whose index names it, in the windows' row-major order (the order of
    torch's CPU scatter).  No atomics: the same result on every run.  NumPy indices
    outside [0, H * W) raise ``ValueError``; on the device, an index that does not lie in
    its own window routes nothing.
    """
    require_array(dy, "dy", np.float32, ndim=4)
    if getattr(indices, "dtype", None) == np.int64:
        raise TypeError("indices must have dtype int32, got int64 (torch's indices: convert "
                        "them with .astype(np.int32) or .to(torch.int32))")
    require_array(indices, "indices", np.int32, ndim=4)
    if tuple(indices.shape) != tuple(dy.shape):
        raise ValueError(f"indices must have dy's shape {tuple(dy.shape)}, got "
                         f"{tuple(indices.shape)}")
    if is_device_array(indices) != is_device_array(dy):
        raise TypeError("indices must be the same kind of container as dy (both NumPy or "
                        "both pyopencl arrays)")
    shape, window = _backward_window(dy, input_shape, kernel_size, stride, padding)
    if not is_device_array(indices) and indices.size:
        plane = shape[2] * shape[3]
        if indices.min() < 0 or indices.max() >= plane:
            bad = np.unravel_index(np.flatnonzero((indices < 0) | (indices >= plane))[0],
                                   indices.shape)
            raise ValueError(f"indices must lie in [0, {plane}) (H * W of input_shape); "
                             f"indices[{', '.join(map(str, bad))}] = {indices[bad]}")
    return _backward("max_grad", dy, indices, shape, window, out, False, queue, events)


@runtime.capturable_op
@_documented
def avg_pool2d_backward(dy, input_shape, kernel_size, stride=None, padding=0, *,
                        count_include_pad=True, out=None, queue=None, events=None):
    """The input gradient of :func:`avg_pool2d`: each input gets ``dy / divisor`` of every
    window that covers it.

    Parameters
    ----------
    dy : float32 (N, C, OH, OW), NumPy or pyopencl array: the gradient of the output.
    input_shape : (N, C, H, W), the forward's input shape.
    kernel_size, stride, padding, count_include_pad : the forward's; they must pool
        ``input_shape`` to ``dy``'s (OH, OW).
    out : float32 (N, C, H, W), optional; the same kind of container as ``dy``.
    queue, events : as for :func:`max_pool2d`.

    Returns
    -------
    The (N, C, H, W) float32 gradient of the input, in the kind of container ``dy`` came
    in: a gather, as in :func:`max_pool2d_backward`, summing ``dy / divisor`` over the
    covering windows in row-major order (torch's CPU order and rounding).  Inputs that no
    window covers (a stride larger than the kernel) get 0.
    """
    require_array(dy, "dy", np.float32, ndim=4)
    shape, window = _backward_window(dy, input_shape, kernel_size, stride, padding)
    count_pad = _flag(count_include_pad, "count_include_pad")
    return _backward("avg_grad", dy, None, shape, window, out, count_pad, queue, events)
