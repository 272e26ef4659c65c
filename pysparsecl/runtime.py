"""The thin OpenCL layer: choose a device, render a template, build, cache, launch.

Device choice, in order: an explicit ``queue=`` argument; pyopencl's own
``PYOPENCL_CTX`` convention; otherwise the first device (in platform order) that
builds and runs a trivial probe kernel.  A device that fails the probe is
skipped with a warning naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import sys
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pyopencl.tools as cl_tools
from mako.lookup import TemplateLookup

from . import __version__
from .kernel_args import KernelArgError, KernelArgs, Scalar, Signature
from .kernel_args import resolve as resolve_kernel_args

# PoCL's CPU driver otherwise lets its worker threads migrate, and we measured kernels
# flipping between full and half speed on a 2-core machine.  Users can still set it.
os.environ.setdefault("POCL_AFFINITY", "1")

__all__ = [
    "KernelBuildError", "NoDeviceError", "DeviceInfo", "get_queue", "probe_device",
    "list_devices", "render", "build_program", "device_identity", "device_kind",
    "memory_pool", "resolve_queue", "queue_for", "kernels", "LockedKernel", "empty", "in_order",
    "shares_host_memory", "wrap_host", "sync_host", "kernels_use_host_memory",
    "base_alignment", "aligned_empty", "set_host_memory_mode", "staging",
    "release_staging", "LaunchGraph", "capturable", "capturable_op", "capturing", "refuse_capture",
    "enqueue_fill", "fill_array", "zeros", "enqueue_copy", "BoundKernel",
]


class KernelBuildError(RuntimeError):
    """An OpenCL program failed to build; ``build_log`` holds the compiler's output."""

    def __init__(self, message: str, build_log: str, source: str, options: Tuple[str, ...]):
        super().__init__(f"{message}\n--- build log ---\n{build_log.strip()}")
        self.build_log = build_log
        self.source = source
        self.options = options


class NoDeviceError(RuntimeError):
    """No OpenCL device that can build and run a kernel was found."""


_PROBE_SOURCE = """
__kernel void pscl_probe(__global float *y) {
    const int i = get_global_id(0);
    y[i] = 2.0f * (float)i + 1.0f;
}
"""


@dataclass(frozen=True)
class DeviceInfo:
    platform: str
    name: str
    vendor: str
    kind: str
    version: str
    driver_version: str
    compute_units: int
    max_work_group_size: int
    global_mem_mib: int
    max_alloc_mib: int
    local_mem_kib: int
    works: bool
    problem: str = ""


def _device_type_name(device: cl.Device) -> str:
    if device.type & cl.device_type.GPU:
        return "gpu"
    if device.type & cl.device_type.CPU:
        return "cpu"
    if device.type & cl.device_type.ACCELERATOR:
        return "accelerator"
    return "other"


def device_kind(device: cl.Device) -> str:
    """'cpu', 'gpu', 'accelerator' or 'other'."""
    return _device_type_name(device)


def device_identity(device: cl.Device) -> Tuple[str, str, str, str]:
    """What identifies a device's compiler output: platform, device, driver and OpenCL versions."""
    return (device.platform.name.strip(), device.name.strip(), device.driver_version.strip(),
            device.version.strip())


def probe_device(device: cl.Device) -> Optional[str]:
    """Build and run a trivial kernel on ``device``; return None if it works, else the reason."""
    try:
        ctx = cl.Context([device])
        queue = cl.CommandQueue(ctx)
        prg = cl.Program(ctx, _PROBE_SOURCE).build()
        out = np.empty(8, np.float32)
        buf = cl.Buffer(ctx, cl.mem_flags.WRITE_ONLY, out.nbytes)
        prg.pscl_probe(queue, (8,), None, buf)
        cl.enqueue_copy(queue, out, buf)
        queue.finish()
    except Exception as exc:  # any failure means: do not use this device
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first_line}"
    if not np.array_equal(out, 2.0 * np.arange(8, dtype=np.float32) + 1.0):
        return "probe kernel ran but returned wrong values"
    return None


def _all_devices() -> List[cl.Device]:
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return []
    devices = []
    for platform in platforms:
        try:
            devices.extend(platform.get_devices())
        except cl.Error:
            continue
    return devices


_probe_results: Dict[int, Optional[str]] = {}
_probe_lock = threading.Lock()


def _cached_probe(device: cl.Device) -> Optional[str]:
    key = device.int_ptr
    with _probe_lock:
        if key not in _probe_results:
            _probe_results[key] = probe_device(device)
        return _probe_results[key]


def working_devices(warn: bool = True) -> List[cl.Device]:
    """Every device that passes the probe, in platform order; broken ones warn and are skipped."""
    good = []
    for device in _all_devices():
        problem = _cached_probe(device)
        if problem is None:
            good.append(device)
        elif warn:
            warnings.warn(
                f"pysparsecl: skipping OpenCL device {device.name.strip()!r} on platform "
                f"{device.platform.name.strip()!r}: it cannot build and run a trivial kernel "
                f"({problem})", RuntimeWarning, stacklevel=2)
    return good


def list_devices() -> List[DeviceInfo]:
    infos = []
    for device in _all_devices():
        problem = _cached_probe(device)
        infos.append(DeviceInfo(
            platform=device.platform.name.strip(), name=device.name.strip(),
            vendor=device.vendor.strip(), kind=device_kind(device),
            version=device.version.strip(), driver_version=device.driver_version.strip(),
            compute_units=device.max_compute_units,
            max_work_group_size=device.max_work_group_size,
            global_mem_mib=device.global_mem_size >> 20,
            max_alloc_mib=device.max_mem_alloc_size >> 20,
            local_mem_kib=device.local_mem_size >> 10,
            works=problem is None, problem=problem or ""))
    return infos


_default_queue: Optional[cl.CommandQueue] = None
_default_lock = threading.Lock()


def _make_queue(ctx: cl.Context) -> cl.CommandQueue:
    # Profiling is on so that benchmarks and the tuner can time kernels with events.
    return cl.CommandQueue(ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)


# Queues leave service through their ``with`` block (pyopencl's CommandQueue.__exit__).
# Counting those exits lets _check_open skip its costly test (2-4 us, a tenth of an
# eager call's host time) for a queue found open since the last exit anywhere.  The count
# moves before and after each exit, so a check that overlaps one is never trusted.
_queue_exits = 0
_exits_lock = threading.Lock()
_open_at: Dict[int, int] = {}   # id(queue) -> _queue_exits when last found open


def _counting_exits(exit_method):
    @functools.wraps(exit_method)
    def exit_counted(self, *exc_info):
        global _queue_exits
        with _exits_lock:
            _queue_exits += 1
        try:
            return exit_method(self, *exc_info)
        finally:
            with _exits_lock:
                _queue_exits += 1
    exit_counted.pscl_counts_exits = True
    return exit_counted


if not getattr(cl.CommandQueue.__exit__, "pscl_counts_exits", False):
    cl.CommandQueue.__exit__ = _counting_exits(cl.CommandQueue.__exit__)


