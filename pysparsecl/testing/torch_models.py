"""PyTorch models for the TVM tests and benchmark: ResNet-50 as torchvision builds it
(stem, 16 bottleneck blocks, pooling, FC; Conv2d without bias + BatchNorm2d), and a small
residual CNN that compiles and runs in seconds.  Importing this module imports torch.

Weights are random (nothing can be downloaded): He-scaled convolutions pruned by
magnitude to a given sparsity, BatchNorms with random inference statistics, and the last
BatchNorm of every residual branch scaled down so that activations stay O(1).
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

from .networks import Bottleneck, resnet50_body

__all__ = ["ResNet50", "SmallResidualCNN", "randomise", "prune", "prunable"]


class _Block(nn.Module):
    def __init__(self, spec: Bottleneck):
        super().__init__()
        c1, c2, c3 = spec.conv1, spec.conv2, spec.conv3
        self.conv1 = nn.Conv2d(c1.c_in, c1.c_out, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1.c_out)
        self.conv2 = nn.Conv2d(c2.c_in, c2.c_out, 3, c2.stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2.c_out)
        self.conv3 = nn.Conv2d(c3.c_in, c3.c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3.c_out)
        self.bn3.is_last = True
        self.proj = None
        if spec.proj is not None:
            p = spec.proj
            self.proj = nn.Sequential(nn.Conv2d(p.c_in, p.c_out, 1, p.stride, bias=False),
                                      nn.BatchNorm2d(p.c_out))
            self.proj[1].is_last = True

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (self.proj(x) if self.proj is not None else x))


class ResNet50(nn.Module):
    """torchvision's ``resnet50`` architecture (v1.5: the stride in the 3x3 convs), its
    channel counts times ``width``."""

    def __init__(self, width: float = 1.0, n_classes: int = 1000):
        super().__init__()
        blocks = resnet50_body(width)
        c0 = blocks[0].conv1.c_in
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 7, 2, 3, bias=False), nn.BatchNorm2d(c0),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.blocks = nn.Sequential(*(_Block(b) for b in blocks))
        self.fc = nn.Linear(blocks[-1].conv3.c_out, n_classes)

    def forward(self, x):
        y = self.blocks(self.stem(x))
        return self.fc(torch.flatten(torch.mean(y, dim=(2, 3)), 1))


class SmallResidualCNN(nn.Module):
    """A residual CNN that covers what the TVM offload rewrites and what it leaves alone:
    convolutions with and without bias, BatchNorm, ReLU, a residual add, a strided and a
    grouped convolution, a dilated one, an odd input size and a dense (unpruned) conv."""

    def __init__(self, channels: int = 8, n_classes: int = 5):
        super().__init__()
        c = channels
        self.stem = nn.Conv2d(3, c, 3, padding=1)                       # bias, then ReLU
        self.conv_a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(c)
        self.conv_b = nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False)
        self.bn_b = nn.BatchNorm2d(c)                                   # + residual, ReLU
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, groups=2)  # no ReLU
        self.dense = nn.Conv2d(2 * c, 2 * c, 1)                         # left dense
        self.fc = nn.Linear(2 * c, n_classes)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        z = torch.relu(self.bn_a(self.conv_a(y)))
        y = torch.relu(self.bn_b(self.conv_b(z)) + y)
        y = self.dense(self.down(y))
        return self.fc(torch.mean(y, dim=(2, 3)))


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Fresh He-scaled weights and random BatchNorm statistics; returns the model in eval
    mode.  BatchNorms marked ``is_last`` (a residual branch's end) are scaled by 0.3."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) *
                               np.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                scale = 0.3 if getattr(m, "is_last", False) else 1.0
                m.weight.copy_((0.5 + 0.5 * torch.rand(n, generator=gen)) * scale)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) /
                               np.sqrt(m.in_features))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.01)
    return model.eval()


def prunable(model: nn.Module) -> List[nn.Module]:
    """The layers that :func:`prune` prunes: every Conv2d and Linear, except a
    :class:`SmallResidualCNN`'s ``dense`` conv."""
    skip = {id(model.dense)} if isinstance(model, SmallResidualCNN) else set()
    return [m for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in skip]


def prune(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the ``sparsity`` share of the smallest-magnitude weights of each layer in
    :func:`prunable` (random unstructured sparsity, given random weights), scaling the
    survivors by 1/sqrt(1 - sparsity) to keep each layer's output scale."""
    with torch.no_grad():
        for m in prunable(model):
            w = m.weight.reshape(-1)
            n_zero = int(round(sparsity * w.numel()))
            if n_zero:
                w[torch.argsort(w.abs())[:n_zero]] = 0.0
                w *= 1.0 / np.sqrt(max(1.0 - sparsity, 1e-3))
    return model
