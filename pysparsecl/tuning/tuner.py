"""The autotuner: search a kernel family's tile configurations on one device.

For each family with a driver in :data:`TUNABLES`, the tuner runs the spec-default
configuration on representative problems to get reference outputs, then tries the
current configuration and a random subset of the candidates the spec allows on this
device (constraints and the work-group limit).  A candidate that fails to build, raises,
or disagrees with the reference scores as infinitely slow and is reported; it never stops
the search.  Candidates are timed with OpenCL profiling events (median after a warm-up)
until ``budget_s`` runs out.  The fastest few and the configuration in use are then
re-timed in interleaved rounds, and the winner -- the configuration in use unless another
beats it by more than ``min_gain`` -- is written to the user's database
(:func:`pysparsecl.tuning.write_user_entry`), which :func:`pysparsecl.tuning.lookup`
consults first from then on.
"""

from __future__ import annotations

import datetime
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from ..params import SPECS
from . import lookup, override, write_user_entry

__all__ = ["TUNABLES", "Candidate", "TuneResult", "tune_family"]

#: A problem: a label (its shape class) and a launch that appends its OpenCL events to the
#: list it is given and returns the op's output.
Problem = Tuple[str, Callable[[list], object]]


def _conv2d_problems(queue: cl.CommandQueue, rng: np.random.Generator, quick: bool
                     ) -> List[Problem]:
    from .. import SparseConvWeight, conv2d_sparse
    from ..testing.cases import RESNET50_LAYERS
    # The batches the targets name: 8 on CPUs, 32 on GPUs.
    batch = 32 if queue.device.type & cl.device_type.GPU else 8
    layers = [c.with_(H=14, W=14, N=2) for c in RESNET50_LAYERS[:2]] if quick else \
        [c.with_(N=batch) for c in RESNET50_LAYERS[:4]]
    problems = []
    for case in layers:
        case = case.with_(sparsity=0.9)
        x, _, csr, _ = case.make_inputs(rng)
        x_dev = cl_array.to_device(queue, x)
        weight = SparseConvWeight(csr, case.C, case.kernel, case.groups, queue)
        kw = dict(stride=case.stride, padding=case.padding)
        problems.append((case.label(), lambda ev, x_dev=x_dev, weight=weight, kw=kw:
                         conv2d_sparse(x_dev, weight, events=ev, **kw)))
    return problems


def _elementwise_problems(queue: cl.CommandQueue, rng: np.random.Generator, quick: bool
                          ) -> List[Problem]:
    from .. import add
    n = 1 << (18 if quick else 24)
    a, b = (cl_array.to_device(queue, rng.standard_normal(n, dtype=np.float32))
            for _ in range(2))
    out = cl_array.empty_like(a)
    return [(f"add float32 n={n}", lambda ev: add(a, b, out=out, events=ev))]


#: Families the tuner knows how to exercise.  (The DSG families still need drivers.)
TUNABLES: Dict[str, Callable[[cl.CommandQueue, np.random.Generator, bool], List[Problem]]] = {
    "conv2d_csr": _conv2d_problems,
    "elementwise": _elementwise_problems,
}


@dataclass
class Candidate:
    params: Dict[str, int]
    times_ms: List[float] = field(default_factory=list)
    error: str = ""

    @property
    def total_ms(self) -> float:
        return math.inf if self.error or not self.times_ms else float(sum(self.times_ms))


@dataclass
class TuneResult:
    family: str
    device: str
    problems: List[str]
    tried: List[Candidate]
    best: Optional[Candidate]
    baseline: Optional[Candidate]      # the configuration in use before tuning
    seconds: float


def _host(result) -> np.ndarray:
    return result.get() if isinstance(result, cl_array.Array) else np.asarray(result)


def _run(problems: Sequence[Problem], reference, queue, reps: int) -> List[float]:
    times = []
    for (label, launch), ref in zip(problems, reference):
        got = _host(launch([]))
        queue.finish()
        denom = np.linalg.norm(ref.astype(np.float64))
        err = np.linalg.norm(got.astype(np.float64) - ref) / (denom or 1.0)
        if not err < 1e-4:
            raise ArithmeticError(f"relative error {err:.2e} on {label}")
        samples = []
        for _ in range(reps):
            events: list = []
            launch(events)
            queue.finish()
            samples.append(sum(e.profile.end - e.profile.start for e in events) * 1e-6)
        times.append(float(np.median(samples)))
    return times


