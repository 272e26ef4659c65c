"""Whole networks for the tests and the benchmark: ResNet-50 from the res2 input to the
logits, pruned, with BatchNorm folded, run through conv2d_sparse alone.

One description (:func:`resnet50_body`) drives three implementations: ours
(:class:`SparseNetwork`, prepared weights and fused epilogues), a float64 NumPy reference
(:func:`reference_forward`) and, in the benchmark, torch.  ``width`` scales every
channel count, so that the tests can run the same structure small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import scipy.sparse as sp

from .reference import conv2d_reference

__all__ = ["ConvSpec", "Bottleneck", "resnet50_body", "conv_inputs", "make_weights",
           "SparseNetwork", "reference_forward", "N_CLASSES"]

N_CLASSES = 1000


@dataclass(frozen=True)
class ConvSpec:
    """One convolution of the network (NCHW, OIHW)."""
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def macs(self, n: int, hw_in: Tuple[int, int]) -> int:
        oh = (hw_in[0] + 2 * self.padding - self.kernel) // self.stride + 1
        ow = (hw_in[1] + 2 * self.padding - self.kernel) // self.stride + 1
        return n * self.c_out * oh * ow * (self.c_in // self.groups) * self.kernel ** 2


@dataclass(frozen=True)
class Bottleneck:
    """1x1 -> 3x3 (stride here, as torchvision's ResNet-50 v1.5) -> 1x1, plus the shortcut:
    a strided 1x1 projection in the first block of a stage, else the identity."""
    conv1: ConvSpec
    conv2: ConvSpec
    conv3: ConvSpec
    proj: Optional[ConvSpec]

    def convs(self) -> List[ConvSpec]:
        return [c for c in (self.conv1, self.conv2, self.conv3, self.proj) if c is not None]


def resnet50_body(width: float = 1.0) -> List[Bottleneck]:
    """ResNet-50's 16 bottleneck blocks (res2..res5: 3, 4, 6, 3), channels times ``width``;
    the input has 64 * width channels (the stem's output)."""
    def ch(n):
        return max(1, int(round(n * width)))
    blocks, c_in = [], ch(64)
    for stage, (mid, count, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2),
                                                  (512, 3, 2)), start=2):
        mid, out = ch(mid), ch(4 * mid)
        for i in range(count):
            s = stride if i == 0 else 1
            name = f"res{stage}.{i}"
            blocks.append(Bottleneck(
                ConvSpec(f"{name}.conv1", c_in, mid, 1),
                ConvSpec(f"{name}.conv2", mid, mid, 3, s, 1),
                ConvSpec(f"{name}.conv3", mid, out, 1),
                ConvSpec(f"{name}.proj", c_in, out, 1, s) if i == 0 else None))
            c_in = out
    return blocks


