"""DSG training end to end on the digits: accuracy against sparsity, per mask, and the
training step's time against torch dense, for an MLP and a CNN.

``python -m bench dsg_training [--sparsity ...] [--quick]`` (``make bench`` runs it).  The
models (pysparsecl.dsg), with softmax cross-entropy and SGD with momentum, all on the
device:

- MLP 64-512-512-10: DSG on the two hidden layers, a dense output layer.
- CNN on the 8x8 images: three 3x3 DSG conv layers (16, 32, 64 channels; ReLU and
  BatchNorm with DSG's double mask; 2x2 max pooling after the second and third), a DSG
  linear layer of 128 and a dense output layer.

- Accuracy (needs scikit-learn for the digits): for each model, sparsity and mask
  ("drs": the search; "random": a fresh random selection; "oracle": the exact top-k of
  the true pre-activation) it trains from several seeds and reports the test accuracy's
  mean and standard deviation, with the search (or the control) on at inference, beside
  dense's.  Each epoch is a fresh permutation in batches of 64 (the last partial batch
  left out); drs and dense train with replayed steps, the host-drawn controls eagerly
  (the same arithmetic: a replay is bit-identical to the eager step).
- Step times: the median wall time of a whole training step (forward, search, loss,
  backward, update; the loss read back every step, as a training loop prints it), dense
  and with the search at each sparsity, at batch 64, both eager (``train_step``) and
  replayed (a step recorded once by ``capture_step``, then replayed with each new
  batch); and the compute-bound layer set, an MLP 512-2048-2048-10 at batch 1024 and
  90%.  Against torch's dense step of the same model (the CNN with BatchNorm after
  ReLU, as DSG orders it) in the same run: on the CPU, or with CUDA (TF32 off) on a GPU
  device.

Results: bench/results/dsg-training-<device>[-quick].{json,md,png}.
"""

from __future__ import annotations

import json
import time

import numpy as np

from pysparsecl import runtime, tuning

from . import report
from .timing import WARMUP_S, interleaved_medians, wall_ms

SPARSITIES = (0.5, 0.7, 0.8, 0.9)
MASKS = ("drs", "random", "oracle")
SIZES = (64, 512, 512, 10)
#: The CNN: conv channels and hidden widths (pysparsecl.dsg.CNN on (1, 8, 8) images).
CNN_CHANNELS, CNN_HIDDEN = (16, 32, 64), (128,)
MODELS = ("mlp", "cnn")
BATCH, EPOCHS, SEEDS, LR = 64, 20, 5, 0.05

COLUMNS = [("model", "model", "{}"), ("mask", "mask", "{}"),
           ("sparsity", "sparsity", "{:.2f}"),
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
                ("replayed_speedup_vs_torch", "x torch (replayed)", "{:.2f}"),
                ("propagated_step_ms", "propagated eager ms", "{:.2f}"),
                ("propagated_replayed_step_ms", "propagated replayed ms", "{:.2f}"),
                ("propagated_speedup_vs_torch", "x torch (propagated, replayed)", "{:.2f}"),
                ("kept_ratio", "kept activations: dense / propagated", "{:.1f}")]


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


def _model(queue, kind: str, sparsity: float, mask: str, seed: int, sizes=SIZES,
           propagate: bool = False):
    from pysparsecl.dsg import CNN, MLP
    mask = mask if sparsity else "dense"
    if kind == "cnn":
        return CNN((1, 8, 8), CNN_CHANNELS, CNN_HIDDEN, 10, sparsity, mask, seed=seed,
                   queue=queue)
    return MLP(sizes, sparsity, mask, seed=seed, queue=queue, propagate=propagate)


def _inputs(kind: str, x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1, 8, 8) if kind == "cnn" else x


def _train(queue, data, kind, sparsity, mask, seed, epochs) -> float:
    import pyopencl.array as cl_array
    x_tr, y_tr, x_te, y_te = data
    x_tr, x_te = _inputs(kind, x_tr), _inputs(kind, x_te)
    model = _model(queue, kind, sparsity, mask, seed)
    rng = np.random.default_rng(seed)
    step = None
    for _ in range(epochs):
        order = rng.permutation(len(x_tr))
        for start in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[start:start + BATCH]
            x, y = x_tr[batch], y_tr[batch]
            if step is not None:
                step(x, y)
            elif model.layers[0].kind in ("drs", "dense"):   # replayable: record it once
                step = model.capture_step(cl_array.to_device(queue, x),
                                          cl_array.to_device(queue, y), lr=LR)
            else:
                model.train_step(cl_array.to_device(queue, x), cl_array.to_device(queue, y),
                                 lr=LR)
    return float((model.predict(x_te) == y_te).mean())


