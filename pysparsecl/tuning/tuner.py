"""The autotuner: search a kernel family's tile configurations on one device.

For each family with a driver in :data:`TUNABLES` (:mod:`pysparsecl.testing.problems`, the
problem registry), the tuner computes each representative problem's float64 reference
from its host inputs (:mod:`pysparsecl.testing.reference`, independent of the kernels),
then tries the current configuration and a random subset of the candidates the spec allows
on this device (constraints and the work-group limit).  A candidate that fails to build,
raises, or disagrees with the reference scores as infinitely slow and is reported; it
never stops the search.  (A variant family's override makes its routine choose it, and
a routine's own settings are tuned over the same problems: see
:class:`pysparsecl.params.Routine`.)  Candidates are timed with OpenCL profiling events
(median after a warm-up) until ``budget_s`` runs out; a candidate's score is the sum of
its problems' times, each times the problem's weight (:attr:`Problem.weight`).  The
fastest few and the configuration in use are then
re-timed in interleaved rounds, and the winner -- the configuration in use unless another
beats it by more than ``min_gain`` and in every round -- is written to the user's database
(:func:`pysparsecl.tuning.write_user_entry`), which :func:`pysparsecl.tuning.lookup`
consults first from then on.  Every shape class among the problems also gets its own
winner (the overall winner unless beaten on that class in the same way), found from the
same timings at no extra search cost.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from ..params import SPECS, device_limits
from ..testing.problems import TUNABLES, Problem
from . import lookup, override, write_user_entry

__all__ = ["TUNABLES", "Candidate", "TuneResult", "tune_family"]

@dataclass
class Candidate:
    params: Dict[str, int]
    times_ms: List[float] = field(default_factory=list)   # one per problem
    error: str = ""
    #: The interleaved confirmation's times: one list (per problem) per round.
    rounds_ms: List[List[float]] = field(default_factory=list)
    #: Each problem's weight in the score (Problem.weight); empty: all 1.
    weights: List[float] = field(default_factory=list)

    def score(self, times_ms: Sequence[float], indices: Sequence[int]) -> float:
        """The weighted sum of ``times_ms`` over the problems at ``indices``."""
        return float(sum(times_ms[i] * (self.weights[i] if self.weights else 1.0)
                         for i in indices))

    @property
    def total_ms(self) -> float:
        """The score over every problem: the weighted sum of their times."""
        return self.class_ms(range(len(self.times_ms)))

    def class_ms(self, indices: Sequence[int]) -> float:
        """The score over the problems at ``indices`` (one shape class)."""
        if self.error or not self.times_ms:
            return math.inf
        return self.score(self.times_ms, indices)


@dataclass
class TuneResult:
    family: str
    device: str
    problems: List[str]
    tried: List[Candidate]
    best: Optional[Candidate]
    baseline: Optional[Candidate]      # the configuration in use before tuning
    seconds: float
    #: shape class -> the configuration that wins on that class's problems
    by_class: Dict[str, Candidate] = field(default_factory=dict)


def _host(result) -> np.ndarray:
    return result.get() if isinstance(result, cl_array.Array) else np.asarray(result)


#: A candidate whose checking run of a problem takes this many times the fastest time seen
#: on it is not timed further there (inf): a pathological configuration can take minutes
#: on a large problem, and the budget is only checked between candidates.
SLOW_FACTOR = 20.0


def _run(problems: Sequence[Problem], reference, queue, reps: int,
         limits_ms: Optional[Sequence[float]] = None) -> List[float]:
    """Check every problem's output against the reference, then time it: the median of
    ``reps`` runs' summed event times, in ms; inf where the checking run alone took more
    than the problem's ``limits_ms``."""
    times = []
    for i, (problem, ref) in enumerate(zip(problems, reference)):
        events: list = []
        got = _host(problem.launch(events))
        queue.finish()
        failure = problem.check(got, ref)
        if failure:
            raise ArithmeticError(f"{failure} on {problem.label}")
        first_ms = sum(e.profile.end - e.profile.start for e in events) * 1e-6
        if limits_ms is not None and first_ms > limits_ms[i]:
            times.append(math.inf)
            continue
        samples = []
        for _ in range(reps):
            events: list = []
            problem.launch(events)
            queue.finish()
            samples.append(sum(e.profile.end - e.profile.start for e in events) * 1e-6)
        times.append(float(np.median(samples)))
    return times


def _classes(problems: Sequence[Problem]) -> Dict[str, List[int]]:
    """Shape class -> indices of its problems (problems without a class are left out)."""
    classes: Dict[str, List[int]] = {}
    for i, problem in enumerate(problems):
        if problem.shape_class is not None:
            classes.setdefault(problem.shape_class, []).append(i)
    return classes


def _keep_unless_beaten(best: Candidate, incumbent: Optional[Candidate],
                        indices: Sequence[int], min_gain: float) -> Candidate:
    """``best`` if it beats ``incumbent`` on the problems at ``indices`` by more than
    ``min_gain`` in the median and is faster in every interleaved round (each round
    times both in the same stretch, so a slow spell on a shared machine cannot crown it);
    else ``incumbent``."""
    if incumbent is None or best is incumbent:
        return best
    if best.class_ms(indices) > incumbent.class_ms(indices) * (1.0 - min_gain):
        return incumbent
    paired = zip(best.rounds_ms, incumbent.rounds_ms)
    if any(best.score(b, indices) >= incumbent.score(a, indices) for b, a in paired):
        return incumbent
    return best