def _check_open(queue: cl.CommandQueue) -> None:
    """Refuse a queue released by its ``with`` block: using it can crash the process.

    pyopencl only warns (CommandQueueUsedAfterExit) when such a queue is touched, so the
    warning is turned into an error here, before anything is enqueued.  A queue found open
    is not tested again until some queue's ``with`` block ends.  (An id reused by a new
    queue is harmless: that queue is open, or its exit has moved the count.)"""
    exits = _queue_exits
    if _open_at.get(id(queue)) == exits:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        queue.int_ptr  # noqa: B018  (reading the handle makes pyopencl report a release)
    if any(type(w.message).__name__ == "CommandQueueUsedAfterExit" for w in caught):
        raise ValueError("queue was released when its `with` block ended; create a new "
                         "pyopencl.CommandQueue")
    if len(_open_at) >= 1024:
        _open_at.clear()
    _open_at[id(queue)] = exits


def in_order(queue: cl.CommandQueue) -> bool:
    """Whether ``queue`` runs its commands in the order they were enqueued."""
    return not queue.properties & cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE


def get_queue(queue: Optional[cl.CommandQueue] = None) -> cl.CommandQueue:
    """Return ``queue`` if given, else the process-wide default queue (created once)."""
    global _default_queue
    if queue is not None:
        if not isinstance(queue, cl.CommandQueue):
            raise TypeError(f"queue must be a pyopencl.CommandQueue, got {type(queue).__name__}")
        _check_open(queue)
        return queue
    with _default_lock:
        if _default_queue is None:
            if os.environ.get("PYOPENCL_CTX"):
                ctx = cl.create_some_context(interactive=False)
            else:
                devices = working_devices()
                if not devices:
                    raise NoDeviceError(
                        "pysparsecl found no OpenCL device that can build a kernel. Install an "
                        "OpenCL driver; on Debian/Ubuntu `apt-get install pocl-opencl-icd` gives a "
                        "CPU device (see README, 'Installing').")
                ctx = cl.Context([devices[0]])
            _default_queue = _make_queue(ctx)
        return _default_queue


def queue_for(spec: Optional[str] = None) -> cl.CommandQueue:
    """A profiling queue for a device named by ``spec``: 'P:D' indices (as PYOPENCL_CTX),
    or a case-insensitive substring of '<platform> <device>'; None means the default."""
    if not spec:
        return get_queue()
    devices = _all_devices()
    if ":" in spec and spec.replace(":", "").isdigit():
        p_index, d_index = (int(v) for v in spec.split(":"))
        matches = [cl.get_platforms()[p_index].get_devices()[d_index]]
    else:
        matches = [d for d in devices
                   if spec.lower() in f"{d.platform.name} {d.name}".lower()]
    working = [d for d in matches if _cached_probe(d) is None]
    if not working:
        raise NoDeviceError(f"no working OpenCL device matches {spec!r}; "
                            "see `python -m pysparsecl info`")
    return _make_queue(cl.Context([working[0]]))


def resolve_queue(queue: Optional[cl.CommandQueue], *arrays, **named_arrays) -> cl.CommandQueue:
    """The queue an op runs on: ``queue``, else that of the first device array, else the
    default queue.  Every device array (positional, or keyword so that an error can name it)
    must live in the chosen queue's context."""
    candidates = [("an input", a) for a in arrays] + list(named_arrays.items())
    device_arrays = [(name, a) for name, a in candidates if isinstance(a, cl_array.Array)]
    if queue is None and device_arrays:
        name, first = device_arrays[0]
        if first.queue is None:
            raise ValueError(f"{name} is a pyopencl array without a queue; pass queue=")
        queue = first.queue
    queue = get_queue(queue)
    for name, a in device_arrays:
        if a.context != queue.context:
            raise ValueError(f"{name} belongs to a different OpenCL context than the queue the "
                             "operation runs on (queue=, else the first device array's queue)")
    return queue


# ---------------------------------------------------------------------------------------------
# Templates and program cache

def kernel_dir() -> Path:
    """Where the Mako templates live: the package's ``kernels`` data, or the source tree's."""
    packaged = Path(__file__).resolve().parent / "kernels"
    if (packaged / "common.cl.mako").is_file():
        return packaged
    source_tree = Path(__file__).resolve().parent.parent / "kernels"
    if (source_tree / "common.cl.mako").is_file():
        return source_tree
    raise FileNotFoundError(f"pysparsecl kernel templates not found in {packaged} or {source_tree}")


_lookup: Optional[TemplateLookup] = None


def render(template_name: str, **params) -> str:
    """Render ``kernels/<template_name>`` with ``params``; an undefined name raises.  An
    ``ARGS`` parameter (:mod:`pysparsecl.kernel_args`) is resolved first, and the source
    is checked against it: a kernel whose parameter list is not the declared one raises
    ``KernelArgError`` before anything builds."""
    return _render_checked(template_name, params)[0]


def _render_checked(template_name: str, params) -> Tuple[str, Optional[KernelArgs]]:
    """The rendered source and its resolved ``ARGS`` (None where it has none)."""
    global _lookup
    if _lookup is None:
        _lookup = TemplateLookup(directories=[str(kernel_dir())], strict_undefined=True,
                                 input_encoding="utf-8")
    args = resolve_kernel_args(params.get("ARGS"), params)
    if args is not None:
        params = dict(params, ARGS=args)
    source = _lookup.get_template(template_name).render(**params)
    if args is not None:
        args.check_source(source)
    return source, args


_program_cache: Dict[tuple, cl.Program] = {}
_build_locks: Dict[tuple, threading.Lock] = {}
_cache_lock = threading.Lock()
build_count = 0  # how many programs this process has compiled (tests check cache hits)


def build_program(ctx: cl.Context, source: str, options: Tuple[str, ...] = ()) -> cl.Program:
    """Build ``source`` for every device of ``ctx``; cached on source, options, device, version."""
    global build_count
    devices = ctx.devices
    key = (hashlib.sha256(source.encode()).hexdigest(), tuple(options),
           tuple(device_identity(d) for d in devices), ctx.int_ptr, __version__)
    with _cache_lock:
        program = _program_cache.get(key)
        if program is not None:
            return program
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:  # one build per key even when threads race
        with _cache_lock:
            program = _program_cache.get(key)
        if program is not None:
            return program
        try:
            program = cl.Program(ctx, source).build(options=list(options))
        except cl.RuntimeError as exc:
            # pyopencl's message already carries each device's compiler log.
            raise KernelBuildError("pysparsecl: OpenCL program failed to build", str(exc),
                                   source, tuple(options)) from None
        with _cache_lock:
            _program_cache[key] = program
            build_count += 1
        return program


def _arg_kinds(args) -> tuple:
    """Each kernel argument's scalar dtype, or None for a buffer (or NULL)."""
    return tuple(a.dtype if isinstance(a, np.generic) else None for a in args)


