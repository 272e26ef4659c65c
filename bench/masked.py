"""DSG benchmark: masked VMM/GEMM, conv2d_masked and the dimension-reduction search.

``python -m bench masked [--device SPEC] [--quick]`` (or ``bench_masked(queue, args, rng)``
from another driver).  Every contender is measured in the same run, in interleaved rounds
(bench/timing.py's ``interleaved_medians``): our kernels by OpenCL profiling events,
torch by device time on CUDA and wall time on the CPU (``baselines.Torch.timer``), NumPy by
wall time; whole calls against whole calls.  The sparse baseline for output masks is
torch's SDDMM, ``torch.sparse.sampled_addmm`` (cuSPARSE on CUDA), which computes
x @ w only at the positions of the same mask held as CSR (built once per mask, untimed;
its result is checked against ours).  Each timed call of ours, and of the SDDMM, gets a
different mask (a rotating set), as DSG inference would, so the selected weight rows are
not all sitting in cache from the previous call.  The search's overhead is reported as a
fraction of the dense torch layer's time, with the projected weights reused (they change
only with the weights); projecting the weights once is reported on its own.  The
backward (``masked_matmul_backward``: dx, and dW in the weight's (N, K) rows, as a DSG
layer asks for it) is timed beside torch's dense backward, the two products dy W^T and
dy^T x.
"""

from __future__ import annotations

import time

import numpy as np
import pyopencl.array as cl_array

import pysparsecl as ps
from pysparsecl import runtime, tuning
from pysparsecl.ops.drs import keep_count
from pysparsecl.ops.masked import (
    MASKED_CONV_ROUTINE,
    MASKED_GEMM_ROUTINE,
    MASKED_VMM_ROUTINE,
    masked_matmul_shape_class,
)
from pysparsecl.testing.cases import RESNET50_LAYERS, row_masks
from pysparsecl.testing.problems import DSG_GEMM_SHAPES, DSG_VMM_SHAPES
from pysparsecl.testing.reference import (
    conv2d_masked_reference,
    masked_matmul_backward_reference,
    masked_matmul_reference,
    relative_error,
)

from . import report
from .baselines import Torch
from .timing import SETTLE_S, event_ms, interleaved_medians, wall_ms, warm_up

#: The DSG issue's sparsities (not the convolution suite's), unless --sparsity is given.
SPARSITIES = (0.5, 0.8, 0.9)
#: The DSG benchmarks' (M, K, N), declared once in the problem registry.
VMM_SHAPES, GEMM_SHAPES = DSG_VMM_SHAPES, DSG_GEMM_SHAPES
N_MASKS = 8   # distinct masks rotated over the timed calls


def _rotating(launch_with, items):
    """A launch(events) that uses the next of ``items`` on every call."""
    state = {"i": 0}

    def launch(events):
        state["i"] = (state["i"] + 1) % len(items)
        launch_with(items[state["i"]], events)
    return launch


def _drs_ms(queue, launch, reps=5):
    """Median summed event ms of ``launch(events)`` (after the machine settles, and a
    warm-up)."""
    def once():
        events = []
        launch(events)
        queue.finish()
        return sum(e.profile.end - e.profile.start for e in events) * 1e-6
    time.sleep(SETTLE_S)
    warm_up(once)
    return float(np.median([once() for _ in range(reps)]))


def backward_error(device_args, host_args) -> float:
    """The larger relative error of dx and dW (in (N, K) rows) of one backward call on
    ``device_args`` (dy, x, weight, mask), against the float64 reference on the same
    ``host_args``."""
    dx, dwt = ps.masked_matmul_backward(*device_args, dw_rows=True)
    ref_dx, ref_dw = masked_matmul_backward_reference(*host_args)
    return max(relative_error(dx.get(), ref_dx), relative_error(dwt.get(), ref_dw.T))


