"""pysparsecl.dsg: DSG layers (linear, conv with BatchNorm, pooling) and the MLP and CNN
trainers against float64 references, and short training runs on the digits (needs
scikit-learn for the data)."""

import numpy as np
import pyopencl.array as cl_array
import pytest

import pysparsecl as ps
from pysparsecl.dsg import CNN, MLP, DSGConv2d, DSGLinear, FlatParameters
from pysparsecl.testing.reference import (
    conv2d_masked_backward_reference,
    conv2d_reference,
    relative_error,
    relu_bn_backward_reference,
    relu_bn_reference,
    softmax_cross_entropy_reference,
)

TOL = 1e-4


def _layer(queue, rng, k, n, sparsity, mask, relu=True):
    params = FlatParameters(queue, {
        "pre.w": rng.standard_normal((3, 4)).astype(np.float32),    # an offset into the buffer
        "fc.w": rng.standard_normal((n, k)).astype(np.float32),    # rows (out, in)
        "fc.b": rng.standard_normal(n).astype(np.float32)})
    return params, DSGLinear(params, "fc", sparsity, mask, relu=relu, seed=3)


@pytest.mark.parametrize("mask, relu", [("drs", True), ("random", True), ("oracle", True),
                                        ("dense", False), ("drs", False)])
def test_layer_forward_backward_match_float64(queue, rng, mask, relu):
    m, k, n = 9, 21, 30
    params, layer = _layer(queue, rng, k, n, 0.7, mask, relu)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = layer.forward(cl_array.to_device(queue, x)).get()
    sel = layer._saved[2].get()
    assert sel.sum() == (m * n if mask == "dense" else m * 9)     # keep ceil(0.3 * 30) = 9
    wt, b = (params.params[f"fc.{p}"].get().astype(np.float64) for p in "wb")
    w = wt.T
    pre = np.where(sel, x.astype(np.float64) @ w + b, 0.0)
    ref = np.maximum(pre, 0) if relu else pre
    assert relative_error(y, ref) < TOL
    if mask == "oracle":   # the selection is the exact top-k of the pre-activation
        full = x.astype(np.float64) @ w + b
        assert np.all(np.where(sel, full, np.inf).min(1) >= np.where(sel, -np.inf, full).max(1))
    dy = rng.standard_normal((m, n)).astype(np.float32)
    dx = layer.backward(cl_array.to_device(queue, dy)).get()
    dh = np.where(sel & ((ref > 0) if relu else True), dy.astype(np.float64), 0.0)
    assert relative_error(params.grads["fc.w"].get(), (x.T.astype(np.float64) @ dh).T) < TOL
    assert relative_error(params.grads["fc.b"].get(), dh.sum(0)) < TOL
    assert relative_error(dx, dh @ w.T) < TOL
    assert np.all(params.grads["pre.w"].get() == 0)          # other parameters untouched


def test_train_step_is_one_sgd_step_of_the_float64_model(queue, rng):
    """A dense MLP (the masks' arithmetic aside, the same path): parameters after one
    step against NumPy float64 backpropagation and torch.optim.SGD's momentum update."""
    sizes, m = (7, 11, 5), 6
    model = MLP(sizes, 0.0, "dense", seed=4, queue=queue)
    before = {k: v.astype(np.float64) for k, v in model.params.numpy().items()}
    x = rng.standard_normal((m, 7)).astype(np.float32)
    labels = rng.integers(0, 5, m).astype(np.int32)
    loss = model.train_step(cl_array.to_device(queue, x), cl_array.to_device(queue, labels),
                            lr=0.1, momentum=0.9, weight_decay=0.01)
    h = np.maximum(x @ before["fc0.w"].T + before["fc0.b"], 0)
    logits = h @ before["fc1.w"].T + before["fc1.b"]
    ref_loss, dlogits = softmax_cross_entropy_reference(logits, labels)
    assert abs(float(loss.get()[0]) - ref_loss) < TOL * ref_loss
    dh = (dlogits @ before["fc1.w"]) * (h > 0)
    grads = {"fc1.w": dlogits.T @ h, "fc1.b": dlogits.sum(0), "fc0.w": dh.T @ x,
             "fc0.b": dh.sum(0)}
    after = model.params.numpy()
    for name, g in grads.items():
        # the first step from zero momentum: v = g + wd * p, p -= lr * v
        want = before[name] - 0.1 * (g + 0.01 * before[name])
        assert relative_error(after[name], want) < TOL, name


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order]


