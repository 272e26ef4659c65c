"""masked_gemm_tiled: the GPU-shaped masked GEMM (SDDMM-like).  A work-group owns a
TILE_M x TILE output tile, stages x and W^T through local memory KC columns at a time and
accumulates each work-item's units (GROUP selected columns of one row) in registers; a
tile dense enough (DENSE) is computed whole.  With SPLITK > 1 each K slice writes partial
sums that a second kernel adds in slice order.  masked_conv_tiled renders the same template
as an implicit GEMM for conv2d_masked (``layout="conv"``)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import check_alloc, elem_offset, round_up
from ..params import Constraint, ParamSpec, TileParam
from . import LOCAL_MEM_BYTES

TEMPLATE = "masked_gemm_tiled.cl.mako"


def local_bytes(p, layout: str = "gemm") -> int:
    """Local memory: one buffer holds, in turn, the tile's selection bits beside the row
    scan (and, for the convolution, a byte per tile entry as the mask is read), a round's
    units (row, count and GROUP columns, a byte each) and the staged x and W^T chunks.
    The template sizes its buffer from this (LDS_F4)."""
    staged = 4 * p["KC"] * (p["TILE_M"] + p["TILE"])
    units = p["WG"] * p["UNITS"] * (2 + p["GROUP"])
    selection = 4 * p["WG"] + p["TILE_M"] * p["TILE"] // 8
    if layout == "conv":
        selection += p["TILE_M"] * p["TILE"]
    return max(staged, -(-selection // 16) * 16, -(-units // 16) * 16)


def tiled_spec(family: str, layout: str) -> ParamSpec:
    """The tile parameters of the template rendered with ``layout`` (both families tune
    them separately: a GEMM and a convolution want different tiles)."""
    return ParamSpec(
        family=family, params=PARAMS,
        constraints=CONSTRAINTS + (Constraint(
            "local_memory", lambda p: local_bytes(p, layout) <= LOCAL_MEM_BYTES,
            "the staged chunks (or the scan and selection, or the units) fit 32 KiB of "
            "local memory"),),
        work_group_size=lambda p: p["WG"],
        local_memory=lambda p: local_bytes(p, layout))


PARAMS = (
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
)

CONSTRAINTS = (
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
)

SPEC = tiled_spec("masked_gemm_tiled", "gemm")


#: The convolution's geometry, which the conv layout adds to the arguments (the GEMM's M is
#: N * P output pixels, its N the output channels, its K the reduction R * S * C).
CONV_GEOMETRY = tuple(Scalar(name, np.int32) for name in (
    "C", "S", "OW", "P", "Hp", "Wp", "str_h", "str_w", "dil_h", "dil_w"))


def kernel_args(p) -> KernelArgs:
    """The product's arguments (with SPLITK > 1 it writes partial sums, not the output)
    and, with SPLITK > 1, the split-K sum's (which reads a bool or channel mask to write
    its zeros)."""
    mask = p["MASK"]
    sel_type = "int" if mask == "slot" else "uchar"
    sel = (() if mask == "all" else
           (Pointer("sel", sel_type, restrict=True), Scalar("sel_off", np.int64)))
    conv = CONV_GEOMETRY if p["LAYOUT"] == "conv" else ()
    dest = ((Pointer("part", "float", const=False, restrict=True),
             Scalar("part_stride", np.int64)) if p["SPLITK"] > 1 else
            (Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64)))
    splitk_sum = Signature("pscl_gemm_splitk_sum", (
        Pointer("part", "float", restrict=True), Scalar("part_stride", np.int64),
        Scalar("n_slices", np.int32),
        *(sel if mask != "slot" else ()),
        *((Scalar("P", np.int32),) if mask == "channel" else ()),
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("total", np.int64)))
    return KernelArgs(
        *((splitk_sum,) if p["SPLITK"] > 1 else ()),
        Signature("pscl_masked_gemm_tiled", (
            Pointer("x", "float", restrict=True), Scalar("x_off", np.int64),  # (M, K), ldx
            Pointer("wt", "float", restrict=True),                            # (N, K), ldw
            *sel, *dest,                                    # partial sums: (slices, M, out_cols)
            Scalar("M", np.int32), Scalar("N", np.int32), Scalar("K", np.int32),
            Scalar("ldx", np.int32), Scalar("ldw", np.int32), Scalar("out_cols", np.int32),
            Scalar("k_len", np.int32), *conv)))                              # K per slice


def template_args(params, mask: str = "bool", aligned: bool = False, mask_aligned: bool = False,
                  layout: str = "gemm") -> dict:
    """The tile parameters, the layout ("gemm", or "conv": the implicit GEMM), the
    selection's form ("bool", "slot", the convolution's "channel", or "all": a dense
    product, as the convolution search's projection of the windows), whether whole
    float4 staging loads are aligned (``aligned``) and whether 16-entry selection loads
    are (``mask_aligned``, GEMM only), and the local buffer's size in float4s."""
    return dict(params, KIND="gemm_tiled", LAYOUT=layout, MASK=mask, ALIGNED=int(aligned),
                MASK_ALIGNED=int(mask_aligned), LDS_F4=local_bytes(params, layout) // 16,
                ARGS=kernel_args)


