#!/usr/bin/env python3
"""pysparsecl benchmark suite: ``make bench`` (or ``python bench/run.py --help``).

Times our kernels against what a user would otherwise run, in the same process:
PyTorch dense conv2d (oneDNN on CPU, cuDNN on NVIDIA; TF32 off), PyTorch CSR weight x
unfold (torch.sparse.mm: MKL/native on CPU, cuSPARSE on NVIDIA) and SciPy CSR x im2col.
Kernel time comes from OpenCL profiling events, whole calls from time.perf_counter;
every figure is the median of repeated runs after a warm-up.  Results go to
bench/results/<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pyopencl.array as cl_array  # noqa: E402

import pysparsecl as ps  # noqa: E402
from pysparsecl import runtime, tuning  # noqa: E402
from pysparsecl.ops.conv2d import CONV2D_CSR, conv2d_shape_class  # noqa: E402
from pysparsecl.params import SPECS  # noqa: E402
from pysparsecl.testing.cases import RESNET50_LAYERS  # noqa: E402
from pysparsecl.testing.reference import relative_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import elementwise  # noqa: E402  (bench/elementwise.py)
import masked  # noqa: E402  (bench/masked.py)
import network  # noqa: E402  (bench/network.py)
import report  # noqa: E402
from baselines import Torch  # noqa: E402
from timing import event_ms, interleaved_medians, wall_ms  # noqa: E402

OPS = ("conv2d", "elementwise", "masked")

RESULTS = Path(__file__).resolve().parent / "results"


def im2col(x, case):
    """(C*R*S, N*OH*OW) patches, ordered (c, r, s) x (n, oh, ow), as SciPy's operand."""
    (r, s), (sh, sw), (ph, pw), (dh, dw) = case.kernel, case.stride, case.padding, case.dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, ((r - 1) * dh + 1, (s - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]                  # N, C, OH, OW, R, S
    return np.ascontiguousarray(win.transpose(1, 4, 5, 0, 2, 3)).reshape(
        case.C * r * s, -1)


def bench_conv2d(queue, torch_b, args, rng):
    batches = (1,) if args.quick else tuple(args.batch)
    sparsities = (0.9,) if args.quick else tuple(args.sparsity)
    layers = RESNET50_LAYERS[:2] if args.quick else RESNET50_LAYERS
    rows = []
    for layer in layers:
        for n in batches:
            dense_case = layer.with_(N=n, sparsity=0.0)
            x, w_dense, _, _ = dense_case.make_inputs(rng)
            torch_fn = (torch_b.conv2d_fn(dense_case, x, w_dense)
                        if torch_b.torch is not None else None)
            x_dev = cl_array.to_device(queue, x)
            for sparsity in sparsities:
                case = layer.with_(N=n, sparsity=sparsity)
                _, w, csr, _ = case.make_inputs(rng)
                weight = ps.SparseConvWeight(csr, case.C, case.kernel, case.groups, queue)
                kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
                          groups=case.groups)
                y = ps.conv2d_sparse(x_dev, weight, **kw).get()
                err = relative_error(y, case.reference(x, w, None)) if args.check else None
                # Checked against ours once per case; skipped with a note where unsupported.
                torch_csr, csr_diff = torch_b.checked(
                    "torch csr", f"{layer.label()} N{n} {sparsity:.2f}",
                    lambda: torch_b.csr_conv2d_fn(case, x, csr),
                    lambda run: run().transpose(0, 1).cpu().numpy(), y)
                timers = {
                    "kernel": event_ms(lambda ev: ps.conv2d_sparse(x_dev, weight, events=ev,
                                                                   **kw), queue),
                    "call": wall_ms(lambda: (ps.conv2d_sparse(x_dev, weight, **kw),
                                             queue.finish())),
                    # The card's call: NumPy x, the SciPy matrix itself, NumPy out.
                    "card": wall_ms(lambda: ps.conv2d_sparse(x, csr, queue=queue, **kw)),
                }
                if torch_fn is not None:
                    timers["torch"] = torch_b.timer(torch_fn)
                    if torch_b.device == "cuda":   # on the CPU the same as "torch"
                        timers["torch_call"] = torch_b.call_timer(torch_fn)
                if torch_csr is not None:
                    timers["torch_csr"] = torch_b.timer(torch_csr)
                if not args.no_scipy:
                    timers["scipy"] = wall_ms(
                        lambda: (csr @ im2col(x, case)).reshape(case.K, n, *case.output_hw))
                med = interleaved_medians(timers, args.rounds, slow=("scipy",))
                pack_ms = []
                for _ in range(5):
                    events = []
                    ps.conv2d_sparse(x_dev, weight, events=events, **kw)
                    queue.finish()
                    pack_ms.append((events[0].profile.end - events[0].profile.start) * 1e-6)
                kernel_ms, call_ms, card_ms = med["kernel"], med["call"], med["card"]
                torch_ms, scipy_ms = med.get("torch"), med.get("scipy")
                torch_call_ms = med.get("torch_call")   # measured apart on CUDA only
                csr_ms = med.get("torch_csr")
                nnz_flops = 2.0 * csr.nnz * n * np.prod(case.output_hw)
                shape_class = conv2d_shape_class(n, case.C // case.groups, case.output_hw,
                                                 case.kernel, case.stride)
                rows.append(dict(
                    op="conv2d_sparse", layer=layer.label(), N=n, sparsity=sparsity,
                    family="conv2d_csr", shape_class=shape_class,
                    params=tuning.lookup(CONV2D_CSR, queue.device, shape_class),
                    nnz=int(csr.nnz), ours_kernel_ms=kernel_ms, ours_call_ms=call_ms,
                    card_call_ms=card_ms, prepared_over_card=call_ms / card_ms,
                    # Against torch on its own device: on a GPU our card's call also moves
                    # x and the result over the bus, so it is compared on the CPU only.
                    card_speedup_vs_torch=(torch_ms / card_ms if torch_ms and
                                           torch_b.device != "cuda" else None),
                    pack_ms=float(np.median(pack_ms)),
                    torch_dense_ms=torch_ms, scipy_csr_im2col_ms=scipy_ms, torch_csr_ms=csr_ms,
                    nnz_gflops=nnz_flops / kernel_ms / 1e6,
                    speedup_vs_torch=(torch_ms / kernel_ms) if torch_ms else None,
                    **({"torch_call_ms": torch_call_ms} if torch_call_ms else {}),
                    call_speedup_vs_torch=((torch_call_ms or torch_ms) / call_ms) if torch_ms
                    else None,
                    speedup_vs_scipy=(scipy_ms / kernel_ms) if scipy_ms else None,
                    speedup_vs_torch_csr=(csr_ms / kernel_ms) if csr_ms else None,
                    rel_error=err, torch_csr_rel_diff=csr_diff))
                print(report.format_row(rows[-1], COLUMNS), flush=True)
    return rows


