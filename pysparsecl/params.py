"""Tile-parameter specifications shared by the kernels, the tuner and the tests.

Each kernel family declares its tile parameters exactly once, as a
:class:`ParamSpec`: every parameter with its default, its candidate values and
a one-line meaning, plus named constraints over the parameter names.  The
template renders with the defaults alone; the tuner enumerates the candidates
that satisfy every constraint.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

__all__ = ["TileParam", "Constraint", "ParamSpec", "InvalidParamsError", "SPECS",
           "Choice", "Routine", "ROUTINES", "routine_of", "device_limits"]

#: Every kernel family's spec, by family name (filled as the op modules are imported).
#: A routine's settings are a spec too (see :class:`Routine`), looked up and tuned alike.
SPECS: Dict[str, "ParamSpec"] = {}

#: Every op's routine, by its settings' family name (``<op>_routine``).
ROUTINES: Dict[str, "Routine"] = {}

#: Spaces up to this many combinations are enumerated; larger ones are sampled.
ENUMERATE_LIMIT = 50_000


class InvalidParamsError(ValueError):
    """A tile configuration names an unknown parameter or breaks a constraint."""


@dataclass(frozen=True)
class TileParam:
    name: str
    default: int
    candidates: Tuple[int, ...]
    doc: str

    def __post_init__(self):
        if self.default not in self.candidates:
            raise ValueError(f"default {self.default} of {self.name} is not among its candidates")


@dataclass(frozen=True)
class Constraint:
    """A named predicate over a full parameter dict (and, optionally, device limits)."""

    name: str
    holds: Callable[[Mapping[str, int]], bool]
    doc: str


@dataclass(frozen=True)
class ParamSpec:
    family: str
    params: Tuple[TileParam, ...]
    constraints: Tuple[Constraint, ...] = ()
    #: Derived launch quantity: the work-group size in work-items, checked against the device.
    work_group_size: Optional[Callable[[Mapping[str, int]], int]] = None
    #: Derived launch quantity: the local memory a work-group uses, in bytes, checked
    #: against the device (families without local memory leave it None).
    local_memory: Optional[Callable[[Mapping[str, int]], int]] = None
    _by_name: Dict[str, TileParam] = field(default=None, init=False, repr=False, compare=False)
    _names: Tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})
        object.__setattr__(self, "_names", tuple(p.name for p in self.params))
        self.check(self.defaults())
        if SPECS.setdefault(self.family, self) is not self:
            raise ValueError(f"two kernel families are named {self.family!r}")

    def __hash__(self) -> int:
        # A family has one spec (see SPECS): its name is hash enough.  The generated hash
        # walks every parameter's candidates, ~4 us a call, and the ops key dicts by spec.
        return hash(self.family)

    @property
    def names(self) -> Tuple[str, ...]:
        return self._names

    def defaults(self) -> Dict[str, int]:
        return {p.name: p.default for p in self.params}

    def violations(self, values: Mapping[str, int], max_work_group_size: Optional[int] = None,
                   max_local_memory: Optional[int] = None):
        """Names of the constraints that ``values`` (a complete configuration) breaks,
        including the device limits given."""
        broken = [c.name for c in self.constraints if not c.holds(values)]
        if (max_work_group_size is not None and self.work_group_size is not None
                and self.work_group_size(values) > max_work_group_size):
            broken.append(f"work_group_size<={max_work_group_size}")
        if (max_local_memory is not None and self.local_memory is not None
                and self.local_memory(values) > max_local_memory):
            broken.append(f"local_memory<={max_local_memory}")
        return broken

    def check(self, values: Mapping[str, int], max_work_group_size: Optional[int] = None,
              max_local_memory: Optional[int] = None) -> Dict[str, int]:
        """Complete ``values`` with defaults and validate it; return the full configuration."""
        unknown = set(values) - set(self._by_name)
        if unknown:
            raise InvalidParamsError(
                f"{self.family}: unknown tile parameter(s) {sorted(unknown)}; "
                f"known: {list(self.names)}")
        full = self.defaults()
        for name, value in values.items():
            allowed = self._by_name[name].candidates
            if isinstance(value, bool) or value not in allowed:
                raise InvalidParamsError(
                    f"{self.family}: tile parameter {name}={value!r} is not one of {allowed}")
            full[name] = int(value)
        broken = self.violations(full, max_work_group_size, max_local_memory)
        if broken:
            raise InvalidParamsError(
                f"{self.family}: configuration {full} breaks constraint(s) {broken}")
        return full

    def candidates(self, max_work_group_size: Optional[int] = None,
                   max_local_memory: Optional[int] = None,
                   fixed: Optional[Mapping[str, int]] = None) -> Iterator[Dict[str, int]]:
        """Every combination of candidate values (with the parameters in ``fixed`` held at
        those values) that satisfies all constraints.  A space can hold millions of
        combinations: :meth:`random_candidates` draws from it without walking it."""
        fixed = dict(fixed or {})
        names = self.names
        choices = [(fixed[p.name],) if p.name in fixed else p.candidates for p in self.params]
        for combo in itertools.product(*choices):
            values = dict(zip(names, combo))
            if not self.violations(values, max_work_group_size, max_local_memory):
                yield values

    def random_candidates(self, n: int, seed=0, max_work_group_size: Optional[int] = None,
                          max_local_memory: Optional[int] = None,
                          fixed: Optional[Mapping[str, int]] = None) -> List[Dict[str, int]]:
        """Up to ``n`` distinct valid configurations in a random order set by ``seed``.

        Spaces of up to ENUMERATE_LIMIT combinations are enumerated and shuffled; larger
        ones are sampled -- random combinations, those that break a constraint rejected --
        so that neither the tuner nor a test walks millions of combinations.  A sampled
        space may yield fewer than ``n`` when valid configurations are rare."""
        rng = random.Random(seed)
        fixed = dict(fixed or {})
        free = [p for p in self.params if p.name not in fixed]
        size = 1
        for p in free:
            size *= len(p.candidates)
        limits = (max_work_group_size, max_local_memory)
        if size <= ENUMERATE_LIMIT:
            configs = list(self.candidates(*limits, fixed=fixed))
            rng.shuffle(configs)
            return configs[:n]
        picked: Dict[tuple, Dict[str, int]] = {}
        for _ in range(max(1000, 200 * n)):
            if len(picked) >= n:
                break
            values = dict(fixed, **{p.name: rng.choice(p.candidates) for p in free})
            values = {name: values[name] for name in self.names}
            key = tuple(values.values())
            if key not in picked and not self.violations(values, *limits):
                picked[key] = values
        return list(picked.values())

    def sample(self, n: int, seed: int = 0, max_work_group_size: Optional[int] = None
               ) -> List[Dict[str, int]]:
        """The defaults, each parameter's extreme values (in some valid configuration), and
        ``n`` more drawn at random with ``seed``; duplicates removed.  Tests run every op on
        such a sample so that each template branch is built and checked."""
        rng = random.Random(seed)
        picked = [self.defaults()]
        for param in self.params:
            for value in (min(param.candidates), max(param.candidates)):
                picked += self.random_candidates(1, rng.random(), max_work_group_size,
                                                 fixed={param.name: value})
        picked += self.random_candidates(n, rng.random(), max_work_group_size)
        return list({tuple(sorted(c.items())): c for c in picked}.values())

    def space_size(self) -> int:
        size = 1
        for p in self.params:
            size *= len(p.candidates)
        return size


@dataclass(frozen=True)
class Choice:
    """One decision of a routine: which of ``variants`` (kernel families, each with its own
    ParamSpec) runs.  The routine setting ``name`` holds the chosen variant's index."""

    name: str
    variants: Tuple[ParamSpec, ...]
    doc: str


