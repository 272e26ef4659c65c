"""Dimension-reduction search (DSG, Liu et al., ICLR 2019): validation, routine choice and
delivery; the kernels are the families drs_project(_split), drs_project_compact (for a
CompactRows x), drs_scores, drs_fused and drs_topk(_team) in pysparsecl/families.

:func:`drs_mask` predicts, for each row of ``x @ w``, which ``n_keep`` outputs are the
largest, from a cheap low-dimensional estimate: f(z) = R z / sqrt(k) applied to the rows
of x and to the columns of w, with R a sparse random sign matrix
(:class:`SparseRandomProjection`), then Y_hat = f(x) f(w) and an exact top-k per row.
Everything after the projection of R itself runs on the device.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Optional, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import scipy.sparse as sp

from .. import runtime, tuning
from ..families import (
    drs_conv_project_tiled,
    drs_fused,
    drs_project,
    drs_project_compact,
    drs_project_split,
    drs_scores,
    drs_topk,
    drs_topk_team,
    masked_conv,
    training,
)
from ..kernel_args import KernelArgs, Pointer, Scalar, Signature
from ..params import Choice, Routine, TileParam
from ._common import (
    INT32_MAX,
    at_offset_zero,
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
    written,
)
from ._prepared import PreparedCache
from .compact import CompactRows
from .masked import (
    MaskedLinearWeight,
    masked_matmul_shape_class,
    weight_rows,
    weight_shape,
)

__all__ = ["DRS_PROJECT", "DRS_PROJECT_SPLIT", "DRS_PROJECT_COMPACT", "DRS_SCORES",
           "DRS_FUSED", "DRS_TOPK", "DRS_TOPK_TEAM", "DRS_CONV_PROJECT_TILED", "DRS_ROUTINE",
           "JL_CONSTANT",
           "PROJECT_WEIGHT", "PROJECT_WINDOWS", "project_shape_class",
           "project_compact_shape_class",
           "SparseRandomProjection", "ProjectedWeight", "drs_mask", "drs_mask_conv2d",
           "random_mask", "default_k", "keep_count"]

#: C in the default k = ceil(C * ln(d) / eps^2).  See :func:`default_k` for the choice.
JL_CONSTANT = 2.0

#: Shape class of DRS_PROJECT for the weight's projection (see project_shape_class).
PROJECT_WEIGHT = "weight"
#: Shape class of DRS_PROJECT for the convolution windows' projection (drs_mask_conv2d).
PROJECT_WINDOWS = "windows"


def project_shape_class(n_rows: Optional[int], d: int) -> str:
    """DRS_PROJECT's shape class: ``weight`` for the weight's projection (n_rows None),
    done once per weight update; for the rows' projection, done on every search, the rows
    and d rounded down to powers of two, e.g. ``rows-m1024-d2048``."""
    if n_rows is None:
        return PROJECT_WEIGHT
    return f"rows-m{tuning.pow2_floor(n_rows)}-d{tuning.pow2_floor(d)}"


def project_compact_shape_class(n_rows: int, n_keep: int) -> str:
    """DRS_PROJECT_COMPACT's shape class: the rows and each row's entries rounded down to
    powers of two, e.g. ``rows-m128-nnz256`` (d does not matter: the work is n_keep per
    row)."""
    return f"rows-m{tuning.pow2_floor(n_rows)}-nnz{tuning.pow2_floor(n_keep)}"

# Each kernel family is a module of its own (pysparsecl/families); the routine chooses.
DRS_PROJECT = drs_project.SPEC
DRS_PROJECT_SPLIT = drs_project_split.SPEC
#: The projection of a CompactRows x (chosen by the input's form, not by the routine).
DRS_PROJECT_COMPACT = drs_project_compact.SPEC
DRS_SCORES = drs_scores.SPEC
DRS_FUSED = drs_fused.SPEC
DRS_TOPK = drs_topk.SPEC
DRS_TOPK_TEAM = drs_topk_team.SPEC
DRS_CONV_PROJECT_TILED = drs_conv_project_tiled.SPEC

DRS_ROUTINE = Routine(
    "drs_mask",
    (Choice("PROJECT_KERNEL", (DRS_PROJECT, DRS_PROJECT_SPLIT),
            "the projection: a work-item per tile (CPUs), or DSPLIT items sharing the sum "
            "over d (GPUs)"),
     Choice("TOPK_KERNEL", (DRS_TOPK, DRS_TOPK_TEAM),
            "the top-k: a work-item per row (CPUs), or a work-group per row (GPUs)"),
     Choice("WINDOWS_KERNEL", (DRS_PROJECT, DRS_CONV_PROJECT_TILED),
            "a convolution's projection of its windows: a work-item per block of pixels "
            "under drs_project's tiles (CPUs), or an implicit GEMM whose windows are staged "
            "through local memory (GPUs)")),
    thresholds=(
        TileParam("FUSED_MAX_ROWS", 4, (0, 1, 2, 4, 8),
                  "rows up to which one launch projects and scores (drs_fused); 0: never"),
    ),
    by_threshold={"drs_fused": {"FUSED_MAX_ROWS": 8}},
)

_FAMILIES = {DRS_PROJECT: drs_project, DRS_PROJECT_SPLIT: drs_project_split,
             DRS_TOPK: drs_topk, DRS_TOPK_TEAM: drs_topk_team}


def default_k(d: int, eps: float = 0.5) -> int:
    """The default projected dimension: ``min(d, ceil(C * ln(d) / eps**2))``, C = 2.

    Why C = 2: with s = 3, R's entries have the Gaussian fourth moment, so an estimated
    output <f(x), f(w)> has variance (|x|^2 |w|^2 + <x, w>^2) / k: its one-sigma error is
    about |x| |w| / sqrt(k) = |x| |w| * eps / sqrt(C ln d).  C = 2 keeps that near eps/4
    of |x| |w| for layer widths 256..4096 (k = 45..67 at eps = 0.5), while the search
    costs about k/d of the dense product (18% at d = 256, 5% at 1024, 1.6% at 4096).  The
    Johnson-Lindenstrauss constant that preserves *all* pairwise distances within 1 +- eps
    (Dasgupta-Gupta, as in scikit-learn: C = 4 / (1/2 - eps/3), 12 at eps = 0.5) would
    give k ~ d/3 at d = 1024: the search would cost a third of the layer it is meant to
    skip, while the mask only needs each row's ranking.  Pass ``k`` to choose otherwise;
    k is capped at d, where the projection stops saving anything.
    """
    if d <= 1:
        return 1
    return int(min(d, max(1, math.ceil(JL_CONSTANT * math.log(d) / eps ** 2))))


def keep_count(sparsity, n_cols: int) -> int:
    """n_keep = ceil((1 - sparsity) * N), computed exactly from the decimal value of
    ``sparsity`` (so 0.8 of 10 keeps 2, not 3 as float rounding would)."""
    sparsity = _check_sparsity(sparsity)
    return int(math.ceil((1 - Fraction(repr(float(sparsity)))) * n_cols))


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a real number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    return float(eps)


class SparseRandomProjection:
    """The sparse random projection R (k x d) of the dimension-reduction search.

    R's entries are +sqrt(s), 0 and -sqrt(s) with probabilities 1/(2s), 1 - 1/s and
    1/(2s), s = 3 (Achlioptas), and f(z) = R z / sqrt(k), so E <f(x), f(w)> = <x, w>.
    R is generated once and kept sparse: the sign pattern as a SciPy CSR matrix on the
    host (:meth:`matrix`), and on the device the dense (d, k) copy of R^T / sqrt(k) that
    the projection kernel reads with vector loads.  Reuse one projection across calls.

    Parameters
    ----------
    d : int
        The input dimension (columns of x, rows of w).
    k : int, optional
        The projected dimension; :func:`default_k` (``ceil(2 ln(d) / eps^2)``, at most d)
        when omitted.
    eps : float in (0, 1)
        The target relative error that sets the default k.
    seed : int, optional
        Seed of the generator (NumPy's default_rng); a fresh one is drawn when omitted and
        kept in ``self.seed``, so every projection can be rebuilt.
    exact : bool
        Test mode: R is the identity (k = d unless a larger k is given, extra rows zero)
        and f(z) = z, so the search returns the true top-k.
    queue : pyopencl.CommandQueue, optional
    """

    S = 3

    def __init__(self, d: int, k: Optional[int] = None, eps: float = 0.5,
                 seed: Optional[int] = None, *, exact: bool = False,
                 queue: Optional[cl.CommandQueue] = None):
        self.d = _positive_int(d, "d")
        self.eps = _check_eps(eps)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.seed = int(seed)
        self.exact = bool(exact)
        self.queue = runtime.get_queue(queue)
        if exact:
            self.k = self.d if k is None else _positive_int(k, "k")
            if self.k < self.d:
                raise ValueError(f"exact=True makes R the identity, which needs k >= d = "
                                 f"{self.d}; got k={k}")
            signs = sp.eye(self.k, self.d, dtype=np.int8, format="csr")
            self.scale = 1.0
        else:
            self.k = default_k(self.d, self.eps) if k is None else _positive_int(k, "k")
            u = np.random.default_rng(self.seed).random((self.k, self.d))
            half = 1.0 / (2 * self.S)
            dense = np.zeros((self.k, self.d), np.int8)
            dense[u < half] = 1
            dense[u >= 1.0 - half] = -1
            signs = sp.csr_matrix(dense)
            self.scale = 1.0 / math.sqrt(self.k)
        self._signs = signs
        self._rt = {}


    def matrix(self) -> sp.csr_matrix:
        """R itself, (k, d) CSR float64: entries +-sqrt(s) (1 on the diagonal if exact)."""
        value = 1.0 if self.exact else math.sqrt(self.S)
        return sp.csr_matrix(self._signs.astype(np.float64) * value)

    def device_rt(self, k_pad: int) -> cl_array.Array:
        """R^T / sqrt(k), dense (d, k_pad) float32 with zero padding columns, on the device
        (built once per padding that the kernels' tiles need)."""
        rt = self._rt.get(k_pad)
        if rt is None:
            host = np.zeros((self.d, k_pad), np.float32)
            host[:, :self.k] = (self.matrix().T.toarray() * self.scale).astype(np.float32)
            check_alloc(self.queue, host.nbytes, "the projection matrix")
            rt = self._rt[k_pad] = cl_array.to_device(
                self.queue, host, allocator=runtime.memory_pool(self.queue.context))
        return rt

    def _check_queue(self, queue):
        if queue.context != self.queue.context:
            raise ValueError("the projection lives in a different OpenCL context than the "
                             "queue the operation runs on")

    def project(self, z, *, queue=None, events=None):
        """f(z) = R z / sqrt(k) for each row of ``z``: a float32 array (d,) or (rows, d),
        or a :class:`CompactRows` of that dense shape (``n_cols`` = d, host or device),
        whose rows cost k x n_keep multiply-adds each instead of k x d.

        Returns (k,) or (rows, k) float32, in the container ``z`` (a CompactRows: its
        arrays) came in.
        """
        if isinstance(z, CompactRows):
            if z.n_cols != self.d:
                raise ValueError(f"z (a CompactRows) must have n_cols = d = {self.d}, got "
                                 f"{z.n_cols}")
            if self.exact:      # R is the identity: f(z) is z's dense form
                return self.project(z.to_dense(queue=queue), queue=queue, events=events)
            queue = runtime.resolve_queue(queue or (None if z.is_device else self.queue),
                                          z=z.values, z_idx=z.idx)
            self._check_queue(queue)
            rows, like = z.n_rows, z.values
            out_shape = (self.k,) if z.vector else (rows, self.k)
            padded, ld = self._project_compact(queue, z, events)
            return self._unpadded(queue, padded, ld, rows, out_shape, like)
        require_array(z, "z", np.float32)
        if z.ndim not in (1, 2) or z.shape[-1] != self.d:
            raise ValueError(f"z must have shape (d,) or (rows, d) with d = {self.d}, got "
                             f"{tuple(z.shape)}")
        queue = runtime.resolve_queue(queue or (None if is_device_array(z) else self.queue),
                                      z=z)
        self._check_queue(queue)
        rows = 1 if z.ndim == 1 else z.shape[0]
        out_shape = (self.k,) if z.ndim == 1 else (rows, self.k)
        if self.exact:
            full = np.zeros((rows, self.k), np.float32)
            if is_device_array(z):
                out = cl_array.zeros(queue, out_shape, np.float32)
                if rows and self.d:
                    cl.enqueue_copy(queue, out.data, z.base_data, src_origin=(z.offset, 0, 0),
                                    dst_origin=(0, 0, 0), region=(4 * self.d, rows, 1),
                                    src_pitches=(4 * self.d, 0), dst_pitches=(4 * self.k, 0))
                return out
            full[:, :self.d] = z.reshape(rows, self.d)
            return full.reshape(out_shape)
        padded, ld = self._project_rows(queue, to_device(z, queue, "z"), rows, events)
        return self._unpadded(queue, padded, ld, rows, out_shape, z)

    def _unpadded(self, queue, padded, ld, rows, out_shape, like):
        """The first k columns of the padded projection (rows, ld), shaped ``out_shape``,
        on the host (a NumPy ``like``) or in a new device array."""
        if not is_device_array(like):
            return np.ascontiguousarray(padded.get(queue=queue)[:, :self.k]).reshape(out_shape)
        out = runtime.empty(queue, out_shape, np.float32,
                            allocator=runtime.memory_pool(queue.context))
        if rows:
            # Drop the padding columns: a rectangular copy, rows of 4k bytes.
            cl.enqueue_copy(queue, out.data, padded.data, src_origin=(0, 0, 0),
                            dst_origin=(0, 0, 0), region=(4 * self.k, rows, 1),
                            src_pitches=(4 * ld, 0), dst_pitches=(4 * self.k, 0))
        return out

    def _tiles(self, queue, n_rows: Optional[int]):
        """The projection kernel's family, tiles and padded k for ``n_rows`` rows (None:
        a weight's projection)."""
        # The weight's projection (once per weight update) and the rows' (every search)
        # have their own shape classes: tuned together, the weight's larger time chose the
        # tiles for both.
        family = _FAMILIES[DRS_ROUTINE.variant(tuning.lookup(DRS_ROUTINE.spec, queue.device),
                                               "PROJECT_KERNEL")]
        params = tuning.lookup(family.SPEC, queue.device, project_shape_class(n_rows, self.d))
        return family, params, round_up(self.k, params["VEC"] * params["KVEC"])

    def weight_layout(self, n_cols: int, queue=None) -> Tuple[int, int]:
        """(k_pad, ld): the shape of the device array holding f(w) for a weight of
        ``n_cols`` outputs on ``queue``'s device (see :meth:`project_weight`'s ``out``)."""
        queue = runtime.get_queue(queue or self.queue)
        return self._tiles(queue, None)[2], round_up(max(n_cols, 1), drs_project.PAD)

    @runtime.capturable_op
    def project_rows(self, x, *, queue=None, events=None) -> cl_array.Array:
        """f(x) for the rows of a device array ``x`` (M, d), or of a device
        :class:`CompactRows` of that dense shape (``n_cols`` = d; k x n_keep multiply-adds
        per row): an (M, k_pad) device array whose padding columns are zero, the form
        :func:`drs_mask`'s ``x_projected`` takes (a caller that also needs f(x), e.g. for
        f of a weight gradient, projects once).  k_pad depends on the kernel (and so on
        the input's form); only the first k columns are f(x)."""
        if isinstance(x, CompactRows):
            if not x.is_device:
                raise TypeError("x must be a CompactRows of pyopencl arrays (project() takes "
                                "NumPy)")
            if x.vector:
                raise ValueError(f"x must be 2-D (M, d), got a vector CompactRows of shape "
                                 f"{x.shape}")
            if x.n_cols != self.d:
                raise ValueError(f"x (a CompactRows) must have n_cols = d = {self.d}, got "
                                 f"{x.n_cols}")
        else:
            require_array(x, "x", np.float32, ndim=2)
            if not is_device_array(x):
                raise TypeError("x must be a pyopencl array (project() takes NumPy)")
            if x.shape[1] != self.d:
                raise ValueError(f"x must have d = {self.d} columns, got {tuple(x.shape)}")
        if self.exact:
            raise ValueError("an exact projection has no padded form: the search reads x")
        if isinstance(x, CompactRows):
            queue = runtime.resolve_queue(queue, x=x.values, x_idx=x.idx)
            self._check_queue(queue)
            return self._project_compact(queue, x, events)[0]
        queue = runtime.resolve_queue(queue, x=x)
        self._check_queue(queue)
        return self._project_rows(queue, x, x.shape[0], events)[0]

    def _project_compact(self, queue, x: CompactRows, events, borrow: bool = False):
        """f of the rows of a CompactRows (host or device) on the device, by
        drs_project_compact: ((n_rows, k_pad) array with zero padding columns, k_pad).
        ``borrow``: lend host arrays in place (only for a call that waits for its result,
        see ops._common.to_device)."""
        values, idx = x.rows()
        n_rows, n_keep = values.shape
        params = tuning.lookup(DRS_PROJECT_COMPACT, queue.device,
                               project_compact_shape_class(n_rows, n_keep), copy=False)
        kp = round_up(self.k, drs_project_compact.k_chunk(params, self.k))
        check_alloc(queue, 4 * n_rows * kp, "the projection")
        out = runtime.empty(queue, (n_rows, kp), np.float32,
                            allocator=runtime.memory_pool(queue.context))
        if not out.size:
            return out, kp
        if not n_keep:              # every row is zero, and so is its projection
            runtime.fill_array(queue, out, 0)
            return out, kp
        v_dev = to_device(values, queue, "x", borrow)
        i_dev = to_device(idx, queue, "x_idx", borrow)
        rt = self.device_rt(kp)
        ev = drs_project_compact.launch(queue, params, v_dev, i_dev, n_rows, n_keep, self.d,
                                        rt, self.k, kp, out, kp, list(v_dev.events) +
                                        list(i_dev.events) + list(rt.events))
        out.add_event(ev)
        if events is not None:
            events.append(ev)
        return out, kp

    def _project_rows(self, queue, a_dev, n_rows, events, *, lda=None, transposed_ld=None,
                      into=None):
        """A @ RT on the device: (n_rows, k_pad), or (k_pad, transposed_ld) when
        ``transposed_ld`` is given (written ``into`` a given array of that shape, which
        starts at offset 0 of its buffer, if one is given).  Returns (array, its row
        length)."""
        lda = self.d if lda is None else lda
        alloc = runtime.memory_pool(queue.context)
        family, params, kp = self._tiles(queue, None if transposed_ld is not None else n_rows)
        if transposed_ld is None:
            shape, ld = (n_rows, kp), kp
        else:
            shape, ld = (kp, transposed_ld), transposed_ld
        check_alloc(queue, 4 * shape[0] * shape[1], "the projection")
        out = into if into is not None else runtime.empty(queue, shape, np.float32,
                                                          allocator=alloc)
        wait = list(a_dev.events)
        if transposed_ld is not None and transposed_ld > n_rows:
            # Padding columns are read (whole vectors) but never used: keep them finite.
            wait.append(runtime.enqueue_fill(queue, out.data, np.float32(0), 0, out.nbytes))
        if n_rows == 0 or out.size == 0:
            return out, ld
        rt = self.device_rt(kp)
        ev = family.launch(queue, params, a_dev, n_rows, self.d, lda, rt, kp, out, ld,
                           transposed_ld is not None, wait + list(rt.events))
        out.add_event(ev)
        if events is not None:
            events.append(ev)
        return out, ld

    def project_weight(self, w, *, out=None, queue=None, events=None) -> "ProjectedWeight":
        """f(w) for the columns of ``w`` ((d, N) float32 array or a MaskedLinearWeight),
        kept on the device for reuse until the weight changes (or, in ``out``, updated
        by the caller: see :class:`ProjectedWeight`)."""
        return ProjectedWeight(self, w, out=out, queue=queue, events=events)

    def __repr__(self):
        return (f"SparseRandomProjection(d={self.d}, k={self.k}, eps={self.eps}, "
                f"seed={self.seed}{', exact=True' if self.exact else ''})")


#: The arguments of drs_util.cl.mako's pscl_drs_pad_transpose (ProjectedWeight._exact):
#: src (N, d) rows with row stride ld_src -> dst (d, ld), columns N..ld-1 zero.
PAD_TRANSPOSE_ARGS = KernelArgs(Signature("pscl_drs_pad_transpose", (
    Pointer("src", "float", restrict=True), Scalar("src_off", np.int64),
    Pointer("dst", "float", const=False, restrict=True),
    *(Scalar(n, np.int32) for n in ("N", "d", "ld_src", "ld")))))


class ProjectedWeight:
    """f(w) = R w / sqrt(k) for a weight w (d, N), on the device, ready for :func:`drs_mask`.

    Build it with :meth:`SparseRandomProjection.project_weight` and pass it as
    ``drs_mask(..., projection=pw)`` to reuse it across calls; build a new one after the
    weight changes (it is a snapshot).

    ``out``: a float32 device array of shape ``projection.weight_layout(N)`` (k_pad, ld),
    starting on the device's base alignment, that holds f(w) from then on, in place.  Its
    owner may keep it equal to f of a changing weight: f is linear, so an SGD step of w
    with gradient g is the same SGD step of f(w) with gradient f(g) (what
    ``pysparsecl.dsg`` does).  Rows k.. and columns N.. must stay finite.
    """

    def __init__(self, projection: SparseRandomProjection, w, *, out=None, queue=None,
                 events=None):
        if not isinstance(projection, SparseRandomProjection):
            raise TypeError("projection must be a SparseRandomProjection, got "
                            f"{type(projection).__name__}")
        d, n_cols = weight_shape(w)
        if d != projection.d:
            raise ValueError(f"w has {d} rows (in_features) but the projection has d = "
                             f"{projection.d}")
        if queue is None:
            queue = w.queue if isinstance(w, MaskedLinearWeight) else (
                None if is_device_array(w) else projection.queue)
        queue = runtime.resolve_queue(queue, w=w if is_device_array(w) else None)
        projection._check_queue(queue)
        self.projection = projection
        self.in_features = d
        self.out_features = n_cols
        self.ld = round_up(max(n_cols, 1), drs_project.PAD)
        self.queue = queue
        if isinstance(w, MaskedLinearWeight) and w.queue.context != queue.context:
            raise ValueError("w (a MaskedLinearWeight) lives in a different OpenCL context "
                             "than the projection")
        into = None
        if out is not None:
            layout = projection.weight_layout(n_cols, queue)
            if not is_device_array(out) or out.dtype != np.float32 or \
                    tuple(out.shape) != layout:
                raise ValueError(f"out must be a float32 device array of shape {layout} "
                                 "(projection.weight_layout(N))")
            if projection.exact:
                raise ValueError("out is for random projections (an exact one is w itself)")
            into = at_offset_zero(out, queue)
            if into is None:
                raise ValueError("out must be contiguous and start on the device's base "
                                 "alignment")
        if projection.exact and not isinstance(w, MaskedLinearWeight) and \
                not is_device_array(w):
            host = np.zeros((d, self.ld), np.float32)
            host[:, :n_cols] = w
            self.values = cl_array.to_device(queue, host, allocator=runtime.memory_pool(
                queue.context))
            return
        # The columns of w are the rows of W^T (N, d), which the kernels read whole.
        rows, ld_rows = weight_rows(w, d, queue, events)
        if projection.exact:
            self.values = self._exact(queue, rows, ld_rows, events)
        else:
            self.values, _ = projection._project_rows(queue, rows, n_cols, events,
                                                      lda=ld_rows, transposed_ld=self.ld,
                                                      into=into)

    @property
    def k(self) -> int:
        return self.projection.k

    def _exact(self, queue, rows, ld_rows, events):
        """The identity projection: w itself, as (d, ld) zero padded, from its rows."""
        d, n_cols = self.in_features, self.out_features
        out = runtime.zeros(queue, (d, self.ld), np.float32,
                            allocator=runtime.memory_pool(queue.context))
        if d and n_cols:
            kern = runtime.kernels(queue.context, "drs_util.cl.mako", ("pscl_drs_pad_transpose",),
                                   KIND="util", ARGS=PAD_TRANSPOSE_ARGS)["pscl_drs_pad_transpose"]
            ev = kern.launch(queue, (self.ld, d), None, {
                "src": rows.base_data, "src_off": elem_offset(rows), "dst": out.data,
                "N": np.int32(n_cols), "d": np.int32(d), "ld_src": np.int32(ld_rows),
                "ld": np.int32(self.ld)}, wait_for=(list(rows.events) + list(out.events)) or None)
            out.add_event(ev)
            if events is not None:
                events.append(ev)
        return out

    def to_numpy(self) -> np.ndarray:
        """f(w), (k, N) float32, copied to the host."""
        return self.values.get(queue=self.queue)[:self.k, :self.out_features].copy()


@runtime.capturable_op
def drs_mask(x, w, sparsity, *, eps=0.5, k=None, projection=None, seed=None, compact=False,
             x_projected=None, out=None, queue=None, events=None):
    """Dimension-reduction search: predict each row's ``n_keep`` largest outputs of x @ w.

    Y_hat = f(x) f(w) with f(z) = R z / sqrt(k) (see :class:`SparseRandomProjection`),
    then each row keeps exactly ``n_keep = ceil((1 - sparsity) * N)`` entries, the largest
    of Y_hat, ties toward the lower column (NaN ranks below every number).  All of it runs
    on the device.

    Parameters
    ----------
    x : float32 array (M, d) or (d,), NumPy or pyopencl; or a :class:`CompactRows` of
        that dense shape (``n_cols`` = d; NumPy or pyopencl arrays, treated as a NumPy or
        a device x): the rows' nonzero entries.  f(x) then costs k x n_keep multiply-adds
        per row instead of k x d (family drs_project_compact, also for a few rows), and
        the selection is that of x's dense form (bit for bit where the dense search
        projects with drs_project, summing over d in order: the CPU routine; the GPU
        routine's drs_project_split sums in another order, which may swap near-ties at
        the top-k boundary).  With an exact projection its dense form (built on the
        device, or on the host for NumPy arrays) is searched as a dense x.
    w : float32 array (d, N), or a :class:`MaskedLinearWeight`; when ``projection`` is a
        :class:`ProjectedWeight`, ``w`` may be None (it is only checked against it).
    sparsity : float in [0, 1)
    eps, k, seed : how to build the projection when ``projection`` is None (a new one per
        call: pass ``projection`` to reuse one).  Given together with ``projection`` they
        must agree with it.
    projection : :class:`SparseRandomProjection` (reuse R, project w on this call) or
        :class:`ProjectedWeight` (reuse R and f(w) between weight updates), optional.
    compact : bool
        False: a bool (M, N) mask.  True: int32 (M, n_keep) column indices, ascending in
        each row (the compact form :func:`masked_matmul` accepts).
    x_projected : f(x), the device array ``projection.projection.project_rows(x)`` gave,
        optional (with a :class:`ProjectedWeight` and a device ``x``, dense or a
        CompactRows of device arrays): the search then does not project x again.
    out : array for the result (bool (M, N) or int32 (M, n_keep)), optional.
    queue : pyopencl.CommandQueue, optional.
    events : list, optional; the kernels' OpenCL events are appended (for profiling).

    Returns
    -------
    The mask, in the kind of container ``x`` (a CompactRows: its arrays) came in; 1-D for a
    1-D ``x`` (or a vector CompactRows).

    Copies and caches
    -----------------
    With a :class:`SparseRandomProjection` as ``projection`` and a NumPy ``w``, f(w) is
    kept for the array while it lives and is unchanged (compared on each call; see
    ``pysparsecl.clear_weight_cache``); a :class:`ProjectedWeight` avoids even the
    comparison.
    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends its inputs and its new results to the kernels in place, with no copy, except
    that operands up to 256 KiB go through a staging buffer the thread keeps (a memcpy);
    elsewhere they are copied to and from the device.  A host CompactRows's two arrays go
    the same way (with an exact projection, its dense form is made on the host first).  A
    NumPy call returns when its result is ready; a device-array call returns once it is
    enqueued.
    """
    cx = x if isinstance(x, CompactRows) else None
    if cx is not None:      # xa: the array whose container the result follows
        xa, vector, n_rows, d = cx.values, cx.vector, cx.n_rows, cx.n_cols
    else:
        require_array(x, "x", np.float32)
        if x.ndim not in (1, 2):
            raise ValueError(f"x must be 1-D (d,) or 2-D (M, d), got shape {tuple(x.shape)}")
        xa, vector = x, x.ndim == 1
        n_rows, d = (1, x.shape[0]) if vector else x.shape
    sparsity = _check_sparsity(sparsity)
    pw = projection if isinstance(projection, ProjectedWeight) else None
    if pw is not None:
        n_cols = pw.out_features
        if w is not None:
            wd, wn = weight_shape(w)
            if (wd, wn) != (pw.in_features, n_cols):
                raise ValueError(f"w has shape {(wd, wn)} but the projected weight was made "
                                 f"from one of shape {(pw.in_features, n_cols)}")
        proj = pw.projection
    else:
        if w is None:
            raise TypeError("w is required unless projection is a ProjectedWeight")
        wd, n_cols = weight_shape(w)
        if wd != d:
            raise ValueError(f"w must have shape (d, N) with d = {d} (the columns of x"
                             f"{'' if cx is None else ', its n_cols'}), got {(wd, n_cols)}")
        proj = projection
    if proj is not None:
        _check_agrees(proj, d, f"x has {d} columns" if cx is None else
                      f"x (a CompactRows) has n_cols = {d}", k=k, seed=seed, eps=eps)
    n_keep = keep_count(sparsity, n_cols)
    out_shape = (n_rows, n_keep) if compact else (n_rows, n_cols)
    out_shape = out_shape[1:] if vector else out_shape
    check_out(out, out_shape, np.int32 if compact else np.bool_, like=xa)
    if queue is None and not is_device_array(xa) and proj is not None:
        queue = proj.queue
    queue = runtime.resolve_queue(queue, x=xa, x_idx=None if cx is None else cx.idx,
                                  w=w if is_device_array(w) else None, out=out)
    if n_rows * max(n_cols, 1) > INT32_MAX:
        raise ValueError(f"the scores have {n_rows * n_cols} elements, more than int32 "
                         "indexing allows")
    dtype = np.int32 if compact else np.bool_
    if x_projected is not None:
        if pw is None or not is_device_array(xa) or vector:
            raise ValueError("x_projected needs a 2-D device x and a ProjectedWeight as "
                             "projection")
        require_array(x_projected, "x_projected", np.float32, ndim=2)
        if x_projected.shape[0] != n_rows or x_projected.shape[1] < proj.k or \
                not x_projected.flags.c_contiguous or x_projected.offset:
            raise ValueError(f"x_projected must be f(x) as project_rows gives it: "
                             f"({n_rows}, >= {proj.k}), contiguous, at offset 0; got "
                             f"{tuple(x_projected.shape)}")
    out_dev, host = new_output(queue, out_shape, dtype, out, like=xa)

    if not out_dev.size:
        pass
    elif n_keep == n_cols:          # keep everything: no search needed
        if compact:
            out_dev.set(np.broadcast_to(np.arange(n_cols, dtype=np.int32),
                                        (n_rows, n_cols)).reshape(out_shape).copy())
        else:
            runtime.enqueue_fill(queue, out_dev.base_data, np.uint8(1), out_dev.offset,
                                   out_dev.nbytes)
    else:
        if proj is None:
            proj = SparseRandomProjection(d, k, eps, seed, queue=queue)
        proj._check_queue(queue)
        if pw is None and projection is not None and isinstance(w, np.ndarray):
            # The caller's projection and a NumPy w: f(w) is kept while w is unchanged.
            pw = _PROJECTED.get(w, (w,), (queue.context.int_ptr, id(proj)),
                                lambda: proj.project_weight(w, queue=queue, events=events))
        elif pw is None:
            pw = proj.project_weight(w, queue=queue, events=events)
        elif pw.queue.context != queue.context:
            raise ValueError("the projected weight lives in a different OpenCL context than "
                             "the queue the operation runs on")
        projected = None if x_projected is None else (x_projected, x_projected.shape[1])
        borrow = not is_device_array(xa)
        if cx is None:
            x_dev = to_device(x, queue, "x", borrow=borrow)
        elif proj.exact and projected is None:
            # R is the identity: the search reads x's dense form, built on the device.
            x_dev = cx.to_dense(queue=queue) if cx.is_device else \
                to_device(cx.to_dense(), queue, "x", borrow=True)
        else:
            # f(x) from the nonzero entries (drs_project_compact), also for a few rows:
            # the fused one-launch kernel reads dense rows.
            x_dev = None
            if projected is None:
                projected = proj._project_compact(queue, cx, events, borrow=borrow)
        _search(queue, x_dev, proj, pw, n_rows, n_keep, out_dev, compact, events,
                projected=projected)
    return deliver(out_dev, xa, out, queue, host)


#: ProjectedWeights kept for the NumPy weights passed with a SparseRandomProjection (each
#: holds its projection, so the id in the key is not reused while the entry lives).
_PROJECTED = PreparedCache("drs_mask projected weights")


@runtime.capturable_op
def random_mask(n_rows: int, n_cols: int, sparsity, *, seed: int, compact: bool = False,
                queue=None, events=None) -> cl_array.Array:
    """DSG's control selection, on the device: each row keeps ``n_keep = ceil((1 -
    sparsity) * N)`` of its ``N`` columns, chosen uniformly at random.

    The same ``seed`` gives the same mask on every device (a hash of the seed, the row and
    the column ranks the columns; the search's own top-k keeps each row's largest).  Use
    a new seed per training step for a fresh selection.

    Parameters
    ----------
    n_rows, n_cols : ints >= 1: the mask's shape (M, N).
    sparsity : float in [0, 1).
    seed : int in [0, 2**64).
    compact : bool: False, a bool (M, N) mask; True, int32 (M, n_keep) column indices,
        ascending in each row (the forms :func:`masked_matmul` accepts).
    queue : pyopencl.CommandQueue, optional.

    Returns
    -------
    A pyopencl array, once enqueued (nothing comes to the host).
    """
    n_rows = _positive_int(n_rows, "n_rows")
    n_cols = _positive_int(n_cols, "n_cols")
    sparsity = _check_sparsity(sparsity)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or \
            not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(compact, bool):
        raise TypeError(f"compact must be a bool, got {type(compact).__name__}")
    if n_rows * n_cols > INT32_MAX:
        raise ValueError(f"the mask has {n_rows * n_cols} entries, more than int32 indexing "
                         "allows")
    queue = runtime.get_queue(queue)
    n_keep = keep_count(sparsity, n_cols)
    alloc = runtime.memory_pool(queue.context)
    out_shape = (n_rows, n_keep) if compact else (n_rows, n_cols)
    check_alloc(queue, 4 * n_rows * n_cols, "the random keys")
    out = runtime.empty(queue, out_shape, np.int32 if compact else np.bool_, allocator=alloc)
    keys = runtime.empty(queue, (n_rows, n_cols), np.uint32, allocator=alloc)
    training.launch_random_keys(queue, tuning.lookup(training.SPEC, queue.device, copy=False),
                                keys, n_rows, n_cols, int(seed), events)
    *_, topk, topk_params = tuning.memoised("drs_mask", queue.device, None, _search_route)
    ev = topk.launch(queue, topk_params, keys, n_cols, n_rows, n_cols, n_keep, out, compact,
                     0, list(keys.events))
    written(out, ev)
    if events is not None:
        events.append(ev)
    return out


def _search_route(look):
    """The search's routing, per device: the fused kernel's row limit and tiles, the
    scores' tiles, and the top-k family the routine chooses with its tiles (read-only)."""
    routine = look(DRS_ROUTINE.spec)
    topk = _FAMILIES[DRS_ROUTINE.variant(routine, "TOPK_KERNEL")]
    return (routine["FUSED_MAX_ROWS"], look(DRS_FUSED), look(DRS_SCORES), topk,
            look(topk.SPEC))


def _search(queue, x_dev, proj: SparseRandomProjection, pw: ProjectedWeight, n_rows, n_keep,
            out_dev, compact, events, projected=None, plane=0):
    """Scores and top-k for the rows of x (or of ``projected``, (rows, ld) already
    projected); ``plane`` = P writes a (rows / P, N, P) convolution mask."""
    ctx = queue.context
    alloc = runtime.memory_pool(ctx)
    n_cols = pw.out_features
    check_alloc(queue, 4 * n_rows * pw.ld, "the search's scores")
    scores = runtime.empty(queue, (n_rows, pw.ld), np.uint32, allocator=alloc)
    fused_max_rows, fused, scores_params, topk, topk_params = tuning.memoised(
        "drs_mask", queue.device, None, _search_route)
    if projected is None and not proj.exact and n_rows <= fused_max_rows and \
            proj.k <= drs_fused.MAX_K:
        # A few rows: projection and scores in one launch, parallel over columns.
        ev = drs_fused.launch(queue, fused, x_dev, proj, pw, scores, n_rows, n_cols,
                              list(x_dev.events) + list(pw.values.events))
    else:
        if projected is not None:
            (xp, ldx), xp_off, k = projected, np.int64(0), proj.k
        elif proj.exact:
            xp, xp_off, ldx, k = x_dev, elem_offset(x_dev), proj.d, proj.d
        else:
            xp, ldx = proj._project_rows(queue, x_dev, n_rows, events)
            xp_off, k = np.int64(0), proj.k
        ev = drs_scores.launch(queue, scores_params, xp, xp_off, ldx, pw, scores, n_rows, k,
                               n_cols, list(xp.events) + list(pw.values.events))
    if events is not None:
        events.append(ev)
    ev = topk.launch(queue, topk_params, scores, pw.ld, n_rows, n_cols, n_keep, out_dev,
                     compact, plane, [ev] + list(out_dev.events))
    written(out_dev, ev)
    if events is not None:
        events.append(ev)


def _check_agrees(proj, d: int, what_d: str, *, k, seed, eps) -> None:
    """Refuse a projection that is not a SparseRandomProjection, or whose d, k, seed or
    eps differ from those the call names (eps 0.5, the default, is left alone)."""
    if not isinstance(proj, SparseRandomProjection):
        raise TypeError("projection must be a SparseRandomProjection or a ProjectedWeight"
                        f", got {type(proj).__name__}")
    if proj.d != d:
        raise ValueError(f"{what_d} but the projection has d = {proj.d}")
    if k is not None and k != proj.k:
        raise ValueError(f"k={k!r} disagrees with the projection's k={proj.k}")
    if seed is not None and seed != proj.seed:
        raise ValueError(f"seed={seed!r} disagrees with the projection's seed={proj.seed}")
    if _check_eps(eps) not in (proj.eps, 0.5):
        raise ValueError(f"eps={eps!r} disagrees with the projection's eps={proj.eps}")


@runtime.capturable_op
def drs_mask_conv2d(x, w, sparsity, *, stride=1, padding=0, dilation=1, eps=0.5, k=None,
                    projection=None, seed=None, kernel_size=None, out=None, queue=None,
                    events=None):
    """Dimension-reduction search for a convolution: for each sample and output position,
    keep the ``n_keep = ceil((1 - sparsity) * K)`` output channels with the largest
    estimated value, giving the bool (N, K, OH, OW) mask that :func:`conv2d_masked` takes.

    The estimate is f(window) . f(w_k), with f the projection of :func:`drs_mask` applied
    to the im2col windows (d = C * R * S, ordered (c, r, s) like ``w.reshape(K, -1)``)
    and to the flattened filters.  The windows are gathered on the device from a padded
    copy of x; the im2col matrix is never formed.

    Parameters
    ----------
    x : float32 (N, C, H, W); w : float32 (K, C, R, S), or None when ``projection`` is a
        ProjectedWeight (then ``kernel_size`` gives R and S).
    sparsity : float in [0, 1).
    stride, padding, dilation : as in ``torch.nn.functional.conv2d``.
    eps, k, seed, projection : as in :func:`drs_mask`, with d = C * R * S; a
        :class:`ProjectedWeight` is built from ``w.reshape(K, -1).T`` (for example
        ``proj.project_weight(MaskedLinearWeight(w.reshape(K, -1), transposed=True))``).
    kernel_size : int or (R, S); required when ``w`` is None, else it must match ``w``.
    out : bool (N, K, OH, OW), optional; queue, events : as in :func:`drs_mask`.

    Returns
    -------
    The mask, in the kind of container ``x`` came in.  Ties go to the lower channel.

    On a device that shares host memory (PoCL's CPU device, integrated GPUs) a NumPy call
    lends its inputs and its new results to the kernels in place, with no copy, except
    that operands up to 256 KiB go through a staging buffer the thread keeps (a memcpy);
    elsewhere they are copied to and from the device.  A NumPy call returns when its
    result is ready; a device-array call returns once it is enqueued.
    """
    require_array(x, "x", np.float32, ndim=4)
    sparsity = _check_sparsity(sparsity)
    n_img, n_ch = x.shape[:2]
    pw = projection if isinstance(projection, ProjectedWeight) else None
    size = None if kernel_size is None else int_pair(kernel_size, "kernel_size", 1)
    if w is not None:
        require_array(w, "w", np.float32, ndim=4)
        k_out, wc, r, s = w.shape
        if wc != n_ch:
            raise ValueError(f"x has {n_ch} channels but w expects C = {wc} (w must be "
                             "(K, C, R, S))")
        if size is not None and size != (r, s):
            raise ValueError(f"kernel_size={kernel_size!r} disagrees with w's {(r, s)}")
    elif pw is None:
        raise TypeError("w is required unless projection is a ProjectedWeight")
    elif size is None:
        raise TypeError("kernel_size is required when w is None: the ProjectedWeight "
                        "knows C * R * S, not R and S")
    else:
        (r, s), k_out = size, pw.out_features
    d = n_ch * r * s
    if pw is not None:
        if (pw.in_features, pw.out_features) != (d, k_out):
            raise ValueError(f"the projected weight was made from a ({pw.in_features}, "
                             f"{pw.out_features}) weight, but the convolution's "
                             f"w.reshape(K, -1).T is ({d}, {k_out})")
        proj = pw.projection
    else:
        proj = projection
    if proj is not None:
        _check_agrees(proj, d, f"the windows have d = C * R * S = {d}", k=k, seed=seed,
                      eps=eps)
    else:
        _check_eps(eps)
    geom = masked_conv.geometry(x.shape, r, s, stride, padding, dilation)
    out_shape = (n_img, k_out, geom["OH"], geom["OW"])
    check_out(out, out_shape, np.bool_, like=x)
    if queue is None and not is_device_array(x) and proj is not None:
        queue = proj.queue
    queue = runtime.resolve_queue(queue, x=x, w=w, out=out)
    n_pix = n_img * geom["OH"] * geom["OW"]
    if n_pix * max(k_out, 1) > INT32_MAX:
        raise ValueError(f"the scores have {n_pix * k_out} elements, more than int32 "
                         "indexing allows")
    n_keep = keep_count(sparsity, k_out)
    out_dev, host = new_output(queue, tuple(out_shape), np.bool_, out, like=x)
    if not out_dev.size:
        pass
    elif n_keep == k_out:
        runtime.enqueue_fill(queue, out_dev.base_data, np.uint8(1), out_dev.offset,
                               out_dev.nbytes)
    else:
        if proj is None:
            proj = SparseRandomProjection(d, k, eps, seed, queue=queue)
        proj._check_queue(queue)
        if pw is None:
            rows = w.reshape(k_out, d)
            pw = proj.project_weight(MaskedLinearWeight(rows, transposed=True, queue=queue),
                                     queue=queue, events=events)
        x_dev = to_device(x, queue, "x", borrow=not is_device_array(x))
        xp = masked_conv.pack_input(queue, x_dev, n_ch, geom, events)
        projected = _project_windows(queue, proj, xp, geom, n_ch, r, s, n_pix, events)
        _search(queue, None, proj, pw, n_pix, n_keep, out_dev, False, events,
                projected=projected, plane=geom["OH"] * geom["OW"])
    return deliver(out_dev, x, out, queue, host)


def _project_windows(queue, proj: SparseRandomProjection, xp, geom, n_ch, r, s, n_pix,
                     events):
    """f(window) for every output pixel: (n_pix, k_pad) on the device, and k_pad.  The
    routine chooses the kernel: a work-item per pixel block (drs_project's windows kernel)
    or the implicit GEMM (drs_conv_project_tiled)."""
    params = tuning.lookup(DRS_PROJECT, queue.device, PROJECT_WINDOWS)
    k_pad = round_up(proj.k, params["VEC"] * params["KVEC"])   # as the weight's f(w)
    tiled = tuning.lookup(DRS_ROUTINE.spec, queue.device)["WINDOWS_KERNEL"] == 1
    key = ("rsc", k_pad, n_ch, r, s, tiled)
    rt = proj._rt.get(key)
    if rt is None:
        # RT's rows reordered from (c, r, s) to (r, s, c), the order the kernels walk; the
        # implicit GEMM takes it transposed, (k_pad, R * S * C), as it takes a weight.
        host = proj.device_rt(k_pad).get(queue=proj.queue)
        host = host.reshape(n_ch, r, s, k_pad).transpose(1, 2, 0, 3).reshape(-1, k_pad)
        rt = proj._rt[key] = cl_array.to_device(
            proj.queue, np.ascontiguousarray(host.T if tiled else host),
            allocator=runtime.memory_pool(queue.context))
    check_alloc(queue, 4 * n_pix * k_pad, "the projected windows")
    out = runtime.empty(queue, (n_pix, k_pad), np.float32,
                        allocator=runtime.memory_pool(queue.context))
    wait = list(xp.events) + list(rt.events)
    if tiled:
        ev = drs_conv_project_tiled.launch(
            queue, tuning.lookup(DRS_CONV_PROJECT_TILED, queue.device,
                                 masked_matmul_shape_class(n_pix, r * s * n_ch, proj.k)),
            xp, rt, k_pad, out, n_pix, n_ch, geom, r, s, wait, events)
    else:
        ev = drs_project.launch_windows(queue, params, xp, rt, k_pad, out, n_pix, n_ch, geom,
                                        r, s, wait)
    out.add_event(ev)
    if events is not None:
        events.append(ev)
    return out, k_pad