class LockedKernel:
    """A kernel object shared by threads: setting its arguments and enqueueing is atomic.

    pyopencl kernel objects are costly to create (each builds an argument invoker), so
    they are made once per program and reused.  pyopencl must know the scalar arguments'
    dtypes, or it sets each scalar through its generic path, which cost about 5 us per
    argument: 0.13 ms per launch of a 17-argument kernel on PoCL and 0.24 ms on the
    H100's host, against 7 and 17 us declared.  With a ``signature``
    (:mod:`pysparsecl.kernel_args`) the dtypes are the declared ones and every call's
    values are checked against it; without one, the first call's NumPy scalars declare
    them.  Either way a call whose arguments are of other kinds raises rather than have
    pyopencl convert a value silently.
    """

    def __init__(self, program: cl.Program, name: str, signature: Optional[Signature] = None):
        self.program = program
        self.kernel = cl.Kernel(program, name)
        self.name = name
        self.signature = signature
        self._lock = threading.Lock()
        self._kinds: Optional[tuple] = None
        self._types: Optional[tuple] = None   # the last call's argument types
        self._accepted: set = set()           # argument types checked against the signature
        if signature is not None:
            if signature.kernel != name:
                raise KernelArgError(f"kernel {name} given the signature of "
                                     f"{signature.kernel}")
            if self.kernel.num_args != len(signature):
                raise KernelArgError(f"kernel {name} was built with {self.kernel.num_args} "
                                     f"arguments but is declared with {len(signature)}")
            self._kinds = signature.scalar_dtypes
            self.kernel.set_scalar_arg_dtypes(list(self._kinds))

    def __call__(self, queue, global_size, local_size, *args, wait_for=None) -> cl.Event:
        # Arguments of an accepted call's types are accepted: the cheap check (0.5 us,
        # against 2 us for the kinds) covers the calls that repeat a launch.
        types = tuple(map(type, args))
        with self._lock:
            if types != self._types:
                if self.signature is not None:
                    if types not in self._accepted:
                        self.signature.check_values(args)   # raises, naming the argument
                        self._accepted.add(types)
                    self._types = types
                else:
                    kinds = _arg_kinds(args)
                    if self._kinds is None:
                        self.kernel.set_scalar_arg_dtypes(list(kinds))
                        self._kinds, self._types = kinds, types
                    elif kinds != self._kinds:
                        raise TypeError(f"pysparsecl: kernel {self.name} called with argument "
                                        f"kinds {kinds}, declared {self._kinds} by its first "
                                        "call")
            graph = _capture.graph
            if graph is not None:
                return graph._record(self, queue, global_size, local_size, args)
            return self.kernel(queue, global_size, local_size, *args, wait_for=wait_for)

    def launch(self, queue, global_size, local_size, args: Dict[str, object],
               wait_for=None) -> cl.Event:
        """Enqueue with ``args`` given by name (every declared argument once): for
        launches that build their arguments per call; a plan binds them once
        (:meth:`BoundKernel.bind`)."""
        if self.signature is None:
            raise TypeError(f"kernel {self.name} has no declared signature: launch it with "
                            "positional arguments")
        return self(queue, global_size, local_size, *self.signature.pack(args),
                    wait_for=wait_for)


_UNSET = object()   # a BoundKernel's free argument not set yet
_POINTER = object()  # a BoundKernel's free argument declared as a buffer

#: pyopencl's batched argument setters (private, used by its generated invokers).
_BATCHED_ARGS = all(hasattr(cl.Kernel, name)
                    for name in ("_set_arg_multi", "_set_arg_buf_pack_multi"))


class BoundKernel:
    """A launch whose arguments are mostly fixed: a kernel object of its own, with every
    argument but those at ``free`` set once, here.  A call sets only the free ones, in
    order, and enqueues.

    On NVIDIA's OpenCL setting one argument costs about as much as the enqueue itself
    (12 us per enqueue against ~80 us for a 9-argument pyopencl call, measured on the
    H200's host), and the convolution has 22: an op keeps one BoundKernel per launch
    plan, so a repeated call sets 3 to 6 of them.  ``args`` holds every argument
    (placeholders, such as None, at the free positions); scalars are NumPy scalars, whose
    dtypes are the kernel's.  Launches go through :class:`LaunchGraph` capture as
    :class:`LockedKernel`'s do.

    A kernel with a signature is bound by name with :meth:`bind`, whose ``launch`` takes
    the free arguments by name; every value is checked against the declaration (the
    fixed ones here, a free one when it changes), at the cost of a type comparison.
    """

    def __init__(self, locked: LockedKernel, args: tuple, free: Tuple[int, ...]):
        self.locked = locked
        self.kernel = cl.Kernel(locked.program, locked.name)
        self.free = tuple(free)
        self.args = tuple(args)
        self._lock = threading.Lock()
        signature = locked.signature
        # Per free argument: the declared NumPy scalar type, _POINTER for a buffer, or
        # None where nothing is declared (a scalar is then told by its value).
        kinds, codes = [None] * len(self.free), [b""] * len(self.free)
        if signature is not None:
            signature.check_values(self.args, skip=self.free)
            for slot, i in enumerate(self.free):
                a = signature.args[i]
                kinds[slot] = a.type if isinstance(a, Scalar) else _POINTER
                codes[slot] = a.dtype.char.encode() if isinstance(a, Scalar) else b""
        # (slot, position, kind, struct code) per free argument: the call's table.
        self._slots = tuple(zip(range(len(self.free)), self.free, kinds, codes))
        # What each free argument holds now.  A repeated call (the same arrays, as a
        # network's layers see them from a memory pool) sets nothing again; the objects
        # are kept so that their handles cannot be reused by another buffer meanwhile.
        self._set: List[object] = [_UNSET] * len(self.free)
        for i, value in enumerate(self.args):
            if i not in self.free:
                self.kernel.set_arg(i, value)

    @classmethod
    def bind(cls, locked: LockedKernel, free: Tuple[str, ...], **fixed) -> "BoundKernel":
        """Bind a kernel with a signature by name: ``fixed`` gives every argument that is
        not in ``free``.  Names become positions here, once; ``launch(queue, global_size,
        local_size, <free>=..., wait_for=None)`` then takes the free arguments by name."""
        signature = locked.signature
        if signature is None:
            raise TypeError(f"kernel {locked.name} has no declared signature: bind it "
                            "with BoundKernel(locked, args, free)")
        free = tuple(free)
        positions = tuple(signature.position(name) for name in free)
        if len(set(free)) != len(free):
            raise KernelArgError(f"kernel {locked.name}: free arguments repeat a name: "
                                 f"{free}")
        both = sorted(set(free) & set(fixed))
        if both:
            raise KernelArgError(f"kernel {locked.name}: argument(s) "
                                 f"{', '.join(map(repr, both))} given both as fixed and as free")
        args = signature.pack(dict(fixed, **{name: None for name in free}))
        bound = cls(locked, args, positions)
        bound.launch = signature.launcher(free, bound._enqueue)
        return bound

    def launch(self, queue, global_size, local_size, **free) -> cl.Event:
        """Replaced by :meth:`bind` with a function taking the free arguments by name."""
        raise TypeError(f"kernel {self.locked.name}: launch() needs a BoundKernel made by "
                        "BoundKernel.bind; call the BoundKernel with positional arguments")

    def _bad_free(self, slot: int, value) -> Exception:
        i = self.free[slot]
        self.locked.signature.check_value(i, value)   # raises, naming the argument
        return AssertionError(f"kernel {self.locked.name}: argument {i} rejected")

    def __call__(self, queue, global_size, local_size, *free_values, wait_for=None
                 ) -> cl.Event:
        return self._enqueue(queue, global_size, local_size, free_values, wait_for)

    def _enqueue(self, queue, global_size, local_size, free_values: tuple, wait_for
                 ) -> cl.Event:
        if len(free_values) != len(self.free):
            raise TypeError(f"kernel {self.locked.name}: {len(self.free)} free arguments "
                            f"bound, {len(free_values)} given")
        graph = _capture.graph
        if graph is not None:
            args = list(self.args)
            for i, value in zip(self.free, free_values):
                args[i] = value
            if self.locked.signature is not None:
                self.locked.signature.check_values(args)
            if self.locked._kinds is None:
                self.locked._kinds = _arg_kinds(args)
            return graph._record(self.locked, queue, global_size, local_size, tuple(args))
        kernel = self.kernel
        with self._lock:
            # pyopencl's own invokers set arguments in two batched calls, buffers and
            # packed scalars: ~0.1 us each, where set_arg takes ~7 us for a NumPy scalar.
            buffers, scalars, held = [], [], self._set
            for (slot, i, kind, code), value in zip(self._slots, free_values):
                old = held[slot]
                if kind is _POINTER:
                    if value is old:
                        continue
                    if not isinstance(value, cl.MemoryObjectHolder):
                        raise self._bad_free(slot, value)
                    if old is not _UNSET and old.int_ptr == value.int_ptr:
                        continue
                    buffers += (i, value)
                elif kind is not None:
                    if type(value) is not kind:
                        raise self._bad_free(slot, value)
                    if type(old) is kind and old == value:
                        continue
                    scalars += (i, code, value)
                elif isinstance(value, np.generic):
                    if type(old) is type(value) and old == value:
                        continue
                    scalars += (i, value.dtype.char.encode(), value)
                elif value is old or (value is not None and old is not None and
                                      old is not _UNSET and old.int_ptr == value.int_ptr):
                    continue
                else:
                    buffers += (i, value)
                held[slot] = value
            if _BATCHED_ARGS:
                if buffers:
                    kernel._set_arg_multi(tuple(buffers))
                if scalars:
                    kernel._set_arg_buf_pack_multi(tuple(scalars))
            else:
                for k in range(0, len(buffers), 2):
                    kernel.set_arg(buffers[k], buffers[k + 1])
                for k in range(0, len(scalars), 3):
                    kernel.set_arg(scalars[k], scalars[k + 2])
            return cl.enqueue_nd_range_kernel(queue, kernel, global_size, local_size,
                                              wait_for=wait_for)


