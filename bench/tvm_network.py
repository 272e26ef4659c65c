"""A pruned ResNet-50 through TVM, end to end, with and without pysparsecl's offload.

``python -m bench tvm_network [--batch 1 8] [--sparsity 0 0.7 0.9 0.95] [--rounds N]``
(``make bench`` runs it where apache-tvm and torch import).  The model is torchvision's
ResNet-50 architecture (pysparsecl/testing/torch_models.py: stem, 16 bottleneck blocks,
pooling, FC; Conv2d + BatchNorm2d), random weights with every convolution pruned by
magnitude, exported with ``torch.export`` and imported with
``tvm.relax.frontend.torch.from_exported_program(keep_params_as_input=False)``.

Contenders, each a whole forward pass from a host tensor to the logits on the host, wall
clock, in interleaved rounds:

- ``tvm_offload``: ``pysparsecl.tvm.offload_sparse_conv2d(mod, min_sparsity=0)`` (every
  conv, with its BatchNorm, ReLU and residual fused, runs as a pysparsecl call on the
  default OpenCL device; pooling and the FC stay TVM ops), compiled with
  ``tvm.compile(..., target=llvm -mcpu=<host>)`` and run in ``relax.VirtualMachine``;
- ``torch``: torch dense eager, in the faster of NCHW and channels_last (oneDNN);
- ``tvm_dense``: the same module compiled by TVM's default pipeline, without tuning.  Its
  kernels are dense, so its time does not depend on the sparsity: it is measured once per
  batch, on the first sparsity's model (one warm-up and two timed runs: a pass takes
  seconds), and reported on every row.

Every output is checked against torch's (relative error < 1e-4).  Results:
bench/results/tvm-network-<device>.{json,md,png}.
"""

from __future__ import annotations

import json
import time

import numpy as np

from pysparsecl import runtime, tuning
from pysparsecl.testing.reference import relative_error

from . import report
from .timing import WARMUP_S, interleaved_medians, wall_ms

SPARSITIES = (0.0, 0.7, 0.9, 0.95)
BATCHES = (1, 8)
INPUT_HW = (224, 224)
CHECK_TOL = 1e-4
SEED = 2026

COLUMNS = [("N", "batch", "{}"), ("sparsity", "sparsity", "{:.2f}"),
           ("tvm_offload_ms", "TVM + pysparsecl ms", "{:.1f}"),
           ("torch_ms", "torch dense ms", "{:.1f}"),
           ("tvm_dense_ms", "TVM dense ms", "{:.0f}"),
           ("speedup_vs_torch", "x torch", "{:.2f}"),
           ("speedup_vs_tvm_dense", "x TVM dense", "{:.1f}"),
           ("offloaded", "convs offloaded", "{}"),
           ("compile_s", "compile s (offload)", "{:.1f}"),
           ("rel_error", "rel err vs torch", "{:.1e}")]

NOTE = ("Whole forward passes of ResNet-50 (224x224 input), host tensor in, logits on the "
        "host, medians of interleaved rounds. 'x torch' = torch dense ms / TVM + pysparsecl "
        "ms; 'x TVM dense' = TVM dense ms / TVM + pysparsecl ms. TVM dense is TVM's default "
        "pipeline without tuning (no MetaSchedule database), measured once per batch: its "
        "dense kernels take the same time at every sparsity. 'convs offloaded' counts the "
        "pysparsecl calls against the model's convolutions.")


def available() -> bool:
    """Whether apache-tvm and torch import (the suite needs both)."""
    try:
        import torch  # noqa: F401
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


