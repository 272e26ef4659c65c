"""Baselines a user would otherwise run: PyTorch (optional; skipped with a note if absent).

Dense: ``conv2d`` and ``matmul``.  Sparse (CSR): the pruned conv weight times
``unfold(x)`` (``torch.sparse.mm``: cuSPARSE SpMM on CUDA, MKL or native on the CPU) and,
for DSG's output masks, ``torch.sparse.sampled_addmm`` (SDDMM: only the outputs at the
mask's CSR positions).  A sparse baseline that this torch build or device does not offer
is skipped, and the reason lands in :attr:`Torch.notes` (the results header), never a crash.
"""

from __future__ import annotations

import warnings

import numpy as np

#: A baseline whose result differs from ours by more than this is not reported.
MATCH_TOL = 1e-3


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

    def checked(self, name: str, case: str, make, result_of, ours):
        """``make()`` builds a blocking ``run()`` that returns its result; compare
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
        """A blocking call of torch's dense conv2d on ``case`` (inputs moved once)."""
        t = self.torch
        xt = t.from_numpy(x).to(self.device)
        wt = t.from_numpy(w).to(self.device)

        def run():
            with t.no_grad():
                t.nn.functional.conv2d(xt, wt, None, case.stride, case.padding,
                                       case.dilation, case.groups)
            self.sync()
        return run

    def csr_conv2d_fn(self, case, x, csr):
        """A blocking ``run()`` of torch CSR weight (K, C*R*S) @ unfold(x), the unfold
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
            self.sync()
            return y
        return run

    def csr_masks(self, masks):
        """Each bool (M, N) mask as a float32 CSR tensor on the device (built once)."""
        t = self.torch
        return [t.from_numpy(np.ascontiguousarray(m)).to(self.device, t.float32)
                .to_sparse_csr() for m in masks]

    def sddmm_fn(self, x, w, csr_masks):
        """A blocking ``run()`` of ``sampled_addmm(mask, x, w, beta=0)``: x @ w only at the
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
            self.sync()
            return y
        return run
