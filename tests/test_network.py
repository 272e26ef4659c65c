"""A whole (narrow) ResNet-50 body through conv2d_sparse, eager and replayed, against the
float64 reference: the structure that bench/network.py times at full width."""

import numpy as np
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl.testing.networks import (
    SparseNetwork,
    conv_inputs,
    make_weights,
    reference_forward,
    resnet50_body,
)
from pysparsecl.testing.reference import relative_error

TOL = 1e-4


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_resnet50_body_matches_reference(queue, rng, sparsity):
    blocks = resnet50_body(width=0.125)
    weights = make_weights(blocks, sparsity, rng, n_classes=10)
    x = rng.standard_normal((2, blocks[0].conv1.c_in, 16, 16), dtype=np.float32)
    net = SparseNetwork(blocks, weights, queue, pool_hw=(2, 2))
    want = reference_forward(blocks, weights, x)
    x_dev = cl_array.to_device(queue, x)
    logits = net(x_dev)
    assert logits.shape == (2, 10, 1, 1)
    assert relative_error(logits.get().reshape(2, 10), want) < TOL

    graph = ps.LaunchGraph(queue, inputs=(x_dev,))
    with graph:
        captured = net(x_dev)
    calls = 3 * 16 + 4 + 2
    # One or two kernels per conv2d_sparse call: the packing pass is left out where the
    # convolution reads its input in place (some 1x1 layers, device and tuning allowing).
    assert calls <= len(graph) <= 2 * calls
    new = rng.standard_normal(x.shape, dtype=np.float32)
    graph.replay(new)
    assert relative_error(captured.get().reshape(2, 10),
                          reference_forward(blocks, weights, new)) < TOL


def test_resnet50_body_structure():
    blocks = resnet50_body()
    shapes, final_hw = conv_inputs(blocks, (56, 56))
    assert len(blocks) == 16 and len(shapes) == 52
    assert [b.proj is not None for b in blocks].count(True) == 4
    assert [b.conv2.stride for b in blocks] == [1, 1, 1, 2, 1, 1, 1, 2] + [1] * 5 + [2, 1, 1]
    assert blocks[0].conv1.c_in == 64 and blocks[-1].conv3.c_out == 2048
    assert final_hw == (7, 7)
    # 1x1 convolutions carry about half of the multiply-adds (the 1x1 path's motivation).
    macs = {k: sum(c.macs(1, hw) for c, hw in shapes if c.kernel == k) for k in (1, 3)}
    assert 0.45 < macs[1] / (macs[1] + macs[3]) < 0.55


def test_network_shapes_one_problem_per_class_and_kernel_filter():
    """scripts/network_shapes.py: one tuner problem per conv2d_csr shape class of the
    network (and the FC layer), and --kernel keeps that kernel size's classes alone."""
    from pysparsecl.ops.conv2d import conv2d_shape_class
    from scripts.network_shapes import network_shapes
    every = network_shapes([1, 8], 0.9)

    def cls(e):
        oh = (e["H"] + 2 * e["padding"] - e["kernel"]) // e["stride"] + 1
        ow = (e["W"] + 2 * e["padding"] - e["kernel"]) // e["stride"] + 1
        return conv2d_shape_class(e["N"], e["C"], (oh, ow), e["kernel"], e["stride"])
    classes = [cls(e) for e in every]
    assert len(classes) == len(set(classes)) and {e["kernel"] for e in every} == {1, 3}
    ones = network_shapes([1, 8], 0.9, kernel=1)
    assert ones and all(e["kernel"] == 1 for e in ones)
    assert sorted(map(cls, ones)) == sorted(c for c, e in zip(classes, every)
                                            if e["kernel"] == 1)
