"""Whole-network benchmark: ResNet-50 from the res2 input to the logits, pruned.

``python -m bench network [--device SPEC] [--batch 1 8] [--sparsity 0 0.7 0.9 0.95]``
(``make bench`` runs it).  The model (pysparsecl/testing/networks.py): all 16 bottleneck
blocks, projection shortcuts included, every convolution pruned by magnitude to the given
sparsity (random unstructured), inference BatchNorm folded into weights and biases, ReLU
and the residual fused into the convolutions, global average pooling and the FC layer.

Contenders, in one run, each a whole forward pass timed by wall clock from the input on
the device to the logits ready: ours eager (one conv2d_sparse call per convolution),
ours replayed (the same calls captured once in a LaunchGraph), torch dense eager (CPU:
oneDNN, in the faster of NCHW and channels_last; CUDA: cuDNN, TF32 off) and, on CUDA,
torch replayed from a CUDA graph.  Our logits are checked against torch's (relative
error < 1e-4).  Results: bench/results/network-<device>.{json,md,png}.
"""

from __future__ import annotations

import json

import numpy as np
import pyopencl.array as cl_array

import pysparsecl as ps
from pysparsecl import runtime, tuning
from pysparsecl.testing.networks import (
    SparseNetwork,
    conv_inputs,
    make_weights,
    resnet50_body,
)
from pysparsecl.testing.reference import relative_error

from . import report
from .timing import WARMUP_S, held_seconds, interleaved_medians, wall_ms

#: --sparsity's default for this suite; --batch's is 1 8 on a CPU device, 1 32 on a GPU.
SPARSITIES = (0.0, 0.7, 0.9, 0.95)
INPUT_HW = (56, 56)   # the res2 input of a 224 x 224 image
CHECK_TOL = 1e-4

COLUMNS = [("N", "batch", "{}"), ("sparsity", "sparsity", "{:.2f}"),
           ("ours_eager_ms", "ours eager ms", "{:.2f}"),
           ("ours_replay_ms", "ours replayed ms", "{:.2f}"),
           ("torch_ms", "torch eager ms", "{:.2f}"),
           ("torch_graph_ms", "torch CUDA graph ms", "{:.2f}"),
           ("speedup_eager", "x torch (eager)", "{:.2f}"),
           ("speedup_replay", "x torch (replayed)", "{:.2f}"),
           ("speedup_replay_vs_graph", "x torch CUDA graph (replayed)", "{:.2f}"),
           ("host_us_per_call", "host us per call (eager)", "{:.0f}"),
           ("replay_host_us_per_launch", "host us per launch (replayed)", "{:.1f}"),
           ("rel_error", "rel err vs torch", "{:.1e}")]

NOTE = ("Whole forward passes, wall clock from the input on the device to the logits ready, "
        "medians of interleaved rounds. 'x torch (eager)' = torch eager ms / ours eager ms; "
        "'x torch (replayed)' = torch eager ms / ours replayed ms (a LaunchGraph); on CUDA "
        "'x torch CUDA graph (replayed)' = torch CUDA-graph ms / ours replayed ms. "
        "'host us per call' = the Python time of the eager forward per conv2d_sparse call, "
        "measured with the device held back (nothing runs beside the host thread); 'host us per "
        "launch (replayed)' = the same for a replay, per recorded kernel launch (its fills "
        "and copies included in the time, not in the count).")


class TorchNet:
    """The same network in torch: dense conv2d with the folded weights and biases."""

    def __init__(self, torch, device, blocks, weights, channels_last: bool):
        self.t, self.blocks = torch, blocks
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.fmt = fmt
        self.w = {name: (torch.from_numpy(w).to(device).contiguous(memory_format=fmt),
                         torch.from_numpy(b).to(device)) for name, (w, b) in weights.items()
                  if name != "fc"}
        w, b = weights["fc"]
        self.fc = (torch.from_numpy(w.reshape(w.shape[0], -1)).to(device),
                   torch.from_numpy(b).to(device))

    def __call__(self, x):
        f = self.t.nn.functional
        with self.t.no_grad():
            a = x.contiguous(memory_format=self.fmt)
            for block in self.blocks:
                def conv(spec, inp):
                    w, b = self.w[spec.name]
                    return f.conv2d(inp, w, b, spec.stride, spec.padding, 1, spec.groups)
                y = f.relu(conv(block.conv1, a))
                y = f.relu(conv(block.conv2, y))
                shortcut = conv(block.proj, a) if block.proj is not None else a
                a = f.relu(conv(block.conv3, y) + shortcut)
            pooled = f.adaptive_avg_pool2d(a, 1).flatten(1)
            return f.linear(pooled, *self.fc)


