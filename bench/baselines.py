"""Baselines a user would otherwise run: PyTorch (optional; skipped with a note if absent).

Dense: ``conv2d`` and ``matmul``.  Sparse (CSR): the pruned conv weight times
``unfold(x)`` (``torch.sparse.mm``: cuSPARSE SpMM on CUDA, MKL or native on the CPU) and,
for DSG's output masks, ``torch.sparse.sampled_addmm`` (SDDMM: only the outputs at the
mask's CSR positions).  A sparse baseline that this torch build or device does not offer
is skipped, and the reason lands in :attr:`Torch.notes` (the results header), never a crash.

Timing (:meth:`Torch.timer`): our kernels are timed by OpenCL profiling events, which hold
device time only, so torch on CUDA is timed by device time too -- a CUDA graph of
back-to-back calls replayed between two CUDA events, per call -- never by the host's wall
clock around a launch and a synchronize, which adds the launch latency (tens of
microseconds, as much as a small kernel) to torch's side alone.  On the CPU, where torch
blocks, the wall time of a call is its time.  Whole calls are compared with whole calls
(:meth:`Torch.call_timer`).
"""

from __future__ import annotations

import warnings

import numpy as np

from .timing import wall_ms

#: A baseline whose result differs from ours by more than this is not reported.
MATCH_TOL = 1e-3
#: Back-to-back calls per CUDA-graph replay in :meth:`Torch.timer`.
GRAPH_CALLS = 10


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def _rel_diff(result, ours) -> float:
    result, ours = np.asarray(result, np.float64), np.asarray(ours, np.float64)
    denom = np.linalg.norm(ours)
    diff = np.linalg.norm(result - ours)
    return float(diff / denom) if denom else float(diff)


