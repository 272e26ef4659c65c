"""Helper kernels of :class:`pysparsecl.CompactRows` (no tile parameters): validating the
index rows on the device, and converting to and from dense (kernels/compact_util.cl.mako)."""

from __future__ import annotations

import numpy as np
import pyopencl.array as cl_array

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import INT32_MAX, elem_offset, round_up

TEMPLATE = "compact_util.cl.mako"
WG = 16             # entries per work-group along a row
SCATTER_WG = 64     # work-items of the scatter's work-group per row

_SIZES = (Scalar("M", np.int32), Scalar("n_keep", np.int32), Scalar("N", np.int32))

ARGS = KernelArgs(
    Signature("pscl_compact_check", (
        Pointer("idx", "int", restrict=True), Scalar("idx_off", np.int64),
        Pointer("bad", "int", const=False, volatile=True)) + _SIZES),
    Signature("pscl_compact_gather", (
        Pointer("dense", "float", restrict=True), Scalar("dense_off", np.int64),
        Pointer("idx", "int", restrict=True), Scalar("idx_off", np.int64),
        Pointer("values", "float", const=False, restrict=True),
        Scalar("values_off", np.int64)) + _SIZES),
    Signature("pscl_compact_scatter", (
        Pointer("values", "float", restrict=True), Scalar("values_off", np.int64),
        Pointer("idx", "int", restrict=True), Scalar("idx_off", np.int64),
        Pointer("dense", "float", const=False, restrict=True),
        Scalar("dense_off", np.int64)) + _SIZES),
    Signature("pscl_compact_bias", (
        Pointer("values", "float", restrict=True), Scalar("values_off", np.int64),
        Pointer("idx", "int", restrict=True), Scalar("idx_off", np.int64),
        Pointer("b", "float", restrict=True), Scalar("b_off", np.int64),
        Pointer("out", "float", const=False), Scalar("out_off", np.int64),
        Scalar("relu", np.int32)) + _SIZES))


def _kernel(queue, name: str):
    return runtime.kernels(queue.context, TEMPLATE, (name,), ARGS=ARGS,
                           SCATTER_WG=SCATTER_WG)[name]


def _grid(n_rows: int, n_keep: int):
    return (round_up(max(n_keep, 1), WG), n_rows), (WG, 1)


def _sizes(n_rows: int, n_keep: int, n_cols: int) -> dict:
    return dict(M=np.int32(n_rows), n_keep=np.int32(n_keep), N=np.int32(n_cols))


def check(queue, idx: cl_array.Array, n_cols: int, events=None) -> cl_array.Array:
    """Enqueue the validation of a device (M, n_keep) index array; returns the 2-int flag
    array: the first row with an index outside [0, N), and the first whose indices do not
    strictly ascend (INT32_MAX where none)."""
    n_rows, n_keep = idx.shape
    bad = runtime.empty(queue, (2,), np.int32, allocator=runtime.memory_pool(queue.context))
    fill = runtime.enqueue_fill(queue, bad.data, np.int32(INT32_MAX), 0, bad.nbytes)
    if idx.size:
        grid, local = _grid(n_rows, n_keep)
        ev = _kernel(queue, "pscl_compact_check").launch(queue, grid, local, dict(
            idx=idx.base_data, idx_off=elem_offset(idx), bad=bad.data,
            **_sizes(n_rows, n_keep, n_cols)), wait_for=[fill] + list(idx.events))
    else:
        ev = fill
    bad.add_event(ev)
    if events is not None:
        events.append(ev)
    return bad


def _per_entry(queue, kernel: str, entries: cl_array.Array, written_array: cl_array.Array,
               n_cols: int, events, scalars: dict, **arrays) -> None:
    """Launch ``kernel`` with a work-item per entry of ``entries`` (M, n_keep): each of
    ``arrays`` passed as its buffer and element offset (``<name>``, ``<name>_off``), after
    their events; ``written_array`` (one of them) then holds the launch's event."""
    n_rows, n_keep = entries.shape
    if not entries.size:
        return
    grid, local = _grid(n_rows, n_keep)
    args = dict(scalars, **_sizes(n_rows, n_keep, n_cols))
    for name, a in arrays.items():
        args[name], args[f"{name}_off"] = a.base_data, elem_offset(a)
    ev = _kernel(queue, kernel).launch(queue, grid, local, args, wait_for=[
        e for a in arrays.values() for e in a.events])
    written_array.events[:] = [ev]
    if events is not None:
        events.append(ev)


def gather(queue, dense: cl_array.Array, idx: cl_array.Array, values: cl_array.Array,
           n_cols: int, events=None) -> None:
    """values[i, s] = dense[i, idx[i, s]] (device arrays)."""
    _per_entry(queue, "pscl_compact_gather", idx, values, n_cols, events, {},
               dense=dense, idx=idx, values=values)


def scatter(queue, values: cl_array.Array, idx: cl_array.Array, dense: cl_array.Array,
            n_cols: int, events=None) -> None:
    """dense = 0, then dense[i, idx[i, s]] = values[i, s] (device arrays); a row holding
    an index outside [0, N) gets a NaN."""
    n_rows, n_keep = idx.shape
    if not dense.size:
        return
    wait = list(values.events) + list(idx.events) + list(dense.events)
    ev = runtime.fill_array(queue, dense, 0, wait_for=wait or None)
    if idx.size:
        ev = _kernel(queue, "pscl_compact_scatter").launch(
            queue, (n_rows * SCATTER_WG,), (SCATTER_WG,), dict(
            values=values.base_data, values_off=elem_offset(values), idx=idx.base_data,
            idx_off=elem_offset(idx), dense=dense.base_data, dense_off=elem_offset(dense),
            **_sizes(n_rows, n_keep, n_cols)), wait_for=[ev])
    dense.events[:] = [ev]
    if events is not None:
        events.append(ev)


def add_bias(queue, values: cl_array.Array, idx: cl_array.Array, b: cl_array.Array,
             out: cl_array.Array, n_cols: int, relu: bool, events=None) -> None:
    """out[i, s] = act(values[i, s] + b[idx[i, s]]) (device arrays; ``out`` may be
    ``values``)."""
    _per_entry(queue, "pscl_compact_bias", idx, out, n_cols, events,
               dict(relu=np.int32(relu)), values=values, idx=idx, b=b, out=out)
