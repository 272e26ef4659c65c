"""Elementwise ``add``, ``mul``, ``axpby`` and ``add_relu`` with NumPy broadcasting and masks
(the kernels: pysparsecl/families/elementwise.py).

These ops are bandwidth-bound: the only thing that matters is moving each byte once.  The
wrapper therefore

- reads host scalars (Python scalars, NumPy scalars, size-1 NumPy arrays) into kernel
  arguments instead of uploading them;
- uploads a NumPy operand that is itself a broadcast view (a zero stride) in its compact
  form, never materialised to the output's size;
- picks the vectorised contiguous kernel when, after merging dimensions that are
  contiguous in every operand, the problem is one flat run; the strided kernel otherwise;
- indexes in 32 bits unless some extent or offset needs 64, and checks every allocation
  against the device's limits before anything is enqueued;
- sends the commonest call (contiguous device arrays of one shape and dtype, no mask)
  straight to the contiguous kernel, without the analysis above (``_contiguous_call``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from .. import runtime
from ..families import elementwise
from ._common import check_alloc, deliver, is_device_array, new_output, to_device

__all__ = ["ELEMENTWISE", "add", "mul", "axpby", "add_relu", "relu_backward",
           "SUPPORTED_DTYPES", "MAX_NDIM"]

ELEMENTWISE = elementwise.SPEC
SUPPORTED_DTYPES = elementwise.SUPPORTED_DTYPES
_EXTENSION = {np.dtype(np.float64): "cl_khr_fp64", np.dtype(np.float16): "cl_khr_fp16"}
MAX_NDIM = 8


# ---------------------------------------------------------------------------------------------
# Argument classification and validation

@dataclass
class _Arg:
    """One operand as the caller gave it."""
    name: str
    kind: str                 # "device" | "host" | "scalar" (a Python int/float)
    value: object             # cl_array.Array | np.ndarray | Python scalar
    shape: Tuple[int, ...]
    dtype: Optional[np.dtype]  # None for a weak Python scalar


def _dtype_error(name: str, dtype) -> TypeError:
    supported = ", ".join(d.name for d in SUPPORTED_DTYPES)
    return TypeError(f"{name} has unsupported dtype {np.dtype(dtype).name}; supported: "
                     f"{supported} (float64 and float16 where the device supports them)")


def _classify(x, name: str) -> _Arg:
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} is a bool; bool operands are not supported, convert to an "
                        "int or float explicitly")
    if isinstance(x, np.generic):
        x = np.asarray(x)  # a NumPy scalar keeps its (strong) dtype, as in NumPy
    if isinstance(x, (cl_array.Array, np.ndarray)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise _dtype_error(name, x.dtype)
        if x.ndim > MAX_NDIM:
            raise ValueError(f"{name} has {x.ndim} dimensions; at most {MAX_NDIM} are supported")
        kind = "device" if isinstance(x, cl_array.Array) else "host"
        return _Arg(name, kind, x, tuple(x.shape), x.dtype)
    if isinstance(x, numbers.Real) and isinstance(x, (int, float)):
        return _Arg(name, "scalar", x, (), None)
    raise TypeError(f"{name} must be a numpy.ndarray, a pyopencl.array.Array or a Python "
                    f"int/float, got {type(x).__name__}")


def _coefficient(x, name: str):
    """alpha/beta of axpby: a real scalar (Python or NumPy)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer,
                                                             np.floating)):
        raise TypeError(f"{name} must be a real scalar (int or float), got {type(x).__name__}")
    if isinstance(x, np.generic) and np.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise _dtype_error(name, x.dtype)
    return x


def _result_dtype(args: Sequence[_Arg], coefficients: Sequence = ()) -> np.dtype:
    # Python scalars are "weak" (NEP 50): np.result_type(float32 array, 2.0) is float32.
    parts = [a.value if a.kind == "scalar" else a.dtype for a in args] + list(coefficients)
    return np.result_type(*parts)


def _check_device_dtype(device: cl.Device, dtype: np.dtype, what: str) -> None:
    """``what`` ends a phrase the dtype completes: 'a has dtype', 'the result dtype is'."""
    ext = _EXTENSION.get(np.dtype(dtype))
    if ext and ext not in device.extensions:
        raise TypeError(f"{what} {np.dtype(dtype).name}, but the device "
                        f"{device.name.strip()!r} does not report {ext}; convert explicitly "
                        "(pysparsecl never changes precision silently)")


