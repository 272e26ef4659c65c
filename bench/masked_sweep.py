#!/usr/bin/env python3
"""Time masked_vmm / masked_gemm tile configurations against dense torch and sampled_addmm.

    python3 bench/masked_sweep.py [--device SPEC] [--space small|wide|cpu] [--n 40] [--quick]

For every shape (the DSG shapes of bench/masked.py) and keep ratio (0.01 .. 0.5), each
configuration -- the spec default (the CPU-shaped kernels), the device's current tuned
entry, and a grid of the GPU-shaped variants (SPLIT > 1, TILE > 0) -- is first checked
against the default configuration's output (relative error < 1e-4) and then timed by OpenCL
profiling events: the median of --reps calls after a warm-up, each call with the next of a
few rotating masks (exactly n_keep per row, as drs_mask returns them).  A configuration
that fails to build, run or agree is recorded with its error and the sweep goes on.

In the same run, when torch is installed: the dense product (``torch.matmul``, TF32 off) and
``torch.sparse.sampled_addmm`` with the mask as a CSR matrix, on CUDA when our device is a
GPU and CUDA is there (else on the CPU), timed as bench/baselines.py's ``Torch.timer``
does (device time on CUDA, wall time on the CPU), median of --reps.

Prints a table per shape and writes JSON ($OUT/masked_sweep.json when OUT is set, else
bench/results/masked-sweep-<device>.json, or --json) with every timing, the best
configuration per (shape, keep ratio) and per shape over all keep ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import pyopencl.array as cl_array  # noqa: E402
from baselines import Torch  # noqa: E402

import pysparsecl as ps  # noqa: E402
from pysparsecl import runtime, tuning  # noqa: E402
from pysparsecl.ops.drs import keep_count  # noqa: E402
from pysparsecl.ops.masked import MASKED_GEMM, MASKED_VMM  # noqa: E402
from pysparsecl.testing.cases import row_masks  # noqa: E402
from pysparsecl.testing.reference import relative_error  # noqa: E402

VMM_SHAPES = ((1, 4096, 4096), (1, 1024, 1024))
GEMM_SHAPES = ((128, 4096, 4096), (4096, 1024, 1024), (1568, 2304, 256))
QUICK_VMM_SHAPES = ((1, 300, 257),)
QUICK_GEMM_SHAPES = ((40, 200, 130), (130, 72, 64))
KEEPS = (0.01, 0.05, 0.1, 0.3, 0.5)
N_MASKS = 4      # distinct masks rotated over the timed calls
TOL = 1e-4

# The curated GPU grids of --space small (14 VMM + 34 GEMM configurations), around the
# best of wider samples on an H100.
VMM_GRID = [dict(SPLIT=sp, TEAMS=t, GROUP=g, VEC=v, XCHUNK=c)
            for sp, t, g, v, c in (
                (128, 1, 1, 4, 2048), (128, 1, 2, 4, 2048), (128, 2, 1, 4, 2048),
                (128, 2, 2, 4, 2048), (64, 2, 1, 4, 2048), (64, 4, 1, 4, 2048),
                (64, 2, 2, 4, 2048), (256, 1, 1, 4, 2048), (256, 1, 2, 4, 2048),
                (256, 1, 4, 4, 2048), (32, 8, 1, 4, 2048), (32, 4, 1, 4, 2048),
                (64, 2, 2, 4, 4096), (128, 1, 1, 8, 2048))]
GEMM_GRID = [dict(TILE=tn, TILE_M=tm, KC=kc, GROUP=g, UNITS=u, WG=wg, SPLITK=sk)
             for tn, tm, kc, g, u, wg, sk in (
                 (128, 128, 32, 4, 1, 512, 4), (128, 128, 32, 4, 2, 512, 4),
                 (128, 128, 32, 4, 1, 512, 2), (128, 128, 32, 4, 1, 256, 1),
                 (128, 128, 32, 8, 1, 256, 1), (128, 128, 32, 4, 2, 256, 2),
                 (128, 64, 32, 4, 1, 256, 1), (128, 64, 32, 8, 1, 256, 1),
                 (128, 64, 32, 8, 1, 256, 4), (128, 64, 32, 4, 1, 256, 2),
                 (128, 64, 32, 1, 2, 512, 2), (64, 128, 32, 1, 2, 512, 2),
                 (64, 128, 32, 4, 1, 512, 2), (64, 64, 32, 8, 1, 512, 1),
                 (64, 64, 32, 8, 1, 512, 2), (64, 64, 32, 4, 1, 256, 2),
                 (64, 64, 32, 8, 1, 128, 1), (64, 64, 32, 1, 2, 512, 2),
                 (64, 64, 64, 8, 1, 256, 1), (64, 32, 32, 8, 1, 256, 1),
                 (64, 32, 32, 8, 1, 256, 2), (64, 32, 32, 1, 1, 256, 4),
                 (64, 16, 32, 4, 1, 256, 1), (64, 16, 32, 8, 1, 256, 1),
                 (32, 32, 32, 1, 1, 256, 1), (32, 32, 32, 4, 1, 256, 1),
                 (32, 32, 64, 1, 2, 128, 1), (32, 32, 64, 4, 1, 256, 2),
                 (32, 64, 32, 1, 1, 256, 1), (32, 64, 32, 8, 1, 256, 1),
                 (32, 64, 32, 4, 4, 128, 2), (32, 64, 32, 2, 1, 256, 1),
                 (32, 16, 32, 2, 2, 256, 1), (128, 32, 32, 4, 1, 256, 4))]


def valid(spec, configs, max_wg):
    """The configurations of ``configs`` that ``spec`` accepts on this device (completed)."""
    out = []
    for c in configs:
        try:
            full = spec.check(c, max_wg)
        except ValueError:
            continue
        if full not in out:
            out.append(full)
    return out


def config_lists(args, device):
    """family -> configurations to time: the default, the current entry, then the grid."""
    max_wg = device.max_work_group_size
    lists = {}
    for family, spec, gpu, grid in (("masked_vmm", MASKED_VMM, "SPLIT", VMM_GRID),
                                    ("masked_gemm", MASKED_GEMM, "TILE", GEMM_GRID)):
        head = [spec.defaults(), tuning.lookup(spec, device)]
        if args.configs is not None:
            body = json.loads(args.configs.read_text()).get(family, [])
        elif args.space == "small":
            body = grid
        elif args.space == "cpu":
            body = [c for c in spec.candidates(max_wg) if not c[gpu]]
        else:   # wide: random GPU-shaped configurations
            body = [c for c in spec.candidates(max_wg) if c[gpu]]
        if args.configs is None and (args.space != "small" or args.n < len(body)):
            body = random.Random(args.seed).sample(body, min(args.n, len(body)))
        lists[family] = valid(spec, head + body, max_wg)
    return lists


def time_ours(queue, x_dev, weight, masks, out_dev, reps):
    """Median summed event ms of masked_matmul over ``reps`` calls (after one warm-up),
    each with the next mask; and the median ms of each of the call's kernels."""
    times = []
    for r in range(reps + 1):
        events = []
        ps.masked_matmul(x_dev, weight, masks[r % len(masks)], out=out_dev, events=events)
        queue.finish()
        if r:
            times.append([(e.profile.end - e.profile.start) * 1e-6 for e in events])
    per_kernel = np.median(np.array(times), axis=0)
    return float(np.median([sum(t) for t in times])), [round(float(t), 5) for t in per_kernel]


