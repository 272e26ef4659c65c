"""masked_vmm_split: the GPU-shaped masked VMM.  SPLIT work-items share each selected
output: they read its weight row in coalesced vectors, x comes from local memory XCHUNK
floats at a time, and the partial sums meet in a tree in local memory.  A bool mask is
first listed into its selected columns (which also writes the zeros): inside the product's
kernel up to the routine's ``LIST_IN_KERNEL_MAX_N`` columns, else by a kernel of its own."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset
from ..params import Constraint, ParamSpec, TileParam
from . import LOCAL_MEM_BYTES, masked_util

TEMPLATE = "masked_vmm_split.cl.mako"


def local_bytes(p) -> int:
    """Local memory: the staged x and the reduction tree."""
    return 4 * (p["XCHUNK"] + p["GROUP"] * p["SPLIT"] * p["TEAMS"])


SPEC = ParamSpec(
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
        Constraint("local_memory", lambda p: local_bytes(p) <= LOCAL_MEM_BYTES,
                   "the staged x and the reduction tree fit 32 KiB of local memory"),
    ),
    work_group_size=lambda p: p["SPLIT"] * p["TEAMS"],
    local_memory=local_bytes,
)


def kernel_args(p) -> KernelArgs:
    """The kernel's arguments: the selection comes as the bool mask itself
    (LIST_IN_KERNEL), or as a list of columns (with their count for a bool mask)."""
    if p["LIST_IN_KERNEL"]:
        selection = (Pointer("mask", "uchar", restrict=True), Scalar("mask_off", np.int64))
    else:
        selection = (Pointer("list", "int", restrict=True), Scalar("list_off", np.int64)) + (
            (Pointer("counts", "int", restrict=True),) if p["MASK"] == "bool" else ())
    return KernelArgs(Signature("pscl_masked_vmm_split", (
        Pointer("x", "float", restrict=True), Scalar("x_off", np.int64),        # (M, K)
        Pointer("wt", "float", restrict=True),                       # (N, K), row stride ldw
        *selection,
        Pointer("out", "float", const=False, restrict=True), Scalar("out_off", np.int64),
        Scalar("N", np.int32), Scalar("K", np.int32), Scalar("ldw", np.int32),
        Scalar("n_entries", np.int32))))                          # N (bool) or n_keep (idx)


def template_args(params, mask: str = "bool", aligned: bool = False, list_in_kernel: bool = False
                  ) -> dict:
    """The tile parameters, the mask's form, whether weight rows start at whole vectors
    (``aligned``), whether the kernel lists a bool mask itself (``list_in_kernel``), and
    the kernel's arguments."""
    return dict(params, KIND="vmm_split", MASK=mask, ALIGNED=int(aligned),
                LIST_IN_KERNEL=int(list_in_kernel), ARGS=kernel_args)


def launch(queue, params, x_dev, rows, ldw, form: str, mask_dev, out_dev, n_cols: int,
           k_in: int, n_entries: int, wait, events, list_in_kernel_max_n: int):
    """Enqueue the listing (if any) and the product; returns the product's event."""
    ctx = queue.context
    in_kernel = form == "bool" and n_cols <= list_in_kernel_max_n
    if form == "bool" and not in_kernel:
        alloc = runtime.memory_pool(ctx)
        cols = runtime.empty(queue, (n_cols,), np.int32, allocator=alloc)
        counts = runtime.empty(queue, (1,), np.int32, allocator=alloc)
        compact = masked_util.kernels(ctx, "pscl_bool_compact")["pscl_bool_compact"]
        ev = compact.launch(queue, (256,), (256,), dict(
            mask=mask_dev.base_data, mask_off=elem_offset(mask_dev), cols=cols.data,
            counts=counts.data, out=out_dev.base_data, out_off=elem_offset(out_dev),
            N=np.int32(n_cols)), wait_for=wait or None)
        wait = [ev]
        if events is not None:
            events.append(ev)
        selection = dict(list=cols.data, list_off=np.int64(0), counts=counts.data)
    elif in_kernel:
        selection = dict(mask=mask_dev.base_data, mask_off=elem_offset(mask_dev))
    else:
        selection = dict(list=mask_dev.base_data, list_off=elem_offset(mask_dev))
    name = "pscl_masked_vmm_split"
    aligned = ldw % params["VEC"] == 0
    kern = runtime.kernels(ctx, TEMPLATE, (name,),
                           **template_args(params, form, aligned, in_kernel))[name]
    items = params["SPLIT"] * params["TEAMS"]
    groups = -(-n_entries // (params["TEAMS"] * params["GROUP"]))
    return kern.launch(queue, (groups * items, 1), (items, 1), dict(
        x=x_dev.base_data, x_off=elem_offset(x_dev), wt=rows.data, **selection,
        out=out_dev.base_data, out_off=elem_offset(out_dev), N=np.int32(n_cols),
        K=np.int32(k_in), ldw=np.int32(ldw), n_entries=np.int32(n_entries)),
        wait_for=wait or None)