_kernel_cache: Dict[tuple, Dict[str, LockedKernel]] = {}


# ---------------------------------------------------------------------------------------------
# Capture and replay

class _CaptureState(threading.local):
    """This thread's capture state.  The class holds the defaults, so that reading them
    costs an attribute lookup (a missing attribute of a plain threading.local costs an
    exception inside getattr: 0.7 us, on every launch)."""
    graph: "Optional[LaunchGraph]" = None   # the graph being captured
    allowed = False                          # inside an op that may be captured


_capture = _CaptureState()


@contextlib.contextmanager
def capturable():
    """Marks the launches inside as safe to capture: the op that wraps them enqueues
    nothing but :class:`LockedKernel` launches on device arrays (see :class:`LaunchGraph`)."""
    before = _capture.allowed
    _capture.allowed = True
    try:
        yield
    finally:
        _capture.allowed = before


def capturable_op(op):
    """Decorates an op whose every path on device arrays enqueues only kernels of ours,
    :func:`enqueue_fill` and :func:`enqueue_copy`, and needs no host between them (a path
    that does calls :func:`refuse_capture`), so that a :class:`LaunchGraph` may record it.
    (The flag is set inline rather than through :func:`capturable`, whose generator every
    op call would pay for.)"""
    @functools.wraps(op)
    def allowed(*args, **kwargs):
        before = _capture.allowed
        _capture.allowed = True
        try:
            return op(*args, **kwargs)
        finally:
            _capture.allowed = before
    return allowed


def capturing() -> bool:
    """Whether this thread is capturing a :class:`LaunchGraph`."""
    return _capture.graph is not None


def refuse_capture(what: str) -> None:
    """Raise ``NotImplementedError`` while this thread captures a :class:`LaunchGraph`:
    ``what`` (a phrase) needs the host, which a replay would skip."""
    if capturing():
        raise NotImplementedError(f"pysparsecl: {what} cannot be captured in a LaunchGraph "
                                  "(it needs the host between launches)")


def enqueue_fill(queue, buffer, pattern, offset: int, size: int, wait_for=None) -> cl.Event:
    """``clEnqueueFillBuffer``, recorded by a :class:`LaunchGraph` being captured (inside
    a :func:`capturable_op`) so that a replay fills again."""
    graph = _capture.graph
    if graph is not None:
        return graph._record_command("a fill", queue, cl.enqueue_fill_buffer,
                                     (queue, buffer, pattern, offset, size))
    return cl.enqueue_fill_buffer(queue, buffer, pattern, offset, size, wait_for=wait_for)


def fill_array(queue, array: cl_array.Array, value, wait_for=None) -> cl.Event:
    """Every element of a contiguous device array set to ``value`` (its dtype), recorded
    by a :class:`LaunchGraph` being captured; the array's events become the fill."""
    wait = list(array.events) + list(wait_for or ())
    ev = enqueue_fill(queue, array.base_data, array.dtype.type(value), array.offset,
                      array.nbytes, wait_for=wait or None)
    array.events[:] = [ev]
    return ev


def zeros(queue, shape, dtype, allocator=None) -> cl_array.Array:
    """A zeroed device array (pooled with ``allocator``), its fill recorded by a
    :class:`LaunchGraph` being captured (``pyopencl.array.zeros`` would not be)."""
    a = empty(queue, shape, dtype, allocator=allocator)
    if a.nbytes:
        fill_array(queue, a, 0)
    return a


def enqueue_copy(queue, dst, src, wait_for=None, **how) -> cl.Event:
    """``pyopencl.enqueue_copy`` between two buffers (``how``: its byte_count and offsets,
    or origins, region and pitches of a rectangular copy), recorded by a
    :class:`LaunchGraph` being captured."""
    graph = _capture.graph
    if graph is not None:
        return graph._record_command("a copy", queue, functools.partial(cl.enqueue_copy, **how),
                                     (queue, dst, src))
    return cl.enqueue_copy(queue, dst, src, wait_for=wait_for, **how)


