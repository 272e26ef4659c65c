"""The problem registry: the problems that the tests, the tuner, ``make verify`` and the
benchmarks run, per kernel family, with their inputs, the call, the float64 reference
(:mod:`pysparsecl.testing.reference`) and the tolerance.

Two sizes:

- :func:`small_problems`: small shapes that reach every branch of a family's kernels
  (edge tiles, empty rows, strides, epilogues), each a ``run(rng, queue)`` that raises
  AssertionError on a wrong result.  The tests run them on every device; ``make verify``
  runs them under Oclgrind for sampled tile configurations.
- :data:`TUNABLES`: one driver per family (and per routine) that builds representative
  problems on a queue for the tuner -- the shapes the benchmarks and the issues' targets
  name, at the batch the targets name for the device type -- a small set with ``quick``,
  or the shapes a user lists in a JSON file (``python -m pysparsecl tune --shapes FILE``)::

    {"conv2d_csr":  [{"N": 32, "C": 64, "H": 56, "W": 56, "K": 64, "sparsity": 0.9,
                      "epilogue": "bias+relu"}],
     "masked_gemm": [{"M": 128, "K": 4096, "N": 4096, "keep": 0.1}],
     "elementwise": [{"n": 16777216}]}

  Each problem carries its op's shape class, so the tuner can keep a per-class winner,
  and its reference, which every candidate configuration is checked against.

The DSG benchmark shapes are declared here once (:data:`DSG_VMM_SHAPES`,
:data:`DSG_GEMM_SHAPES`); the convolution layers in :mod:`pysparsecl.testing.cases`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from .reference import (
    avg_pool2d_backward_reference,
    avg_pool2d_reference,
    conv2d_epilogue_reference,
    conv2d_masked_backward_reference,
    conv2d_masked_reference,
    conv2d_reference,
    drs_conv_mask_reference,
    drs_scores_reference,
    im2col_reference,
    masked_matmul_backward_reference,
    masked_matmul_reference,
    max_pool2d_backward_reference,
    max_pool2d_reference,
    relative_error,
    relu_bn_backward_reference,
    relu_bn_reference,
    sgd_reference,
    softmax_cross_entropy_reference,
    topk_mask_reference,
)


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
    ``events`` and returns its output; ``reference()`` gives the float64 result from the
    host inputs (:mod:`pysparsecl.testing.reference`), which every candidate configuration
    is checked against with ``check(got, reference)`` ("" or a reason)."""
    label: str
    launch: Callable[[list], object]
    reference: Callable[[], np.ndarray]
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
        if key in ("keep", "x_keep", "sparsity"):
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
    from .cases import ConvCase
    v = _fields(entry, family, ("N", "C", "H", "W", "K"),
                {"kernel": 3, "stride": 1, "padding": 1, fraction: default})
    return (ConvCase(v["N"], v["C"], v["H"], v["W"], v["K"], kernel=v["kernel"],
                     stride=v["stride"], padding=v["padding"]), v[fraction])


# ---------------------------------------------------------------------------------------------
# Direct sparse convolution and elementwise

def _conv2d_problems(queue, rng, quick, shapes) -> List[Problem]:
    from .. import SparseConvWeight, conv2d_sparse, runtime
    from ..ops.conv2d import conv2d_shape_class
    from .cases import RESNET50_LAYERS
    if shapes is not None:
        cases = []
        for entry in shapes:
            epilogue = ""
            if isinstance(entry, dict) and "epilogue" in entry:
                entry = dict(entry)
                epilogue = entry.pop("epilogue")
            if not isinstance(epilogue, str) or epilogue not in _CONV_EPILOGUES:
                raise ShapesError(f"conv2d_csr: epilogue must be one of "
                                  f"{sorted(_CONV_EPILOGUES)}, got {epilogue!r}")
            case, sparsity = _conv_case(entry, "conv2d_csr", "sparsity", 0.9)
            cases.append((case.with_(sparsity=sparsity), epilogue))
    elif quick:
        cases = [(c.with_(H=14, W=14, N=2, sparsity=0.9), "") for c in RESNET50_LAYERS[:2]]
    else:   # the batches the targets name: 8 on CPUs, 32 on GPUs
        batch = 32 if _is_gpu(queue) else 8
        cases = [(c.with_(N=batch, sparsity=0.9), "") for c in RESNET50_LAYERS[:4]]
    problems = []
    alloc = runtime.memory_pool(queue.context)
    for case, epilogue in cases:
        x, w, csr, _ = case.make_inputs(rng)
        # From the memory pool, as a network's activations come (whose slack lets a
        # convolution read its input in place: conv2d_csr's direct plans).
        x_dev = runtime.empty(queue, x.shape, np.float32, allocator=alloc)
        x_dev.set(x)
        weight = SparseConvWeight(csr, case.C, case.kernel, case.groups, queue)
        kw = dict(stride=case.stride, padding=case.padding)
        bias = residual = None
        if "bias" in epilogue:
            bias = rng.standard_normal(case.K).astype(np.float32)
            kw["bias"] = cl_array.to_device(queue, bias)
        if "residual" in epilogue:
            residual = rng.standard_normal((case.N, case.K) + case.output_hw,
                                           dtype=np.float32)
            kw["residual"] = runtime.empty(queue, residual.shape, np.float32,
                                           allocator=alloc)
            kw["residual"].set(residual)
        if "relu" in epilogue:
            kw["activation"] = "relu"
        problems.append(Problem(
            case.label() + (f" +{epilogue}" if epilogue else ""),
            lambda ev, x_dev=x_dev, weight=weight, kw=kw:
            conv2d_sparse(x_dev, weight, events=ev, **kw),
            lambda x=x, w=w, case=case, bias=bias, residual=residual, relu="relu" in epilogue:
            conv2d_epilogue_reference(case.reference(x, w, bias), residual, relu),
            conv2d_shape_class(case.N, case.C // case.groups, case.output_hw, case.kernel,
                               case.stride)))
    return problems


#: A conv2d_csr shapes-file entry's optional "epilogue": what the call fuses into its store,
#: as a network layer does (``scripts/network_shapes.py`` writes each class's).
_CONV_EPILOGUES = frozenset({"", "bias", "bias+relu", "bias+residual+relu"})


def _elementwise_problems(queue, rng, quick, shapes) -> List[Problem]:
    from .. import add
    sizes = [_fields(e, "elementwise", ("n",), {})["n"] for e in shapes] if shapes else \
        [1 << (18 if quick else 24)]
    problems = []
    for n in sizes:
        a_host, b_host = (rng.standard_normal(n, dtype=np.float32) for _ in range(2))
        a, b = (cl_array.to_device(queue, v) for v in (a_host, b_host))
        out = cl_array.empty_like(a)
        problems.append(Problem(f"add float32 n={n}", lambda ev, a=a, b=b, out=out:
                                add(a, b, out=out, events=ev),
                                lambda a=a_host, b=b_host: a.astype(np.float64) + b))
    return problems


# ---------------------------------------------------------------------------------------------
# DSG: masked products, backward, BatchNorm, masked convolution, the search

#: (M, K, N) of the DSG benchmarks' fully connected layers.
DSG_VMM_SHAPES = ((1, 4096, 4096), (1, 1024, 1024))
DSG_GEMM_SHAPES = ((128, 4096, 4096), (4096, 1024, 1024), (1568, 2304, 256))


def _matmul_shapes(family, shapes, quick, default, keeps=(0.1,)):
    if shapes is not None:
        return [tuple(_fields(e, family, ("M", "K", "N"), dict(keep=0.1))[k]
                      for k in ("M", "K", "N", "keep")) for e in shapes]
    if quick:   # one small problem, a single row for the VMM
        return [(1 if default[0][0] == 1 else 64, 300, 500, 0.1)]
    return [shape + (keep,) for shape in default for keep in keeps]


def _matmul_inputs(queue, rng, m, k, n, keep):
    """Device x, prepared weight and mask, and the host arrays they came from."""
    from .. import MaskedLinearWeight
    from ..ops.drs import keep_count
    from .cases import row_masks
    host = (rng.standard_normal((m, k), dtype=np.float32),
            rng.standard_normal((k, n), dtype=np.float32),
            row_masks(rng, m, n, keep_count(1.0 - keep, n))[0])
    x, mask = (cl_array.to_device(queue, a) for a in (host[0], host[2]))
    return x, MaskedLinearWeight(host[1], queue=queue), mask, host


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
            x, weight, mask, host = _matmul_inputs(queue, rng, m, k, n, keep)
            problems.append(Problem(
                f"{m}x{k}x{n} keep {keep:g}",
                lambda ev, x=x, weight=weight, mask=mask:
                masked_matmul(x, weight, mask, events=ev),
                lambda host=host: masked_matmul_reference(*host),
                masked_matmul_shape_class(m, k, n), weight=0.1 / keep))
        return problems
    return build


