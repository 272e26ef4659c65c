"""Prepared device weights kept for the host objects (SciPy CSR matrices, NumPy arrays)
that a user passes to an op call after call.

The card's call, ``conv2d_sparse(x, w_csr)``, hands over the same SciPy matrix on every
call.  Preparing it (canonical CSR, offsets, uploads, launch plans) costs more than the
convolution on small layers, so the prepared weight is kept, keyed on the matrix object,
and served again while the object lives and its buffers are unchanged:

- the object is held by a weak reference: a collected object's entry goes with it, and a
  new object that reuses its ``id`` is never taken for it;
- a snapshot of its buffers (for CSR: ``indptr``, ``indices`` and ``data``) is compared
  with them, byte for byte, on every call, so an in-place edit, or a buffer replaced by
  another, is seen and the weight prepared again.  Comparing reads the weight once, as the
  kernels do: about 60 us for ResNet-50's largest 3x3 layer at 90% (236 k nonzeros, 2-core
  host), against 1-10 ms to prepare it;
- an object is snapshotted from its second call on, so one passed once (a view made for
  one call) costs no copy; one found changed on ``VOLATILE_AFTER`` calls in a row (a
  weight updated in place by a training loop) is no longer snapshotted: each call prepares
  it afresh, as it would without the cache, rather than paying for a snapshot that never
  serves.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from .. import runtime

__all__ = ["PreparedCache", "clear_weight_cache"]

#: Consecutive calls that find an object changed before its snapshots stop.
VOLATILE_AFTER = 3


def _raw(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes as a flat array of unsigned integers, 8-byte ones where the size
    allows (half the elements to compare of 4-byte ones); bitwise, so a NaN equals itself
    and -0.0 differs from 0.0."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    for width in (8, 4):
        if flat.size % width == 0:
            return flat.view(f"u{width}")
    return flat


def _libc_memcmp():
    """The C library's memcmp (one pass that reads both buffers and writes nothing), or
    None where ctypes cannot find it."""
    try:
        memcmp = ctypes.CDLL(None).memcmp
    except (OSError, TypeError, AttributeError):
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return memcmp


_MEMCMP = _libc_memcmp()


def _same_bytes(a: np.ndarray, raw_snapshot: np.ndarray) -> bool:
    raw = _raw(a)
    if raw.dtype != raw_snapshot.dtype or raw.shape != raw_snapshot.shape:
        return False
    if _MEMCMP is not None:
        return raw.nbytes == 0 or _MEMCMP(raw.__array_interface__["data"][0],
                                           raw_snapshot.__array_interface__["data"][0],
                                           raw.nbytes) == 0
    return bool(np.equal(raw, raw_snapshot, out=np.empty(raw.shape, np.bool_)).all())


class _Snapshot:
    """A copy of one buffer's bytes, and how to find the buffer's memory again cheaply:
    while the same array object is passed (its weak reference answers with it) and its
    dtype, shape and strides are those it had, its memory is where it was (a NumPy array
    never moves its data), so the comparison is one memcmp of two known addresses."""
    __slots__ = ("ref", "address", "dtype", "shape", "strides", "raw", "raw_address")

    def __init__(self, a: np.ndarray):
        self.dtype, self.shape, self.strides = a.dtype, a.shape, a.strides
        self.raw = _raw(a).copy()
        self.raw_address = self.raw.__array_interface__["data"][0]
        self.ref = self.address = None
        if type(a) is np.ndarray and a.flags.c_contiguous and a.nbytes:
            try:
                self.ref = weakref.ref(a)
            except TypeError:
                return
            self.address = a.__array_interface__["data"][0]

    def matches(self, a: np.ndarray) -> bool:
        if a.dtype != self.dtype or a.shape != self.shape:
            return False
        ref = self.ref
        if ref is not None and ref() is a and a.strides == self.strides and \
                _MEMCMP is not None:
            return _MEMCMP(self.address, self.raw_address, self.raw.nbytes) == 0
        return _same_bytes(a, self.raw)


class _Entry:
    __slots__ = ("ref", "shape", "snapshot", "prepared", "changes")

    def __init__(self, ref, shape, snapshot):
        self.ref = ref
        self.shape = shape
        self.snapshot: Optional[Tuple[_Snapshot, ...]] = snapshot
        self.prepared: Dict[Hashable, object] = {}
        self.changes = 0

    def matches(self, shape, buffers: Sequence[np.ndarray]) -> bool:
        if shape != self.shape or self.snapshot is None:
            return False
        for a, snapshot in zip(buffers, self.snapshot):
            if not snapshot.matches(a):
                return False
        return True


class PreparedCache:
    """Prepared objects per (host object, key), valid while the object's buffers keep the
    bytes they had when it was prepared (see the module's docstring)."""

    def __init__(self, what: str):
        self.what = what
        self._entries: Dict[int, _Entry] = {}
        self._lock = threading.Lock()
        _CACHES.append(self)

    def get(self, obj, buffers: Sequence[np.ndarray], key: Hashable,
            build: Callable[[], object]):
        """The object prepared from ``obj`` under ``key``: the cached one while ``obj``'s
        ``buffers`` (and ``obj.shape``) are unchanged, else ``build()`` (kept, unless
        ``obj`` changes on every call).  ``build`` raising keeps nothing."""
        prepared, confirm = self.lookup(obj, buffers, key, build)
        fresh = confirm() if confirm is not None else None
        return prepared if fresh is None else fresh

    def lookup(self, obj, buffers: Sequence[np.ndarray], key: Hashable,
               build: Callable[[], object]):
        """``(prepared, confirm)``, for a caller that overlaps the comparison with work.

        With ``confirm`` None, ``prepared`` was just built and is current.  Otherwise it is
        the one kept for ``obj`` (of ``obj``'s current shape) and may be stale:
        ``confirm()`` compares the buffers and returns None if it is current, else the
        object built afresh (which replaces it)."""
        shape = getattr(obj, "shape", None)
        entry = self._entry(obj)
        if entry is not None and entry.snapshot is not None and entry.shape == shape:
            found = entry.prepared.get(key)
            if found is not None:
                return found, lambda: self._confirm(obj, entry, shape, buffers, key, build)
            if entry.matches(shape, buffers):   # another key of an unchanged object
                prepared = build()
                with self._lock:
                    return entry.prepared.setdefault(key, prepared), None
        return self._replace(obj, entry, shape, buffers, key, build), None

    def _entry(self, obj) -> Optional[_Entry]:
        with self._lock:
            entry = self._entries.get(id(obj))
        return entry if entry is not None and entry.ref() is obj else None  # else: id reused

    def _confirm(self, obj, entry: _Entry, shape, buffers, key, build):
        if entry.matches(shape, buffers):
            entry.changes = 0
            return None
        return self._replace(obj, entry, shape, buffers, key, build)

    def _replace(self, obj, entry: Optional[_Entry], shape, buffers, key, build):
        """Build for ``obj`` and record it in a new entry.  The entry keeps the object and
        a snapshot of ``buffers`` from ``obj``'s second call on (an object seen once, such
        as a view made for one call, costs no copy), unless ``obj`` has now been found
        changed ``VOLATILE_AFTER`` calls in a row."""
        prepared = build()
        if entry is None:
            changes = 0
        else:   # a kept snapshot that failed to match is one more change in a row
            changes = entry.changes + (entry.snapshot is not None)
        snapshot = None if entry is None or changes >= VOLATILE_AFTER else \
            tuple(_Snapshot(b) for b in buffers)
        ident = id(obj)
        try:
            ref = weakref.ref(obj, self._forget_callback(ident))
        except TypeError:   # an object without weak references: nothing is kept
            return prepared
        fresh = _Entry(ref, shape, snapshot)
        fresh.changes = changes
        if snapshot is not None:
            fresh.prepared[key] = prepared
        with self._lock:
            self._entries[ident] = fresh
        return prepared

    def _forget_callback(self, ident: int):
        cache = weakref.ref(self)   # the callback must not keep the cache alive

        def forget(ref):
            alive = cache()
            if alive is not None:
                with alive._lock:
                    entry = alive._entries.get(ident)
                    if entry is not None and entry.ref is ref:
                        del alive._entries[ident]
        return forget

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            entries, self._entries = self._entries, {}
        # Dropped outside the lock: an entry's prepared object may hold the last reference
        # to its own weight (a NumPy view uploaded asynchronously), whose weak-reference
        # callback then takes the lock.
        entries.clear()


_CACHES: List[PreparedCache] = []


def clear_weight_cache() -> None:
    """Drop every prepared weight kept for SciPy/NumPy weights passed to the ops (their
    device memory is freed once no call uses it), this thread's staging buffers for
    small NumPy operands (``runtime.staging``) and the host memory kept for reuse by
    later NumPy results (``runtime.result_empty``).  Explicitly prepared weights
    (:class:`SparseConvWeight`, :class:`MaskedLinearWeight`, ...) are not affected."""
    for cache in _CACHES:
        cache.clear()
    runtime.release_staging()
    runtime.release_results()