class LaunchGraph:
    """A sequence of op calls on device arrays, recorded once and replayed with the
    kernels' arguments already set.

    ::

        graph = pysparsecl.LaunchGraph(queue, inputs=(x_dev,))
        with graph:                       # runs the calls once, and records them
            y = forward(x_dev)            # conv2d_sparse calls on device arrays
        graph.replay(new_x)               # y now holds forward(new_x)

    Each recorded launch gets a kernel object of its own with its arguments set once, so a
    replay only enqueues: on NVIDIA's OpenCL setting a launch's arguments costs several
    times the enqueue itself.  A replay allocates nothing; every buffer the calls used
    (outputs, scratch) is held by the graph, and the outputs it returned during capture
    are overwritten by each replay.  Scalar arguments (shapes, a learning rate) are those
    of the capture.  A prepared weight (a ``SparseConvWeight``) is used as it was at
    capture; device arrays are read afresh by each replay, so a training step captured
    once updates its parameters in place on every replay.

    ``inputs``: device arrays that :meth:`replay` may refill with new data (same shape and
    dtype; NumPy or device arrays), before its launches.  Only ops on device arrays that
    enqueue nothing but kernels, fills and copies can be captured: :func:`conv2d_sparse`,
    the elementwise ops, :func:`masked_matmul` and its backward, :func:`masked_relu_bn`
    and its backward, :func:`conv2d_masked` (a per-window mask) and its backward,
    :func:`drs_mask`, :func:`drs_mask_conv2d`, :func:`random_mask`, the pooling ops and
    the training ops.  Any other launch, a NumPy operand, or a path that needs the host
    between launches raises inside the ``with`` block.  The queue must be in order, and
    every captured call must use it.  A graph is captured once.
    """

    def __init__(self, queue: Optional[cl.CommandQueue] = None, inputs=()):
        queue = get_queue(queue)
        if not in_order(queue):
            raise ValueError("queue: a LaunchGraph needs an in-order queue")
        inputs = tuple(inputs)
        for i, a in enumerate(inputs):
            if not isinstance(a, cl_array.Array):
                raise TypeError(f"inputs[{i}] must be a pyopencl.array.Array, got "
                                f"{type(a).__name__}")
            if a.context != queue.context or not a.flags.c_contiguous:
                raise ValueError(f"inputs[{i}] must be a contiguous array in the queue's "
                                 "context")
        self.queue = queue
        self.inputs = inputs
        self._launches: List[tuple] = []   # (kernel, global size, local size, arguments)
        self._commands: List[tuple] = []   # (enqueue function, its arguments), in order
        self._state = "new"

    def __enter__(self) -> "LaunchGraph":
        if self._state != "new":
            raise RuntimeError("a LaunchGraph is captured once; make a new one")
        if capturing():
            raise RuntimeError("this thread is already capturing a LaunchGraph")
        _capture.graph = self
        self._state = "capturing"
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _capture.graph = None
        self._state = "ready" if exc_type is None else "failed"

    def __len__(self) -> int:
        """The number of kernel launches recorded (fills and copies not counted)."""
        return len(self._launches)

    def _check_call(self, what: str, queue) -> None:
        if not _capture.allowed:
            raise NotImplementedError(f"pysparsecl: {what} was enqueued by an op that cannot "
                                      "be captured in a LaunchGraph")
        if queue is not self.queue and queue.int_ptr != self.queue.int_ptr:
            raise ValueError("a captured call must run on the LaunchGraph's queue")

    def _record_command(self, what: str, queue, enqueue, args: tuple) -> cl.Event:
        self._check_call(what, queue)
        self._commands.append((enqueue, args))
        return enqueue(*args)

    def _record(self, locked: LockedKernel, queue, global_size, local_size, args) -> cl.Event:
        self._check_call(f"kernel {locked.name}", queue)
        kernel = cl.Kernel(locked.program, locked.name)
        kernel.set_scalar_arg_dtypes(list(locked._kinds))
        kernel.set_args(*args)
        global_size = tuple(int(n) for n in global_size)
        local_size = None if local_size is None else tuple(int(n) for n in local_size)
        self._launches.append((kernel, global_size, local_size, args))
        self._commands.append((cl.enqueue_nd_range_kernel,
                               (queue, kernel, global_size, local_size)))
        return cl.enqueue_nd_range_kernel(queue, kernel, global_size, local_size)

    def replay(self, *inputs) -> Optional[cl.Event]:
        """Enqueue the recorded launches again (after copying ``inputs``, if given, into
        the graph's inputs); returns the last launch's event.  Nothing waits: read the
        outputs as usual (``.get()`` waits for the queue)."""
        if self._state != "ready":
            raise RuntimeError("replay needs a LaunchGraph whose capture completed "
                               f"(this one is {self._state})")
        if inputs:
            if len(inputs) != len(self.inputs):
                raise ValueError(f"replay takes {len(self.inputs)} inputs (those given at "
                                 f"construction), got {len(inputs)}")
            for i, (new, old) in enumerate(zip(inputs, self.inputs)):
                if not isinstance(new, (np.ndarray, cl_array.Array)):
                    raise TypeError(f"inputs[{i}] must be a numpy.ndarray or "
                                    f"pyopencl.array.Array, got {type(new).__name__}")
                if tuple(new.shape) != tuple(old.shape) or new.dtype != old.dtype:
                    raise ValueError(f"inputs[{i}] must have shape {tuple(old.shape)} and "
                                     f"dtype {old.dtype} (as captured), got "
                                     f"{tuple(new.shape)} {new.dtype}")
                if isinstance(new, cl_array.Array):
                    if new.context != old.context or not new.flags.c_contiguous:
                        raise ValueError(f"inputs[{i}] must be a contiguous array in the "
                                         "graph's context")
                    same = new.nbytes and new.offset == old.offset and \
                        new.base_data.int_ptr == old.base_data.int_ptr   # the input itself
                    if new.nbytes and not same:
                        cl.enqueue_copy(self.queue, old.base_data, new.base_data,
                                        byte_count=new.nbytes, src_offset=new.offset,
                                        dst_offset=old.offset)
                else:
                    old.set(np.ascontiguousarray(new), queue=self.queue)
        event = None
        for enqueue, args in self._commands:
            event = enqueue(*args)
        return event


def kernels(ctx: cl.Context, template_name: str, names: Tuple[str, ...],
            options: Tuple[str, ...] = (), **params) -> Dict[str, LockedKernel]:
    """Render, build and return the named kernels of a template (all cached).  With an
    ``ARGS`` parameter (see :func:`render`) each kernel gets its declared signature."""
    key = (ctx.int_ptr, template_name, names, options, tuple(sorted(params.items())))
    with _cache_lock:
        found = _kernel_cache.get(key)
    if found is None:
        source, args = _render_checked(template_name, params)
        program = build_program(ctx, source, options)
        found = {name: LockedKernel(program, name,
                                    args.signature(name) if args is not None else None)
                 for name in names}
        with _cache_lock:
            found = _kernel_cache.setdefault(key, found)
    return found