#: (M, K, N) of the products of a compact x: 4096-wide layers at batch 1 and 128, and the
#: fully connected layers of the CIFAR VGG-8 (8192 -> 1024 -> 1024) at batch 128.
DSG_COMPACT_SHAPES = ((1, 4096, 4096), (128, 4096, 4096), (128, 8192, 1024),
                      (128, 1024, 1024))


def _compact_inputs(queue, rng, quick, shapes, family, x_keeps=(0.1,)):
    """The compact-x problems' operands: (label, x (device CompactRows), the prepared
    weight, w, the device index mask, the host mask, x's dense form, shape class) per
    shape and x keep ratio in ``x_keeps``, with 10% of the outputs selected (an index
    mask, as the layer after a compact one is called), or the keep ratios a shape names
    (``x_keep`` for x, ``keep`` for the outputs)."""
    from .. import CompactRows, MaskedLinearWeight
    from ..ops.drs import keep_count
    from ..ops.masked import masked_matmul_shape_class
    from .cases import compact_rows
    if shapes is not None:
        chosen = [tuple(_fields(e, family, ("M", "K", "N"), dict(keep=0.1, x_keep=0.1))[key]
                        for key in ("M", "K", "N", "x_keep", "keep")) for e in shapes]
    elif quick:
        chosen = [(64, 300, 500, 0.1, 0.1)]
    else:
        chosen = [shape + (x_keep, 0.1) for shape in DSG_COMPACT_SHAPES for x_keep in x_keeps]
    for m, k, n, x_keep, keep in chosen:
        values, idx = compact_rows(rng, m, k, keep_count(1.0 - x_keep, k))
        w = rng.standard_normal((k, n), dtype=np.float32)
        n_keep = keep_count(1.0 - keep, n)
        mask = np.argpartition(rng.random((m, n)), n_keep - 1, axis=1)[:, :n_keep]
        mask = mask.astype(np.int32)
        x = CompactRows(cl_array.to_device(queue, values), cl_array.to_device(queue, idx), k,
                        check=False)
        dense = np.zeros((m, k), np.float32)
        np.put_along_axis(dense, idx, values, axis=1)
        yield (f"{m}x{k}x{n} x keep {x_keep:g}, keep {keep:g}", x,
               MaskedLinearWeight(w, queue=queue), w, cl_array.to_device(queue, mask), mask,
               dense, masked_matmul_shape_class(m, k, n))


def _masked_compact_problems(family, x_keeps=(0.1,)):
    """The product of a compact x (the families of the masked_compact routine; the
    routine's own problems span x's density, which its GATHER_MAX_DENSITY divides)."""
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import masked_matmul
        return [Problem(label, lambda ev, x=x, weight=weight, mask=mask:
                        masked_matmul(x, weight, mask, events=ev),
                        lambda host=(dense, w, mask_host): masked_matmul_reference(*host),
                        shape_class)
                for label, x, weight, w, mask, mask_host, dense, shape_class
                in _compact_inputs(queue, rng, quick, shapes, family, x_keeps)]
    return build


def _masked_compact_dw_problems(family, x_keeps=(0.1,)):
    """dw^T of the product of a compact x (masked_matmul_backward without dx); the
    routine's problems span x's density, which its GATHER_MAX_DENSITY divides."""
    def build(queue, rng, quick, shapes) -> List[Problem]:
        return _compact_dw_problems(queue, rng, quick, shapes, family, x_keeps)
    return build


def _compact_dw_problems(queue, rng, quick, shapes, family, x_keeps) -> List[Problem]:
    from .. import masked_matmul_backward
    problems = []
    for label, x, weight, w, mask, mask_host, dense, shape_class in _compact_inputs(
            queue, rng, quick, shapes, family, x_keeps):
        dy_host = rng.standard_normal(mask_host.shape, dtype=np.float32)
        dy = cl_array.to_device(queue, dy_host)
        problems.append(Problem(
            f"dw {label}",
            lambda ev, x=x, dy=dy, weight=weight, mask=mask:
            masked_matmul_backward(dy, x, weight, mask, need_dx=False, dw_rows=True,
                                   events=ev)[1],
            lambda host=(dy_host, dense, w, mask_host):
            masked_matmul_backward_reference(*host)[1].T,
            shape_class))
    return problems


def _masked_backward_problems(family):
    """The backward's own kernel on the GEMM shapes (a bool mask): masked_dx's dx or
    masked_dw's dw^T, timed alone.  The selection's lists (and dw's padded x) are built
    once, untimed, so that a candidate's time is its family's kernel, not the whole
    backward's, where the lists and the other gradient hid what one tile choice costs."""
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import runtime, tuning
        from ..families import masked_dw, masked_dx, masked_util
        from ..ops._common import written
        from ..ops.masked import MASKED_DW, MASKED_DX, weight_rows
        problems = []
        for m, k, n, keep in _matmul_shapes(family, shapes, quick, DSG_GEMM_SHAPES[1:]):
            x, weight, mask, host = _matmul_inputs(queue, rng, m, k, n, keep)
            dy_host = rng.standard_normal((m, n), dtype=np.float32)
            dy = cl_array.to_device(queue, dy_host)
            lists = masked_util.SelectionLists(queue, "bool", mask, dy, m, n, n, [], None)
            queue.finish()
            if family == "masked_dx":
                rows, ldw = weight_rows(weight, k, queue, None)

                def launch(ev, dy=dy, rows=rows, ldw=ldw, lists=lists, m=m, k=k, n=n):
                    dx = runtime.zeros(queue, (m, k), np.float32)
                    ev.append(masked_dx.launch(queue, tuning.lookup(MASKED_DX, queue.device),
                                               "bool", dy, rows, ldw, lists, dx, m, n, k, n,
                                               list(dx.events)))
                    written(dx, ev[-1])
                    return dx

                def reference(dy=dy_host, host=host):
                    return masked_matmul_backward_reference(dy, *host)[0]
            else:
                x_rows = masked_dw.padded_rows(queue, x, m, k, [], None)

                def launch(ev, x_rows=x_rows, lists=lists, m=m, k=k, n=n):
                    dwt = runtime.empty(queue, (n, k), np.float32)
                    ev.append(masked_dw.launch(queue, tuning.lookup(MASKED_DW, queue.device),
                                               "bool", x_rows, lists, dwt, m, n, k, []))
                    written(dwt, ev[-1])
                    return dwt

                def reference(dy=dy_host, host=host):
                    return masked_matmul_backward_reference(dy, *host)[1].T
            problems.append(Problem(f"{m}x{k}x{n} keep {keep:g}", launch, reference))
        return problems
    return build


def _masked_lists_problems(queue, rng, quick, shapes) -> List[Problem]:
    """The backward's selection lists (masked_lists' scans or masked_util's serial
    builders, by SCAN) on the GEMM shapes' bool masks, timed alone; the check compares
    the column lists' lengths (the tests check the lists through the gradients)."""
    from ..families import masked_util
    from ..ops._common import written
    problems = []
    for m, _k, n, keep in _matmul_shapes("masked_lists", shapes, quick, DSG_GEMM_SHAPES):
        _, _, mask, host = _matmul_inputs(queue, rng, m, 1, n, keep)
        dy = cl_array.to_device(queue, rng.standard_normal((m, n), dtype=np.float32))

        def launch(ev, mask=mask, dy=dy, m=m, n=n):
            lists = masked_util.SelectionLists(queue, "bool", mask, dy, m, n, n, [], None)
            ev.extend(lists.events)
            written(lists.col_counts, ev[-1])
            return lists.col_counts

        problems.append(Problem(f"{m}x{n} keep {keep:g}", launch,
                                lambda mask=host[2]: mask.sum(axis=0, dtype=np.float64)))
    return problems


def _conv_cases(family, shapes, quick, queue, first_layer=1, gpu_batches=(32,)):
    from .cases import RESNET50_LAYERS
    if shapes is not None:
        return [_conv_case(entry, family, "keep", 0.1) for entry in shapes]
    if quick:
        return [(RESNET50_LAYERS[1].with_(N=2, H=14, W=14), 0.1)]
    batches = gpu_batches if _is_gpu(queue) else (8,)
    return [(c.with_(N=batch), 0.1) for batch in batches
            for c in RESNET50_LAYERS[first_layer:4]]