def _train_and_test(queue, model, x, y, epochs, images=False):
    if images:
        x = x.reshape(-1, 1, 8, 8)
    rng = np.random.default_rng(1)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(1400), 1400 // 64):
            model.train_step(cl_array.to_device(queue, x[:1400][batch]),
                             cl_array.to_device(queue, y[:1400][batch]), lr=0.05)
    return float((model.predict(x[1400:]) == y[1400:]).mean())


def test_short_training_run_on_the_digits(queue):
    x, y = _digits()
    accuracy = _train_and_test(queue, MLP((64, 256, 10), 0.5, "drs", seed=0, queue=queue),
                               x, y, 3)
    assert accuracy >= 0.9, accuracy


def test_short_cnn_training_run_on_the_digits(queue):
    x, y = _digits()
    model = CNN((1, 8, 8), (8, 16), (32,), 10, 0.5, "drs", seed=0, queue=queue)
    accuracy = _train_and_test(queue, model, x, y, 3, images=True)
    assert accuracy >= 0.9, accuracy


def _conv_layer(queue, rng, c, k, sparsity, mask, bn):
    initial = {"pre.w": rng.standard_normal(5).astype(np.float32),   # an offset into it
               "conv.w": rng.standard_normal((k, c, 3, 3)).astype(np.float32)}
    if bn:
        initial["conv.gamma"] = rng.standard_normal(k).astype(np.float32)
        initial["conv.beta"] = rng.standard_normal(k).astype(np.float32)
    else:
        initial["conv.b"] = rng.standard_normal(k).astype(np.float32)
    params = FlatParameters(queue, initial)
    return params, DSGConv2d(params, "conv", sparsity, mask, padding=1, bn=bn, seed=5)


@pytest.mark.parametrize("mask, bn", [("drs", True), ("oracle", True), ("random", True),
                                      ("dense", True), ("drs", False), ("dense", False)])
def test_conv_layer_forward_backward_match_float64(queue, rng, mask, bn):
    n, c, k, h, w = 3, 4, 10, 6, 5
    params, layer = _conv_layer(queue, rng, c, k, 0.7, mask, bn)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    out = layer.forward(cl_array.to_device(queue, x)).get()
    sel = layer._saved[2].get()
    assert np.all(sel.sum(axis=1) == (k if mask == "dense" else 3))  # ceil(0.3 * 10) per pixel
    p = {name: a.get().astype(np.float64) for name, a in params.params.items()}
    conv = conv2d_reference(x, p["conv.w"], None, (1, 1), (1, 1))
    if mask == "oracle":    # the selection is each pixel's exact top-3 channels
        assert np.all(np.where(sel, conv, np.inf).min(1) >= np.where(sel, -np.inf, conv).max(1))
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = layer.backward(cl_array.to_device(queue, dout)).get()
    y = np.where(sel, conv, 0.0)
    if bn:
        ref, mean, var = relu_bn_reference(y, sel, p["conv.gamma"], p["conv.beta"])
        dy, dgamma, dbeta = relu_bn_backward_reference(dout, y, sel, p["conv.gamma"], mean,
                                                       var)
        assert relative_error(params.grads["conv.gamma"].get(), dgamma) < TOL
        assert relative_error(params.grads["conv.beta"].get(), dbeta) < TOL
        # The running statistics moved a tenth of the way to the batch's.
        assert relative_error(layer.running_mean.get(), 0.1 * mean) < TOL
        assert relative_error(layer.running_var.get(), 0.9 + 0.1 * var) < TOL
    else:
        ref = np.where(sel, np.maximum(y + p["conv.b"][:, None, None], 0), 0.0)
        dy = np.where(sel & (ref > 0), dout, 0.0)
        assert relative_error(params.grads["conv.b"].get(), dy.sum(axis=(0, 2, 3))) < TOL
    assert relative_error(out, ref) < TOL
    rdx, rdw = conv2d_masked_backward_reference(dy, x, p["conv.w"], sel, (1, 1), (1, 1))
    assert relative_error(params.grads["conv.w"].get(), rdw) < TOL
    assert relative_error(dx, rdx) < TOL
    assert np.all(params.grads["pre.w"].get() == 0)          # other parameters untouched
    if bn and mask != "random":
        # Inference: the same selection (w is unchanged), normalised with the running
        # statistics.
        out = layer.forward(cl_array.to_device(queue, x), training=False).get()
        ref = relu_bn_reference(y, sel, p["conv.gamma"], p["conv.beta"],
                                layer.running_mean.get(), layer.running_var.get())
        assert relative_error(out, ref) < TOL


