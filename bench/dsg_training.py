"""DSG training end to end on the digits: accuracy against sparsity, per mask, and the
training step's time against torch dense.

``python -m bench dsg_training [--sparsity ...] [--quick]`` (``make bench`` runs it).  The
model is an MLP 64-512-512-10 (pysparsecl.dsg.MLP): DSG on the two hidden layers, a dense
output layer, softmax cross-entropy and SGD with momentum, all on the device.

- Accuracy (needs scikit-learn for the digits): for each sparsity and each mask ("drs":
  the search; "random": a fresh random selection; "oracle": the exact top-k of the true
  pre-activation) it trains from several seeds and reports the test accuracy's mean and
  standard deviation, with the search (or the control) on at inference, beside dense's.
- Step times: the median wall time of a whole training step (forward, search, loss,
  backward, update; the loss read back every step, as a training loop prints it), dense
  and with the search at each sparsity, at batch 64, both eager (``train_step``) and
  replayed (a step recorded once by ``capture_step``, then replayed with each new
  batch); and the compute-bound layer set, an MLP 512-2048-2048-10 at batch 1024 and
  90%.  Against torch's dense step of the same
  model in the same run: on the CPU, or with CUDA (TF32 off) on a GPU device.

Results: bench/results/dsg-training-<device>[-quick].{json,md,png}.
"""

from __future__ import annotations

import json
import time

import numpy as np

from pysparsecl import runtime, tuning

from . import report
from .timing import interleaved_medians, wall_ms

SPARSITIES = (0.5, 0.7, 0.8, 0.9)
MASKS = ("drs", "random", "oracle")
SIZES = (64, 512, 512, 10)
BATCH, EPOCHS, SEEDS, LR = 64, 20, 5, 0.05

COLUMNS = [("mask", "mask", "{}"), ("sparsity", "sparsity", "{:.2f}"),
           ("accuracy_mean", "accuracy mean", "{:.3f}"),
           ("accuracy_std", "accuracy std", "{:.3f}"),
           ("loss_vs_dense", "points vs dense", "{:+.1f}")]


#: The compute-bound layer set: (sizes, batch) of an MLP whose step is kernel-bound.
LARGE = ((512, 2048, 2048, 10), 1024)

STEP_COLUMNS = [("model", "model", "{}"), ("N", "batch", "{}"), ("mask", "mask", "{}"),
                ("sparsity", "sparsity", "{:.2f}"), ("step_ms", "eager step ms", "{:.2f}"),
                ("replayed_step_ms", "replayed step ms", "{:.2f}"),
                ("torch_step_ms", "torch dense step ms", "{:.2f}"),
                ("step_speedup_vs_torch", "x torch (eager)", "{:.2f}"),
                ("replayed_speedup_vs_torch", "x torch (replayed)", "{:.2f}")]


def available() -> bool:
    """Whether scikit-learn imports (the digits, for the accuracy part; the step times
    run without it, on random data)."""
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


def _train(queue, data, sparsity, mask, seed, epochs) -> float:
    import pyopencl.array as cl_array

    from pysparsecl.dsg import MLP
    x_tr, y_tr, x_te, y_te = data
    model = MLP(SIZES, sparsity, mask if sparsity else "dense", seed=seed, queue=queue)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(x_tr)), len(x_tr) // BATCH):
            model.train_step(cl_array.to_device(queue, x_tr[batch]),
                             cl_array.to_device(queue, y_tr[batch]), lr=LR)
    return float((model.predict(x_te) == y_te).mean())


def _batch(sizes, batch: int):
    """Random inputs and labels: a step's time does not depend on the values."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, sizes[0]), dtype=np.float32),
            rng.integers(0, sizes[-1], batch).astype(np.int32))


def _step_timers(queue, sizes, sparsity: float, batch: int):
    """Our whole training step, eager (``train_step``) and replayed (``capture_step``,
    each step copying a new batch into the recorded inputs); the loss is read back, as a
    training loop prints it."""
    import pyopencl.array as cl_array

    from pysparsecl.dsg import MLP
    kind = "drs" if sparsity else "dense"
    eager, replayed = (MLP(sizes, sparsity, kind, seed=0, queue=queue) for _ in range(2))
    x, y = (cl_array.to_device(queue, a) for a in _batch(sizes, batch))
    recorded = [cl_array.empty_like(x), cl_array.empty_like(y)]
    for new, old in zip(recorded, (x, y)):
        new.set(old.get())
    step = replayed.capture_step(*recorded, lr=LR)
    return (wall_ms(lambda: eager.train_step(x, y, lr=LR).get()),
            wall_ms(lambda: step(x, y).get()))


def _torch_device(queue) -> str:
    import torch
    gpu = runtime.device_kind(queue.device) == "gpu"
    return "cuda" if gpu and torch.cuda.is_available() else "cpu"


def _torch_step_timer(queue, sizes, batch: int):
    """torch's dense step of the same model (CUDA, TF32 off, on a GPU device), or None."""
    try:
        import torch
    except ImportError:
        return None
    device = _torch_device(queue)
    torch.backends.cuda.matmul.allow_tf32 = False
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    x, y = _batch(sizes, batch)
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).long().to(device)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()                         # the same read-back as ours (and a sync)
    return wall_ms(step)


