"""DSG training end to end on the digits: accuracy against sparsity, per mask, and the
training step's time against torch dense.

``python -m bench dsg_training [--sparsity ...] [--quick]`` (``make bench`` runs it where
scikit-learn imports).  The model is an MLP 64-512-512-10 (pysparsecl.dsg.MLP): DSG on the
two hidden layers, a dense output layer, softmax cross-entropy and SGD with momentum, all
on the device.  For each sparsity and each mask ("drs": the search; "random": a fresh
random selection; "oracle": the exact top-k of the true pre-activation) it trains from
several seeds and reports the test accuracy's mean and standard deviation, with the
search (or the control) on at inference.  Dense (sparsity 0) is the band to compare with.

The step time is the median wall time of a whole training step at batch 64 (forward,
search, loss, backward, update; the loss read back every step as a training loop would
print it), against torch's dense step of the same model on the CPU in the same run; and
the same for a compute-bound layer set, an MLP 512-2048-2048-10 at batch 1024 and 90%.
Results: bench/results/dsg-training-<device>[-quick].{json,md,png}.
"""

from __future__ import annotations

import json
import time

import numpy as np

from pysparsecl import tuning

from . import report
from .timing import interleaved_medians, wall_ms

SPARSITIES = (0.5, 0.7, 0.8, 0.9)
MASKS = ("drs", "random", "oracle")
SIZES = (64, 512, 512, 10)
BATCH, EPOCHS, SEEDS, LR = 64, 20, 5, 0.05

COLUMNS = [("mask", "mask", "{}"), ("sparsity", "sparsity", "{:.2f}"),
           ("accuracy_mean", "accuracy mean", "{:.3f}"),
           ("accuracy_std", "accuracy std", "{:.3f}"),
           ("loss_vs_dense", "points vs dense", "{:+.1f}"),
           ("step_ms", "step ms", "{:.2f}"), ("torch_step_ms", "torch dense step ms", "{:.2f}"),
           ("step_speedup_vs_torch", "x torch step", "{:.2f}")]


def available() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def _digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _train(queue, data, sparsity, mask, seed, epochs):
    import pyopencl.array as cl_array

    from pysparsecl.dsg import MLP
    x_tr, y_tr, x_te, y_te = data
    model = MLP(SIZES, sparsity, mask if sparsity else "dense", seed=seed, queue=queue)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(x_tr)), len(x_tr) // BATCH):
            model.train_step(cl_array.to_device(queue, x_tr[batch]),
                             cl_array.to_device(queue, y_tr[batch]), lr=LR)
    return float((model.predict(x_te) == y_te).mean()), model


def _step_timer(queue, model, data):
    import pyopencl.array as cl_array
    x = cl_array.to_device(queue, data[0][:BATCH])
    y = cl_array.to_device(queue, data[1][:BATCH])

    def step():
        model.train_step(x, y, lr=LR).get()     # a loop reads its loss: one sync a step
    return wall_ms(step)


def _torch_step_timer(data, sizes=SIZES):
    try:
        import torch
    except ImportError:
        return None
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    batch = BATCH if sizes == SIZES else len(data[0])
    x, y = torch.from_numpy(data[0][:batch]), torch.from_numpy(data[1][:batch]).long()

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
    return wall_ms(step)


#: The compute-bound layer set: (sizes, batch) of an MLP whose step is kernel-bound.
LARGE = ((512, 2048, 2048, 10), 1024)

LARGE_COLUMNS = [("model", "model", "{}"), ("N", "batch", "{}"), ("sparsity", "sparsity",
                                                                     "{:.2f}"),
                 ("step_ms", "step ms", "{:.1f}"),
                 ("torch_step_ms", "torch dense step ms", "{:.1f}"),
                 ("step_speedup_vs_torch", "x torch step", "{:.2f}")]


def bench_large(queue, sparsity: float, rounds: int) -> dict:
    """One training step of the compute-bound layer set, ours (DSG on the hidden layers)
    against torch dense, from random data (the step time does not depend on it)."""
    import pyopencl.array as cl_array

    from pysparsecl.dsg import MLP
    sizes, batch = LARGE
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], batch).astype(np.int32)
    model = MLP(sizes, sparsity, "drs", seed=0, queue=queue)
    xd, yd = cl_array.to_device(queue, x), cl_array.to_device(queue, y)
    timers = {"ours": wall_ms(lambda: model.train_step(xd, yd, lr=LR).get())}
    torch_timer = _torch_step_timer((x, y), sizes)
    if torch_timer is not None:
        timers["torch"] = torch_timer
    med = interleaved_medians(timers, rounds, block=2)
    row = dict(model="-".join(map(str, sizes)), N=batch, sparsity=sparsity,
               step_ms=med["ours"])
    if "torch" in med:
        row.update(torch_step_ms=med["torch"], step_speedup_vs_torch=med["torch"] / med["ours"])
    return row