class Routine:
    """Which kernels an op runs: decided by a rule, not by tile parameters (CLBlast's
    ``UseDirectKernel``).

    The rule reads the routine's *settings*: one index per :class:`Choice` and the shape
    thresholds in ``thresholds`` (e.g. the rows up to which a one-launch kernel is used).
    The settings form a ParamSpec of their own, family ``<op>_routine``, so that they are
    looked up like tile parameters -- device, then vendor/type, then the ``cpu``/``gpu``
    entries every family has -- overridden with :func:`pysparsecl.tuning.override`, and
    tuned.  Index 0 of a choice is its spec default: the CPU-shaped kernel.
    """

    def __init__(self, op: str, choices: Tuple[Choice, ...],
                 thresholds: Tuple[TileParam, ...] = (),
                 by_threshold: Optional[Mapping[str, Dict[str, int]]] = None):
        self.op = op
        self.choices = {c.name: c for c in choices}
        #: Variants that a threshold enables, with the settings that force them on.
        self.by_threshold = dict(by_threshold or {})
        self.spec = ParamSpec(
            family=f"{op}_routine",
            params=tuple(TileParam(c.name, 0, tuple(range(len(c.variants))),
                                   c.doc + ": " + ", ".join(
                                       f"{i} = {v.family}" for i, v in enumerate(c.variants)))
                         for c in choices) + tuple(thresholds))
        ROUTINES[self.spec.family] = self

    def variant(self, settings: Mapping[str, int], choice: str) -> ParamSpec:
        """The kernel family that ``settings`` choose for ``choice``."""
        return self.choices[choice].variants[settings[choice]]

    def selecting(self, family: str) -> Dict[str, int]:
        """Settings that make the op run ``family`` (the tuner times a variant this way)."""
        if family in self.by_threshold:
            return dict(self.by_threshold[family])
        for choice in self.choices.values():
            for i, variant in enumerate(choice.variants):
                if variant.family == family:
                    return {choice.name: i}
        raise KeyError(f"{family!r} is not a variant of the {self.op} routine")

    @property
    def families(self) -> Tuple[str, ...]:
        return (tuple(v.family for c in self.choices.values() for v in c.variants)
                + tuple(self.by_threshold))


def routine_of(family: str) -> Optional[Routine]:
    """The routine that chooses between ``family`` and its sibling variants, if any."""
    for routine in ROUTINES.values():
        if family in routine.families:
            return routine
    return None


def device_limits(device) -> Dict[str, int]:
    """The keyword arguments of :meth:`ParamSpec.check` / :meth:`ParamSpec.candidates` for
    a pyopencl device: its work-group size and local memory limits."""
    return dict(max_work_group_size=device.max_work_group_size,
                max_local_memory=device.local_mem_size)


def parse_overrides(text: str) -> Dict[str, Dict[str, int]]:
    """Parse ``"family:NAME=V,NAME=V;family2:NAME=V"`` (the PYSPARSECL_PARAMS format)."""
    result: Dict[str, Dict[str, int]] = {}
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        family, sep, assignments = chunk.partition(":")
        if not sep:
            raise InvalidParamsError(f"PYSPARSECL_PARAMS entry {chunk!r} lacks 'family:'")
        values = result.setdefault(family.strip(), {})
        for item in filter(None, (a.strip() for a in assignments.split(","))):
            name, eq, value = item.partition("=")
            if not eq:
                raise InvalidParamsError(f"PYSPARSECL_PARAMS item {item!r} is not NAME=VALUE")
            try:
                values[name.strip()] = int(value)
            except ValueError:
                raise InvalidParamsError(
                    f"PYSPARSECL_PARAMS item {item!r}: value is not an int") from None
    return result