class Torch:
    """PyTorch baselines, on the GPU when our device is one and CUDA is there."""

    def __init__(self, want_gpu: bool):
        self.skipped = {}   # baseline name -> {"reason": first reason, "cases": [labels]}
        try:
            import torch
        except ImportError:
            self.torch = None
            self.note = "torch not installed: torch baselines skipped (make bench-deps)"
            return
        self.torch = torch
        self.device = "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        # "Sparse CSR tensor support is in beta state": once per process, not our business.
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support",
                                category=UserWarning)
        self.note = (f"torch {torch.__version__} on {self.device}"
                     + (f" ({torch.get_num_threads()} threads)" if self.device == "cpu" else
                        f" ({torch.cuda.get_device_name()}, cuDNN, TF32 off)")
                     + "; torch CSR: sparse.mm (conv2d), sparse.sampled_addmm (masked)")

    @property
    def notes(self) -> str:
        """The header's baselines line: what ran, then what was skipped and why."""
        def cases(names):
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            return ", ".join(names[:3]) + more
        return "; ".join([self.note] + [f"{name} skipped for {cases(s['cases'])} ({s['reason']})"
                                        for name, s in self.skipped.items()])

    def skip(self, name: str, case: str, reason: str) -> None:
        entry = self.skipped.setdefault(name, {"reason": reason, "cases": []})
        entry["cases"].append(case)
        print(f"  [{name} skipped for {case}: {reason}]", flush=True)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    @property
    def timing_note(self) -> str:
        return ("torch by CUDA-graph replays between CUDA events (device time per call)"
                if self.device == "cuda" else "torch by wall time")

    def timer(self, enqueue, calls: int = GRAPH_CALLS):
        """A timer (no arguments, returns ms) of ``enqueue()``, which queues one torch call
        and does not wait for it.  On CUDA: ``calls`` back-to-back calls captured once in a
        CUDA graph, each sample one replay between CUDA events, divided by ``calls``
        (device time; the graph also keeps host launch gaps out).  Where capture fails
        (an op torch cannot capture), the same calls are queued directly between the
        events instead.  On the CPU: the wall time of one call."""
        if self.device != "cuda":
            return wall_ms(enqueue)
        cuda = self.torch.cuda
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        side = cuda.Stream()
        side.wait_stream(cuda.current_stream())
        with cuda.stream(side):      # capture wants its warm-up on a side stream
            for _ in range(3):
                enqueue()
        cuda.current_stream().wait_stream(side)
        self.sync()
        graph = cuda.CUDAGraph()
        try:
            with cuda.graph(graph):
                for _ in range(calls):
                    enqueue()
            replay = graph.replay
        except Exception:            # e.g. cuSPARSE's workspace: queue the calls directly
            self.sync()

            def replay():
                for _ in range(calls):
                    enqueue()

        def timed():
            start.record()
            replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        return timed

    def call_timer(self, enqueue):
        """A timer of one whole blocking call: ``enqueue()``, then wait (wall time)."""
        return wall_ms(lambda: (enqueue(), self.sync()))

    def checked(self, name: str, case: str, make, result_of, ours):
        """``make()`` builds a ``run()`` that queues one call and returns its result; compare
        ``result_of(run)`` (one call, as a NumPy array in the layout of ``ours``) with ours.
        Returns ``(run, rel_diff)``, or ``(None, None)`` with a note when torch lacks the
        op, the device refuses it or its result does not match ours."""
        if self.torch is None:
            return None, None
        try:
            run = make()
            diff = _rel_diff(result_of(run), ours)
        except Exception as exc:   # unsupported op, layout or device: a note, not a crash
            self.skip(name, case, _first_line(exc))
            return None, None
        if not diff < MATCH_TOL:
            self.skip(name, case, f"result differs from ours: rel. diff {diff:.1e}")
            return None, None
        return run, diff

    def conv2d_fn(self, case, x, w):
        """``run()`` queues torch's dense conv2d on ``case`` (inputs moved once)."""
        t = self.torch
        xt = t.from_numpy(x).to(self.device)
        wt = t.from_numpy(w).to(self.device)

        def run():
            with t.no_grad():
                t.nn.functional.conv2d(xt, wt, None, case.stride, case.padding,
                                       case.dilation, case.groups)
        return run

    def csr_conv2d_fn(self, case, x, csr):
        """``run()`` queues torch CSR weight (K, C*R*S) @ unfold(x), the unfold
        included in the time (as SciPy's im2col is); returns (K, N, OH, OW) like the SciPy
        baseline.  Inputs are moved to the device once, outside the timed call."""
        t = self.torch
        if case.groups != 1:
            raise NotImplementedError("grouped convolution has no single CSR @ im2col")
        wt = t.sparse_csr_tensor(t.from_numpy(csr.indptr.astype(np.int64)),
                                 t.from_numpy(csr.indices.astype(np.int64)),
                                 t.from_numpy(csr.data.astype(np.float32)),
                                 size=csr.shape, device=self.device, check_invariants=True)
        xt = t.from_numpy(x).to(self.device)
        n, crs = x.shape[0], csr.shape[1]
        out_shape = (csr.shape[0], n) + tuple(case.output_hw)

        def run():
            with t.no_grad():
                cols = t.nn.functional.unfold(xt, case.kernel, case.dilation, case.padding,
                                              case.stride)        # (N, C*R*S, OH*OW)
                cols = cols[0] if n == 1 else cols.transpose(0, 1).reshape(crs, -1)
                y = t.sparse.mm(wt, cols).reshape(out_shape)
            return y
        return run

    def csr_masks(self, masks):
        """Each bool (M, N) mask as a float32 CSR tensor on the device (built once)."""
        t = self.torch
        return [t.from_numpy(np.ascontiguousarray(m)).to(self.device, t.float32)
                .to_sparse_csr() for m in masks]

    def sddmm_fn(self, x, w, csr_masks):
        """``run()`` queues ``sampled_addmm(mask, x, w, beta=0)``: x @ w only at the
        CSR mask's positions.  Each call takes the next of ``csr_masks`` (rotating, as our
        timed calls do); ``run(0)`` uses the first."""
        t = self.torch
        xt, wt = t.from_numpy(x).to(self.device), t.from_numpy(w).to(self.device)
        state = {"i": 0}

        def run(i=None):
            if i is None:
                state["i"] = (state["i"] + 1) % len(csr_masks)
                i = state["i"]
            with t.no_grad():
                y = t.sparse.sampled_addmm(csr_masks[i], xt, wt, beta=0.0)
            return y
        return run