def bench(queue, sparsities, seeds: int, epochs: int, rounds: int):
    data = _digits()
    dense = [_train(queue, data, 0.0, "dense", s, epochs) for s in range(seeds)]
    dense_acc = [a for a, _ in dense]
    torch_timer = _torch_step_timer(data)
    rows = [dict(mask="dense", sparsity=0.0, accuracy_mean=float(np.mean(dense_acc)),
                 accuracy_std=float(np.std(dense_acc)), loss_vs_dense=0.0)]
    timers = {"dense": _step_timer(queue, dense[0][1], data)}
    for sparsity in sparsities:
        for mask in MASKS:
            runs = [_train(queue, data, sparsity, mask, s, epochs) for s in range(seeds)]
            acc = [a for a, _ in runs]
            rows.append(dict(mask=mask, sparsity=sparsity, accuracy_mean=float(np.mean(acc)),
                             accuracy_std=float(np.std(acc)),
                             loss_vs_dense=100 * (np.mean(acc) - np.mean(dense_acc))))
            if mask == "drs":
                timers[f"drs {sparsity}"] = _step_timer(queue, runs[0][1], data)
            print(report.format_row(rows[-1], COLUMNS), flush=True)
    if torch_timer is not None:
        timers["torch"] = torch_timer
    med = interleaved_medians(timers, rounds, block=10)
    for row in rows:
        key = "dense" if row["mask"] == "dense" else f"drs {row['sparsity']}"
        if row["mask"] in ("dense", "drs"):
            row["step_ms"] = med[key]
            if "torch" in med:
                row["torch_step_ms"] = med["torch"]
                row["step_speedup_vs_torch"] = med["torch"] / med[key]
    return rows


def plot(rows, path, title) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    dense = next(r for r in rows if r["mask"] == "dense")
    lo, hi = (dense["accuracy_mean"] - dense["accuracy_std"],
              dense["accuracy_mean"] + dense["accuracy_std"])
    ax.axhspan(lo, hi, color="grey", alpha=0.3, label="dense (mean ± std)")
    for mask, marker in zip(MASKS, "osd"):
        pts = sorted((r["sparsity"], r) for r in rows if r["mask"] == mask)
        ax.errorbar([100 * s for s, _ in pts], [r["accuracy_mean"] for _, r in pts],
                    yerr=[r["accuracy_std"] for _, r in pts], marker=marker, capsize=3,
                    label=mask)
    ax.set_xlabel("sparsity of the hidden layers (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title("DSG MLP 64-512-512-10 on the digits")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(queue, args) -> dict:
    """The suite on ``queue``'s device: writes
    ``args.out``/dsg-training-<device>[-quick].{json,md,png}."""
    if not available():
        raise SystemExit("the dsg_training suite needs scikit-learn (the digits): "
                         "pip install scikit-learn")
    if args.quick:
        sparsities, seeds, epochs = [0.9], 2, 5
    else:
        sparsities, seeds, epochs = list(args.sparsity or SPARSITIES), SEEDS, EPOCHS
    device = queue.device
    try:
        import torch
        baseline = f"torch {torch.__version__} on cpu ({torch.get_num_threads()} threads)"
    except ImportError:
        baseline = "torch not installed: no step-time baseline"
    header = {**report.run_header(device),
              "model": f"MLP {'-'.join(map(str, SIZES))}, DSG on the hidden layers, SGD "
                       f"lr {LR} momentum 0.9, batch {BATCH}, {epochs} epochs, "
                       f"{seeds} seeds; digits: 1400 train, 397 test",
              "baselines": baseline,
              "timing": f"{args.rounds} interleaved rounds x (1 warm-up + 10 steps); median"}
    print(json.dumps(header, indent=1))
    t0 = time.perf_counter()
    rows = bench(queue, sparsities, seeds, epochs, args.rounds)
    large = [] if args.quick else [bench_large(queue, 0.9, args.rounds)]
    header["seconds"] = round(time.perf_counter() - t0, 1)
    slug = "dsg-training-" + tuning.device_slug(device) + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{slug}.json").write_text(json.dumps({"header": header, "rows": rows,
                                                       "large": large}, indent=1))
    has_plot = plot(rows, args.out / f"{slug}.png", header["device"])
    table = report.markdown_table(rows, COLUMNS, drop_absent=True)
    if large:
        table += ("\n\nThe compute-bound layer set, one training step (forward, search, "
                  "loss, backward, update):\n\n" +
                  report.markdown_table(large, LARGE_COLUMNS, drop_absent=True))
    md = [f"# DSG training: {header['device']}", "",
          "\n".join(f"- {k}: {v}" for k, v in header.items()), "", table] + \
        (["", f"![dsg training]({slug}.png)"] if has_plot else [])
    (args.out / f"{slug}.md").write_text("\n".join(md) + "\n")
    print("\n" + table)
    print(f"\nwrote {args.out / slug}.{{json,md{',png' if has_plot else ''}}}")
    return {"header": header, "rows": rows}
