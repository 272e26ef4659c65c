"""drs_project_compact: the search's projection of compact rows (a :class:`CompactRows` x),
out[i, :] = sum_t values[i, t] * RT[idx[i, t], :] -- an axpy of contiguous rows of RT =
R^T / sqrt(k) per nonzero entry, n_keep x k_pad multiply-adds per row where drs_project
spends d x k_pad.  A work-item owns ROWS rows and KVEC vectors of k (ROWS * KVEC
accumulators, no barriers); by default (KVEC = 0) all of k, so that each index and value
loaded feeds every vector: the kernel is bound by the RT rows it gathers (one 64-byte
line per FMA from L2 on a CPU, where drs_project shares each load between 8 rows), and
the fewer the loads that are not RT, the better.  The output is drs_project's (n_rows,
k_pad) layout with zero padding columns (its k_pad may differ: k is rounded up to this
family's chunk), summed in the same order: bitwise equal to the unsplit dense projection
of the rows' dense form when the indices ascend.

The GPU shape is a setting of the same kernel: K_FASTEST = 1 runs a work-group's lanes
along k (each RT row read coalesced, each index a broadcast), and UNROLL issues several
entries' loads before their FMAs (in order), so that a lane does not wait out an index
load and then its RT load per entry (tuned on the H200: VEC 1, KVEC 2, UNROLL 4, 32
lanes).  No barriers, no local memory."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..ops._common import elem_offset, round_up
from ..params import Constraint, ParamSpec, TileParam

TEMPLATE = "drs_project_compact.cl.mako"

#: Vector accumulators a work-item may keep (ROWS * vectors per item), as drs_project's.
MAX_ACCUMULATORS = 16

SPEC = ParamSpec(
    family="drs_project_compact",
    params=(
        TileParam("VEC", 16, (1, 4, 8, 16), "projected dimensions per vector (one FMA each)"),
        TileParam("ROWS", 2, (1, 2, 4, 8),
                  "rows per work-item, each its own gathers (independent FMA chains)"),
        TileParam("KVEC", 0, (0, 1, 2, 4),
                  "vectors of projected dimensions per work-item; 0: all of k in as few "
                  "even chunks as MAX_ACCUMULATORS allows (each index then feeds them all)"),
        TileParam("WG", 1, (1, 2, 4, 8, 16, 32, 64), "work-items per work-group"),
        TileParam("UNROLL", 1, (1, 2, 4, 8),
                  "entries per step, all their loads issued before their FMAs (GPUs: "
                  "gathers in flight), the sums in order"),
        TileParam("K_FASTEST", 0, (0, 1),
                  "1: a work-group spans k chunks of one row block (GPUs: coalesced RT "
                  "rows); 0: it spans row blocks"),
    ),
    constraints=(
        Constraint("accumulators_fit_registers",
                   lambda p: p["ROWS"] * max(p["KVEC"], 1) <= MAX_ACCUMULATORS,
                   "ROWS * KVEC vector accumulators must fit the register file"),
        Constraint("loads_fit_registers",
                   lambda p: p["UNROLL"] == 1 or
                   0 < p["ROWS"] * p["UNROLL"] * p["KVEC"] <= MAX_ACCUMULATORS,
                   "an unrolled step's ROWS * UNROLL * KVEC loaded vectors must fit the "
                   "register file (KVEC = 0, a register budget of its own, takes none)"),
    ),
    work_group_size=lambda p: p["WG"],
)


def vectors_per_item(params, k: int) -> int:
    """Vectors of k per work-item: KVEC, or for KVEC = 0 the ceil(k / VEC) vectors of k
    split into the fewest even chunks of at most MAX_ACCUMULATORS / ROWS."""
    if params["KVEC"]:
        return params["KVEC"]
    n_vec = max(1, -(-k // params["VEC"]))
    chunks = -(-n_vec // max(1, MAX_ACCUMULATORS // params["ROWS"]))
    return -(-n_vec // chunks)


def k_chunk(params, k: int) -> int:
    """Projected dimensions per work-item: the output and RT have k padded to a multiple
    of it (with KVEC = 0, k rounded up to whole vectors where the budget allows)."""
    return params["VEC"] * vectors_per_item(params, k)


_I32 = np.int32

#: pscl_drs_project_compact's arguments.
SIGNATURE = Signature("pscl_drs_project_compact", (
    Pointer("values", "float", restrict=True), Scalar("values_off", np.int64),  # (n_rows,
    Pointer("idx", "int", restrict=True), Scalar("idx_off", np.int64),          # n_keep)
    Scalar("n_rows", _I32), Scalar("n_keep", _I32), Scalar("d", _I32),
    Pointer("rt", "float", restrict=True), Scalar("k_pad", _I32),               # (d, k_pad)
    Pointer("out", "float", const=False, restrict=True), Scalar("ld_out", _I32)))
ARGS = KernelArgs(SIGNATURE)


def template_args(params, k: int) -> dict:
    """The tile parameters, with KVEC the vectors each work-item actually keeps."""
    return dict(params, KVEC=vectors_per_item(params, k), ARGS=ARGS)


def grid(params, n_rows: int, k: int, k_pad: int):
    """(global, local) sizes: row blocks by k chunks, in the order K_FASTEST says."""
    blocks, chunks = -(-n_rows // params["ROWS"]), k_pad // k_chunk(params, k)
    if params["K_FASTEST"]:
        return (round_up(chunks, params["WG"]), blocks), (params["WG"], 1)
    return (round_up(blocks, params["WG"]), chunks), (params["WG"], 1)


def launch(queue, params, values, idx, n_rows: int, n_keep: int, d: int, rt, k: int,
           k_pad: int, out, ld: int, wait):
    """Enqueue out[:n_rows, :k_pad] = f of the compact rows (``values``, ``idx``: device
    arrays (n_rows, n_keep), any offset) for a projection to ``k`` dimensions; ``k_pad``
    a multiple of :func:`k_chunk`, ``rt`` (d, k_pad)."""
    kern = runtime.kernels(queue.context, TEMPLATE, ("pscl_drs_project_compact",),
                           **template_args(params, k))["pscl_drs_project_compact"]
    return kern.launch(queue, *grid(params, n_rows, k, k_pad), {
        "values": values.base_data, "values_off": elem_offset(values), "idx": idx.base_data,
        "idx_off": elem_offset(idx), "n_rows": _I32(n_rows), "n_keep": _I32(n_keep),
        "d": _I32(d), "rt": rt.data, "k_pad": _I32(k_pad), "out": out.data,
        "ld_out": _I32(ld)}, wait_for=wait or None)
