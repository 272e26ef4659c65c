"""elementwise: ``add``, ``mul``, ``axpby``, ``add_relu`` and copies over broadcast operands
(kernels/elementwise.cl.mako).  Two kernels, chosen per call: a vectorised contiguous one
when the problem, after merging dimensions contiguous in every operand, is one flat run
(pscl_ew_fast), and a strided one otherwise (pscl_ew_strided).  Bandwidth-bound: VEC
elements per load and store, ITEMS vectors per work-item, adjacent (CPUs) or a work-group
apart (INTERLEAVE, GPUs).  The op module (pysparsecl/ops/elementwise.py) classifies and
validates the operands and builds the :class:`Slot` list that :func:`launch` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from .. import runtime, tuning
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import written
from ..params import Constraint, ParamSpec, TileParam

TEMPLATE = "elementwise.cl.mako"

SPEC = ParamSpec(
    family="elementwise",
    params=(
        TileParam("VEC", 16, (1, 2, 4, 8, 16),
                  "elements per vector load/store (contiguous rows and the fast path)"),
        TileParam("ITEMS", 4, (1, 2, 4, 8, 16, 32), "vectors per work-item (per row sweep)"),
        TileParam("WG", 256, (32, 64, 128, 256, 512, 1024), "work-items per work-group"),
        TileParam("INTERLEAVE", 0, (0, 1),
                  "1: a work-item's vectors lie a work-group apart (coalesced on GPUs); "
                  "0: adjacent, one sequential stream per work-item (CPU prefetchers)"),
    ),
    constraints=(
        Constraint("interleave_needs_items", lambda p: p["INTERLEAVE"] == 0 or p["ITEMS"] > 1,
                   "with one vector per item both layouts are the same kernel"),
        Constraint("item_block_bounded", lambda p: p["VEC"] * p["ITEMS"] <= 256,
                   "at most 256 elements per work-item, so mid-sized arrays still spread "
                   "over every compute unit"),
    ),
    work_group_size=lambda p: p["WG"],
)

#: Operand dtypes (NumPy -> OpenCL C).  float64 needs cl_khr_fp64, float16 cl_khr_fp16.
SUPPORTED_DTYPES = {
    np.dtype(np.float16): "half",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int32): "int",
    np.dtype(np.int64): "long",
}
#: Kernels index in 32 bits while every extent, offset and element count stays below this;
#: the margin keeps grid-stride increments and vector over-reach clear of overflow.
INDEX32_LIMIT = 2 ** 30
#: Cap on the contiguous kernel's work-groups (it loops, grid-stride, over the rest).
MAX_GROUPS = 2 ** 20
#: NVIDIA limits NDRange dimension 1 to 65535 work-groups; rows loop beyond that.
MAX_ROW_GROUPS = 65535


@dataclass
class Slot:
    """One array or scalar the kernel reads (or, for ``out``, writes)."""
    name: str                          # "a", "b", "m" (mask) or "out"
    array: Optional[cl_array.Array]    # None for a scalar
    strides: Tuple[int, ...] = ()      # element strides over the output shape
    value: object = None               # the scalar, in the result dtype

    @property
    def ctype(self) -> str:
        return ctype(self.array.dtype)

    @property
    def offset(self) -> int:
        return self.array.offset // self.array.dtype.itemsize


def ctype(dtype) -> str:
    """OpenCL C type of an element; masks (bool) are bytes."""
    return "uchar" if np.dtype(dtype) == np.bool_ else SUPPORTED_DTYPES[np.dtype(dtype)]


def coalesce(shape, stride_sets: List[Tuple[int, ...]]):
    """Merge dimensions that are contiguous in every operand (NumPy's iterator does the
    same).  Dimensions are ordered by the output's stride (its first set), outermost first,
    so that a transposed ``out`` is still written along its memory order."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    dims.sort(key=lambda d: -abs(stride_sets[0][d]))
    new_shape: List[int] = []
    new_sets: List[List[int]] = [[] for _ in stride_sets]
    for d in dims:
        if new_shape and all(ns[-1] == s[d] * shape[d] for ns, s in zip(new_sets, stride_sets)):
            new_shape[-1] *= shape[d]
            for ns, s in zip(new_sets, stride_sets):
                ns[-1] = s[d]
        else:
            new_shape.append(shape[d])
            for ns, s in zip(new_sets, stride_sets):
                ns.append(s[d])
    if not new_shape:  # a single element
        return [1], [[1] for _ in stride_sets]
    return new_shape, new_sets


