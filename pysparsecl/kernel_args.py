"""Typed kernel arguments: each kernel's parameters declared once, in Python.

A hand-written C parameter list and a positional argument tuple at the launch site must
agree by position, and nothing checks that they do: a swapped pair of ints runs, wrongly.
A :class:`Signature` is the one list both sides come from:

- the template writes ``void pscl_x(${ARGS["pscl_x"]})``: :class:`KernelArgs` renders
  the C parameters, and :func:`pysparsecl.runtime.render` checks every rendered kernel's
  parameter list against its declaration before anything builds;
- :class:`pysparsecl.runtime.LockedKernel` takes its scalar dtypes from the declaration
  (not from a first call), and refuses a value of another type, naming the argument;
- launches pass arguments by name.  :meth:`runtime.BoundKernel.bind` maps the names to
  positions once, when a plan is built, and gives a ``launch`` function whose
  keyword-only parameters are the free arguments, so a missing, extra or misspelt one is
  refused by Python itself, naming the kernel, and a call costs no dictionary work;
  :meth:`runtime.LockedKernel.launch` takes a dict, for launches with no plan.

Adopting it in a family (masked, drs, ...):

1. declare each kernel: ``Signature("pscl_x", (Pointer("x", "float"), Scalar("n",
   np.int32), ...))``, in a function of the template parameters where the list depends
   on them;
2. pass ``ARGS=KernelArgs(...)`` to ``runtime.kernels``/``runtime.render``, or
   ``ARGS=function`` (called with the other parameters, only when the program is
   rendered: free for launches that pick a variant per call);
3. in the template, replace the hand-written list by ``${ARGS["pscl_x"]}``;
4. launch with ``BoundKernel.bind(...).launch(..., x=..., n=...)`` or
   ``LockedKernel.launch(..., {"x": ..., "n": ...})``.

Families that do not pass ``ARGS`` keep working as before.
"""

from __future__ import annotations

import keyword
import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyopencl as cl

__all__ = ["KernelArgError", "Pointer", "Scalar", "Signature", "KernelArgs", "ctype_of"]


class KernelArgError(TypeError):
    """A kernel's arguments disagree with its declaration (names, count or types), or a
    template's parameter list disagrees with the declaration."""