def _masked_conv_problems(family):
    """conv2d_masked with a per-window mask (a channel mask for masked_conv_channels) on
    ResNet-50's 3x3 layers; the implicit GEMM (a GPU kernel) also on res2's, at batch 8
    and 32 (the targets' batches), tuned per shape class."""
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import conv2d_masked
        from ..ops.masked import masked_matmul_shape_class
        problems = []
        implicit_gemm = family in ("masked_conv_tiled", "masked_conv_routine")
        cases = (_conv_cases(family, shapes, quick, queue, 0, (8, 32)) if implicit_gemm
                 else _conv_cases(family, shapes, quick, queue))
        for case, keep in cases:
            x, w, _, _ = case.with_(sparsity=0.0).make_inputs(rng)
            oh, ow = case.output_hw
            plane = (1, 1) if family == "masked_conv_channels" else (oh, ow)
            mask = rng.random((case.N, case.K) + plane) < keep
            x_dev, w_dev, mask_dev = (cl_array.to_device(queue, a) for a in (x, w, mask))
            kw = dict(stride=case.stride, padding=case.padding)
            full = np.broadcast_to(mask, (case.N, case.K) + case.output_hw)
            n_pix = case.N * oh * ow
            problems.append(Problem(
                f"{case.label()} N{case.N} keep {keep:g}",
                lambda ev, x_dev=x_dev, w_dev=w_dev, mask_dev=mask_dev, kw=kw:
                conv2d_masked(x_dev, w_dev, mask_dev, events=ev, **kw),
                lambda x=x, w=w, full=full, case=case:
                conv2d_masked_reference(x, w, full, case.stride, case.padding),
                shape_class=masked_matmul_shape_class(
                    n_pix, case.C * case.kernel[0] * case.kernel[1], case.K)
                if implicit_gemm else None))
        return problems
    return build


def _masked_conv_backward_problems(family):
    """conv2d_masked_backward's dx (masked_conv_dx) or dw (masked_conv_dw) alone, on the
    masked convolution's layers with a per-window mask."""
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import conv2d_masked_backward
        want_dx = family == "masked_conv_dx"
        problems = []
        for case, keep in _conv_cases(family, shapes, quick, queue):
            x, w, _, _ = case.with_(sparsity=0.0).make_inputs(rng)
            out_shape = (case.N, case.K) + case.output_hw
            mask = rng.random(out_shape) < keep
            dy = rng.standard_normal(out_shape, dtype=np.float32)
            dev = [cl_array.to_device(queue, a) for a in (dy, x, w, mask)]
            kw = dict(stride=case.stride, padding=case.padding)

            def launch(ev, dev=dev, kw=kw):
                dx, dw = conv2d_masked_backward(*dev, need_dx=want_dx, need_dw=not want_dx,
                                                events=ev, **kw)
                return dx if want_dx else dw
            problems.append(Problem(
                f"{case.label()} keep {keep:g}", launch,
                lambda host=(dy, x, w, mask), case=case: conv2d_masked_backward_reference(
                    *host, case.stride, case.padding)[0 if want_dx else 1]))
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
        y_host, mask_host = rng.standard_normal(shape, dtype=np.float32), rng.random(shape) < 0.1
        y, mask = (cl_array.to_device(queue, a) for a in (y_host, mask_host))
        gamma, beta, mean = (rng.standard_normal(c, dtype=np.float32) for _ in range(3))
        var = rng.random(c, dtype=np.float32) + 0.5
        for training in (False, True):
            stats = (None, None) if training else (mean, var)

            def launch(ev, y=y, mask=mask, gamma=gamma, beta=beta, stats=stats, t=training):
                out = masked_relu_bn(y, mask, gamma, beta, *stats, training=t, events=ev)
                return out[0] if t else out   # training also returns the batch statistics

            def reference(y=y_host, mask=mask_host, gamma=gamma, beta=beta, stats=stats,
                          t=training):
                out = relu_bn_reference(y, mask, gamma, beta, *stats)
                return out[0] if t else out
            problems.append(Problem(
                f"{'x'.join(map(str, shape))} {'training' if training else 'inference'}",
                launch, reference, check=relative_error_check(1e-3 if training else 1e-4)))
    return problems


_FEW_ROWS = [(1, 4096, 4096, 0.1), (4, 1024, 1024, 0.1)]


def _drs_problems(family):
    """The search on the GEMM shapes (its scores, top-k and row projection), or on a few
    rows (the fused one-launch kernel; the routine's threshold for it sees both).  The
    projections also time the weight's, and drs_project the convolution windows'."""
    def build(queue, rng, quick, shapes) -> List[Problem]:
        from .. import MaskedLinearWeight, SparseRandomProjection, drs_mask, drs_mask_conv2d
        from ..ops.drs import PROJECT_WINDOWS, keep_count, project_shape_class
        projection = family in ("drs_project", "drs_project_split")
        if shapes is None and not quick and family == "drs_fused":
            dims = list(_FEW_ROWS)
        else:
            dims = _matmul_shapes(family, shapes, quick, DSG_GEMM_SHAPES)
            if quick and family == "drs_fused":
                dims = [(1,) + dims[0][1:]]
            elif shapes is None and family == "drs_mask_routine":
                dims += _FEW_ROWS[:1] if quick else _FEW_ROWS
        problems = []
        for m, k, n, keep in dims:
            x_host = rng.standard_normal((m, k), dtype=np.float32)
            x = cl_array.to_device(queue, x_host)
            w = rng.standard_normal((k, n), dtype=np.float32)
            proj = SparseRandomProjection(k, seed=1, queue=queue)
            weight = MaskedLinearWeight(w, queue=queue)
            if projection:   # the weight's projection is timed too
                problems.append(Problem(
                    f"project w {k}x{n}", lambda ev, proj=proj, weight=weight:
                    proj.project_weight(weight, events=ev).to_numpy(),
                    lambda proj=proj, w=w: proj.scale * (proj.matrix() @ w.astype(np.float64)),
                    shape_class=project_shape_class(None, k)))
            pw = proj.project_weight(weight)
            problems.append(Problem(
                f"search {m}x{k}x{n} keep {keep:g}",
                lambda ev, x=x, pw=pw, keep=keep:
                drs_mask(x, None, 1.0 - keep, projection=pw, events=ev),
                lambda x=x_host, w=w, proj=proj, keep=keep: topk_mask_reference(
                    drs_scores_reference(x, w, proj.matrix().toarray(), proj.scale),
                    keep_count(1.0 - keep, w.shape[1])),
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
                lambda x=x, w=w: _conv_search_reference(x, w, 0.9, seed=1),
                shape_class=PROJECT_WINDOWS, check=selection_check()))
        return problems
    return build


def _conv_search_problems(queue, rng, quick, shapes) -> List[Problem]:
    """The convolution search (drs_mask_conv2d: the windows' projection, scores and top-k)
    on ResNet-50's 3x3 layers at 10% kept, for the windows' implicit GEMM
    (drs_conv_project_tiled), per shape class (n_pix, C * R * S, k)."""
    from .. import SparseRandomProjection, drs_mask_conv2d
    from ..ops.drs import keep_count
    from ..ops.masked import masked_matmul_shape_class
    problems = []
    for case, keep in _conv_cases("drs_conv_project_tiled", shapes, quick, queue, 0, (8, 32)):
        x, w, _, _ = case.with_(sparsity=0.0).make_inputs(rng)
        d = case.C * case.kernel[0] * case.kernel[1]
        proj = SparseRandomProjection(d, seed=1, queue=queue)
        kw = dict(stride=case.stride, padding=case.padding)
        x_dev = cl_array.to_device(queue, x)
        problems.append(Problem(
            f"search {case.label()} N{case.N} keep {keep:g}",
            lambda ev, x=x_dev, w=w, proj=proj, kw=kw, keep=keep:
            drs_mask_conv2d(x, w, 1.0 - keep, projection=proj, events=ev, **kw),
            lambda x=x, w=w, proj=proj, case=case, keep=keep: drs_conv_mask_reference(
                x, w, keep_count(1.0 - keep, case.K), proj.matrix().toarray(), proj.scale,
                stride=case.stride, padding=case.padding),
            shape_class=masked_matmul_shape_class(case.N * case.output_hw[0]
                                                  * case.output_hw[1], d, proj.k),
            check=selection_check()))
    return problems


def _conv_search_reference(x, w, sparsity, seed):
    """drs_mask_conv2d's mask (3x3, padding 1) from the float64 reference, with the random
    matrix R of the projection the op builds from ``seed``."""
    from .. import SparseRandomProjection
    from ..ops.drs import keep_count
    proj = SparseRandomProjection(w[0].size, seed=seed)
    return drs_conv_mask_reference(x, w, keep_count(sparsity, w.shape[0]),
                                   proj.matrix().toarray(), proj.scale, padding=(1, 1))


