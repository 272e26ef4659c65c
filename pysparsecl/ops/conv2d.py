"""``conv2d_sparse``: direct sparse convolution with CSR weights -- validation, the prepared
weight and its launch plans, delivery; the kernels are the family
pysparsecl/families/conv2d_csr.py."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import scipy.sparse as sp

from .. import runtime, tuning
from ..families import conv2d_csr, conv2d_pack_flat, conv2d_pack_rows
from ..params import Choice, Routine
from ._common import (
    INT32_MAX,
    check_alloc,
    check_out,
    deliver,
    int_pair,
    is_device_array,
    new_output,
    require_array,
    to_device,
)
from ._prepared import PreparedCache

__all__ = ["CONV2D_CSR", "CONV2D_ROUTINE", "SparseConvWeight", "conv2d_sparse",
           "conv2d_output_shape", "fold_batchnorm"]

CONV2D_CSR = conv2d_csr.SPEC
template_args = conv2d_csr.template_args
conv2d_shape_class = conv2d_csr.shape_class

#: Which packing pass feeds the convolution: looked up per device and shape class (the
#: tuner found the flat pass faster on some CPU layers, the row pass on some GPU ones).
_PACK_FAMILIES = (conv2d_pack_rows, conv2d_pack_flat)
CONV2D_ROUTINE = Routine(
    "conv2d_sparse",
    (Choice("PACK_KERNEL", tuple(f.SPEC for f in _PACK_FAMILIES),
            "the input packing: PACK_LANES work-items per row (CPUs), or one flat pass "
            "(GPUs)"),),
)


def conv2d_output_shape(in_hw, kernel_size, stride=1, padding=0, dilation=1) -> Tuple[int, int]:
    """(OH, OW) of a convolution, exactly as torch.nn.functional.conv2d defines it."""
    (h, w), (r, s) = in_hw, kernel_size
    (sh, sw), (ph, pw), (dh, dw) = (int_pair(stride, "stride", 1), int_pair(padding, "padding", 0),
                                    int_pair(dilation, "dilation", 1))
    return ((h + 2 * ph - dh * (r - 1) - 1) // sh + 1, (w + 2 * pw - dw * (s - 1) - 1) // sw + 1)


def _canonical_csr(w_csr, name: str = "w_csr") -> sp.csr_matrix:
    """Validate a SciPy CSR weight; return a float32 copy, sorted, duplicates summed."""
    if not sp.issparse(w_csr):
        raise TypeError(f"{name} must be a scipy.sparse CSR matrix or array, "
                        f"got {type(w_csr).__name__}")
    if w_csr.format != "csr":
        raise TypeError(f"{name} must be in CSR format, got {w_csr.format!r}; convert it with "
                        ".tocsr()")
    if len(w_csr.shape) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {w_csr.shape}")
    if not np.issubdtype(w_csr.dtype, np.floating):
        raise TypeError(f"{name} must hold floating-point values, got {w_csr.dtype}")
    n_rows, n_cols = w_csr.shape
    indptr, indices, data = (np.asarray(w_csr.indptr), np.asarray(w_csr.indices),
                             np.asarray(w_csr.data))
    if indptr.ndim != 1 or indptr.shape[0] != n_rows + 1:
        raise ValueError(f"{name}.indptr must have length rows + 1 = {n_rows + 1}, "
                         f"got shape {indptr.shape}")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}.indptr must start at 0 and never decrease")
    nnz = int(indptr[-1])
    if indices.shape != (nnz,) or data.shape != (nnz,):
        raise ValueError(f"{name}: indptr[-1] = {nnz} but indices has {indices.shape[0]} and "
                         f"data has {data.shape[0]} entries")
    if nnz and (indices.min() < 0 or indices.max() >= n_cols):
        raise ValueError(f"{name}.indices must lie in [0, {n_cols}); found "
                         f"{int(indices.min())}..{int(indices.max())}")
    if nnz > INT32_MAX:
        raise ValueError(f"{name} has {nnz} nonzeros, more than int32 indexing allows")
    # Duplicates are summed and indices sorted: the matrix toarray() would give, canonically.
    canonical = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int32),
                               indptr.astype(np.int64)), shape=(n_rows, n_cols))
    canonical.sum_duplicates()
    canonical.sort_indices()
    return canonical


def fold_batchnorm(w_csr, bias, gamma, beta, mean, var, eps: float = 1e-5
                   ) -> Tuple[sp.csr_matrix, np.ndarray]:
    """Fold an inference BatchNorm that follows a convolution into the convolution.

    ``BN(conv(x, W) + b) = conv(x, W') + b'`` with ``s = gamma / sqrt(var + eps)``,
    ``W' = s[k] * W[k]`` (row k of the CSR weight) and ``b' = (b - mean) * s + beta``.

    Parameters
    ----------
    w_csr : scipy.sparse CSR matrix (K, C/groups * R * S), as for :func:`conv2d_sparse`.
    bias : array (K,) or None (no bias before the BatchNorm).
    gamma, beta, mean, var : arrays (K,): the BatchNorm's weight, bias and running
        statistics.
    eps : float >= 0, the BatchNorm's epsilon.

    Returns
    -------
    ``(w_folded, b_folded)``: a new float32 CSR matrix with the same sparsity pattern
    (computed in float64) and a float32 (K,) bias.
    """
    csr = _canonical_csr(w_csr)
    n_out = csr.shape[0]
    stats = {}
    for name, a in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var),
                    ("bias", bias)):
        if a is None and name == "bias":
            continue
        a = np.asarray(a)
        if a.shape != (n_out,) or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"{name} must be a numeric array of shape ({n_out},) (the rows "
                             f"of w_csr), got {a.dtype} {a.shape}")
        stats[name] = a.astype(np.float64)
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or \
            not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    denom = stats["var"] + float(eps)
    if np.any(denom <= 0):
        raise ValueError("var + eps must be positive for every channel")
    scale = stats["gamma"] / np.sqrt(denom)
    data = csr.data.astype(np.float64) * np.repeat(scale, np.diff(csr.indptr))
    folded = sp.csr_matrix((data.astype(np.float32), csr.indices.copy(), csr.indptr.copy()),
                           shape=csr.shape)
    b = stats.get("bias", np.zeros(n_out))
    return folded, ((b - stats["mean"]) * scale + stats["beta"]).astype(np.float32)


def _kernel_size(n_cols: int, cin_per_group: int, kernel_size) -> Tuple[int, int]:
    if kernel_size is not None:
        r, s = int_pair(kernel_size, "kernel_size", 1)
        if cin_per_group * r * s != n_cols:
            raise ValueError(f"w_csr has {n_cols} columns but kernel_size={(r, s)} needs "
                             f"in_channels/groups * R * S = {cin_per_group} * {r} * {s} = "
                             f"{cin_per_group * r * s}")
        return r, s
    if cin_per_group == 0 or n_cols % cin_per_group:
        raise ValueError(f"w_csr has {n_cols} columns, not a multiple of in_channels/groups = "
                         f"{cin_per_group}: channels and weight columns do not match")
    taps = n_cols // cin_per_group
    side = math.isqrt(taps)
    if side * side != taps:
        raise ValueError(f"cannot infer a square kernel from {taps} taps per channel; "
                         "pass kernel_size=(R, S)")
    return side, side


@dataclass(frozen=True)
class _Geometry:
    """Everything a launch needs that depends on the input shape and conv arguments."""
    N: int
    H: int
    W: int
    OH: int
    OW: int
    Hq: int
    Wq: int
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    #: Stride phases in the packed input: stride_h * stride_w, or 1 where every tap falls
    #: on phase 0 (a 1x1 kernel): then only the input pixels the taps read are packed.
    phases: int


class SparseConvWeight:
    """A CSR convolution weight prepared once and kept on the device.

    Parameters
    ----------
    w_csr : scipy.sparse CSR matrix or array, shape (K, in_channels/groups * R * S)
        Columns ordered (c, r, s), as ``w.reshape(K, -1)`` orders a dense (K, C/g, R, S)
        weight.  Duplicate entries are summed and unsorted indices sorted (the matrix
        ``toarray()`` describes); malformed CSR raises ``ValueError``.
    in_channels : int
        C, the input channels of the convolution.
    kernel_size : int or (R, S), optional
        Inferred as a square kernel when omitted.
    groups : int
        Must divide both ``in_channels`` and K.
    queue : pyopencl.CommandQueue, optional
        Where the weight lives; the default queue otherwise.

    The input offsets that the kernel reads are derived from the column indices once per
    input geometry and cached, and so is each geometry's launch plan (kernels, work sizes,
    arguments; the 32 most recently used), so repeated calls on the same shape do no host
    work beyond the enqueues: the packing pass and the convolution, or the convolution
    alone where the packed layout is the input's own (stride 1, no padding, one float per
    packed pixel: 1x1 layers at batch 1 mostly), which then reads the input in place.
    """

    def __init__(self, w_csr, in_channels: int, kernel_size=None, groups: int = 1,
                 queue: Optional[cl.CommandQueue] = None):
        if not isinstance(in_channels, (int, np.integer)) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        csr = _canonical_csr(w_csr)
        n_out = csr.shape[0]
        if in_channels % groups:
            raise ValueError(f"groups={groups} does not divide in_channels={in_channels}")
        if n_out % groups:
            raise ValueError(f"groups={groups} does not divide the output channels "
                             f"K={n_out} (rows of w_csr)")
        self.in_channels = int(in_channels)
        self.out_channels = n_out
        self.groups = int(groups)
        self.kernel_size = _kernel_size(csr.shape[1], self.in_channels // self.groups,
                                        kernel_size)
        self.nnz = csr.nnz
        self.queue = runtime.get_queue(queue)
        self._csr = csr
        # Heaviest rows first: work-groups that start together finish together.
        row_nnz = np.diff(csr.indptr)
        order = np.argsort(-row_nnz, kind="stable").astype(np.int32)
        alloc = runtime.memory_pool(self.queue.context)
        self.row_ptr = cl_array.to_device(self.queue, csr.indptr.astype(np.int32),
                                          allocator=alloc)
        self.row_order = cl_array.to_device(self.queue, _nonempty(order, np.int32),
                                            allocator=alloc)
        self._nonzeros: Dict[tuple, cl_array.Array] = {}
        self._segments: Dict[int, cl_array.Array] = {}
        self._plans: Dict[tuple, conv2d_csr.Plan] = {}   # launch plans, least recently used first
        self._calls: Dict[tuple, "_RepeatedCall"] = {}   # validated device-array calls
        self._lock = threading.Lock()

    @property
    def shape(self) -> Tuple[int, int]:
        return self._csr.shape

    def to_dense(self) -> np.ndarray:
        """The (K, C/groups, R, S) float32 dense weight this object represents."""
        r, s = self.kernel_size
        return self._csr.toarray().reshape(self.out_channels, -1, r, s)

    def nonzeros(self, geom: _Geometry, pixel_floats: int) -> cl_array.Array:
        """(nnz, 2) int32 pairs for ``geom``: the offset in floats into one group's packed
        input (``pixel_floats`` floats per packed pixel) and the bits of the float32 value,
        so the kernel fetches both in one load (cached)."""
        key = (geom.Hq, geom.Wq, geom.stride, geom.dilation, pixel_floats)
        with self._lock:
            pairs = self._nonzeros.get(key)
            if pairs is None:
                host = np.empty((max(self.nnz, 1), 2), np.int32)
                host[:] = 0
                host[:self.nnz, 0] = self._host_offsets(geom) * pixel_floats
                host[:self.nnz, 1] = self._csr.data.astype(np.float32).view(np.int32)
                pairs = self._nonzeros[key] = cl_array.to_device(
                    self.queue, host, allocator=runtime.memory_pool(self.queue.context))
            return pairs

    def n_segments(self, cblock: int) -> int:
        """Segments of CBLOCK input channels per row (the last one may be shorter)."""
        return -(-(self.in_channels // self.groups) // cblock)

    def segments(self, cblock: int) -> cl_array.Array:
        """(K, n_segments + 1) int32: where each row's nonzeros for input channels
        [b * cblock, (b + 1) * cblock) start, and the row's end (cached per cblock)."""
        with self._lock:
            seg = self._segments.get(cblock)
            if seg is None:
                n_rows, n_seg = self.out_channels, self.n_segments(cblock)
                r, s = self.kernel_size
                indptr = self._csr.indptr.astype(np.int64)
                block = self._csr.indices // (cblock * r * s)
                row = np.repeat(np.arange(n_rows), np.diff(indptr))
                counts = np.bincount(row * n_seg + block, minlength=n_rows * n_seg)
                host = np.empty((n_rows, n_seg + 1), np.int64)
                host[:, 0] = indptr[:-1]
                host[:, 1:] = indptr[:-1, None] + np.cumsum(counts.reshape(n_rows, n_seg), 1)
                seg = self._segments[cblock] = cl_array.to_device(
                    self.queue, _nonempty(host.ravel(), np.int32),
                    allocator=runtime.memory_pool(self.queue.context))
            return seg

    def _host_offsets(self, geom: _Geometry) -> np.ndarray:
        """Each nonzero's offset into one group's packed input (in packed pixels).

        The offset depends on the column alone, so it is computed once per column (C/g *
        R * S of them) and gathered by the column indices: at 90% sparsity a tenth of the
        arithmetic of computing it per nonzero, which took ~5 ms on 236 k nonzeros."""
        r_size, s_size = self.kernel_size
        (sh, sw), (dh, dw) = geom.stride, geom.dilation
        c, rs = np.divmod(np.arange(self._csr.shape[1], dtype=np.int64), r_size * s_size)
        r, s = np.divmod(rs, s_size)
        phase = ((r * dh) % sh) * sw + (s * dw) % sw
        per_column = ((c * geom.phases + phase) * (geom.Hq * geom.Wq)
                      + ((r * dh) // sh) * geom.Wq + (s * dw) // sw)
        return per_column[self._csr.indices]


def _nonempty(a: np.ndarray, dtype) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.size else np.zeros(1, dtype)


#: _geometry's results for plain int arguments: (x shape, kernel, stride, padding,
#: dilation) -> _Geometry.  Only plain ints and pairs of them are keys, so that an argument
#: that validation refuses (True, 1.0, a list) is never answered from here.
_GEOMETRIES: Dict[tuple, "_Geometry"] = {}
_GEOMETRIES_MAX = 4096


def _plain_pair(v) -> bool:
    return type(v) is int or (type(v) is tuple and len(v) == 2 and type(v[0]) is int
                              and type(v[1]) is int)


def _geometry(x_shape, weight: SparseConvWeight, stride, padding, dilation) -> _Geometry:
    key = None
    if _plain_pair(stride) and _plain_pair(padding) and _plain_pair(dilation):
        key = (tuple(x_shape), weight.kernel_size, stride, padding, dilation)
        found = _GEOMETRIES.get(key)
        if found is not None:
            return found
    geom = _new_geometry(x_shape, weight, stride, padding, dilation)
    if key is not None and len(_GEOMETRIES) < _GEOMETRIES_MAX:
        _GEOMETRIES[key] = geom
    return geom


def _new_geometry(x_shape, weight: SparseConvWeight, stride, padding, dilation) -> _Geometry:
    n, _, h, w = x_shape
    stride = int_pair(stride, "stride", 1)
    padding = int_pair(padding, "padding", 0)
    dilation = int_pair(dilation, "dilation", 1)
    r, s = weight.kernel_size
    oh, ow = conv2d_output_shape((h, w), (r, s), stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output size would be {oh}x{ow} for input {h}x{w}, kernel {r}x{s}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}; "
                         "it must be positive")
    hq = oh + ((r - 1) * dilation[0]) // stride[0]
    wq = ow + ((s - 1) * dilation[1]) // stride[1]
    phase_zero = all(i * dilation[0] % stride[0] == 0 for i in range(r)) and \
        all(j * dilation[1] % stride[1] == 0 for j in range(s))
    phases = 1 if phase_zero else stride[0] * stride[1]
    return _Geometry(n, h, w, oh, ow, hq, wq, stride, padding, dilation, phases)


def conv2d_sparse(x, w_csr, bias=None, *, kernel_size=None, stride=1, padding=0, dilation=1,
                  groups=1, activation=None, residual=None, out=None, queue=None,
                  events=None):
    """2-D convolution of a dense NCHW input with a sparse (CSR) weight, with an optional
    fused epilogue: ``activation(conv2d(x, W, bias) + residual)``.

    Computes exactly ``torch.nn.functional.conv2d(x, W, bias, stride, padding, dilation,
    groups)`` with ``W = w_csr.toarray().reshape(K, C // groups, R, S)``, touching only the
    nonzero weights (direct sparse convolution, no im2col).

    Parameters
    ----------
    x : numpy.ndarray or pyopencl.array.Array, float32, shape (N, C, H, W)
    w_csr : scipy.sparse CSR matrix/array of shape (K, C/groups * R * S), or a
        :class:`SparseConvWeight` prepared once on the device.
    bias : array of shape (K,), optional
    kernel_size : int or (R, S), optional; a square kernel is inferred when omitted.
    stride, padding, dilation : int or (h, w) pair.
    groups : int, dividing both C and K.
    activation : None or "relu", applied last, in the convolution's store (ReLU keeps NaN,
        as ``torch.relu`` does).
    residual : array of the output's shape (N, K, OH, OW), float32, optional; added before
        the activation, read where each output is stored (a ResNet block's shortcut), so
        no separate elementwise pass runs.  The same container kind as x; it may be
        ``out`` itself.

    Calls on device arrays can be recorded and replayed with :class:`LaunchGraph`.
    out : array of shape (N, K, OH, OW), float32, optional; the same container kind as x.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    The (N, K, OH, OW) float32 result, in the kind of container ``x`` came in: a device
    array in gives a device array out, with no host round trip.

    Copies and caches
    -----------------
    A SciPy ``w_csr`` is prepared (canonical CSR, input offsets, launch plans) and, from
    its second call on, kept for the matrix object while it lives: every later call
    compares the matrix's ``indptr``, ``indices`` and ``data`` with a snapshot, while the
    kernels run, and computes again with a new preparation if they were edited, so an
    edit is never served stale (``pysparsecl.clear_weight_cache`` drops what is kept).
    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends ``x``, ``bias``, ``residual`` and a new result to the kernels in place, with no
    copy (operands up to 256 KiB go through a staging buffer the thread keeps, a memcpy,
    unless an earlier call passed the same memory: the same array again is lent); a new
    result takes the memory of an earlier result that nothing refers to any more, so a
    loop of calls does not page-fault fresh memory on every call;
    where the kernels work in host memory itself (PoCL), a NumPy ``out`` that overlaps
    neither ``x``, ``bias`` nor ``residual`` is written in place too; elsewhere operands
    are copied to and from the device.  A NumPy call returns when its
    result is ready; a device-array call returns once it is enqueued.

    On the device, the input is packed (padded, split into stride phases) into a scratch
    buffer, except where that layout is the input's own (stride 1, no padding, the pixel
    layout: 1x1 layers mostly): there a device array at offset 0 whose buffer has room for
    the tail the last pixel tile reads (an array from the memory pool, as every op's
    result is) is read in place, and any other input is copied.
    """
    if type(w_csr) is SparseConvWeight and type(x) is cl_array.Array and out is None:
        y = _repeated_call(x, w_csr, bias, kernel_size, stride, padding, dilation, groups,
                           activation, residual, queue, events)
        if y is not None:
            return y
    require_array(x, "x", np.float32, ndim=4)
    if runtime.capturing() and not is_device_array(x):
        raise ValueError("x must be a pyopencl array while a LaunchGraph is captured (a "
                         "NumPy call waits for its result and reuses host buffers)")
    confirm = None
    if isinstance(w_csr, SparseConvWeight):
        weight = w_csr
        if queue is None and not is_device_array(x):
            queue = weight.queue
        queue = runtime.resolve_queue(queue, x=x, bias=bias, residual=residual, out=out)
        if weight.queue.context != queue.context:
            raise ValueError("w_csr (a SparseConvWeight) lives in a different OpenCL context "
                             "than the queue the operation runs on")
    else:
        queue = runtime.resolve_queue(queue, x=x, bias=bias, residual=residual, out=out)
        if not is_device_array(x):  # refuse an oversized x before the weight is uploaded
            check_alloc(queue, x.nbytes, "x")
        weight, confirm = _prepared_weight(w_csr, x.shape[1], kernel_size, groups, queue)
    if out is None and type(x) is np.ndarray:
        y = _host_call(x, weight, confirm, bias, kernel_size, stride, padding, dilation,
                       groups, activation, residual, queue, events)
        if y is not None:
            return y
    call = _check_call(x, weight, bias, kernel_size, stride, padding, dilation, groups,
                       activation, residual, out)
    geom, relu = call.geom, call.relu

    # (A residual that is out itself is not lent: a weight edited since the last
    # call computes the output twice, and the second pass must read the residual.)
    out_dev, host = new_output(queue, call.out_shape, np.float32, out, like=x,
                               inputs=(x, bias, residual))
    if out_dev.size:
        borrow = not is_device_array(x)   # a NumPy call waits for its result
        x_dev = to_device(x, queue, "x", borrow)
        # The convolution reads the bias from the start of its buffer.
        bias_dev = (to_device(bias, queue, "bias", borrow, at_offset=False)
                    if bias is not None else None)
        res_dev = to_device(residual, queue, "residual", borrow) if residual is not None \
            else None
        epilogue = _Epilogue(bias_dev, res_dev, relu)
        _compute(queue, x_dev, weight, epilogue, out_dev, geom, events, call.shape_class)
        _recompute_if_edited(confirm, queue, x_dev, epilogue, out_dev, call, events)
    return deliver(out_dev, x, out, queue, host)


def _recompute_if_edited(confirm, queue, x_dev, epilogue: "_Epilogue", out_dev,
                         call: "_CallShape", events) -> None:
    """A kept weight is compared with w_csr's buffers (``confirm``, see
    :meth:`PreparedCache.lookup`) while the kernels run; if w_csr was edited since, the
    output is computed again, in order, with the new weight."""
    try:
        fresh = confirm() if confirm is not None else None
    except Exception:   # the edited w_csr is malformed: let the kernels finish with x
        queue.finish()
        raise
    if fresh is not None:
        _compute(queue, x_dev, fresh, epilogue, out_dev, call.geom, events, call.shape_class)


def _host_call(x: np.ndarray, weight: "SparseConvWeight", confirm, bias, kernel_size,
               stride, padding, dilation, groups, activation, residual, queue, events):
    """A NumPy call with no ``out`` (the card's call) through the validated calls that
    device-array calls keep (:func:`_repeated_lookup`): the operands are lent or staged
    as in the general path (:func:`to_device`), the result written as there
    (:func:`new_output`), and a kept weight confirmed while the kernels run.  Returns
    None, having enqueued nothing, for a call the general path must handle (and check)."""
    if x.dtype != np.float32 or x.ndim != 4 or runtime.capturing():
        return None
    for a in (bias, residual):
        if a is not None and (type(a) is not np.ndarray or a.dtype != np.float32):
            return None
    x_dev = to_device(x, queue, "x", True)
    bias_dev = to_device(bias, queue, "bias", True, at_offset=False) \
        if bias is not None else None
    res_dev = to_device(residual, queue, "residual", True) if residual is not None \
        else None
    if x_dev.queue is not queue:
        return None
    repeated = _repeated_lookup(x_dev, weight, bias_dev, kernel_size, stride, padding,
                                dilation, groups, activation, res_dev)
    if repeated is None:
        return None
    call = repeated.call
    out_dev, host = new_output(queue, call.out_shape, np.float32, None, like=x)
    _repeated_launch(repeated, x_dev, weight, bias_dev, res_dev, out_dev, events)
    _recompute_if_edited(confirm, queue, x_dev, _Epilogue(bias_dev, res_dev, call.relu),
                         out_dev, call, events)
    return deliver(out_dev, x, None, queue, host)


@dataclass(frozen=True)
class _CallShape:
    """What validating a call found (:func:`_check_call`): its geometry, output shape,
    whether it applies ReLU, and the tuning database's shape class."""
    geom: "_Geometry"
    out_shape: tuple
    relu: bool
    shape_class: str


class _RepeatedCall:
    """A validated device-array call (:func:`_repeated_call`) with its launch plan: the
    plan stays while the tuning lookups it came from answer with the same memoised
    values (``routed``), and is looked up again otherwise."""
    __slots__ = ("call", "queue", "in_order", "variant", "routed", "plan", "pool",
                 "context_ptr")

    def __init__(self, call: _CallShape, queue, variant: tuple, weight_context):
        self.call, self.queue, self.variant = call, queue, variant
        self.in_order = runtime.in_order(queue)
        self.routed = self.plan = None
        self.pool = runtime.memory_pool(queue.context)
        self.context_ptr = weight_context.int_ptr   # every device operand must be in it


_CALLS_PER_WEIGHT = 64


def _array_key(a):
    """The parts of an optional device array that validation looked at."""
    return None if a is None else (type(a), a.shape, a.strides, a.dtype)


def _repeated_call(x, weight: "SparseConvWeight", bias, kernel_size, stride, padding,
                   dilation, groups, activation, residual, queue, events):
    """The call on device arrays, a prepared weight and no ``out``, when one with the same
    shapes, strides, dtypes, arguments and queue was validated before: only what can
    differ between such calls is checked again (contexts, the queue's state, the tuning
    lookups), and the launch plan is the one kept for it, so that the eager host path of
    a network's layers skips most of its Python.  Returns None, having done nothing, for
    any other call, one that fails a check (the general path then raises), or one made
    while a LaunchGraph is captured (the general path records it)."""
    if queue is not None and queue is not x.queue:
        return None
    repeated = _repeated_lookup(x, weight, bias, kernel_size, stride, padding, dilation,
                                groups, activation, residual)
    if repeated is None:
        return None
    out_dev = runtime.empty(x.queue, repeated.call.out_shape, np.float32,
                            allocator=repeated.pool)
    _repeated_launch(repeated, x, weight, bias, residual, out_dev, events)
    return out_dev


def _repeated_lookup(x, weight: "SparseConvWeight", bias, kernel_size, stride, padding,
                     dilation, groups, activation, residual) -> "Optional[_RepeatedCall]":
    """The validated call of :func:`_repeated_call` (device arrays, on ``x.queue``), its
    checks that can differ between such calls done; None where the general path must
    handle it."""
    if (bias is not None and type(bias) is not cl_array.Array) or \
            (residual is not None and type(residual) is not cl_array.Array):
        return None
    queue = x.queue
    key = (x.shape, x.strides, x.dtype, _array_key(bias), _array_key(residual), kernel_size,
           stride, padding, dilation, groups, activation)
    try:
        repeated = weight._calls.get(key)
    except TypeError:          # an unhashable argument: the general path says what is wrong
        return None
    if repeated is None or repeated.queue is not queue:
        call = _validate_call(x, weight, bias, kernel_size, stride, padding, dilation,
                              groups, activation, residual)
        if call is None or queue is None:
            return None
        repeated = _RepeatedCall(call, queue, (bias is not None, call.relu,
                                               residual is not None), weight.queue.context)
        with weight._lock:
            weight._calls[key] = repeated
            while len(weight._calls) > _CALLS_PER_WEIGHT:
                weight._calls.pop(next(iter(weight._calls)))
    ctx = repeated.context_ptr
    if runtime.capturing() or x.context.int_ptr != ctx or \
            (bias is not None and (bias.context.int_ptr != ctx or bias.offset)) or \
            (residual is not None and residual.context.int_ptr != ctx):
        return None          # the general path raises, copies a bias at an offset, records
    runtime.get_queue(queue)    # refuses a released queue
    call = repeated.call
    routed = tuning.memoised("conv2d_sparse", queue.device, call.shape_class, _routed_params)
    if routed is not repeated.routed:
        repeated.plan = _plan(queue, weight, call.geom, repeated.variant, call.shape_class)
        repeated.routed = routed
    return repeated


def _repeated_launch(repeated: _RepeatedCall, x, weight: "SparseConvWeight", bias,
                     residual, out_dev, events) -> None:
    """Enqueue a call that :func:`_repeated_lookup` validated, into ``out_dev`` (of the
    call's output shape, in its context)."""
    queue = repeated.queue
    if not out_dev.size:
        pass
    elif weight.nnz == 0 and bias is None and residual is None:
        runtime.fill_array(queue, out_dev, 0)   # ReLU(0) is 0 too
    else:
        plan = repeated.plan
        conv2d_csr.launch(queue, plan, x,
                          bias.base_data if bias is not None else weight.row_order.data,
                          out_dev, residual, events,
                          runtime.scratch(queue, plan.xpack_bytes) if repeated.in_order
                          else None, in_order=repeated.in_order)


def _validate_call(x, weight, bias, kernel_size, stride, padding, dilation, groups,
                   activation, residual) -> "Optional[_CallShape]":
    """:func:`_check_call` for a device-array call with no ``out``, plus the output's
    allocation check; None (nothing recorded) where a check fails."""
    try:
        require_array(x, "x", np.float32, ndim=4)
        call = _check_call(x, weight, bias, kernel_size, stride, padding, dilation, groups,
                           activation, residual, None)
        check_alloc(weight.queue, 4 * math.prod(call.out_shape), "the output")
    except (TypeError, ValueError):
        return None
    return call


def _check_call(x, weight: "SparseConvWeight", bias, kernel_size, stride, padding, dilation,
                groups, activation, residual, out) -> _CallShape:
    """Every check of a call's arguments against the weight (``x`` already checked as a
    4-D float32 array): raises ``TypeError``/``ValueError`` naming the argument."""
    if kernel_size is not None and int_pair(kernel_size, "kernel_size", 1) != \
            weight.kernel_size:
        raise ValueError(f"kernel_size={kernel_size!r} disagrees with the prepared "
                         f"weight's {weight.kernel_size}")
    if groups != weight.groups:
        raise ValueError(f"groups={groups} disagrees with the prepared weight's "
                         f"groups={weight.groups}")
    if x.shape[1] != weight.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but the weight expects "
                         f"in_channels={weight.in_channels}")
    geom = _geometry(x.shape, weight, stride, padding, dilation)
    K = weight.out_channels
    out_shape = (geom.N, K, geom.OH, geom.OW)
    if bias is not None:
        require_array(bias, "bias", np.float32, ndim=1)
        if bias.shape != (K,):
            raise ValueError(f"bias must have shape ({K},), got {tuple(bias.shape)}")
    check_out(out, out_shape, np.float32, like=x)
    relu = _check_activation(activation)
    _check_residual(residual, out_shape, x, out)
    return _CallShape(geom, out_shape, relu, _shape_class(geom, weight))