def empty(queue: cl.CommandQueue, shape: Tuple[int, ...], dtype,
          allocator=None) -> cl_array.Array:
    """``pyopencl.array.empty(queue, shape, dtype, allocator=...)``, C-contiguous, made
    through the constructor's internal fast path (the one ``empty_like`` takes): the public
    path spends about 13 us per array (2-core CI host) validating the shape with NumPy, as
    much as the rest of a small op's Python path.  ``shape`` must be a tuple of ints >= 0
    (every caller passes a shape it has already checked).  Should a pyopencl release drop
    the fast path, this falls back to the public constructor."""
    return _fast_array(queue, shape, dtype, allocator=allocator)


#: (shape, dtype) -> (NumPy dtype, shape of ints, C strides, size): _fast_array's layouts.
_layouts: Dict[tuple, tuple] = {}


def _layout(shape, dtype) -> tuple:
    try:
        return _layouts[(shape, dtype)]
    except (KeyError, TypeError):   # new, or a shape of unhashable parts (a list)
        pass
    dtype_ = np.dtype(dtype)
    shape_ = tuple(int(n) for n in shape)
    strides, step = [], dtype_.itemsize
    for n in reversed(shape_):
        strides.append(step)
        step *= max(n, 1)
    found = (dtype_, shape_, tuple(reversed(strides)), math.prod(shape_))
    if type(shape) is tuple and len(_layouts) < 4096:
        _layouts[(shape, dtype)] = found
    return found


def _fast_array(queue: cl.CommandQueue, shape, dtype, allocator=None, data=None,
                offset: int = 0) -> cl_array.Array:
    """A C-contiguous device array through pyopencl's internal constructor fast path: new
    (from ``allocator``) or over the buffer ``data`` at byte ``offset``; the public
    constructor where a pyopencl release lacks the fast path."""
    dtype, shape, strides, size = _layout(shape, dtype)
    try:
        return cl_array.Array(None, shape, dtype, allocator=allocator, data=data,
                              offset=offset, strides=strides, _fast=True, _size=size,
                              _context=queue.context, _queue=queue)
    except TypeError:  # no fast path in this pyopencl
        if data is None:
            return cl_array.empty(queue, shape, dtype, allocator=allocator)
        return cl_array.Array(queue, shape, dtype, data=data, offset=offset)


_pools: Dict[int, cl_tools.MemoryPool] = {}


def memory_pool(ctx: cl.Context) -> cl_tools.MemoryPool:
    """A per-context buffer pool, so scratch allocations in hot calls are reused."""
    with _cache_lock:
        pool = _pools.get(ctx.int_ptr)
        if pool is None:
            pool = _pools[ctx.int_ptr] = cl_tools.MemoryPool(cl_tools.ImmediateAllocator(
                cl.CommandQueue(ctx)))
        return pool


_shares_host: Dict[int, bool] = {}
_in_place: Dict[int, bool] = {}
_HOST_MODES = ("copy", "map", "in_place")


def shares_host_memory(device: cl.Device) -> bool:
    """Whether ``device`` works in the host's own memory (CPU devices such as PoCL's,
    integrated GPUs): then a NumPy operand of a call that waits for its result can be
    lent to the kernels in place (:func:`wrap_host`) instead of copied.  Set
    ``PYSPARSECL_ZERO_COPY=0`` to copy anyway (read once per device), or see
    :func:`set_host_memory_mode`."""
    key = device.int_ptr
    found = _shares_host.get(key)
    if found is None:
        try:
            found = bool(device.host_unified_memory)
        except cl.Error:  # deprecated since OpenCL 2.0: a driver may not answer
            found = False
        # wrap_host's buffer starts at most an alignment before the array, in its page.
        found = found and os.environ.get("PYSPARSECL_ZERO_COPY", "1") != "0" and \
            base_alignment(device) <= 4096
        _shares_host[key] = found
    return found


def set_host_memory_mode(device: cl.Device, mode: Optional[str]) -> None:
    """How NumPy calls on ``device`` move their operands, for tests and measurements:
    ``"copy"`` (to and from device buffers), ``"map"`` (lent in place, results synced by
    a map), ``"in_place"`` (lent in place, results read after the wait alone: only sound
    where :func:`kernels_use_host_memory` holds), or None to decide from the device again."""
    if mode is not None and mode not in _HOST_MODES:
        raise ValueError(f"mode must be one of {_HOST_MODES} or None, got {mode!r}")
    key = device.int_ptr
    _shares_host.pop(key, None)
    _in_place.pop(key, None)
    if mode is not None:
        _shares_host[key] = mode != "copy"
        _in_place[key] = mode == "in_place"


_alignments: Dict[int, int] = {}