def bench_matmul(queue, torch_b, args, rng):
    shapes = ((VMM_SHAPES + GEMM_SHAPES[:1] + GEMM_SHAPES[2:]) if args.quick
              else VMM_SHAPES + GEMM_SHAPES)
    sparsities = (0.9,) if args.quick else tuple(args.sparsity)
    rows = []
    for m, k, n in shapes:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        dy = rng.standard_normal((m, n), dtype=np.float32)   # the backward's output gradient
        x_dev, dy_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, dy)
        weight = ps.MaskedLinearWeight(w, queue=queue)
        dense = {}
        if torch_b.torch is not None:
            t = torch_b.torch
            xt, wt = t.from_numpy(x).to(torch_b.device), t.from_numpy(w).to(torch_b.device)

            def torch_mm(xt=xt, wt=wt):
                with t.no_grad():
                    t.matmul(xt, wt)
            dense["torch"] = torch_b.timer(torch_mm)
            if torch_b.device == "cuda":   # on the CPU the same as "torch"
                dense["torch_call"] = torch_b.call_timer(torch_mm)
            gt = t.from_numpy(dy).to(torch_b.device)

            def torch_backward(xt=xt, wt=wt, gt=gt):   # dx = dy W^T, dW^T = dy^T x
                with t.no_grad():
                    t.matmul(gt, wt.T)
                    t.matmul(gt.T, xt)
            dense["torch_backward"] = torch_b.timer(torch_backward)
        if not args.no_numpy:
            dense["numpy"] = wall_ms(lambda x=x, w=w: x @ w)
        proj = ps.SparseRandomProjection(k, seed=1, queue=queue)
        t0 = time.perf_counter()
        pw_events = []
        pw = proj.project_weight(weight, events=pw_events)
        queue.finish()
        pw_wall = 1e3 * (time.perf_counter() - t0)
        pw_ms = sum(e.profile.end - e.profile.start for e in pw_events) * 1e-6
        for sparsity in sparsities:
            n_keep = keep_count(sparsity, n)
            host_masks = row_masks(rng, m, n, n_keep, N_MASKS)
            masks = [cl_array.to_device(queue, mk) for mk in host_masks]
            y = ps.masked_matmul(x_dev, weight, masks[0]).get()
            err = relative_error(y, masked_matmul_reference(x, w, host_masks[0])) \
                if args.check else None
            # The CSR masks are built here, untimed; the SDDMM's result is checked once.
            sddmm, sddmm_diff = torch_b.checked(
                "sampled_addmm", f"{m}x{k}x{n} {sparsity:.2f}",
                lambda: torch_b.sddmm_fn(x, w, torch_b.csr_masks(host_masks)),
                lambda run: run(0).to_dense().cpu().numpy(), y)
            ours = _rotating(lambda mk, ev: ps.masked_matmul(x_dev, weight, mk, events=ev),
                             masks)
            call_state = {"i": 0}

            def call():
                call_state["i"] = (call_state["i"] + 1) % N_MASKS
                ps.masked_matmul(x_dev, weight, masks[call_state["i"]])
                queue.finish()
            host_state = {"i": 0}

            def host_call():   # NumPy x and masks, the prepared weight: the result to NumPy
                host_state["i"] = (host_state["i"] + 1) % N_MASKS
                ps.masked_matmul(x, weight, host_masks[host_state["i"]], queue=queue)
            # The backward as a DSG layer calls it: dW in the weight's (N, K) rows.
            backward = _rotating(lambda mk, ev: ps.masked_matmul_backward(
                dy_dev, x_dev, weight, mk, dw_rows=True, events=ev), masks)
            backward_err = backward_error((dy_dev, x_dev, weight, masks[0]),
                                          (dy, x, w, host_masks[0])) if args.check else None
            timers = {"ours": event_ms(ours, queue), "call": wall_ms(call),
                      "host_call": wall_ms(host_call), "backward": event_ms(backward, queue),
                      **dense}
            if sddmm is not None:
                timers["sddmm"] = torch_b.timer(sddmm)
            med = interleaved_medians(timers, args.rounds, slow=("numpy",))
            drs = _drs_ms(queue, lambda ev: ps.drs_mask(x_dev, None, sparsity, projection=pw,
                                                        events=ev))
            torch_ms, sddmm_ms = med.get("torch"), med.get("sddmm")
            torch_call_ms = med.get("torch_call")   # measured apart on CUDA only
            op = "masked_vmm" if m == 1 else "masked_gemm"
            shape_class = masked_matmul_shape_class(m, k, n)
            # The family the op's routine chose here, and its tiles.
            routine = MASKED_VMM_ROUTINE if m == 1 else MASKED_GEMM_ROUTINE
            spec = routine.variant(tuning.lookup(routine.spec, queue.device, shape_class),
                                   "KERNEL")
            rows.append(dict(
                family=spec.family, shape_class=shape_class,
                params=tuning.lookup(spec, queue.device, shape_class),
                op=op, shape=f"{m}x{k}x{n}", M=m, K=k,
                N=n, sparsity=sparsity, n_keep=n_keep, ours_kernel_ms=med["ours"],
                ours_call_ms=med["call"], host_call_ms=med["host_call"],
                prepared_over_host=med["call"] / med["host_call"], torch_dense_ms=torch_ms,
                numpy_dense_ms=med.get("numpy"), sddmm_ms=sddmm_ms,
                speedup_vs_torch=torch_ms / med["ours"] if torch_ms else None,
                **({"torch_call_ms": torch_call_ms} if torch_call_ms else {}),
                call_speedup_vs_torch=((torch_call_ms or torch_ms) / med["call"]) if torch_ms
                else None,
                speedup_vs_numpy=med["numpy"] / med["ours"] if "numpy" in med else None,
                speedup_vs_sddmm=sddmm_ms / med["ours"] if sddmm_ms else None,
                sddmm_rel_diff=sddmm_diff,
                gflops=2.0 * m * k * n_keep / med["ours"] / 1e6,
                drs_ms=drs, drs_overhead=drs / torch_ms if torch_ms else None,
                layer_speedup=torch_ms / (drs + med["ours"]) if torch_ms else None,
                drs_k=proj.k, weight_projection_ms=pw_ms, weight_projection_call_ms=pw_wall,
                backward_ms=med["backward"], torch_backward_ms=med.get("torch_backward"),
                backward_speedup_vs_torch=(med["torch_backward"] / med["backward"]
                                           if "torch_backward" in med else None),
                backward_rel_error=backward_err, rel_error=err))
            print(report.format_row(rows[-1], COLUMNS), flush=True)
    return rows


