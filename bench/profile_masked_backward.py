"""Diagnostic (writes no results file): where a DSG linear layer's time goes, kernel by
kernel (the search, the masked product and its backward), beside torch's dense forward
and backward, in one run.

    python -m bench.profile_masked_backward [--device SPEC] [--keep 0.1]
        [--shapes 128x4096x4096 ...] [--configs "masked_dx:ACROSS=1,WG=128" ...]

Each configuration (tuning overrides; the looked-up tiles when none) is checked against
the float64 reference once, then timed: the median of each kernel's profiling-event time
over rotating masks.  Use ``python -m bench masked`` for the reported numbers.
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import pyopencl.array as cl_array

import pysparsecl as ps
from pysparsecl import runtime, tuning
from pysparsecl.ops.drs import keep_count
from pysparsecl.params import parse_overrides
from pysparsecl.testing.cases import row_masks
from pysparsecl.testing.problems import DSG_GEMM_SHAPES

from .baselines import Torch
from .masked import backward_error
from .profile_conv_masked import _kernel_ms

#: The GEMM shapes of the masked suite, and the DSG training benchmark's compute-bound
#: layers (batch 1024, 512 -> 2048 -> 2048).
SHAPES = tuple(f"{m}x{k}x{n}" for m, k, n in DSG_GEMM_SHAPES) + ("1024x512x2048",
                                                                  "1024x2048x2048")


def _joined(ms) -> str:
    return f"{' + '.join(f'{t:.4f}' for t in ms)} = {sum(ms):.4f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device")
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--configs", nargs="*", default=[""])
    args = p.parse_args(argv)
    queue = runtime.queue_for(args.device)
    torch_b = Torch(want_gpu=runtime.device_kind(queue.device) == "gpu")
    t = torch_b.torch
    rng = np.random.default_rng(0)
    print(f"device: {queue.device.name}; keep {args.keep}; ms per kernel, in launch order")
    for shape in args.shapes:
        m, k, n = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        dy = rng.standard_normal((m, n), dtype=np.float32)
        host_masks = row_masks(rng, m, n, keep_count(1 - args.keep, n), 4)
        masks = [cl_array.to_device(queue, mk) for mk in host_masks]
        x_dev, dy_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, dy)
        weight = ps.MaskedLinearWeight(w, queue=queue)
        pw = ps.SparseRandomProjection(k, seed=1, queue=queue).project_weight(weight)
        dense = "torch: none"
        if t is not None:
            xt, wt, gt = (t.from_numpy(a).to(torch_b.device) for a in (x, w, dy))

            def forward():
                with t.no_grad():
                    t.matmul(xt, wt)

            def backward():
                with t.no_grad():
                    t.matmul(gt, wt.T)
                    t.matmul(gt.T, xt)
            fwd_ms, bwd_ms = torch_b.timer(forward)(), torch_b.timer(backward)()
            dense = f"torch dense forward {fwd_ms:.4f}, backward {bwd_ms:.4f}"
        print(f"{shape}: {dense}", flush=True)
        for config in args.configs:
            overrides = parse_overrides(config) if config else {}
            with contextlib.ExitStack() as stack:
                for family, params in overrides.items():
                    stack.enter_context(tuning.override(family, **params))
                err = backward_error((dy_dev, x_dev, weight, masks[0]),
                                     (dy, x, w, host_masks[0]))
                bwd = _kernel_ms(queue, lambda i, ev: ps.masked_matmul_backward(
                    dy_dev, x_dev, weight, masks[i], dw_rows=True, events=ev), len(masks))
                fwd = _kernel_ms(queue, lambda i, ev: ps.masked_matmul(
                    x_dev, weight, masks[i], events=ev), len(masks))
                search = _kernel_ms(queue, lambda i, ev: ps.drs_mask(
                    x_dev, None, 1 - args.keep, projection=pw, events=ev), 1)
            print(f"  {config or 'looked up'}: backward {_joined(bwd)} (err {err:.1e}); "
                  f"forward {_joined(fwd)}; search {_joined(search)} ms", flush=True)


if __name__ == "__main__":
    main()