def _scalar_value(x, dtype: np.dtype, name: str):
    """A host scalar converted to the result dtype, as NumPy would convert it."""
    try:
        with np.errstate(over="ignore"):
            if isinstance(x, (np.ndarray, np.generic)):
                return np.asarray(x).astype(dtype)[()]
            return np.array(x, dtype=dtype)[()]  # a Python int out of range raises
    except OverflowError:
        raise ValueError(f"{name}={x!r} does not fit the result dtype {dtype.name}") from None


def _element_strides(a, name: str) -> Tuple[int, ...]:
    item = a.dtype.itemsize
    if any(s % item for s in a.strides) or a.offset % item:
        raise ValueError(f"{name}: strides {a.strides} or offset {a.offset} are not multiples "
                         f"of the item size {item}")
    return tuple(s // item for s in a.strides)


def _overlaps_itself(shape, strides) -> bool:
    """True when two elements of a strided view may share memory (sufficient test)."""
    dims = sorted((abs(s), n) for s, n in zip(strides, shape) if n > 1)
    extent = 1
    for stride, n in dims:
        if stride < extent:
            return True
        extent = stride * n
    return False


def _compact(x: np.ndarray) -> np.ndarray:
    """A view of ``x`` without its broadcast (zero-stride) dimensions: what to upload."""
    index = tuple(slice(0, 1) if s == 0 and n > 1 else slice(None)
                  for s, n in zip(x.strides, x.shape))
    return x[index]


def _byte_span(a: cl_array.Array) -> Tuple[int, int]:
    lo = hi = a.offset
    for s, n in zip(a.strides, a.shape):
        if s < 0:
            lo += s * (n - 1)
        else:
            hi += s * (n - 1)
    return lo, hi + a.dtype.itemsize


def _broadcast_strides(shape, strides, out_shape) -> Tuple[int, ...]:
    """Element strides of an operand broadcast to ``out_shape`` (0 where it broadcasts)."""
    lead = len(out_shape) - len(shape)
    return (0,) * lead + tuple(0 if n == 1 and m != 1 else s
                               for n, s, m in zip(shape, strides, out_shape[lead:]))


# ---------------------------------------------------------------------------------------------
# Launch planning

_PLAIN_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.int32, np.int64))


def _contiguous_call(op: str, named, out, queue, events, coeffs):
    """The most common call, launched without the general path's broadcasting, dtype,
    overlap and layout analysis: device arrays of one shape and one plain dtype, each one
    C-contiguous run, no mask, and ``out`` absent or another such array that no input
    overlaps except by being ``out`` itself.  It picks the kernel the general path would.
    Returns None, having done nothing, for any other call."""
    arrays = [x for _, x in named] + ([out] if out is not None else [])
    first = arrays[0]
    if not isinstance(first, cl_array.Array):
        return None
    shape, dtype = first.shape, first.dtype
    if dtype not in _PLAIN_DTYPES or not first.size or len(shape) > MAX_NDIM:
        return None
    for x in arrays:
        if not (isinstance(x, cl_array.Array) and x.shape == shape and x.dtype == dtype
                and x.flags.c_contiguous and x.offset % dtype.itemsize == 0):
            return None
    if coeffs and np.result_type(dtype, *coeffs) != dtype:
        return None
    queue = runtime.resolve_queue(queue, **dict(named), out=out)
    if out is None:
        check_alloc(queue, first.nbytes, "the output")
        out = runtime.empty(queue, shape, dtype, allocator=runtime.memory_pool(queue.context))
    else:
        out_lo, out_hi = _byte_span(out)
        for _, x in named:
            lo, hi = _byte_span(x)
            if x.base_data.int_ptr == out.base_data.int_ptr and x.offset != out.offset and \
                    lo < out_hi and out_lo < hi:
                return None  # a shifted view of out: the general path copies it first
    coeffs = [_scalar_value(c, dtype, name) for c, name in zip(coeffs, ("alpha", "beta"))]
    inputs = [elementwise.Slot(letter, x) for (_, x), letter in zip(named, "ab")]
    elementwise.launch(queue, op, dtype, inputs, elementwise.Slot("out", out), None, 0, coeffs,
                       events, flat=True)
    return out