#: Sparsities of x and of the outputs in the propagated grid (the issue's 50/80/90/95%).
PROPAGATED_SPARSITIES = (0.5, 0.8, 0.9, 0.95)

PROPAGATED_NOTE = (
    "A compact x (`CompactRows`: each row's nonzero values and their columns, as the "
    "previous DSG layer leaves them) against the same x in dense form, under the same "
    "output masks (int32 index masks, as a layer after a compact one gets them): "
    "`propagated` sums over the row's nonzero inputs only, each a gather from the "
    "selected weight row; `output-only` is the masked product of the dense x. Both by "
    "profiling events, each call with the next of 8 rotating (x, mask) pairs; torch is "
    "the dense layer. Random selections on both sides: the gathers cannot use whole "
    "vectors, so the gain is not proportional to the work skipped (docs/ops.md). The "
    "search on each form of x (k from eps 0.5, f(w) reused): the projection f(x) alone, "
    "and the whole search, by profiling events.")


def bench_propagated(queue, torch_b, args, rng):
    """The masked product of a compact x against the dense-input one: input sparsity x
    output sparsity, per shape (DSG_COMPACT_SHAPES)."""
    from pysparsecl.ops.masked import MASKED_COMPACT_ROUTINE
    from pysparsecl.testing.cases import compact_rows
    from pysparsecl.testing.problems import DSG_COMPACT_SHAPES
    if args.quick:
        shapes, grid = DSG_COMPACT_SHAPES[:2], ((0.9, 0.9),)
    else:
        shapes = DSG_COMPACT_SHAPES
        grid = tuple((a, b) for a in PROPAGATED_SPARSITIES for b in PROPAGATED_SPARSITIES)
    rows = []
    for m, k, n in shapes:
        w = rng.standard_normal((k, n), dtype=np.float32)
        weight = ps.MaskedLinearWeight(w, queue=queue)
        dense = {}
        if torch_b.torch is not None:
            t = torch_b.torch
            xt = t.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(torch_b.device)
            wt = t.from_numpy(w).to(torch_b.device)

            def torch_mm(xt=xt, wt=wt):
                with t.no_grad():
                    t.matmul(xt, wt)
            dense["torch"] = torch_b.timer(torch_mm)
        shape_class = masked_matmul_shape_class(m, k, n)
        proj = ps.SparseRandomProjection(k, seed=1, queue=queue)
        pw = proj.project_weight(weight)   # f(w), reused: it changes only with w
        for x_sparsity, sparsity in grid:
            nx, n_keep = keep_count(x_sparsity, k), keep_count(sparsity, n)
            pairs = []
            for _ in range(N_MASKS):
                values, idx = compact_rows(rng, m, k, nx)
                sel = np.sort(np.argpartition(rng.random((m, n)), n_keep - 1, axis=1)
                              [:, :n_keep], axis=1).astype(np.int32)
                x = ps.CompactRows(cl_array.to_device(queue, values),
                                   cl_array.to_device(queue, idx), k, check=False)
                pairs.append((x, x.to_dense(), cl_array.to_device(queue, sel)))
            x0, x0_dense, sel0 = pairs[0]
            y = ps.masked_matmul(x0, weight, sel0).get()
            err = relative_error(y, masked_matmul_reference(
                x0_dense.get(), w, sel0.get())) if args.check else None
            timers = {
                "propagated": event_ms(_rotating(
                    lambda p, ev: ps.masked_matmul(p[0], weight, p[2], events=ev), pairs),
                    queue),
                "output_only": event_ms(_rotating(
                    lambda p, ev: ps.masked_matmul(p[1], weight, p[2], events=ev), pairs),
                    queue),
                **dense}
            med = interleaved_medians(timers, args.rounds)
            # The search on each form of x: the projection alone, and the whole search.
            search = {form: _drs_ms(queue, _rotating(
                lambda p, ev, i=i: ps.drs_mask(p[i], None, sparsity, projection=pw,
                                               compact=True, events=ev), pairs))
                for form, i in (("compact", 0), ("dense", 1))}
            project = {form: _drs_ms(queue, _rotating(
                lambda p, ev, i=i: proj.project_rows(p[i], events=ev), pairs))
                for form, i in (("compact", 0), ("dense", 1))}
            torch_ms = med.get("torch")
            # The family the op's routine chose here, and its tiles.
            routine = tuning.lookup(MASKED_COMPACT_ROUTINE.spec, queue.device, shape_class)
            spec = MASKED_COMPACT_ROUTINE.variant(routine, "KERNEL")
            rows.append(dict(
                op="propagated", family=spec.family, shape_class=shape_class,
                params=tuning.lookup(spec, queue.device, shape_class),
                gather_max_density=routine["GATHER_MAX_DENSITY"],
                shape=f"{m}x{k}x{n}", M=m, K=k, N=n, x_sparsity=x_sparsity,
                sparsity=sparsity, nx=nx, n_keep=n_keep,
                propagated_ms=med["propagated"], output_only_ms=med["output_only"],
                torch_dense_ms=torch_ms,
                speedup_vs_output_only=med["output_only"] / med["propagated"],
                speedup_vs_torch=torch_ms / med["propagated"] if torch_ms else None,
                output_only_vs_torch=torch_ms / med["output_only"] if torch_ms else None,
                projection_ms=project["compact"], projection_dense_ms=project["dense"],
                projection_speedup=project["dense"] / project["compact"],
                search_ms=search["compact"], search_dense_ms=search["dense"],
                search_speedup=search["dense"] / search["compact"], drs_k=proj.k,
                rel_error=err))
            print(report.format_row(rows[-1], PROPAGATED_COLUMNS), flush=True)
    return rows


