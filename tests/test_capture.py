"""LaunchGraph: capture a chain of op calls once (conv2d_sparse, the DSG ops, a whole
training step), replay it with new inputs, and get what eager calls give."""

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl.testing.cases import ConvCase
from pysparsecl.testing.reference import relative_error
from pysparsecl.tuning import override

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
    # A packing pass and the convolution per call; LAYER3 (1x1) reads y2 in place or
    # copies it, a command that is not a kernel launch.
    assert len(graph) in (5, 6)
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


def test_replay_copies_a_new_input_that_a_1x1_layer_cannot_read_in_place(queue, rng):
    """A 1x1 layer in the pixel layout whose input has no room for the tail its last tile
    reads copies the input (a copy, not a packing pass): the graph records that copy, so
    a replay convolves the new input, not the captured one."""
    x, w, csr, bias = LAYER3.make_inputs(rng)
    weight = ps.SparseConvWeight(csr, LAYER3.C, LAYER3.kernel, queue=queue)
    x_dev = cl_array.to_device(queue, x)                 # exact size: no tail
    with override("conv2d_csr", BATCH_LAYOUT=0, VEC=2, PIX_VECS=3, WG_PIX=2):
        graph = ps.LaunchGraph(queue, inputs=(x_dev,))
        with graph:
            y = ps.conv2d_sparse(x_dev, weight, padding=0)
    assert len(graph) == 1                               # the convolution; the copy is not
    for _ in range(2):
        new = rng.standard_normal(x.shape, dtype=np.float32)
        graph.replay(new)
        assert relative_error(y.get(), LAYER3.reference(new, w, None)) < TOL


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
    channel_mask = cl_array.to_device(queue, np.ones((LAYER1.N, 4, 1, 1), bool))
    with pytest.raises(NotImplementedError, match="captured"):
        with ps.LaunchGraph(queue):                               # needs the host
            ps.conv2d_masked(x_dev, cl_array.to_device(queue, np.ones(
                (4, LAYER1.C, 3, 3), np.float32)), channel_mask, padding=1)
    with pytest.raises(NotImplementedError, match="captured"):
        with ps.LaunchGraph(queue):                               # not a capturable op
            ps.SparseRandomProjection(LAYER1.W, eps=0.5, seed=1, queue=queue).project(
                x_dev[0, 0])
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


def test_empty_weight_is_captured(queue, rng):
    case = LAYER3.with_(sparsity=1.0, bias=False)
    x, _, csr, _ = case.make_inputs(rng)
    x_dev = cl_array.to_device(queue, x)
    graph = ps.LaunchGraph(queue, inputs=(x_dev,))
    with graph:
        y = ps.conv2d_sparse(x_dev, csr)
    y.fill(np.float32(7))
    graph.replay()
    assert not y.get().any()


# ---------------------------------------------------------------------------------------
# The DSG ops and a whole training step

def _dsg_chain(queue, x, labels, w_rows, bias, x4, w4, gamma, beta, proj, proj4):
    """Every capturable DSG op once, on device arrays; returns the results to compare."""
    mask = ps.drs_mask(x, w_rows, 0.6, projection=proj)
    y = ps.masked_matmul(x, w_rows, mask)
    ps.add_relu(y, bias, out=y, mask=mask)
    loss, grad = ps.softmax_cross_entropy(y, labels)
    dh = ps.relu_backward(grad, y, mask=mask)
    dx, dw = ps.masked_matmul_backward(dh, x, w_rows, mask, dw_rows=True)
    db = ps.column_sums(dh)
    rnd = ps.random_mask(x.shape[0], 8, 0.5, seed=11, queue=queue)
    mask4 = ps.drs_mask_conv2d(x4, w4, 0.5, padding=1, projection=proj4)
    y4 = ps.conv2d_masked(x4, w4, mask4, padding=1)
    out4, mean, var = ps.masked_relu_bn(y4, mask4, gamma, beta, training=True)
    dy4, dgamma, dbeta = ps.masked_relu_bn_backward(out4, y4, mask4, gamma, mean, var)
    dx4, dw4 = ps.conv2d_masked_backward(dy4, x4, w4, mask4, padding=1)
    sums = ps.channel_sums(dx4)
    return dict(mask=mask, y=y, loss=loss, dx=dx, dw=dw, db=db, rnd=rnd, mask4=mask4,
                out4=out4, mean=mean, var=var, dgamma=dgamma, dbeta=dbeta, dx4=dx4, dw4=dw4,
                sums=sums)