def _drs_compact_problems(queue, rng, quick, shapes) -> List[Problem]:
    """The projection f(x) of a CompactRows x keeping 10% of each row (the search's input
    after a DSG layer that kept 10%), on the rows and widths of the DSG layers (M and K
    of DSG_GEMM_SHAPES and DSG_VMM_SHAPES), or the shapes a file names: M, K and ``keep``
    (the fraction of x's entries kept, default 0.1)."""
    from .. import CompactRows, SparseRandomProjection
    from ..ops.drs import keep_count, project_compact_shape_class
    from .cases import compact_rows
    if shapes is not None:
        dims = [tuple(_fields(e, "drs_project_compact", ("M", "K"), dict(keep=0.1))[key]
                      for key in ("M", "K", "keep")) for e in shapes]
    elif quick:
        dims = [(64, 300, 0.1)]
    else:
        dims = [(m, k, 0.1) for m, k, _ in DSG_GEMM_SHAPES + DSG_VMM_SHAPES]
    problems = []
    for m, d, keep in dims:
        nx = keep_count(1.0 - keep, d)
        values, idx = compact_rows(rng, m, d, nx)
        dense = np.zeros((m, d), np.float64)
        np.put_along_axis(dense, idx, values, axis=1)
        proj = SparseRandomProjection(d, seed=1, queue=queue)
        x = CompactRows(cl_array.to_device(queue, values), cl_array.to_device(queue, idx), d,
                        check=False)
        problems.append(Problem(
            f"project compact {m}x{d} keep {keep:g}",
            lambda ev, x=x, proj=proj: proj.project(x, events=ev),
            lambda dense=dense, proj=proj: proj.scale * (proj.matrix() @ dense.T).T,
            shape_class=project_compact_shape_class(m, nx)))
    return problems


#: Families the tuner can exercise, each with its problem driver.
def _training_problems(queue, rng, quick, shapes) -> List[Problem]:
    """The loss over a batch of logits (with its column-sum pass) and one SGD step over a
    model's worth of flat parameters."""
    from .. import sgd_step, softmax_cross_entropy
    if shapes is not None:
        dims = [tuple(_fields(e, "training", ("M", "N", "P"), {})[k] for k in ("M", "N", "P"))
                for e in shapes]
    else:
        dims = [(64, 10, 1 << 16)] if quick else [(1024, 1000, 1 << 22), (64, 10, 300_000)]
    problems = []
    for m, n, n_params in dims:
        logits_host = rng.standard_normal((m, n), dtype=np.float32)
        labels_host = rng.integers(0, n, m).astype(np.int32)
        logits, labels = (cl_array.to_device(queue, a) for a in (logits_host, labels_host))
        problems.append(Problem(
            f"softmax_xent {m}x{n}",
            lambda ev, x=logits, y=labels: softmax_cross_entropy(x, y, events=ev)[1],
            lambda x=logits_host, y=labels_host: softmax_cross_entropy_reference(x, y)[1]))
        p_host, g_host, v_host = (rng.standard_normal(n_params, dtype=np.float32)
                                  for _ in range(3))
        g, v0 = (cl_array.to_device(queue, a) for a in (g_host, v_host))

        def step(ev, p_host=p_host, g=g, v0=v0):
            # Fresh copies each time: the step updates its operands in place.
            p, v = cl_array.to_device(queue, p_host), v0.copy()
            return sgd_step(p, g, v, lr=0.1, momentum=0.9, weight_decay=1e-4, events=ev)
        problems.append(Problem(
            f"sgd {n_params} params", step,
            lambda p=p_host, g=g_host, v=v_host: sgd_reference(p, g, v, 0.1, 0.9, 1e-4)[0]))
    return problems


def _pooling_problems(queue, rng, quick, shapes) -> List[Problem]:
    """Max and average pooling, forward and backward, of a ResNet stem's 3x3 stride-2
    pooling and of a CNN head's global pooling (shapes file: N, C, H, W and optional
    kernel, stride, padding, default 3, 2, 1)."""
    from .. import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward
    if shapes is not None:
        cases = []
        for entry in shapes:
            v = _fields(entry, "pooling", ("N", "C", "H", "W"),
                        {"kernel": 3, "stride": 2, "padding": 1})
            cases.append(((v["N"], v["C"], v["H"], v["W"]),
                          (v["kernel"], v["stride"], v["padding"])))
    elif quick:
        cases = [((2, 16, 28, 28), (3, 2, 1)), ((2, 64, 7, 7), (7, 7, 0))]
    else:
        batch = 32 if _is_gpu(queue) else 8
        cases = [((batch, 64, 112, 112), (3, 2, 1)), ((batch, 2048, 7, 7), (7, 7, 0))]
    problems = []
    for shape, geometry in cases:
        x_host = rng.standard_normal(shape, dtype=np.float32)
        want, want_idx = max_pool2d_reference(x_host, *geometry)
        dy_host = rng.standard_normal(want.shape, dtype=np.float32)
        x, dy, idx = (cl_array.to_device(queue, a)
                      for a in (x_host, dy_host, want_idx.astype(np.int32)))
        label = "{} k{} s{} p{}".format("x".join(map(str, shape)), *geometry)
        problems += [
            Problem(f"max {label}", lambda ev, x=x, g=geometry: max_pool2d(x, *g, events=ev),
                    lambda want=want: want),
            Problem(f"max backward {label}",
                    lambda ev, dy=dy, idx=idx, s=shape, g=geometry:
                    max_pool2d_backward(dy, idx, s, *g, events=ev),
                    lambda dy=dy_host, idx=want_idx, s=shape:
                    max_pool2d_backward_reference(dy, idx, s)),
            Problem(f"avg {label}", lambda ev, x=x, g=geometry: avg_pool2d(x, *g, events=ev),
                    lambda x=x_host, g=geometry: avg_pool2d_reference(x, *g)),
            Problem(f"avg backward {label}",
                    lambda ev, dy=dy, s=shape, g=geometry:
                    avg_pool2d_backward(dy, s, *g, events=ev),
                    lambda dy=dy_host, s=shape, g=geometry:
                    avg_pool2d_backward_reference(dy, s, *g))]
    return problems


