"""Tile-parameter lookup: per-call overrides, then the tuning database, then spec defaults.

Lookup order for a kernel family on a device:

1. an active :func:`override` block, then the ``PYSPARSECL_PARAMS`` environment variable
   (``"conv2d_csr:VEC=8,PIX_VECS=4;other_family:..."``), for experiments;
2. the shipped database ``pysparsecl/tuning/database/shipped.json``, by normalised device
   slug, then ``<vendor>/<device type>``, then ``<device type>``;
3. the family's spec defaults.

An entry that names unknown parameters or breaks a constraint is ignored with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional

import pyopencl as cl

from ..params import InvalidParamsError, ParamSpec, parse_overrides
from ..runtime import device_kind

__all__ = ["lookup", "override", "device_slug", "vendor_slug"]

_DATABASE = Path(__file__).resolve().parent / "database" / "shipped.json"
_local = threading.local()
_memo: Dict[tuple, Dict[str, int]] = {}
_memo_lock = threading.Lock()
_shipped: Optional[dict] = None


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


def device_slug(device: cl.Device) -> str:
    """A file-name-safe identity: platform and device name (e.g. 'pocl-pthread-...-amd-epyc')."""
    platform = device.platform.name.lower()
    prefix = "pocl" if "portable computing language" in platform else _slug(platform)
    return f"{prefix}-{_slug(device.name)}"


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
    """Force tile parameters of ``family`` inside a ``with`` block (this thread only)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((family, params))
    try:
        yield
    finally:
        stack.pop()


def _active_overrides(family: str) -> Dict[str, int]:
    merged: Dict[str, int] = {}
    env = os.environ.get("PYSPARSECL_PARAMS")
    if env:
        merged.update(parse_overrides(env).get(family, {}))
    for fam, params in getattr(_local, "stack", None) or ():
        if fam == family:
            merged.update(params)
    return merged


def _database_params(spec: ParamSpec, device: cl.Device) -> Dict[str, int]:
    entries = _load_shipped().get(spec.family, {})
    kind = device_kind(device)
    for key in (device_slug(device), f"{vendor_slug(device)}/{kind}", kind):
        entry = entries.get(key)
        if entry is None:
            continue
        try:
            return spec.check(entry.get("params", {}), device.max_work_group_size)
        except (InvalidParamsError, AttributeError) as exc:
            warnings.warn(f"pysparsecl: ignoring tuning entry {spec.family}/{key}: {exc}",
                          RuntimeWarning, stacklevel=3)
    return spec.defaults()


def lookup(spec: ParamSpec, device: cl.Device) -> Dict[str, int]:
    """The tile configuration to use for ``spec`` on ``device`` (see module docstring)."""
    key = (spec.family, device.int_ptr)
    with _memo_lock:
        params = _memo.get(key)
    if params is None:
        params = _database_params(spec, device)
        with _memo_lock:
            _memo[key] = params
    forced = _active_overrides(spec.family)
    if forced:
        return spec.check({**params, **forced}, device.max_work_group_size)
    return dict(params)