def _stride_class(stride: int) -> str:
    return "0" if stride == 0 else "1" if stride == 1 else "n"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


#: OpenCL C type -> NumPy dtype of the template's TR and IDX (and the elements it reads).
_DTYPE_OF = {c: d for d, c in SUPPORTED_DTYPES.items()}


def kernel_args(params) -> KernelArgs:
    """The signature of the one kernel elementwise.cl.mako renders for ``params`` (a
    variant and tile parameters, as the template takes them).  Per array: pointer,
    element offset and, on the strided path, its strides but a 0/1 innermost one; a value
    per scalar operand; the axpby coefficients; then the sizes."""
    tr, idx = _DTYPE_OF[params["TR"]], _DTYPE_OF[params["IDX"]]
    ndim, strided = params["NDIM"], params["PATH"] == "strided"
    restrict = bool(params["RESTRICT"])
    inner = {"out": params["OUT_INNER"], "m": params["MASK_INNER"]}
    inner.update({o[0]: o[3] for o in params["OPERANDS"] if o[1] == "array"})

    def array(name, ctype, const=True):
        n_strides = (ndim if inner[name] == "n" else ndim - 1) if strided else 0
        return (Pointer(name, ctype, const=const, restrict=restrict),
                Scalar(f"{name}_off", np.int64),
                *(Scalar(f"{name}_s{d}", idx) for d in range(n_strides)))

    args: list = []
    for name, kind, ctype, _ in params["OPERANDS"]:
        args += [Scalar(f"pscl_u_{name}", tr)] if kind == "scalar" else array(name, ctype)
    if params["MASK"]:
        args += array("m", "uchar")
    if params["OP"] == "axpby":
        args += [Scalar("pscl_alpha", tr), Scalar("pscl_beta", tr)]
    args += array("out", params["TR"], const=False)
    if strided:
        args += [Scalar(f"d{d}", idx) for d in range(ndim)] + [Scalar("n_rows", idx)]
        return KernelArgs(Signature("pscl_ew_strided", tuple(args)))
    return KernelArgs(Signature("pscl_ew_fast", tuple(args) + (Scalar("n", idx),)))


_OFF = {"a": "a_off", "b": "b_off", "m": "m_off", "out": "out_off"}