class TorchBaselines(Torch):
    """Dense torch.matmul and torch.sparse.sampled_addmm, when torch is there, timed as
    bench/baselines.py's :meth:`Torch.timer` times them (device time on CUDA)."""

    def __init__(self, want_cuda: bool):
        super().__init__(want_gpu=want_cuda)

    def _median_ms(self, fn, reps):
        timer = self.timer(fn)
        timer()
        return float(np.median([timer() for _ in range(reps)]))

    def operands(self, x, w):
        t = self.torch
        return t.from_numpy(x).to(self.device), t.from_numpy(w).to(self.device)

    def dense_ms(self, xt, wt, reps):
        t = self.torch
        with t.no_grad():
            return self._median_ms(lambda: t.matmul(xt, wt), reps)

    def sampled_addmm_ms(self, xt, wt, masks, reps):
        t = self.torch
        csrs = [t.from_numpy(m.astype(np.float32)).to(self.device).to_sparse_csr()
                for m in masks]
        state = {"i": 0}

        def run():
            state["i"] = (state["i"] + 1) % len(csrs)
            t.sparse.sampled_addmm(csrs[state["i"]], xt, wt, beta=0.0, alpha=1.0)
        with t.no_grad():
            return self._median_ms(run, reps)


def short(params, family):
    """The parameters that matter for the kernel the configuration selects."""
    if family == "masked_vmm":
        names = ("VEC", "GROUP", "CHUNK", "WG") if params["SPLIT"] == 1 else \
            ("SPLIT", "TEAMS", "GROUP", "VEC", "XCHUNK")
    else:
        names = ("VEC", "GROUP", "BLOCK_KIB", "WG") if params["TILE"] == 0 else \
            ("TILE", "TILE_M", "KC", "GROUP", "UNITS", "WG", "SPLITK")
    return ",".join(f"{n}={params[n]}" for n in names)