def bench_conv(queue, torch_b, args, rng):
    layers = RESNET50_LAYERS[1:2] if args.quick else RESNET50_LAYERS[:4]
    batches = (1,) if args.quick else tuple(int(b) for b in np.atleast_1d(args.conv_batch))
    sparsities = (0.9,) if args.quick else tuple(args.sparsity)
    rows = []
    for batch, layer in ((b, layer) for b in batches for layer in layers):
        case = layer.with_(N=batch, sparsity=0.0)
        x, w, _, _ = case.make_inputs(rng)
        oh, ow = case.output_hw
        x_dev, w_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, w)
        kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation)
        dense = {}
        if torch_b.torch is not None:
            dense["torch"] = torch_b.timer(torch_b.conv2d_fn(case, x, w))
        d = case.C * case.kernel[0] * case.kernel[1]
        proj = ps.SparseRandomProjection(d, seed=2, queue=queue)
        pw = proj.project_weight(ps.MaskedLinearWeight(w.reshape(case.K, d), transposed=True,
                                                       queue=queue))
        for sparsity in sparsities:
            out_shape = (batch, case.K, oh, ow)
            window = [cl_array.to_device(queue, rng.random(out_shape) >= sparsity)
                      for _ in range(N_MASKS)]
            channel = [cl_array.to_device(queue, rng.random(out_shape[:2] + (1, 1)) >= sparsity)
                       for _ in range(N_MASKS)]
            err = None
            if args.check:
                y = ps.conv2d_masked(x_dev, w_dev, window[0], **kw).get()
                err = relative_error(y, conv2d_masked_reference(
                    x, w, window[0].get(), case.stride, case.padding, case.dilation))
            timers = {
                "window": event_ms(_rotating(lambda mk, ev: ps.conv2d_masked(
                    x_dev, w_dev, mk, events=ev, **kw), window), queue),
                "channel": event_ms(_rotating(lambda mk, ev: ps.conv2d_masked(
                    x_dev, w_dev, mk, events=ev, **kw), channel), queue),
                **dense}
            med = interleaved_medians(timers, args.rounds)
            drs = _drs_ms(queue, lambda ev: ps.drs_mask_conv2d(
                x_dev, w, sparsity, projection=pw, events=ev, **kw))
            torch_ms = med.get("torch")
            shape_class = masked_matmul_shape_class(batch * oh * ow, d, case.K)
            routine = tuning.lookup(MASKED_CONV_ROUTINE.spec, queue.device, shape_class)
            spec = MASKED_CONV_ROUTINE.variant(routine, "KERNEL")
            rows.append(dict(
                family=spec.family, shape_class=shape_class,
                params=tuning.lookup(spec, queue.device, shape_class),
                op="conv2d_masked", shape=f"{layer.label()} N{batch}", M=batch * oh * ow, K=d,
                N=case.K, sparsity=sparsity, ours_kernel_ms=med["window"],
                ours_channel_ms=med["channel"], torch_dense_ms=torch_ms,
                speedup_vs_torch=torch_ms / med["window"] if torch_ms else None,
                channel_speedup_vs_torch=torch_ms / med["channel"] if torch_ms else None,
                drs_ms=drs, drs_overhead=drs / torch_ms if torch_ms else None, drs_k=proj.k,
                layer_speedup=torch_ms / (drs + med["window"]) if torch_ms else None,
                rel_error=err))
            print(report.format_row(rows[-1], COLUMNS), flush=True)
    return rows


