"""Bandwidth of ``pysparsecl.add`` on device-resident float32 arrays, 1 M to 64 M elements.

Three contenders, measured in the same run in interleaved rounds (bench/timing.py):
our add kernel (OpenCL profiling events), NumPy's ``np.add(a, b, out=c)`` on the host
(wall clock), and the device's own buffer-to-buffer copy (``cl.enqueue_copy``, events).
GB/s counts each input read once and the output written once: 12 bytes per element for
add, 8 for the copy.  Targets: >= 90% of NumPy on a CPU device (>= 16 M elements), >= 85%
of the copy on a GPU.

    python -m bench elementwise [--device SPEC] [--quick] [--rounds R] [--configs NAME=V,...]
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

import pysparsecl as ps
from pysparsecl import tuning
from pysparsecl.ops.elementwise import ELEMENTWISE
from pysparsecl.params import parse_overrides

from . import report
from .timing import event_ms, interleaved_medians, wall_ms

MI = 2 ** 20
SIZES = [1 * MI, 2 * MI, 4 * MI, 8 * MI, 16 * MI, 32 * MI, 64 * MI]
QUICK_SIZES = [1 * MI, 16 * MI]

COLUMNS = [("n", "elements", "{:,}"), ("ours_gbs", "ours GB/s", "{:.1f}"),
           ("numpy_gbs", "numpy GB/s", "{:.1f}"), ("copy_gbs", "copy GB/s", "{:.1f}"),
           ("ours_vs_numpy", "ours/numpy", "{:.2f}"), ("ours_vs_copy", "ours/copy", "{:.2f}"),
           ("ours_ms", "ours ms", "{:.3f}")]


def parse_configs(texts) -> list:
    """``["VEC=4,ITEMS=2", ...]`` -> validated tile configurations (for ``--configs``)."""
    configs = []
    for text in texts or ():
        values = parse_overrides(f"elementwise:{text}").get("elementwise", {})
        configs.append(ELEMENTWISE.check(values))
    return configs


def _label(params) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def bench_elementwise(queue, args, rng) -> list:
    """One row per size: our add vs NumPy's vs the device copy, in GB/s (see module doc).

    Uses ``args.quick`` (1 M and 16 M only), ``args.rounds`` (interleaved rounds, default
    5), ``args.check`` (verify our result against NumPy's once per size, default on) and
    ``args.configs`` (extra tile configurations, timed as further contenders; optional).
    """
    quick = getattr(args, "quick", False)
    rounds = getattr(args, "rounds", 5) or 5
    verify = getattr(args, "check", True)
    configs = parse_configs(getattr(args, "configs", None))
    device = queue.device
    rows = []
    for n in QUICK_SIZES if quick else SIZES:
        nbytes = 4 * n
        if nbytes > device.max_mem_alloc_size or 3 * nbytes > device.global_mem_size:
            print(f"elementwise: skipping n={n:,}: the device cannot hold 3 x {nbytes >> 20} MiB")
            continue
        a = rng.standard_normal(n, dtype=np.float32)
        b = rng.standard_normal(n, dtype=np.float32)
        c = np.empty_like(a)
        a_dev, b_dev = cl_array.to_device(queue, a), cl_array.to_device(queue, b)
        c_dev = cl_array.empty_like(a_dev)
        ps.add(a_dev, b_dev, out=c_dev)
        if verify:
            np.add(a, b, out=c)
            if not np.array_equal(c_dev.get(), c):  # float32 add is exactly rounded
                raise AssertionError(f"elementwise add disagrees with NumPy at n={n}")

        def copy(events, src=a_dev, dst=c_dev, size=nbytes):
            events.append(cl.enqueue_copy(queue, dst.data, src.data, byte_count=size))

        def ours(events, params=None, operands=(a_dev, b_dev, c_dev)):
            with tuning.override("elementwise", **(params or {})):
                ps.add(operands[0], operands[1], out=operands[2], events=events)

        timers = {"ours": event_ms(ours, queue), "numpy": wall_ms(lambda: np.add(a, b, out=c)),
                  "copy": event_ms(copy, queue)}
        for params in configs:
            ours([], params)
            if verify and not np.array_equal(c_dev.get(), c):
                raise AssertionError(f"configuration {_label(params)} disagrees with NumPy")
            timers[_label(params)] = event_ms(lambda ev, p=params: ours(ev, p), queue)
        med = interleaved_medians(timers, rounds)
        gb_add, gb_copy = 3 * nbytes / 1e9, 2 * nbytes / 1e9
        ours, numpy_, copy_ = (gb_add / med["ours"] * 1e3, gb_add / med["numpy"] * 1e3,
                               gb_copy / med["copy"] * 1e3)
        rows.append(dict(op="elementwise_add", dtype="float32", n=n, ours_ms=med["ours"],
                         numpy_ms=med["numpy"], copy_ms=med["copy"], ours_gbs=ours,
                         numpy_gbs=numpy_, copy_gbs=copy_, ours_vs_numpy=ours / numpy_,
                         ours_vs_copy=ours / copy_))
        if configs:
            rows[-1]["configs"] = {label: gb_add / med[label] * 1e3 for label in timers
                                   if label not in ("ours", "numpy", "copy")}
        print(report.format_row(rows[-1], COLUMNS), flush=True)
        for label, gbs in rows[-1].get("configs", {}).items():
            print(f"    {label:40s} {gbs:7.1f} GB/s  x copy {gbs / copy_:.2f}  "
                  f"x numpy {gbs / numpy_:.2f}", flush=True)
    return rows


def bench_broadcast(queue, args, rng) -> list:
    """The strided kernel on a BatchNorm-style broadcast, ``x + shift`` with x (N, C, H, W)
    and shift (1, C, 1, 1), 16 M elements (4 M with ``--quick``): GB/s as for add."""
    quick = getattr(args, "quick", False)
    rounds = getattr(args, "rounds", 5) or 5
    rows = []
    for shape in [(8, 128, 64, 64)] if quick else [(32, 128, 64, 64), (128, 512, 16, 16)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        shift = rng.standard_normal((1, shape[1], 1, 1), dtype=np.float32)
        y = np.empty_like(x)
        x_dev, shift_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, shift)
        y_dev = cl_array.empty_like(x_dev)
        ps.add(x_dev, shift_dev, out=y_dev)
        np.add(x, shift, out=y)
        if getattr(args, "check", True) and not np.array_equal(y_dev.get(), y):
            raise AssertionError(f"broadcast add disagrees with NumPy for {shape}")
        med = interleaved_medians({
            "ours": event_ms(lambda ev: ps.add(x_dev, shift_dev, out=y_dev, events=ev), queue),
            "numpy": wall_ms(lambda: np.add(x, shift, out=y))}, rounds)
        gb = (2 * x.nbytes + shift.nbytes) / 1e9
        rows.append(dict(op="elementwise_add_broadcast", shape=list(shape), n=x.size,
                         ours_ms=med["ours"], numpy_ms=med["numpy"],
                         ours_gbs=gb / med["ours"] * 1e3, numpy_gbs=gb / med["numpy"] * 1e3))
        print(f"broadcast {shape} + (1, {shape[1]}, 1, 1): ours {rows[-1]['ours_gbs']:.1f} "
              f"GB/s, numpy {rows[-1]['numpy_gbs']:.1f} GB/s", flush=True)
    return rows


def markdown_table(rows) -> str:
    return report.markdown_table(rows, COLUMNS, numeric=True)
