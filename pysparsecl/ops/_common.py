"""Input handling shared by the op wrappers: containers, dtypes, shapes, launches."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from .. import runtime

INT32_MAX = np.iinfo(np.int32).max


def is_device_array(a) -> bool:
    return isinstance(a, cl_array.Array)


def require_array(a, name: str, dtype, ndim: Optional[int] = None):
    """Check that ``a`` is a NumPy or pyopencl array of ``dtype`` (and ``ndim``)."""
    if not isinstance(a, (np.ndarray, cl_array.Array)):
        raise TypeError(f"{name} must be a numpy.ndarray or pyopencl.array.Array, "
                        f"got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if is_device_array(a) and not a.flags.c_contiguous:
        raise ValueError(f"{name}: non-contiguous pyopencl arrays are not supported; "
                         "pass a contiguous copy")
    return a


def check_out(out, shape, dtype, like, name: str = "out") -> None:
    """Validate an ``out=`` argument: dtype, shape, contiguity, and the same kind of
    container (NumPy or pyopencl) as the input ``like``."""
    if out is None:
        return
    require_array(out, name, dtype)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if is_device_array(out) != is_device_array(like):
        raise TypeError(f"{name} must be the same kind of container as the input "
                        "(both NumPy or both pyopencl arrays)")
    if not is_device_array(out) and not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def new_output(queue: cl.CommandQueue, shape, dtype, out, like, zeros: bool = False, *,
               slot: str = "out", inputs: Optional[tuple] = None
               ) -> Tuple[cl_array.Array, Optional[Callable[[], np.ndarray]]]:
    """The device array an op writes its result into, and, when the result will be a
    NumPy array that the kernels write in place, how :func:`deliver` takes it (else
    None); ``zeros``: the result starts zeroed; ``slot``: a name unique among the call's
    operands (see :func:`runtime.staging`).

    - ``out`` a device array: itself.
    - A NumPy call (``like`` not a device array) with no ``out``, on a device that shares
      host memory: the result is written in place into a NumPy array lent to the kernels,
      whose memory is an earlier result's that nothing refers to any more, where there
      is one (``runtime.result_empty``), else new memory; except that a small result
      (up to ``runtime.STAGE_ALWAYS_BYTES``, or one with no such memory to take) is
      written to the thread's staging buffer and copied out.
    - A NumPy call with a NumPy ``out``, where the op passes ``inputs`` (the operands
      that the kernels read at other places than the one they write), on a device whose
      kernels work in host memory itself: the same, into ``out``, unless ``out`` overlaps
      one of ``inputs`` or is not a C-contiguous, aligned, writable array.
    - Otherwise a new pooled device array."""
    if is_device_array(out):
        return out, None
    n_bytes = math.prod(shape) * np.dtype(dtype).itemsize
    check_alloc(queue, n_bytes, "the output")
    if n_bytes and not is_device_array(like) and runtime.shares_host_memory(queue.device) \
            and (out is None or (inputs is not None and
                                 runtime.kernels_use_host_memory(queue.device) and
                                 _lendable(out, inputs))):
        if n_bytes <= runtime.STAGING_MAX_BYTES and runtime.kernels_use_host_memory(
                queue.device):
            alignment = runtime.base_alignment(queue.device)
            if out is None and n_bytes > runtime.STAGE_ALWAYS_BYTES:
                # An earlier result's memory, free now, is written in place.
                host = runtime.result_empty(shape, dtype, alignment, reuse_only=True)
                if host is not None:
                    if zeros:
                        host.fill(0)
                    return runtime.wrap_host(queue, host, writable=True), lambda: host
            dev, view = runtime.staging(queue, slot, shape, dtype)
            if zeros:
                view.fill(0)
            if out is None:
                def copied():
                    if n_bytes <= runtime.STAGE_ALWAYS_BYTES:
                        return view.copy()
                    result = runtime.result_empty(shape, dtype, alignment)
                    result[...] = view
                    return result
                return dev, copied

            def take():
                out[...] = view
                return out
            return dev, take
        if out is None:
            host = runtime.result_empty(shape, dtype, runtime.base_alignment(queue.device))
            if zeros:
                host.fill(0)
        else:
            host = out
            if zeros:
                host.fill(0)
        return runtime.wrap_host(queue, host, writable=True), lambda: host
    alloc = runtime.memory_pool(queue.context)
    if zeros:
        return runtime.zeros(queue, shape, dtype, allocator=alloc), None
    return runtime.empty(queue, shape, dtype, allocator=alloc), None


def _lendable(out: np.ndarray, inputs: tuple) -> bool:
    """Whether the kernels may write ``out`` in place: it is a C-contiguous, aligned,
    writable NumPy array that shares no memory with ``inputs``."""
    flags = out.flags
    if not (type(out) is np.ndarray and flags.c_contiguous and flags.aligned and
            flags.writeable):
        return False
    return not any(a is not None and not is_device_array(a) and np.may_share_memory(out, a)
                   for a in inputs)


def written(array, event) -> None:
    """Record that ``event`` wrote ``array``, where ``event`` waited for every event the
    array held (the caller passed them in its wait list): it then stands for them all.
    The list stays one event long instead of growing until pyopencl's ``add_event`` makes
    the host wait for the oldest, which it does on every fourth call that reuses an
    ``out=`` array.  (Views share their base's list, which ``event`` waited for too.)"""
    array.events[:] = [event]


def deliver(out_dev: cl_array.Array, like, out, queue: cl.CommandQueue,
            take: Optional[Callable[[], np.ndarray]] = None):
    """The result in the container the input ``like`` came in: ``out_dev`` itself for a
    device array (no host round trip), else a NumPy array: ``take()`` once the kernels are
    done, where they wrote host memory (see :func:`new_output`), or ``out`` (or a new
    array) filled from ``out_dev``.  A NumPy call returns only when every command it
    enqueued is done, so host memory lent to it (:func:`to_device` with ``borrow``) is
    free again."""
    if is_device_array(like):
        return out_dev
    if take is not None:
        runtime.sync_host(queue, out_dev)
        result = take()
    else:
        result = out if out is not None else np.empty(out_dev.shape, out_dev.dtype)
        if result.size:
            out_dev.get(queue=queue, ary=result)
    queue.finish()
    return result


def int_pair(value, name: str, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum``, as a pair."""
    if type(value) is int:       # the common cases first: the ABC checks below are slow
        pair = (value, value)
    elif type(value) is tuple and len(value) == 2 and type(value[0]) is int \
            and type(value[1]) is int:
        pair = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def to_device(a, queue: cl.CommandQueue, name: str, borrow: bool = False,
              at_offset: bool = True, realign: bool = False) -> cl_array.Array:
    """``a`` as a device array on ``queue``'s context.

    A NumPy array is copied once to the device; with ``borrow`` on a device that shares
    host memory, a small one is copied into the thread's staging buffer named ``name``
    (:func:`runtime.staging`; a memcpy; one up to ``runtime.STAGING_MAX_BYTES`` that
    :func:`runtime.lent_before` finds passed before is lent instead, unless it is at most
    ``runtime.STAGE_ALWAYS_BYTES``) and a larger one lent to the kernels in place
    (:func:`runtime.wrap_host`; no copy unless strided).  A lent array usually lies at an
    offset into its buffer; a kernel argument that takes no offset passes
    ``at_offset=False``, and such an array is first copied on the host into one that
    starts on the base alignment.  With ``realign`` (for kernels that read the array
    many times in vectors, such as the masked GEMM's x), an array up to
    ``runtime.REALIGN_MAX_BYTES`` that is not C-contiguous from a cache-line boundary is
    staged too: NumPy's large allocations start 16 bytes past a page, and every vector
    load of such an array then spans two cache lines (the PoCL masked GEMM at 4096 x
    1024 x 1024 took 17% longer).  Only a call that waits for all its commands before it
    returns (a NumPy call, see :func:`deliver`) may borrow, its kernels must only read
    the array, and ``name`` must be unique among the call's operands."""
    if is_device_array(a):
        if a.context != queue.context:
            raise ValueError(f"{name} belongs to a different OpenCL context than the queue")
        return a
    if runtime.capturing():
        raise ValueError(f"{name} must be a pyopencl array while a LaunchGraph is captured (a "
                         "NumPy operand is read once, and host buffers are reused)")
    check_alloc(queue, a.nbytes, name)
    if borrow and a.nbytes and runtime.shares_host_memory(queue.device):
        in_place = runtime.kernels_use_host_memory(queue.device)
        if in_place and (a.nbytes <= runtime.STAGE_ALWAYS_BYTES or
                         (a.nbytes <= runtime.STAGING_MAX_BYTES and
                          not runtime.lent_before(queue, a, at_offset)) or
                         (realign and a.nbytes <= runtime.REALIGN_MAX_BYTES and
                          not _starts_on_a_line(a))):
            dev, view = runtime.staging(queue, name, a.shape, a.dtype)
            view[...] = a
            return dev
        host = np.ascontiguousarray(a)
        alignment = runtime.base_alignment(queue.device)
        if not host.flags.aligned or (
                not at_offset and host.__array_interface__["data"][0] % alignment):
            staged = runtime.aligned_empty(host.shape, host.dtype, alignment)
            staged[...] = host
            host = staged
        return runtime.wrap_host(queue, host, writable=False)
    return cl_array.to_device(queue, np.ascontiguousarray(a),
                              allocator=runtime.memory_pool(queue.context))


def _starts_on_a_line(a: np.ndarray) -> bool:
    """Whether ``a`` is C-contiguous from a cache-line (64-byte) boundary."""
    return a.flags.c_contiguous and a.__array_interface__["data"][0] % 64 == 0


def check_int32_sizes(**sizes) -> None:
    """Refuse operands whose element count int32 indexing cannot reach, by name."""
    for what, n in sizes.items():
        if n > INT32_MAX:
            raise ValueError(f"{what} has {n} elements, more than int32 indexing allows")


def check_alloc(queue: cl.CommandQueue, n_bytes: int, what: str) -> None:
    """Refuse, before enqueueing anything, a buffer the device cannot allocate."""
    limit = queue.device.max_mem_alloc_size
    if n_bytes > limit:
        raise ValueError(f"{what} needs a {n_bytes / 2**20:.1f} MiB buffer, above the device's "
                         f"maximum allocation of {limit / 2**20:.1f} MiB")


def at_offset_zero(a: cl_array.Array, queue: cl.CommandQueue) -> Optional[cl_array.Array]:
    """A contiguous device array that starts at offset 0 of its own buffer and shares
    ``a``'s memory (a sub-buffer), for kernels that take no offset; None where ``a``'s
    offset is not a multiple of the device's base alignment (then copy)."""
    if not a.offset:
        return a
    if not a.flags.c_contiguous or a.offset % runtime.base_alignment(queue.device):
        return None
    region = a.base_data.get_sub_region(a.offset, a.nbytes)
    return cl_array.Array(queue, a.shape, a.dtype, data=region)


def read_from_start(a: cl_array.Array, queue: cl.CommandQueue) -> cl_array.Array:
    """A contiguous device array with ``a``'s contents that starts at offset 0 of its
    buffer, for a kernel that reads it without an offset: ``a`` itself, a sub-buffer of
    it, or (off the base alignment) a device copy."""
    found = at_offset_zero(a, queue)
    if found is not None:
        return found
    copy = runtime.empty(queue, a.shape, a.dtype, allocator=runtime.memory_pool(queue.context))
    ev = runtime.enqueue_copy(queue, copy.data, a.base_data, byte_count=a.nbytes,
                              src_offset=a.offset, wait_for=list(a.events) or None)
    copy.add_event(ev)
    return copy


def elem_offset(a: cl_array.Array) -> np.int64:
    """A device array's offset into its buffer, in elements."""
    return np.int64(a.offset // a.dtype.itemsize)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def udiv_magic(divisor: int) -> Tuple[np.uint32, np.uint32]:
    """(m, s) such that x // divisor == (x * m) >> s for every 0 <= x < 2**31: the kernels'
    pscl_udiv (common.cl.mako).  With l = ceil(log2(divisor)), m = ceil(2**(31 + l) /
    divisor) < 2**32 and s = 31 + l; the error m * divisor - 2**(31 + l) < divisor <= 2**l
    keeps the quotient exact over 31-bit dividends (Granlund & Montgomery 1994, Thm 4.2)."""
    if not 0 < divisor < 2 ** 31:
        raise ValueError(f"divisor must be in [1, 2**31), got {divisor}")
    shift = 31 + (divisor - 1).bit_length()
    return np.uint32(-(-(1 << shift) // divisor)), np.uint32(shift)