def bench_network(queue, batches, sparsities, rounds: int = 3):
    try:
        import torch
    except ImportError:
        torch = None
    gpu = runtime.device_kind(queue.device) == "gpu"
    device = "cuda" if gpu and torch is not None and torch.cuda.is_available() else "cpu"
    if torch is not None:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    blocks = resnet50_body()
    shapes, final_hw = conv_inputs(blocks, INPUT_HW)
    n_calls = len(shapes) + 2                 # + pooling and FC
    rng = np.random.default_rng(2026)
    rows = []
    for sparsity in sparsities:
        weights = make_weights(blocks, sparsity, rng)
        net = SparseNetwork(blocks, weights, queue, pool_hw=final_hw)
        for n in batches:
            x = rng.standard_normal((n, blocks[0].conv1.c_in) + INPUT_HW, dtype=np.float32)
            x_dev = cl_array.to_device(queue, x)
            logits = net(x_dev).get().reshape(n, -1)
            graph = ps.LaunchGraph(queue, inputs=(x_dev,))
            with graph:
                replayed = net(x_dev)
            queue.finish()

            def eager():
                net(x_dev)
                queue.finish()

            def replay():
                graph.replay()
                queue.finish()
            timers = {"ours_eager": wall_ms(eager), "ours_replay": wall_ms(replay)}
            err = torch_graph = layout = None
            if torch is not None:
                xt = torch.from_numpy(x).to(device)
                # torch's faster layout on this device, chosen once by a short trial.
                nets = {cl: TorchNet(torch, device, blocks, weights, cl) for cl in (False, True)}
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
                trial = {cl: wall_ms(lambda m=m: (m(xt), sync())) for cl, m in nets.items()}
                best = min(trial, key=lambda cl: float(np.median([trial[cl]()
                                                                  for _ in range(3)])))
                tnet, layout = nets[best], "channels_last" if best else "NCHW"
                err = relative_error(logits, tnet(xt).cpu().numpy().astype(np.float64))
                timers["torch"] = wall_ms(lambda: (tnet(xt), sync()))
                if device == "cuda":
                    torch_graph = _cuda_graph(torch, tnet, xt)
                    if torch_graph is not None:
                        timers["torch_graph"] = wall_ms(lambda: (torch_graph.replay(), sync()))
            med = interleaved_medians(timers, rounds, block=2)
            replay_err = relative_error(replayed.get().reshape(n, -1), logits)
            host_us = _host_us(net, x_dev, queue) / n_calls
            replay_us = 1e6 * held_seconds(queue, graph.replay, 5) / len(graph)
            torch_ms = med.get("torch")
            rows.append(dict(
                N=n, sparsity=sparsity, ours_eager_ms=med["ours_eager"],
                ours_replay_ms=med["ours_replay"], torch_ms=torch_ms,
                torch_graph_ms=med.get("torch_graph"),
                torch_layout=layout,
                speedup_eager=torch_ms / med["ours_eager"] if torch_ms else None,
                speedup_replay=torch_ms / med["ours_replay"] if torch_ms else None,
                speedup_replay_vs_graph=(med["torch_graph"] / med["ours_replay"]
                                         if "torch_graph" in med else None),
                host_us_per_call=host_us, calls=n_calls,
                replay_host_us_per_launch=replay_us, launches=len(graph), rel_error=err,
                replay_rel_error=replay_err,
                nnz=int(sum(w.nnz for w in net.prepared.values()))))
            print(report.format_row(rows[-1], COLUMNS), flush=True)
            if err is not None and not err < CHECK_TOL:
                raise AssertionError(f"logits differ from torch's: relative error {err:.2e}")
            if not replay_err < CHECK_TOL:
                raise AssertionError(f"replayed logits differ: relative error {replay_err:.2e}")
    return rows