_SHAPE_CLASSES: Dict[tuple, str] = {}


def _shape_class(geom: _Geometry, weight: SparseConvWeight) -> str:
    """conv2d_shape_class of a call, kept per (geometry, kernel, input channels per
    group)."""
    key = (geom, weight.kernel_size, weight.in_channels // weight.groups)
    found = _SHAPE_CLASSES.get(key)
    if found is None:
        found = conv2d_shape_class(geom.N, key[2], (geom.OH, geom.OW), weight.kernel_size,
                                   geom.stride)
        if len(_SHAPE_CLASSES) < _GEOMETRIES_MAX:
            _SHAPE_CLASSES[key] = found
    return found


@dataclass(frozen=True)
class _Epilogue:
    """What the convolution's store applies: + bias, + residual, then ReLU."""
    bias: Optional[cl_array.Array]
    residual: Optional[cl_array.Array]
    relu: bool

    @property
    def key(self) -> Tuple[bool, bool, bool]:
        """The kernel variant it needs: ``template_args``'s (has_bias, relu, residual)."""
        return (self.bias is not None, self.relu, self.residual is not None)


def _check_activation(activation) -> bool:
    """True for "relu", False for None; anything else raises."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def _check_residual(residual, out_shape, x, out) -> None:
    if residual is None:
        return
    require_array(residual, "residual", np.float32, ndim=4)
    if tuple(residual.shape) != tuple(out_shape):
        raise ValueError(f"residual must have the output's shape {tuple(out_shape)}, got "
                         f"{tuple(residual.shape)}")
    if is_device_array(residual) != is_device_array(x):
        raise TypeError("residual must be the same kind of container as x (both NumPy or "
                        "both pyopencl arrays)")
    if is_device_array(residual) and is_device_array(out) and \
            residual.base_data.int_ptr == out.base_data.int_ptr and \
            residual.offset != out.offset:
        lo, hi = residual.offset, residual.offset + residual.nbytes
        if lo < out.offset + out.nbytes and out.offset < hi:
            raise ValueError("residual overlaps out without being out itself; pass out "
                             "itself, or a residual that does not share its memory")


def _compute(queue, x_dev, weight: SparseConvWeight, epilogue: _Epilogue, out_dev, geom,
             events, shape_class: Optional[str] = None):
    with runtime.capturable():
        if weight.nnz == 0 and epilogue.bias is None and epilogue.residual is None:
            runtime.fill_array(queue, out_dev, 0)   # ReLU(0) is 0 too
        else:
            _launch(queue, x_dev, weight, epilogue, out_dev, geom, events, shape_class)


#: SparseConvWeights prepared for the SciPy matrices passed as ``w_csr``.
_CSR_WEIGHTS = PreparedCache("conv2d_sparse weights")


def _prepared_weight(w_csr, in_channels: int, kernel_size, groups, queue):
    """``(weight, confirm)``: the SparseConvWeight of a SciPy CSR ``w_csr``, prepared on
    its first call and kept while the matrix object lives; ``confirm`` (None when the
    weight was just prepared) checks that the matrix is unchanged, see
    :meth:`PreparedCache.lookup`."""
    buffers = [getattr(w_csr, name, None) for name in ("indptr", "indices", "data")]
    if not (sp.issparse(w_csr) and all(isinstance(b, np.ndarray) for b in buffers)):
        # Not a SciPy matrix in CSR form: the constructor says why.
        return SparseConvWeight(w_csr, in_channels, kernel_size, groups, queue), None
    key = (queue.context.int_ptr, int(in_channels),
           None if kernel_size is None else int_pair(kernel_size, "kernel_size", 1), groups)
    return _CSR_WEIGHTS.lookup(w_csr, buffers, key, lambda: SparseConvWeight(
        w_csr, in_channels, kernel_size, groups, queue))


_PLANS_PER_WEIGHT = 32  # input geometries remembered per weight (least recently used go)


def _routed_params(look):
    """The convolution's tiles merged with those of the packing family its routine chose,
    and their sorted items (part of a plan's key)."""
    pack = _PACK_FAMILIES[look(CONV2D_ROUTINE.spec)["PACK_KERNEL"]]
    params = dict(look(CONV2D_CSR), **pack.template_values(look(pack.SPEC)))
    return params, tuple(sorted(params.items()))


def _plan(queue, weight: SparseConvWeight, geom: _Geometry, variant: tuple,
          shape_class: Optional[str] = None) -> conv2d_csr.Plan:
    """The launch plan for this call, from the weight's cache or built (and checked)."""
    if shape_class is None:
        shape_class = conv2d_shape_class(geom.N, weight.in_channels // weight.groups,
                                         (geom.OH, geom.OW), weight.kernel_size, geom.stride)
    # Looked up on every call (memoised while nothing changes): an override block, the
    # environment or a new tuning result takes effect at once, and is part of the key.
    params, params_key = tuning.memoised("conv2d_sparse", queue.device, shape_class,
                                         _routed_params)
    key = (queue.device.int_ptr, geom, variant, params_key)
    with weight._lock:
        plan = weight._plans.pop(key, None)
        if plan is not None:
            weight._plans[key] = plan  # most recently used last
            return plan
    plan = conv2d_csr.build_plan(queue, weight, geom, variant, params)
    with weight._lock:
        weight._plans[key] = plan
        while len(weight._plans) > _PLANS_PER_WEIGHT:
            weight._plans.pop(next(iter(weight._plans)))
    return plan


def _launch(queue, x_dev, weight: SparseConvWeight, epilogue: _Epilogue, out_dev,
            geom: _Geometry, events, shape_class: Optional[str] = None):
    plan = _plan(queue, weight, geom, epilogue.key, shape_class)
    bias_dev = epilogue.bias
    if bias_dev is not None and bias_dev.offset:
        bias_dev = bias_dev.copy(queue=queue)
    bias_buf = bias_dev.data if bias_dev is not None else weight.row_order.data  # unread
    in_order = runtime.in_order(queue)
    # The thread's scratch keeps the packing's buffer argument set from call to call (a
    # captured graph holds buffers of its own instead).
    xpack = runtime.scratch(queue, plan.xpack_bytes) if in_order and \
        not runtime.capturing() else None
    conv2d_csr.launch(queue, plan, x_dev, bias_buf, out_dev, epilogue.residual, events,
                      xpack, in_order=in_order)
