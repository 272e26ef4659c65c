"""Output-masked products for DSG (Liu et al., ICLR 2019): kernels/masked_gemm.cl.mako.

``masked_matmul`` computes ``mask * (x @ w)`` touching only the selected outputs;
``masked_matmul_backward`` gives the matching gradients.  The weight is kept as W^T,
(N, K) row-major (:class:`MaskedLinearWeight`), so a selected output reads one contiguous
weight row.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from .. import runtime, tuning
from ..params import Choice, Constraint, ParamSpec, Routine, TileParam
from ._common import (
    INT32_MAX,
    check_alloc,
    check_out,
    deliver,
    elem_offset,
    int_pair,
    is_device_array,
    new_output,
    require_array,
    round_up,
    to_device,
)
from ._prepared import PreparedCache
from .conv2d import conv2d_output_shape

__all__ = ["MASKED_VMM", "MASKED_VMM_SPLIT", "MASKED_VMM_ROUTINE", "MASKED_GEMM",
           "MASKED_GEMM_TILED", "MASKED_GEMM_ROUTINE", "MASKED_DX", "MASKED_DW", "MASKED_BN",
           "MASKED_CONV", "MASKED_CONV_CH", "MaskedLinearWeight", "masked_matmul",
           "masked_matmul_backward", "masked_relu_bn", "conv2d_masked", "template_args"]

_VEC = TileParam("VEC", 16, (1, 4, 8, 16), "floats per vector load of a row (one FMA each)")


#: Local memory every OpenCL GPU and Oclgrind provide (the OpenCL minimum for a full
#: profile device): the GPU kernels stay inside it, so they build everywhere.  (The specs'
#: ``local_memory`` also lets the tuner and lookup drop configurations beyond a smaller
#: device's limit.)
LOCAL_MEM_BYTES = 32 * 1024


def vmm_local_bytes(p) -> int:
    """Local memory of the split VMM: the staged x and the reduction tree."""
    return 4 * (p["XCHUNK"] + p["GROUP"] * p["SPLIT"] * p["TEAMS"])


# The VMM and the GEMM each have a CPU-shaped and a GPU-shaped kernel, each with its own
# spec; the routines below choose between them.

MASKED_VMM = ParamSpec(
    family="masked_vmm",
    params=(
        _VEC,
        TileParam("GROUP", 4, (1, 2, 4, 8),
                  "selected outputs computed together, sharing each load of the x row"),
        TileParam("CHUNK", 128, (8, 16, 32, 64, 128, 256, 512),
                  "mask columns (or idx slots) scanned by one work-item"),
        TileParam("WG", 1, (1, 2, 4, 8, 16, 32, 64, 128), "work-items per work-group"),
    ),
    constraints=(
        Constraint("group_within_chunk", lambda p: p["GROUP"] <= p["CHUNK"],
                   "a work-item cannot fill a group larger than the entries it scans"),
    ),
    work_group_size=lambda p: p["WG"],
)

MASKED_VMM_SPLIT = ParamSpec(
    family="masked_vmm_split",
    params=(
        TileParam("VEC", 8, (1, 4, 8, 16), "floats per vector load of a weight row"),
        TileParam("GROUP", 2, (1, 2, 4, 8),
                  "selected outputs computed together by a team, sharing each load of x"),
        TileParam("SPLIT", 64, (16, 32, 64, 128, 256),
                  "work-items sharing one selected output's dot product (coalesced row "
                  "loads)"),
        TileParam("TEAMS", 4, (1, 2, 4, 8), "teams of SPLIT work-items per work-group"),
        TileParam("XCHUNK", 4096, (512, 1024, 2048, 4096),
                  "floats of the x row staged in local memory per step"),
    ),
    constraints=(
        Constraint("split_vectors_fit_chunk",
                   lambda p: p["XCHUNK"] % (p["VEC"] * p["SPLIT"]) == 0,
                   "every team item reads the same number of vectors of a staged piece of x"),
        Constraint("local_memory", lambda p: vmm_local_bytes(p) <= LOCAL_MEM_BYTES,
                   "the staged x and the reduction tree fit 32 KiB of local memory"),
    ),
    work_group_size=lambda p: p["SPLIT"] * p["TEAMS"],
    local_memory=vmm_local_bytes,
)

MASKED_VMM_ROUTINE = Routine(
    "masked_vmm",
    (Choice("KERNEL", (MASKED_VMM, MASKED_VMM_SPLIT),
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


def gemm_local_bytes(p) -> int:
    """Local memory of the tiled GEMM: one buffer holds, in turn, the tile's selection bits
    beside the row scan, a round's units (row, count and GROUP columns, a byte each) and the
    staged x and W^T chunks.  (The template sizes its buffer from this.)"""
    staged = 4 * p["KC"] * (p["TILE_M"] + p["TILE"])
    units = p["WG"] * p["UNITS"] * (2 + p["GROUP"])
    selection = 4 * p["WG"] + p["TILE_M"] * p["TILE"] // 8
    return max(staged, -(-selection // 16) * 16, -(-units // 16) * 16)


MASKED_GEMM = ParamSpec(
    family="masked_gemm",
    params=(
        _VEC,
        TileParam("GROUP", 4, (1, 2, 4, 8),
                  "selected outputs computed together: the x rows selecting one column, "
                  "sharing each load of its weight row"),
        TileParam("BLOCK_KIB", 2048, (0, 128, 256, 512, 1024, 2048, 4096),
                  "x rows per block, sized to about this many KiB of x, so that the block "
                  "stays in cache while every column passes over it; 0: a single block"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64, 128),
                  "work-items per work-group, one column each"),
    ),
    work_group_size=lambda p: p["WG"],
)

MASKED_GEMM_TILED = ParamSpec(
    family="masked_gemm_tiled",
    params=(
        TileParam("GROUP", 2, (1, 2, 4, 8),
                  "selected columns of one row in a unit, sharing each load of x"),
        TileParam("WG", 512, (128, 256, 512), "work-items sharing an output tile"),
        TileParam("TILE", 64, (32, 64, 128), "columns of an output tile"),
        TileParam("TILE_M", 128, (16, 32, 64, 128), "rows of an output tile"),
        TileParam("KC", 32, (32, 64),
                  "K columns of x and W^T staged in local memory per step"),
        TileParam("UNITS", 1, (1, 2, 4), "units (GROUP columns of one row) per work-item "
                  "and round"),
        TileParam("SPLITK", 2, (1, 2, 4),
                  "slices of K, one work-group each, whose partial sums a second kernel "
                  "adds in slice order: more work-groups for few tiles"),
        TileParam("DENSE", 35, (0, 25, 35, 50),
                  "a tile whose selected entries (counted in units) reach this percentage "
                  "of it is computed whole, blocked in registers, and only its selected "
                  "outputs written; 0: never"),
    ),
    constraints=(
        Constraint("row_owners", lambda p: p["TILE_M"] <= p["WG"],
                   "one work-item per tile row builds that row's units"),
        Constraint("accumulators_fit_registers", lambda p: p["UNITS"] * p["GROUP"] <= 16,
                   "a work-item's UNITS * GROUP sums stay in registers"),
        Constraint("dense_sums_fit_registers",
                   lambda p: p["DENSE"] == 0 or p["TILE_M"] * p["TILE"] <= 32 * p["WG"],
                   "a dense tile's sums, TILE_M * TILE / WG per work-item, stay in registers"),
        Constraint("staging_fits_registers",
                   lambda p: (p["TILE_M"] + p["TILE"]) * p["KC"] <= 32 * p["WG"],
                   "the next chunk, loaded during the FMAs, takes <= 32 registers per item"),
        Constraint("local_memory", lambda p: gemm_local_bytes(p) <= LOCAL_MEM_BYTES,
                   "the staged chunks (or the scan, or the units) fit 32 KiB of local "
                   "memory"),
    ),
    work_group_size=lambda p: p["WG"],
    local_memory=gemm_local_bytes,
)

MASKED_GEMM_ROUTINE = Routine(
    "masked_gemm",
    (Choice("KERNEL", (MASKED_GEMM, MASKED_GEMM_TILED),
            "the GEMM's kernel: columns streamed over cached row blocks (CPUs), or output "
            "tiles staged through local memory (GPUs)"),),
)

MASKED_DX = ParamSpec(
    family="masked_dx",
    params=(
        _VEC,
        TileParam("KVEC", 16, (1, 2, 4, 8, 16), "vectors of dx's row per work-item (a K chunk)"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64), "rows per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)

MASKED_DW = ParamSpec(
    family="masked_dw",
    params=(
        _VEC,
        TileParam("KVEC", 8, (1, 2, 4, 8, 16), "vectors of dw's row of W^T per work-item"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64), "columns per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)

MASKED_BN = ParamSpec(
    family="masked_bn",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "elements per vector (pixels, or FC channels)"),
        TileParam("WG", 8, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)

MASKED_CONV = ParamSpec(
    family="masked_conv",
    params=(
        _VEC,
        TileParam("GROUP", 4, (1, 2, 4, 8),
                  "selected pixels of one channel computed together, sharing each weight load"),
        TileParam("BLOCK_PIX", 512, (64, 128, 256, 512, 1024, 2048, 4096),
                  "output pixels (n, oh, ow) per work-item; every channel passes over them"),
        TileParam("WG", 16, (1, 2, 4, 8, 16, 32, 64), "output channels per work-group"),
    ),
    work_group_size=lambda p: p["WG"],
)

MASKED_CONV_CH = ParamSpec(
    family="masked_conv_channels",
    params=(
        _VEC,
        TileParam("PIX", 4, (1, 2, 4, 8), "output pixels per work-item (each w load feeds them)"),
        TileParam("KB", 4, (1, 2, 4), "selected channels per work-item (each x load feeds them)"),
        TileParam("WG", 4, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
    ),
    constraints=(
        Constraint("accumulators_fit_registers", lambda p: p["PIX"] * p["KB"] <= 16,
                   "PIX * KB vector accumulators must fit the register file"),
    ),
    work_group_size=lambda p: p["WG"],
)

TRANSPOSE_WG = 4      # 16 x 16 tiles per transpose work-group


ZERO_CHUNK = 4096     # floats zeroed per work-item before the column kernel (bool masks)


def template_args(kind: str, params=None, mask: str = "bool") -> dict:
    """Everything masked_gemm.cl.mako renders from, for one ``kind`` of kernel: its family's
    tile parameters, the variants the wrappers choose per call and derived sizes."""
    if kind == "util":
        return dict(KIND="util")
    derived = {"LDS_F4": gemm_local_bytes(params) // 16} if kind == "gemm_tiled" else {}
    # Variants the wrappers choose per call (not tile parameters); off unless given.
    return {"ZEROED": 0, "MASK_ALIGNED": 0, "LIST_IN_KERNEL": 0, **params, **derived,
            "KIND": kind, "MASK": mask, "ZERO_CHUNK": ZERO_CHUNK}


# ---------------------------------------------------------------------------------------------
# The prepared weight

def row_stride(k_in: int) -> int:
    """The row stride of prepared (N, K) weight rows: K, plus one cache line when rows would
    be a multiple of 4 KiB apart (their K chunks would then share cache sets and evict one
    another in the backward's dx)."""
    return k_in + 16 if k_in and k_in % 1024 == 0 else k_in


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
        seen by later products.
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
                rows = w if not w.offset else w.copy(queue=self.queue)
                ld = k_in
            else:
                ld = row_stride(k_in)
                host = np.zeros((n_out, ld), np.float32)
                host[:, :k_in] = w
                rows = cl_array.to_device(self.queue, host,
                                          allocator=runtime.memory_pool(self.queue.context))
        else:
            k_in, n_out = w.shape
            rows, ld = _weight_rows(w, k_in, self.queue, None)
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


def _transpose_on_device(queue, src: cl_array.Array, events, into=None, ld_dst=None):
    """(R, C) contiguous device array -> (C, ld_dst) device array (new, or ``into``):
    dst[c, r] = src[r, c]; columns r >= R of a wider destination are left as they are."""
    n_rows, n_cols = src.shape
    ld_dst = n_rows if ld_dst is None else ld_dst
    out = into if into is not None else cl_array.zeros(
        queue, (n_cols, ld_dst), np.float32, allocator=runtime.memory_pool(queue.context))
    if src.size:
        kern = runtime.kernels(queue.context, "masked_gemm.cl.mako", ("pscl_transpose",),
                               **template_args("util"))["pscl_transpose"]
        ev = kern(queue, (round_up(-(-n_cols // 16), TRANSPOSE_WG), -(-n_rows // 16)),
                  (TRANSPOSE_WG, 1), src.base_data, elem_offset(src), np.int32(n_cols),
                  out.data, np.int64(0), np.int32(ld_dst), np.int32(n_rows), np.int32(n_cols),
                  wait_for=(list(src.events) + list(out.events)) or None)
        out.add_event(ev)
        if events is not None:
            events.append(ev)
    return out


def _weight_rows(w, k_in: int, queue, events, name: str = "w"):
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
        return _transpose_on_device(queue, w, events, ld_dst=ld), ld

    def upload():
        host = np.zeros((w.shape[1], ld), np.float32)
        host[:, :k_in] = np.asarray(w).T
        return cl_array.to_device(queue, host, allocator=runtime.memory_pool(queue.context)), ld
    return _DENSE_ROWS.get(w, (w,), queue.context.int_ptr, upload)


#: Device rows (N, ld) prepared for the NumPy weights passed to the masked products.
_DENSE_ROWS = PreparedCache("masked product weights")


def _weight_shape(w, name: str = "w") -> Tuple[int, int]:
    """(K, N) of a MaskedLinearWeight or a (K, N) float32 array (checked)."""
    if isinstance(w, MaskedLinearWeight):
        return w.shape
    require_array(w, name, np.float32, ndim=2)
    return tuple(w.shape)


# ---------------------------------------------------------------------------------------------
# Masks

class _Selection:
    """A validated mask: its form, (M, N), the entries per row and the device array."""

    def __init__(self, form: str, n_rows: int, n_cols: int, n_entries: int, array):
        self.form = form            # "bool" or "idx"
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.n_entries = n_entries  # N for a bool mask, n_keep for idx
        self.array = array          # as given (NumPy or device)


def check_mask(mask, n_rows: int, n_cols: int, vector: bool, name: str = "mask"
               ) -> _Selection:
    """Validate a bool (M, N) mask or a compact int32 (M, n_keep) index mask.

    Host index masks are checked here (range, duplicates); device ones are checked on the
    device when they are first used (see :func:`_idx_slots`).
    """
    if not isinstance(mask, (np.ndarray, cl_array.Array)):
        raise TypeError(f"{name} must be a numpy.ndarray or pyopencl.array.Array (bool mask "
                        f"or int32 column indices), got {type(mask).__name__}")
    if mask.dtype == np.bool_:
        form = "bool"
    elif mask.dtype == np.int32:
        form = "idx"
    else:
        raise TypeError(f"{name} must have dtype bool (a (M, N) mask) or int32 (compact "
                        f"(M, n_keep) column indices), got {mask.dtype}")
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
    return _Selection(form, n_rows, n_cols, n_keep, mask)


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


def _idx_slots(queue, idx_dev: cl_array.Array, n_rows: int, n_cols: int, n_keep: int,
               events) -> Tuple[cl_array.Array, cl_array.Array]:
    """The (M, N) slot map of a compact index mask, and a 2-int flag array that records
    the first row with an out-of-range value and the first with a repeated column."""
    alloc = runtime.memory_pool(queue.context)
    check_alloc(queue, 4 * n_rows * n_cols, "the slot map of the index mask")
    slots = runtime.empty(queue, (n_rows, n_cols), np.int32, allocator=alloc)
    bad = runtime.empty(queue, (2,), np.int32, allocator=alloc)
    fill_events = [cl.enqueue_fill_buffer(queue, slots.data, np.int32(-1), 0, slots.nbytes),
                   cl.enqueue_fill_buffer(queue, bad.data, np.int32(INT32_MAX), 0, bad.nbytes)]
    kern = runtime.kernels(queue.context, "masked_gemm.cl.mako", ("pscl_idx_slots",),
                           **template_args("util"))["pscl_idx_slots"]
    wg = 16
    ev = kern(queue, (round_up(n_keep, wg), n_rows), (wg, 1), idx_dev.base_data,
              elem_offset(idx_dev), slots.data, bad.data, np.int32(n_rows),
              np.int32(n_cols), np.int32(n_keep),
              wait_for=fill_events + list(idx_dev.events))
    slots.add_event(ev)
    if events is not None:
        events.append(ev)
    return slots, bad


def _raise_if_bad(queue, bad: cl_array.Array, n_cols: int, name: str) -> None:
    """Read the device validation flags (a synchronisation) and raise on a bad index."""
    flags = bad.get(queue=queue)
    if flags[0] != INT32_MAX:
        raise ValueError(f"{name} (int32 indices) must lie in [0, {n_cols}); row {flags[0]} "
                         "holds a value outside that range")
    if flags[1] != INT32_MAX:
        raise ValueError(f"{name} (int32 indices) repeats a column in row {flags[1]}; each "
                         "row's indices must be distinct")


# ---------------------------------------------------------------------------------------------
# Forward

def _check_sizes(**sizes) -> None:
    for what, n in sizes.items():
        if n > INT32_MAX:
            raise ValueError(f"{what} has {n} elements, more than int32 indexing allows")


def masked_matmul(x, w, mask, *, out=None, queue=None, events=None):
    """Output-masked matrix product: ``mask * (x @ w)``, computing only selected outputs.

    Parameters
    ----------
    x : numpy.ndarray or pyopencl.array.Array, float32, shape (M, K) or (K,)
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
        costs one 8-byte read back (a synchronisation) per call.
    out : array of the result's shape, float32, optional; the same container kind as x.
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
    that operands up to 256 KiB go through a staging buffer the thread keeps (a memcpy);
    elsewhere they are copied to and from the device.  A NumPy call returns when its
    result is ready; a device-array call returns once it is enqueued.

    Notes
    -----
    With one row (M == 1 or a 1-D ``x``) a VMM kernel runs, otherwise a GEMM kernel; each
    comes in two shapes, chosen by the tuning database for the device and shape class
    (``SPLIT`` of ``masked_vmm``, ``TILE`` of ``masked_gemm``).  CPU-shaped: the VMM keeps
    the x row in cache while each selected output streams one weight row; the GEMM works
    column by column within blocks of rows, so a weight row is read once per block and
    shared by every row of the block that selects it.  GPU-shaped: a team of work-items
    shares each selected output of the VMM, reading its weight row coalesced; a GEMM
    work-group owns an output tile, stages chunks of x and W^T in local memory and
    computes only the tile's selected outputs.
    """
    require_array(x, "x", np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"x must be 1-D (K,) or 2-D (M, K), got shape {tuple(x.shape)}")
    vector = x.ndim == 1
    n_rows, k_in = (1, x.shape[0]) if vector else x.shape
    wk, n_cols = _weight_shape(w)
    if wk != k_in:
        raise ValueError(f"w must have shape (K, N) with K = {k_in} (the columns of x), got "
                         f"{(wk, n_cols)}")
    sel = check_mask(mask, n_rows, n_cols, vector)
    out_shape = (sel.n_entries,) if vector else (n_rows, sel.n_entries)
    check_out(out, out_shape, np.float32, like=x)
    if queue is None and isinstance(w, MaskedLinearWeight) and not is_device_array(x):
        queue = w.queue
    queue = runtime.resolve_queue(queue, x=x, w=w if is_device_array(w) else None, mask=mask,
                                  out=out)
    _check_sizes(x=n_rows * k_in, w=k_in * n_cols, mask=n_rows * n_cols)
    if not is_device_array(x):  # refuse an oversized x before the output is allocated
        check_alloc(queue, x.nbytes, "x")

    out_dev, host = new_output(queue, out_shape, np.float32, out, like=x)
    if out_dev.size and k_in == 0:
        out_dev.fill(np.float32(0), queue=queue)   # every dot product is empty
    elif out_dev.size:
        rows, ldw = _weight_rows(w, k_in, queue, events)
        borrow = not is_device_array(x)   # a NumPy call waits for its result
        x_dev = to_device(x, queue, "x", borrow)
        mask_dev = to_device(mask, queue, "mask", borrow)
        _launch_forward(queue, x_dev, rows, ldw, sel, mask_dev, out_dev, n_rows, n_cols,
                        k_in, events)
    return deliver(out_dev, x, out, queue, host)


def _launch_forward(queue, x_dev, rows, ldw, sel: _Selection, mask_dev, out_dev, n_rows,
                    n_cols, k_in, events) -> None:
    ctx = queue.context
    wait = list(x_dev.events) + list(rows.events) + list(mask_dev.events) + list(out_dev.events)
    bad = None
    if sel.form == "idx" and (is_device_array(sel.array) or n_rows > 1):
        # The column-oriented kernel needs the slot map; a device idx needs validating.
        slots, bad = _idx_slots(queue, mask_dev, n_rows, n_cols, sel.n_entries, events)
        wait += list(slots.events)
    if n_rows == 1:
        shape_class = masked_matmul_shape_class(n_rows, k_in, n_cols)
        routine = tuning.lookup(MASKED_VMM_ROUTINE.spec, queue.device, shape_class)
        spec = MASKED_VMM_ROUTINE.variant(routine, "KERNEL")
        params = tuning.lookup(spec, queue.device, shape_class)
        if spec is MASKED_VMM_SPLIT:
            ev = _launch_vmm_split(queue, params, x_dev, rows, ldw, sel, mask_dev, out_dev,
                                   n_cols, k_in, wait, events,
                                   routine["LIST_IN_KERNEL_MAX_N"])
        else:
            kern = runtime.kernels(ctx, "masked_gemm.cl.mako", ("pscl_masked_vmm",),
                                   **template_args("vmm", params, sel.form))["pscl_masked_vmm"]
            n_items = -(-sel.n_entries // params["CHUNK"])
            ev = kern(queue, (round_up(n_items, params["WG"]), 1), (params["WG"], 1),
                      x_dev.base_data, elem_offset(x_dev), rows.data, mask_dev.base_data,
                      elem_offset(mask_dev), out_dev.base_data, elem_offset(out_dev),
                      np.int32(n_cols), np.int32(k_in), np.int32(ldw),
                      np.int32(sel.n_entries), wait_for=wait or None)
    else:
        shape_class = masked_matmul_shape_class(n_rows, k_in, n_cols)
        routine = tuning.lookup(MASKED_GEMM_ROUTINE.spec, queue.device, shape_class)
        spec = MASKED_GEMM_ROUTINE.variant(routine, "KERNEL")
        params = tuning.lookup(spec, queue.device, shape_class)
        form = "bool" if sel.form == "bool" else "slot"
        sel_buf, sel_off = ((mask_dev.base_data, elem_offset(mask_dev)) if form == "bool"
                            else (slots.data, np.int64(0)))
        if spec is MASKED_GEMM_TILED:
            ev = _launch_gemm_tiled(queue, params, form, x_dev, rows, ldw, sel_buf, sel_off,
                                    out_dev, n_rows, n_cols, k_in, sel.n_entries, wait,
                                    events)
        else:
            # A bool mask's zeros are written by a row-major pass first (see the template).
            zeroed = form == "bool"
            names = ("pscl_masked_gemm",) + (("pscl_zero_fill",) if zeroed else ())
            kerns = runtime.kernels(ctx, "masked_gemm.cl.mako", names,
                                    **template_args("gemm", dict(params, ZEROED=int(zeroed)),
                                                    form))
            kern = kerns["pscl_masked_gemm"]
            if zeroed:
                ev = kerns["pscl_zero_fill"](
                    queue, (-(-out_dev.size // ZERO_CHUNK),), None, out_dev.base_data,
                    elem_offset(out_dev), np.int64(out_dev.size), wait_for=wait or None)
                wait = [ev]                   # it waited for everything before it
                if events is not None:
                    events.append(ev)
            block = rows_per_block(params, n_rows, k_in)
            # (Padding x's rows, as the backward does, measured no gain here.)
            ev = kern(queue, (round_up(n_cols, params["WG"]), -(-n_rows // block)),
                      (params["WG"], 1), x_dev.base_data, elem_offset(x_dev), rows.data,
                      sel_buf, sel_off, out_dev.base_data, elem_offset(out_dev),
                      np.int32(n_rows), np.int32(n_cols), np.int32(k_in), np.int32(k_in),
                      np.int32(ldw),
                      np.int32(sel.n_entries), np.int32(block), wait_for=wait or None)
    out_dev.add_event(ev)
    if events is not None:
        events.append(ev)
    if bad is not None and is_device_array(sel.array):
        _raise_if_bad(queue, bad, n_cols, "mask")


def _launch_gemm_tiled(queue, params, form, x_dev, rows, ldw, sel_buf, sel_off, out_dev,
                       n_rows, n_cols, k_in, out_cols, wait, events):
    """The tiled GEMM; with SPLITK > 1 each K slice writes its partial sums to a scratch
    array that a second kernel adds up.  Returns the event of the last kernel."""
    ctx = queue.context
    kc, split = params["KC"], params["SPLITK"]
    k_len = round_up(-(-k_in // split), kc)        # whole chunks per slice
    n_slices = -(-k_in // k_len)                   # none of them empty
    names = ("pscl_masked_gemm_tiled",) + (("pscl_gemm_splitk_sum",) if split > 1 else ())
    # Whole float4 staging loads need every x and wt row, and K, to be float4-aligned;
    # whole 16-entry loads of the selection need its rows and offset to be 16-aligned.
    aligned = k_in % 4 == 0 and ldw % 4 == 0 and elem_offset(x_dev) % 4 == 0
    mask_aligned = n_cols % 16 == 0 and int(sel_off) % 16 == 0
    kerns = runtime.kernels(ctx, "masked_gemm.cl.mako", names,
                            **template_args("gemm_tiled", dict(params, ALIGNED=int(aligned),
                                                               MASK_ALIGNED=int(mask_aligned)),
                                            form))
    total = n_rows * out_cols
    if split > 1:
        check_alloc(queue, 4 * n_slices * total, "the split-K partial sums")
        part = runtime.empty(queue, (n_slices * total,), np.float32,
                             allocator=runtime.memory_pool(ctx))
        dest = (part.data, np.int64(total))
    else:
        dest = (out_dev.base_data, elem_offset(out_dev))
    ev = kerns[names[0]](
        queue, (-(-n_cols // params["TILE"]) * params["WG"], -(-n_rows // params["TILE_M"]),
                n_slices), (params["WG"], 1, 1),
        x_dev.base_data, elem_offset(x_dev), rows.data, sel_buf, sel_off, *dest,
        np.int32(n_rows), np.int32(n_cols), np.int32(k_in), np.int32(k_in), np.int32(ldw),
        np.int32(out_cols), np.int32(k_len), wait_for=wait or None)
    if split == 1:
        return ev
    if events is not None:
        events.append(ev)
    mask_args = (sel_buf, sel_off) if form == "bool" else ()
    wg = 256
    return kerns[names[1]](queue, (round_up(total, wg),), (wg,), part.data, np.int64(total),
                           np.int32(n_slices), *mask_args, out_dev.base_data,
                           elem_offset(out_dev), np.int64(total), wait_for=[ev])


def _launch_vmm_split(queue, params, x_dev, rows, ldw, sel: _Selection, mask_dev, out_dev,
                      n_cols, k_in, wait, events, list_in_kernel_max_n):
    """The split VMM (one row).  A bool mask is compacted into its list of selected columns
    (which also writes the zeros): inside the product's kernel up to
    ``list_in_kernel_max_n`` columns (a routine setting), else by a kernel of its own
    first; an index mask is that list already.  Returns the product's event."""
    ctx = queue.context
    in_kernel = sel.form == "bool" and n_cols <= list_in_kernel_max_n
    if in_kernel:
        list_args = (mask_dev.base_data, elem_offset(mask_dev))
    elif sel.form == "bool":
        alloc = runtime.memory_pool(ctx)
        cols = runtime.empty(queue, (n_cols,), np.int32, allocator=alloc)
        counts = runtime.empty(queue, (1,), np.int32, allocator=alloc)
        compact = runtime.kernels(ctx, "masked_gemm.cl.mako", ("pscl_bool_compact",),
                                  **template_args("util"))["pscl_bool_compact"]
        ev = compact(queue, (256,), (256,), mask_dev.base_data, elem_offset(mask_dev),
                     cols.data, counts.data, out_dev.base_data, elem_offset(out_dev),
                     np.int32(n_cols), wait_for=wait or None)
        wait = [ev]
        if events is not None:
            events.append(ev)
        list_args = (cols.data, np.int64(0), counts.data)
    else:
        list_args = (mask_dev.base_data, elem_offset(mask_dev))
    name = "pscl_masked_vmm_split"
    aligned = ldw % params["VEC"] == 0          # weight rows start at whole vectors
    kern = runtime.kernels(ctx, "masked_gemm.cl.mako", (name,),
                           **template_args("vmm_split", dict(params, ALIGNED=int(aligned),
                                                             LIST_IN_KERNEL=int(in_kernel)),
                                           sel.form))[name]
    items = params["SPLIT"] * params["TEAMS"]
    groups = -(-sel.n_entries // (params["TEAMS"] * params["GROUP"]))
    return kern(queue, (groups * items, 1), (items, 1), x_dev.base_data, elem_offset(x_dev),
                rows.data, *list_args, out_dev.base_data, elem_offset(out_dev),
                np.int32(n_cols), np.int32(k_in), np.int32(ldw), np.int32(sel.n_entries),
                wait_for=wait or None)


def _padded_rows(queue, a_dev, n_rows, k_in, wait, events):
    """(buffer, element offset, row stride) of the (n_rows, k_in) device array ``a_dev``,
    copied with padded rows when they are a multiple of 4 KiB apart and large: rows that
    far apart share cache sets, so the rows a kernel keeps in cache would evict one another.
    The copy, one pass over the array, costs less than those misses."""
    ld = row_stride(k_in)
    if ld == k_in or n_rows * k_in * 4 <= (1 << 20):
        return a_dev.base_data, elem_offset(a_dev), k_in
    padded = runtime.empty(queue, (n_rows, ld), np.float32,
                           allocator=runtime.memory_pool(queue.context))
    ev = cl.enqueue_copy(queue, padded.data, a_dev.base_data, src_origin=(a_dev.offset, 0, 0),
                         dst_origin=(0, 0, 0), region=(4 * k_in, n_rows, 1),
                         src_pitches=(4 * k_in, 0), dst_pitches=(4 * ld, 0),
                         wait_for=wait or None)
    padded.add_event(ev)
    wait.append(ev)
    if events is not None:
        events.append(ev)
    return padded.data, np.int64(0), ld


def rows_per_block(params, n_rows: int, k_in: int) -> int:
    """x rows per block of the column-oriented kernel: about BLOCK_KIB KiB of x."""
    if params["BLOCK_KIB"] == 0:
        return max(1, n_rows)
    rows = max((params["BLOCK_KIB"] * 1024) // max(1, 4 * k_in), params["GROUP"], 1)
    n_blocks = -(-n_rows // rows)
    return max(1, -(-n_rows // n_blocks))   # equal blocks: no small last block


# ---------------------------------------------------------------------------------------------
# Backward

def masked_matmul_backward(dy, x, w, mask, *, queue=None, events=None):
    """Gradients of ``y = mask * (x @ w)`` with the mask held constant.

    Returns ``(dx, dw)`` with ``dx = (mask * dy) @ w.T`` and ``dw = x.T @ (mask * dy)``.
    Both use only the selected entries: a row of dx sums the weight rows (N, K layout) of
    its selected outputs, and a column of dw sums the rows of x that select it.

    Parameters
    ----------
    dy : float32 array, the gradient of y in the form ``masked_matmul`` returned y: dense
        (M, N) for a bool mask (its unselected entries are ignored), compact (M, n_keep)
        for int32 indices; 1-D for a 1-D ``x``.
    x : float32 array (M, K) or (K,).
    w : float32 array (K, N) or a :class:`MaskedLinearWeight`.
    mask : bool (M, N) or int32 (M, n_keep) column indices, as for :func:`masked_matmul`.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    dx : float32, the shape of ``x``.
    dw : float32 (K, N), the shape of ``w`` in ``x @ w`` (also for a MaskedLinearWeight).
    Both in the kind of container ``x`` came in.

    A NumPy ``w`` is kept as device rows while it is unchanged (see :func:`masked_matmul`).
    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends its inputs and its new results to the kernels in place, with no copy, except
    that operands up to 256 KiB go through a staging buffer the thread keeps (a memcpy);
    elsewhere they are copied to and from the device.  A NumPy call returns when its
    result is ready; a device-array call returns once it is enqueued.
    """
    require_array(x, "x", np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"x must be 1-D (K,) or 2-D (M, K), got shape {tuple(x.shape)}")
    vector = x.ndim == 1
    n_rows, k_in = (1, x.shape[0]) if vector else x.shape
    wk, n_cols = _weight_shape(w)
    if wk != k_in:
        raise ValueError(f"w must have shape (K, N) with K = {k_in} (the columns of x), got "
                         f"{(wk, n_cols)}")
    sel = check_mask(mask, n_rows, n_cols, vector)
    require_array(dy, "dy", np.float32)
    dy_shape = (sel.n_entries,) if vector else (n_rows, sel.n_entries)
    if tuple(dy.shape) != dy_shape:
        raise ValueError(f"dy must have shape {dy_shape} (the shape of masked_matmul's result "
                         f"for this mask), got {tuple(dy.shape)}")
    if queue is None and isinstance(w, MaskedLinearWeight) and not is_device_array(x):
        queue = w.queue
    queue = runtime.resolve_queue(queue, x=x, dy=dy, w=w if is_device_array(w) else None,
                                  mask=mask)
    _check_sizes(x=n_rows * k_in, w=k_in * n_cols, mask=n_rows * n_cols)
    for size, what in ((n_rows * k_in, "dx"), (k_in * n_cols, "dw")):
        check_alloc(queue, 4 * size, what)   # both, by name, before either is allocated
    dx_dev, dx_host = new_output(queue, tuple(x.shape), np.float32, None, like=x, zeros=True,
                                 slot="dx")
    dw_dev, dw_host = new_output(queue, (k_in, n_cols), np.float32, None, like=x, zeros=True,
                                 slot="dw")
    if n_rows and k_in and n_cols and sel.n_entries:
        rows, ldw = _weight_rows(w, k_in, queue, events)
        borrow = not is_device_array(x)   # a NumPy call waits for its result
        x_dev = to_device(x, queue, "x", borrow)
        dy_dev = to_device(dy, queue, "dy", borrow)
        mask_dev = to_device(mask, queue, "mask", borrow)
        _launch_backward(queue, dy_dev, x_dev, rows, ldw, sel, mask_dev, dx_dev, dw_dev,
                         n_rows, n_cols, k_in, events)
    return (deliver(dx_dev, x, None, queue, dx_host),
            deliver(dw_dev, x, None, queue, dw_host))


def _launch_backward(queue, dy_dev, x_dev, rows, ldw, sel: _Selection, mask_dev, dx_dev,
                     dw_dev, n_rows, n_cols, k_in, events) -> None:
    ctx = queue.context
    alloc = runtime.memory_pool(ctx)
    util = runtime.kernels(ctx, "masked_gemm.cl.mako",
                           ("pscl_bool_rows", "pscl_cols_list_bool", "pscl_cols_list_slot"),
                           **template_args("util"))
    wait = [e for a in (dy_dev, x_dev, rows, mask_dev, dx_dev, dw_dev) for e in a.events]
    list_events = []
    bad = None
    # Lists of the selection, built once: each row's columns (dx), each column's rows (dw).
    check_alloc(queue, 8 * n_rows * n_cols, "the backward's column lists")
    col_rows = runtime.empty(queue, (n_cols, n_rows, 2), np.int32, allocator=alloc)
    col_counts = runtime.empty(queue, (n_cols,), np.int32, allocator=alloc)
    if sel.form == "idx":
        slots, bad = _idx_slots(queue, mask_dev, n_rows, n_cols, sel.n_entries, events)
        wait += list(slots.events)
        row_cols, row_cols_off, row_counts = mask_dev.base_data, elem_offset(mask_dev), None
        cols_list, sel_buf, sel_off = util["pscl_cols_list_slot"], slots.data, np.int64(0)
    else:
        row_list = runtime.empty(queue, (n_rows, n_cols), np.int32, allocator=alloc)
        row_counts = runtime.empty(queue, (n_rows,), np.int32, allocator=alloc)
        list_events.append(util["pscl_bool_rows"](
            queue, (n_rows,), None, mask_dev.base_data, elem_offset(mask_dev), row_list.data,
            row_counts.data, np.int32(n_rows), np.int32(n_cols), wait_for=wait or None))
        row_cols, row_cols_off = row_list.data, np.int64(0)
        cols_list = util["pscl_cols_list_bool"]
        sel_buf, sel_off = mask_dev.base_data, elem_offset(mask_dev)
    list_events.append(cols_list(
        queue, (-(-n_cols // 16),), None, sel_buf, sel_off, dy_dev.base_data,
        elem_offset(dy_dev), col_rows.data, col_counts.data, np.int32(n_rows),
        np.int32(n_cols), np.int32(sel.n_entries), wait_for=wait or None))
    wait += list_events

    params = tuning.lookup(MASKED_DX, queue.device)
    chunk = params["VEC"] * params["KVEC"]
    kern = runtime.kernels(ctx, "masked_gemm.cl.mako", ("pscl_masked_dx",),
                           **template_args("dx", params, sel.form))["pscl_masked_dx"]
    counts_arg = () if row_counts is None else (row_counts.data,)
    ev_dx = kern(queue, (round_up(n_rows, params["WG"]), -(-k_in // chunk)),
                 (params["WG"], 1), dy_dev.base_data, elem_offset(dy_dev), rows.data,
                 row_cols, row_cols_off, *counts_arg, dx_dev.data, np.int64(0),
                 np.int32(n_rows), np.int32(n_cols), np.int32(k_in), np.int32(ldw),
                 np.int32(sel.n_entries), wait_for=wait)
    dx_dev.add_event(ev_dx)
    params = tuning.lookup(MASKED_DW, queue.device)
    chunk = params["VEC"] * params["KVEC"]
    kern = runtime.kernels(ctx, "masked_gemm.cl.mako", ("pscl_masked_dw",),
                           **template_args("dw", params, sel.form))["pscl_masked_dw"]
    x_src, x_off, ldx = _padded_rows(queue, x_dev, n_rows, k_in, wait, list_events)
    dwt = runtime.empty(queue, (n_cols, k_in), np.float32, allocator=alloc)
    ev_dw = kern(queue, (round_up(n_cols, params["WG"]), -(-k_in // chunk)),
                 (params["WG"], 1), x_src, x_off, col_rows.data, col_counts.data, dwt.data,
                 np.int32(n_rows), np.int32(n_cols), np.int32(k_in), np.int32(ldx),
                 wait_for=wait)
    dwt.add_event(ev_dw)
    if events is not None:
        events.extend(list_events + [ev_dx, ev_dw])
    _transpose_on_device(queue, dwt, events, into=dw_dev)
    if bad is not None and is_device_array(sel.array):
        _raise_if_bad(queue, bad, n_cols, "mask")


# ---------------------------------------------------------------------------------------------
# Double-mask BatchNorm

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
    require_array(y, "y", np.float32)
    if y.ndim < 2:
        raise ValueError(f"y must be at least 2-D, (M, C) or (N, C, ...), got shape "
                         f"{tuple(y.shape)}")
    require_array(mask, "mask", np.bool_)
    if tuple(mask.shape) != tuple(y.shape):
        raise ValueError(f"mask must have y's shape {tuple(y.shape)}, got "
                         f"{tuple(mask.shape)}")
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
    for name, a in stats.items():
        require_array(a, name, np.float32, ndim=1)
        if a.shape != (n_ch,):
            raise ValueError(f"{name} must have shape ({n_ch},) (the channels, axis 1 of y),"
                             f" got {tuple(a.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or \
            not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    check_out(out, y.shape, np.float32, like=y)
    queue = runtime.resolve_queue(queue, y=y, mask=mask, out=out, **stats)
    outer, inner = y.shape[0], int(np.prod(y.shape[2:], dtype=np.int64))
    _check_sizes(y=outer * n_ch * inner)
    alloc = runtime.memory_pool(queue.context)
    out_dev, host = new_output(queue, tuple(y.shape), np.float32, out, like=y)
    borrow = not is_device_array(y)   # a NumPy call waits for its result
    # The kernels read the statistics from the start of their buffers.
    dev = {name: to_device(a, queue, name, borrow, at_offset=False) for name, a in stats.items()}
    if training:
        dev["mean"] = cl_array.zeros(queue, (n_ch,), np.float32, allocator=alloc)
        dev["var"] = cl_array.zeros(queue, (n_ch,), np.float32, allocator=alloc)
    if out_dev.size:
        y_dev = to_device(y, queue, "y", borrow)
        mask_dev = to_device(mask, queue, "mask", borrow)
        _launch_bn(queue, y_dev, mask_dev, dev, out_dev, outer, n_ch, inner, float(eps),
                   training, events)
    result = deliver(out_dev, y, out, queue, host)
    if not training:
        return result
    if is_device_array(y):
        return result, dev["mean"], dev["var"]
    return result, dev["mean"].get(queue=queue), dev["var"].get(queue=queue)


def _launch_bn(queue, y_dev, mask_dev, dev, out_dev, outer, n_ch, inner, eps, training,
               events) -> None:
    params = tuning.lookup(MASKED_BN, queue.device)
    channel_last = int(inner == 1)
    args = dict(params, CHANNEL_LAST=channel_last)
    wait = [e for a in (y_dev, mask_dev, out_dev, *dev.values()) for e in a.events]
    vec, wg = params["VEC"], params["WG"]
    if training:
        kern = runtime.kernels(queue.context, "masked_bn.cl.mako", ("pscl_masked_bn_stats",),
                               KIND="stats", **args)["pscl_masked_bn_stats"]
        items = -(-n_ch // vec) if channel_last else n_ch
        ev = kern(queue, (round_up(items, wg),), (wg,), y_dev.base_data, elem_offset(y_dev),
                  mask_dev.base_data, elem_offset(mask_dev), dev["mean"].data,
                  dev["var"].data, np.int32(outer), np.int32(n_ch), np.int32(inner),
                  wait_for=wait or None)
        wait.append(ev)
        if events is not None:
            events.append(ev)
    kern = runtime.kernels(queue.context, "masked_bn.cl.mako", ("pscl_masked_bn_apply",),
                           KIND="apply", **args)["pscl_masked_bn_apply"]
    n_rows, row_len = (outer, n_ch) if channel_last else (outer * n_ch, inner)
    ev = kern(queue, (round_up(-(-row_len // vec), wg), n_rows), (wg, 1), y_dev.base_data,
              elem_offset(y_dev), mask_dev.base_data, elem_offset(mask_dev),
              dev["gamma"].data, dev["beta"].data, dev["mean"].data, dev["var"].data,
              out_dev.base_data, elem_offset(out_dev), np.int32(n_rows), np.int32(row_len),
              np.int32(n_ch), np.float32(eps), wait_for=wait or None)
    out_dev.add_event(ev)
    if events is not None:
        events.append(ev)


# ---------------------------------------------------------------------------------------------
# Masked convolution

def conv_template_args(kind: str, params=None) -> dict:
    """Everything masked_conv.cl.mako renders from, for one ``kind`` of kernel."""
    if kind == "pack":
        return dict(KIND="pack")
    spec = {"general": MASKED_CONV, "channels": MASKED_CONV_CH}[kind]
    return dict(params if params is not None else spec.defaults(), KIND=kind)


def _conv_geometry(x, k_out, r, s, stride, padding, dilation):
    stride = int_pair(stride, "stride", 1)
    padding = int_pair(padding, "padding", 0)
    dilation = int_pair(dilation, "dilation", 1)
    n, _, h, w = x.shape
    oh, ow = conv2d_output_shape((h, w), (r, s), stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output size would be {oh}x{ow} for input {h}x{w}, kernel {r}x{s}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}; it must "
                         "be positive")
    return dict(N=n, H=h, W=w, OH=oh, OW=ow, Hp=h + 2 * padding[0], Wp=w + 2 * padding[1],
                stride=stride, padding=padding, dilation=dilation)


def _pack_conv_input(queue, x_dev, n_ch, geom, events):
    """x (N, C, H, W) -> zero-padded NHWC (N, Hp, Wp, C) on the device."""
    size = geom["N"] * geom["Hp"] * geom["Wp"] * n_ch
    check_alloc(queue, 4 * size, "the packed input")
    xp = runtime.empty(queue, (max(size, 1),), np.float32,
                       allocator=runtime.memory_pool(queue.context))
    kern = runtime.kernels(queue.context, "masked_conv.cl.mako", ("pscl_conv_pack",),
                           **conv_template_args("pack"))["pscl_conv_pack"]
    ev = kern(queue, (round_up(geom["Wp"], 16), geom["Hp"], geom["N"]), (16, 1, 1),
              x_dev.base_data, elem_offset(x_dev), xp.data, np.int32(geom["N"]),
              np.int32(n_ch), np.int32(geom["H"]), np.int32(geom["W"]), np.int32(geom["Hp"]),
              np.int32(geom["Wp"]), np.int32(geom["padding"][0]),
              np.int32(geom["padding"][1]), wait_for=x_dev.events or None)
    xp.add_event(ev)
    if events is not None:
        events.append(ev)
    return xp


def _pack_conv_weight(queue, w, events):
    """w (K, C, R, S) -> (K, R, S, C) on the device."""
    k_out, n_ch, r, s = w.shape
    if not is_device_array(w):
        host = np.ascontiguousarray(np.asarray(w).transpose(0, 2, 3, 1))
        return cl_array.to_device(queue, host, allocator=runtime.memory_pool(queue.context))
    wk = runtime.empty(queue, (k_out, r, s, n_ch), np.float32,
                       allocator=runtime.memory_pool(queue.context))
    kern = runtime.kernels(queue.context, "masked_conv.cl.mako", ("pscl_conv_weight_pack",),
                           **conv_template_args("pack"))["pscl_conv_weight_pack"]
    ev = kern(queue, (r * s, k_out), None, w.base_data, elem_offset(w), wk.data,
              np.int32(k_out), np.int32(n_ch), np.int32(r * s), wait_for=w.events or None)
    wk.add_event(ev)
    if events is not None:
        events.append(ev)
    return wk


def _conv_args(geom, n_ch, k_out, r, s):
    return (np.int32(n_ch), np.int32(k_out), np.int32(geom["OH"]), np.int32(geom["OW"]),
            np.int32(geom["Hp"]), np.int32(geom["Wp"]), np.int32(r), np.int32(s),
            np.int32(geom["stride"][0]), np.int32(geom["stride"][1]),
            np.int32(geom["dilation"][0]), np.int32(geom["dilation"][1]))


def conv2d_masked(x, w, mask, stride=1, padding=0, dilation=1, *, out=None, queue=None,
                  events=None):
    """Output-masked 2-D convolution: ``mask * conv2d(x, w)``, computing only the selected
    outputs (no im2col: the input is packed once into zero-padded NHWC).

    Parameters
    ----------
    x : float32 (N, C, H, W), NumPy or pyopencl.
    w : float32 (K, C, R, S), dense.
    mask : bool (N, K, OH, OW): DSG's per-window selection; or (N, K, 1, 1): a per-sample
        output-channel mask.  A channel mask -- given as (N, K, 1, 1), or a host mask that
        is constant over each OH x OW plane -- takes a faster path that computes whole
        planes of the selected channels in register tiles.  (A device mask is not inspected:
        pass (N, K, 1, 1) to get that path for it; its N * K flags are then read back, a
        synchronisation, to build each image's channel list.)
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
    result is ready; a device-array call returns once it is enqueued.  The dense weight is
    packed on every call.
    """
    require_array(x, "x", np.float32, ndim=4)
    require_array(w, "w", np.float32, ndim=4)
    k_out, n_ch, r, s = w.shape
    if x.shape[1] != n_ch:
        raise ValueError(f"x has {x.shape[1]} channels but w expects C = {n_ch} "
                         "(w must be (K, C, R, S))")
    geom = _conv_geometry(x, k_out, r, s, stride, padding, dilation)
    out_shape = (geom["N"], k_out, geom["OH"], geom["OW"])
    require_array(mask, "mask", np.bool_, ndim=4)
    channel_form = tuple(mask.shape) == out_shape[:2] + (1, 1)
    if tuple(mask.shape) != out_shape and not channel_form:
        raise ValueError(f"mask must have shape {out_shape} (N, K, OH, OW) or "
                         f"{out_shape[:2] + (1, 1)} (a channel mask), got {tuple(mask.shape)}")
    check_out(out, out_shape, np.float32, like=x)
    queue = runtime.resolve_queue(queue, x=x, w=w, mask=mask, out=out)
    _check_sizes(out=int(np.prod(out_shape)),
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
        xp = _pack_conv_input(queue, x_dev, n_ch, geom, events)
        wk = _pack_conv_weight(queue, w, events)
        if channels is not None:
            _launch_conv_channels(queue, xp, wk, channels, out_dev, geom, n_ch, k_out, r, s,
                                  events)
        else:
            _launch_conv_general(queue, xp, wk, to_device(mask, queue, "mask", borrow),
                                 out_dev, geom, n_ch, k_out, r, s, events)
    return deliver(out_dev, x, out, queue, host)


def _launch_conv_general(queue, xp, wk, mask_dev, out_dev, geom, n_ch, k_out, r, s, events):
    params = tuning.lookup(MASKED_CONV, queue.device)
    kern = runtime.kernels(queue.context, "masked_conv.cl.mako", ("pscl_masked_conv",),
                           **conv_template_args("general", params))["pscl_masked_conv"]
    n_pix = geom["N"] * geom["OH"] * geom["OW"]
    block = params["BLOCK_PIX"]
    ev = kern(queue, (round_up(k_out, params["WG"]), -(-n_pix // block)), (params["WG"], 1),
              xp.data, wk.data, mask_dev.base_data, elem_offset(mask_dev), out_dev.base_data,
              elem_offset(out_dev), np.int32(geom["N"]), *_conv_args(geom, n_ch, k_out, r, s),
              np.int32(block),
              wait_for=(list(xp.events) + list(wk.events) + list(mask_dev.events)
                        + list(out_dev.events)) or None)
    out_dev.add_event(ev)
    if events is not None:
        events.append(ev)


def _launch_conv_channels(queue, xp, wk, channels, out_dev, geom, n_ch, k_out, r, s, events):
    """The channel-mask path: zero the output, then compute the selected planes."""
    n_img = geom["N"]
    if is_device_array(channels):
        flags = channels.get(queue=queue).reshape(n_img, k_out)  # (N, K) bytes: tiny
    else:
        flags = np.asarray(channels).reshape(n_img, k_out)
    counts = flags.sum(axis=1).astype(np.int32)
    chans = np.zeros((n_img, max(k_out, 1)), np.int32)
    for n in range(n_img):
        sel = np.flatnonzero(flags[n])
        chans[n, :sel.size] = sel
    alloc = runtime.memory_pool(queue.context)
    chans_dev = cl_array.to_device(queue, chans, allocator=alloc)
    counts_dev = cl_array.to_device(queue, counts, allocator=alloc)
    fill = cl.enqueue_fill_buffer(queue, out_dev.base_data, np.float32(0), out_dev.offset,
                                  out_dev.nbytes, wait_for=out_dev.events or None)
    if not counts.any():
        out_dev.add_event(fill)
        return
    params = tuning.lookup(MASKED_CONV_CH, queue.device)
    kern = runtime.kernels(queue.context, "masked_conv.cl.mako", ("pscl_masked_conv_channels",),
                           **conv_template_args("channels", params)
                           )["pscl_masked_conv_channels"]
    n_pix = geom["OH"] * geom["OW"]
    items = -(-n_pix // params["PIX"])
    groups = -(-int(counts.max()) // params["KB"])
    ev = kern(queue, (round_up(items, params["WG"]), groups, n_img), (params["WG"], 1, 1),
              xp.data, wk.data, chans_dev.data, counts_dev.data, out_dev.base_data,
              elem_offset(out_dev), *_conv_args(geom, n_ch, k_out, r, s),
              wait_for=[fill] + list(xp.events) + list(wk.events))
    out_dev.add_event(ev)
    if events is not None:
        events.append(ev)


def masked_matmul_shape_class(n_rows: int, k_in: int, n_cols: int) -> str:
    """The tuning database's shape class of a masked product: M, K and N rounded down to
    powers of two, e.g. ``m128-k4096-n4096``.  (Not the kept fraction: a device mask's
    count is unknown without a synchronisation.)"""
    return (f"m{tuning.pow2_floor(n_rows)}-k{tuning.pow2_floor(k_in)}"
            f"-n{tuning.pow2_floor(n_cols)}")
