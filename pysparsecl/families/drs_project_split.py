"""drs_project_split: the GPU-shaped projection (drs_project's template body with DSPLIT >
1).  A work-group of DSPLIT items owns a (ROWS, VEC * KVEC) output tile; item t sums the
products over j = t, t + DSPLIT, ... (coalesced reads of A's rows) and the partial sums
meet in a tree in local memory.  A serial loop over all of d left a GPU mostly idle."""

from __future__ import annotations

from ..params import Constraint, ParamSpec, TileParam
from . import LOCAL_MEM_BYTES, drs_project

TEMPLATE = drs_project.TEMPLATE    # one body, rendered with DSPLIT > 1


def reduction_vectors(p) -> int:
    """Vectors of the reduction buffer: DSPLIT partial (ROWS, KVEC vectors) tiles."""
    return p["DSPLIT"] * p["ROWS"] * p["KVEC"]


def local_bytes(p) -> int:
    """Local memory: the reduction buffer (the template declares it from
    reduction_vectors), VEC floats per vector."""
    return 4 * p["VEC"] * reduction_vectors(p)


SPEC = ParamSpec(
    family="drs_project_split",
    params=(
        TileParam("VEC", 4, (4, 8, 16), "projected dimensions per vector (one FMA each)"),
        TileParam("ROWS", 8, (1, 2, 4, 8), "input rows per work-group, sharing each load of R"),
        TileParam("KVEC", 2, (1, 2, 4), "vectors of projected dimensions per work-group"),
        TileParam("DSPLIT", 64, (32, 64, 128, 256),
                  "work-items sharing one output tile, each summing a d / DSPLIT share, "
                  "reduced in local memory"),
    ),
    constraints=drs_project.TILE_CONSTRAINTS + (
        Constraint("reduction_fits_local_memory", lambda p: local_bytes(p) <= LOCAL_MEM_BYTES,
                   "the DSPLIT partial tiles fit 32 KiB of local memory"),
    ),
    work_group_size=lambda p: p["DSPLIT"],
    local_memory=local_bytes,
)


def template_args(params, transposed: bool = False) -> dict:
    """The tile parameters, whether the output is written transposed, and the work-group
    size (WG = DSPLIT) of the shared body; its kernel's arguments are drs_project's."""
    return dict(params, KIND="project_split", WG=params["DSPLIT"], TRANSPOSED=int(transposed),
                RED_VECS=reduction_vectors(params), ARGS=drs_project.PROJECT_ARGS)


def launch(queue, params, a_dev, n_rows: int, d: int, lda: int, rt, k_pad: int, out, ld: int,
           transposed: bool, wait):
    """Enqueue out = A @ RT; one work-group per row block and k chunk (an exact grid)."""
    items, chunks = -(-n_rows // params["ROWS"]), k_pad // (params["VEC"] * params["KVEC"])
    sizes = ((items * params["DSPLIT"], chunks), (params["DSPLIT"], 1))
    return drs_project.enqueue(queue, template_args(params, transposed), sizes, a_dev, n_rows,
                               d, lda, rt, k_pad, out, ld, wait)