def base_alignment(device: cl.Device) -> int:
    """The alignment in bytes that OpenCL gives every buffer's start on ``device``
    (``CL_DEVICE_MEM_BASE_ADDR_ALIGN``, at least 64), which kernels may rely on for
    vector loads."""
    key = device.int_ptr
    found = _alignments.get(key)
    if found is None:
        found = _alignments[key] = max(device.mem_base_addr_align // 8, 64)
    return found


def aligned_empty(shape, dtype, alignment: int, zeros: bool = False) -> np.ndarray:
    """A new C-contiguous NumPy array whose data starts on an ``alignment``-byte boundary
    (a view into a slightly larger allocation)."""
    dtype = np.dtype(dtype)
    n_bytes = math.prod(shape) * dtype.itemsize
    raw = (np.zeros if zeros else np.empty)(n_bytes + alignment, np.uint8)
    return _aligned_view(raw, shape, dtype, n_bytes, alignment)


def _aligned_view(raw: np.ndarray, shape, dtype: np.dtype, n_bytes: int,
                  alignment: int) -> np.ndarray:
    """The array ``shape`` of ``dtype`` in the bytes ``raw`` holds (``alignment`` more than
    ``n_bytes``), starting on the first ``alignment``-byte boundary."""
    start = -raw.__array_interface__["data"][0] % alignment
    return raw[start:start + n_bytes].view(dtype).reshape(shape)


#: Host memory of the NumPy results that ops return where kernels write them in place
#: (:func:`result_empty`): the most recent allocations, reused once nothing refers to them.
_results: List[np.ndarray] = []
_RESULTS_MAX = 8
_RESULTS_MAX_BYTES = 512 * 2**20
_results_lock = threading.Lock()


def _refs(blocks: List[np.ndarray], i: int) -> int:
    return sys.getrefcount(blocks[i])


#: _refs of a block that only the list holds, measured once through the same code path (the
#: count a given Python reports for its own temporaries may differ between versions).
_FREE_REFS = _refs([np.empty(1, np.uint8)], 0)


def result_empty(shape, dtype, alignment: int, reuse_only: bool = False
                 ) -> Optional[np.ndarray]:
    """:func:`aligned_empty` for a result the caller returns to the user, reusing the memory
    of an earlier result of the same size once nothing refers to it any more.

    Fresh memory costs a page fault per 4 KiB page at its first write, inside the kernels:
    for the 6.4 MB output of a batch-8 ResNet-50 layer, about a third of the convolution
    on a 2-core host (a diagnostic measurement).  Every view of a result holds its
    allocation (NumPy bases lead to the allocation itself), so a block whose only
    references are this cache's is truly free.  The last ``_RESULTS_MAX`` allocations
    (at most ``_RESULTS_MAX_BYTES`` together) are kept; reusing one also reuses the OpenCL
    buffer kept over its address range (:func:`wrap_host`).  With ``reuse_only``, None
    where no kept memory is free."""
    dtype = np.dtype(dtype)
    n_bytes = math.prod(shape) * dtype.itemsize
    size = n_bytes + alignment
    with _results_lock:
        for i in range(len(_results) - 1, -1, -1):
            if _results[i].size == size and _refs(_results, i) <= _FREE_REFS:
                raw = _results.pop(i)
                break
        else:
            if reuse_only:
                return None
            raw = np.empty(size, np.uint8)
        _results.append(raw)   # most recently used last
        total = sum(block.size for block in _results)
        while len(_results) > _RESULTS_MAX or (total > _RESULTS_MAX_BYTES and
                                               len(_results) > 1):
            total -= _results.pop(0).size
        return _aligned_view(raw, shape, dtype, n_bytes, alignment)


def release_results() -> None:
    """Let go of the memory kept for reuse by :func:`result_empty`."""
    with _results_lock:
        _results.clear()


def wrap_host(queue: cl.CommandQueue, host: np.ndarray, writable: bool) -> cl_array.Array:
    """A device array over the C-contiguous NumPy array ``host``'s own memory
    (``CL_MEM_USE_HOST_PTR``), made without a copy.

    OpenCL starts every buffer on the device's base alignment (:func:`base_alignment`)
    and kernels may rely on it: the ops pick aligned vector loads from an array's offset
    into its buffer.  So the buffer starts at ``host``'s address rounded down to that
    alignment (the same page: the alignment divides 4 KiB), and the array lies at the
    remainder as its offset; the few bytes before it are never touched.

    The caller must wait for every command that uses the array before ``host`` is read
    (for a written one: through :func:`sync_host`) or changed by anyone else; the ops lend
    host memory only to calls that block until their result is on the host.  ``host``
    must be aligned to its own item size (NumPy's ``aligned``).

    Where the kernels work in host memory itself (:func:`kernels_use_host_memory`), the
    buffer over an address range is kept and reused by later calls that lend the same
    range (TVM's planned storage, an ``out=`` array used again): a new buffer costs PoCL
    tens of microseconds at its first launch.  Such a buffer does not keep ``host`` alive;
    it only ever serves calls that lend memory at its range while they run.  Elsewhere
    each call makes a buffer, which keeps ``host`` alive.  The returned array holds
    ``host`` (attribute ``lent_host``), so a temporary lent for a call lives as long as
    the array the call's kernels are given."""
    if not (host.flags.c_contiguous and host.flags.aligned):
        raise ValueError("wrap_host needs a C-contiguous, aligned array")
    alignment = base_alignment(queue.device)
    if alignment > 4096:
        raise ValueError(f"wrap_host: a base alignment of {alignment} bytes spans pages")
    address = host.__array_interface__["data"][0]   # (cheaper than host.ctypes.data)
    lead = address % alignment
    flags = cl.mem_flags.USE_HOST_PTR | (cl.mem_flags.READ_WRITE if writable
                                         else cl.mem_flags.READ_ONLY)
    if kernels_use_host_memory(queue.device):
        buf = _lent_buffer(queue.context, address - lead, lead + host.nbytes, flags)
    else:
        region = host
        if lead:
            region = (ctypes.c_char * (lead + host.nbytes)).from_address(address - lead)
            region.owner = host   # the buffer holds region, region holds host
        buf = cl.Buffer(queue.context, flags, hostbuf=region)
    array = _fast_array(queue, host.shape, host.dtype, data=buf, offset=lead)
    # The array holds the memory it lends: an operand made for the call (a contiguous
    # copy of a strided one) must outlive the kernels that read it, not just this call.
    array.lent_host = host
    return array


#: Buffers over lent host memory, kept where kernels work in host memory itself:
#: (context, start address, bytes, flags) -> cl.Buffer; the oldest go first.
_lent: "OrderedDict[tuple, cl.Buffer]" = OrderedDict()
_LENT_MAX = 256
_lent_lock = threading.Lock()


def _lent_buffer(context: cl.Context, start: int, n_bytes: int, flags) -> cl.Buffer:
    """The kept ``USE_HOST_PTR`` buffer over ``[start, start + n_bytes)``, made on first
    use over a raw view of the range (a cached buffer holds its context, so the
    context's address in the key is never reused while the entry lives)."""
    key = (context.int_ptr, start, n_bytes, int(flags))
    with _lent_lock:
        buf = _lent.get(key)
        if buf is not None:
            _lent.move_to_end(key)
            return buf
    region = (ctypes.c_char * n_bytes).from_address(start)
    buf = cl.Buffer(context, flags, hostbuf=region)
    with _lent_lock:
        _lent[key] = buf
        while len(_lent) > _LENT_MAX:
            _lent.popitem(last=False)
    return buf


#: Small operands seen by lent_before: (context, address, bytes), the oldest go first.
_small_seen: "OrderedDict[tuple, None]" = OrderedDict()
_SMALL_SEEN_MAX = 64


def lent_before(queue: cl.CommandQueue, host: np.ndarray, at_offset: bool = True) -> bool:
    """Whether a small operand (one that would go through :func:`staging`) should rather
    be lent in place: a C-contiguous, aligned array (starting on the base alignment unless
    ``at_offset``) whose address range an earlier call passed too, such as the same input
    array on every call.  Its kept buffer (:func:`wrap_host`) then serves with no copy;
    the first sighting of a range stages it, so that arrays made for one call never cost
    a new buffer.  Only for devices whose kernels work in host memory itself."""
    if type(host) is not np.ndarray or not (host.flags.c_contiguous and host.flags.aligned):
        return False
    address = host.__array_interface__["data"][0]
    if not at_offset and address % base_alignment(queue.device):
        return False
    key = (queue.context.int_ptr, address, host.nbytes)
    with _lent_lock:
        if key in _small_seen:
            _small_seen.move_to_end(key)
            return True
        _small_seen[key] = None
        while len(_small_seen) > _SMALL_SEEN_MAX:
            _small_seen.popitem(last=False)
    return False


#: Operands of NumPy calls up to this size go through the thread's staging buffers.
STAGING_MAX_BYTES = 256 * 1024
#: Operands and results up to this size are always staged (a memcpy of a few
#: microseconds at most), never lent: lending costs more in Python than the copy.
STAGE_ALWAYS_BYTES = 64 * 1024
#: The largest operand that an op asking to realign it (``to_device``'s ``realign``)
#: copies into a staging buffer the thread keeps, rather than lend it misaligned.
REALIGN_MAX_BYTES = 64 * 2**20
_staging = threading.local()


def staging(queue: cl.CommandQueue, slot: str, shape, dtype
            ) -> Tuple[cl_array.Array, np.ndarray]:
    """A device array and a NumPy view of the same memory, in a buffer that this thread
    keeps for ``slot`` (one per operand name) in ``queue``'s context.

    For the small operands of NumPy calls on devices whose kernels work in host memory
    itself (:func:`kernels_use_host_memory`): copying a small operand into a buffer made
    once costs a memcpy, where a new buffer per call costs PoCL ~40 us at its first
    launch (a third of a 1024 x 1024 masked VMM).  The pair for a (queue, shape, dtype)
    is made once and handed out again (a device array costs pyopencl ~3 us to build), so
    the caller must not keep either past its call.  The call must be done with the memory
    (a NumPy call waits for its kernels) before the thread uses ``slot`` again."""
    slots = getattr(_staging, "slots", None)
    if slots is None:
        slots = _staging.slots = {}
    shape = tuple(shape)
    key = (queue.int_ptr, slot, shape, dtype)   # the arrays hold their queue: no reused pointer
    pair = slots.get(key)
    if pair is not None:
        return pair
    dtype_ = np.dtype(dtype)
    n_bytes = math.prod(shape) * dtype_.itemsize
    buffers = getattr(_staging, "buffers", None)
    if buffers is None:
        buffers = _staging.buffers = {}
    bkey = (queue.context.int_ptr, slot)   # the buffer holds its context: no reused pointer
    found = buffers.get(bkey)
    if found is None or found[0].nbytes < n_bytes:
        capacity = max(4096, 1 << (n_bytes - 1).bit_length())
        host = aligned_empty((capacity,), np.uint8, base_alignment(queue.device))
        buf = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR,
                        hostbuf=host)
        found = buffers[bkey] = (host, buf)
        for stale in [k for k in slots if k[1] == slot]:   # views of the old buffer
            del slots[stale]
    host, buf = found
    pair = (_fast_array(queue, shape, dtype_, data=buf),
            host[:n_bytes].view(dtype_).reshape(shape))
    if len(slots) >= _STAGING_VIEWS_MAX:
        slots.clear()
    slots[key] = pair
    return pair