@runtime.capturable_op
def _elementwise(op: str, named: Sequence[Tuple[str, object]], out, mask, queue, events,
                 coeffs=()):
    if mask is None:
        result = _contiguous_call(op, named, out, queue, events, coeffs)
        if result is not None:
            return result
    args = [_classify(x, name) for name, x in named]
    try:
        out_shape = tuple(np.broadcast_shapes(*(a.shape for a in args)))
    except ValueError:
        shapes = ", ".join(f"{a.name} has shape {a.shape}" for a in args)
        raise ValueError(f"operands cannot be broadcast together: {shapes}") from None
    dtype = _result_dtype(args, coeffs)
    device_result = any(a.kind == "device" for a in args)
    mask = _check_mask(mask, out_shape)
    _check_out(out, out_shape, dtype, device_result)
    queue = runtime.resolve_queue(queue, **dict(named), mask=mask, out=out)
    for a in args:
        if a.dtype is not None:
            _check_device_dtype(queue.device, a.dtype, f"{a.name} has dtype")
    _check_device_dtype(queue.device, dtype, "the result dtype (numpy.result_type of "
                        + ", ".join(f"{a.name}: {a.dtype.name if a.dtype else 'scalar'}"
                                    for a in args) + ") is")
    coeffs = [_scalar_value(c, dtype, name) for c, name in zip(coeffs, ("alpha", "beta"))]
    for name, x in list(named) + [("mask", mask), ("out", out)]:
        if isinstance(x, cl_array.Array):
            strides = _element_strides(x, name)
            if name == "out" and _overlaps_itself(x.shape, strides):
                raise ValueError("out has elements that share memory (e.g. a zero stride)")

    # Host scalars (and size-1 NumPy arrays) become kernel arguments; other NumPy operands
    # are uploaded without their broadcast dimensions.
    values, uploads = {}, {}
    for a in args:
        if a.kind == "scalar":
            values[a.name] = _scalar_value(a.value, dtype, a.name)
        elif a.kind == "host" and a.value.size == 1:
            values[a.name] = _scalar_value(a.value.reshape(()), dtype, a.name)
        elif a.kind == "host":
            uploads[a.name] = _compact(a.value)
    if isinstance(mask, np.ndarray):
        uploads["mask"] = _compact(mask)
    keep = mask is not None and out is not None  # masked-off outputs keep their values
    _check_allocations(queue, uploads, out_shape, dtype, new_output=not is_device_array(out))

    if 0 in out_shape:
        if out is not None:
            return out
        return runtime.empty(queue, out_shape, dtype) if device_result else \
            np.empty(out_shape, dtype)

    dev, out_dev, host_out = _device_operands(queue, named, mask, out, uploads, dtype,
                                              out_shape, keep, device_result)
    _copy_overlapping_inputs(queue, dev, out_dev, out_shape, events)
    inputs = []
    for (name, _), letter in zip(named, "ab"):  # the template calls the operands a and b
        if name in values:
            inputs.append(elementwise.Slot(letter, None, value=values[name]))
        else:
            inputs.append(elementwise.Slot(letter, dev[name], _broadcast_strides(
                dev[name].shape, _element_strides(dev[name], name), out_shape)))
    mask_slot = None
    if mask is not None:
        mask_slot = elementwise.Slot("m", dev["mask"], _broadcast_strides(
            dev["mask"].shape, _element_strides(dev["mask"], "mask"), out_shape))
    out_slot = elementwise.Slot("out", out_dev, _element_strides(out_dev, "out"))
    elementwise.launch(queue, op, dtype, inputs, out_slot, mask_slot, 2 if keep else 1, coeffs,
                       events)

    if device_result:
        return out_dev
    if host_out is not None or out is None or out.flags.c_contiguous:
        return deliver(out_dev, None, out, queue, host_out)
    out[...] = deliver(out_dev, None, None, queue)
    return out


#: Mask dtypes: one byte an element, nonzero selects (pyopencl's comparisons give int8).
_MASK_DTYPES = (np.dtype(np.bool_), np.dtype(np.int8), np.dtype(np.uint8))


def _check_mask(mask, out_shape):
    if mask is None:
        return None
    if isinstance(mask, (bool, np.bool_)):
        mask = np.asarray(mask)
    if not isinstance(mask, (np.ndarray, cl_array.Array)):
        raise TypeError("mask must be a bool numpy.ndarray or pyopencl.array.Array, got "
                        f"{type(mask).__name__}")
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"mask must have dtype bool, int8 or uint8 (nonzero selects), got "
                        f"{mask.dtype}")
    try:
        fits = tuple(np.broadcast_shapes(mask.shape, out_shape)) == out_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"mask with shape {tuple(mask.shape)} cannot be broadcast to the "
                         f"output shape {out_shape}")
    return mask


