"""CompactRows: a batch of activations kept by their selected entries, as DSG leaves them
between layers (the values of each row's selected outputs and their column indices), so
that the next layer's product, its search and the backward see the sparsity."""

from __future__ import annotations

import numbers
from typing import Tuple

import numpy as np
import pyopencl.array as cl_array

from .. import runtime
from ..families import compact_util
from ._common import INT32_MAX, check_alloc, check_out, is_device_array, require_array

__all__ = ["CompactRows"]


class CompactRows:
    """A batch of rows, each kept by its ``n_keep`` selected entries.

    Row ``i`` of the dense (M, N) batch it stands for holds ``values[i, s]`` at column
    ``idx[i, s]`` and zeros elsewhere.  This is the form DSG's selection gives: a compact
    index mask (``drs_mask(..., compact=True)``, ``random_mask(..., compact=True)``) with
    the values a masked product computed under it (``masked_matmul(x, w, idx)``), so that
    the next layer can take the batch without its zeros::

        idx = drs_mask(x, w1, 0.9, compact=True)
        h = CompactRows(masked_matmul(x, w1, idx), idx, n_cols=w1.shape[1])
        y = masked_matmul(h, w2, drs_mask(h, w2, 0.9, compact=True))

    Parameters
    ----------
    values : float32 array (M, n_keep), or (n_keep,) for a single row (a vector).
    idx : int32 array of the same shape: each row's column indices, strictly ascending
        in [0, n_cols).  Both arrays NumPy, or both pyopencl arrays of one context.
    n_cols : int >= n_keep, the dense width N.
    check : bool (default True)
        Validate ``idx``: host indices at once; device indices with a kernel and an
        8-byte read back (a synchronisation).  Pass False only for indices that come from
        the search or ``random_mask`` (ascending by construction) on the hot path.  In an
        unchecked batch, an index outside [0, N) is never read or written out of bounds:
        the products give NaN for its row, and ``to_dense`` a NaN in its row.  Unsorted
        or repeated indices in an unchecked batch give unspecified values.

    Nothing is copied: the object holds the arrays it was given.
    """

    __slots__ = ("values", "idx", "n_cols")

    def __init__(self, values, idx, n_cols, *, check: bool = True):
        require_array(values, "values", np.float32)
        require_array(idx, "idx", np.int32)
        if values.ndim not in (1, 2):
            raise ValueError(f"values must be 1-D (n_keep,) or 2-D (M, n_keep), got shape "
                             f"{tuple(values.shape)}")
        if tuple(idx.shape) != tuple(values.shape):
            raise ValueError(f"idx must have the shape of values, {tuple(values.shape)}, got "
                             f"{tuple(idx.shape)}")
        if is_device_array(values) != is_device_array(idx):
            raise TypeError("values and idx must be the same kind of container (both NumPy or "
                            "both pyopencl arrays)")
        if is_device_array(values) and values.context != idx.context:
            raise ValueError("values and idx belong to different OpenCL contexts")
        if isinstance(n_cols, bool) or not isinstance(n_cols, numbers.Integral):
            raise TypeError(f"n_cols must be an int, got {type(n_cols).__name__}")
        n_cols = int(n_cols)
        n_keep = values.shape[-1]
        if not n_keep <= n_cols <= INT32_MAX:
            raise ValueError(f"n_cols must lie in [n_keep, 2**31) = [{n_keep}, 2**31), got "
                             f"{n_cols}")
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {type(check).__name__}")
        self.values, self.idx, self.n_cols = values, idx, n_cols
        if check:
            self._check()

    # -- shape ------------------------------------------------------------------------------
    @property
    def vector(self) -> bool:
        """Whether this is a single row given 1-D (the product then returns 1-D)."""
        return self.values.ndim == 1

    @property
    def n_rows(self) -> int:
        return 1 if self.vector else self.values.shape[0]

    @property
    def n_keep(self) -> int:
        return self.values.shape[-1]

    @property
    def shape(self) -> Tuple[int, ...]:
        """The dense shape it stands for: (M, N), or (N,) for a vector."""
        return (self.n_cols,) if self.vector else (self.n_rows, self.n_cols)

    @property
    def is_device(self) -> bool:
        return is_device_array(self.values)

    @property
    def nbytes(self) -> int:
        """The bytes the two arrays hold (the dense batch would take 4 * M * N)."""
        return self.values.nbytes + self.idx.nbytes

    def rows(self) -> Tuple[object, object]:
        """(values, idx) as 2-D arrays, (M, n_keep) (views for a vector)."""
        if self.vector:
            return self.values.reshape(1, -1), self.idx.reshape(1, -1)
        return self.values, self.idx

    def __repr__(self):
        if not hasattr(self, "n_cols"):        # a construction that raised
            return "CompactRows(<invalid>)"
        where = "device" if self.is_device else "host"
        return f"CompactRows(shape={self.shape}, n_keep={self.n_keep}, {where})"

    # -- validation -------------------------------------------------------------------------
    def _check(self) -> None:
        _, idx = self.rows()
        if not idx.size:
            return
        if not self.is_device:
            check_host_idx(idx, self.n_cols, "idx")
            return
        runtime.refuse_capture("checking the indices of a device CompactRows (pass "
                               "check=False for indices the search gave)")
        flags = compact_util.check(idx.queue, idx, self.n_cols).get()
        if flags[0] != INT32_MAX:
            raise ValueError(f"idx must lie in [0, {self.n_cols}); row {flags[0]} holds a "
                             "value outside that range")
        if flags[1] != INT32_MAX:
            raise ValueError(f"idx must ascend strictly along each row; row {flags[1]} does "
                             "not (unsorted or repeated indices)")

    # -- conversions ------------------------------------------------------------------------
    @classmethod
    @runtime.capturable_op
    def from_dense(cls, dense, idx, *, check: bool = True, queue=None) -> "CompactRows":
        """The entries of ``dense`` (M, N) (or (N,)) at ``idx`` (M, n_keep) (or
        (n_keep,)), strictly ascending per row: ``values[i, s] = dense[i, idx[i, s]]``.
        Both NumPy (gathered on the host) or both pyopencl arrays (gathered on the
        device, enqueued)."""
        require_array(dense, "dense", np.float32)
        require_array(idx, "idx", np.int32)
        if dense.ndim not in (1, 2) or idx.ndim != dense.ndim:
            raise ValueError(f"dense and idx must both be 1-D or both 2-D, got shapes "
                             f"{tuple(dense.shape)} and {tuple(idx.shape)}")
        if dense.ndim == 2 and idx.shape[0] != dense.shape[0]:
            raise ValueError(f"idx has {idx.shape[0]} rows but dense has {dense.shape[0]}")
        if is_device_array(dense) != is_device_array(idx):
            raise TypeError("dense and idx must be the same kind of container (both NumPy or "
                            "both pyopencl arrays)")
        n_cols = dense.shape[-1]
        if idx.shape[-1] > n_cols:
            raise ValueError(f"idx has {idx.shape[-1]} entries per row but dense has only "
                             f"{n_cols} columns")
        if not is_device_array(dense):
            result = cls(np.zeros(idx.shape, np.float32), idx, n_cols, check=check)
            values, rows_idx = result.rows()
            values[...] = np.take_along_axis(dense.reshape(rows_idx.shape[0], n_cols),
                                             rows_idx, 1)
            return result
        queue = runtime.resolve_queue(queue, dense=dense, idx=idx)
        values = runtime.empty(queue, idx.shape, np.float32,
                               allocator=runtime.memory_pool(queue.context))
        result = cls(values, idx, n_cols, check=check)
        v2, i2 = result.rows()
        compact_util.gather(queue, dense.reshape(v2.shape[0], n_cols), i2, v2, n_cols)
        return result

    @runtime.capturable_op
    def to_dense(self, *, out=None, queue=None):
        """The dense batch: (M, N) (or (N,)), zeros outside the selection, in the kind of
        container the arrays are (a device array once enqueued).  ``out``: an array of
        that shape, float32, to write into."""
        check_out(out, self.shape, np.float32, like=self.values)
        values, idx = self.rows()
        if not self.is_device:
            dense = out if out is not None else np.empty(self.shape, np.float32)
            rows = dense.reshape(self.n_rows, self.n_cols)
            rows.fill(0)
            np.put_along_axis(rows, idx.astype(np.intp), values, 1)
            return dense
        queue = runtime.resolve_queue(queue, values=values, idx=idx, out=out)
        check_alloc(queue, 4 * self.n_rows * self.n_cols, "the dense batch")
        dense = out if out is not None else runtime.empty(
            queue, self.shape, np.float32, allocator=runtime.memory_pool(queue.context))
        compact_util.scatter(queue, values, idx, dense.reshape(self.n_rows, self.n_cols),
                             self.n_cols)
        return dense

    @runtime.capturable_op
    def add_bias(self, b, *, relu: bool = False, out=None, queue=None) -> "CompactRows":
        """A layer's bias on its compact output: ``act(values + b[idx])``, act ReLU with
        ``relu``, as a CompactRows with the same indices (new values, or ``out``: an
        array of values' shape, which may be ``self.values``).  ``b``: float32 (N,), the
        same kind of container as the values."""
        require_array(b, "b", np.float32, ndim=1)
        if b.shape[0] != self.n_cols:
            raise ValueError(f"b must have shape ({self.n_cols},), got {tuple(b.shape)}")
        if is_device_array(b) != self.is_device:
            raise TypeError("b must be the same kind of container as the values (both NumPy "
                            "or both pyopencl arrays)")
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
        check_out(out, self.values.shape, np.float32, like=self.values)
        values, idx = self.rows()
        if not self.is_device:
            y = values + b[idx]
            y = np.maximum(y, 0) if relu else y
            result = out if out is not None else np.empty(self.values.shape, np.float32)
            result[...] = y.reshape(self.values.shape)
            return CompactRows(result, self.idx, self.n_cols, check=False)
        queue = runtime.resolve_queue(queue, values=values, idx=idx, b=b, out=out)
        result = out if out is not None else runtime.empty(
            queue, self.values.shape, np.float32, allocator=runtime.memory_pool(queue.context))
        compact_util.add_bias(queue, values, idx, b, result.reshape(values.shape),
                              self.n_cols, relu)
        return CompactRows(result, self.idx, self.n_cols, check=False)

    def get(self, queue=None) -> "CompactRows":
        """The same batch with NumPy arrays (waits for the device)."""
        if not self.is_device:
            return self
        return CompactRows(self.values.get(queue=queue), self.idx.get(queue=queue),
                           self.n_cols, check=False)

    def to_device(self, queue=None) -> "CompactRows":
        """The same batch with pyopencl arrays on ``queue`` (copied; self if already)."""
        if self.is_device:
            return self
        queue = runtime.get_queue(queue)
        alloc = runtime.memory_pool(queue.context)
        return CompactRows(cl_array.to_device(queue, np.ascontiguousarray(self.values),
                                              allocator=alloc),
                           cl_array.to_device(queue, np.ascontiguousarray(self.idx),
                                              allocator=alloc),
                           self.n_cols, check=False)


def check_host_idx(idx: np.ndarray, n_cols: int, name: str) -> None:
    """Refuse a host (M, n_keep) index array with a value outside [0, n_cols) or a row
    that does not strictly ascend, naming the first offending row."""
    bad = (idx < 0) | (idx >= n_cols)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{name} must lie in [0, {n_cols}); row {row} holds "
                         f"{int(idx[row, col])}")
    if idx.shape[1] > 1:
        steps = np.diff(idx, axis=1) <= 0
        if steps.any():
            row = int(np.argwhere(steps)[0][0])
            raise ValueError(f"{name} must ascend strictly along each row; row {row} does not "
                             "(unsorted or repeated indices)")
