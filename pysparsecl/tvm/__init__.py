"""Optional TVM integration: packed functions, ``te.extern`` builders and Relax calls.

TVM treats each op as a black box (an extern call): our kernels bring their own schedule.
Install the extra with ``pip install pysparsecl[tvm]`` (it pulls ``apache-tvm``; tested with
0.27).  Importing :mod:`pysparsecl` never imports TVM; importing this module does.

Registered global functions (destination-passing style, the output last)::

    pysparsecl.conv2d_sparse(x, w_data, w_indices, w_indptr, [bias,]
                             R, S, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups,
                             out)
    pysparsecl.masked_matmul(x, w, mask, out)
    pysparsecl.add(a, b, out)
    pysparsecl.mul(a, b, out)

``x`` is float32 NCHW; the CSR weight is the three arrays of a SciPy CSR matrix of shape
``(K, C/groups * R * S)`` (``w_data`` float32, ``w_indices`` and ``w_indptr`` int32 or
int64); ``bias`` (K,) float32 is optional and recognised by the argument count (15 with,
14 without).  The nine scalars are Python ints (a TE ``call_packed`` passes immediates, the
Relax helpers pass ``R.prim_value``s).  ``masked_matmul``'s ``mask`` is bool (M, N) or int32
(M, n_keep) column indices, as for :func:`pysparsecl.masked_matmul`.

TVM hands the callbacks host (CPU) tensors; each call copies its inputs to the OpenCL
device once and the result back once, straight into TVM's output buffer.  The prepared
convolution weight stays on the device between calls (see :func:`_prepared_weight`).

Quick use::

    import pysparsecl.tvm as pst
    y = pst.conv2d_sparse_extern(x, wd, wi, wp, kernel_size=3, padding=1)   # te.Tensor
    f = tvm.compile(te.create_prim_func([x, wd, wi, wp, y]), target="llvm")

    lv = bb.emit(pst.relax_conv2d_sparse(x, wd, wi, wp, kernel_size=3, padding=1))
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp

try:
    import tvm
    from tvm import relax, te
except ImportError as exc:  # pragma: no cover - exercised only without TVM
    raise ImportError(
        "pysparsecl.tvm needs Apache TVM: install it with `pip install pysparsecl[tvm]` "
        "(or `pip install apache-tvm`)") from exc

from .. import runtime
from ..ops._common import int_pair
from ..ops.conv2d import SparseConvWeight, conv2d_output_shape, conv2d_sparse
from ..ops.elementwise import add, mul
from ..ops.masked import masked_matmul

__all__ = [
    "register", "FUNCTION_NAMES",
    "conv2d_sparse_extern", "masked_matmul_extern", "add_extern", "mul_extern",
    "relax_conv2d_sparse", "relax_masked_matmul", "relax_add", "relax_mul",
    "weight_token", "offload_sparse_conv2d", "OffloadDecision",
]

CONV2D = "pysparsecl.conv2d_sparse"
CONV2D_CONSTANT = "pysparsecl.conv2d_sparse_constant"
MASKED_MATMUL = "pysparsecl.masked_matmul"
ADD = "pysparsecl.add"
MUL = "pysparsecl.mul"
FUNCTION_NAMES = (CONV2D, CONV2D_CONSTANT, MASKED_MATMUL, ADD, MUL)

_N_CONV_SCALARS = 9          # R, S, stride h/w, padding h/w, dilation h/w, groups
_CONV_SCALAR_NAMES = ("R", "S", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                      "groups")
_CONV_SCALAR_MINIMA = (1, 1, 1, 1, 0, 0, 1, 1, 1)
_KDL_CPU = 1                 # DLPack's device type code for host memory


# --------------------------------------------------------------------------- tensors

def _as_numpy(t, name: str, dtypes: Optional[Sequence] = None) -> np.ndarray:
    """A NumPy view of a TVM tensor (or a NumPy array, returned as is), without copying.

    Tensors from a compiled TE ``call_packed`` are non-owning views, and
    ``numpy.from_dlpack`` on them segfaults; Relax VM tensors are owned and would survive
    DLPack.  Both are read the same way here, from ``data_ptr()``, shape and dtype, which
    is safe for both kinds.  The view borrows TVM's memory: use it only during the call.
    """
    if isinstance(t, np.ndarray):
        arr = t
    else:
        if not (hasattr(t, "data_ptr") and hasattr(t, "shape") and hasattr(t, "dtype")):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        device = t.device
        if int(device.dlpack_device_type()) != _KDL_CPU:
            raise ValueError(f"{name} must be a host (CPU) tensor, got one on {device}; "
                             "pysparsecl moves data to its OpenCL device itself")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be C-contiguous, got strides {t.strides} for "
                             f"shape {t.shape}")
        try:
            dtype = np.dtype(str(t.dtype))
        except TypeError:
            raise TypeError(f"{name} has dtype {t.dtype}, which NumPy cannot represent")\
                from None
        shape = tuple(int(d) for d in t.shape)
        if 0 in shape:
            arr = np.empty(shape, dtype)
        else:
            # The array interface wraps the pointer in O(1), with no ctypes type per size.
            arr = np.asarray(_Borrowed(t.data_ptr(), shape, dtype))
    if dtypes is not None and arr.dtype not in [np.dtype(d) for d in dtypes]:
        allowed = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must be {allowed}, got {arr.dtype}")
    return arr


class _Borrowed:
    """Exposes a raw host pointer to NumPy (``np.asarray`` makes a writable view)."""
    __slots__ = ("__array_interface__",)

    def __init__(self, ptr: int, shape: tuple, dtype: np.dtype):
        self.__array_interface__ = {"data": (ptr, False), "shape": shape,
                                    "typestr": dtype.str, "version": 3}


def _scalar(v, name: str, minimum: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


# --------------------------------------------------------------------------- weight cache

_CACHE_SIZE = 32
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()
_cache_lock = threading.Lock()
#: Counters the tests read: how often a prepared weight was reused or (re)built.
cache_stats = {"hits": 0, "builds": 0}


def clear_cache() -> None:
    """Drop every prepared weight (and reset :data:`cache_stats` and
    :data:`constant_stats`)."""
    with _cache_lock:
        _cache.clear()
        _constant_weights.clear()
        cache_stats.update(hits=0, builds=0)
        constant_stats.update(hits=0, builds=0)


def _check_csr(data, indices, indptr, n_cols: int) -> None:
    """Validate raw CSR arrays, naming the argument (SciPy's own messages do not)."""
    for arr, name in ((data, "w_data"), (indices, "w_indices"), (indptr, "w_indptr")):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if indptr.shape[0] < 2:
        raise ValueError(f"w_indptr must hold K + 1 >= 2 entries, got {indptr.shape[0]}")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError("w_indptr must start at 0 and never decrease")
    nnz = int(indptr[-1])
    if indices.shape[0] != nnz or data.shape[0] != nnz:
        raise ValueError(f"w_indptr[-1] = {nnz} but w_indices has {indices.shape[0]} and "
                         f"w_data has {data.shape[0]} entries")
    if nnz and (indices.min() < 0 or indices.max() >= n_cols):
        raise ValueError(f"w_indices must lie in [0, {n_cols}) (C/groups * R * S); found "
                         f"{int(indices.min())}..{int(indices.max())}")


def _prepared_weight(data, indices, indptr, in_channels: int, kernel_size, groups: int,
                     queue=None) -> SparseConvWeight:
    """The device-resident :class:`SparseConvWeight` for these CSR arrays, cached.

    The key is the buffers' identity (addresses, shapes, dtypes) and the conv geometry; a
    blake2b digest of the three arrays' bytes is checked on every call, so new values
    written into the same buffers (a weight update) rebuild the weight instead of
    silently reusing stale values.  Hashing costs ~1 ms per MB of CSR data, far less than
    re-uploading and re-deriving the weight.
    """
    queue = runtime.get_queue(queue)
    key = tuple((a.__array_interface__["data"][0], a.shape, a.dtype.str)
                for a in (data, indices, indptr))
    key += (in_channels, tuple(kernel_size), groups, queue.int_ptr)
    digest = _digest((data, indices, indptr), 16)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == digest:
            _cache.move_to_end(key)
            cache_stats["hits"] += 1
            return hit[1]
    weight = _new_weight(data, indices, indptr, in_channels, kernel_size, groups, queue)
    _remember(_cache, key, (digest, weight), _CACHE_SIZE, cache_stats)
    return weight


def _digest(arrays, size: int) -> bytes:
    """A blake2b digest of ``size`` bytes of the arrays' dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=size)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.digest()


def _new_weight(data, indices, indptr, in_channels: int, kernel_size, groups: int,
                queue) -> SparseConvWeight:
    """A :class:`SparseConvWeight` from borrowed CSR arrays, checked and copied (TVM's
    buffers are lent for one call only)."""
    n_cols = (in_channels // groups) * kernel_size[0] * kernel_size[1]
    _check_csr(data, indices, indptr, n_cols)
    csr = sp.csr_matrix((np.array(data), np.array(indices), np.array(indptr)),
                        shape=(indptr.shape[0] - 1, n_cols))
    return SparseConvWeight(csr, in_channels, kernel_size, groups, queue)


def _remember(cache: OrderedDict, key, value, limit: int, stats: dict) -> None:
    """Keep ``value`` as the newest entry of ``cache``, dropping the oldest beyond
    ``limit``, and count a build in ``stats``."""
    with _cache_lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)
        stats["builds"] += 1


# --------------------------------------------------------------------------- callbacks

def _conv_scalar_args(values) -> tuple:
    return tuple(_scalar(v, n, m) for v, n, m in zip(values, _CONV_SCALAR_NAMES,
                                                      _CONV_SCALAR_MINIMA))

def _conv2d_callback(*args):
    if len(args) not in (14, 15):
        raise TypeError(f"{CONV2D} takes (x, w_data, w_indices, w_indptr, [bias,] R, S, "
                        "stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, out): 14 or "
                        f"15 arguments, got {len(args)}")
    has_bias = len(args) == 15
    x = _as_numpy(args[0], "x", [np.float32])
    data = _as_numpy(args[1], "w_data", [np.float32])
    indices = _as_numpy(args[2], "w_indices", [np.int32, np.int64])
    indptr = _as_numpy(args[3], "w_indptr", [np.int32, np.int64])
    bias = _as_numpy(args[4], "bias", [np.float32]) if has_bias else None
    r, s, sh, sw, ph, pw, dh, dw, groups = _conv_scalar_args(args[4 + has_bias:-1])
    out = _as_numpy(args[-1], "out", [np.float32])
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW (4-D), got shape {x.shape}")
    if x.shape[1] % groups:
        raise ValueError(f"groups={groups} does not divide the {x.shape[1]} input channels")
    weight = _prepared_weight(data, indices, indptr, x.shape[1], (r, s), groups)
    conv2d_sparse(x, weight, bias, kernel_size=(r, s), stride=(sh, sw), padding=(ph, pw),
                  dilation=(dh, dw), groups=groups, out=out)


# --------------------------------------------------------------------------- constant weights

def weight_token(data, indices, indptr) -> int:
    """A 63-bit content token of a CSR weight's three arrays (dtypes, shapes and bytes).

    :func:`offload_sparse_conv2d` computes it when it turns a weight into constants and
    passes it with each call of ``pysparsecl.conv2d_sparse_constant``, which then keys
    its prepared weights on the token instead of hashing the arrays on every call."""
    digest = _digest((data, indices, indptr), 8)
    return int.from_bytes(digest, "little") >> 1          # a non-negative int64


#: Prepared weights of module constants: (token, the three buffers' addresses, in
#: channels, kernel size, groups, queue) -> SparseConvWeight.  A compiled module's
#: constants never change, and a token names their content, so an entry is never stale:
#: buffers freed and reused for other constants come with another token.
_constant_weights: "OrderedDict[tuple, SparseConvWeight]" = OrderedDict()
_CONSTANT_CACHE_SIZE = 512    # a ResNet-50 has 53 convolutions
#: How often a constant's prepared weight was reused or built (the tests read it).
constant_stats = {"hits": 0, "builds": 0}


def _constant_weight(token: int, tensors, in_channels: int, kernel_size, groups: int
                     ) -> SparseConvWeight:
    queue = runtime.get_queue()
    key = (token, tensors[0].data_ptr(), tensors[1].data_ptr(), tensors[2].data_ptr(),
           in_channels, kernel_size, groups, queue.int_ptr)
    weight = _constant_weights.get(key)
    if weight is not None:
        constant_stats["hits"] += 1
        return weight
    data = _as_numpy(tensors[0], "w_data", [np.float32])
    indices = _as_numpy(tensors[1], "w_indices", [np.int32, np.int64])
    indptr = _as_numpy(tensors[2], "w_indptr", [np.int32, np.int64])
    if weight_token(data, indices, indptr) != token:
        raise ValueError(f"weight_token {token} is not the token of these CSR arrays: pass "
                         "pysparsecl.tvm.weight_token(w_data, w_indices, w_indptr)")
    weight = _new_weight(data, indices, indptr, in_channels, kernel_size, groups, queue)
    _remember(_constant_weights, key, weight, _CONSTANT_CACHE_SIZE, constant_stats)
    return weight


def _conv2d_constant_callback(*args):
    n_tensors = len(args) - 12          # 9 conv scalars, relu, weight_token, out
    if not 4 <= n_tensors <= 6:
        raise TypeError(f"{CONV2D_CONSTANT} takes (x, w_data, w_indices, w_indptr, [bias,] "
                        "[residual,] R, S, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, "
                        f"groups, relu, weight_token, out): 16 to 18 arguments, got "
                        f"{len(args)}")
    *conv_scalars, relu, token = args[n_tensors:-1]
    r, s, sh, sw, ph, pw, dh, dw, groups = _conv_scalar_args(conv_scalars)
    relu = _scalar(relu, "relu", 0)
    if relu > 1:
        raise ValueError(f"relu must be 0 or 1, got {relu}")
    token = _scalar(token, "weight_token", 0)
    x = _as_numpy(args[0], "x", [np.float32])
    bias = residual = None
    for i in range(4, n_tensors):
        t = _as_numpy(args[i], "bias or residual", [np.float32])
        if t.ndim == 1 and bias is None and residual is None:
            bias = t
        elif t.ndim == 4 and residual is None:
            residual = t
        else:
            raise ValueError("the tensors after w_indptr must be a 1-D bias and/or a 4-D "
                             f"residual, in that order; got shape {t.shape}")
    out = _as_numpy(args[-1], "out", [np.float32])
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW (4-D), got shape {x.shape}")
    if x.shape[1] % groups:
        raise ValueError(f"groups={groups} does not divide the {x.shape[1]} input channels")
    weight = _constant_weight(token, args[1:4], x.shape[1], (r, s), groups)
    conv2d_sparse(x, weight, bias, kernel_size=(r, s), stride=(sh, sw), padding=(ph, pw),
                  dilation=(dh, dw), groups=groups, activation="relu" if relu else None,
                  residual=residual, out=out)


def _masked_matmul_callback(x, w, mask, out):
    masked_matmul(_as_numpy(x, "x", [np.float32]), _as_numpy(w, "w", [np.float32]),
                  _as_numpy(mask, "mask", [np.bool_, np.int32]),
                  out=_as_numpy(out, "out", [np.float32]))


def _add_callback(a, b, out):
    add(_as_numpy(a, "a"), _as_numpy(b, "b"), out=_as_numpy(out, "out"))


def _mul_callback(a, b, out):
    mul(_as_numpy(a, "a"), _as_numpy(b, "b"), out=_as_numpy(out, "out"))


_CALLBACKS = {CONV2D: _conv2d_callback, CONV2D_CONSTANT: _conv2d_constant_callback,
              MASKED_MATMUL: _masked_matmul_callback,
              ADD: _add_callback, MUL: _mul_callback}
_register_lock = threading.Lock()


def register(override: bool = False) -> None:
    """Register the global packed functions (:data:`FUNCTION_NAMES`) with TVM.

    Calling it again is a no-op.  If another function already holds one of the names,
    ``RuntimeError`` is raised unless ``override=True``, which replaces it.  The extern
    and Relax builders below call this themselves.
    """
    with _register_lock:
        for name, fn in _CALLBACKS.items():
            existing = tvm.get_global_func(name, allow_missing=True)
            # A global function fetched back is a new wrapper: compare the objects.
            ours = _registered.get(name)
            if existing is not None and not override:
                if ours is not None and existing.same_as(ours):
                    continue
                raise RuntimeError(f"a global function named {name!r} is already registered "
                                   "and is not pysparsecl's; pass override=True to replace it")
            tvm.register_global_func(name, fn, override=True)
            _registered[name] = tvm.get_global_func(name)


_registered: dict = {}


# --------------------------------------------------------------------------- TE externs

def _static_shape(shape, name: str) -> tuple:
    try:
        return tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(f"{name} must have a static shape, got {shape}") from None


def _te_dtype(t: te.Tensor, name: str, allowed) -> str:
    dtype = str(t.dtype)
    if dtype not in allowed:
        raise TypeError(f"{name} must be {' or '.join(allowed)}, got {dtype}")
    return dtype


def _conv_scalars(kernel_size, stride, padding, dilation, groups) -> list:
    r, s = int_pair(kernel_size, "kernel_size", 1)
    sh, sw = int_pair(stride, "stride", 1)
    ph, pw = int_pair(padding, "padding", 0)
    dh, dw = int_pair(dilation, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    return [r, s, sh, sw, ph, pw, dh, dw, int(groups)]


def _conv_out_shape(x_shape, w_indptr_shape, scalars) -> tuple:
    if len(x_shape) != 4:
        raise ValueError(f"data must be NCHW (4-D), got shape {x_shape}")
    if len(w_indptr_shape) != 1 or w_indptr_shape[0] < 2:
        raise ValueError(f"w_indptr must be 1-D with K + 1 >= 2 entries, got {w_indptr_shape}")
    r, s, sh, sw, ph, pw, dh, dw, groups = scalars
    n, c, h, w = x_shape
    if c % groups:
        raise ValueError(f"groups={groups} does not divide the {c} input channels")
    oh, ow = conv2d_output_shape((h, w), (r, s), (sh, sw), (ph, pw), (dh, dw))
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output size would be {oh}x{ow} for input {h}x{w}")
    return (n, w_indptr_shape[0] - 1, oh, ow)


def conv2d_sparse_extern(data, w_data, w_indices, w_indptr, *, kernel_size, stride=1,
                         padding=0, dilation=1, groups=1, bias=None) -> te.Tensor:
    """A ``te.extern`` tensor computing :func:`pysparsecl.conv2d_sparse` through TVM.

    ``data`` (N, C, H, W) float32; ``w_data`` (nnz,) float32, ``w_indices`` (nnz,) and
    ``w_indptr`` (K + 1,) int32/int64 are the CSR arrays of the (K, C/groups*R*S) weight;
    ``bias`` (K,) float32 is optional.  Shapes must be static.  Returns the float32
    (N, K, OH, OW) tensor; build a PrimFunc with ``te.create_prim_func``.
    """
    register()
    _te_dtype(data, "data", ["float32"])
    _te_dtype(w_data, "w_data", ["float32"])
    _te_dtype(w_indices, "w_indices", ["int32", "int64"])
    _te_dtype(w_indptr, "w_indptr", ["int32", "int64"])
    inputs = [data, w_data, w_indices, w_indptr]
    if bias is not None:
        _te_dtype(bias, "bias", ["float32"])
        inputs.append(bias)
    scalars = _conv_scalars(kernel_size, stride, padding, dilation, groups)
    shape = _conv_out_shape(_static_shape(data.shape, "data"),
                            _static_shape(w_indptr.shape, "w_indptr"), scalars)
    return te.extern(shape, inputs,
                     lambda ins, outs: tvm.tirx.call_packed(CONV2D, *ins, *scalars, outs[0]),
                     name="pysparsecl_conv2d_sparse", dtype="float32")


def _masked_matmul_shape(x_shape, w_shape, mask_shape, mask_dtype) -> tuple:
    if len(x_shape) != 2 or len(w_shape) != 2 or x_shape[1] != w_shape[0]:
        raise ValueError(f"x (M, K) and w (K, N) do not match: {x_shape} and {w_shape}")
    m, n = x_shape[0], w_shape[1]
    if mask_dtype == "bool":
        if tuple(mask_shape) != (m, n):
            raise ValueError(f"a bool mask must have shape {(m, n)}, got {mask_shape}")
        return (m, n)
    if len(mask_shape) != 2 or mask_shape[0] != m:
        raise ValueError(f"an int32 mask must have shape ({m}, n_keep), got {mask_shape}")
    return (m, mask_shape[1])


def masked_matmul_extern(x, w, mask) -> te.Tensor:
    """A ``te.extern`` tensor computing :func:`pysparsecl.masked_matmul`: ``x`` (M, K) and
    ``w`` (K, N) float32; ``mask`` bool (M, N) gives (M, N), int32 (M, n_keep) column
    indices give the compact (M, n_keep).  Only 2-D ``x`` (no VMM on a 1-D row)."""
    register()
    _te_dtype(x, "x", ["float32"])
    _te_dtype(w, "w", ["float32"])
    mdt = _te_dtype(mask, "mask", ["bool", "int32"])
    shape = _masked_matmul_shape(_static_shape(x.shape, "x"), _static_shape(w.shape, "w"),
                                 _static_shape(mask.shape, "mask"), mdt)
    return te.extern(shape, [x, w, mask],
                     lambda ins, outs: tvm.tirx.call_packed(MASKED_MATMUL, *ins, outs[0]),
                     name="pysparsecl_masked_matmul", dtype="float32")


_ELEMENTWISE_DTYPES = ["float32", "int32", "int64", "float64", "float16"]


def _elementwise_out(a_shape, a_dtype, b_shape, b_dtype) -> tuple:
    if a_dtype != b_dtype:
        raise TypeError(f"a and b must have the same dtype, got {a_dtype} and {b_dtype}")
    try:
        return tuple(np.broadcast_shapes(tuple(a_shape), tuple(b_shape))), a_dtype
    except ValueError:
        raise ValueError(f"a {tuple(a_shape)} and b {tuple(b_shape)} do not broadcast") \
            from None


def _elementwise_extern(name, op_name, a, b) -> te.Tensor:
    register()
    shape, dtype = _elementwise_out(
        _static_shape(a.shape, "a"), _te_dtype(a, "a", _ELEMENTWISE_DTYPES),
        _static_shape(b.shape, "b"), _te_dtype(b, "b", _ELEMENTWISE_DTYPES))
    return te.extern(shape, [a, b],
                     lambda ins, outs: tvm.tirx.call_packed(name, *ins, outs[0]),
                     name=op_name, dtype=dtype)


def add_extern(a, b) -> te.Tensor:
    """A ``te.extern`` tensor computing :func:`pysparsecl.add`: ``a`` and ``b`` of one
    dtype (float32, int32, int64; float64/float16 if the device has them), broadcast as
    NumPy does.  (Mixed dtypes are refused here: TE needs the output dtype up front.)"""
    return _elementwise_extern(ADD, "pysparsecl_add", a, b)


def mul_extern(a, b) -> te.Tensor:
    """Like :func:`add_extern`, for :func:`pysparsecl.mul`."""
    return _elementwise_extern(MUL, "pysparsecl_mul", a, b)


# --------------------------------------------------------------------------- Relax

def _relax_type(expr, name: str):
    """(shape, dtype) of a Relax expression with a static tensor type."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        raise ValueError(f"{name} must be a Relax tensor with a known shape, got {ty}")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except TypeError:
        raise ValueError(f"{name} must have a static shape, got {ty.shape}") from None
    return shape, str(ty.dtype)


def _check_relax_dtype(dtype: str, name: str, allowed) -> None:
    if dtype not in allowed:
        raise TypeError(f"{name} must be {' or '.join(allowed)}, got {dtype}")


def relax_conv2d_sparse(x, w_data, w_indices, w_indptr, *, kernel_size, stride=1, padding=0,
                        dilation=1, groups=1, bias=None) -> relax.Call:
    """``R.call_dps_packed("pysparsecl.conv2d_sparse", ...)`` for use with a
    ``relax.BlockBuilder``: ``lv = bb.emit(relax_conv2d_sparse(x, wd, wi, wp, ...))``.

    The arguments are Relax expressions (e.g. the function's parameters or emitted vars)
    with static tensor types, as for :func:`conv2d_sparse_extern`.  The conv parameters
    travel as ``R.prim_value`` arguments (they reach the callback as Python ints).
    """
    register()
    xs, xd = _relax_type(x, "x")
    ps_, pd = _relax_type(w_indptr, "w_indptr")
    _check_relax_dtype(xd, "x", ["float32"])
    _check_relax_dtype(_relax_type(w_data, "w_data")[1], "w_data", ["float32"])
    _check_relax_dtype(_relax_type(w_indices, "w_indices")[1], "w_indices",
                       ["int32", "int64"])
    _check_relax_dtype(pd, "w_indptr", ["int32", "int64"])
    args = [x, w_data, w_indices, w_indptr]
    if bias is not None:
        _check_relax_dtype(_relax_type(bias, "bias")[1], "bias", ["float32"])
        args.append(bias)
    scalars = _conv_scalars(kernel_size, stride, padding, dilation, groups)
    shape = _conv_out_shape(xs, ps_, scalars)
    args += [relax.prim_value(v) for v in scalars]
    return relax.call_dps_packed(CONV2D, args, out_ty=relax.TensorType(shape, "float32"))


def relax_masked_matmul(x, w, mask) -> relax.Call:
    """``R.call_dps_packed("pysparsecl.masked_matmul", (x, w, mask))`` with the output
    type of :func:`masked_matmul_extern`."""
    register()
    (xs, xd), (ws, wd), (ms, md) = (_relax_type(x, "x"), _relax_type(w, "w"),
                                    _relax_type(mask, "mask"))
    _check_relax_dtype(xd, "x", ["float32"])
    _check_relax_dtype(wd, "w", ["float32"])
    _check_relax_dtype(md, "mask", ["bool", "int32"])
    shape = _masked_matmul_shape(xs, ws, ms, md)
    return relax.call_dps_packed(MASKED_MATMUL, [x, w, mask],
                                 out_ty=relax.TensorType(shape, "float32"))


def _relax_elementwise(name, a, b) -> relax.Call:
    register()
    (a_s, a_d), (b_s, b_d) = _relax_type(a, "a"), _relax_type(b, "b")
    _check_relax_dtype(a_d, "a", _ELEMENTWISE_DTYPES)
    _check_relax_dtype(b_d, "b", _ELEMENTWISE_DTYPES)
    shape, dtype = _elementwise_out(a_s, a_d, b_s, b_d)
    return relax.call_dps_packed(name, [a, b], out_ty=relax.TensorType(shape, dtype))


def relax_add(a, b) -> relax.Call:
    """``R.call_dps_packed("pysparsecl.add", (a, b))``; same rules as :func:`add_extern`."""
    return _relax_elementwise(ADD, a, b)


def relax_mul(a, b) -> relax.Call:
    """``R.call_dps_packed("pysparsecl.mul", (a, b))``; same rules as :func:`mul_extern`."""
    return _relax_elementwise(MUL, a, b)


from .offload import OffloadDecision, offload_sparse_conv2d  # noqa: E402  (needs the above)