def _cuda_graph(torch, tnet, xt):
    """torch's forward captured in a CUDA graph, or None where capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                tnet(xt)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tnet(xt)
        return graph
    except Exception as exc:   # a note, not a crash
        print(f"  [torch CUDA graph skipped: {type(exc).__name__}: {exc}]")
        return None


def _host_us(net, x_dev, queue, reps: int = 5) -> float:
    """Median Python time of one eager forward, in us, with the device held back."""
    return 1e6 * held_seconds(queue, lambda: net(x_dev), reps)


def plot(rows, path, title) -> bool:
    plt = report.pyplot()
    if plt is None:
        return False
    rows = [r for r in rows if r.get("speedup_eager")]
    if not rows:
        return False
    batches = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, n in zip(axes[0], batches):
        pts = sorted((r["sparsity"], r) for r in rows if r["N"] == n)
        xs = [100 * s for s, _ in pts]
        ax.plot(xs, [r["speedup_eager"] for _, r in pts], marker="o", label="ours eager")
        ax.plot(xs, [r["speedup_replay"] for _, r in pts], marker="s", label="ours replayed")
        if any(r.get("speedup_replay_vs_graph") for _, r in pts):
            ax.plot(xs, [r.get("speedup_replay_vs_graph") for _, r in pts], marker="^",
                    label="ours replayed vs torch CUDA graph")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="torch dense = 1")
        ax.set_xlabel("weight sparsity (%)")
        ax.set_ylabel("speedup over torch dense, whole network")
        ax.set_title(f"ResNet-50 body, batch {n}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return report.save_figure(plt, fig, path, title)


def run(queue, args) -> dict:
    """The whole-network suite on ``queue``'s device: writes
    ``args.out``/network-<device>[-quick].{json,md,png}; returns the results (header, rows).
    ``args``: batch, sparsity (None: this suite's defaults), rounds, quick, out."""
    device = queue.device
    gpu = runtime.device_kind(device) == "gpu"
    if args.quick:
        batches, sparsities = [1], [0.9]
    else:
        batches = list(args.batch or ([1, 32] if gpu else [1, 8]))
        sparsities = list(args.sparsity or SPARSITIES)
    try:
        import torch
        baseline = (f"torch {torch.__version__} on "
                    + (f"cuda ({torch.cuda.get_device_name()}, cuDNN, TF32 off)"
                       if gpu and torch.cuda.is_available()
                       else f"cpu ({torch.get_num_threads()} threads, oneDNN)"))
    except ImportError:
        baseline = "torch not installed: torch columns empty (make bench-deps)"
    header = {
        **report.run_header(device),
        "model": "ResNet-50 res2 input (56x56) to logits: 16 bottleneck blocks, 52 convs + "
                 "pooling + FC; BN folded; magnitude-pruned convs; FC dense",
        "baselines": baseline,
        "timing": f"{args.rounds} interleaved rounds x (warm-up of >= {WARMUP_S * 1e3:g} ms "
                  "+ 2 timed passes); median",
    }
    print(json.dumps(header, indent=1))
    rows = bench_network(queue, batches, sparsities, args.rounds)
    slug = "network-" + tuning.device_slug(device) + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{slug}.json").write_text(json.dumps({"header": header, "rows": rows},
                                                      indent=1))
    has_plot = plot(rows, args.out / f"{slug}.png", f"ResNet-50 body on {header['device']}")
    md = [f"# Whole network: {header['device']}", "",
          "\n".join(f"- {k}: {v}" for k, v in header.items()), "", NOTE, "",
          markdown_table(rows)] + (["", f"![whole network]({slug}.png)"] if has_plot else [])
    (args.out / f"{slug}.md").write_text("\n".join(md) + "\n")
    print("\n" + markdown_table(rows))
    print(f"\nwrote {args.out / slug}.{{json,md{',png' if has_plot else ''}}}")
    return {"header": header, "rows": rows}


def markdown_table(rows, drop_absent: bool = True):
    return report.markdown_table(rows, COLUMNS, drop_absent=drop_absent)

