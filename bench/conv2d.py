"""conv2d_sparse on ResNet-50 layers (``python -m bench conv2d``).

Times our kernels against what a user would otherwise run, in the same process:
PyTorch dense conv2d (oneDNN on CPU, cuDNN on NVIDIA; TF32 off), PyTorch CSR weight x
unfold (torch.sparse.mm: MKL/native on CPU, cuSPARSE on NVIDIA) and SciPy CSR x im2col.
Kernel time comes from OpenCL profiling events, whole calls from time.perf_counter;
every figure is the median of repeated runs after a warm-up.  The rows go into the
per-layer results file, bench/results/<device>.{json,md,png} (see bench/__main__.py).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import pysparsecl as ps
from pysparsecl import runtime, tuning
from pysparsecl.ops.conv2d import CONV2D_CSR, conv2d_shape_class
from pysparsecl.testing.cases import RESNET50_LAYERS
from pysparsecl.testing.reference import relative_error

from . import report
from .timing import event_ms, interleaved_medians, wall_ms

#: Defaults of the options this suite takes (the driver's are None: "the suite's own").
BATCHES = (1, 8)
SPARSITIES = (0.0, 0.7, 0.9, 0.95, 0.98)


def im2col(x, case):
    """(C*R*S, N*OH*OW) patches, ordered (c, r, s) x (n, oh, ow), as SciPy's operand."""
    (r, s), (sh, sw), (ph, pw), (dh, dw) = case.kernel, case.stride, case.padding, case.dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, ((r - 1) * dh + 1, (s - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]                  # N, C, OH, OW, R, S
    return np.ascontiguousarray(win.transpose(1, 4, 5, 0, 2, 3)).reshape(
        case.C * r * s, -1)


def bench_conv2d(queue, torch_b, args, rng):
    batches = (1,) if args.quick else tuple(args.batch or BATCHES)
    sparsities = (0.9,) if args.quick else tuple(args.sparsity or SPARSITIES)
    layers = RESNET50_LAYERS[:2] if args.quick else RESNET50_LAYERS
    rows = []
    for layer in layers:
        for n in batches:
            dense_case = layer.with_(N=n, sparsity=0.0)
            x, w_dense, _, _ = dense_case.make_inputs(rng)
            torch_fn = (torch_b.conv2d_fn(dense_case, x, w_dense)
                        if torch_b.torch is not None else None)
            # From the memory pool, as a network's activations come (its slack lets a 1x1
            # layer read the input in place), as the tuner times it.
            x_dev = runtime.empty(queue, x.shape, np.float32,
                                  allocator=runtime.memory_pool(queue.context))
            x_dev.set(x)
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
                    # One event only: the convolution read x in place, with no packing.
                    pack_ms.append((events[0].profile.end - events[0].profile.start) * 1e-6
                                   if len(events) == 2 else 0.0)
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
    plt = report.pyplot()
    if plt is None:
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
    return report.save_figure(plt, fig, path, title)


CONV2D_NOTE = (
    "'ours ms' is kernel time (OpenCL profiling events: input packing + convolution; no "
    "packing where a 1x1 layer reads its input in place, x being a device array from the "
    "memory pool as a network's activations are); "
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
