"""masked_gemm: the CPU-shaped masked GEMM, column-oriented.  Within a block of x rows
(about BLOCK_KIB KiB, kept in cache while every column passes over it), a work-item takes
one column and computes, GROUP at a time, the outputs of the rows that select it, sharing
each load of its weight row: W is read once per block rather than once per selecting row.
A bool mask's zeros are written by a row-major pass first."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up
from ..params import ParamSpec, TileParam

TEMPLATE = "masked_gemm.cl.mako"
ZERO_CHUNK = 4096     # floats zeroed per work-item of the bool mask's zero pass

SPEC = ParamSpec(
    family="masked_gemm",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "floats per vector load of a row (one FMA each)"),
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


def rows_per_block(params, n_rows: int, k_in: int) -> int:
    """x rows per block: about BLOCK_KIB KiB of x, in equal blocks (no small last one)."""
    if params["BLOCK_KIB"] == 0:
        return max(1, n_rows)
    rows = max((params["BLOCK_KIB"] * 1024) // max(1, 4 * k_in), params["GROUP"], 1)
    n_blocks = -(-n_rows // rows)
    return max(1, -(-n_rows // n_blocks))


def kernel_args(p) -> KernelArgs:
    """The arguments of the product and of the zero pass (rendered with ZEROED)."""
    zero_fill = Signature("pscl_zero_fill", (
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("n", np.int64)))
    return KernelArgs(
        *((zero_fill,) if p["ZEROED"] else ()),
        Signature("pscl_masked_gemm", (
            Pointer("x", "float", restrict=True), Scalar("x_off", np.int64),  # (M, K), ldx
            Pointer("wt", "float", restrict=True),                            # (N, K), ldw
            # bool mask or slot map, (M, N)
            Pointer("sel", "uchar" if p["MASK"] == "bool" else "int", restrict=True),
            Scalar("sel_off", np.int64),
            Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
            Scalar("M", np.int32), Scalar("N", np.int32), Scalar("K", np.int32),
            Scalar("ldx", np.int32), Scalar("ldw", np.int32), Scalar("out_cols", np.int32),
            Scalar("rows_per_block", np.int32))))


def template_args(params, mask: str = "bool", zeroed: bool = False) -> dict:
    """The tile parameters, the selection's form ("bool" mask or "slot" map), whether a
    zero pass ran first (``zeroed``), and the kernels' arguments."""
    return dict(params, KIND="gemm", MASK=mask, ZEROED=int(zeroed), ZERO_CHUNK=ZERO_CHUNK,
                ARGS=kernel_args)


def launch(queue, params, form: str, x_dev, rows, ldw, sel, out_dev, n_rows: int,
           n_cols: int, k_in: int, out_cols: int, wait, events):
    """Enqueue the product (and a bool mask's zero pass); ``sel`` is the selection's
    (buffer, element offset).  Returns the product's event."""
    zeroed = form == "bool"
    names = ("pscl_masked_gemm",) + (("pscl_zero_fill",) if zeroed else ())
    kerns = runtime.kernels(queue.context, TEMPLATE, names,
                            **template_args(params, form, zeroed))
    if zeroed:
        ev = kerns["pscl_zero_fill"].launch(
            queue, (-(-out_dev.size // ZERO_CHUNK),), None,
            dict(out=out_dev.base_data, out_off=elem_offset(out_dev),
                 n=np.int64(out_dev.size)), wait_for=wait or None)
        wait = [ev]                   # it waited for everything before it
        if events is not None:
            events.append(ev)
    block = rows_per_block(params, n_rows, k_in)
    # (Padding x's rows, as the backward does, measured no gain here.)
    return kerns["pscl_masked_gemm"].launch(
        queue, (round_up(n_cols, params["WG"]), -(-n_rows // block)), (params["WG"], 1), dict(
            x=x_dev.base_data, x_off=elem_offset(x_dev), wt=rows.data, sel=sel[0],
            sel_off=sel[1], out=out_dev.base_data, out_off=elem_offset(out_dev),
            M=np.int32(n_rows), N=np.int32(n_cols), K=np.int32(k_in), ldx=np.int32(k_in),
            ldw=np.int32(ldw), out_cols=np.int32(out_cols), rows_per_block=np.int32(block)),
        wait_for=wait or None)