def _check_out(out, out_shape, dtype, device_result) -> None:
    if out is None:
        return
    if not isinstance(out, (np.ndarray, cl_array.Array)):
        raise TypeError(f"out must be a numpy.ndarray or pyopencl.array.Array, got "
                        f"{type(out).__name__}")
    if is_device_array(out) != device_result:
        raise TypeError("out must be a pyopencl.array.Array when an input is one, and a "
                        "numpy.ndarray otherwise (the result keeps the inputs' container)")
    if tuple(out.shape) != out_shape:
        raise ValueError(f"out must have the broadcast shape {out_shape}, got "
                         f"{tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype} but the result dtype is {dtype.name} "
                        "(numpy.result_type of the operands)")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out is read-only")


def _check_allocations(queue, uploads, out_shape, dtype, new_output: bool) -> None:
    """Refuse, before anything is enqueued, buffers the device cannot allocate."""
    plan = [(f"{name} (copied to the device)", u.nbytes) for name, u in uploads.items()]
    if new_output:
        plan.append(("the output", int(np.prod(out_shape)) * dtype.itemsize))
    for what, nbytes in plan:
        check_alloc(queue, nbytes, what)
    total = sum(nbytes for _, nbytes in plan)
    if total > queue.device.global_mem_size:
        raise ValueError(f"this call needs {total / 2**20:.1f} MiB of new device buffers, more "
                         f"than the device's {queue.device.global_mem_size / 2**20:.1f} MiB")


def _device_operands(queue, named, mask, out, uploads, dtype, out_shape, keep, device_result):
    """Device arrays for every array operand (uploading NumPy ones) and for the output.

    Temporaries of a device-array call are plain buffers, which OpenCL keeps alive until
    the kernel is done; a NumPy call blocks on its download, so the pool may serve it.
    """
    pool = runtime.memory_pool(queue.context)
    alloc = None if device_result else pool
    dev, seen = {}, {}
    originals = dict(named, mask=mask)
    for name, host in uploads.items():
        key = id(originals[name])  # add(x, x) uploads x once
        if key not in seen:
            if device_result:
                seen[key] = cl_array.to_device(queue, np.ascontiguousarray(host),
                                               allocator=alloc)
            else:   # lent in place where the device shares host memory: no copy
                seen[key] = to_device(np.ascontiguousarray(host), queue, name, borrow=True)
        dev[name] = seen[key]
    for name, x in list(named) + [("mask", mask)]:
        if isinstance(x, cl_array.Array):
            dev[name] = x
    host_out = None
    if is_device_array(out):
        out_dev = out
    elif keep:  # the kernel reads the values that masked-off elements keep
        out_dev = cl_array.to_device(queue, np.ascontiguousarray(out), allocator=alloc)
    elif out is None and not device_result:
        out_dev, host_out = new_output(queue, out_shape, dtype, None, like=None)
    else:
        out_dev = runtime.empty(queue, out_shape, dtype, allocator=pool)
    return dev, out_dev, host_out


def _copy_overlapping_inputs(queue, dev, out_dev, out_shape, events) -> None:
    """An input sharing memory with ``out`` is safe only when each element is read exactly
    where it is written.  Anything else (a shifted, reversed or broadcast view of ``out``)
    is copied first, so the result is what NumPy gives for overlapping operands."""
    out_strides = _element_strides(out_dev, "out")
    out_lo, out_hi = _byte_span(out_dev)
    for name, x in list(dev.items()):
        if x.base_data is None or x.base_data.int_ptr != out_dev.base_data.int_ptr:
            continue
        lo, hi = _byte_span(x)
        if hi <= out_lo or lo >= out_hi:
            continue
        strides = _broadcast_strides(x.shape, _element_strides(x, name), out_shape)
        same = (x.offset == out_dev.offset and x.dtype == out_dev.dtype
                and all(s == o for s, o, e in zip(strides, out_strides, out_shape) if e > 1))
        if not same:
            dev[name] = _copy(queue, x, events)


def _copy(queue, x: cl_array.Array, events) -> cl_array.Array:
    """A fresh C-contiguous copy of a (possibly strided) device array."""
    copy = runtime.empty(queue, x.shape, x.dtype)
    src = elementwise.Slot("a", x, _element_strides(x, "a"))
    elementwise.launch(queue, "copy", x.dtype, [src],
                       elementwise.Slot("out", copy, _element_strides(copy, "out")), None, 0, (),
                       events)
    return copy


# ---------------------------------------------------------------------------------------------
# Public API