def conv_inputs(blocks: List[Bottleneck], hw: Tuple[int, int]
                ) -> Tuple[List[Tuple[ConvSpec, Tuple[int, int]]], Tuple[int, int]]:
    """Each conv with the (H, W) of its input, for an input of ``hw``; and the final
    feature map's (H, W)."""
    def out_hw(spec, hw_in):
        return tuple((n + 2 * spec.padding - spec.kernel) // spec.stride + 1 for n in hw_in)
    shapes = []
    for block in blocks:
        shapes.append((block.conv1, hw))
        shapes.append((block.conv2, hw))
        mid = out_hw(block.conv2, hw)
        shapes.append((block.conv3, mid))
        if block.proj is not None:
            shapes.append((block.proj, hw))
        hw = mid
    return shapes, hw


def _prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Magnitude pruning: zero the ``sparsity`` share of the smallest |w| (random weights
    make this random unstructured sparsity)."""
    n_zero = int(round(sparsity * w.size))
    if n_zero:
        flat = w.reshape(-1)
        flat[np.argpartition(np.abs(flat), n_zero - 1)[:n_zero]] = 0.0
    return w


def make_weights(blocks: List[Bottleneck], sparsity: float, rng: np.random.Generator,
                 n_classes: int = N_CLASSES) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Fresh weights: name -> (dense float32 OIHW weight, float32 bias) for every conv, with
    inference BatchNorm folded in (each conv is followed by a BN with random statistics)
    and ``sparsity`` of each conv's weights pruned; plus "fc" (n_classes, C, 1, 1), dense.
    He-scaled, and the last BN of each block scaled down, so activations stay O(1) through
    the 16 blocks."""
    weights = {}
    for block in blocks:
        for conv in block.convs():
            fan_in = conv.c_in // conv.groups * conv.kernel ** 2
            w = rng.standard_normal((conv.c_out, conv.c_in // conv.groups, conv.kernel,
                                     conv.kernel)) * np.sqrt(2.0 / fan_in)
            w = _prune(w, sparsity)
            # With pruning, keep each conv's output scale: the survivors carry it.
            w *= 1.0 / np.sqrt(max(1.0 - sparsity, 1e-3))
            last = conv is block.conv3 or conv is block.proj
            gamma = rng.uniform(0.5, 1.0, conv.c_out) * (0.3 if last else 1.0)
            beta = rng.standard_normal(conv.c_out) * 0.1
            mean = rng.standard_normal(conv.c_out) * 0.1
            var = rng.uniform(0.8, 1.2, conv.c_out)
            scale = gamma / np.sqrt(var + 1e-5)
            weights[conv.name] = ((w * scale[:, None, None, None]).astype(np.float32),
                                  (beta - mean * scale).astype(np.float32))
    c_last = blocks[-1].conv3.c_out
    fc = rng.standard_normal((n_classes, c_last, 1, 1)) / np.sqrt(c_last)
    weights["fc"] = (fc.astype(np.float32),
                     (rng.standard_normal(n_classes) * 0.01).astype(np.float32))
    return weights


def reference_forward(blocks: List[Bottleneck], weights, x: np.ndarray) -> np.ndarray:
    """The logits (N, n_classes), in float64."""
    def conv(spec, a):
        w, b = weights[spec.name]
        return conv2d_reference(a, w, b, (spec.stride,) * 2, (spec.padding,) * 2, (1, 1),
                                spec.groups)
    a = np.asarray(x, np.float64)
    for block in blocks:
        y = np.maximum(conv(block.conv1, a), 0)
        y = np.maximum(conv(block.conv2, y), 0)
        shortcut = conv(block.proj, a) if block.proj is not None else a
        a = np.maximum(conv(block.conv3, y) + shortcut, 0)
    pooled = a.mean(axis=(2, 3))
    w, b = weights["fc"]
    return pooled @ w.reshape(w.shape[0], -1).T.astype(np.float64) + b


class SparseNetwork:
    """The network on the device through :func:`pysparsecl.conv2d_sparse` alone: weights
    prepared once (:class:`SparseConvWeight`), ReLU and the residual fused into each
    block's convolutions, global average pooling as a depthwise convolution with a
    uniform kernel, the FC layer as a 1x1 convolution.  A block is three calls (four with
    a projection).  Call it on a device array (N, C, H, W); it returns the logits as a
    device array (N, n_classes, 1, 1) without waiting for them."""

    def __init__(self, blocks: List[Bottleneck], weights, queue, pool_hw: Tuple[int, int]):
        import pyopencl.array as cl_array

        from .. import SparseConvWeight, conv2d_sparse

        self._conv2d = conv2d_sparse   # bound once: an import per call costs ~1 us
        self.blocks = blocks
        self.queue = queue
        self.prepared, self.biases = {}, {}
        for block in blocks:
            for conv in block.convs():
                w, b = weights[conv.name]
                self.prepared[conv.name] = SparseConvWeight(
                    sp.csr_matrix(w.reshape(w.shape[0], -1)), conv.c_in, conv.kernel,
                    conv.groups, queue)
                self.biases[conv.name] = cl_array.to_device(queue, b)
        c_last = blocks[-1].conv3.c_out
        r, s = pool_hw
        pool = sp.csr_matrix(np.full((c_last, r * s), 1.0 / (r * s), np.float32))
        self.pool = SparseConvWeight(pool, c_last, (r, s), groups=c_last, queue=queue)
        w, b = weights["fc"]
        self.fc = SparseConvWeight(sp.csr_matrix(w.reshape(w.shape[0], -1)), c_last, 1,
                                   queue=queue)
        self.fc_bias = cl_array.to_device(queue, b)

    def _conv(self, spec: ConvSpec, a, relu: bool, residual=None):
        return self._conv2d(a, self.prepared[spec.name], self.biases[spec.name],
                             stride=spec.stride, padding=spec.padding, groups=spec.groups,
                             activation="relu" if relu else None, residual=residual)

    def __call__(self, x_dev):
        a = x_dev
        for block in self.blocks:
            y = self._conv(block.conv1, a, True)
            y = self._conv(block.conv2, y, True)
            shortcut = self._conv(block.proj, a, False) if block.proj is not None else a
            a = self._conv(block.conv3, y, True, residual=shortcut)
        pooled = self._conv2d(a, self.pool, groups=self.pool.groups)
        return self._conv2d(pooled, self.fc, self.fc_bias)