def test_cnn_captured_step_trains_as_the_eager_one(queue, rng):
    eager, replayed = (CNN((1, 6, 6), (4, 8), (12,), 5, 0.5, "drs", seed=3, queue=queue)
                       for _ in range(2))
    batches = [(rng.standard_normal((6, 1, 6, 6), dtype=np.float32),
                rng.integers(0, 5, 6).astype(np.int32)) for _ in range(3)]
    step = replayed.capture_step(*(cl_array.to_device(queue, a) for a in batches[0]))
    losses = [float(step.loss.get()[0])] + [float(step(*b).get()[0]) for b in batches[1:]]
    for (x, labels), want in zip(batches, losses):
        got = eager.train_step(cl_array.to_device(queue, x), cl_array.to_device(queue, labels))
        assert float(got.get()[0]) == want
    assert np.array_equal(eager.params.data.get(), replayed.params.data.get())
    for a, b in zip(eager.layers, replayed.layers):
        if isinstance(a, DSGConv2d):
            assert np.array_equal(a.running_var.get(), b.running_var.get())


def test_bad_input(queue, rng):
    params = FlatParameters(queue, {"fc.w": np.zeros((4, 3), np.float32),
                                    "fc.b": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="mask must be one of"):
        DSGLinear(params, "fc", 0.5, "topk")
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        DSGLinear(params, "fc", 1.0)
    with pytest.raises(RuntimeError, match="backward needs a forward with training=True"):
        DSGLinear(params, "fc", 0.5).backward(cl_array.zeros(queue, (2, 4), np.float32))
    params.params["fc.w"] = params.data[1:13].reshape(4, 3)     # off the alignment
    with pytest.raises(ValueError, match="fc.w must start on the device's base alignment"):
        DSGLinear(params, "fc", 0.5)
    with pytest.raises(ValueError, match="sizes must be two or more positive ints"):
        MLP((64,), 0.5)
    with pytest.raises(ValueError, match="initial must name at least one parameter"):
        FlatParameters(queue, {})
    conv = FlatParameters(queue, {"c.w": np.zeros((4, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"c.w must be \(K, C, R, S\)"):
        DSGConv2d(conv, "c", 0.5)
    with pytest.raises(ValueError, match="in_shape .* is too small"):
        CNN((1, 2, 2), (4, 4, 4), (), 3, 0.5)
    with pytest.raises(ValueError, match="channels must be positive ints"):
        CNN((1, 8, 8), (4, 0), (), 3, 0.5)
    with pytest.raises(ValueError, match="in_shape must be"):
        CNN((8, 8), (4,), (), 3, 0.5)


def test_the_kept_projection_follows_the_weight(queue, rng):
    """f(w) kept as a parameter and stepped with f(dw) equals f of the stepped weight."""
    model = MLP((24, 40, 32, 5), 0.7, "drs", seed=2, queue=queue, keep_projection=True)
    layers = [layer for layer in model.layers if layer.kind == "drs"]
    assert len(layers) == 2 and all(layer.fw is not None for layer in layers)
    for _ in range(6):
        x = cl_array.to_device(queue, rng.standard_normal((9, 24), dtype=np.float32))
        labels = cl_array.to_device(queue, rng.integers(0, 5, 9).astype(np.int32))
        model.train_step(x, labels, lr=0.1, momentum=0.9, weight_decay=0.01)
    for layer in layers:
        fresh = layer.projection.project_weight(layer.rows).values.get()
        kept = layer.fw.get()
        k, n = layer.projection.k, layer.out_features
        assert relative_error(kept[:k, :n], fresh[:k, :n]) < 1e-5
        assert np.all(kept[k:] == 0)                        # padding rows stay zero


def test_search_with_a_given_projection_of_x(queue, rng):
    x = cl_array.to_device(queue, rng.standard_normal((11, 30), dtype=np.float32))
    w = rng.standard_normal((30, 20), dtype=np.float32)
    proj = ps.SparseRandomProjection(30, eps=0.5, seed=4, queue=queue)
    pw = proj.project_weight(w)
    fx = proj.project_rows(x)
    assert fx.shape[0] == 11 and fx.shape[1] >= proj.k
    assert relative_error(fx.get()[:, :proj.k], proj.project(x.get())) < 1e-5
    assert np.all(fx.get()[:, proj.k:] == 0)
    got = ps.drs_mask(x, None, 0.6, projection=pw, x_projected=fx).get()
    assert np.array_equal(got, ps.drs_mask(x, None, 0.6, projection=pw).get())
    layout = proj.weight_layout(20, queue)
    buffer = cl_array.zeros(queue, layout, np.float32)
    into = proj.project_weight(w, out=buffer)
    assert into.values.base_data.int_ptr == buffer.base_data.int_ptr     # in place
    assert relative_error(buffer.get(), pw.values.get()) < 1e-6
    with pytest.raises(ValueError, match="x_projected needs"):
        ps.drs_mask(x, w, 0.6, projection=proj, x_projected=fx)
    with pytest.raises(ValueError, match="x_projected must be"):
        ps.drs_mask(x, None, 0.6, projection=pw, x_projected=fx[:5])
    with pytest.raises(ValueError, match="out must be a float32 device array"):
        proj.project_weight(w, out=cl_array.zeros(queue, (3, 3), np.float32))
    with pytest.raises(TypeError, match="x must be a pyopencl array"):
        proj.project_rows(x.get())


def test_weight_gradient_without_the_weight(queue, rng):
    """masked_matmul_backward(dy, x, None, mask, need_dx=False): dw needs only x and dy."""
    x = rng.standard_normal((7, 13), dtype=np.float32)
    dy = rng.standard_normal((7, 9), dtype=np.float32)
    mask = rng.random((7, 9)) < 0.4
    _, dw = ps.masked_matmul_backward(dy, x, None, mask, need_dx=False, queue=queue)
    ref = x.T.astype(np.float64) @ np.where(mask, dy, 0.0)
    assert relative_error(dw, ref) < TOL
    with pytest.raises(TypeError, match="w is required unless need_dx=False"):
        ps.masked_matmul_backward(dy, x, None, mask, queue=queue)


def test_keep_projection_is_checked_and_can_be_turned_off(queue):
    plain = MLP((8, 16, 3), 0.5, "drs", queue=queue, keep_projection=False)
    assert plain.layers[0].fw is None and "fc0.fw" not in plain.params.params
    with pytest.raises(TypeError, match="keep_projection must be a bool or None"):
        MLP((8, 16, 3), 0.5, "drs", queue=queue, keep_projection=1)


# ---------------------------------------------------------------------------------------
# Sparsity carried across layers: propagate=True

@pytest.mark.parametrize("mask, relu", [("drs", True), ("random", True), ("oracle", True),
                                        ("drs", False)])
def test_propagating_layer_matches_float64(queue, rng, mask, relu):
    """A propagating layer's compact output and its gradients, from a compact input,
    against float64; dx comes back at the input's entries only."""
    m, k, n = 9, 40, 30
    params = FlatParameters(queue, {
        "fc.w": rng.standard_normal((n, k)).astype(np.float32),
        "fc.b": rng.standard_normal(n).astype(np.float32)})
    layer = DSGLinear(params, "fc", 0.7, mask, relu=relu, seed=3, propagate=True)
    x_idx = np.sort(np.argsort(rng.random((m, k)), axis=1)[:, :12], axis=1).astype(np.int32)
    x_values = rng.standard_normal((m, 12)).astype(np.float32)
    x = ps.CompactRows(cl_array.to_device(queue, x_values), cl_array.to_device(queue, x_idx),
                       k)
    y = layer.forward(x)
    assert isinstance(y, ps.CompactRows) and y.n_cols == n and y.n_keep == 9
    idx = y.idx.get()
    assert np.all(np.diff(idx, axis=1) > 0)                  # ascending, as the search gives
    xd = np.zeros((m, k))
    np.put_along_axis(xd, x_idx, x_values, axis=1)
    w, b = (params.params[f"fc.{p}"].get().astype(np.float64) for p in "wb")
    pre = np.take_along_axis(xd @ w.T + b, idx, axis=1)
    ref = np.maximum(pre, 0) if relu else pre
    assert relative_error(y.values.get(), ref) < TOL
    dyv = rng.standard_normal((m, 9)).astype(np.float32)
    dx = layer.backward(ps.CompactRows(cl_array.to_device(queue, dyv), y.idx, n, check=False))
    assert isinstance(dx, ps.CompactRows) and np.array_equal(dx.idx.get(), x_idx)
    dh = np.zeros((m, n))
    np.put_along_axis(dh, idx, np.where((ref > 0) if relu else True, dyv, 0.0), axis=1)
    assert relative_error(params.grads["fc.w"].get(), dh.T @ xd) < TOL
    assert relative_error(params.grads["fc.b"].get(), dh.sum(0)) < TOL
    assert relative_error(dx.values.get(), np.take_along_axis(dh @ w, x_idx, axis=1)) < TOL


def test_propagated_mlp_trains_as_the_dense_form(queue, rng):
    """The same MLP, passing compact activations or dense ones with zeros: the same loss
    step after step (float32 rounding aside), and the kept activations shrink."""
    x = rng.standard_normal((32, 64)).astype(np.float32)
    labels = rng.integers(0, 10, 32).astype(np.int32)
    x_dev, labels_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, labels)
    # keep_projection=False: only the activations are kept (f(x), kept with f(w) for
    # the projected gradient, is (M, k) either way).
    models = [MLP((64, 256, 256, 10), 0.9, "drs", seed=2, queue=queue, propagate=p,
                  keep_projection=False) for p in (False, True)]
    for step in range(4):
        losses = [float(model.train_step(x_dev, labels_dev, lr=0.05).get()[0])
                  for model in models]
        assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[0]), (step, losses)
    for model in models:
        model.forward(x_dev, training=True)
    kept = [sum(layer.saved_bytes() for layer in model.layers[1:-1]) for model in models]
    assert kept[1] * 4 <= kept[0], kept          # the second hidden layer: x and y compact


def test_propagate_is_checked(queue):
    with pytest.raises(TypeError, match="propagate must be a bool"):
        MLP((4, 8, 2), 0.5, "drs", queue=queue, propagate=1)


def test_propagated_mlp_step_can_be_captured(queue, rng):
    """The propagated step runs on the device alone: recorded once, a replay gives the
    losses of eager steps."""
    x = rng.standard_normal((16, 64)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    x_dev, labels_dev = cl_array.to_device(queue, x), cl_array.to_device(queue, labels)
    eager, replayed = (MLP((64, 128, 128, 10), 0.8, "drs", seed=5, queue=queue,
                           propagate=True) for _ in range(2))
    step = replayed.capture_step(x_dev.copy(), labels_dev.copy(), lr=0.05)
    eager.train_step(x_dev, labels_dev, lr=0.05)          # the step capture ran
    for _ in range(3):
        want = float(eager.train_step(x_dev, labels_dev, lr=0.05).get()[0])
        got = float(step(x_dev, labels_dev).get()[0])
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