def accuracy_rows(queue, sparsities, seeds: int, epochs: int):
    """Test accuracy per mask and sparsity, mean and spread over seeds, and dense's."""
    data = _digits()
    dense = [_train(queue, data, 0.0, "dense", s, epochs) for s in range(seeds)]
    rows = [dict(mask="dense", sparsity=0.0, accuracy_mean=float(np.mean(dense)),
                 accuracy_std=float(np.std(dense)), loss_vs_dense=0.0)]
    print(report.format_row(rows[-1], COLUMNS), flush=True)
    for sparsity in sparsities:
        for mask in MASKS:
            acc = [_train(queue, data, sparsity, mask, s, epochs) for s in range(seeds)]
            rows.append(dict(mask=mask, sparsity=sparsity, accuracy_mean=float(np.mean(acc)),
                             accuracy_std=float(np.std(acc)),
                             loss_vs_dense=100 * (np.mean(acc) - np.mean(dense))))
            print(report.format_row(rows[-1], COLUMNS), flush=True)
    return rows


def step_rows(queue, sparsities, rounds: int, sizes=SIZES, batch: int = BATCH):
    """Step times, ours dense and with the search at each sparsity (eager and replayed),
    and torch dense's."""
    timers = {}
    for sparsity in [0.0] + list(sparsities):
        timers[sparsity], timers[("replayed", sparsity)] = _step_timers(queue, sizes,
                                                                        sparsity, batch)
    torch_timer = _torch_step_timer(queue, sizes, batch)
    if torch_timer is not None:
        timers["torch"] = torch_timer
    med = interleaved_medians(timers, rounds, block=10 if batch <= BATCH else 2)
    rows = []
    for sparsity in [0.0] + list(sparsities):
        row = dict(model="-".join(map(str, sizes)), N=batch,
                   mask="drs" if sparsity else "dense", sparsity=sparsity,
                   step_ms=med[sparsity], replayed_step_ms=med[("replayed", sparsity)])
        if "torch" in med:
            row.update(torch_step_ms=med["torch"],
                       step_speedup_vs_torch=med["torch"] / med[sparsity],
                       replayed_speedup_vs_torch=med["torch"] / row["replayed_step_ms"])
        rows.append(row)
    return rows


def plot(rows, path, title) -> bool:
    plt = report.pyplot()
    if plt is None:
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
    return report.save_figure(plt, fig, path, title)


def run(queue, args) -> dict:
    """The suite on ``queue``'s device: writes
    ``args.out``/dsg-training-<device>[-quick].{json,md,png}.  Without scikit-learn only
    the step times run."""
    if args.quick:
        sparsities, seeds, epochs = [0.9], 2, 5
    else:
        sparsities, seeds, epochs = list(args.sparsity or SPARSITIES), SEEDS, EPOCHS
    device = queue.device
    try:
        import torch
        torch_device = _torch_device(queue)
        baseline = (f"torch {torch.__version__} on {torch_device} (" +
                    (f"{torch.cuda.get_device_name()}, TF32 off" if torch_device == "cuda"
                     else f"{torch.get_num_threads()} threads") + ")")
    except ImportError:
        baseline = "torch not installed: no step-time baseline"
    digits = available() and not getattr(args, "steps_only", False)
    header = {**report.run_header(device),
              "model": f"MLP {'-'.join(map(str, SIZES))}, DSG on the hidden layers, SGD "
                       f"lr {LR} momentum 0.9, batch {BATCH}" +
                       (f", {epochs} epochs, {seeds} seeds; digits: 1400 train, 397 test"
                        if digits else "; step times only (--steps-only, or no "
                        "scikit-learn for the digits)"),
              "baselines": baseline,
              "timing": f"{args.rounds} interleaved rounds x (1 warm-up + 10 steps; 2 for "
                        "the compute-bound set); median"}
    print(json.dumps(header, indent=1))
    t0 = time.perf_counter()
    rows = accuracy_rows(queue, sparsities, seeds, epochs) if digits else []
    steps = step_rows(queue, sparsities, args.rounds)
    if not args.quick:
        steps += step_rows(queue, [0.9], args.rounds, *LARGE)
    header["seconds"] = round(time.perf_counter() - t0, 1)
    slug = "dsg-training-" + tuning.device_slug(device) + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{slug}.json").write_text(json.dumps({"header": header, "rows": rows,
                                                       "steps": steps}, indent=1))
    has_plot = bool(rows) and plot(rows, args.out / f"{slug}.png", header["device"])
    tables = markdown_tables(rows, steps)
    md = [f"# DSG training: {header['device']}", "",
          "\n".join(f"- {k}: {v}" for k, v in header.items()), "", tables] + \
        (["", f"![dsg training]({slug}.png)"] if has_plot else [])
    (args.out / f"{slug}.md").write_text("\n".join(md) + "\n")
    print("\n" + tables)
    print(f"\nwrote {args.out / slug}.{{json,md{',png' if has_plot else ''}}}")
    return {"header": header, "rows": rows, "steps": steps}


def markdown_tables(rows, steps) -> str:
    """The accuracy table (when there is one) and the step-time table."""
    parts = []
    if rows:
        parts.append(report.markdown_table(rows, COLUMNS, drop_absent=True))
    parts.append("Training steps (forward, search, loss, backward, update; the loss read "
                 "back), ours against torch dense:\n\n" +
                 report.markdown_table(steps, STEP_COLUMNS, drop_absent=True))
    return "\n\n".join(parts)