def bench_masked(queue, args, rng, torch_b=None) -> list:
    """Every DSG benchmark row (dicts) for ``queue``'s device; see the module docstring.

    ``args`` needs: quick, sparsity, rounds, check, no_numpy, conv_batch (defaults are
    filled in for a driver that lacks them).  ``torch_b``: the driver's
    :class:`baselines.Torch`, whose ``notes`` then tell which baselines were skipped."""
    defaults = dict(quick=False, sparsity=list(SPARSITIES), rounds=3, check=True,
                    no_numpy=False, conv_batch=(8,), no_conv=False, no_matmul=False)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if torch_b is None:
        torch_b = Torch(want_gpu=runtime.device_kind(queue.device) == "gpu")
    rows = []
    if not args.no_matmul:
        rows += bench_matmul(queue, torch_b, args, rng)
        rows += bench_propagated(queue, torch_b, args, rng)
    if not args.no_conv:
        rows += bench_conv(queue, torch_b, args, rng)
    return rows


COLUMNS = [("op", "op", "{}"), ("shape", "shape", "{}"), ("sparsity", "sparsity", "{:.2f}"),
           ("ours_kernel_ms", "ours ms", "{:.3f}"), ("ours_call_ms", "call ms", "{:.3f}"),
           ("host_call_ms", "NumPy call ms", "{:.3f}"),
           ("prepared_over_host", "call / NumPy call", "{:.2f}"),
           ("ours_channel_ms", "channel-mask ms", "{:.3f}"),
           ("torch_dense_ms", "torch dense ms", "{:.3f}"),
           ("torch_call_ms", "torch call ms", "{:.3f}"),
           ("numpy_dense_ms", "numpy dense ms", "{:.3f}"),
           ("sddmm_ms", "sddmm ms", "{:.3f}"),
           ("speedup_vs_torch", "x torch", "{:.2f}"),
           ("channel_speedup_vs_torch", "x torch (channel mask)", "{:.2f}"),
           ("speedup_vs_numpy", "x numpy", "{:.2f}"),
           ("speedup_vs_sddmm", "x sddmm", "{:.2f}"),
           ("drs_ms", "DRS ms", "{:.3f}"), ("drs_overhead", "DRS / dense", "{:.1%}"),
           ("layer_speedup", "DSG layer x torch", "{:.2f}"),
           ("drs_k", "k", "{}"), ("weight_projection_ms", "f(w) once ms", "{:.2f}"),
           ("backward_ms", "backward ms", "{:.3f}"),
           ("torch_backward_ms", "torch backward ms", "{:.3f}"),
           ("backward_speedup_vs_torch", "x torch (backward)", "{:.2f}"),
           ("rel_error", "rel err", "{:.1e}"),
           ("backward_rel_error", "backward rel err", "{:.1e}")]


