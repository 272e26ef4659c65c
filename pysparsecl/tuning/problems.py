"""The problems the tuner times each kernel family on: one driver per family.

A driver builds a family's problems on a queue: representative shapes by default (the
shapes the benchmarks and the issues' targets name, at the batch the targets name for
the device type), a small set with ``quick``, or the shapes a user lists in a JSON file
(``python -m pysparsecl tune --shapes FILE``)::

    {"conv2d_csr":  [{"N": 32, "C": 64, "H": 56, "W": 56, "K": 64, "sparsity": 0.9}],
     "masked_gemm": [{"M": 128, "K": 4096, "N": 4096, "keep": 0.1}],
     "elementwise": [{"n": 16777216}]}

Each problem carries its op's shape class, so the tuner can keep a per-class winner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array


def relative_error_check(tol: float = 1e-4) -> Callable[[np.ndarray, np.ndarray], str]:
    """A check that fails when ||got - ref|| / ||ref|| reaches ``tol``."""
    def check(got: np.ndarray, ref: np.ndarray) -> str:
        ref = ref.astype(np.float64)
        denom = np.linalg.norm(ref) or 1.0
        err = np.linalg.norm(got.astype(np.float64) - ref) / denom
        return "" if err < tol else f"relative error {err:.2e}"
    return check


def selection_check(max_fraction: float = 0.005) -> Callable[[np.ndarray, np.ndarray], str]:
    """A check for masks: other tile shapes sum the estimates in another order, which may
    swap near-tied entries at the top-k boundary; more than ``max_fraction`` is a bug."""
    def check(got: np.ndarray, ref: np.ndarray) -> str:
        if got.shape != ref.shape:
            return f"shape {got.shape} instead of {ref.shape}"
        differ = float(np.mean(got != ref))
        return "" if differ <= max_fraction else f"{differ:.2%} of the selection differs"
    return check


@dataclass
class Problem:
    """One timed launch: ``launch(events)`` runs the op, appends its OpenCL events to
    ``events`` and returns its output; ``check(got, reference)`` returns "" or a reason."""
    label: str
    launch: Callable[[list], object]
    shape_class: Optional[str] = None
    check: Callable[[np.ndarray, np.ndarray], str] = relative_error_check()
    #: The problem's weight in a candidate's score (the weighted sum of its times), so
    #: that problems whose work differs many-fold count alike.
    weight: float = 1.0


class ShapesError(ValueError):
    """A shapes file or entry the tuner cannot use."""


def _is_gpu(queue: cl.CommandQueue) -> bool:
    return bool(queue.device.type & cl.device_type.GPU)


def _fields(entry: dict, family: str, required: Sequence[str], optional: dict) -> dict:
    if not isinstance(entry, dict):
        raise ShapesError(f"{family}: each shape must be an object, got {entry!r}")
    unknown = set(entry) - set(required) - set(optional)
    missing = [k for k in required if k not in entry]
    if unknown or missing:
        raise ShapesError(f"{family}: shape {entry} has unknown keys {sorted(unknown)} or "
                          f"lacks {missing}; keys: {list(required)} + {sorted(optional)}")
    values = {**optional, **entry}
    for key, value in values.items():
        if key in ("keep", "sparsity"):
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ShapesError(f"{family}: {key} must be in [0, 1], got {value!r}")
        elif key in ("kernel", "stride", "padding"):
            pair = (value, value) if isinstance(value, int) else tuple(value)
            if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
                raise ShapesError(f"{family}: {key} must be an int or [h, w], got {value!r}")
            values[key] = pair
        elif not (isinstance(value, int) and value > 0):
            raise ShapesError(f"{family}: {key} must be a positive integer, got {value!r}")
    return values


def _conv_case(entry: dict, family: str, fraction: str, default: float):
    """A shapes-file convolution entry as (ConvCase, its ``fraction`` value): N, C, H, W, K,
    optional kernel, stride, padding (3, 1, 1) and ``fraction`` (``default``)."""
    from ..testing.cases import ConvCase
    v = _fields(entry, family, ("N", "C", "H", "W", "K"),
                {"kernel": 3, "stride": 1, "padding": 1, fraction: default})
    return (ConvCase(v["N"], v["C"], v["H"], v["W"], v["K"], kernel=v["kernel"],
                     stride=v["stride"], padding=v["padding"]), v[fraction])


# ---------------------------------------------------------------------------------------------
# Direct sparse convolution and elementwise

def _conv2d_problems(queue, rng, quick, shapes) -> List[Problem]:
    from .. import SparseConvWeight, conv2d_sparse
    from ..ops.conv2d import conv2d_shape_class
    from ..testing.cases import RESNET50_LAYERS
    if shapes is not None:
        cases = [case.with_(sparsity=sparsity) for case, sparsity in
                 (_conv_case(entry, "conv2d_csr", "sparsity", 0.9) for entry in shapes)]
    elif quick:
        cases = [c.with_(H=14, W=14, N=2, sparsity=0.9) for c in RESNET50_LAYERS[:2]]
    else:   # the batches the targets name: 8 on CPUs, 32 on GPUs
        batch = 32 if _is_gpu(queue) else 8
        cases = [c.with_(N=batch, sparsity=0.9) for c in RESNET50_LAYERS[:4]]
    problems = []
    for case in cases:
        x, _, csr, _ = case.make_inputs(rng)
        x_dev = cl_array.to_device(queue, x)
        weight = SparseConvWeight(csr, case.C, case.kernel, case.groups, queue)
        kw = dict(stride=case.stride, padding=case.padding)
        problems.append(Problem(
            case.label(), lambda ev, x_dev=x_dev, weight=weight, kw=kw:
            conv2d_sparse(x_dev, weight, events=ev, **kw),
            conv2d_shape_class(case.N, case.C // case.groups, case.output_hw, case.kernel,
                               case.stride)))
    return problems


def _elementwise_problems(queue, rng, quick, shapes) -> List[Problem]:
    from .. import add
    sizes = [_fields(e, "elementwise", ("n",), {})["n"] for e in shapes] if shapes else \
        [1 << (18 if quick else 24)]
    problems = []
    for n in sizes:
        a, b = (cl_array.to_device(queue, rng.standard_normal(n, dtype=np.float32))
                for _ in range(2))
        out = cl_array.empty_like(a)
        problems.append(Problem(f"add float32 n={n}", lambda ev, a=a, b=b, out=out:
                                add(a, b, out=out, events=ev)))
    return problems


# ---------------------------------------------------------------------------------------------
# DSG: masked products, backward, BatchNorm, masked convolution, the search

#: (M, K, N) of the DSG benchmarks' fully connected layers.
_VMM_SHAPES = ((1, 4096, 4096), (1, 1024, 1024))
_GEMM_SHAPES = ((128, 4096, 4096), (4096, 1024, 1024), (1568, 2304, 256))


def _matmul_shapes(family, shapes, quick, default, keeps=(0.1,)):
    if shapes is not None:
        return [tuple(_fields(e, family, ("M", "K", "N"), dict(keep=0.1))[k]
                      for k in ("M", "K", "N", "keep")) for e in shapes]
    if quick:   # one small problem, a single row for the VMM
        return [(1 if default[0][0] == 1 else 64, 300, 500, 0.1)]
    return [shape + (keep,) for shape in default for keep in keeps]


def _matmul_inputs(queue, rng, m, k, n, keep):
    from .. import MaskedLinearWeight
    x = cl_array.to_device(queue, rng.standard_normal((m, k), dtype=np.float32))
    weight = MaskedLinearWeight(rng.standard_normal((k, n), dtype=np.float32), queue=queue)
    from ..ops.drs import keep_count
    from ..testing.cases import row_masks
    mask = cl_array.to_device(queue, row_masks(rng, m, n, keep_count(1.0 - keep, n))[0])
    return x, weight, mask


def _masked_matmul_problems(family, default, gpu_keeps=(0.1,)):
    """Each shape at keep 0.1, and on GPUs at each keep ratio in ``gpu_keeps``, weighted by
    0.1 / keep: the shape class does not know the keep ratio (a mask on the device is not
    counted before launch), so its entry must serve every ratio, and the weights give each
    ratio's time per selected output an equal say.  (The GPU GEMM's dense tiles are what
    a denser mask tunes; on a CPU, its kernel has none, and 50% problems would stretch a
    tuning run past its budget.)"""
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import masked_matmul
        from ..ops.masked import masked_matmul_shape_class
        keeps = gpu_keeps if _is_gpu(queue) else (0.1,)
        problems = []
        for m, k, n, keep in _matmul_shapes(family, shapes, quick, default, keeps):
            x, weight, mask = _matmul_inputs(queue, rng, m, k, n, keep)
            problems.append(Problem(
                f"{m}x{k}x{n} keep {keep:g}",
                lambda ev, x=x, weight=weight, mask=mask:
                masked_matmul(x, weight, mask, events=ev),
                masked_matmul_shape_class(m, k, n), weight=0.1 / keep))
        return problems
    return build


def _masked_backward_problems(family):
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import masked_matmul_backward
        problems = []
        for m, k, n, keep in _matmul_shapes(family, shapes, quick, _GEMM_SHAPES[1:]):
            x, weight, mask = _matmul_inputs(queue, rng, m, k, n, keep)
            dy = cl_array.to_device(queue, rng.standard_normal((m, n), dtype=np.float32))
            idx = 0 if family == "masked_dx" else 1

            def launch(ev, dy=dy, x=x, weight=weight, mask=mask, idx=idx):
                return masked_matmul_backward(dy, x, weight, mask, events=ev)[idx]
            problems.append(Problem(f"{m}x{k}x{n} keep {keep:g}", launch))
        return problems
    return build


def _conv_cases(family, shapes, quick, queue):
    from ..testing.cases import RESNET50_LAYERS
    if shapes is not None:
        return [_conv_case(entry, family, "keep", 0.1) for entry in shapes]
    if quick:
        return [(RESNET50_LAYERS[1].with_(N=2, H=14, W=14), 0.1)]
    batch = 32 if _is_gpu(queue) else 8
    return [(c.with_(N=batch), 0.1) for c in RESNET50_LAYERS[1:4]]


def _masked_conv_problems(family):
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import conv2d_masked
        problems = []
        for case, keep in _conv_cases(family, shapes, quick, queue):
            x, w, _, _ = case.with_(sparsity=0.0).make_inputs(rng)
            oh, ow = case.output_hw
            plane = (oh, ow) if family == "masked_conv" else (1, 1)
            mask = rng.random((case.N, case.K) + plane) < keep
            x_dev, w_dev, mask_dev = (cl_array.to_device(queue, a) for a in (x, w, mask))
            kw = dict(stride=case.stride, padding=case.padding)
            problems.append(Problem(
                f"{case.label()} keep {keep:g}",
                lambda ev, x_dev=x_dev, w_dev=w_dev, mask_dev=mask_dev, kw=kw:
                conv2d_masked(x_dev, w_dev, mask_dev, events=ev, **kw)))
        return problems
    return build


def _masked_bn_problems(queue, rng, quick, shapes) -> List[Problem]:
    from .. import masked_relu_bn
    if shapes is not None:
        dims = [tuple(_fields(e, "masked_bn", ("N", "C", "H", "W"), {})[k]
                      for k in ("N", "C", "H", "W")) for e in shapes]
    else:
        dims = [(2, 16, 14, 14)] if quick else [(32 if _is_gpu(queue) else 8, 128, 28, 28),
                                                (128, 4096, 1, 1)]
    problems = []
    for n, c, h, w in dims:
        shape = (n, c, h, w) if h * w > 1 else (n, c)
        y = cl_array.to_device(queue, rng.standard_normal(shape, dtype=np.float32))
        mask = cl_array.to_device(queue, rng.random(shape) < 0.1)
        gamma, beta, mean = (rng.standard_normal(c, dtype=np.float32) for _ in range(3))
        var = rng.random(c, dtype=np.float32) + 0.5
        for training in (False, True):
            stats = (None, None) if training else (mean, var)

            def launch(ev, y=y, mask=mask, gamma=gamma, beta=beta, stats=stats, t=training):
                out = masked_relu_bn(y, mask, gamma, beta, *stats, training=t, events=ev)
                return out[0] if t else out   # training also returns the batch statistics
            problems.append(Problem(
                f"{'x'.join(map(str, shape))} {'training' if training else 'inference'}",
                launch, check=relative_error_check(1e-3 if training else 1e-4)))
    return problems


_FEW_ROWS = [(1, 4096, 4096, 0.1), (4, 1024, 1024, 0.1)]


def _drs_problems(family):
    """The search on the GEMM shapes (its scores, top-k and row projection), or on a few
    rows (the fused one-launch kernel; the routine's threshold for it sees both).  The
    projections also time the weight's, and drs_project the convolution windows'."""
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import MaskedLinearWeight, SparseRandomProjection, drs_mask, drs_mask_conv2d
        from ..ops.drs import PROJECT_WINDOWS, project_shape_class
        projection = family in ("drs_project", "drs_project_split")
        if shapes is None and not quick and family == "drs_fused":
            dims = list(_FEW_ROWS)
        else:
            dims = _matmul_shapes(family, shapes, quick, _GEMM_SHAPES)
            if quick and family == "drs_fused":
                dims = [(1,) + dims[0][1:]]
            elif shapes is None and family == "drs_mask_routine":
                dims += _FEW_ROWS[:1] if quick else _FEW_ROWS
        problems = []
        for m, k, n, keep in dims:
            x = cl_array.to_device(queue, rng.standard_normal((m, k), dtype=np.float32))
            w = rng.standard_normal((k, n), dtype=np.float32)
            proj = SparseRandomProjection(k, seed=1, queue=queue)
            weight = MaskedLinearWeight(w, queue=queue)
            if projection:   # the weight's projection is timed too
                problems.append(Problem(
                    f"project w {k}x{n}", lambda ev, proj=proj, weight=weight:
                    proj.project_weight(weight, events=ev).to_numpy(),
                    shape_class=project_shape_class(None, k)))
            pw = proj.project_weight(weight)
            problems.append(Problem(
                f"search {m}x{k}x{n} keep {keep:g}",
                lambda ev, x=x, pw=pw, keep=keep:
                drs_mask(x, None, 1.0 - keep, projection=pw, events=ev),
                shape_class=project_shape_class(m, k) if projection else None,
                check=selection_check()))
        if family == "drs_project" and shapes is None:
            # The convolution windows' projection (ResNet-50 res3 3x3, batch 1 or 8).
            n_img = 1 if quick else (8 if not _is_gpu(queue) else 32)
            x = rng.standard_normal((n_img, 128, 28, 28), dtype=np.float32)
            w = rng.standard_normal((128, 128, 3, 3), dtype=np.float32)
            problems.append(Problem(
                f"conv windows {n_img}x128x28x28 3x3",
                lambda ev, x=x, w=w: drs_mask_conv2d(x, w, 0.9, padding=1, seed=1, events=ev),
                shape_class=PROJECT_WINDOWS, check=selection_check()))
        return problems
    return build


#: Families the tuner can exercise, each with its problem driver.
TUNABLES: Dict[str, Callable[..., List[Problem]]] = {
    "conv2d_csr": _conv2d_problems,
    "elementwise": _elementwise_problems,
    "masked_vmm": _masked_matmul_problems("masked_vmm", _VMM_SHAPES),
    "masked_vmm_split": _masked_matmul_problems("masked_vmm_split", _VMM_SHAPES),
    "masked_vmm_routine": _masked_matmul_problems("masked_vmm_routine", _VMM_SHAPES),
    "masked_gemm": _masked_matmul_problems("masked_gemm", _GEMM_SHAPES, gpu_keeps=(0.1, 0.5)),
    "masked_gemm_tiled": _masked_matmul_problems("masked_gemm_tiled", _GEMM_SHAPES,
                                                 gpu_keeps=(0.1, 0.5)),
    "masked_gemm_routine": _masked_matmul_problems("masked_gemm_routine", _GEMM_SHAPES,
                                                   gpu_keeps=(0.1, 0.5)),
    "masked_dx": _masked_backward_problems("masked_dx"),
    "masked_dw": _masked_backward_problems("masked_dw"),
    "masked_bn": _masked_bn_problems,
    "masked_conv": _masked_conv_problems("masked_conv"),
    "masked_conv_channels": _masked_conv_problems("masked_conv_channels"),
    "drs_project": _drs_problems("drs_project"),
    "drs_project_split": _drs_problems("drs_project_split"),
    "drs_scores": _drs_problems("drs_scores"),
    "drs_fused": _drs_problems("drs_fused"),
    "drs_topk": _drs_problems("drs_topk"),
    "drs_topk_team": _drs_problems("drs_topk_team"),
    "drs_mask_routine": _drs_problems("drs_mask_routine"),
}


def read_shapes_file(path) -> Dict[str, list]:
    """The ``--shapes`` file: a JSON object mapping family names to lists of shapes."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ShapesError(f"cannot read shapes file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
        raise ShapesError(f"shapes file {path} must map family names to non-empty lists")
    unknown = sorted(set(data) - set(TUNABLES))
    if unknown:
        raise ShapesError(f"shapes file {path} names unknown families {unknown}; "
                          f"tunable: {sorted(TUNABLES)}")
    return data