TUNABLES: Dict[str, Callable[..., List[Problem]]] = {
    "conv2d_csr": _conv2d_problems,
    "conv2d_pack_rows": _conv2d_problems,
    "conv2d_pack_flat": _conv2d_problems,
    "conv2d_sparse_routine": _conv2d_problems,
    "elementwise": _elementwise_problems,
    "masked_vmm": _masked_matmul_problems("masked_vmm", DSG_VMM_SHAPES),
    "masked_vmm_split": _masked_matmul_problems("masked_vmm_split", DSG_VMM_SHAPES),
    "masked_vmm_routine": _masked_matmul_problems("masked_vmm_routine", DSG_VMM_SHAPES),
    "masked_gemm": _masked_matmul_problems("masked_gemm", DSG_GEMM_SHAPES, gpu_keeps=(0.1, 0.5)),
    "masked_gemm_tiled": _masked_matmul_problems("masked_gemm_tiled", DSG_GEMM_SHAPES,
                                                 gpu_keeps=(0.1, 0.5)),
    "masked_gemm_routine": _masked_matmul_problems("masked_gemm_routine", DSG_GEMM_SHAPES,
                                                   gpu_keeps=(0.1, 0.5)),
    "masked_compact": _masked_compact_problems("masked_compact"),
    "masked_compact_tiled": _masked_compact_problems("masked_compact_tiled"),
    "masked_compact_routine": _masked_compact_problems("masked_compact_routine",
                                                       x_keeps=(0.05, 0.1, 0.2)),
    "masked_compact_dw": _masked_compact_dw_problems("masked_compact_dw"),
    "masked_compact_dw_tiled": _masked_compact_dw_problems("masked_compact_dw_tiled"),
    "masked_compact_dw_routine": _masked_compact_dw_problems("masked_compact_dw_routine",
                                                             x_keeps=(0.05, 0.1, 0.2)),
    "masked_dx": _masked_backward_problems("masked_dx"),
    "masked_dw": _masked_backward_problems("masked_dw"),
    "masked_lists": _masked_lists_problems,
    "masked_bn": _masked_bn_problems,
    "training": _training_problems,
    "pooling": _pooling_problems,
    "masked_conv": _masked_conv_problems("masked_conv"),
    "masked_conv_channels": _masked_conv_problems("masked_conv_channels"),
    "masked_conv_tiled": _masked_conv_problems("masked_conv_tiled"),
    "masked_conv_routine": _masked_conv_problems("masked_conv_routine"),
    "masked_conv_dx": _masked_conv_backward_problems("masked_conv_dx"),
    "masked_conv_dw": _masked_conv_backward_problems("masked_conv_dw"),
    "drs_project": _drs_problems("drs_project"),
    "drs_project_split": _drs_problems("drs_project_split"),
    "drs_project_compact": _drs_compact_problems,
    "drs_conv_project_tiled": _conv_search_problems,
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


# ---------------------------------------------------------------------------------------------
# Small problems: every branch of every family, for the tests and `make verify`

def small_problems():
    """family -> [(label, run)]: small problems that reach every branch of the family's
    kernels, ``run(rng, queue=None)`` running the op on fresh random data and raising
    AssertionError when it disagrees with the float64 reference.  ``make verify`` runs
    them under Oclgrind for sampled tile configurations, and the tests on every device."""
    import scipy.sparse as sp

    import pysparsecl as ps

    from ..ops.drs import keep_count

    tol = 1e-4

    def close(result, reference, what):
        err = relative_error(result, reference)
        if not err <= tol:
            raise AssertionError(f"{what}: relative error {err:.3g} > {tol}")

    def conv(n, c, h, w_, k, r, stride, pad, dil, groups, empty, bias, relu=False,
             residual=False):
        def run(rng, queue=None):
            x = rng.standard_normal((n, c, h, w_), dtype=np.float32)
            w = rng.standard_normal((k, c // groups, r, r), dtype=np.float32)
            w[rng.random(w.shape) < 0.6] = 0
            w[:empty] = 0                                       # empty CSR rows
            b = rng.standard_normal(k, dtype=np.float32) if bias else None
            want = conv2d_reference(x, w, b, (stride,) * 2, (pad,) * 2, (dil,) * 2, groups)
            res = rng.standard_normal(want.shape, dtype=np.float32) if residual else None
            y = ps.conv2d_sparse(x, sp.csr_matrix(w.reshape(k, -1)), b, kernel_size=r,
                                 stride=stride, padding=pad, dilation=dil, groups=groups,
                                 activation="relu" if relu else None, residual=res,
                                 queue=queue)
            close(y, conv2d_epilogue_reference(want, res, relu), "conv2d_sparse")
        return run

    def row_mask(rng, m, n, form, empty, full=False):
        """A third of each row's columns (all of them if ``full``): int32 indices ("idx") or
        a bool mask whose first ``empty`` rows select nothing."""
        idx = np.argsort(rng.random((m, n)), axis=1)[:, :n if full else max(1, n // 3)]
        if form == "idx":
            return idx.astype(np.int32)
        mask = np.zeros((m, n), bool)
        np.put_along_axis(mask, idx, True, axis=1)
        mask[:empty] = False
        return mask

    def matmul(m, k, n, form, empty=0, vector=False, full=False):
        def run(rng, queue=None):
            x = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((k, n), dtype=np.float32)
            mask = row_mask(rng, m, n, form, empty, full)
            if vector:
                x, mask = x[0], mask[0]
            close(ps.masked_matmul(x, w, mask, queue=queue), masked_matmul_reference(x, w, mask),
                  "masked_matmul")
        return run

    def compact_x(m, k, n, x_keep, form, empty=0, vector=False, on_device=False,
                  dense_first=False):
        """masked_matmul of a CompactRows x keeping ``x_keep`` of each row's inputs, through
        the gather kernels (or, ``dense_first``, with x scattered to dense); ``on_device``:
        x gathered from its dense form on the device (the CompactRows conversion and
        check kernels), and scattered back to compare."""
        from pysparsecl import tuning

        from .cases import compact_rows

        def run(rng, queue=None):
            values, idx = compact_rows(rng, m, k, int(np.ceil(x_keep * k)))
            w = rng.standard_normal((k, n), dtype=np.float32)
            mask = row_mask(rng, m, n, form, empty)
            dense = np.zeros((m, k), np.float32)
            np.put_along_axis(dense, idx, values, axis=1)
            if vector:
                values, idx, mask, dense = values[0], idx[0], mask[0], dense[0]
            if dense_first:       # the routine's other path: x scattered to dense
                routine = dict(GATHER_MAX_DENSITY=0)
            else:                 # the gather kernels, whatever x's density
                routine = dict(GATHER_MAX_DENSITY=100, GATHER_MIN_ROWS=1)
            with tuning.override("masked_compact_routine", **routine):
                got = product(values, idx, w, mask, dense, queue)
            close(got, masked_matmul_reference(dense, w, mask), "masked_matmul (compact x)")

        def product(values, idx, w, mask, dense, queue):
            if on_device:
                queue = ps.get_queue(queue)
                x = ps.CompactRows.from_dense(cl_array.to_device(queue, dense),
                                              cl_array.to_device(queue, idx))
                close(x.to_dense().get(), dense, "CompactRows.to_dense")
                b = np.linspace(-1.0, 1.0, k, dtype=np.float32)
                biased = x.add_bias(cl_array.to_device(queue, b), relu=True).values.get()
                close(biased, np.maximum(values + b[idx], 0).reshape(biased.shape),
                      "CompactRows.add_bias")
                args = (x, cl_array.to_device(queue, w), cl_array.to_device(queue, mask))
                return ps.masked_matmul(*args, queue=queue).get()
            return ps.masked_matmul(ps.CompactRows(values, idx, k), w, mask, queue=queue)
        return run

    def compact_first(run):
        """``run`` with the split VMM's bool list made by pscl_bool_compact, not in-kernel."""
        from pysparsecl import tuning

        def patched(rng, queue=None):
            with tuning.override("masked_vmm_routine", LIST_IN_KERNEL_MAX_N=0):
                run(rng, queue)
        return patched

    def backward(m, k, n, form, empty=0):
        def run(rng, queue=None):
            x = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((k, n), dtype=np.float32)
            mask = row_mask(rng, m, n, form, empty)
            dy = rng.standard_normal(mask.shape, dtype=np.float32)  # compact for idx masks
            dx, dw = ps.masked_matmul_backward(dy, x, w, mask, queue=queue)
            rdx, rdw = masked_matmul_backward_reference(dy, x, w, mask)
            close(dx, rdx, "masked_matmul_backward dx")
            close(dw, rdw, "masked_matmul_backward dw")
        return run

    def bn(shape, training):
        def run(rng, queue=None):
            y = rng.standard_normal(shape, dtype=np.float32)
            mask = rng.random(shape) < 0.5
            mask[:, 0] = False                                   # a channel with nothing
            c = shape[1]
            g, b = (rng.standard_normal(c, dtype=np.float32) for _ in range(2))
            if training:
                out, mean, var = ps.masked_relu_bn(y, mask, g, b, training=True,
                                                    queue=queue)
                rout, rmean, rvar = relu_bn_reference(y, mask, g, b)
                close(out, rout, "masked_relu_bn out")
                close(mean, rmean, "masked_relu_bn mean")
                close(var, rvar, "masked_relu_bn var")
            else:
                mean = rng.standard_normal(c, dtype=np.float32)
                var = rng.random(c, dtype=np.float32) + 0.5
                close(ps.masked_relu_bn(y, mask, g, b, mean, var, queue=queue),
                      relu_bn_reference(y, mask, g, b, mean, var), "masked_relu_bn")
            dout = rng.standard_normal(shape, dtype=np.float32)
            got = ps.masked_relu_bn_backward(dout, y, mask, g, mean, var,
                                             batch_stats=training, queue=queue)
            ref = relu_bn_backward_reference(dout, y, mask, g, mean, var,
                                             batch_stats=training)
            for a, r, name in zip(got, ref, ("dy", "dgamma", "dbeta")):
                close(a, r, f"masked_relu_bn_backward {name}")
        return run

    def masked_conv(n, c, h, w_, k, r, stride, pad, dil, channels):
        def run(rng, queue=None):
            x = rng.standard_normal((n, c, h, w_), dtype=np.float32)
            w = rng.standard_normal((k, c, r, r), dtype=np.float32)
            oh = (h + 2 * pad - dil * (r - 1) - 1) // stride + 1
            ow = (w_ + 2 * pad - dil * (r - 1) - 1) // stride + 1
            if channels:
                mask = rng.random((n, k, 1, 1)) < 0.5
                mask[0] = False                                  # a sample with nothing
                full = np.broadcast_to(mask, (n, k, oh, ow))
            else:
                mask = full = rng.random((n, k, oh, ow)) < 0.4
            y = ps.conv2d_masked(x, w, mask, stride, pad, dil, queue=queue)
            close(y, conv2d_masked_reference(x, w, full, (stride,) * 2, (pad,) * 2, (dil,) * 2),
                  "conv2d_masked")
        return run

    def conv_backward(n, c, h, w_, k, kernel, stride, pad, dil, form="window", keep=0.4,
                      dtype=bool, need=(True, True)):
        """conv2d_masked_backward against its reference; kernel, stride, pad and dil are
        (h, w) pairs; the mask's first sample selects nothing."""
        def run(rng, queue=None):
            from ..ops.conv2d import conv2d_output_shape
            x = rng.standard_normal((n, c, h, w_), dtype=np.float32)
            w = rng.standard_normal((k, c) + kernel, dtype=np.float32)
            out_shape = (n, k) + conv2d_output_shape((h, w_), kernel, stride, pad, dil)
            plane = out_shape if form == "window" else (n, k, 1, 1)
            mask = (rng.random(plane) < keep).astype(dtype)
            mask[0] = 0
            dy = rng.standard_normal(out_shape, dtype=np.float32)
            dy[np.broadcast_to(mask == 0, out_shape)] = np.nan      # never read
            dx, dw = ps.conv2d_masked_backward(dy, x, w, mask, stride, pad, dil,
                                               need_dx=need[0], need_dw=need[1], queue=queue)
            rdx, rdw = conv2d_masked_backward_reference(dy, x, w, mask, stride, pad, dil)
            for got, want, what in ((dx, rdx, "dx"), (dw, rdw, "dw")):
                if got is None:
                    continue
                if not np.isfinite(got).all():
                    raise AssertionError(f"conv2d_masked_backward {what}: not finite")
                close(got, want, f"conv2d_masked_backward {what}")
        return run

    def search(m, d, n, k, sparsity, compact):
        def run(rng, queue=None):
            x = rng.standard_normal((m, d), dtype=np.float32)
            w = rng.standard_normal((d, n), dtype=np.float32)
            proj = ps.SparseRandomProjection(d, k=k, seed=5, queue=queue)
            mask = ps.drs_mask(x, w, sparsity, projection=proj, compact=compact)
            n_keep = keep_count(sparsity, n)
            if compact:
                dense = np.zeros((m, n), bool)
                np.put_along_axis(dense, mask.astype(np.int64), True, axis=1)
            else:
                dense = mask
            if not np.array_equal(dense.sum(1), np.full(m, n_keep)):
                raise AssertionError("drs_mask: wrong number of kept entries per row")
            scores = drs_scores_reference(x, w, proj.matrix().toarray(), proj.scale)
            slack = 1e-4 * np.abs(scores).max(axis=1)
            kth = -np.sort(-scores, axis=1)[:, n_keep - 1]
            if not (np.all(np.where(dense, scores, np.inf) >= (kth - slack)[:, None]) and
                    np.all(np.where(dense, -np.inf, scores) <= (kth + slack)[:, None])):
                raise AssertionError("drs_mask: kept entries are not the largest scores")
        return run

    def search_conv(rng, queue=None):
        x = rng.standard_normal((1, 2, 4, 5), dtype=np.float32)
        w = rng.standard_normal((6, 2, 3, 3), dtype=np.float32)
        mask = ps.drs_mask_conv2d(x, w, 0.5, padding=1, seed=3, queue=queue)
        if mask.shape != (1, 6, 4, 5) or not np.all(mask.sum(1) == keep_count(0.5, 6)):
            raise AssertionError("drs_mask_conv2d: wrong number of kept channels")

    def search_windows(rng, queue=None):
        """f(window) of every output pixel against float64 im2col windows times R^T."""
        from .. import runtime
        from ..families import masked_conv
        from ..ops.drs import _project_windows
        for (n, c, h, w_, r, st, pd, dl) in ((2, 8, 9, 7, 3, 2, 1, 1), (2, 5, 9, 11, 3, 1, 2, 2)):
            x = rng.standard_normal((n, c, h, w_), dtype=np.float32)
            proj = ps.SparseRandomProjection(c * r * r, k=11, seed=2, queue=queue)
            g = masked_conv.geometry(x.shape, r, r, st, pd, dl)
            q = queue or runtime.queue_for(None)
            xp = masked_conv.pack_input(q, cl_array.to_device(q, x), c, g, None)
            n_pix = n * g["OH"] * g["OW"]
            got, _ = _project_windows(q, proj, xp, g, c, r, r, n_pix, None)
            rows = im2col_reference(x, (r, r), (st, st), (pd, pd), (dl, dl))
            want = proj.scale * rows @ proj.matrix().toarray().T
            close(got.get()[:, :11], want, "the windows' projection")

    def search_compact(m, d, n, k, nx, sparsity, vector=False, on_device=False, bad=False):
        """The projection and drs_mask of a CompactRows x (``nx`` of each row's ``d``
        entries) against the float64 reference of its dense form.  ``bad``: an unchecked
        device batch whose rows 1 and m - 1 hold an index outside [0, d): their
        projections must be NaN (and nothing read out of bounds), the others right."""
        from .cases import compact_rows

        def run(rng, queue=None):
            values, idx = compact_rows(rng, m, d, nx)
            if bad:
                idx[1, -1], idx[m - 1, 0] = d, -1
            dense = np.zeros((m, d), np.float64)
            np.put_along_axis(dense, np.clip(idx, 0, d - 1), values, axis=1)
            w = rng.standard_normal((d, n), dtype=np.float32)
            proj = ps.SparseRandomProjection(d, k=k, seed=5, queue=queue)
            want = proj.scale * dense @ proj.matrix().toarray().T
            if vector:
                values, idx, dense, want = values[0], idx[0], dense[0], want[0]
            if on_device or bad:
                q = ps.get_queue(queue)
                x = ps.CompactRows(cl_array.to_device(q, values), cl_array.to_device(q, idx),
                                   d, check=not bad)
                got = proj.project(x, queue=q).get()
            else:
                x = ps.CompactRows(values, idx, d)
                got = proj.project(x, queue=queue)
            if bad:
                fine = np.setdiff1d(np.arange(m), [1, m - 1])
                if not np.isnan(got[[1, m - 1]]).all():
                    raise AssertionError("project (CompactRows): an index outside [0, d) "
                                         "did not give NaN")
                close(got[fine], want[fine], "project (CompactRows)")
                return
            close(got, want, "project (CompactRows)")
            mask = ps.drs_mask(x, w, sparsity, projection=proj, compact=True, queue=queue)
            mask = mask.get() if on_device else mask
            n_keep = keep_count(sparsity, n)
            picked = np.zeros((1 if vector else m, n), bool)
            np.put_along_axis(picked, np.atleast_2d(mask).astype(np.int64), True, axis=1)
            if not np.array_equal(picked.sum(1), np.full(picked.shape[0], n_keep)):
                raise AssertionError("drs_mask (CompactRows): wrong number of kept entries")
            scores = np.atleast_2d(want) @ (proj.scale * proj.matrix().toarray() @ w)
            slack = 1e-4 * np.abs(scores).max(axis=1)
            kth = -np.sort(-scores, axis=1)[:, n_keep - 1]
            if not (np.all(np.where(picked, scores, np.inf) >= (kth - slack)[:, None]) and
                    np.all(np.where(picked, -np.inf, scores) <= (kth + slack)[:, None])):
                raise AssertionError("drs_mask (CompactRows): kept entries are not the "
                                     "largest scores")
        return run

    def elementwise(rng, queue=None):
        a = rng.standard_normal((3, 1, 37), dtype=np.float32)
        b = rng.standard_normal((4, 37), dtype=np.float32)
        m = rng.random((3, 4, 1)) < 0.5
        close(ps.add(a, b, queue=queue), a.astype(np.float64) + b, "add")
        close(ps.mul(a, b, queue=queue), a.astype(np.float64) * b, "mul")
        close(ps.axpby(2.0, a, -0.5, b, queue=queue), 2.0 * a.astype(np.float64) - 0.5 * b, "axpby")
        ref = np.where(m, np.maximum(a.astype(np.float64) + b, 0), 0)
        close(ps.add_relu(a, b, mask=m, queue=queue), ref, "add_relu masked")
        ai = rng.integers(-1000, 1000, (5, 1), dtype=np.int32)
        bi = rng.integers(-1000, 1000, (1, 300), dtype=np.int32)
        if not np.array_equal(ps.add(ai, bi, queue=queue), ai + bi):
            raise AssertionError("add int32")
        t = rng.standard_normal((6, 9), dtype=np.float32)
        close(ps.add(t.T, 1.5, queue=queue), t.T.astype(np.float64) + 1.5, "add strided")

    def xent(rng, queue=None):
        for m, n in ((5, 3), (3, 300)):
            x = rng.standard_normal((m, n), dtype=np.float32) * 3
            y = rng.integers(0, n, m)
            loss, grad = ps.softmax_cross_entropy(x, y, queue=queue)
            ref_loss, ref_grad = softmax_cross_entropy_reference(x, y)
            close(np.array([loss]), np.array([ref_loss]), "softmax_cross_entropy loss")
            close(grad, ref_grad, "softmax_cross_entropy grad")

    def random_sel(rng, queue=None):
        seed = int(rng.integers(2 ** 63))
        idx = ps.random_mask(7, 45, 0.78, seed=seed, compact=True, queue=queue).get()
        sel = ps.random_mask(7, 45, 0.78, seed=seed, queue=queue).get()
        if idx.shape != (7, 10) or not np.all(np.diff(idx, axis=1) > 0):
            raise AssertionError("random_mask: not 10 ascending columns per row")
        if not np.array_equal(np.flatnonzero(sel), (idx + 45 * np.arange(7)[:, None]).ravel()):
            raise AssertionError("random_mask: the bool and compact forms disagree")

    def colsum_sgd(rng, queue=None):
        import pyopencl.array as cl_array

        from .. import runtime
        queue = queue or runtime.get_queue()
        wide = rng.standard_normal((7, 9), dtype=np.float32)
        a = cl_array.to_device(queue, wide)[:, 2:7]              # strided rows
        close(ps.column_sums(a, scale=0.5).get(), 0.5 * wide[:, 2:7].astype(np.float64)
              .sum(0), "column_sums")
        planes = rng.standard_normal((3, 5, 2, 7), dtype=np.float32)
        close(ps.channel_sums(planes, scale=2.0, queue=queue),
              2.0 * planes.astype(np.float64).sum(axis=(0, 2, 3)), "channel_sums")
        p0, g0, v0 = (rng.standard_normal(1000, dtype=np.float32) for _ in range(3))
        for velocity in (v0, None):
            p = cl_array.to_device(queue, p0)
            v = cl_array.to_device(queue, velocity) if velocity is not None else None
            ps.sgd_step(p, cl_array.to_device(queue, g0), v, lr=0.05,
                        momentum=0.9 if v is not None else 0.0, weight_decay=0.01)
            want_p, want_v = sgd_reference(p0, g0, velocity, 0.05,
                                           0.9 if v is not None else 0.0, 0.01)
            close(p.get(), want_p, "sgd_step param")
            if v is not None:
                close(v.get(), want_v, "sgd_step velocity")

    def pool(kind, n, c, h, w_, kernel, stride, padding, count_include_pad=True,
             ties=False):
        def run(rng, queue=None):
            x = rng.standard_normal((n, c, h, w_), dtype=np.float32)
            if ties:
                x = np.round(x * 2) / 2               # few values: ties in most windows
            geometry = (kernel, stride, padding)
            if kind == "max":
                y, idx = ps.max_pool2d(x, *geometry, return_indices=True, queue=queue)
                want, want_idx = max_pool2d_reference(x, *geometry)
                close(y, want, "max_pool2d")
                close(ps.max_pool2d(x, *geometry, queue=queue), want, "max_pool2d, no indices")
                if not np.array_equal(idx, want_idx):
                    raise AssertionError("max_pool2d: wrong indices")
                dy = rng.standard_normal(y.shape, dtype=np.float32)
                close(ps.max_pool2d_backward(dy, idx, x.shape, *geometry, queue=queue),
                      max_pool2d_backward_reference(dy, want_idx, x.shape),
                      "max_pool2d_backward")
            else:
                y = ps.avg_pool2d(x, *geometry, count_include_pad=count_include_pad,
                                  queue=queue)
                close(y, avg_pool2d_reference(x, *geometry, count_include_pad), "avg_pool2d")
                dy = rng.standard_normal(y.shape, dtype=np.float32)
                close(ps.avg_pool2d_backward(dy, x.shape, *geometry,
                                             count_include_pad=count_include_pad, queue=queue),
                      avg_pool2d_backward_reference(dy, x.shape, *geometry, count_include_pad),
                      "avg_pool2d_backward")
        return run

    conv_loads = [
        ("conv 1x3x5x7 K5 3x3 p1, 2 empty rows", conv(1, 3, 5, 7, 5, 3, 1, 1, 1, 1, 2, False)),
        ("conv 2x4x6x5 K6 3x3 s2 p1 g2 bias", conv(2, 4, 6, 5, 6, 3, 2, 1, 1, 2, 1, True)),
        ("conv 1x2x7x6 K3 3x3 d2 p2", conv(1, 2, 7, 6, 3, 3, 1, 2, 2, 1, 0, False)),
        ("conv 1x5x3x3 K17 1x1", conv(1, 5, 3, 3, 17, 1, 1, 0, 1, 1, 3, True)),
        # the fused epilogue: + residual, then ReLU, in every store path the entry selects
        ("conv 2x3x5x7 K5 3x3 p1 bias+residual+relu",
         conv(2, 3, 5, 7, 5, 3, 1, 1, 1, 1, 1, True, relu=True, residual=True)),
        ("conv 1x4x6x5 K4 3x3 s2 p1 relu", conv(1, 4, 6, 5, 4, 3, 2, 1, 1, 1, 0, False,
                                                relu=True)),
        ("conv 1x6x3x3 K7 1x1 residual", conv(1, 6, 3, 3, 7, 1, 1, 0, 1, 1, 0, False,
                                              residual=True)),
    ]
    one, two, three = (1, 1), (2, 2), (3, 3)
    conv_backward_loads = [
        ("conv backward 2x3x5x6 K5 3x3 p1", conv_backward(2, 3, 5, 6, 5, three, one, one, one)),
        ("conv backward 2x17x7x6 K6 3x3 s2 p1 uint8",
         conv_backward(2, 17, 7, 6, 6, three, two, one, one, dtype=np.uint8)),
        ("conv backward 3x2x7x8 K19 3x3 d2 p2 channel mask",
         conv_backward(3, 2, 7, 8, 19, three, one, two, two, form="channel", keep=0.6)),
        ("conv backward 2x20x4x5 K3 1x1 int8, dx only",
         conv_backward(2, 20, 4, 5, 3, one, one, (0, 0), one, dtype=np.int8,
                       need=(True, False))),
        ("conv backward 2x4x6x7 K7 3x2 s(2,1) p(0,1), dw only",
         conv_backward(2, 4, 6, 7, 7, (3, 2), (2, 1), (0, 1), one, need=(False, True))),
        ("conv backward 2x1x5x5 K2 3x3 p1 all selected",
         conv_backward(2, 1, 5, 5, 2, three, one, one, one, keep=1.1)),
    ]
    vmm = [("vmm 1x37x29 bool", matmul(1, 37, 29, "bool")),
           ("vmm 1-D 37x29 idx", matmul(1, 37, 29, "idx", vector=True)),
           ("vmm 1x5x3 bool", matmul(1, 5, 3, "bool"))]
    gemm = [("gemm 5x37x29 bool, 2 empty rows", matmul(5, 37, 29, "bool", 2)),
            ("gemm 7x19x48 idx", matmul(7, 19, 48, "idx"))]
    project = [("drs 9x40x30 k7 (projected)", search(9, 40, 30, 7, 0.7, False))]
    topk = [("drs 3x33x50 k6", search(3, 33, 50, 6, 0.8, False)),
            ("drs 9x20x300 k5 compact", search(9, 20, 300, 5, 0.95, True))]
    def compact_backward(m, k, n, x_keep, form, vector=False, dense_first=False):
        """masked_matmul_backward of a CompactRows x: dx at x's entries and dw^T, by the
        dw families' kernels whatever x's density (or, ``dense_first``, with x scattered
        to dense for the dense-x kernel)."""
        from pysparsecl import tuning

        from .cases import compact_rows

        def run(rng, queue=None):
            values, idx = compact_rows(rng, m, k, int(np.ceil(x_keep * k)))
            w = rng.standard_normal((k, n), dtype=np.float32)
            mask = row_mask(rng, m, n, form, 0)
            dy = rng.standard_normal(mask.shape, dtype=np.float32)
            dense = np.zeros((m, k), np.float32)
            np.put_along_axis(dense, idx, values, axis=1)
            rdx, rdw = masked_matmul_backward_reference(dy, dense, w, mask)
            rdx = np.take_along_axis(rdx, idx, axis=1)
            if vector:
                values, idx, mask, dy, rdx = values[0], idx[0], mask[0], dy[0], rdx[0]
            with tuning.override("masked_compact_dw_routine",
                                 GATHER_MAX_DENSITY=0 if dense_first else 100):
                dx, dw = ps.masked_matmul_backward(dy, ps.CompactRows(values, idx, k), w,
                                                   mask, dw_rows=True, queue=queue)
            close(dx.values, rdx, "masked_matmul_backward dx (compact x)")
            close(dw, rdw.T, "masked_matmul_backward dw (compact x)")
        return run

    compact_dw = [
        ("compact backward 9x70x40 idx", compact_backward(9, 70, 40, 0.2, "idx")),
        ("compact backward 6x33x21 bool", compact_backward(6, 33, 21, 0.4, "bool")),
        ("compact backward 1x40x17 bool 1-D",
         compact_backward(1, 40, 17, 0.3, "bool", vector=True)),
        ("compact backward 7x50x30 idx, x scattered to dense",
         compact_backward(7, 50, 30, 0.3, "idx", dense_first=True))]
    compact = [
        ("compact 5x37x29 bool, 2 empty rows", compact_x(5, 37, 29, 0.3, "bool", 2)),
        ("compact 7x53x48 idx", compact_x(7, 53, 48, 0.2, "idx")),
        ("compact 1x70x20 idx 1-D", compact_x(1, 70, 20, 0.5, "idx", vector=True)),
        ("compact 4x9x6 no inputs", compact_x(4, 9, 6, 0.0, "bool")),
        ("compact 6x40x30 idx, on the device",
         compact_x(6, 40, 30, 0.25, "idx", on_device=True)),
        ("compact 5x60x30 bool, scattered to dense",
         compact_x(5, 60, 30, 0.3, "bool", on_device=True, dense_first=True)),
        ("compact 3x2100x20 idx, several weight chunks",
         compact_x(3, 2100, 20, 0.1, "idx"))]
    return {
        "conv2d_csr": conv_loads,
        "conv2d_pack_rows": conv_loads,
        "conv2d_pack_flat": conv_loads,
        "masked_vmm": vmm,
        "masked_vmm_split": vmm + [
            # the in-kernel scan of a bool row in several steps, and the compaction kernel
            ("vmm 1x9x600 bool", matmul(1, 9, 600, "bool")),
            ("vmm 1x37x29 bool, compacted first", compact_first(matmul(1, 37, 29, "bool")))],
        "masked_gemm": gemm,
        "masked_gemm_tiled": gemm + [
            # N % 16 == 0: the selection is read 16 at a time
            ("gemm 9x21x64 bool", matmul(9, 21, 64, "bool")),
            # dense enough for the dense tiles (DENSE > 0)
            ("gemm 45x37x70 all selected", matmul(45, 37, 70, "bool", full=True))],
        "masked_compact": compact,
        "masked_compact_tiled": compact,
        "masked_compact_dw": compact_dw,
        "masked_compact_dw_tiled": compact_dw + [
            ("compact backward 3x2100x9 idx, several row chunks",
             compact_backward(3, 2100, 9, 0.1, "idx"))],
        "masked_dx": [("backward 5x37x29 bool, 1 empty row", backward(5, 37, 29, "bool", 1)),
                      ("backward 3x17x40 idx", backward(3, 17, 40, "idx")),
                      ("backward 1x9x7 bool", backward(1, 9, 7, "bool"))],
        # sampled configurations of both SCAN values: 1 runs the scans, 0 masked_util's
        # serial builders
        "masked_lists": [("backward 37x5x29 bool, 1 empty row", backward(37, 5, 29, "bool", 1)),
                         ("backward 3x7x140 idx", backward(3, 7, 140, "idx"))],
        "masked_bn": [("bn (2,3,4,5) inference", bn((2, 3, 4, 5), False)),
                      ("bn (2,3,4,5) training", bn((2, 3, 4, 5), True)),
                      ("bn (6,37) training", bn((6, 37), True)),
                      ("bn (6,37) inference", bn((6, 37), False))],
        "masked_conv": [("masked conv 1x3x5x6 K4 3x3 p1", masked_conv(1, 3, 5, 6, 4, 3, 1, 1, 1,
                                                                      False)),
                        ("masked conv 2x2x7x5 K5 3x3 s2 d1", masked_conv(2, 2, 7, 5, 5, 3, 2, 0,
                                                                         1, False))],
        "masked_conv_channels": [("channel-masked conv 2x3x5x6 K5 3x3 p1",
                                  masked_conv(2, 3, 5, 6, 5, 3, 1, 1, 1, True)),
                                 ("channel-masked conv 2x2x6x7 K19 3x3 s2 d2 p2",
                                  masked_conv(2, 2, 6, 7, 19, 3, 2, 2, 2, True))],
        # unaligned (C % 4) and float4 staging, a window and a channel mask, stride and
        # dilation, several row tiles and images inside one tile (7 x 7 planes)
        "masked_conv_tiled": [
            ("tiled masked conv 1x3x5x6 K4 3x3 p1", masked_conv(1, 3, 5, 6, 4, 3, 1, 1, 1,
                                                                False)),
            ("tiled masked conv 3x8x7x7 K20 3x3 p1", masked_conv(3, 8, 7, 7, 20, 3, 1, 1, 1,
                                                                 False)),
            ("tiled masked conv 2x4x7x5 K5 3x3 s2 d1", masked_conv(2, 4, 7, 5, 5, 3, 2, 0, 1,
                                                                   False)),
            ("tiled channel-masked conv 2x4x6x7 K19 3x3 s2 d2 p2",
             masked_conv(2, 4, 6, 7, 19, 3, 2, 2, 2, True))],
        "masked_conv_dx": conv_backward_loads,
        "masked_conv_dw": conv_backward_loads,
        # the implicit GEMM of the windows' projection: unaligned and float4 staging,
        # stride and dilation, partial tiles
        "drs_conv_project_tiled": [("drs_mask_conv2d 1x2x4x5 K6", search_conv),
                                   ("drs_mask_conv2d windows 2x8x9x7 s2, 2x5x9x11 d2",
                                    search_windows)],
        # (the convolution windows' projection runs under drs_project's parameters too)
        "drs_project": project + [("drs_mask_conv2d 1x2x4x5 K6", search_conv)],
        "drs_project_split": project,
        # partial row blocks and k chunks (k 7, 13), no entries, all entries, a vector,
        # device arrays, and indices outside [0, d) in an unchecked batch
        "drs_project_compact": [
            ("drs compact 9x40x30 k7, 5 entries", search_compact(9, 40, 30, 7, 5, 0.7)),
            ("drs compact 1-D 64x50 k13, 9 entries",
             search_compact(1, 64, 50, 13, 9, 0.9, vector=True)),
            ("drs compact 5x33x20 k6, no entries", search_compact(5, 33, 20, 6, 0, 0.8)),
            ("drs compact 6x20x40 k5, all entries", search_compact(6, 20, 40, 5, 20, 0.9)),
            ("drs compact 11x70x45 k9, on the device",
             search_compact(11, 70, 45, 9, 8, 0.8, on_device=True)),
            ("drs compact 7x30 k7, indices outside [0, d)",
             search_compact(7, 30, 10, 7, 4, 0.5, bad=True))],
        "drs_scores": [("drs 9x40x30 k7 compact", search(9, 40, 30, 7, 0.7, True)),
                       ("drs 6x20x70 k5", search(6, 20, 70, 5, 0.9, False))],
        "drs_fused": [("drs 1x40x30 k7", search(1, 40, 30, 7, 0.5, False)),
                      ("drs 2x20x70 k5 compact", search(2, 20, 70, 5, 0.9, True))],
        "drs_topk": topk + [("drs_mask_conv2d 1x2x4x5 K6", search_conv)],
        # rows ranked (N <= 256) and by radix passes, each as a mask and as lists
        "drs_topk_team": topk + [("drs_mask_conv2d 1x2x4x5 K6", search_conv),
                                 ("drs 4x20x40 k5 compact", search(4, 20, 40, 5, 0.7, True)),
                                 ("drs 3x25x280 k6", search(3, 25, 280, 6, 0.6, False))],
        "elementwise": [("add/mul/axpby/add_relu, broadcast, mask, int32, strided",
                         elementwise)],
        # overlapping windows, padding, stride != kernel, gaps, rows not a multiple of RUN
        "pooling": [
            ("max 2x3x7x9 k3 s2 p1, ties", pool("max", 2, 3, 7, 9, 3, 2, 1, ties=True)),
            ("max 1x2x6x11 k(2,3) s(3,1) p(1,1)", pool("max", 1, 2, 6, 11, (2, 3), (3, 1),
                                                         (1, 1))),
            ("max 1x2x5x5 k2 s3 (uncovered inputs)", pool("max", 1, 2, 5, 5, 2, 3, 0)),
            ("avg 2x3x7x9 k3 s2 p1", pool("avg", 2, 3, 7, 9, 3, 2, 1)),
            ("avg 2x3x7x9 k3 s2 p1, padding not counted",
             pool("avg", 2, 3, 7, 9, 3, 2, 1, count_include_pad=False)),
            ("avg 1x2x6x11 k(2,3) s(3,1) p(1,1), padding not counted",
             pool("avg", 1, 2, 6, 11, (2, 3), (3, 1), (1, 1), count_include_pad=False)),
            ("avg 1x2x5x5 k2 s3 (uncovered inputs)", pool("avg", 1, 2, 5, 5, 2, 3, 0)),
            ("global avg 2x5x4x13", pool("avg", 2, 5, 4, 13, (4, 13), None, 0))],
        "training": [("softmax_xent 5x3, 3x300 (several chunks per item)", xent),
                     ("random_mask 7x45 keep 10, compact and bool", random_sel),
                     ("column_sums 7x5 strided rows, channel_sums 3x5x2x7, sgd 1000 with and "
                      "without momentum",
                      colsum_sgd)],
    }
