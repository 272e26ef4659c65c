"""Output-masked products for DSG (Liu et al., ICLR 2019): validation, routine choice and
delivery; the kernels are the families masked_vmm(_split), masked_gemm(_tiled), masked_dx,
masked_dw, masked_bn, masked_conv(_channels) in pysparsecl/families.

``masked_matmul`` computes ``mask * (x @ w)`` touching only the selected outputs;
``masked_matmul_backward`` gives the matching gradients.  The weight is kept as W^T,
(N, K) row-major (:class:`MaskedLinearWeight`), so a selected output reads one contiguous
weight row.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from .. import runtime, tuning
from ..families import (
    compact_util,
    masked_bn,
    masked_compact,
    masked_compact_dw,
    masked_compact_dw_tiled,
    masked_compact_tiled,
    masked_conv,
    masked_conv_channels,
    masked_conv_dw,
    masked_conv_dx,
    masked_conv_tiled,
    masked_dw,
    masked_dx,
    masked_gemm,
    masked_gemm_tiled,
    masked_util,
    masked_vmm,
    masked_vmm_split,
)
from ..params import Choice, Routine, TileParam
from ._common import (
    INT32_MAX,
    at_offset_zero,
    check_alloc,
    check_int32_sizes,
    check_out,
    deliver,
    elem_offset,
    is_device_array,
    new_output,
    read_from_start,
    require_array,
    to_device,
    written,
)
from ._prepared import PreparedCache
from .compact import CompactRows

__all__ = ["MASKED_VMM", "MASKED_VMM_SPLIT", "MASKED_VMM_ROUTINE", "MASKED_GEMM",
           "MASKED_GEMM_TILED", "MASKED_GEMM_ROUTINE", "MASKED_DX", "MASKED_DW", "MASKED_BN",
           "MASKED_CONV", "MASKED_CONV_CH", "MASKED_CONV_TILED", "MASKED_CONV_ROUTINE",
           "MaskedLinearWeight", "masked_matmul",
           "masked_matmul_backward", "masked_relu_bn", "masked_relu_bn_backward",
           "conv2d_masked", "conv2d_masked_backward", "MASKED_CONV_DX", "MASKED_CONV_DW",
           "MASKED_COMPACT", "MASKED_COMPACT_TILED", "MASKED_COMPACT_ROUTINE",
           "MASKED_COMPACT_DW", "MASKED_COMPACT_DW_TILED", "MASKED_COMPACT_DW_ROUTINE",
           "weight_rows", "weight_shape", "masked_matmul_shape_class"]

# Each kernel family is a module of its own (pysparsecl/families); the op's routines choose
# between a CPU-shaped and a GPU-shaped family.
MASKED_VMM = masked_vmm.SPEC
MASKED_VMM_SPLIT = masked_vmm_split.SPEC
MASKED_GEMM = masked_gemm.SPEC
MASKED_GEMM_TILED = masked_gemm_tiled.SPEC
MASKED_DX = masked_dx.SPEC
MASKED_DW = masked_dw.SPEC
MASKED_BN = masked_bn.SPEC
MASKED_CONV = masked_conv.SPEC
MASKED_CONV_CH = masked_conv_channels.SPEC
MASKED_CONV_TILED = masked_conv_tiled.SPEC
MASKED_CONV_DX = masked_conv_dx.SPEC
MASKED_CONV_DW = masked_conv_dw.SPEC
MASKED_COMPACT = masked_compact.SPEC
MASKED_COMPACT_TILED = masked_compact_tiled.SPEC
MASKED_COMPACT_DW = masked_compact_dw.SPEC
MASKED_COMPACT_DW_TILED = masked_compact_dw_tiled.SPEC

#: The family modules of each routine's KERNEL choice, by index.
_VMM_FAMILIES = (masked_vmm, masked_vmm_split)
_GEMM_FAMILIES = (masked_gemm, masked_gemm_tiled)

MASKED_VMM_ROUTINE = Routine(
    "masked_vmm",
    (Choice("KERNEL", tuple(f.SPEC for f in _VMM_FAMILIES),
            "the VMM's kernel: one work-item per selected output (CPUs), or SPLIT items "
            "sharing each (GPUs)"),),
    thresholds=(
        # On the H100, 1 x 4096 x 4096 at 10% keep: a compaction kernel of its own took
        # 10.8 us, the product after it 11.1 us, the product with the scan inside 13.7 us.
        # The redundant reads grow as N^2, so larger rows keep the compaction kernel.
        TileParam("LIST_IN_KERNEL_MAX_N", 8192, (0, 1024, 2048, 4096, 8192, 16384, 32768),
                  "columns up to which the split kernel lists a bool mask's selection "
                  "itself, every work-group scanning the whole row; above, a kernel of its "
                  "own lists it first"),
    ),
)

#: The families of conv2d_masked's KERNEL choice, by index.
_CONV_FAMILIES = (masked_conv, masked_conv_tiled)

MASKED_CONV_ROUTINE = Routine(
    "masked_conv",
    (Choice("KERNEL", tuple(f.SPEC for f in _CONV_FAMILIES),
            "conv2d_masked's kernel: direct, a work-item per output channel and block of "
            "pixels (masked_conv_channels for a channel mask) (CPUs), or an implicit GEMM "
            "over output tiles staged through local memory (GPUs)"),),
)

MASKED_GEMM_ROUTINE = Routine(
    "masked_gemm",
    (Choice("KERNEL", tuple(f.SPEC for f in _GEMM_FAMILIES),
            "the GEMM's kernel: columns streamed over cached row blocks (CPUs), or output "
            "tiles staged through local memory (GPUs)"),),
)


def _gather_max_density(what: str) -> TileParam:
    """The compact-x routines' threshold: the percent of x's columns kept per row up to
    which ``what`` gathers (scatters) x's entries; above, x is scattered to dense and the
    dense-x kernels run."""
    return TileParam("GATHER_MAX_DENSITY", 12, (0, 5, 8, 12, 16, 25, 50, 100),
                     f"percent of x's columns kept per row up to which {what} x's entries; "
                     "above, x is scattered to dense and the dense-x kernels run")


#: The families of the compact-x routine's KERNEL choice, by index.
_COMPACT_FAMILIES = (masked_compact, masked_compact_tiled)

MASKED_COMPACT_ROUTINE = Routine(
    "masked_compact",
    (Choice("KERNEL", tuple(f.SPEC for f in _COMPACT_FAMILIES),
            "the product of a compact x: a work-item per column gathering from cache "
            "(CPUs), or a work-group per column gathering from local memory (GPUs)"),),
    thresholds=(
        # A gather costs several times a lane of a vector load, and a random selection
        # touches most lines of a weight row anyway: past some density of x, scattering it
        # to dense and running the dense-input product is faster (bench masked's
        # propagated grid measures the crossover).
        _gather_max_density("the product gathers"),
        TileParam("GATHER_MIN_ROWS", 2, (1, 2, 4, 8, 16, 32),
                  "rows from which the product gathers; fewer (a VMM reads each selected "
                  "weight row once anyway) scatter x to dense"),
    ),
)

#: The families of the compact-x weight gradient's KERNEL choice, by index.
_COMPACT_DW_FAMILIES = (masked_compact_dw, masked_compact_dw_tiled)

MASKED_COMPACT_DW_ROUTINE = Routine(
    "masked_compact_dw",
    (Choice("KERNEL", tuple(f.SPEC for f in _COMPACT_DW_FAMILIES),
            "dw of the product of a compact x: a work-item per row of dw^T, accumulating "
            "in cache (CPUs), or a work-group per row, in local memory (GPUs)"),),
    thresholds=(
        # Scatter-adds against whole-row vector FMAs: on PoCL at 128 x 4096 x 4096 the
        # compact kernel took 8.5 ms against 6.6 for the dense-x masked_dw at 10% of x
        # kept, and 4.1 against 4.9 at 5%.
        _gather_max_density("dw scatters"),
    ),
)


# ---------------------------------------------------------------------------------------------
# The prepared weight

#: The row stride of prepared (N, K) weight rows (see masked_dw.row_stride).
row_stride = masked_dw.row_stride


class MaskedLinearWeight:
    """A dense weight prepared once for the masked products and kept on the device.

    It is stored as W^T, (N, K) rows (``self.rows``, row stride ``self.ld``): the selected
    output (i, j) then reads one contiguous row ``W[:, j]``, which is what makes masked
    products bandwidth-efficient.

    Parameters
    ----------
    w : numpy.ndarray or pyopencl.array.Array, float32
        The weight, (K, N) as in ``x @ w`` (the default), or (N, K) rows when
        ``transposed=True`` (the layout of ``torch.nn.Linear.weight``).
    transposed : bool
        Whether ``w`` is already given as (N, K) rows.  A contiguous device array given
        this way is used in place, not copied: later writes to it (a weight update) are
        seen by later products.  (A view that starts inside its buffer is used in place
        when its offset is a multiple of the device's base alignment, else copied.)
    queue : pyopencl.CommandQueue, optional
        Where the weight lives; that of a device array ``w``, else the default queue.
    """

    def __init__(self, w, *, transposed: bool = False,
                 queue: Optional[cl.CommandQueue] = None):
        require_array(w, "w", np.float32, ndim=2)
        self.queue = runtime.resolve_queue(queue, w=w)
        if transposed:
            n_out, k_in = w.shape
            if is_device_array(w):
                if w.flags.c_contiguous:   # in place, or a device copy off the alignment
                    rows = read_from_start(w, self.queue)
                else:
                    runtime.refuse_capture("a strided device weight")
                    rows = w.copy(queue=self.queue)
                ld = k_in
            else:
                ld = row_stride(k_in)
                host = np.zeros((n_out, ld), np.float32)
                host[:, :k_in] = w
                rows = cl_array.to_device(self.queue, host,
                                          allocator=runtime.memory_pool(self.queue.context))
        else:
            k_in, n_out = w.shape
            rows, ld = weight_rows(w, k_in, self.queue, None)
        self.in_features = int(k_in)
        self.out_features = int(n_out)
        self.rows = rows
        self.ld = int(ld)

    @property
    def shape(self) -> Tuple[int, int]:
        """(K, N), the shape of the weight in ``x @ w``."""
        return (self.in_features, self.out_features)

    def to_numpy(self) -> np.ndarray:
        """The (K, N) float32 weight, copied to the host."""
        host = self.rows.get(queue=self.queue).reshape(self.out_features, self.ld)
        return host[:, :self.in_features].T.copy()

    def __repr__(self):
        return (f"MaskedLinearWeight(in_features={self.in_features}, "
                f"out_features={self.out_features})")


def weight_rows(w, k_in: int, queue, events, name: str = "w"):
    """(device rows (N, ld) of ``w``, ld), for a MaskedLinearWeight or a (K, N) array."""
    if isinstance(w, MaskedLinearWeight):
        if w.queue.context != queue.context:
            raise ValueError(f"{name} (a MaskedLinearWeight) lives in a different OpenCL "
                             "context than the queue the operation runs on")
        if w.in_features != k_in:
            raise ValueError(f"{name} has in_features={w.in_features} but x has {k_in} "
                             "columns")
        return w.rows, w.ld
    require_array(w, name, np.float32, ndim=2)
    if w.shape[0] != k_in:
        raise ValueError(f"{name} must have shape (K, N) with K = {k_in} (the columns of x), "
                         f"got {tuple(w.shape)}")
    ld = row_stride(k_in)
    if is_device_array(w):
        return masked_util.transpose(queue, w, events, ld_dst=ld), ld

    def upload():
        host = np.zeros((w.shape[1], ld), np.float32)
        host[:, :k_in] = np.asarray(w).T
        return cl_array.to_device(queue, host, allocator=runtime.memory_pool(queue.context)), ld
    return _DENSE_ROWS.get(w, (w,), queue.context.int_ptr, upload)


#: Device rows (N, ld) prepared for the NumPy weights passed to the masked products.
_DENSE_ROWS = PreparedCache("masked product weights")


def weight_shape(w, name: str = "w") -> Tuple[int, int]:
    """(K, N) of a MaskedLinearWeight or a (K, N) float32 array (checked)."""
    if isinstance(w, MaskedLinearWeight):
        return w.shape
    require_array(w, name, np.float32, ndim=2)
    return tuple(w.shape)


# ---------------------------------------------------------------------------------------------
# Masks

class _Selection:
    """A validated mask: its form, (M, N), the entries per row and the device array."""

    def __init__(self, form: str, n_rows: int, n_cols: int, n_entries: int, array,
                 verify: bool = True):
        self.form = form            # "bool" or "idx"
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.n_entries = n_entries  # N for a bool mask, n_keep for idx
        self.array = array          # as given (NumPy or device)
        # Whether the kernels' verdict on a device index mask is read back (a sync).
        self.verify = verify and form == "idx" and is_device_array(array)


#: The dtypes of a mask with one byte per entry: bool, or int8/uint8 where nonzero selects
#: (pyopencl's comparisons give int8).  The kernels read the bytes and test them != 0.
BYTE_MASK_DTYPES = (np.dtype(np.bool_), np.dtype(np.int8), np.dtype(np.uint8))


def require_byte_mask(mask, name: str, ndim: Optional[int] = None):
    """Check that ``mask`` is a NumPy or pyopencl array of a byte-mask dtype (and ndim)."""
    if not isinstance(mask, (np.ndarray, cl_array.Array)):
        raise TypeError(f"{name} must be a numpy.ndarray or pyopencl.array.Array, got "
                        f"{type(mask).__name__}")
    if mask.dtype not in BYTE_MASK_DTYPES:
        raise TypeError(f"{name} must have dtype bool (or int8/uint8, nonzero selects), got "
                        f"{mask.dtype}")
    return require_array(mask, name, mask.dtype, ndim=ndim)


def check_mask(mask, n_rows: int, n_cols: int, vector: bool, name: str = "mask",
               verify: bool = True) -> _Selection:
    """Validate a bool (M, N) mask or a compact int32 (M, n_keep) index mask.

    Host index masks are checked here (range, duplicates); device ones are checked on the
    device when they are first used (see :func:`pysparsecl.families.masked_util.idx_slots`).
    """
    if not isinstance(mask, (np.ndarray, cl_array.Array)):
        raise TypeError(f"{name} must be a numpy.ndarray or pyopencl.array.Array (bool mask "
                        f"or int32 column indices), got {type(mask).__name__}")
    if mask.dtype in BYTE_MASK_DTYPES:
        form = "bool"
    elif mask.dtype == np.int32:
        form = "idx"
    else:
        raise TypeError(f"{name} must have dtype bool (or int8/uint8, nonzero selects: a "
                        f"(M, N) mask) or int32 (compact (M, n_keep) column indices), got "
                        f"{mask.dtype}")
    if is_device_array(mask) and not mask.flags.c_contiguous:
        raise ValueError(f"{name}: non-contiguous pyopencl arrays are not supported; pass a "
                         "contiguous copy")
    want_ndim = 1 if vector else 2
    if mask.ndim != want_ndim:
        raise ValueError(f"{name} must be {want_ndim}-D for a {want_ndim}-D x, got shape "
                         f"{tuple(mask.shape)}")
    shape = (1,) + tuple(mask.shape) if vector else tuple(mask.shape)
    if shape[0] != n_rows:
        raise ValueError(f"{name} has {shape[0]} rows but x has {n_rows}")
    if form == "bool":
        if shape[1] != n_cols:
            raise ValueError(f"{name} (bool) must have shape {(n_rows, n_cols)[vector:]}, got "
                             f"{tuple(mask.shape)}")
        return _Selection(form, n_rows, n_cols, n_cols, mask)
    n_keep = shape[1]
    if n_keep > n_cols:
        raise ValueError(f"{name} (int32 indices) has {n_keep} entries per row but there are "
                         f"only N = {n_cols} columns: some column repeats")
    if not is_device_array(mask):
        _check_host_idx(np.asarray(mask).reshape(shape), n_cols, name)
    return _Selection(form, n_rows, n_cols, n_keep, mask, verify)


def _check_host_idx(idx: np.ndarray, n_cols: int, name: str) -> None:
    if idx.size == 0:
        return
    bad = (idx < 0) | (idx >= n_cols)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{name} (int32 indices) must lie in [0, {n_cols}); row {row} holds "
                         f"{int(idx[row, col])}")
    ordered = np.sort(idx, axis=1)
    dup = ordered[:, 1:] == ordered[:, :-1]
    if dup.any():
        row, col = np.argwhere(dup)[0]
        raise ValueError(f"{name} (int32 indices) repeats column {int(ordered[row, col])} in "
                         f"row {row}; each row's indices must be distinct")


def _raise_if_bad(queue, bad: cl_array.Array, n_cols: int, name: str) -> None:
    """Read the device validation flags (a synchronisation) and raise on a bad index."""
    runtime.refuse_capture("checking int32 device masks")
    flags = bad.get(queue=queue)
    if flags[0] != INT32_MAX:
        raise ValueError(f"{name} (int32 indices) must lie in [0, {n_cols}); row {flags[0]} "
                         "holds a value outside that range")
    if flags[1] != INT32_MAX:
        raise ValueError(f"{name} (int32 indices) repeats a column in row {flags[1]}; each "
                         "row's indices must be distinct")


# ---------------------------------------------------------------------------------------------
# Forward

@runtime.capturable_op
def masked_matmul(x, w, mask, *, out=None, verify_mask=True, queue=None, events=None):
    """Output-masked matrix product: ``mask * (x @ w)``, computing only selected outputs.

    Parameters
    ----------
    x : numpy.ndarray or pyopencl.array.Array, float32, shape (M, K) or (K,); or a
        :class:`CompactRows` of shape (M, K) or (K,): each row's nonzero values and their
        columns (a sparse input, e.g. the previous DSG layer's compact output).  Each
        selected output then sums over the row's n_keep entries only, gathering its
        weight row at their columns; see Notes.
    w : array of shape (K, N), float32, or a :class:`MaskedLinearWeight` (prepared once,
        device-resident: the hot path).  A NumPy ``w`` is transposed to (N, K) rows on
        its first two calls and then kept while the array lives and its contents are
        unchanged (compared on each call, which reads it once; see
        ``pysparsecl.clear_weight_cache``); a device array ``w`` is transposed on every
        call.
    mask : either
        - a bool array of shape (M, N) (``(N,)`` for a 1-D ``x``): the result is the dense
          (M, N) product with exact zeros where the mask is False, or
        - an int32 array of shape (M, n_keep) (``(n_keep,)`` for a 1-D ``x``) holding each
          row's selected columns, distinct and in [0, N): the result is the compact
          (M, n_keep) array of the selected outputs, in the order of ``mask``.
        A host index mask is validated on the host; a device one on the device, which
        costs one 8-byte read back (a synchronisation) per call, unless ``verify_mask``
        is False.
    out : array of the result's shape, float32, optional; the same container kind as x.
    verify_mask : bool (default True): False skips reading back the device validation of
        an int32 device mask (its synchronisation, which a LaunchGraph cannot record),
        for masks the search or ``random_mask`` made.  The kernels stay in bounds with a
        bad mask, but the outputs of its bad entries are then unspecified.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    The float32 result, in the kind of container ``x`` came in: a device array in gives a
    device array out, with no host round trip.

    Copies
    ------
    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends its inputs and its new results to the kernels in place, with no copy, except
    that operands up to 256 KiB go through a staging buffer the thread keeps (a memcpy),
    and so does an x up to 64 MiB that does not start on a cache line (NumPy's large
    arrays start 16 bytes past one; the GEMM's vector loads would each span two lines);
    elsewhere they are copied to and from the device.  A NumPy call returns when its
    result is ready; a device-array call returns once it is enqueued.

    Notes
    -----
    With one row (M == 1 or a 1-D ``x``) a VMM kernel runs, otherwise a GEMM kernel; each
    comes in two shapes, chosen by the op's routine (``masked_vmm_routine``,
    ``masked_gemm_routine``: looked up per device and shape class, a ``cpu`` or ``gpu``
    default for a device the database does not know).  CPU-shaped: the VMM keeps
    the x row in cache while each selected output streams one weight row; the GEMM works
    column by column within blocks of rows, so a weight row is read once per block and
    shared by every row of the block that selects it.  GPU-shaped: a team of work-items
    shares each selected output of the VMM, reading its weight row coalesced; a GEMM
    work-group owns an output tile, stages chunks of x and W^T in local memory and
    computes only the tile's selected outputs.

    With a :class:`CompactRows` x, the family ``masked_compact`` runs instead: a work-item
    takes one output column and, for each row that selects it, gathers that column's
    weight row at the row's nonzero columns (n_keep multiply-adds instead of K, each a
    gather: see docs/ops.md for where that pays).  The result is the dense-input product
    of x's dense form, up to float32 rounding.  Its container is that of x's arrays.
    """
    if not isinstance(verify_mask, bool):
        raise TypeError(f"verify_mask must be a bool, got {type(verify_mask).__name__}")
    if isinstance(x, CompactRows):
        return _compact_matmul(x, w, mask, out, verify_mask, queue, events)
    require_array(x, "x", np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"x must be 1-D (K,) or 2-D (M, K), got shape {tuple(x.shape)}")
    vector = x.ndim == 1
    n_rows, k_in = (1, x.shape[0]) if vector else x.shape
    wk, n_cols = weight_shape(w)
    if wk != k_in:
        raise ValueError(f"w must have shape (K, N) with K = {k_in} (the columns of x), got "
                         f"{(wk, n_cols)}")
    sel = check_mask(mask, n_rows, n_cols, vector, verify=verify_mask)
    out_shape = (sel.n_entries,) if vector else (n_rows, sel.n_entries)
    check_out(out, out_shape, np.float32, like=x)
    if queue is None and isinstance(w, MaskedLinearWeight) and not is_device_array(x):
        queue = w.queue
    queue = runtime.resolve_queue(queue, x=x, w=w if is_device_array(w) else None, mask=mask,
                                  out=out)
    check_int32_sizes(x=n_rows * k_in, w=k_in * n_cols, mask=n_rows * n_cols)
    if not is_device_array(x):  # refuse an oversized x before the output is allocated
        check_alloc(queue, x.nbytes, "x")

    out_dev, host = new_output(queue, out_shape, np.float32, out, like=x)
    if out_dev.size and k_in == 0:
        runtime.fill_array(queue, out_dev, 0)   # every dot product is empty
    elif out_dev.size:
        rows, ldw = weight_rows(w, k_in, queue, events)
        borrow = not is_device_array(x)   # a NumPy call waits for its result
        x_dev = to_device(x, queue, "x", borrow, realign=True)
        mask_dev = to_device(mask, queue, "mask", borrow)
        _launch_forward(queue, x_dev, rows, ldw, sel, mask_dev, out_dev, n_rows, n_cols,
                        k_in, events)
    return deliver(out_dev, x, out, queue, host)


def _compact_matmul(x: CompactRows, w, mask, out, verify_mask: bool, queue, events):
    """masked_matmul with a CompactRows x (see its docstring)."""
    values, idx = x.rows()
    vector, n_rows, k_in = x.vector, x.n_rows, x.n_cols
    wk, n_cols = weight_shape(w)
    if wk != k_in:
        raise ValueError(f"w must have shape (K, N) with K = {k_in} (x's n_cols), got "
                         f"{(wk, n_cols)}")
    sel = check_mask(mask, n_rows, n_cols, vector, verify=verify_mask)
    out_shape = (sel.n_entries,) if vector else (n_rows, sel.n_entries)
    check_out(out, out_shape, np.float32, like=x.values)
    if queue is None and isinstance(w, MaskedLinearWeight) and not x.is_device:
        queue = w.queue
    queue = runtime.resolve_queue(queue, x=x.values, x_idx=x.idx,
                                  w=w if is_device_array(w) else None, mask=mask, out=out)
    check_int32_sizes(x=n_rows * k_in, w=k_in * n_cols, mask=n_rows * n_cols)
    if not x.is_device:
        check_alloc(queue, x.nbytes, "x")

    out_dev, host = new_output(queue, out_shape, np.float32, out, like=x.values)
    if not out_dev.size:
        return deliver(out_dev, x.values, out, queue, host)
    if x.n_keep == 0:
        runtime.fill_array(queue, out_dev, 0)   # every dot product is empty
        return deliver(out_dev, x.values, out, queue, host)
    shape_class = masked_matmul_shape_class(n_rows, k_in, n_cols)
    family, params, max_density, min_rows = tuning.memoised(
        "masked_compact", queue.device, shape_class, _compact_route)
    rows, ldw = weight_rows(w, k_in, queue, events)
    borrow = not x.is_device
    xv_dev = to_device(values, queue, "x", borrow)
    xi_dev = to_device(idx, queue, "x_idx", borrow)
    mask_dev = to_device(mask, queue, "mask", borrow)
    if n_rows < min_rows or 100 * x.n_keep > max_density * k_in:
        # Denser than the gathers pay for: x scattered to dense, the dense-input product.
        x_dense = _dense_form(queue, xv_dev, xi_dev, n_rows, k_in, events)
        _launch_forward(queue, x_dense, rows, ldw, sel, mask_dev, out_dev, n_rows, n_cols,
                        k_in, events)
        return deliver(out_dev, x.values, out, queue, host)
    if sel.form == "bool":
        runtime.fill_array(queue, out_dev, 0)   # the unselected outputs
    wait = [e for a in (xv_dev, xi_dev, rows, mask_dev, out_dev) for e in a.events]
    ev, bad = family.launch(queue, params, sel.form, xv_dev, xi_dev, x.n_keep, rows, ldw,
                            mask_dev, out_dev, n_rows, n_cols, k_in, sel.n_entries, wait,
                            events)
    written(out_dev, ev)
    if events is not None:
        events.append(ev)
    if sel.verify:
        _raise_if_bad(queue, bad, n_cols, "mask")
    return deliver(out_dev, x.values, out, queue, host)


def _dense_form(queue, xv_dev, xi_dev, n_rows: int, k_in: int, events) -> cl_array.Array:
    """A compact x's (n_rows, k_in) dense form, scattered on the device from its values
    and indices ((n_rows, n_keep) device arrays)."""
    check_alloc(queue, 4 * n_rows * k_in, "x in dense form")
    x_dense = runtime.empty(queue, (n_rows, k_in), np.float32,
                            allocator=runtime.memory_pool(queue.context))
    compact_util.scatter(queue, xv_dev, xi_dev, x_dense, k_in, events)
    return x_dense


def _compact_route(look):
    """The compact-x family the routine chooses, its tiles (read-only), and the
    routine's density (percent) and row thresholds for gathering."""
    routine = look(MASKED_COMPACT_ROUTINE.spec)
    family = _COMPACT_FAMILIES[routine["KERNEL"]]
    return family, look(family.SPEC), routine["GATHER_MAX_DENSITY"], routine["GATHER_MIN_ROWS"]


def _vmm_route(look):
    """The VMM family the routine chooses, its tiles (read-only) and the routine's limit
    for listing a bool mask inside the split kernel."""
    routine = look(MASKED_VMM_ROUTINE.spec)
    family = _VMM_FAMILIES[routine["KERNEL"]]
    return family, look(family.SPEC), routine["LIST_IN_KERNEL_MAX_N"]


def _gemm_route(look):
    """The GEMM family the routine chooses and its tiles (read-only)."""
    family = _GEMM_FAMILIES[look(MASKED_GEMM_ROUTINE.spec)["KERNEL"]]
    return family, look(family.SPEC)


def _launch_forward(queue, x_dev, rows, ldw, sel: _Selection, mask_dev, out_dev, n_rows,
                    n_cols, k_in, events) -> None:
    """Route to the VMM (one row) or the GEMM family the routine chooses, and launch."""
    wait = list(x_dev.events) + list(rows.events) + list(mask_dev.events) + list(out_dev.events)
    bad = None
    if sel.form == "idx" and (is_device_array(sel.array) or n_rows > 1):
        # The column-oriented kernels need the slot map; a device idx needs validating.
        slots, bad = masked_util.idx_slots(queue, mask_dev, n_rows, n_cols, sel.n_entries,
                                           events)
        wait += list(slots.events)
    shape_class = masked_matmul_shape_class(n_rows, k_in, n_cols)
    if n_rows == 1:
        family, params, list_limit = tuning.memoised("masked_vmm", queue.device, shape_class,
                                                     _vmm_route)
        if family is masked_vmm_split:
            ev = family.launch(queue, params, x_dev, rows, ldw, sel.form, mask_dev, out_dev,
                               n_cols, k_in, sel.n_entries, wait, events, list_limit)
        else:
            ev = family.launch(queue, params, x_dev, rows, ldw, sel.form, mask_dev, out_dev,
                               n_cols, k_in, sel.n_entries, wait)
    else:
        family, params = tuning.memoised("masked_gemm", queue.device, shape_class,
                                         _gemm_route)
        form = "bool" if sel.form == "bool" else "slot"
        selection = ((mask_dev.base_data, elem_offset(mask_dev)) if form == "bool"
                     else (slots.data, np.int64(0)))
        ev = family.launch(queue, params, form, x_dev, rows, ldw, selection, out_dev, n_rows,
                           n_cols, k_in, sel.n_entries, wait, events)
    written(out_dev, ev)
    if events is not None:
        events.append(ev)
    if bad is not None and sel.verify:
        _raise_if_bad(queue, bad, n_cols, "mask")


# ---------------------------------------------------------------------------------------------
# Backward

@runtime.capturable_op
def masked_matmul_backward(dy, x, w, mask, *, need_dx=True, dw_rows=False, dw_out=None,
                           n_cols=None, verify_mask=True, queue=None, events=None):
    """Gradients of ``y = mask * (x @ w)`` with the mask held constant.

    Returns ``(dx, dw)`` with ``dx = (mask * dy) @ w.T`` and ``dw = x.T @ (mask * dy)``.
    Both use only the selected entries: a row of dx sums the weight rows (N, K layout) of
    its selected outputs, and a column of dw sums the rows of x that select it.

    Parameters
    ----------
    dy : float32 array, the gradient of y in the form ``masked_matmul`` returned y: dense
        (M, N) for a bool mask (its unselected entries are ignored), compact (M, n_keep)
        for int32 indices; 1-D for a 1-D ``x``.
    x : float32 array (M, K) or (K,), or a :class:`CompactRows` (a sparse input, as
        ``masked_matmul`` takes it): dw then sums over x's entries only, and dx is a
        CompactRows with x's indices, the gradient at x's entries only (what the previous
        DSG layer, whose mask made x compact, needs).
    w : float32 array (K, N) or a :class:`MaskedLinearWeight`; None with ``need_dx=False``
        and a bool/int8/uint8 mask (dw needs only x and dy; N is the mask's), or an int32
        mask and ``n_cols``.
    mask : bool (M, N) or int32 (M, n_keep) column indices, as for :func:`masked_matmul`.
    need_dx : bool: False skips dx (a first layer's), which is then None.
    dw_rows : bool: give dw as (N, K) rows, the layout a :class:`MaskedLinearWeight`
        stores (and torch's ``Linear.weight``), so that a weight kept that way is updated
        with a contiguous gradient; the kernels compute this layout, so it also saves the
        transpose that (K, N) takes.
    dw_out : float32 device array of dw's shape, optional (device calls): dw is written
        there, e.g. into a gradient buffer (a view that starts inside its buffer must
        start on the device's base alignment, else it is written through a copy).
    n_cols : int, optional: N, with ``w=None`` and an int32 mask (which does not say N).
    verify_mask : bool, as for :func:`masked_matmul`.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    dx : float32, the shape of ``x`` (None without ``need_dx``); for a CompactRows x, a
        CompactRows with x's indices.
    dw : float32 (K, N), the shape of ``w`` in ``x @ w`` (also for a MaskedLinearWeight),
        or (N, K) with ``dw_rows``.
    Both in the kind of container ``x`` came in.

    A NumPy ``w`` is kept as device rows while it is unchanged (see :func:`masked_matmul`).
    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends its inputs and its new results to the kernels in place, with no copy, except
    that operands up to 256 KiB go through a staging buffer the thread keeps (a memcpy);
    elsewhere they are copied to and from the device.  A NumPy call returns when its
    result is ready; a device-array call returns once it is enqueued.

    With a CompactRows x, dw comes from the routine ``masked_compact_dw``'s family (a
    work-item per row of dw^T, or on GPUs a work-group accumulating it in local memory,
    scatters dy times each selecting row's nonzero values into it: n_keep multiply-adds
    per selected output instead of K), or, for an x denser than the routine's
    GATHER_MAX_DENSITY, from the dense-x kernel on x scattered to dense; dx is the
    dense-input backward's dx gathered at x's entries.
    """
    compact = isinstance(x, CompactRows)
    like = x.values if compact else x        # the container the results come back in
    if compact:
        vector, n_rows, k_in = x.vector, x.n_rows, x.n_cols
    else:
        require_array(x, "x", np.float32)
        if x.ndim not in (1, 2):
            raise ValueError(f"x must be 1-D (K,) or 2-D (M, K), got shape "
                             f"{tuple(x.shape)}")
        vector = x.ndim == 1
        n_rows, k_in = (1, x.shape[0]) if vector else x.shape
    if w is None:
        if need_dx is not False:
            raise TypeError("w is required unless need_dx=False")
        if n_cols is not None:       # an index mask: the outputs' N is given
            if isinstance(n_cols, bool) or not isinstance(n_cols, (int, np.integer)) or \
                    n_cols < 0:
                raise TypeError(f"n_cols must be a non-negative int, got {n_cols!r}")
            wk, n_cols = k_in, int(n_cols)
        else:
            require_byte_mask(mask, "mask")
            if mask.ndim != (1 if vector else 2):
                raise ValueError("w=None takes a bool/int8/uint8 mask of the output's shape "
                                 "(or an int32 index mask with n_cols)")
            wk, n_cols = k_in, mask.shape[-1]
    elif n_cols is not None:
        raise TypeError("n_cols is only for w=None (w gives N)")
    else:
        wk, n_cols = weight_shape(w)
    if wk != k_in:
        raise ValueError(f"w must have shape (K, N) with K = {k_in} (the columns of x), got "
                         f"{(wk, n_cols)}")
    if not isinstance(verify_mask, bool):
        raise TypeError(f"verify_mask must be a bool, got {type(verify_mask).__name__}")
    sel = check_mask(mask, n_rows, n_cols, vector, verify=verify_mask)
    require_array(dy, "dy", np.float32)
    dy_shape = (sel.n_entries,) if vector else (n_rows, sel.n_entries)
    if tuple(dy.shape) != dy_shape:
        raise ValueError(f"dy must have shape {dy_shape} (the shape of masked_matmul's result "
                         f"for this mask), got {tuple(dy.shape)}")
    if queue is None and isinstance(w, MaskedLinearWeight) and not is_device_array(like):
        queue = w.queue
    queue = runtime.resolve_queue(queue, x=like, x_idx=x.idx if compact else None, dy=dy,
                                  w=w if is_device_array(w) else None, mask=mask)
    for flag, name in ((need_dx, "need_dx"), (dw_rows, "dw_rows")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    dw_shape = (n_cols, k_in) if dw_rows else (k_in, n_cols)
    if dw_out is not None:
        if not is_device_array(like):
            raise TypeError("dw_out is for device calls (x a pyopencl array)")
        check_out(dw_out, dw_shape, np.float32, like=like, name="dw_out")
    check_int32_sizes(x=n_rows * k_in, w=k_in * n_cols, mask=n_rows * n_cols)
    for size, what in ((n_rows * k_in if need_dx else 0, "dx"), (k_in * n_cols, "dw")):
        check_alloc(queue, 4 * size, what)   # both, by name, before either is allocated
    if compact:
        return _compact_backward(queue, dy, x, w, sel, mask, need_dx, dw_rows, dw_out,
                                 dw_shape, n_cols, events)
    dx_dev = dx_host = None
    if need_dx:
        dx_dev, dx_host = new_output(queue, tuple(x.shape), np.float32, None, like=x,
                                     zeros=True, slot="dx")
    dw_dev, dw_host = new_output(queue, dw_shape, np.float32, dw_out, like=x, slot="dw")
    if n_rows and k_in and n_cols and sel.n_entries:
        rows, ldw = weight_rows(w, k_in, queue, events) if need_dx else (None, 0)
        borrow = not is_device_array(x)   # a NumPy call waits for its result
        x_dev = to_device(x, queue, "x", borrow)
        dy_dev = to_device(dy, queue, "dy", borrow)
        mask_dev = to_device(mask, queue, "mask", borrow)
        _launch_backward(queue, dy_dev, x_dev, rows, ldw, sel, mask_dev, dx_dev, dw_dev,
                         dw_rows, n_rows, n_cols, k_in, events, _device_pair(mask, dy))
    elif dw_dev.size:
        runtime.fill_array(queue, dw_dev, 0)       # nothing selected: dw is zero
    dx = deliver(dx_dev, x, None, queue, dx_host) if need_dx else None
    return dx, deliver(dw_dev, x, dw_out, queue, dw_host)


def _compact_backward(queue, dy, x: CompactRows, w, sel: _Selection, mask, need_dx: bool,
                      dw_rows: bool, dw_out, dw_shape, n_cols: int, events):
    """masked_matmul_backward with a CompactRows x (validated; see its docstring)."""
    values, idx = x.rows()
    n_rows, k_in, nx = x.n_rows, x.n_cols, x.n_keep
    like = x.values
    dxv_dev = dxv_host = None
    if need_dx:
        dxv_dev, dxv_host = new_output(queue, tuple(x.values.shape), np.float32, None,
                                       like=like, slot="dx")
    dw_dev, dw_host = new_output(queue, dw_shape, np.float32, dw_out, like=like, slot="dw")
    if n_rows and k_in and n_cols and sel.n_entries and nx:
        borrow = not x.is_device
        xv_dev = to_device(values, queue, "x", borrow)
        xi_dev = to_device(idx, queue, "x_idx", borrow)
        dy_dev = to_device(dy, queue, "dy", borrow)
        mask_dev = to_device(mask, queue, "mask", borrow)
        outputs = (dw_dev,) if dxv_dev is None else (dxv_dev, dw_dev)
        wait = [e for a in (xv_dev, xi_dev, dy_dev, mask_dev) + outputs for e in a.events]
        lists, launched = _selection_lists(queue, sel, mask_dev, dy_dev, n_rows, n_cols,
                                           wait, events, _device_pair(mask, dy))
        wait = wait + lists.events
        if dxv_dev is not None:
            # The dense-input dx, gathered at x's entries.
            rows, ldw = weight_rows(w, k_in, queue, events)
            dx_dense = runtime.zeros(queue, (n_rows, k_in), np.float32,
                                     allocator=runtime.memory_pool(queue.context))
            ev = masked_dx.launch(queue, tuning.lookup(MASKED_DX, queue.device), sel.form,
                                  dy_dev, rows, ldw, lists, dx_dense, n_rows, n_cols, k_in,
                                  sel.n_entries, wait + list(rows.events)
                                  + list(dx_dense.events))
            dx_dense.events[:] = [ev]
            launched.append(ev)
            compact_util.gather(queue, dx_dense, xi_dev,
                                dxv_dev.reshape(n_rows, nx), k_in, events)
        dw_family, dw_params, dw_max_density = tuning.memoised(
            "masked_compact_dw", queue.device,
            masked_matmul_shape_class(n_rows, k_in, n_cols), _compact_dw_route)
        if 100 * nx > dw_max_density * k_in:
            # Denser than the scatter-adds pay for: the dense-x kernel on x's dense form.
            x_dense = _dense_form(queue, xv_dev, xi_dev, n_rows, k_in, events)
            dense_wait = wait + list(x_dense.events)
            x_rows = masked_dw.padded_rows(queue, x_dense, n_rows, k_in, dense_wait, events)

            def launch_dw(dwt):
                return masked_dw.launch(queue, tuning.lookup(MASKED_DW, queue.device),
                                        sel.form, x_rows, lists, dwt, n_rows, n_cols, k_in,
                                        dense_wait)
        else:
            def launch_dw(dwt):
                return dw_family.launch(queue, dw_params, xv_dev, xi_dev, nx, lists, dwt,
                                        n_rows, n_cols, k_in, wait)
        _write_dw(queue, dw_dev, dw_rows, n_cols, k_in, launch_dw, launched, events)
        if lists.bad is not None and sel.verify:
            _raise_if_bad(queue, lists.bad, n_cols, "mask")
    else:
        if dw_dev.size:
            runtime.fill_array(queue, dw_dev, 0)       # nothing selected, or x empty
        if dxv_dev is not None and dxv_dev.size:
            runtime.fill_array(queue, dxv_dev, 0)
    dw = deliver(dw_dev, like, dw_out, queue, dw_host)
    if not need_dx:
        return None, dw
    dxv = deliver(dxv_dev, like, None, queue, dxv_host)
    return CompactRows(dxv, x.idx, k_in, check=False), dw


def _compact_dw_route(look):
    """The compact-x weight gradient's family, as its routine chooses, its tiles and the
    routine's density (percent) up to which it runs."""
    routine = look(MASKED_COMPACT_DW_ROUTINE.spec)
    family = _COMPACT_DW_FAMILIES[routine["KERNEL"]]
    return family, look(family.SPEC), routine["GATHER_MAX_DENSITY"]


def _launch_backward(queue, dy_dev, x_dev, rows, ldw, sel: _Selection, mask_dev, dx_dev,
                     dw_dev, dw_rows: bool, n_rows, n_cols, k_in, events,
                     shareable: bool = False) -> None:
    outputs = (dw_dev,) if dx_dev is None else (dx_dev, dw_dev)
    wait = [e for a in (dy_dev, x_dev, rows, mask_dev) + outputs if a is not None
            for e in a.events]
    lists, launched = _selection_lists(queue, sel, mask_dev, dy_dev, n_rows, n_cols, wait,
                                       events, shareable)
    wait = wait + lists.events
    if dx_dev is not None:
        ev_dx = masked_dx.launch(queue, tuning.lookup(MASKED_DX, queue.device), sel.form,
                                 dy_dev, rows, ldw, lists, dx_dev, n_rows, n_cols, k_in,
                                 sel.n_entries, wait)
        dx_dev.add_event(ev_dx)
        launched.append(ev_dx)
    x_rows = masked_dw.padded_rows(queue, x_dev, n_rows, k_in, wait, lists.events)
    # The kernel writes dw^T, (N, K), from the start of a buffer: straight into dw_dev
    # when the caller wants rows and dw_dev can be seen from offset 0, else a temporary.
    _write_dw(queue, dw_dev, dw_rows, n_cols, k_in,
              lambda dwt: masked_dw.launch(queue, tuning.lookup(MASKED_DW, queue.device),
                                           sel.form, x_rows, lists, dwt, n_rows, n_cols, k_in,
                                           wait), launched, events)
    if lists.bad is not None and sel.verify:
        _raise_if_bad(queue, lists.bad, n_cols, "mask")


_shared_lists = threading.local()


@contextlib.contextmanager
def shared_selection_lists():
    """Within the block, this thread's backward calls (:func:`masked_matmul_backward`)
    that pass the same ``mask`` and ``dy`` device arrays build the selection's lists
    (each row's selected columns, each column's selecting rows with their dy values)
    once, and the later calls reuse them.  For a caller that computes two gradients from
    one selection, as a DSG layer does for dw and for its projected weight's gradient:
    neither array may change inside the block."""
    saved = getattr(_shared_lists, "kept", None)
    _shared_lists.kept = {}
    try:
        yield
    finally:
        _shared_lists.kept = saved


def _device_pair(mask, dy) -> bool:
    """Whether the caller's mask and dy are both device arrays (the device arrays a NumPy
    call stages them in are the thread's, the same objects from call to call)."""
    return is_device_array(mask) and is_device_array(dy)


def _selection_lists(queue, sel: _Selection, mask_dev, dy_dev, n_rows: int, n_cols: int,
                     wait: list, events, shareable: bool
                     ) -> Tuple[masked_util.SelectionLists, list]:
    """The backward's SelectionLists of ``mask_dev`` and ``dy_dev``, and the events of the
    launches this call made for them: reused inside :func:`shared_selection_lists` (no
    launches) when a call before built them from the same two device arrays (the
    caller's own: ``shareable``)."""
    kept = getattr(_shared_lists, "kept", None) if shareable else None
    key = (queue.int_ptr, id(mask_dev), id(dy_dev), sel.form, n_rows, n_cols, sel.n_entries)
    if kept is not None and key in kept:
        return kept[key][0], []
    lists = masked_util.SelectionLists(queue, sel.form, mask_dev, dy_dev, n_rows, n_cols,
                                       sel.n_entries, wait, events)
    if kept is not None:   # the arrays are held with the lists: their ids stay theirs
        kept[key] = (lists, mask_dev, dy_dev)
    return lists, list(lists.events)


def _write_dw(queue, dw_dev, dw_rows: bool, n_cols: int, k_in: int, launch, launched: list,
              events) -> None:
    """Run ``launch(dwt)``, which enqueues dw^T (N, K) into ``dwt`` (a device array at
    offset 0 of its buffer, as the dw kernels write it) and returns its event, and deliver
    it into ``dw_dev``: straight there when the caller wants rows and dw_dev can be seen
    from offset 0, else through a temporary, copied (rows) or transposed ((K, N)).  The
    events of ``launched`` and the dw launch are appended to ``events``."""
    direct = at_offset_zero(dw_dev, queue) if dw_rows else None
    dwt = direct if direct is not None else runtime.empty(
        queue, (n_cols, k_in), np.float32, allocator=runtime.memory_pool(queue.context))
    ev_dw = launch(dwt)
    if events is not None:
        events.extend(launched + [ev_dw])
    if direct is not None:
        written(dw_dev, ev_dw)
    elif dw_rows:      # dw_dev starts off the base alignment: a device copy
        ev = runtime.enqueue_copy(queue, dw_dev.base_data, dwt.base_data, byte_count=dwt.nbytes,
                                  dst_offset=dw_dev.offset, wait_for=[ev_dw])
        written(dw_dev, ev)
    else:
        dwt.add_event(ev_dw)
        masked_util.transpose(queue, dwt, events, into=dw_dev)


# ---------------------------------------------------------------------------------------------
# Double-mask BatchNorm

@runtime.capturable_op
def masked_relu_bn(y, mask, gamma, beta, mean=None, var=None, eps=1e-5, *, training=False,
                   out=None, queue=None, events=None):
    """DSG's double-mask selection: ``mask * BN(ReLU(y))``.

    The layer runs CONV/FC -> ReLU -> BN, and the mask that selected the layer's outputs
    is applied again after BN, since BN would otherwise turn the skipped zeros into
    ``beta - gamma * mean / sqrt(var + eps)`` (Liu et al., ICLR 2019).

    Parameters
    ----------
    y : float32 array, (M, C) (a linear layer) or (N, C, H, W) (a convolution, or any
        (N, C, ...)): channels along axis 1.
    mask : bool array of y's shape; unselected outputs are exact zeros, whatever y holds.
    gamma, beta : float32 (C,), BN's scale and shift.
    mean, var : float32 (C,), the running statistics (inference); must be None when
        ``training`` is True.
    eps : float, added to the variance.
    training : bool
        False: normalise with ``mean`` and ``var``.  True: normalise with the batch
        statistics of ReLU(y) over the selected entries only, per channel (mean and
        biased variance; a channel with no selected entry gets 0 and 0), and return them.
    out : float32 array of y's shape, optional; the same container kind as y.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    ``out``, or ``(out, batch_mean, batch_var)`` when ``training``; in the kind of
    container ``y`` came in.  For PyTorch's running-variance update multiply batch_var
    by n / (n - 1), with n the channel's selected count.

    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends its inputs and its new results to the kernels in place, with no copy, except
    that operands up to 256 KiB go through a staging buffer the thread keeps (a memcpy);
    elsewhere they are copied to and from the device.  A NumPy call returns when its
    result is ready; a device-array call returns once it is enqueued.
    """
    _check_bn_operands(y, mask=mask)
    n_ch = y.shape[1]
    stats = {"gamma": gamma, "beta": beta}
    if training:
        if mean is not None or var is not None:
            raise ValueError("training=True normalises with the batch statistics: pass "
                             "mean=None and var=None")
    else:
        if mean is None or var is None:
            raise ValueError("the inference form needs the running mean and var (or pass "
                             "training=True)")
        stats.update(mean=mean, var=var)
    _check_bn_arguments(stats, n_ch, eps)
    check_out(out, y.shape, np.float32, like=y)
    queue = runtime.resolve_queue(queue, y=y, mask=mask, out=out, **stats)
    outer, inner = y.shape[0], int(np.prod(y.shape[2:], dtype=np.int64))
    check_int32_sizes(y=outer * n_ch * inner)
    alloc = runtime.memory_pool(queue.context)
    out_dev, host = new_output(queue, tuple(y.shape), np.float32, out, like=y)
    borrow = not is_device_array(y)   # a NumPy call waits for its result
    # The kernels read the statistics from the start of their buffers.
    dev = {name: read_from_start(to_device(a, queue, name, borrow, at_offset=False), queue)
           for name, a in stats.items()}
    if training:
        dev["mean"] = runtime.zeros(queue, (n_ch,), np.float32, allocator=alloc)
        dev["var"] = runtime.zeros(queue, (n_ch,), np.float32, allocator=alloc)
    if out_dev.size:
        y_dev = to_device(y, queue, "y", borrow)
        mask_dev = to_device(mask, queue, "mask", borrow)
        masked_bn.launch(queue, tuning.lookup(MASKED_BN, queue.device), y_dev, mask_dev, dev,
                         out_dev, outer, n_ch, inner, float(eps), training, events)
    result = deliver(out_dev, y, out, queue, host)
    if not training:
        return result
    if is_device_array(y):
        return result, dev["mean"], dev["var"]
    return result, dev["mean"].get(queue=queue), dev["var"].get(queue=queue)


def _check_bn_operands(y, **like_y) -> None:
    """y: float32, (M, C) or (N, C, ...); each named operand of ``like_y`` of y's shape
    (``mask`` a byte mask, the others float32)."""
    require_array(y, "y", np.float32)
    if y.ndim < 2:
        raise ValueError(f"y must be at least 2-D, (M, C) or (N, C, ...), got shape "
                         f"{tuple(y.shape)}")
    for name, a in like_y.items():
        if name == "mask":
            require_byte_mask(a, name)
        else:
            require_array(a, name, np.float32)
        if tuple(a.shape) != tuple(y.shape):
            raise ValueError(f"{name} must have y's shape {tuple(y.shape)}, got "
                             f"{tuple(a.shape)}")


def _check_bn_arguments(stats: dict, n_ch: int, eps) -> None:
    """BatchNorm's per-channel float32 (C,) arrays, by name, and a non-negative eps."""
    for name, a in stats.items():
        require_array(a, name, np.float32, ndim=1)
        if a.shape != (n_ch,):
            raise ValueError(f"{name} must have shape ({n_ch},) (the channels, axis 1 of y),"
                             f" got {tuple(a.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or \
            not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


@runtime.capturable_op
def masked_relu_bn_backward(dout, y, mask, gamma, mean, var, eps=1e-5, *, batch_stats=True,
                            dy_out=None, dgamma_out=None, dbeta_out=None, queue=None,
                            events=None):
    """Gradients of :func:`masked_relu_bn`'s ``out = mask * BN(ReLU(y))``.

    Parameters
    ----------
    dout : float32, the gradient of ``out``, y's shape; its unselected entries are ignored
        (never read into the arithmetic, so Inf or NaN there does not leak).
    y, mask, gamma, eps : as given to the forward.
    mean, var : float32 (C,): the statistics the forward normalised with, i.e. the batch
        statistics a ``training=True`` forward returned (``batch_stats=True``: the gradient
        then also flows through them, as in torch's training BatchNorm) or the running
        statistics of an inference forward (``batch_stats=False``: constants).
    batch_stats : bool, see above.
    dy_out : float32 of y's shape, optional; the same container kind as y.
    dgamma_out, dbeta_out : float32 (C,), optional, e.g. views in a gradient buffer; the
        same container kind as y.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    ``(dy, dgamma, dbeta)`` in the kind of container ``y`` came in.  dy is an exact zero
    where the mask is off and where ``y <= 0`` (ReLU's gradient, 0 at 0 as torch's).  With
    n the selected count of a channel and xhat = (ReLU(y) - mean) / sqrt(var + eps):
    dbeta = sum of dout, dgamma = sum of dout * xhat, over the selected entries, and where
    selected and y > 0, dy = gamma / sqrt(var + eps) * (dout - dbeta / n - xhat * dgamma / n)
    (the two terms only with ``batch_stats``).

    Two passes: a per-channel reduction, then an elementwise pass.  Copies as
    :func:`masked_relu_bn`.
    """
    _check_bn_operands(y, dout=dout, mask=mask)
    if not isinstance(batch_stats, bool):
        raise TypeError(f"batch_stats must be a bool, got {type(batch_stats).__name__}")
    n_ch = y.shape[1]
    stats = {"gamma": gamma, "mean": mean, "var": var}
    _check_bn_arguments(stats, n_ch, eps)
    check_out(dy_out, y.shape, np.float32, like=y, name="dy_out")
    check_out(dgamma_out, (n_ch,), np.float32, like=y, name="dgamma_out")
    check_out(dbeta_out, (n_ch,), np.float32, like=y, name="dbeta_out")
    queue = runtime.resolve_queue(queue, y=y, dout=dout, mask=mask, dy_out=dy_out,
                                  dgamma_out=dgamma_out, dbeta_out=dbeta_out, **stats)
    outer, inner = y.shape[0], int(np.prod(y.shape[2:], dtype=np.int64))
    check_int32_sizes(y=outer * n_ch * inner)
    borrow = not is_device_array(y)   # a NumPy call waits for its result
    dy_dev, dy_host = new_output(queue, tuple(y.shape), np.float32, dy_out, like=y, slot="dy")
    dg_dev, dg_host = new_output(queue, (n_ch,), np.float32, dgamma_out, like=y, slot="dgamma")
    db_dev, db_host = new_output(queue, (n_ch,), np.float32, dbeta_out, like=y, slot="dbeta")
    if n_ch:
        dev = {name: read_from_start(to_device(a, queue, name, borrow, at_offset=False), queue)
               for name, a in stats.items()}
        dev.update(dgamma=dg_dev, dbeta=db_dev)
        coef = runtime.empty(queue, (2 * n_ch,), np.float32,
                             allocator=runtime.memory_pool(queue.context))
        if outer * inner:
            masked_bn.launch_backward(
                queue, tuning.lookup(MASKED_BN, queue.device), to_device(y, queue, "y", borrow),
                to_device(mask, queue, "mask", borrow), to_device(dout, queue, "dout", borrow),
                dev, coef, dy_dev, outer, n_ch, inner, float(eps), batch_stats, events)
        else:      # an empty batch: no entry selected, zero gradients
            for a in (dg_dev, db_dev):
                runtime.fill_array(queue, a, 0)
    return (deliver(dy_dev, y, dy_out, queue, dy_host),
            deliver(dg_dev, y, dgamma_out, queue, dg_host),
            deliver(db_dev, y, dbeta_out, queue, db_host))


# ---------------------------------------------------------------------------------------------
# Masked convolution

def _masked_conv_operands(x, w, mask, stride, padding, dilation):
    """The checks :func:`conv2d_masked` and its backward share: x (N, C, H, W) and w (K, C,
    R, S) float32 with R, S >= 1, the geometry, and a byte mask of the output's shape or a
    channel mask (N, K, 1, 1).  Returns ``(geometry, output shape, channel form?)``."""
    require_array(x, "x", np.float32, ndim=4)
    require_array(w, "w", np.float32, ndim=4)
    k_out, n_ch, r, s = w.shape
    if x.shape[1] != n_ch:
        raise ValueError(f"x has {x.shape[1]} channels but w expects C = {n_ch} "
                         "(w must be (K, C, R, S))")
    if r < 1 or s < 1:
        raise ValueError(f"w must have a kernel of at least 1x1, got shape {tuple(w.shape)}")
    geom = masked_conv.geometry(x.shape, r, s, stride, padding, dilation)
    out_shape = (geom["N"], k_out, geom["OH"], geom["OW"])
    require_byte_mask(mask, "mask", ndim=4)
    channel_form = tuple(mask.shape) == out_shape[:2] + (1, 1)
    if tuple(mask.shape) != out_shape and not channel_form:
        raise ValueError(f"mask must have shape {out_shape} (N, K, OH, OW) or "
                         f"{out_shape[:2] + (1, 1)} (a channel mask), got {tuple(mask.shape)}")
    return geom, out_shape, channel_form


@runtime.capturable_op
def conv2d_masked(x, w, mask, stride=1, padding=0, dilation=1, *, out=None, queue=None,
                  events=None):
    """Output-masked 2-D convolution: ``mask * conv2d(x, w)``, computing only the selected
    outputs (no im2col: the input is packed once into zero-padded NHWC).  On CPUs a
    work-item per output channel and block of pixels computes the selected ones; on GPUs
    an implicit GEMM stages each output tile's windows through local memory and computes
    only its selected entries (the routine ``masked_conv_routine`` chooses).

    Parameters
    ----------
    x : float32 (N, C, H, W), NumPy or pyopencl.
    w : float32 (K, C, R, S), dense.
    mask : bool (N, K, OH, OW): DSG's per-window selection; or (N, K, 1, 1): a per-sample
        output-channel mask.  A channel mask -- given as (N, K, 1, 1), or a host mask that
        is constant over each OH x OW plane -- takes a faster path: on CPUs whole planes
        of the selected channels in register tiles, on GPUs the implicit GEMM reading the
        N * K flags instead of the whole mask.  (A device mask is not inspected: pass
        (N, K, 1, 1) to get that path for it; on CPUs its N * K flags are then read back,
        a synchronisation, to build each image's channel list.)
    stride, padding, dilation : int or (h, w) pair, as in ``torch.nn.functional.conv2d``.
    out : float32 (N, K, OH, OW), optional; the same container kind as x.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    The (N, K, OH, OW) float32 result with exact zeros where the mask is False, in the kind
    of container ``x`` came in.

    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends its inputs and its new results to the kernels in place, with no copy, except
    that operands up to 256 KiB go through a staging buffer the thread keeps (a memcpy);
    elsewhere they are copied to and from the device.  A NumPy call returns when its
    result is ready; a device-array call returns once it is enqueued.  A device weight is
    packed on every call; a NumPy weight once, then kept while its bytes stay the same
    (compared on every call, so an edit in place is seen), as conv2d_sparse keeps a CSR
    weight (:func:`pysparsecl.clear_weight_cache` drops it).
    """
    geom, out_shape, channel_form = _masked_conv_operands(x, w, mask, stride, padding,
                                                          dilation)
    k_out, n_ch, r, s = w.shape
    check_out(out, out_shape, np.float32, like=x)
    queue = runtime.resolve_queue(queue, x=x, w=w, mask=mask, out=out)
    check_int32_sizes(out=int(np.prod(out_shape)),
                 packed=geom["N"] * geom["Hp"] * geom["Wp"] * n_ch)
    channels = None
    if channel_form:
        channels = mask
    elif not is_device_array(mask):
        host = np.asarray(mask)
        if host.size and np.array_equal(host, np.broadcast_to(host[:, :, :1, :1], host.shape)):
            channels = host[:, :, :1, :1]
    out_dev, host = new_output(queue, tuple(out_shape), np.float32, out, like=x)
    if out_dev.size:
        borrow = not is_device_array(x)   # a NumPy call waits for its result
        x_dev = to_device(x, queue, "x", borrow)
        xp = masked_conv.pack_input(queue, x_dev, n_ch, geom, events)
        wk = _packed_conv_weight(w, queue, events)
        family, params = tuning.memoised(
            "conv2d_masked", queue.device,
            masked_matmul_shape_class(out_dev.size // k_out, r * s * n_ch, k_out), _conv_route)
        if family is masked_conv_tiled:
            form = "window" if channels is None else "channel"
            if channel_form or channels is None:
                selection = to_device(mask, queue, "mask", borrow)
            else:                           # a host mask found constant over each plane
                selection = to_device(np.ascontiguousarray(channels), queue, "mask", borrow)
            masked_conv_tiled.launch(queue, params, form, xp, wk, selection, out_dev, geom,
                                     n_ch, k_out, r, s, events)
        elif channels is not None:
            masked_conv_channels.launch(queue, tuning.lookup(MASKED_CONV_CH, queue.device), xp,
                                        wk, channels, out_dev, geom, n_ch, k_out, r, s, events)
        else:
            masked_conv.launch(queue, tuning.lookup(MASKED_CONV, queue.device), xp, wk,
                               to_device(mask, queue, "mask", borrow), out_dev, geom, n_ch,
                               k_out, r, s, events)
    return deliver(out_dev, x, out, queue, host)


_PACKED_CONV_WEIGHTS = PreparedCache("conv2d_masked weights")


def _packed_conv_weight(w, queue, events):
    """w (K, C, R, S) packed (K, R, S, C) on the device: a device w by a kernel on every
    call; a NumPy w transposed and uploaded once and kept while it is unchanged (as the
    card's conv2d_sparse keeps its CSR weight), since the transpose and the upload cost
    about what the product does (res5's 512 x 512 x 3 x 3: ~1 ms of transpose alone)."""
    if is_device_array(w):
        return masked_conv.pack_weight(queue, w, events)
    return _PACKED_CONV_WEIGHTS.get(w, (w,), queue.context.int_ptr,
                                    lambda: masked_conv.pack_weight(queue, w, events))


def _conv_route(look):
    """The convolution family the routine chooses and its tiles (read-only); the direct
    kernels' tiles are looked up at launch."""
    family = _CONV_FAMILIES[look(MASKED_CONV_ROUTINE.spec)["KERNEL"]]
    return family, (look(family.SPEC) if family is masked_conv_tiled else None)


def masked_matmul_shape_class(n_rows: int, k_in: int, n_cols: int) -> str:
    """The tuning database's shape class of a masked product: M, K and N rounded down to
    powers of two, e.g. ``m128-k4096-n4096``.  (Not the kept fraction: a device mask's
    count is unknown without a synchronisation.)"""
    return (f"m{tuning.pow2_floor(n_rows)}-k{tuning.pow2_floor(k_in)}"
            f"-n{tuning.pow2_floor(n_cols)}")


# ---------------------------------------------------------------------------------------------
# Masked convolution: backward

@runtime.capturable_op
def conv2d_masked_backward(dy, x, w, mask, stride=1, padding=0, dilation=1, *, need_dx=True,
                           need_dw=True, dw_out=None, dx_out=None, queue=None, events=None):
    """Gradients of ``y = mask * conv2d(x, w)`` (:func:`conv2d_masked`) with the mask held
    constant: with ``g = mask ? dy : 0``,

    - ``dx = conv_transpose2d(g, w)``: ``dx[n, c, h, w']`` sums ``w[k, c, r, s] *
      g[n, k, oh, ow]`` over the (k, r, s) and output pixels with ``oh * stride_h -
      pad_h + r * dil_h = h`` (and likewise along the width);
    - ``dw[k, c, r, s]`` sums ``g[n, k, oh, ow] * x[n, c, oh * stride_h - pad_h + r *
      dil_h, ow * stride_w - pad_w + s * dil_w]`` over (n, oh, ow), zero outside the input.

    Only selected entries enter the arithmetic: an unselected ``dy`` entry is never read, so
    an Inf or NaN there does not reach the gradients.

    Parameters
    ----------
    dy : float32 (N, K, OH, OW), the gradient of y (its unselected entries are ignored).
    x : float32 (N, C, H, W), the forward's input.
    w : float32 (K, C, R, S), the forward's dense weight.
    mask : bool (or int8/uint8, nonzero selects) (N, K, OH, OW), or (N, K, 1, 1): a
        per-sample output-channel mask; as for :func:`conv2d_masked`.
    stride, padding, dilation : int or (h, w) pair, as in the forward.
    need_dx, need_dw : bool: False skips that gradient (a first layer's dx), which is
        then None.
    dx_out : float32 (N, C, H, W), optional: dx is written there; the same container
        kind as x.
    dw_out : float32 (K, C, R, S), optional: dw is written there, e.g. straight into a
        trainer's gradient buffer (a view inside a larger device buffer is written in
        place, at any offset, and nothing else of that buffer); the same container kind
        as x.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    (dx, dw): float32, the shapes of x and w (None where not asked for), in the kind of
    container ``x`` came in.

    dx: each output pixel's selected channels are listed once with their dy, and a
    work-item per input pixel and channel chunk gathers over the taps whose output pixel
    exists (no atomics: deterministic); the weight is packed (K, R, S, C) on every call.
    dw: the input is packed once into zero-padded NHWC, and a work-item per output channel
    and channel chunk walks that channel's mask, keeping all R x S taps in registers (the
    kernel is compiled per kernel size).  Both scale with the selected fraction, plus a
    pass over the mask.  On a device that shares host memory (PoCL's CPU device,
    integrated GPUs) a NumPy call lends its inputs and new results to the kernels in
    place, with no copy (small operands go through staging buffers); elsewhere they are
    copied.  A NumPy call returns when its results are ready; a device-array call returns
    once it is enqueued.
    """
    require_array(dy, "dy", np.float32, ndim=4)
    geom, out_shape, channel_form = _masked_conv_operands(x, w, mask, stride, padding,
                                                          dilation)
    k_out, n_ch, r, s = w.shape
    form = "channel" if channel_form else "window"
    if tuple(dy.shape) != out_shape:
        raise ValueError(f"dy must have shape {out_shape} (the forward's output for these "
                         f"x, w, stride, padding and dilation), got {tuple(dy.shape)}")
    for flag, name in ((need_dx, "need_dx"), (need_dw, "need_dw")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    check_out(dx_out, x.shape, np.float32, like=x, name="dx_out")
    check_out(dw_out, w.shape, np.float32, like=x, name="dw_out")
    queue = runtime.resolve_queue(queue, dy=dy, x=x, w=w, mask=mask, dx_out=dx_out,
                                  dw_out=dw_out)
    check_int32_sizes(x=int(np.prod(x.shape)), dy=int(np.prod(out_shape)),
                 packed=geom["N"] * geom["Hp"] * geom["Wp"] * (n_ch + 15))
    for size, what in ((x.size if need_dx else 0, "dx"), (w.size if need_dw else 0, "dw")):
        check_alloc(queue, 4 * size, what)   # both, by name, before either is allocated
    dx_params, dw_params = tuning.memoised("conv2d_masked_backward", queue.device, None,
                                           lambda look: (look(MASKED_CONV_DX),
                                                         look(MASKED_CONV_DW)))
    operands = (dy, x, w, mask)
    dx_dev = dw_dev = dx_host = dw_host = None
    if need_dx:
        dx_dev, dx_host = new_output(queue, tuple(x.shape), np.float32, dx_out, like=x,
                                     slot="dx", inputs=operands)
    if need_dw:
        dw_dev, dw_host = new_output(queue, tuple(w.shape), np.float32, dw_out, like=x,
                                     slot="dw", inputs=operands)
    if not dy.size:            # no output entries, so nothing selected: the gradients are 0
        for dev in (dx_dev, dw_dev):
            if dev is not None and dev.size:
                runtime.fill_array(queue, dev, 0)
    elif need_dx or need_dw:
        borrow = not is_device_array(x)   # a NumPy call waits for its results
        dy_dev = to_device(dy, queue, "dy", borrow)
        mask_dev = to_device(mask, queue, "mask", borrow)
        if need_dx and dx_dev.size:
            wk = masked_conv_dx.pack_weight(queue, dx_params, to_device(w, queue, "w", borrow),
                                            events)
            lists, counts = masked_conv_dx.selection_lists(queue, form, mask_dev, dy_dev,
                                                           geom, k_out, events)
            masked_conv_dx.launch(queue, dx_params, wk, lists, counts, dx_dev, geom, n_ch,
                                  k_out, r, s, events)
        if need_dw and dw_dev.size:
            xp = masked_conv_dw.pack_input(queue, dw_params, to_device(x, queue, "x", borrow),
                                           n_ch, geom, events)
            masked_conv_dw.launch(queue, dw_params, form, xp, mask_dev, dy_dev, dw_dev, geom,
                                  n_ch, k_out, r, s, events)
    dx = deliver(dx_dev, x, dx_out, queue, dx_host) if need_dx else None
    dw = deliver(dw_dev, x, dw_out, queue, dw_host) if need_dw else None
    return dx, dw