def _confirm(family, problems, reference, queue, tried: List[Candidate], reps: int, top: int,
             min_gain: float) -> Tuple[Optional[Candidate], Dict[str, Candidate]]:
    """Re-time the finalists -- the fastest few overall, the fastest two of every shape
    class, and the baseline (the first tried) -- in interleaved rounds: a single sequential
    timing on a shared machine can crown a lucky candidate.  The baseline is kept unless
    the winner beats it by more than ``min_gain``; a class keeps the overall winner unless
    its own winner beats it on that class by as much."""
    ok = [c for c in tried if not c.error]
    if not ok:
        return None, {}
    classes = _classes(problems)
    finalists = sorted(ok, key=lambda c: c.total_ms)[:top]
    for indices in classes.values():
        for cand in sorted(ok, key=lambda c: c.class_ms(indices))[:2]:
            if cand not in finalists:
                finalists.append(cand)
    baseline = tried[0] if not tried[0].error else None
    if baseline is not None and baseline not in finalists:
        finalists.append(baseline)
    if len(finalists) > 1:
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
            return None, {}
        for cand in finalists:  # confirmed per-problem times: medians over the rounds
            cand.rounds_ms = rounds[id(cand)]
            cand.times_ms = [float(t) for t in np.median(np.array(rounds[id(cand)]), axis=0)]
    baseline = baseline if baseline in finalists else None
    every = range(len(problems))
    best = _keep_unless_beaten(min(finalists, key=lambda c: c.total_ms), baseline, every,
                               min_gain)
    by_class = {}
    for shape_class, indices in classes.items():
        by_class[shape_class] = _keep_unless_beaten(
            min(finalists, key=lambda c, indices=indices: c.class_ms(indices)), best, indices,
            min_gain)
    return best, by_class


def tune_family(family: str, queue: cl.CommandQueue, *, budget_s: float = 120.0,
                max_candidates: int = 200, reps: int = 5, seed: int = 0, quick: bool = False,
                shapes: Optional[list] = None, first: Sequence[Dict[str, int]] = (),
                write: bool = True, progress=sys.stderr, confirm_top: int = 3,
                min_gain: float = 0.03) -> TuneResult:
    """Search ``family``'s configurations on ``queue``'s device; see the module docstring.

    ``shapes``: the family's list from a shapes file (:mod:`pysparsecl.testing.problems`)
    instead of its representative problems.  ``first``: configurations (partial ones are
    completed with the spec defaults) to try right after the one in use, e.g. the winners
    of an earlier sweep; they count towards ``max_candidates``."""
    if family not in SPECS:
        raise ValueError(f"unknown kernel family {family!r}; known: {sorted(SPECS)}")
    if family not in TUNABLES:
        raise ValueError(f"the tuner has no driver for {family!r} yet; tunable: "
                         f"{sorted(TUNABLES)}")
    if not queue.properties & cl.command_queue_properties.PROFILING_ENABLE:
        raise ValueError("queue must have profiling enabled (pysparsecl.get_queue() does)")
    spec, device = SPECS[family], queue.device
    start = time.perf_counter()
    problems = TUNABLES[family](queue, np.random.default_rng(seed), quick, shapes)
    reference = [p.reference() for p in problems]
    current = lookup(spec, device)
    leading = [current]
    # The per-class entries in use are candidates too, so that a class's winner is only
    # replaced by one measured faster, never dropped because this run missed it.
    for cls in dict.fromkeys(p.shape_class for p in problems if p.shape_class):
        in_use = lookup(spec, device, cls)
        if in_use not in leading:
            leading.append(in_use)
    for params in first:
        full = spec.check(params, **device_limits(device))
        if full not in leading:
            leading.append(full)
    space = spec.random_candidates(max(1, max_candidates), seed, **device_limits(device))
    order = (leading + [c for c in space if c not in leading])[:max(1, max_candidates)]
    tried: List[Candidate] = []
    best: Optional[Candidate] = None
    fastest = [math.inf] * len(problems)   # per problem, over the candidates so far
    for i, params in enumerate(order):
        if i and time.perf_counter() - start > budget_s:
            break
        cand = Candidate(dict(params), weights=[p.weight for p in problems])
        try:
            with override(family, **params):
                cand.times_ms = _run(problems, reference, queue, reps,
                                     [SLOW_FACTOR * t for t in fastest])
            fastest = [min(f, t) for f, t in zip(fastest, cand.times_ms)]
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
    best, by_class = _confirm(family, problems, reference, queue, tried, reps, confirm_top,
                              min_gain)
    result = TuneResult(family, device.name.strip(), [p.label for p in problems], tried,
                        best, tried[0] if tried else None, time.perf_counter() - start,
                        by_class)
    if write and result.best is not None:
        classes = _classes(problems)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_user_entry(device, family, {
            "params": result.best.params, "total_ms": result.best.total_ms,
            "times_ms": dict(zip(result.problems, result.best.times_ms)),
            "baseline_ms": result.baseline.total_ms if result.baseline else None,
            "candidates_tried": len(tried), "quick": quick, "date": now,
            "shapes": {cls: {"params": cand.params,
                             "ms": cand.class_ms(classes[cls]),
                             "overall_winner_ms": result.best.class_ms(classes[cls])}
                       for cls, cand in by_class.items()},
        })
    return result
