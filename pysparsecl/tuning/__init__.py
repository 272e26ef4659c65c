"""Tile-parameter lookup: per-call overrides, then the tuning databases, then spec defaults.

Lookup order for a kernel family on a device:

1. an active :func:`override` block, then the ``PYSPARSECL_PARAMS`` environment variable
   (``"conv2d_csr:VEC=8,PIX_VECS=4;other_family:..."``), for experiments;
2. the user's database, written by ``python -m pysparsecl tune`` for this device and driver
   version (``user_database_path``; ``PYSPARSECL_CACHE_DIR`` moves it);
3. the shipped database ``pysparsecl/tuning/database/shipped.json``, by normalised device
   slug, then ``<vendor>/<device type>``, then ``<device type>``;
4. the family's spec defaults.

Within a database entry, a problem's *shape class* (a short string the op computes from
its shapes, e.g. ``k3x3-s1x1-c64-px2048-b32`` for a convolution) picks a per-class entry
under ``"shapes"`` before the entry's own parameters: the best tile configuration for a
56x56 layer is rarely the best for a 7x7 one.

An override may name only some parameters: the others come from steps 2-4.  Where the
override and that configuration together break a constraint (an override of the tiled
GEMM's tile against an entry whose dense-tile threshold needs another one), the others come
from the spec defaults instead, with a warning; an override that is invalid even then
raises :class:`~pysparsecl.params.InvalidParamsError`.

An unreadable database, or an entry that names unknown parameters or breaks a constraint,
is ignored with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import platformdirs
import pyopencl as cl

from ..params import ROUTINES, InvalidParamsError, ParamSpec, device_limits, parse_overrides
from ..runtime import device_kind

__all__ = ["lookup", "memoised", "override", "device_slug", "names_slug", "vendor_slug",
           "user_database_path", "read_user_database", "write_user_entry", "pow2_floor"]

_DATABASE = Path(__file__).resolve().parent / "database" / "shipped.json"


class _Overrides(threading.local):
    """This thread's ``override`` blocks.  The class holds the default, so that an op's
    per-call check of it costs an attribute lookup, not a caught AttributeError."""
    stack: "Optional[List[tuple]]" = None


_local = _Overrides()
_memo: Dict[tuple, Dict[str, int]] = {}
_memo_lock = threading.RLock()
_shipped: Optional[dict] = None


def pow2_floor(n: int) -> int:
    """The largest power of two <= n (1 for n < 1): the bucket of a size in a shape class."""
    return 1 << max(0, int(n).bit_length() - 1)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def vendor_slug(device: cl.Device) -> str:
    vendor = device.vendor.lower()
    for known in ("nvidia", "intel", "amd", "advanced micro devices", "apple", "arm", "qualcomm"):
        if known in vendor:
            return "amd" if known.startswith("advanced") else known
    if "portable computing language" in device.platform.name.lower():
        return "pocl"
    return _slug(device.vendor) or "unknown"


def names_slug(platform_name: str, device_name: str) -> str:
    """A file-name-safe identity from a platform and a device name, as a tuned database
    records them (e.g. 'pocl-pthread-...-amd-epyc')."""
    platform = platform_name.lower()
    prefix = "pocl" if "portable computing language" in platform else _slug(platform)
    return f"{prefix}-{_slug(device_name)}"


def device_slug(device: cl.Device) -> str:
    """A file-name-safe identity: platform and device name (e.g. 'pocl-pthread-...-amd-epyc')."""
    return names_slug(device.platform.name, device.name)


def _load_shipped() -> dict:
    global _shipped
    if _shipped is None:
        try:
            _shipped = json.loads(_DATABASE.read_text())
        except (OSError, ValueError) as exc:
            warnings.warn(f"pysparsecl: ignoring unreadable tuning database {_DATABASE}: {exc}",
                          RuntimeWarning, stacklevel=3)
            _shipped = {}
    return _shipped


@contextlib.contextmanager
def override(family: str, **params: int):
    """Force tile parameters of ``family`` inside a ``with`` block (this thread only).

    Where ``family`` is one of an op's kernel variants (:class:`~pysparsecl.params.Routine`),
    the override also makes the op choose that variant: ``override("masked_gemm_tiled")``
    runs the tiled GEMM with its looked-up parameters on any device."""
    stack = _local.stack
    if stack is None:
        stack = _local.stack = []
    stack.append((family, params))
    try:
        yield
    finally:
        stack.pop()


# ``name in os.environ`` goes through Mapping.__contains__ and a caught KeyError, ~1 us; the
# mapping's own dict (kept in step with os.environ's writes) answers in a tenth of that.
_ENV_NAME = "PYSPARSECL_PARAMS"
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV_NAME) if hasattr(os.environ, "encodekey") else None


def _env_overrides() -> bool:
    """Whether PYSPARSECL_PARAMS is set."""
    if _ENV_DATA is not None and _ENV_KEY is not None:
        return _ENV_KEY in _ENV_DATA
    return _ENV_NAME in os.environ


def _active_overrides(family: str) -> Dict[str, int]:
    """The forced parameters of ``family``, later overrides winning.  For a routine's
    settings, an override of one of its variants counts as choosing that variant."""
    routine = ROUTINES.get(family)
    merged: Dict[str, int] = {}
    env = os.environ.get("PYSPARSECL_PARAMS")
    forced = list(parse_overrides(env).items()) if env else []
    for fam, params in forced + list(_local.stack or ()):
        if fam == family:
            merged.update(params)
        elif routine is not None and fam in routine.families:
            merged.update(routine.selecting(fam))
    return merged


def user_database_path(device: cl.Device) -> Path:
    """This device's tuning database: one JSON file per device and driver version."""
    base = os.environ.get("PYSPARSECL_CACHE_DIR") or platformdirs.user_cache_dir("pysparsecl")
    return Path(base) / "tuning" / f"{device_slug(device)}--{_slug(device.driver_version)}.json"


