"""Baselines a user would otherwise run: PyTorch (optional; skipped with a note if absent)."""

from __future__ import annotations


class Torch:
    """PyTorch baselines, on the GPU when our device is one and CUDA is there."""

    def __init__(self, want_gpu: bool):
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
        self.note = (f"torch {torch.__version__} on {self.device}"
                     + (f" ({torch.get_num_threads()} threads)" if self.device == "cpu" else
                        f" ({torch.cuda.get_device_name()}, cuDNN, TF32 off)"))

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

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