COLUMNS = [("layer", "layer", "{}"), ("N", "N", "{}"), ("sparsity", "sparsity", "{:.2f}"),
           ("ours_kernel_ms", "ours ms", "{:.3f}"), ("pack_ms", "of which pack", "{:.3f}"),
           ("ours_call_ms", "call ms", "{:.3f}"),
           ("card_call_ms", "card call ms", "{:.3f}"),
           ("prepared_over_card", "call / card call", "{:.2f}"),
           ("torch_dense_ms", "torch dense ms", "{:.3f}"),
           ("torch_call_ms", "torch call ms", "{:.3f}"),
           ("scipy_csr_im2col_ms", "scipy ms", "{:.2f}"),
           ("torch_csr_ms", "torch csr ms", "{:.3f}"),
           ("speedup_vs_torch", "x torch", "{:.2f}"),
           ("call_speedup_vs_torch", "x torch (call)", "{:.2f}"),
           ("card_speedup_vs_torch", "x torch (card call)", "{:.2f}"),
           ("speedup_vs_scipy", "x scipy", "{:.1f}"),
           ("speedup_vs_torch_csr", "x torch csr", "{:.2f}"),
           ("nnz_gflops", "nnz GFLOP/s", "{:.1f}")]


def markdown_table(rows, drop_absent: bool = True):
    """``drop_absent``: leave out columns that no row has (results from before the field)."""
    return report.markdown_table(rows, COLUMNS, drop_absent=drop_absent)


def plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (make bench-deps)")
        return False
    rows = [r for r in rows if r["speedup_vs_torch"]]
    batches = sorted({r["N"] for r in rows})
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, n in zip(axes[0], batches):
        for layer in dict.fromkeys(r["layer"] for r in rows):
            pts = sorted((r["sparsity"], r["speedup_vs_torch"]) for r in rows
                         if r["layer"] == layer and r["N"] == n)
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=layer)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="torch dense = 1")
        ax.set_yscale("log")
        ax.set_xlabel("weight sparsity (%)")
        ax.set_ylabel("speedup over torch dense conv2d")
        ax.set_title(f"batch {n}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


README = Path(__file__).resolve().parent.parent / "README.md"
HEADLINE_MARKERS = ("<!-- bench:headline:start -->", "<!-- bench:headline:end -->")


def readme_headline(results_dir: Path = RESULTS) -> str:
    """Markdown for the README: the whole-network results first (bench/network.py), then per
    device the per-layer 90%/95% rows at the largest batch."""
    parts = ["### Whole network: ResNet-50, res2 input to logits", "", network.NOTE, ""]
    for path in sorted(results_dir.glob("network-*.json")):
        if path.stem.endswith("-quick"):
            continue
        data = json.loads(path.read_text())
        h = data["header"]
        parts += [f"**{h['device']}** (driver {h['driver']}; {h['date']}; baseline: "
                  f"{h['baselines']}; [bench/results/{path.stem}.md]"
                  f"(bench/results/{path.stem}.md))", "",
                  network.markdown_table(data["rows"]), ""]
    parts += ["### Per layer", ""]
    for path in sorted(results_dir.glob("*.json")):
        if path.stem.endswith("-quick") or path.stem.startswith(("sweep", "tvm-overhead",
                                                                  "network")):
            continue
        data = json.loads(path.read_text())
        h = data["header"]
        timing = f"; timing: {h['timing']}" if h.get("timing") else ""
        parts += [f"**{h['device']}** (driver {h['driver']}; {h['date']}; baselines: "
                  f"{h['baselines']}{timing}; full tables: [bench/results/{path.stem}.md]"
                  f"(bench/results/{path.stem}.md))", ""]
        conv = [r for r in data.get("rows", []) if r.get("op") == "conv2d_sparse"]
        if conv:
            batch = max(r["N"] for r in conv)
            parts += [markdown_table([r for r in conv if r["N"] == batch
                                      and r["sparsity"] in (0.9, 0.95)], drop_absent=True), ""]
        add = [r for r in data.get("rows", []) if r.get("op") == "elementwise_add"
               and r["n"] >= 16 * 2**20]
        if add:
            parts += [elementwise.markdown_table(add), ""]
        dsg = [r for r in data.get("rows", []) if r.get("op", "").startswith(("masked",
                                                                             "conv2d_masked"))
               and r["sparsity"] == 0.9]
        if dsg:
            parts += [masked.markdown_table(dsg, drop_absent=True), ""]
        if (results_dir / f"{path.stem}.png").exists():
            parts += [f"![conv2d_sparse speedup on {h['device']}](bench/results/{path.stem}.png)",
                      ""]
    return "\n".join(parts)


def update_readme(results_dir: Path = RESULTS) -> None:
    """Rewrite the README's headline block from the committed results (never by hand)."""
    text = README.read_text()
    start, end = HEADLINE_MARKERS
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{readme_headline(results_dir)}{end}{tail}")


CONV2D_NOTE = (
    "'ours ms' is kernel time (OpenCL profiling events: input packing + convolution); "
    "'call ms' is the whole Python call on device arrays, blocking, as torch and SciPy are "
    "timed. 'card call ms' is the call on the design card, conv2d_sparse(x, w_csr) with a "
    "NumPy x and the same SciPy CSR matrix on every call (its prepared weight is kept), "
    "returning NumPy; 'call / card call' = call ms / card call ms (1 = the card's call costs "
    "nothing more). "
    "'x torch' = torch dense ms / ours ms; 'x torch (call)' = torch dense ms / call ms; "
    "'x torch (card call)' = torch dense ms / card call ms (CPU devices only); "
    "'x scipy' = SciPy CSR @ im2col ms (im2col included) / ours ms; 'x torch csr' = torch CSR "
    "weight @ unfold(x) ms (torch.sparse.mm, unfold included, on torch's device) / ours ms. "
    "'nnz GFLOP/s' counts only the nonzero weights' multiply-adds.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="'P:D' indices or a name substring "
                        "(default: the runtime's choice)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS),
                        help="which op suites to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run, < 2 min on 2 cores")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sparsity", type=float, nargs="+",
                        default=[0.0, 0.7, 0.9, 0.95, 0.98])
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (each: warm-up + 3 timed runs per contender)")
    parser.add_argument("--no-scipy", action="store_true", help="skip the SciPy baseline")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the correctness check of each result")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite README.md's headline tables from bench/results")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme()
        return 0

    queue = runtime.queue_for(args.device)
    device = queue.device
    torch_b = Torch(want_gpu=runtime.device_kind(device) == "gpu")
    slug = tuning.device_slug(device) + (f"-{args.tag}" if args.tag else "") + \
        ("-quick" if args.quick else "")
    header = {
        "device": f"{device.platform.name.strip()} / {device.name.strip()}",
        "driver": device.driver_version.strip(),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pysparsecl": ps.__version__,
        "baselines": torch_b.note,
        # Each family's entry for this device; per-shape-class entries are listed with
        # the tables whose rows used them.
        "params": {family: tuning.lookup(spec, device) for family, spec in SPECS.items()},
        "timing": f"{args.rounds} interleaved rounds x (1 warm-up + 3 timed runs); median; "
                  f"ours by profiling events, {torch_b.timing_note}",
    }
    print(json.dumps(header, indent=1))
    rng = np.random.default_rng(2026)
    md, rows, has_plot = [], [], False   # the markdown header goes on top at the end
    args.out.mkdir(parents=True, exist_ok=True)
    if "conv2d" in args.ops:
        conv_rows = bench_conv2d(queue, torch_b, args, rng)
        rows += conv_rows
        has_plot = plot(conv_rows, args.out / f"{slug}.png",
                        f"conv2d_sparse vs torch dense conv2d on {header['device']}")
        md += ["## conv2d_sparse (ResNet-50 layers, random unstructured sparsity)", "",
               CONV2D_NOTE, "", markdown_table(conv_rows), ""]
        md += report.params_by_class(conv_rows)
        if has_plot:
            md += [f"![speedup]({slug}.png)", ""]
    if "elementwise" in args.ops:
        ew_rows = elementwise.bench_elementwise(queue, args, rng)
        bc_rows = [] if args.quick else elementwise.bench_broadcast(queue, args, rng)
        rows += ew_rows + bc_rows
        md += ["## elementwise add (float32, device-resident)", "",
               elementwise.__doc__.split("\n\n")[1].replace("\n", " "), "",
               elementwise.markdown_table(ew_rows), ""]
        md += [f"- broadcast {r['shape']} + (1, C, 1, 1): ours {r['ours_gbs']:.1f} GB/s, "
               f"NumPy {r['numpy_gbs']:.1f} GB/s" for r in bc_rows] + [""]
    if "masked" in args.ops:
        # The DSG issue's sparsities, not the convolution sweep's.
        masked_args = argparse.Namespace(**{**vars(args), "sparsity": [0.5, 0.8, 0.9]})
        dsg_rows = masked.bench_masked(queue, masked_args, rng, torch_b=torch_b)
        rows += dsg_rows
        md += ["## DSG: masked VMM/GEMM, conv2d_masked, dimension-reduction search", "",
               masked.__doc__.split("\n\n")[1].replace("\n", " "), "",
               masked.markdown_table(dsg_rows), ""] + report.params_by_class(dsg_rows)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