def launch(queue, params, form: str, x_dev, rows, ldw, sel, out_dev, n_rows: int,
           n_cols: int, k_in: int, out_cols: int, wait, events):
    """Enqueue the product (and the split-K sum); ``sel`` is the selection's (buffer,
    element offset).  Returns the event of the last kernel."""
    # Whole float4 staging loads need every x and wt row, and K, to be float4-aligned;
    # whole 16-entry loads of the selection need its rows and offset to be 16-aligned.
    aligned = k_in % 4 == 0 and ldw % 4 == 0 and elem_offset(x_dev) % 4 == 0
    mask_aligned = n_cols % 16 == 0 and int(sel[1]) % 16 == 0
    return enqueue(queue, params, template_args(params, form, aligned, mask_aligned),
                   dict(x=x_dev.base_data, x_off=elem_offset(x_dev), ldx=np.int32(k_in)),
                   rows, ldw, sel, out_dev, n_rows, n_cols, k_in, out_cols, wait, events)


def enqueue(queue, params, rendering: dict, x_args: dict, rows, ldw, sel, out_dev,
            n_rows: int, n_cols: int, k_in: int, out_cols: int, wait, events,
            splitk_args: Optional[dict] = None):
    """Enqueue the kernel rendered with ``rendering`` (template_args) on an M x N x K
    problem whose x operand ``x_args`` give (x, x_off, ldx and, for the convolution, its
    geometry), and the split-K sum (given ``splitk_args`` beyond the common ones).
    ``sel``: the selection's (buffer, element offset), None with ``MASK="all"``.
    Returns the event of the last kernel."""
    ctx = queue.context
    kc, split = params["KC"], params["SPLITK"]
    k_len = round_up(-(-k_in // split), kc)        # whole chunks per slice
    n_slices = -(-k_in // k_len)                   # none of them empty
    names = ("pscl_masked_gemm_tiled",) + (("pscl_gemm_splitk_sum",) if split > 1 else ())
    kerns = runtime.kernels(ctx, TEMPLATE, names, **rendering)
    sel_args = {} if sel is None else dict(sel=sel[0], sel_off=sel[1])
    total = n_rows * out_cols
    if split > 1:
        check_alloc(queue, 4 * n_slices * total, "the split-K partial sums")
        part = runtime.empty(queue, (n_slices * total,), np.float32,
                             allocator=runtime.memory_pool(ctx))
        dest = dict(part=part.data, part_stride=np.int64(total))
    else:
        dest = dict(out=out_dev.base_data, out_off=elem_offset(out_dev))
    ev = kerns[names[0]].launch(
        queue, (-(-n_cols // params["TILE"]) * params["WG"], -(-n_rows // params["TILE_M"]),
                n_slices), (params["WG"], 1, 1), dict(
            **x_args, wt=rows.data, **sel_args, **dest, M=np.int32(n_rows),
            N=np.int32(n_cols), K=np.int32(k_in), ldw=np.int32(ldw),
            out_cols=np.int32(out_cols), k_len=np.int32(k_len)), wait_for=wait or None)
    if split == 1:
        return ev
    if events is not None:
        events.append(ev)
    mask_args = sel_args if rendering["MASK"] != "slot" else {}
    wg = 256
    return kerns[names[1]].launch(queue, (round_up(total, wg),), (wg,), dict(
        part=part.data, part_stride=np.int64(total), n_slices=np.int32(n_slices), **mask_args,
        **(splitk_args or {}), out=out_dev.base_data, out_off=elem_offset(out_dev),
        total=np.int64(total)), wait_for=[ev])