PROPAGATED_COLUMNS = [
    ("shape", "shape", "{}"), ("x_sparsity", "x sparsity", "{:.2f}"),
    ("sparsity", "output sparsity", "{:.2f}"), ("propagated_ms", "propagated ms", "{:.3f}"),
    ("output_only_ms", "output-only ms", "{:.3f}"),
    ("torch_dense_ms", "torch dense ms", "{:.3f}"),
    ("speedup_vs_output_only", "x output-only", "{:.2f}"),
    ("speedup_vs_torch", "x torch", "{:.2f}"),
    ("output_only_vs_torch", "output-only x torch", "{:.2f}"),
    ("projection_ms", "f(x) ms", "{:.3f}"), ("projection_dense_ms", "f(x) dense ms", "{:.3f}"),
    ("projection_speedup", "f(x): x dense", "{:.2f}"),
    ("search_ms", "search ms", "{:.3f}"), ("search_dense_ms", "search dense ms", "{:.3f}"),
    ("search_speedup", "search: x dense", "{:.2f}"),
    ("rel_error", "rel err", "{:.1e}")]


def markdown_table(rows, drop_absent: bool = True):
    """The DSG rows but the propagated grid's; ``drop_absent``: leave out columns that no
    row has (results from before the field)."""
    return report.markdown_table([r for r in rows if r.get("op") != "propagated"], COLUMNS,
                                 drop_absent=drop_absent)


def propagated_table(rows) -> str:
    """The propagated grid's rows (markdown), or "" when there are none."""
    grid = [r for r in rows if r.get("op") == "propagated"]
    return report.markdown_table(grid, PROPAGATED_COLUMNS) if grid else ""