def _confirm(family, problems, reference, queue, tried: List[Candidate], reps: int, top: int,
             min_gain: float) -> Optional[Candidate]:
    """Re-time the fastest few candidates and the baseline (the first tried) in interleaved
    rounds; a single sequential timing on a shared machine can crown a lucky candidate.
    The baseline is kept unless the winner beats it by more than ``min_gain``."""
    ok = [c for c in tried if not c.error]
    if not ok:
        return None
    finalists = sorted(ok, key=lambda c: c.total_ms)[:top]
    baseline = tried[0] if not tried[0].error else None
    if baseline is not None and baseline not in finalists:
        finalists.append(baseline)
    if len(finalists) == 1:
        return finalists[0]
    rounds: Dict[int, List[List[float]]] = {id(c): [] for c in finalists}
    for _ in range(3):
        for cand in finalists:
            if cand.error:
                continue
            try:
                with override(family, **cand.params):
                    rounds[id(cand)].append(_run(problems, reference, queue, reps))
            except Exception as exc:  # failing now: out of the running, as in the search
                cand.error = f"{type(exc).__name__} on re-timing: {exc}"
    finalists = [c for c in finalists if not c.error]
    if not finalists:
        return None
    baseline = baseline if baseline in finalists else None
    for cand in finalists:  # confirmed per-problem times: medians over the rounds
        cand.times_ms = [float(t) for t in np.median(np.array(rounds[id(cand)]), axis=0)]
    best = min(finalists, key=lambda c: c.total_ms)
    if baseline is not None and best is not baseline and \
            best.total_ms > baseline.total_ms * (1.0 - min_gain):
        return baseline
    return best


def tune_family(family: str, queue: cl.CommandQueue, *, budget_s: float = 120.0,
                max_candidates: int = 200, reps: int = 5, seed: int = 0, quick: bool = False,
                write: bool = True, progress=sys.stderr, confirm_top: int = 3,
                min_gain: float = 0.03) -> TuneResult:
    """Search ``family``'s configurations on ``queue``'s device; see the module docstring."""
    if family not in SPECS:
        raise ValueError(f"unknown kernel family {family!r}; known: {sorted(SPECS)}")
    if family not in TUNABLES:
        raise ValueError(f"the tuner has no driver for {family!r} yet; tunable: "
                         f"{sorted(TUNABLES)}")
    if not queue.properties & cl.command_queue_properties.PROFILING_ENABLE:
        raise ValueError("queue must have profiling enabled (pysparsecl.get_queue() does)")
    spec, device = SPECS[family], queue.device
    start = time.perf_counter()
    problems = TUNABLES[family](queue, np.random.default_rng(seed), quick)
    with override(family, **spec.defaults()):
        reference = [_host(launch([])).astype(np.float64) for _, launch in problems]
    current = lookup(spec, device)
    space = list(spec.candidates(device.max_work_group_size))
    random.Random(seed).shuffle(space)
    order = [current] + [c for c in space if c != current][:max(0, max_candidates - 1)]
    tried: List[Candidate] = []
    best: Optional[Candidate] = None
    for i, params in enumerate(order):
        if i and time.perf_counter() - start > budget_s:
            break
        cand = Candidate(dict(params))
        try:
            with override(family, **params):
                cand.times_ms = _run(problems, reference, queue, reps)
        except Exception as exc:  # a failed candidate scores as infinitely slow
            cand.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        tried.append(cand)
        if best is None or cand.total_ms < best.total_ms:
            best = cand
        if progress is not None:
            shown = "-" if best is None or math.isinf(best.total_ms) else f"{best.total_ms:.3f}"
            progress.write(f"\r{family}: {i + 1}/{len(order)} tried, "
                           f"{sum(bool(c.error) for c in tried)} failed, best {shown} ms, "
                           f"{time.perf_counter() - start:5.1f}/{budget_s:.0f} s")
            progress.flush()
    if progress is not None:
        progress.write("\n")
    best = _confirm(family, problems, reference, queue, tried, reps, confirm_top, min_gain)
    result = TuneResult(family, device.name.strip(), [label for label, _ in problems], tried,
                        best, tried[0] if tried else None, time.perf_counter() - start)
    if write and result.best is not None:
        write_user_entry(device, family, {
            "params": result.best.params, "total_ms": result.best.total_ms,
            "times_ms": dict(zip(result.problems, result.best.times_ms)),
            "baseline_ms": result.baseline.total_ms if result.baseline else None,
            "candidates_tried": len(tried), "quick": quick,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    return result