def launch(queue: cl.CommandQueue, op: str, dtype: np.dtype, inputs: List[Slot],
            out: Slot, mask: Optional[Slot], mask_mode: int, coeffs, events,
            flat: bool = False) -> cl.Event:
    """Choose the kernel for one planned operation, render and build it (cached), enqueue.
    ``flat``: every array is known to be one C-contiguous run of the output's size (the
    caller checked), so the dimension merging is skipped."""
    device = queue.device
    params = tuning.lookup(SPEC, device)
    vec, items, wg = params["VEC"], params["ITEMS"], params["WG"]
    arrays = [s for s in inputs if s.array is not None] + ([mask] if mask else [])
    if flat:
        shape, sets = [out.array.size], [[1]] * (1 + len(arrays))
    else:
        shape, sets = coalesce(out.array.shape, [out.strides] + [s.strides for s in arrays])
    coal = {s.name: st for s, st in zip([out] + arrays, sets)}
    cls = {name: _stride_class(st[-1]) for name, st in coal.items()}
    n = math.prod(shape)
    # The contiguous kernel when the merged problem is one run that every array either
    # walks with stride 1 or reads one element of.
    fast = len(shape) == 1 and cls["out"] == "1" and all(c in "01" for c in cls.values())

    # 32-bit indices unless some reachable element index (or the count) needs more.
    reach = [n] + [s.offset + sum(abs(st) * (e - 1) for st, e in zip(coal[s.name], shape)) + 1
                   for s in [out] + arrays]
    idx_t, idx_np = ("long", np.int64) if max(reach) >= INDEX32_LIMIT else ("int", np.int32)

    values = {}

    def array_args(name, array):
        values[name] = array.base_data
        values[_OFF[name]] = np.int64(array.offset // array.dtype.itemsize)
        if not fast:
            st = coal[name]
            for d, v in enumerate(st if cls[name] == "n" else st[:-1]):
                values[f"{name}_s{d}"] = idx_np(v)

    operands = []
    for s in inputs:
        if s.array is None:
            operands.append((s.name, "scalar", ctype(dtype), "0"))
            values["pscl_u_" + s.name] = s.value
        else:
            operands.append((s.name, "array", s.ctype, cls[s.name]))
            array_args(s.name, s.array)
    if mask is not None:
        array_args("m", mask.array)
    if op == "axpby":
        values["pscl_alpha"], values["pscl_beta"] = (dtype.type(c) for c in coeffs)
    array_args("out", out.array)
    out_ptr = out.array.base_data.int_ptr
    variant = dict(OP=op, TR=ctype(dtype), OPERANDS=tuple(operands),
                   MASK=mask_mode if mask is not None else 0, MASK_INNER=cls.get("m", "1"),
                   OUT_INNER=cls["out"], IDX=idx_t, NDIM=len(shape),
                   RESTRICT=int(all(s.array.base_data.int_ptr != out_ptr for s in arrays)))
    if fast:
        # Vector pointer casts when every contiguous pointer starts on a vector boundary
        # (buffers themselves are aligned to mem_base_addr_align bits).
        align_bits = device.mem_base_addr_align
        aligned = vec > 1 and all(
            s.offset % vec == 0 and vec * s.array.dtype.itemsize * 8 <= align_bits
            for s in [out] + arrays if cls[s.name] == "1")
        variant.update(PATH="fast", ALIGNED=int(aligned))
        values["n"] = idx_np(n)
        groups = min(max(1, -(-(n // vec) // (wg * items))), MAX_GROUPS)
        global_size, local_size = (groups * wg,), (wg,)
        name = "pscl_ew_fast"
    else:
        variant.update(PATH="strided", ALIGNED=0)
        n_inner, n_rows = shape[-1], n // shape[-1]
        for d, v in enumerate(shape):
            values[f"d{d}"] = idx_np(v)
        values["n_rows"] = idx_np(n_rows)
        # Work-items along a row only as many as its vectors need; the rest of the
        # work-group takes further rows (short rows: many rows per group).
        width = vec if all(c in "01" for c in cls.values()) else 1
        per_row = max(1, -(-(n_inner // width) // items))
        wg0 = min(wg, _next_pow2(per_row))
        wg1 = wg // wg0
        groups0 = -(-per_row // wg0)
        groups1 = min(-(-n_rows // wg1), MAX_ROW_GROUPS)
        global_size, local_size = (groups0 * wg0, groups1 * wg1), (wg0, wg1)
        name = "pscl_ew_strided"

    # ARGS is a function: the signature is computed only when the variant is first built.
    kern = runtime.kernels(queue.context, TEMPLATE, (name,), ARGS=kernel_args,
                           **variant, **params)
    wait_for = [ev for s in [out] + arrays for ev in s.array.events]
    event = kern[name].launch(queue, global_size, local_size, values,
                              wait_for=wait_for or None)
    written(out.array, event)
    if events is not None:
        events.append(event)
    return event


# ---------------------------------------------------------------------------------------------
# The shared driver: validate -> plan buffers -> move host data -> launch -> deliver

#: Dtypes every device supports: the contiguous fast path needs no device check for them.