_COMMON_DOC = """
    out : numpy.ndarray or pyopencl.array.Array, optional
        Where to write the result: the broadcast shape and exactly the result dtype, the
        same kind of container as the result.  It may be one of the inputs (in-place use);
        an input that overlaps ``out`` in any other way is copied first, so the result is
        always what NumPy computes.
    mask : bool, int8 or uint8 array, optional
        Broadcastable to the output shape (NumPy or device array); nonzero selects, so a
        pyopencl comparison (``y_dev > 0``, int8) serves as it is.  Where it is False:
        without ``out`` the result is 0; with ``out`` the existing values of ``out`` are
        kept (the kernel reads them back, so a NumPy ``out`` is uploaded first).
    queue : pyopencl.CommandQueue, optional
        Default: the queue of the first device array, else the process-wide default.
    events : list, optional
        The kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    The result in the operands' container: a ``pyopencl.array.Array`` if any operand is one
    (no host round trip), else a ``numpy.ndarray`` (0-d when every operand is a scalar).
    Its dtype is ``numpy.result_type`` of the operands (Python scalars are weak, NEP 50).

    Notes
    -----
    Supported dtypes: float32, int32, int64; float64 where the device reports cl_khr_fp64
    and float16 where it reports cl_khr_fp16.  Anything else, or a result dtype the device
    lacks, raises ``TypeError``: precision is never changed silently.  Integers wrap on
    overflow, as in NumPy.  Any rank up to 8 and any strides (slices, transposes, negative
    steps) are handled; a NumPy operand that is not C-contiguous is copied on the host
    before upload.  Buffers the device cannot allocate are refused with ``ValueError``
    before anything is enqueued.

    Copies: with only NumPy operands, on a device that shares host memory (PoCL's CPU
    device, integrated GPUs), the inputs and a new result are lent to the kernel in place,
    with no copy (a strided input is made contiguous first), except that operands up to
    256 KiB go through a staging buffer the thread keeps (a memcpy).  With a device array
    among the operands, NumPy ones are copied to the device (the call returns before the
    kernel is done).  Nothing is cached.
"""


def _doc(text):
    def wrap(fn):
        fn.__doc__ = text + _COMMON_DOC
        return fn
    return wrap


@_doc("""Elementwise ``a + b`` with NumPy broadcasting.

    Parameters
    ----------
    a, b : numpy.ndarray, pyopencl.array.Array or Python int/float
        Broadcast against each other as NumPy does (rank <= 8).
""")
def add(a, b, *, out=None, mask=None, queue=None, events=None):
    return _elementwise("add", (("a", a), ("b", b)), out, mask, queue, events)


@_doc("""Elementwise ``a * b`` with NumPy broadcasting.

    Parameters
    ----------
    a, b : numpy.ndarray, pyopencl.array.Array or Python int/float
        Broadcast against each other as NumPy does (rank <= 8).
""")
def mul(a, b, *, out=None, mask=None, queue=None, events=None):
    return _elementwise("mul", (("a", a), ("b", b)), out, mask, queue, events)


@_doc("""Fused ``alpha * x + beta * y`` in one pass (e.g. a scaled residual, BatchNorm's
    affine step), with NumPy broadcasting between ``x`` and ``y``.

    Parameters
    ----------
    alpha, beta : int or float (Python or NumPy scalar)
        They take part in the result dtype like NumPy scalars do.
    x, y : numpy.ndarray, pyopencl.array.Array or Python int/float
""")
def axpby(alpha, x, beta, y, *, out=None, mask=None, queue=None, events=None):
    coeffs = (_coefficient(alpha, "alpha"), _coefficient(beta, "beta"))
    return _elementwise("axpby", (("x", x), ("y", y)), out, mask, queue, events, coeffs)


@_doc("""Fused ``max(a + b, 0)`` in one pass: a residual add followed by ReLU.  NaN
    propagates, as with ``np.maximum``.

    Parameters
    ----------
    a, b : numpy.ndarray, pyopencl.array.Array or Python int/float
        Broadcast against each other as NumPy does (rank <= 8).
""")
def add_relu(a, b, *, out=None, mask=None, queue=None, events=None):
    return _elementwise("add_relu", (("a", a), ("b", b)), out, mask, queue, events)


@_doc("""ReLU's backward: ``dy`` where ``y > 0``, else 0, in one pass, with ``y`` the
    ReLU's output (``y = max(h, 0)``, so ``y > 0`` exactly where ``h > 0``; NaN in ``y``
    gives 0).  With ``mask``, DSG's selection: the result is 0 outside it too.

    Parameters
    ----------
    dy, y : numpy.ndarray, pyopencl.array.Array or Python int/float
        Broadcast against each other as NumPy does (rank <= 8).
""")
def relu_backward(dy, y, *, out=None, mask=None, queue=None, events=None):
    return _elementwise("relu_grad", (("a", dy), ("b", y)), out, mask, queue, events)