def sweep_shape(queue, torch_b, shape, keeps, configs, family, args, rng):
    m, k, n = shape
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    x_dev = cl_array.to_device(queue, x)
    weight = ps.MaskedLinearWeight(w, queue=queue)
    dense = None
    baselines, rows = {}, []
    if torch_b.torch is not None:
        xt, wt = torch_b.operands(x, w)
        try:
            dense = torch_b.dense_ms(xt, wt, args.reps)
        except Exception as exc:  # report and go on without it
            print(f"  torch.matmul failed: {exc}", flush=True)
    for keep in keeps:
        n_keep = keep_count(round(1.0 - keep, 12), n)
        host_masks = row_masks(rng, m, n, n_keep, N_MASKS)
        if args.form == "idx":   # compact int32 column indices, (M, n_keep), and output
            masks = [cl_array.to_device(queue, np.nonzero(mk)[1].reshape(m, n_keep)
                                        .astype(np.int32)) for mk in host_masks]
        else:
            masks = [cl_array.to_device(queue, mk) for mk in host_masks]
        out_dev = cl_array.empty(queue, masks[0].shape, np.float32)
        sampled = None
        if torch_b.torch is not None:
            try:
                sampled = torch_b.sampled_addmm_ms(xt, wt, host_masks, args.reps)
            except Exception as exc:
                print(f"  sampled_addmm failed: {str(exc).splitlines()[0][:100]}", flush=True)
        baselines[keep] = dict(n_keep=n_keep, torch_dense_ms=dense, sampled_addmm_ms=sampled)
        reference = None
        for params in configs:
            row = dict(shape=f"{m}x{k}x{n}", M=m, K=k, N=n, keep=keep, n_keep=n_keep,
                       form=args.form, family=family, params=params, config=short(params, family),
                       ms=float("inf"), rel_err=None, status="ok")
            try:
                with tuning.override(family, **params):
                    y = ps.masked_matmul(x_dev, weight, masks[0], out=out_dev).get()
                    if reference is None:     # the first configuration is the default
                        reference = y.astype(np.float64)
                    err = relative_error(y, reference)
                    row["rel_err"] = float(err)
                    if not err < TOL:
                        raise ArithmeticError(f"relative error {err:.2e} against the default")
                    row["ms"], row["kernel_ms"] = time_ours(queue, x_dev, weight, masks,
                                                            out_dev, args.reps)
            except Exception as exc:  # a failed configuration is recorded, never fatal
                row["status"] = f"{type(exc).__name__}: " + \
                    ((str(exc).strip().splitlines() or [""])[0])[:160]
                if reference is None:
                    print(f"  the default configuration failed ({row['status']}): no "
                          f"reference for {shape} keep {keep}", flush=True)
            row["x_torch"] = dense / row["ms"] if dense and row["status"] == "ok" else None
            row["x_sampled_addmm"] = (sampled / row["ms"] if sampled and row["status"] == "ok"
                                      else None)
            rows.append(row)
    return rows, baselines


def print_table(shape_label, keeps, configs, family, rows, baselines):
    print(f"\n== {family} {shape_label}: ms (x torch dense / x sampled_addmm) per keep ratio")
    head = f"{'config':58s}" + "".join(f"{'keep ' + format(kp, 'g'):>24s}" for kp in keeps)
    print(head)
    line = f"{'torch dense | sampled_addmm':58s}"
    for kp in keeps:
        b = baselines[kp]
        d = "-" if b["torch_dense_ms"] is None else f"{b['torch_dense_ms']:.4f}"
        s = "-" if b["sampled_addmm_ms"] is None else f"{b['sampled_addmm_ms']:.4f}"
        line += f"{d + ' | ' + s:>24s}"
    print(line)
    by_key = {(r["config"], r["keep"]): r for r in rows}
    for params in configs:
        label = short(params, family)
        line = f"{label[:58]:58s}"
        for kp in keeps:
            r = by_key[(label, kp)]
            if r["status"] != "ok":
                cell = "FAILED"
            else:
                ratios = "/".join("-" if v is None else f"{v:.2f}"
                                  for v in (r["x_torch"], r["x_sampled_addmm"]))
                cell = f"{r['ms']:.4f} ({ratios})"
            line += f"{cell:>24s}"
        print(line)
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed[:10]:
        print(f"  FAILED keep {r['keep']:g} {r['config']}: {r['status']}")
    if len(failed) > 10:
        print(f"  ... {len(failed) - 10} more failures")


