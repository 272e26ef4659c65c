"""Diagnostic (writes no results file): where conv2d_masked's time goes, kernel by kernel,
on ResNet-50's 3x3 layers, beside torch's dense convolution, in one run.

    python -m bench.profile_conv_masked [--device SPEC] [--batch 8 32] [--keep 0.1]
        [--configs "masked_conv_tiled:TILE=64,TILE_M=64" ...]

Each configuration (tuning overrides; the looked-up tiles when none) is checked against the
float64 reference once, then timed: the median of each of the op's kernels, by profiling
events, over rotating masks.  Then the search that makes the mask (drs_mask_conv2d, the
filters' projection reused), kernel by kernel.  Use ``python -m bench masked`` for the
reported numbers.
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import pyopencl.array as cl_array

import pysparsecl as ps
from pysparsecl import runtime, tuning
from pysparsecl.params import parse_overrides
from pysparsecl.testing.cases import RESNET50_LAYERS
from pysparsecl.testing.reference import conv2d_masked_reference, relative_error

from .baselines import Torch


def _kernel_ms(queue, call, n_masks, reps=7):
    """Median ms of each event ``call(i, events)`` appends, over ``reps`` timed calls."""
    call(0, [])
    queue.finish()
    runs = []
    for i in range(reps):
        events = []
        call(i % n_masks, events)
        queue.finish()
        runs.append([1e-6 * (e.profile.end - e.profile.start) for e in events])
    return [float(np.median(col)) for col in zip(*runs)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--configs", nargs="*", default=[""])
    args = p.parse_args(argv)
    queue = runtime.queue_for(args.device)
    torch_b = Torch(want_gpu=runtime.device_kind(queue.device) == "gpu")
    rng = np.random.default_rng(0)
    print(f"device: {queue.device.name}; keep {args.keep}; ms per kernel, in launch order")
    for batch in args.batch:
        for layer in RESNET50_LAYERS[:4]:
            case = layer.with_(N=batch, sparsity=0.0)
            x, w, _, _ = case.make_inputs(rng)
            kw = dict(stride=case.stride, padding=case.padding)
            out_shape = (batch, case.K) + case.output_hw
            masks = [rng.random(out_shape) < args.keep for _ in range(4)]
            dev_masks = [cl_array.to_device(queue, m) for m in masks]
            x_dev, w_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, w)
            dense = (torch_b.timer(torch_b.conv2d_fn(case, x, w))()
                     if torch_b.torch is not None else float("nan"))
            for config in args.configs:
                overrides = parse_overrides(config) if config else {}
                with contextlib.ExitStack() as stack:
                    for family, params in overrides.items():
                        stack.enter_context(tuning.override(family, **params))
                    y = ps.conv2d_masked(x_dev, w_dev, dev_masks[0], **kw).get()
                    err = relative_error(y, conv2d_masked_reference(
                        x, w, masks[0], case.stride, case.padding, (1, 1)))
                    ms = _kernel_ms(queue, lambda i, ev: ps.conv2d_masked(
                        x_dev, w_dev, dev_masks[i], events=ev, **kw), len(dev_masks))
                    d = case.C * 9
                    proj = ps.SparseRandomProjection(d, seed=2, queue=queue)
                    pw = proj.project_weight(ps.MaskedLinearWeight(
                        w.reshape(case.K, d), transposed=True, queue=queue))
                    search = _kernel_ms(queue, lambda i, ev: ps.drs_mask_conv2d(
                        x_dev, None, 1 - args.keep, projection=pw, kernel_size=3, events=ev,
                        **kw), 1)
                print(f"{case.label()} N{batch} {config or 'looked up'}: "
                      f"{' + '.join(f'{t:.4f}' for t in ms)} = {sum(ms):.4f} ms; "
                      f"torch dense {dense:.4f} ms ({dense / sum(ms):.2f}x); err {err:.1e}; "
                      f"search (k {proj.k}) {' + '.join(f'{t:.4f}' for t in search)} = "
                      f"{sum(search):.4f} ms ({sum(search) / dense:.0%} of dense)", flush=True)


if __name__ == "__main__":
    main()
