"""pysparsecl benchmarks: ``python -m bench [SUITE ...] [options]`` (``make bench``).

Suites (default: all of them; tvm where apache-tvm imports, tvm_network where apache-tvm
and torch do), run in this order:

  conv2d       conv2d_sparse on ResNet-50 layers vs torch dense, torch CSR and SciPy
  elementwise  add's bandwidth vs NumPy and the device's copy
  masked       DSG: masked VMM/GEMM, conv2d_masked and the search's overhead
  drs          the search's device time kernel by kernel (printed, no file)
  network      ResNet-50 from the res2 input to the logits, eager and replayed, vs torch
  dsg_training DSG MLP on the digits: accuracy vs sparsity per mask, step time vs torch
  tvm          what TVM adds over a direct conv2d_sparse call
  tvm_network  ResNet-50 through TVM with offload_sparse_conv2d vs TVM dense and torch

Results (OUT = --out, default bench/results; DEVICE = the device's slug):
conv2d, elementwise and masked write their rows together to
OUT/DEVICE[-TAG][-quick].{json,md,png}; network writes OUT/network-DEVICE[-quick].{json,
md,png}; dsg_training writes OUT/dsg-training-DEVICE[-quick].{json,md,png}; tvm writes
OUT/tvm-overhead-DEVICE.{json,md}; tvm_network writes
OUT/tvm-network-DEVICE[-quick].{json,md,png}.  ``--readme`` only rewrites the
tables of README.md and docs/benchmarks.md from the committed results.

An option left out takes each suite's own default (shown in brackets in its help); one
given applies to every suite named that takes it.  Every contender is measured in the
same run in interleaved rounds, medians after warm-up (bench/timing.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SUITES = ("conv2d", "elementwise", "masked", "drs", "network", "dsg_training", "tvm",
          "tvm_network")
#: The suites whose rows share one results file, OUT/DEVICE[-TAG][-quick].*
LAYER_SUITES = ("conv2d", "elementwise", "masked")
RESULTS = Path(__file__).resolve().parent / "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"any of {', '.join(SUITES)} (default: all); name them before an "
                        "option that takes a list (--batch, --sparsity, --configs)")
    p.add_argument("--device", help="'P:D' indices or a name substring (default: the "
                   "runtime's choice; tvm always runs on the runtime's default queue)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: conv2d/elementwise/masked/network in < 2 min on 2 cores")
    p.add_argument("--batch", type=int, nargs="+",
                   help="conv2d [1 8], network [1 8 on a CPU device, 1 32 on a GPU], "
                        "tvm_network [1 8]; tvm takes the first value [8]")
    p.add_argument("--sparsity", type=float, nargs="+",
                   help="conv2d [0 0.7 0.9 0.95 0.98], masked [0.5 0.8 0.9], network "
                        "[0 0.7 0.9 0.95], tvm_network [0 0.7 0.9 0.95]; drs and tvm take "
                        "the first value [0.9]")
    p.add_argument("--rounds", type=int,
                   help="interleaved rounds (each: warm-up + timed runs per contender) "
                        "[3; tvm 10]")
    p.add_argument("--no-scipy", action="store_true", help="conv2d: skip the SciPy baseline")
    p.add_argument("--no-numpy", action="store_true", help="masked: skip the NumPy baseline")
    p.add_argument("--no-conv", action="store_true", help="masked: skip conv2d_masked")
    p.add_argument("--no-matmul", action="store_true",
                   help="masked: skip the masked products (conv2d_masked only)")
    p.add_argument("--conv-batch", type=int, nargs="+", default=[8],
                   help="masked: conv2d_masked's batches [8]")
    p.add_argument("--configs", nargs="+", metavar="NAME=V,...",
                   help="elementwise: extra tile configurations timed alongside the current one")
    p.add_argument("--runs", type=int, help="drs: timed runs per shape [7]")
    p.add_argument("--steps-only", action="store_true",
                   help="dsg_training: time the training steps, skip the accuracy runs")
    p.add_argument("--layer", type=int, help="tvm: index into RESNET50_LAYERS [0]")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the correctness check of each result (conv2d, elementwise, "
                        "masked; network always checks its logits)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--tag", default="", help="suffix for the conv2d/elementwise/masked "
                   "results file's name")
    p.add_argument("--readme", action="store_true",
                   help="only rewrite the tables of README.md and docs/benchmarks.md from "
                        "bench/results")
    return p


def select(names) -> list:
    """The suites to run, in SUITES' order: the named ones, or all (the TVM suites where
    what they need imports)."""
    from . import dsg_training, tvm_network, tvm_overhead
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        raise SystemExit(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    if names:
        return [s for s in SUITES if s in names]
    suites = list(SUITES)
    if not dsg_training.available():
        print("scikit-learn not installed: the DSG training benchmark times steps only")
    if not tvm_overhead.available():
        print("apache-tvm not installed: TVM overhead benchmark skipped")
        suites.remove("tvm")
    if not tvm_network.available():
        print("apache-tvm or torch not installed: TVM network benchmark skipped")
        suites.remove("tvm_network")
    return suites


def run_layers(queue, args, suites) -> None:
    """conv2d, elementwise and masked on ``queue``: one results file for all their rows."""
    import numpy as np

    from pysparsecl import runtime, tuning
    from pysparsecl.params import SPECS

    from . import conv2d, elementwise, masked, report
    from .baselines import Torch
    from .timing import WARMUP_S

    device = queue.device
    torch_b = Torch(want_gpu=runtime.device_kind(device) == "gpu")
    slug = tuning.device_slug(device) + (f"-{args.tag}" if args.tag else "") + \
        ("-quick" if args.quick else "")
    header = {
        **report.run_header(device),
        "baselines": torch_b.note,
        # Each family's entry for this device; per-shape-class entries are listed with
        # the tables whose rows used them.
        "params": {family: tuning.lookup(spec, device) for family, spec in SPECS.items()},
        "timing": f"{args.rounds} interleaved rounds x (warm-up of >= {WARMUP_S * 1e3:g} ms "
                  f"+ 3 timed runs); median; ours by profiling events, {torch_b.timing_note}",
    }
    print(json.dumps(header, indent=1))
    rng = np.random.default_rng(2026)
    md, rows, has_plot = [], [], False   # the markdown header goes on top at the end
    args.out.mkdir(parents=True, exist_ok=True)
    if "conv2d" in suites:
        conv_rows = conv2d.bench_conv2d(queue, torch_b, args, rng)
        rows += conv_rows
        has_plot = conv2d.plot(conv_rows, args.out / f"{slug}.png",
                               f"conv2d_sparse vs torch dense conv2d on {header['device']}")
        md += ["## conv2d_sparse (ResNet-50 layers, random unstructured sparsity)", "",
               conv2d.CONV2D_NOTE, "", conv2d.markdown_table(conv_rows), ""]
        md += report.params_by_class(conv_rows)
        if has_plot:
            md += [f"![speedup]({slug}.png)", ""]
    if "elementwise" in suites:
        ew_rows = elementwise.bench_elementwise(queue, args, rng)
        bc_rows = [] if args.quick else elementwise.bench_broadcast(queue, args, rng)
        rows += ew_rows + bc_rows
        md += ["## elementwise add (float32, device-resident)", "",
               elementwise.__doc__.split("\n\n")[1].replace("\n", " "), "",
               elementwise.markdown_table(ew_rows), ""]
        md += [f"- broadcast {r['shape']} + (1, C, 1, 1): ours {r['ours_gbs']:.1f} GB/s, "
               f"NumPy {r['numpy_gbs']:.1f} GB/s" for r in bc_rows] + [""]
    if "masked" in suites:
        dsg_rows = masked.bench_masked(queue, argparse.Namespace(**vars(args)), rng,
                                       torch_b=torch_b)
        rows += dsg_rows
        md += ["## DSG: masked VMM/GEMM, conv2d_masked, dimension-reduction search", "",
               masked.__doc__.split("\n\n")[1].replace("\n", " "), "",
               masked.markdown_table(dsg_rows), ""]
        grid = masked.propagated_table(dsg_rows)
        if grid:
            md += ["### Sparsity carried across layers: a compact x", "",
                   masked.PROPAGATED_NOTE, "", grid, ""]
        md += report.params_by_class(dsg_rows)
    header["baselines"] = torch_b.notes   # with the baselines skipped on the way, if any
    head = [f"# pysparsecl benchmark: {header['device']}", "",
            "\n".join(f"- {k}: {v}" for k, v in header.items()), "",
            "Times are medians of repeated runs after a warm-up, all contenders measured in "
            "the same run in interleaved rounds.", ""]
    (args.out / f"{slug}.json").write_text(json.dumps({"header": header, "rows": rows},
                                                      indent=1))
    (args.out / f"{slug}.md").write_text("\n".join(head + md) + "\n")
    print("\n" + "\n".join(md))
    print(f"baselines: {header['baselines']}")
    print(f"\nwrote {args.out / slug}.{{json,md{',png' if has_plot else ''}}}")


def main(argv=None) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.readme:
        if args.suites:
            raise SystemExit("--readme runs no suite: name none")
        from . import readme
        readme.update()
        return 0
    suites = select(args.suites)
    rounds = args.rounds
    args.rounds = rounds or 3
    sparsity = args.sparsity[0] if args.sparsity else None   # drs' and tvm's
    queue = None
    if any(s not in ("tvm", "tvm_network") for s in suites):
        from pysparsecl import runtime
        queue = runtime.queue_for(args.device)
    layers = [s for s in suites if s in LAYER_SUITES]
    plan = ([layers] if layers else []) + [[s] for s in suites if s not in LAYER_SUITES]
    for step in plan:
        name, t0 = " ".join(step), time.perf_counter()
        print(f"== {name}", flush=True)
        if step == layers:
            run_layers(queue, args, layers)
        elif name == "drs":
            from . import drs
            drs.run(queue, drs.SPARSITY if sparsity is None else sparsity,
                    args.runs or drs.RUNS)
        elif name == "network":
            from . import network
            network.run(queue, args)
        elif name == "dsg_training":
            from . import dsg_training
            dsg_training.run(queue, args)
        elif name == "tvm":
            from . import tvm_overhead as tv
            tv.run(tv.LAYER if args.layer is None else args.layer,
                   tv.SPARSITY if sparsity is None else sparsity, rounds or tv.ROUNDS, args.out,
                   args.batch[0] if args.batch else tv.BATCH)
        elif name == "tvm_network":
            from . import tvm_network
            tvm_network.run(args)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