#: Staged (device array, view) pairs a thread keeps before it starts over.
_STAGING_VIEWS_MAX = 256


_scratch = threading.local()
_SCRATCH_QUEUES = 4   # queues whose scratch a thread keeps (least recently used go)


def scratch(queue: cl.CommandQueue, n_bytes: int) -> cl.Buffer:
    """A device buffer of at least ``n_bytes`` that this thread keeps for ``queue`` (an
    in-order queue), for scratch that lives only between an op's own launches: written by
    one, read by the next.  Every call of every op on the queue can then share it.

    It replaces one buffer from the memory pool per call, so that kernels keep their
    scratch argument set from call to call: one buffer argument fewer to set per launch
    (on the H200's driver about 1.2-1.7 us against 4 us for the enqueue itself, measured
    by ``python -m bench.profile_call``) and no pool allocation.  Sharing is safe because
    the queue runs a later call's launches after an earlier call's; per thread, so that
    two threads sharing the queue cannot interleave their launches around it.  The thread
    keeps its last ``_SCRATCH_QUEUES`` queues' buffers (and those queues); a LaunchGraph
    does not use it, as a graph holds buffers of its own."""
    kept = getattr(_scratch, "buffers", None)
    if kept is None:
        kept = _scratch.buffers = {}
    found = kept.pop(queue.int_ptr, None)
    if found is None or found[0] is not queue or found[1].size < n_bytes:
        old = found[1].size if found is not None and found[0] is queue else 0
        found = (queue, cl.Buffer(queue.context, cl.mem_flags.READ_WRITE,
                                  max(n_bytes, old, 4096)))
    kept[queue.int_ptr] = found   # most recently used last
    while len(kept) > _SCRATCH_QUEUES:
        kept.pop(next(iter(kept)))
    return found[1]


def release_staging() -> None:
    """Drop this thread's staging buffers (see :func:`staging`) and scratch buffers (see
    :func:`scratch`)."""
    _staging.slots = {}
    _staging.buffers = {}
    _scratch.buffers = {}


_IN_PLACE_PROBE = """
__kernel void pscl_in_place_probe(__global const float *src, __global float *dst) {
    const int i = get_global_id(0);
    dst[i] = src[i] + 1.0f;
}
"""


def _probe_in_place(device: cl.Device) -> bool:
    """Whether kernels on ``device`` read and write a ``CL_MEM_USE_HOST_PTR`` buffer's
    host memory itself: a kernel must see a host write made after the buffer was created,
    and its own writes must be in host memory after ``finish`` with no map; and so again
    when the same buffers serve a second launch after host writes to both (as a kept
    buffer does, see :func:`wrap_host`).  Tried at element offsets that break every
    alignment above 4 bytes, small and large."""
    try:
        ctx = cl.Context([device])
        queue = cl.CommandQueue(ctx)
        kernel = cl.Kernel(cl.Program(ctx, _IN_PLACE_PROBE).build(), "pscl_in_place_probe")
        for n, shift in ((17, 1), (1 << 18, 3)):
            src_raw, dst_raw = np.zeros(n + shift, np.float32), np.zeros(n + shift, np.float32)
            src, dst = src_raw[shift:], dst_raw[shift:]
            flags = cl.mem_flags.USE_HOST_PTR | cl.mem_flags.READ_WRITE
            src_buf = cl.Buffer(ctx, flags, hostbuf=src)
            dst_buf = cl.Buffer(ctx, flags, hostbuf=dst)
            for first in (0.0, 1000.0):
                src[:] = np.arange(n, dtype=np.float32) + first   # after the launch before
                dst[:] = -1.0
                kernel(queue, (n,), None, src_buf, dst_buf)
                queue.finish()
                if not np.array_equal(dst, np.arange(n, dtype=np.float32) + first + 1):
                    return False
        return True
    except Exception:  # any failure: use the map, which OpenCL promises
        return False


def kernels_use_host_memory(device: cl.Device) -> bool:
    """True for a CPU device whose kernels work in lent host memory itself (probed once,
    see :func:`_probe_in_place`; PoCL's CPU driver does): a ``finish`` then makes their
    results visible, and :func:`sync_host` needs no map, which costs ~75 us a call on
    PoCL.  Other devices (an integrated GPU may copy or cache) always map."""
    key = device.int_ptr
    found = _in_place.get(key)
    if found is None:
        found = _in_place[key] = bool(device.type & cl.device_type.CPU) and \
            _probe_in_place(device)
    return found


def sync_host(queue: cl.CommandQueue, dev: cl_array.Array) -> None:
    """Wait until the kernels writing ``dev`` (from :func:`wrap_host`) are done and their
    results are in its host memory: a blocking map and its unmap, which is what OpenCL
    promises coherence by, or only the wait where the kernels write host memory itself
    (:func:`kernels_use_host_memory`)."""
    if kernels_use_host_memory(queue.device):
        queue.finish()
        return
    mapped, _ = cl.enqueue_map_buffer(queue, dev.base_data, cl.map_flags.READ, 0, (dev.size,),
                                      dev.dtype, is_blocking=True,
                                      wait_for=list(dev.events) or None)
    mapped.base.release(queue)
