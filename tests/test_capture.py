"""LaunchGraph: capture a chain of conv2d_sparse calls once, replay it with new inputs."""

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl.testing.cases import ConvCase
from pysparsecl.testing.reference import relative_error

TOL = 1e-5
LAYER1 = ConvCase(2, 8, 10, 9, 12, sparsity=0.7, bias=True)
LAYER2 = ConvCase(2, 12, 10, 9, 12, stride=(2, 2), sparsity=0.8)
LAYER3 = ConvCase(2, 12, 5, 5, 12, kernel=(1, 1), padding=(0, 0), sparsity=0.5, bias=True)


def _weights(queue, rng):
    w1 = LAYER1.make_inputs(rng)
    w2 = LAYER2.make_inputs(rng)
    w3 = LAYER3.make_inputs(rng)
    return [(ps.SparseConvWeight(csr, case.C, case.kernel, queue=queue), w, b, case)
            for case, (_, w, csr, b) in zip((LAYER1, LAYER2, LAYER3), (w1, w2, w3))]


def _forward(queue, layers, x_dev):
    (p1, _, b1, c1), (p2, _, _, c2), (p3, _, b3, c3) = layers
    y1 = ps.conv2d_sparse(x_dev, p1, cl_array.to_device(queue, b1), padding=1,
                          activation="relu")
    y2 = ps.conv2d_sparse(y1, p2, stride=2, padding=1, activation="relu")
    return ps.conv2d_sparse(y2, p3, cl_array.to_device(queue, b3), residual=y2,
                            activation="relu")


def _reference(layers, x):
    (_, w1, b1, c1), (_, w2, _, c2), (_, w3, b3, c3) = layers
    y1 = np.maximum(c1.reference(x, w1, b1), 0)
    y2 = np.maximum(c2.reference(y1, w2, None), 0)
    return np.maximum(c3.reference(y2, w3, b3) + y2, 0)


def test_replay_equals_eager_on_new_inputs(queue, rng):
    layers = _weights(queue, rng)
    x = rng.standard_normal((LAYER1.N, LAYER1.C, LAYER1.H, LAYER1.W), dtype=np.float32)
    x_dev = cl_array.to_device(queue, x)
    graph = ps.LaunchGraph(queue, inputs=(x_dev,))
    with graph:
        y = _forward(queue, layers, x_dev)
    assert len(graph) == 6   # packing + convolution per call
    assert relative_error(y.get(), _reference(layers, x)) < TOL   # the capture ran
    for new in (rng.standard_normal(x.shape, dtype=np.float32) for _ in range(3)):
        graph.replay(new)                                       # NumPy input
        assert relative_error(y.get(), _reference(layers, new)) < TOL
    new = rng.standard_normal(x.shape, dtype=np.float32)
    graph.replay(cl_array.to_device(queue, new))                # device input
    assert relative_error(y.get(), _reference(layers, new)) < TOL
    x_dev.set(x)                                                # refilled by hand
    graph.replay()
    assert relative_error(y.get(), _reference(layers, x)) < TOL


def test_replay_rejects_wrong_inputs(queue, rng):
    layers = _weights(queue, rng)
    x_dev = cl_array.to_device(queue, rng.standard_normal(
        (LAYER1.N, LAYER1.C, LAYER1.H, LAYER1.W), dtype=np.float32))
    graph = ps.LaunchGraph(queue, inputs=(x_dev,))
    with pytest.raises(RuntimeError, match="capture"):
        graph.replay()
    with graph:
        _forward(queue, layers, x_dev)
    with pytest.raises(ValueError, match="shape"):
        graph.replay(np.zeros((1,) + x_dev.shape[1:], np.float32))
    with pytest.raises(ValueError, match="dtype"):
        graph.replay(np.zeros(x_dev.shape, np.float64))
    with pytest.raises(ValueError, match="inputs"):
        graph.replay(x_dev, x_dev)
    with pytest.raises(TypeError, match="inputs"):
        graph.replay(x_dev.shape)
    with pytest.raises(RuntimeError, match="once"):
        with graph:
            pass


def test_capture_refuses_what_it_cannot_replay(queue, rng):
    layers = _weights(queue, rng)
    x = rng.standard_normal((LAYER1.N, LAYER1.C, LAYER1.H, LAYER1.W), dtype=np.float32)
    x_dev = cl_array.to_device(queue, x)
    with pytest.raises(ValueError, match="LaunchGraph"):
        with ps.LaunchGraph(queue):
            ps.conv2d_sparse(x, layers[0][0], padding=1)           # NumPy: not capturable
    with pytest.raises(NotImplementedError, match="captured"):
        with ps.LaunchGraph(queue):
            ps.add(x_dev, x_dev)                                  # not a capturable op
    graph = ps.LaunchGraph(queue)
    with pytest.raises(ValueError, match="twice"):
        with graph:
            raise ValueError("twice")
    with pytest.raises(RuntimeError, match="failed"):
        graph.replay()
    with pytest.raises(TypeError, match="inputs"):
        ps.LaunchGraph(queue, inputs=(x,))
    ooo = cl.CommandQueue(queue.context, properties=(
        cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE))
    with pytest.raises(ValueError, match="in-order"):
        ps.LaunchGraph(ooo)
    with ps.LaunchGraph(queue):
        with pytest.raises(RuntimeError, match="already"):
            with ps.LaunchGraph(queue):
                pass


def test_empty_weight_is_captured_as_a_kernel(queue, rng):
    case = LAYER3.with_(sparsity=1.0, bias=False)
    x, _, csr, _ = case.make_inputs(rng)
    x_dev = cl_array.to_device(queue, x)
    graph = ps.LaunchGraph(queue, inputs=(x_dev,))
    with graph:
        y = ps.conv2d_sparse(x_dev, csr)
    y.fill(np.float32(7))
    graph.replay()
    assert not y.get().any()
