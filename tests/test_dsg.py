"""pysparsecl.dsg: DSG layers and the MLP trainer against float64 references, and a short
training run on the digits (needs scikit-learn for the data)."""

import numpy as np
import pyopencl.array as cl_array
import pytest

from pysparsecl.dsg import MLP, DSGLinear, FlatParameters
from pysparsecl.testing.reference import relative_error, softmax_cross_entropy_reference

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


def test_short_training_run_on_the_digits(queue):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    train, test = slice(0, 1400), slice(1400, None)
    model = MLP((64, 256, 10), 0.5, "drs", seed=0, queue=queue)
    rng = np.random.default_rng(1)
    for _ in range(3):
        for batch in np.array_split(rng.permutation(1400), 1400 // 64):
            model.train_step(cl_array.to_device(queue, x[train][batch]),
                             cl_array.to_device(queue, y[train][batch]), lr=0.05)
    accuracy = float((model.predict(x[test]) == y[test]).mean())
    assert accuracy >= 0.9, accuracy


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