def host_target():
    """``llvm -mcpu=<this host's CPU>``, in the JSON form TVM 0.27 takes."""
    import tvm
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def relax_module(model, x: np.ndarray):
    """``model`` exported with ``torch.export`` at ``x``'s shape and imported into Relax
    with its parameters as constants."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program
    exported = torch.export.export(model, (torch.from_numpy(x),))
    return from_exported_program(exported, keep_params_as_input=False)


def vm_main(mod):
    import tvm
    from tvm import relax
    return relax.VirtualMachine(tvm.compile(mod, target=host_target()), tvm.cpu())["main"]


def _torch_timers(torch, model, x: np.ndarray):
    """torch eager forwards in NCHW and channels_last, and the logits (float64)."""
    xt = torch.from_numpy(x)
    xt_cl = xt.contiguous(memory_format=torch.channels_last)
    model_cl = _channels_last_copy(torch, model)

    def nchw():
        with torch.no_grad():
            return model(xt)

    def channels_last():
        with torch.no_grad():
            return model_cl(xt_cl)
    return {"torch_nchw": wall_ms(nchw), "torch_cl": wall_ms(channels_last)}, \
        nchw().numpy().astype(np.float64)


def _channels_last_copy(torch, model):
    import copy
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def bench(batches, sparsities, rounds: int, tvm_dense: bool = True):
    import torch
    import tvm

    import pysparsecl.tvm as pst
    from pysparsecl.testing.torch_models import ResNet50, prunable, prune, randomise

    rng = np.random.default_rng(SEED)
    dev = tvm.cpu()
    rows = []
    for n in batches:
        x = rng.standard_normal((n, 3) + INPUT_HW, dtype=np.float32)
        xt = tvm.runtime.tensor(x, dev)
        dense_ms = None
        for sparsity in sparsities:
            model = prune(randomise(ResNet50(), SEED), sparsity)
            n_layers = len(prunable(model))
            mod = relax_module(model, x)
            t0 = time.perf_counter()
            decisions = []
            offloaded = pst.offload_sparse_conv2d(mod, min_sparsity=0.0, decisions=decisions)
            run_offload = vm_main(offloaded)
            compile_s = time.perf_counter() - t0
            torch_timers, ref = _torch_timers(torch, model, x)
            got = run_offload(xt)[0].numpy()
            err = relative_error(got, ref)
            if not err < CHECK_TOL:
                raise AssertionError(f"batch {n}, sparsity {sparsity}: the offloaded model's "
                                     f"logits differ from torch's: relative error {err:.2e}")
            if tvm_dense and dense_ms is None:
                run_dense = vm_main(mod)
                dense_err = relative_error(run_dense(xt)[0].numpy(), ref)
                if not dense_err < CHECK_TOL:
                    raise AssertionError(f"TVM dense logits differ from torch's: {dense_err:.2e}")
                dense_ms = interleaved_medians({"d": wall_ms(lambda: run_dense(xt))}, 1,
                                               block=2)["d"]
            med = interleaved_medians({"tvm_offload": wall_ms(lambda: run_offload(xt)),
                                       **torch_timers}, rounds, block=2)
            torch_ms = min(med["torch_nchw"], med["torch_cl"])
            rows.append(dict(
                N=n, sparsity=sparsity, tvm_offload_ms=med["tvm_offload"], torch_ms=torch_ms,
                torch_layout="NCHW" if med["torch_nchw"] <= med["torch_cl"] else
                "channels_last", tvm_dense_ms=dense_ms,
                speedup_vs_torch=torch_ms / med["tvm_offload"],
                speedup_vs_tvm_dense=dense_ms / med["tvm_offload"] if dense_ms else None,
                offloaded=f"{sum(d.offloaded for d in decisions)}/{n_layers}",
                compile_s=compile_s, rel_error=err))
            print(report.format_row(rows[-1], COLUMNS), flush=True)
    return rows


def plot(rows, path, title) -> bool:
    plt = report.pyplot()
    if plt is None:
        return False
    batches = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, n in zip(axes[0], batches):
        pts = sorted((r["sparsity"], r) for r in rows if r["N"] == n)
        xs = [100 * s for s, _ in pts]
        ax.plot(xs, [r["speedup_vs_torch"] for _, r in pts], marker="o",
                label="TVM + pysparsecl vs torch dense")
        if all(r.get("speedup_vs_tvm_dense") for _, r in pts):
            ax.plot(xs, [r["speedup_vs_tvm_dense"] for _, r in pts], marker="s",
                    label="TVM + pysparsecl vs TVM dense (untuned)")
            ax.set_yscale("log")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="baseline = 1")
        ax.set_xlabel("weight sparsity (%)")
        ax.set_ylabel("speedup, whole network")
        ax.set_title(f"ResNet-50 through TVM, batch {n}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return report.save_figure(plt, fig, path, title)


def run(args) -> dict:
    """The suite on the runtime's default device (the one TVM's packed functions use):
    writes ``args.out``/tvm-network-<device>[-quick].{json,md,png}; returns the results.
    ``args``: batch, sparsity (None: this suite's defaults), rounds, quick, out."""
    if not available():
        raise SystemExit("the tvm_network suite needs apache-tvm and torch: "
                         "pip install -e '.[tvm,bench]'")
    import torch
    import tvm
    device = runtime.get_queue().device
    if args.quick:
        batches, sparsities = [1], [0.9]
    else:
        batches = list(args.batch or BATCHES)
        sparsities = list(args.sparsity or SPARSITIES)
    header = {
        **report.run_header(device),
        "model": "ResNet-50 (torchvision's architecture), 224x224, random weights, every "
                 "conv and the FC magnitude-pruned; BatchNorm in the graph, folded by the "
                 "offload",
        "tvm": f"{tvm.__version__}, target {host_target()}",
        "baselines": f"torch {torch.__version__} on cpu ({torch.get_num_threads()} threads, "
                     "oneDNN); TVM's default pipeline on the same module",
        "timing": f"{args.rounds} interleaved rounds x (warm-up of >= {WARMUP_S * 1e3:g} ms "
                  "+ 2 timed passes); median",
    }
    print(json.dumps(header, indent=1))
    rows = bench(batches, sparsities, args.rounds)
    slug = "tvm-network-" + tuning.device_slug(device) + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{slug}.json").write_text(json.dumps({"header": header, "rows": rows},
                                                      indent=1))
    has_plot = plot(rows, args.out / f"{slug}.png", f"ResNet-50 through TVM on "
                                                     f"{header['device']}")
    md = [f"# ResNet-50 through TVM: {header['device']}", "",
          "\n".join(f"- {k}: {v}" for k, v in header.items()), "", NOTE, "",
          markdown_table(rows)] + (["", f"![tvm network]({slug}.png)"] if has_plot else [])
    (args.out / f"{slug}.md").write_text("\n".join(md) + "\n")
    print("\n" + markdown_table(rows))
    print(f"\nwrote {args.out / slug}.{{json,md{',png' if has_plot else ''}}}")
    return {"header": header, "rows": rows}


def markdown_table(rows, drop_absent: bool = True):
    return report.markdown_table(rows, COLUMNS, drop_absent=drop_absent)
