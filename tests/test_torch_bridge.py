"""pysparsecl.torch_bridge: DSG's masked linear layer under torch autograd, against torch's
own autograd of the same masked expression in float64 (skipped without torch)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pysparsecl as ps  # noqa: E402
from pysparsecl.testing.reference import relative_error  # noqa: E402
from pysparsecl.torch_bridge import DSGLinear, MaskedLinearFunction  # noqa: E402

TOL = 1e-5


@pytest.mark.parametrize("bias, relu", [(True, True), (False, True), (True, False)])
def test_forward_and_gradients_match_torch_autograd(queue, rng, bias, relu):
    m, k, n, sparsity = 7, 19, 23, 0.7
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32)).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).requires_grad_() \
        if bias else None
    # The exact projection makes the search the exact top-k of x @ W^T, which torch can
    # reproduce.
    exact = ps.SparseRandomProjection(k, exact=True, queue=queue)
    y = MaskedLinearFunction.apply(x, w, b, sparsity, exact, relu, queue)
    dy = torch.from_numpy(rng.standard_normal((m, n), dtype=np.float32))
    y.backward(dy)

    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    b64 = b.detach().double().requires_grad_() if bias else None
    scores = x64.detach() @ w64.detach().T
    keep = ps.ops.drs.keep_count(sparsity, n)
    mask = torch.zeros(m, n, dtype=torch.bool)
    mask.scatter_(1, scores.topk(keep, dim=1).indices, True)
    pre = x64 @ w64.T + (b64 if bias else 0.0)
    ref = torch.where(mask, pre, torch.zeros_like(pre))
    if relu:
        ref = torch.relu(ref)
    ref.backward(dy.double())
    assert relative_error(y.detach().numpy(), ref.detach().numpy()) < TOL
    assert relative_error(x.grad.numpy(), x64.grad.numpy()) < TOL
    assert relative_error(w.grad.numpy(), w64.grad.numpy()) < TOL
    if bias:
        assert relative_error(b.grad.numpy(), b64.grad.numpy()) < TOL


def test_a_module_trains(queue, rng):
    """Two DSG layers and a dense head learn a separable toy problem through torch's
    optimizer; only the selected outputs carry gradient."""
    torch.manual_seed(0)
    centres = rng.standard_normal((4, 32)).astype(np.float32) * 3
    labels = rng.integers(0, 4, 512)
    x = torch.from_numpy(centres[labels] + rng.standard_normal((512, 32), dtype=np.float32))
    y = torch.from_numpy(labels)
    model = torch.nn.Sequential(DSGLinear(32, 128, 0.8, queue=queue),
                                DSGLinear(128, 128, 0.8, seed=1, queue=queue),
                                torch.nn.Linear(128, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.95, accuracy
    hidden = model[0](x)
    assert float((hidden != 0).float().mean()) <= 0.2 + 1e-6     # at most 20% selected


def test_bad_input(queue):
    layer = DSGLinear(8, 4, 0.5, queue=queue)
    with pytest.raises(TypeError, match="x must be float32"):
        layer(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be \(M, K\)"):
        layer(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="sparsity"):
        DSGLinear(8, 4, 1.5, queue=queue)(torch.zeros(2, 8))