def best_of(rows):
    """The best configuration per keep ratio, and over all keep ratios (the least total
    ms; a configuration that failed any keep ratio is out)."""
    per_keep = {}
    for r in rows:
        if r["status"] == "ok" and (r["keep"] not in per_keep or
                                    r["ms"] < per_keep[r["keep"]]["ms"]):
            per_keep[r["keep"]] = r
    totals = {}
    for r in rows:
        totals.setdefault(r["config"], [r["params"], 0.0])
        totals[r["config"]][1] += r["ms"] if r["status"] == "ok" else float("inf")
    label, (params, total) = min(totals.items(), key=lambda kv: kv[1][1])
    return ({str(kp): dict(config=r["config"], params=r["params"], ms=r["ms"],
                           x_torch=r["x_torch"], x_sampled_addmm=r["x_sampled_addmm"])
             for kp, r in sorted(per_keep.items())},
            dict(config=label, params=params, total_ms=total))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="'P:D' indices or a name substring (default: the "
                                         "runtime's choice)")
    parser.add_argument("--space", choices=("small", "wide", "cpu"), default="small",
                        help="small: the curated GPU grids (~60 configurations); wide: --n "
                             "random GPU-shaped ones per family; cpu: --n CPU-shaped ones")
    parser.add_argument("--n", type=int, default=60,
                        help="configurations per family beyond the default (wide/cpu; caps "
                             "small)")
    parser.add_argument("--configs", type=Path,
                        help="a JSON file {family: [parameter dicts]} to time instead of the "
                             "space (each completed with the spec defaults)")
    parser.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS),
                        help="fractions of each row kept")
    parser.add_argument("--families", nargs="+", default=["masked_vmm", "masked_gemm"],
                        choices=["masked_vmm", "masked_gemm"])
    parser.add_argument("--form", choices=("bool", "idx"), default="bool",
                        help="the mask: bool (M, N), dense output; or idx, int32 (M, n_keep) "
                             "column indices, compact output")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 3 reps, 2 keep ratios (a smoke run on a CPU)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="where to write the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 3)
        if args.keeps == list(KEEPS):
            args.keeps = [0.1, 0.5]
    queue = runtime.queue_for(args.device)
    device = queue.device
    torch_b = TorchBaselines(want_cuda=runtime.device_kind(device) == "gpu")
    if args.no_torch:
        torch_b.torch, torch_b.note = None, "torch baselines skipped (--no-torch)"
    configs = config_lists(args, device)
    shapes = {"masked_vmm": QUICK_VMM_SHAPES if args.quick else VMM_SHAPES,
              "masked_gemm": QUICK_GEMM_SHAPES if args.quick else GEMM_SHAPES}
    header = dict(device=f"{device.platform.name.strip()} / {device.name.strip()}",
                  driver=device.driver_version.strip(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  pysparsecl=ps.__version__, baselines=torch_b.note, space=args.space,
                  form=args.form,
                  reps=args.reps, keeps=args.keeps, quick=args.quick,
                  timing=f"median of {args.reps} calls after a warm-up, {N_MASKS} rotating "
                         "masks; ours by profiling events (summed over the call's kernels), "
                         "torch by wall clock between synchronisations")
    n_configs = sum(len(configs[f]) for f in args.families)
    print(f"device: {header['device']} ({header['driver']}); {header['baselines']}; "
          f"{n_configs} configurations", flush=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    all_rows, baselines, best = [], {}, {}
    for family in args.families:
        for shape in shapes[family]:
            label = "x".join(map(str, shape))
            rows, base = sweep_shape(queue, torch_b, shape, args.keeps, configs[family],
                                     family, args, rng)
            print_table(label, args.keeps, configs[family], family, rows, base)
            all_rows += rows
            baselines[label] = {str(kp): b for kp, b in base.items()}
            per_keep, overall = best_of(rows)
            best[label] = dict(family=family, per_keep=per_keep, overall=overall)
            print(f"  best over all keep ratios: {overall['config']} "
                  f"({overall['total_ms']:.4f} ms in all)", flush=True)
    header["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        path = args.json
    elif os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "masked_sweep.json"
    else:
        path = Path(__file__).resolve().parent / "results" / \
            f"masked-sweep-{tuning.device_slug(device)}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for r in all_rows:    # JSON has no infinity: a failed configuration has no time
        r["ms"] = None if r["status"] != "ok" else r["ms"]
    for b in best.values():
        if not np.isfinite(b["overall"]["total_ms"]):
            b["overall"]["total_ms"] = None
    path.write_text(json.dumps(dict(header=header, baselines=baselines, best=best,
                                    results=all_rows), indent=1, default=str))
    print(f"\nwrote {path} in {header['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