def _batch(shape, classes: int, batch: int):
    """Random inputs and labels: a step's time does not depend on the values."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch,) + tuple(shape), dtype=np.float32),
            rng.integers(0, classes, batch).astype(np.int32))


def _step_timers(queue, kind, sizes, sparsity: float, batch: int, propagate: bool = False):
    """Our whole training step, eager (``train_step``) and replayed (``capture_step``,
    each step copying a new batch into the recorded inputs); the loss is read back, as a
    training loop prints it.  ``propagate``: the MLP's DSG layers pass compact
    activations on."""
    import pyopencl.array as cl_array
    eager, replayed = (_model(queue, kind, sparsity, "drs", 0, sizes, propagate)
                       for _ in range(2))
    shape = (1, 8, 8) if kind == "cnn" else (sizes[0],)
    x, y = (cl_array.to_device(queue, a) for a in _batch(shape, 10 if kind == "cnn"
                                                         else sizes[-1], batch))
    step = replayed.capture_step(x.copy(), y.copy(), lr=LR)   # its own recorded inputs
    return (wall_ms(lambda: eager.train_step(x, y, lr=LR).get()),
            wall_ms(lambda: step(x, y).get()))


def _torch_device(queue) -> str:
    import torch
    gpu = runtime.device_kind(queue.device) == "gpu"
    return "cuda" if gpu and torch.cuda.is_available() else "cpu"


def _torch_model(torch, kind: str, sizes):
    """The dense torch model of ``kind`` (the CNN with DSG's CONV -> ReLU -> BN order)."""
    nn = torch.nn
    layers = []
    if kind == "cnn":
        c, hw = 1, 8
        for i, k in enumerate(CNN_CHANNELS):
            layers += [nn.Conv2d(c, k, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(k)]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
                hw //= 2
            c = k
        layers.append(nn.Flatten())
        sizes = (c * hw * hw, *CNN_HIDDEN, 10)
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _torch_step_timer(queue, kind, sizes, batch: int):
    """torch's dense step of the same model (CUDA, TF32 off, on a GPU device), or None."""
    try:
        import torch
    except ImportError:
        return None
    device = _torch_device(queue)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = _torch_model(torch, kind, sizes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    shape = (1, 8, 8) if kind == "cnn" else (sizes[0],)
    x, y = _batch(shape, 10 if kind == "cnn" else sizes[-1], batch)
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).long().to(device)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()                         # the same read-back as ours (and a sync)
    return wall_ms(step)


def accuracy_rows(queue, kind, sparsities, seeds: int, epochs: int):
    """Test accuracy per mask and sparsity, mean and spread over seeds, and dense's."""
    data = _digits()
    name = _model_name(kind)
    dense = [_train(queue, data, kind, 0.0, "dense", s, epochs) for s in range(seeds)]
    rows = [dict(model=name, mask="dense", sparsity=0.0, accuracy_mean=float(np.mean(dense)),
                 accuracy_std=float(np.std(dense)), loss_vs_dense=0.0)]
    print(report.format_row(rows[-1], COLUMNS), flush=True)
    for sparsity in sparsities:
        for mask in MASKS:
            acc = [_train(queue, data, kind, sparsity, mask, s, epochs) for s in range(seeds)]
            rows.append(dict(model=name, mask=mask, sparsity=sparsity,
                             accuracy_mean=float(np.mean(acc)),
                             accuracy_std=float(np.std(acc)),
                             loss_vs_dense=100 * (np.mean(acc) - np.mean(dense))))
            print(report.format_row(rows[-1], COLUMNS), flush=True)
    return rows


def _model_name(kind: str, sizes=SIZES) -> str:
    if kind == "cnn":
        return "CNN " + "-".join(map(str, CNN_CHANNELS + CNN_HIDDEN + (10,)))
    return "MLP " + "-".join(map(str, sizes))


def kept_bytes(queue, sizes, sparsity: float, batch: int, propagate: bool) -> int:
    """Device bytes the MLP's DSG layers keep from a training forward for the backward
    (inputs, outputs, selections; not f(x), kept with f(w) either way)."""
    import pyopencl.array as cl_array

    from pysparsecl.dsg import MLP
    model = MLP(sizes, sparsity, "drs", seed=0, queue=queue, propagate=propagate,
                keep_projection=False)
    x = cl_array.to_device(queue, _batch((sizes[0],), sizes[-1], batch)[0])
    model.forward(x, training=True)
    return sum(layer.saved_bytes() for layer in model.layers[:-1])


def step_rows(queue, kind, sparsities, rounds: int, sizes=SIZES, batch: int = BATCH):
    """Step times, ours dense and with the search at each sparsity (eager and replayed;
    for the MLP also with compact activations carried across layers), and torch
    dense's."""
    timers = {}
    for sparsity in [0.0] + list(sparsities):
        timers[sparsity], timers[("replayed", sparsity)] = _step_timers(
            queue, kind, sizes, sparsity, batch)
        if kind == "mlp" and sparsity:
            timers[("propagated", sparsity)], timers[("propagated replayed", sparsity)] = \
                _step_timers(queue, kind, sizes, sparsity, batch, propagate=True)
    torch_timer = _torch_step_timer(queue, kind, sizes, batch)
    if torch_timer is not None:
        timers["torch"] = torch_timer
    med = interleaved_medians(timers, rounds, block=10 if batch <= BATCH else 2)
    rows = []
    for sparsity in [0.0] + list(sparsities):
        row = dict(model=_model_name(kind, sizes), N=batch,
                   mask="drs" if sparsity else "dense", sparsity=sparsity,
                   step_ms=med[sparsity], replayed_step_ms=med[("replayed", sparsity)])
        if ("propagated", sparsity) in med:
            dense, compact = (kept_bytes(queue, sizes, sparsity, batch, p)
                              for p in (False, True))
            row.update(propagated_step_ms=med[("propagated", sparsity)],
                       propagated_replayed_step_ms=med[("propagated replayed", sparsity)],
                       kept_bytes=dense, propagated_kept_bytes=compact,
                       kept_ratio=dense / compact)
        if "torch" in med:
            row.update(torch_step_ms=med["torch"],
                       step_speedup_vs_torch=med["torch"] / med[sparsity],
                       replayed_speedup_vs_torch=med["torch"] / row["replayed_step_ms"])
            if "propagated_replayed_step_ms" in row:
                row["propagated_speedup_vs_torch"] = \
                    med["torch"] / row["propagated_replayed_step_ms"]
        rows.append(row)
    return rows


def plot(rows, path, title) -> bool:
    plt = report.pyplot()
    if plt is None:
        return False
    names = list(dict.fromkeys(r.get("model", _model_name("mlp")) for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6.0 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r.get("model", _model_name("mlp")) == name]
        dense = next(r for r in mine if r["mask"] == "dense")
        lo, hi = (dense["accuracy_mean"] - dense["accuracy_std"],
                  dense["accuracy_mean"] + dense["accuracy_std"])
        ax.axhspan(lo, hi, color="grey", alpha=0.3, label="dense (mean ± std)")
        for mask, marker in zip(MASKS, "osd"):
            pts = sorted((r["sparsity"], r) for r in mine if r["mask"] == mask)
            ax.errorbar([100 * s for s, _ in pts], [r["accuracy_mean"] for _, r in pts],
                        yerr=[r["accuracy_std"] for _, r in pts], marker=marker, capsize=3,
                        label=mask)
        ax.set_xlabel("sparsity of the DSG layers (%)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"DSG {name} on the digits")
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
              "model": f"{_model_name('mlp')} (DSG on the hidden layers) and "
                       f"{_model_name('cnn')} (3x3 convs with ReLU, BatchNorm and 2x2 max "
                       "pooling; DSG on every layer but the output), SGD "
                       f"lr {LR} momentum 0.9, batch {BATCH}" +
                       (f", {epochs} epochs, {seeds} seeds; digits: 1400 train, 397 test"
                        if digits else "; step times only (--steps-only, or no "
                        "scikit-learn for the digits)"),
              "baselines": baseline,
              "timing": f"{args.rounds} interleaved rounds x (warm-up of >= "
                        f"{WARMUP_S * 1e3:g} ms + 10 steps; 2 for the compute-bound set); "
                        "median"}
    print(json.dumps(header, indent=1))
    t0 = time.perf_counter()
    rows, steps = [], []
    for kind in MODELS:
        if digits:
            rows += accuracy_rows(queue, kind, sparsities, seeds, epochs)
        steps += step_rows(queue, kind, sparsities, args.rounds)
    if not args.quick:
        steps += step_rows(queue, "mlp", [0.9], args.rounds, *LARGE)
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