def read_user_database(device: cl.Device) -> dict:
    """The user database's content ({} if absent; {} with a warning if unreadable)."""
    path = user_database_path(device)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("families", {}), dict):
            raise ValueError("not a pysparsecl tuning database")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"pysparsecl: ignoring unreadable tuning database {path}: {exc}",
                      RuntimeWarning, stacklevel=3)
        return {}


def write_user_entry(device: cl.Device, family: str, entry: dict) -> Path:
    """Merge ``entry`` for ``family`` into the user database, atomically.

    The file is re-read just before the write and replaced with ``os.replace``, so a
    reader never sees a partial file and concurrent tuners cannot corrupt it (the last
    writer of a family wins)."""
    path = user_database_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _memo_lock:
        data = read_user_database(device) or {
            "platform": device.platform.name.strip(), "device": device.name.strip(),
            "driver": device.driver_version.strip(), "families": {}}
        data.setdefault("families", {})[family] = entry
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _memo.clear()
    return path


def _entries(spec: ParamSpec, device: cl.Device, shape_class: Optional[str]):
    """(where, entry) pairs for ``spec`` on ``device``, most specific first."""
    def with_class(where, entry):
        if not isinstance(entry, dict):
            return
        shapes = entry.get("shapes")
        per_class = shapes.get(shape_class) if isinstance(shapes, dict) else None
        if shape_class is not None and isinstance(per_class, dict) and "params" in per_class:
            yield f"{where} [{shape_class}]", per_class
        if "params" in entry:
            yield where, entry

    user = read_user_database(device).get("families", {}).get(spec.family)
    if user is not None:
        yield from with_class(f"{spec.family} in {user_database_path(device)}", user)
    shipped = _load_shipped().get(spec.family, {})
    kind = device_kind(device)
    for key in (device_slug(device), f"{vendor_slug(device)}/{kind}", kind):
        if key in shipped:
            yield from with_class(f"{spec.family}/{key} (shipped)", shipped[key])


def _database_params(spec: ParamSpec, device: cl.Device,
                     shape_class: Optional[str]) -> Dict[str, int]:
    for where, entry in _entries(spec, device, shape_class):
        try:
            return spec.check(entry.get("params", {}), **device_limits(device))
        except (InvalidParamsError, AttributeError) as exc:
            warnings.warn(f"pysparsecl: ignoring tuning entry {where}: {exc}",
                          RuntimeWarning, stacklevel=4)
    return spec.defaults()


#: memoised() values: (name, device, shape class) -> (value, the memo entries it read).
_derived: Dict[tuple, tuple] = {}


def memoised(name: str, device: cl.Device, shape_class: Optional[str], build):
    """A value an op derives from several lookups, e.g. its routine's choice merged with
    the chosen families' parameters: ``build(look)``, where ``look(spec)`` looks ``spec``
    up for this device and shape class (read-only result).  Kept per (name, device,
    shape class) and served again while no override is active and every lookup it made
    would answer with the same memoised entry, so that an op's per-call routing costs a
    few dict reads; a new tuning result, an override or a cleared memo takes effect at
    once."""
    key = (name, device.int_ptr, shape_class)
    steady = not _local.stack and not _env_overrides()
    found = _derived.get(key) if steady else None
    if found is not None:
        value, used = found
        if all(_memo.get(k) is entry for k, entry in used):
            return value
    used = []

    def look(spec: ParamSpec) -> Dict[str, int]:
        params = lookup(spec, device, shape_class, copy=False)
        used.append(((spec.family, device.int_ptr, shape_class), params))
        return params

    value = build(look)
    if steady:
        _derived[key] = (value, tuple(used))
    return value


def lookup(spec: ParamSpec, device: cl.Device, shape_class: Optional[str] = None,
           copy: bool = True) -> Dict[str, int]:
    """The tile configuration to use for ``spec`` on ``device`` (see module docstring);
    ``shape_class``, when the op has one, selects per-shape entries of the databases.
    ``copy=False`` may return the memoised dict itself, which the caller must not modify
    (the ops' per-call routing, which only reads it)."""
    key = (spec.family, device.int_ptr, shape_class)
    params = _memo.get(key)     # a dict read is atomic; writers hold the lock
    if params is None:
        params = _database_params(spec, device, shape_class)
        with _memo_lock:
            _memo[key] = params
    # Every op call looks up its routine and its families: no override is the fast path.
    if not _local.stack and not _env_overrides():
        return dict(params) if copy else params
    forced = _active_overrides(spec.family)
    if forced:
        limits = device_limits(device)
        try:
            return spec.check({**params, **forced}, **limits)
        except InvalidParamsError as exc:
            completed = spec.check(forced, **limits)   # raises if the override is invalid
            warnings.warn(f"pysparsecl: the override {forced} with the database's "
                          f"{spec.family} configuration is invalid ({exc}); its other "
                          "parameters come from the spec defaults instead",
                          RuntimeWarning, stacklevel=3)
            return completed
    return dict(params)
