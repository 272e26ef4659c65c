"""Problem descriptions shared by the tests and the benchmarks (one op spec, two users)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp

from .reference import conv2d_reference


@dataclass(frozen=True)
class ConvCase:
    """A ``conv2d_sparse`` problem: shapes, conv arguments and weight sparsity."""
    N: int
    C: int
    H: int
    W: int
    K: int
    kernel: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    sparsity: float = 0.9
    bias: bool = False
    empty_rows: int = 0        # output channels whose weight row is all zero
    name: Optional[str] = None

    def with_(self, **changes) -> "ConvCase":
        return replace(self, **changes)

    @property
    def output_hw(self) -> Tuple[int, int]:
        (r, s), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, \
            self.dilation
        return ((self.H + 2 * ph - dh * (r - 1) - 1) // sh + 1,
                (self.W + 2 * pw - dw * (s - 1) - 1) // sw + 1)

    def dense_flops(self) -> float:
        oh, ow = self.output_hw
        r, s = self.kernel
        return 2.0 * self.N * self.K * oh * ow * (self.C // self.groups) * r * s

    def label(self) -> str:
        if self.name:
            return self.name
        return (f"N{self.N} C{self.C} {self.H}x{self.W} K{self.K} k{self.kernel[0]}x"
                f"{self.kernel[1]} s{self.stride} p{self.padding} d{self.dilation} "
                f"g{self.groups}")

    def make_inputs(self, rng: np.random.Generator):
        """Fresh random (x, dense weight, CSR weight, bias or None), all float32."""
        x = rng.standard_normal((self.N, self.C, self.H, self.W), dtype=np.float32)
        w = rng.standard_normal((self.K, self.C // self.groups) + tuple(self.kernel),
                                dtype=np.float32)
        w[rng.random(w.shape) < self.sparsity] = 0.0
        if self.empty_rows:
            w[rng.choice(self.K, self.empty_rows, replace=False)] = 0.0
        csr = sp.csr_matrix(w.reshape(self.K, -1))
        bias = rng.standard_normal(self.K, dtype=np.float32) if self.bias else None
        return x, w, csr, bias

    def reference(self, x, w, bias) -> np.ndarray:
        return conv2d_reference(x, w, bias, self.stride, self.padding, self.dilation,
                                self.groups)

    def kwargs(self) -> dict:
        return dict(kernel_size=self.kernel, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups)


#: ResNet-50's 3x3 convolutions (pad 1) and one of its 1x1 layers, as the benchmarks use them.
RESNET50_LAYERS = (
    ConvCase(1, 64, 56, 56, 64, name="res2 3x3 64@56"),
    ConvCase(1, 128, 28, 28, 128, name="res3 3x3 128@28"),
    ConvCase(1, 256, 14, 14, 256, name="res4 3x3 256@14"),
    ConvCase(1, 512, 7, 7, 512, name="res5 3x3 512@7"),
    ConvCase(1, 1024, 14, 14, 256, kernel=(1, 1), padding=(0, 0), name="res4 1x1 1024->256@14"),
)


def row_masks(rng: np.random.Generator, m: int, n: int, n_keep: int, count: int = 1):
    """``count`` fresh bool (m, n) masks keeping exactly ``n_keep`` random entries per row,
    as ``drs_mask`` returns them (the tuner's, the benchmarks' and the sweep's masks)."""
    masks = []
    for _ in range(count):
        idx = np.argpartition(rng.random((m, n)), n_keep - 1, axis=1)[:, :n_keep]
        mask = np.zeros((m, n), bool)
        np.put_along_axis(mask, idx, True, axis=1)
        masks.append(mask)
    return masks


def compact_rows(rng: np.random.Generator, m: int, k: int, nx: int):
    """Fresh (values (m, nx) float32, idx (m, nx) int32): ``nx`` random columns of each
    row of an (m, k) batch, ascending, with normal values (a CompactRows' arrays)."""
    idx = np.sort(np.argpartition(rng.random((m, k)), max(nx - 1, 0), axis=1)[:, :nx],
                  axis=1).astype(np.int32)
    return rng.standard_normal((m, nx), dtype=np.float32), idx