def test_dsg_ops_replay_equals_eager_on_new_inputs(queue, rng):
    m, k, n = 12, 24, 10
    w_rows = ps.MaskedLinearWeight(rng.standard_normal((n, k), dtype=np.float32),
                                   transposed=True, queue=queue)
    consts = [cl_array.to_device(queue, a) for a in (
        rng.standard_normal(n, dtype=np.float32), rng.standard_normal((6, 3, 3, 3),
                                                                      dtype=np.float32),
        rng.standard_normal(6, dtype=np.float32), rng.standard_normal(6, dtype=np.float32))]
    bias, w4, gamma, beta = consts
    proj = ps.SparseRandomProjection(k, eps=0.5, seed=2, queue=queue)
    proj4 = ps.SparseRandomProjection(27, eps=0.5, seed=3, queue=queue)

    def batch():
        return (rng.standard_normal((m, k), dtype=np.float32),
                rng.integers(0, n, m).astype(np.int32),
                rng.standard_normal((2, 3, 5, 4), dtype=np.float32))

    inputs = [cl_array.to_device(queue, a) for a in batch()]
    graph = ps.LaunchGraph(queue, inputs=inputs)
    with graph:
        captured = _dsg_chain(queue, inputs[0], inputs[1], w_rows, bias, inputs[2], w4,
                              gamma, beta, proj, proj4)
    for _ in range(2):
        new = batch()
        graph.replay(*new)
        got = {name: a.get() for name, a in captured.items()}
        eager = _dsg_chain(queue, *(cl_array.to_device(queue, a) for a in new[:2]), w_rows,
                           bias, cl_array.to_device(queue, new[2]), w4, gamma, beta, proj,
                           proj4)
        for name, a in eager.items():
            assert np.array_equal(got[name], a.get()), name


def test_a_replay_repeats_the_fills_and_copies_it_recorded(queue):
    from pysparsecl import runtime

    @runtime.capturable_op
    def fill_then_copy(a, b):
        runtime.fill_array(queue, a, 3)
        runtime.enqueue_copy(queue, b.base_data, a.base_data, byte_count=8,
                             src_offset=a.offset, dst_offset=b.offset + 4)

    a = cl_array.zeros(queue, 4, np.float32)
    b = cl_array.zeros(queue, 4, np.float32)
    graph = ps.LaunchGraph(queue)
    with graph:
        fill_then_copy(a, b)
    a.fill(np.float32(-1))
    b.fill(np.float32(-1))
    graph.replay()
    assert np.array_equal(a.get(), [3, 3, 3, 3]) and np.array_equal(b.get(), [-1, 3, 3, -1])
    with pytest.raises(NotImplementedError, match="a fill"):
        with ps.LaunchGraph(queue):
            runtime.fill_array(queue, a, 0)        # outside an op that declares it


@pytest.mark.parametrize("mask, sparsity", [("drs", 0.8), ("dense", 0.0)])
def test_a_captured_training_step_trains_as_the_eager_one(queue, rng, mask, sparsity):
    from pysparsecl.dsg import MLP
    eager, replayed = (MLP((16, 32, 24, 5), sparsity, mask, seed=7, queue=queue)
                       for _ in range(2))
    batches = [(rng.standard_normal((8, 16), dtype=np.float32),
                rng.integers(0, 5, 8).astype(np.int32)) for _ in range(4)]
    first = [cl_array.to_device(queue, a) for a in batches[0]]
    step = replayed.capture_step(*first, lr=0.1, momentum=0.9, weight_decay=1e-3)
    losses = [float(step.loss.get()[0])]
    for x, labels in batches[1:]:
        losses.append(float(step(x, labels).get()[0]))
    for i, (x, labels) in enumerate(batches):
        loss = eager.train_step(cl_array.to_device(queue, x), cl_array.to_device(queue, labels),
                                lr=0.1, momentum=0.9, weight_decay=1e-3)
        assert float(loss.get()[0]) == losses[i]
    assert np.array_equal(eager.params.data.get(), replayed.params.data.get())
    with pytest.raises(ValueError, match="shape"):
        step(batches[0][0][:4], batches[0][1])


def test_a_training_step_with_host_masks_is_refused(queue, rng):
    from pysparsecl.dsg import MLP
    x = cl_array.to_device(queue, rng.standard_normal((8, 16), dtype=np.float32))
    labels = cl_array.to_device(queue, rng.integers(0, 5, 8).astype(np.int32))
    for kind in ("random", "oracle"):
        with pytest.raises(NotImplementedError, match=kind):
            MLP((16, 32, 5), 0.5, kind, seed=1, queue=queue).capture_step(x, labels)
    with pytest.raises(TypeError, match="x"):
        MLP((16, 32, 5), 0.5, "drs", queue=queue).capture_step(x.get(), labels)
    with pytest.raises(ValueError, match="x must be a pyopencl array"):
        with ps.LaunchGraph(queue):
            ps.masked_matmul(x.get(), ps.MaskedLinearWeight(
                rng.standard_normal((16, 4), dtype=np.float32), queue=queue),
                cl_array.to_device(queue, np.ones((8, 4), bool)))