#: NumPy dtype -> OpenCL C scalar type.
_C_SCALARS = {
    np.dtype(np.int8): "char", np.dtype(np.uint8): "uchar",
    np.dtype(np.int16): "short", np.dtype(np.uint16): "ushort",
    np.dtype(np.int32): "int", np.dtype(np.uint32): "uint",
    np.dtype(np.int64): "long", np.dtype(np.uint64): "ulong",
    np.dtype(np.float16): "half", np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
_ELEMENT_TYPES = frozenset(
    [t for t in _C_SCALARS.values()]
    + [f"{t}{n}" for t in _C_SCALARS.values() for n in (2, 3, 4, 8, 16)])
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def ctype_of(dtype) -> str:
    """The OpenCL C scalar type of a NumPy dtype (``int32`` -> ``int``)."""
    try:
        return _C_SCALARS[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise KernelArgError(f"no OpenCL C scalar type for dtype {dtype!r}; supported: "
                             f"{', '.join(d.name for d in _C_SCALARS)}") from None


def _check_name(name) -> None:
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise KernelArgError(f"argument name must be a C identifier, got {name!r}")


@dataclass(frozen=True)
class Pointer:
    """A ``__global`` buffer argument: ``__global [volatile] [const] ctype *[restrict]
    name``.
    ``ctype`` is an OpenCL C element type ("float", "int2", "uchar") or a NumPy dtype.
    The value passed is a buffer (``array.base_data``); OpenCL buffers are untyped, so
    the element type is the template's business, and only the kind is checked."""
    name: str
    ctype: str
    const: bool = True
    restrict: bool = False
    volatile: bool = False

    def __post_init__(self):
        _check_name(self.name)
        ctype = self.ctype if isinstance(self.ctype, str) else ctype_of(self.ctype)
        if ctype not in _ELEMENT_TYPES:
            raise KernelArgError(f"argument {self.name!r}: unknown OpenCL element type "
                                 f"{self.ctype!r}")
        object.__setattr__(self, "ctype", ctype)
        object.__setattr__(self, "const", bool(self.const))
        object.__setattr__(self, "restrict", bool(self.restrict))
        object.__setattr__(self, "volatile", bool(self.volatile))

    def c(self) -> str:
        return (f"{'volatile ' if self.volatile else ''}__global "
                f"{'const ' if self.const else ''}{self.ctype} "
                f"*{'restrict ' if self.restrict else ''}{self.name}")

    def describe(self) -> str:
        return "a pyopencl buffer (array.base_data)"


@dataclass(frozen=True)
class Scalar:
    """A by-value argument: ``const <C type of dtype> name``.  The value passed must be a
    NumPy scalar of exactly ``dtype``: pyopencl would otherwise convert it silently."""
    name: str
    dtype: np.dtype

    def __post_init__(self):
        _check_name(self.name)
        dtype = np.dtype(self.dtype)
        ctype_of(dtype)   # refuses a dtype with no C type
        object.__setattr__(self, "dtype", dtype)

    @property
    def type(self) -> type:
        return self.dtype.type

    def c(self) -> str:
        return f"const {ctype_of(self.dtype)} {self.name}"

    def describe(self) -> str:
        return f"a numpy.{self.dtype.name} scalar (C {ctype_of(self.dtype)})"


Arg = Union[Pointer, Scalar]


def _tokens(c_text: str) -> Tuple[str, ...]:
    """A parameter's C text as tokens, so that whitespace never matters."""
    return tuple(re.findall(r"\w+|\S", c_text))


@dataclass(frozen=True)
class Signature:
    """One kernel's arguments, in order.  Immutable and hashable (it is part of the
    program cache's key).  The tables a launch needs (positions, dtypes) are computed
    here, once."""
    kernel: str
    args: Tuple[Arg, ...]
    _index: Dict[str, int] = field(init=False, repr=False, compare=False, hash=False)
    names: Tuple[str, ...] = field(init=False, repr=False, compare=False, hash=False)
    _get: Callable = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        _check_name(self.kernel)
        args = tuple(self.args)
        for a in args:
            if not isinstance(a, (Pointer, Scalar)):
                raise KernelArgError(f"kernel {self.kernel}: arguments must be Pointer or "
                                     f"Scalar, got {type(a).__name__}")
        index: Dict[str, int] = {}
        for i, a in enumerate(args):
            if a.name in index:
                raise KernelArgError(f"kernel {self.kernel}: argument {a.name!r} declared "
                                     "twice")
            index[a.name] = i
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "names", tuple(index))   # the argument names, in order
        # values -> the argument tuple, in one C call (itemgetter of one name gives no tuple)
        names = tuple(index)
        get = (operator.itemgetter(*names) if len(names) > 1 else
               (lambda values: (values[names[0]],)) if names else (lambda values: ()))
        object.__setattr__(self, "_get", get)

    def __len__(self) -> int:
        return len(self.args)

    @property
    def scalar_dtypes(self) -> Tuple[Optional[np.dtype], ...]:
        """pyopencl's ``set_scalar_arg_dtypes`` list: a dtype per scalar, None per buffer."""
        return tuple(a.dtype if isinstance(a, Scalar) else None for a in self.args)

    def c_params(self, indent: str = "    ") -> str:
        """The C parameter list (what goes between the kernel's parentheses)."""
        return "".join(f"\n{indent}{a.c()}{',' if i < len(self.args) - 1 else ''}"
                       for i, a in enumerate(self.args))

    def position(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KernelArgError(f"kernel {self.kernel} has no argument {name!r}; its "
                                 f"arguments: {', '.join(self.names) or '(none)'}") from None

    # -- values ------------------------------------------------------------------------

    def _bad_value(self, i: int, value) -> KernelArgError:
        a = self.args[i]
        return KernelArgError(f"kernel {self.kernel}: argument {a.name!r} must be "
                              f"{a.describe()}, got {type(value).__name__}")

    def check_value(self, i: int, value) -> None:
        """Raise unless ``value`` may be argument ``i``."""
        a = self.args[i]
        if isinstance(a, Scalar):
            ok = type(value) is a.type
        else:
            ok = isinstance(value, cl.MemoryObjectHolder)
        if not ok:
            raise self._bad_value(i, value)

    def check_values(self, values: Sequence, skip: Iterable[int] = ()) -> None:
        """Raise unless ``values`` (every argument, in order) fit the declaration; the
        positions in ``skip`` are not looked at."""
        if len(values) != len(self.args):
            raise KernelArgError(f"kernel {self.kernel} takes {len(self.args)} arguments "
                                 f"({', '.join(self.names)}), got {len(values)}")
        skip = set(skip)
        for i, value in enumerate(values):
            if i not in skip:
                self.check_value(i, value)

    def pack(self, values: Mapping[str, object]) -> tuple:
        """The positional argument tuple for ``values`` (name -> value, every argument
        once).  Types are checked by the kernel that receives the tuple."""
        try:
            packed = self._get(values)
        except KeyError as exc:
            raise KernelArgError(f"kernel {self.kernel}: argument {exc.args[0]!r} is "
                                 "missing") from None
        if len(values) != len(packed):
            extra = sorted(set(values) - set(self.names))
            raise KernelArgError(f"kernel {self.kernel} has no argument "
                                 f"{', '.join(map(repr, extra))}; its arguments: "
                                 f"{', '.join(self.names) or '(none)'}")
        return packed

    def launcher(self, free: Sequence[str], target: Callable) -> Callable:
        """A function ``(queue, global_size, local_size, *, <free names>, wait_for=None)``
        that calls ``target(queue, global_size, local_size, (<free values in the order of
        free>), wait_for)``.  Generated code, so that names are bound by Python's own call
        (no dict), and named after the kernel, so that Python's error for a missing,
        extra or misspelt argument names both."""
        if len(set(free)) != len(free):
            raise KernelArgError(f"kernel {self.kernel}: free arguments repeat a name: "
                                 f"{tuple(free)}")
        if keyword.iskeyword(self.kernel):
            raise KernelArgError(f"kernel {self.kernel}: a Python keyword cannot name a "
                                 "launcher")
        for name in free:
            self.position(name)
            if keyword.iskeyword(name) or name == "wait_for" or name.startswith("_"):
                raise KernelArgError(f"kernel {self.kernel}: argument {name!r} cannot be a "
                                     "free (keyword) argument of a launch")
        params = "".join(f"{name}, " for name in free)
        source = (f"def {self.kernel}(_queue, _global_size, _local_size, /, *, {params}"
                  "wait_for=None):\n"
                  f"    return _target(_queue, _global_size, _local_size, ({params}), "
                  "wait_for)\n")
        namespace = {"_target": target}
        exec(compile(source, f"<launcher of {self.kernel}>", "exec"), namespace)
        return namespace[self.kernel]

    # -- templates -----------------------------------------------------------------------

    def check_params(self, c_text: str) -> None:
        """Raise unless ``c_text`` (a kernel's parameter list as the template rendered it)
        declares exactly these arguments, in order, with these types."""
        found = [p for p in _split_params(c_text) if p]
        want = [_tokens(a.c()) for a in self.args]
        for i in range(max(len(found), len(want))):
            got = " ".join(found[i]) if i < len(found) else None
            exp = " ".join(want[i]) if i < len(want) else None
            if got != exp:
                raise KernelArgError(
                    f"kernel {self.kernel}: the template's parameter {i} is "
                    f"{got or 'missing'!r} but the declaration says {exp or 'nothing'!r}; "
                    f"write the parameter list as ${{ARGS[\"{self.kernel}\"]}}")


def _split_params(c_text: str):
    """The top-level comma-separated parameters of ``c_text``, as token tuples."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(c_text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(c_text[start:i])
            start = i + 1
    parts.append(c_text[start:])
    return [_tokens(p) for p in parts]


_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_KERNEL_NAME = re.compile(r"\bvoid\s+(\w+)\s*\(")


def kernel_params(source: str) -> Dict[str, str]:
    """Each ``__kernel`` function of a C ``source``: name -> parameter list text."""
    text = _COMMENTS.sub(" ", source)
    found: Dict[str, str] = {}
    for m in _KERNEL_NAME.finditer(text):
        # The declaration's start: after the previous statement or block.
        head = text[max(text.rfind(";", 0, m.start()), text.rfind("}", 0, m.start())) + 1:
                    m.start()]
        if not re.search(r"\b(__kernel|kernel)\b", head):
            continue
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        if m.group(1) in found:
            raise KernelArgError(f"kernel {m.group(1)} is defined twice in the source")
        found[m.group(1)] = text[m.end():i - 1]
    return found


class KernelArgs:
    """The signatures of the kernels one rendered program defines.  Passed to a template
    as ``ARGS``: ``${ARGS["pscl_x"]}`` is kernel pscl_x's C parameter list."""

    def __init__(self, *signatures: Signature):
        by_name: Dict[str, Signature] = {}
        for s in signatures:
            if not isinstance(s, Signature):
                raise KernelArgError(f"KernelArgs takes Signature objects, got "
                                     f"{type(s).__name__}")
            if s.kernel in by_name:
                raise KernelArgError(f"kernel {s.kernel} is declared twice")
            by_name[s.kernel] = s
        self._by_name = by_name
        self._key = tuple(sorted(by_name.items()))
        self._hash = hash(self._key)

    def __getitem__(self, kernel: str) -> str:
        return self.signature(kernel).c_params()

    def __contains__(self, kernel: str) -> bool:
        return kernel in self._by_name

    def __iter__(self):
        return iter(self._by_name.values())

    def signature(self, kernel: str) -> Signature:
        try:
            return self._by_name[kernel]
        except KeyError:
            raise KernelArgError(f"kernel {kernel} is not declared (declared: "
                                 f"{', '.join(self._by_name) or 'none'})") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, KernelArgs) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"KernelArgs({', '.join(self._by_name)})"

    def check_source(self, source: str) -> None:
        """Raise unless ``source`` defines exactly the declared kernels, each with its
        declared parameter list (the template must render them from ``ARGS``)."""
        found = kernel_params(source)
        undeclared = sorted(set(found) - set(self._by_name))
        if undeclared:
            raise KernelArgError(f"the template defines kernel(s) {', '.join(undeclared)} "
                                 "that ARGS does not declare")
        for name, sig in self._by_name.items():
            if name not in found:
                raise KernelArgError(f"kernel {name} is declared but the rendered template "
                                     "does not define it")
            sig.check_params(found[name])


def resolve(args, params: Mapping[str, object]) -> Optional[KernelArgs]:
    """A template's ``ARGS`` parameter as a KernelArgs: given, or computed by a function
    of the other parameters; None where there is none."""
    if args is None or isinstance(args, KernelArgs):
        return args
    if callable(args):
        found = args({k: v for k, v in params.items() if k != "ARGS"})
        if not isinstance(found, KernelArgs):
            raise KernelArgError(f"ARGS function {getattr(args, '__name__', args)!r} returned "
                                 f"{type(found).__name__}, not KernelArgs")
        return found
    raise KernelArgError(f"ARGS must be a KernelArgs or a function returning one, got "
                         f"{type(args).__name__}")
