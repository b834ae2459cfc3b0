"""l2_loss against numpy, (pred - target).pow(2).sum() and nn.MSELoss, with its gradient."""
import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import TORCH_DTYPE


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(64, 10), (7, 3), (1, 1), (5,), (2, 3, 4), ()])
def test_matches_numpy_and_gradient(reduction, shape, device):
    rng = np.random.default_rng(0)
    p, t = rng.standard_normal(shape), rng.standard_normal(shape)
    pred = torch.tensor(p, device=device, requires_grad=True)
    target = torch.tensor(t, device=device, requires_grad=True)
    loss = tl.l2_loss(pred, target, reduction)
    assert loss.shape == () and loss.dtype == torch.float64
    np.testing.assert_allclose(loss.item(), R.numpy_loss(p, t, reduction), rtol=1e-12)
    loss.backward(torch.tensor(0.5, dtype=torch.float64, device=device))
    grad = 0.5 * R.numpy_loss_grad(p, t, reduction)
    np.testing.assert_allclose(pred.grad.cpu().numpy(), grad, rtol=1e-12)
    np.testing.assert_allclose(target.grad.cpu().numpy(), -grad, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_torch(dtype, reduction, device):
    dt = TORCH_DTYPE[dtype]
    pred = torch.randn(33, 17, dtype=dt, device=device, requires_grad=True)
    target = torch.randn(33, 17, dtype=dt, device=device)
    ours = tl.l2_loss(pred, target, reduction)
    (g_ours,) = torch.autograd.grad(ours, pred)
    mse = torch.nn.MSELoss(reduction=reduction)(pred, target)
    (g_mse,) = torch.autograd.grad(mse, pred)
    torch.testing.assert_close(ours, mse)
    torch.testing.assert_close(g_ours, g_mse)
    if reduction == "sum":
        torch.testing.assert_close(ours, (pred - target).pow(2).sum())


def test_empty_input():
    empty = torch.empty(0, 3, dtype=torch.float64)
    assert tl.l2_loss(empty, empty).item() == 0.0
    assert np.isnan(tl.l2_loss(empty, empty, "mean").item())  # as numpy and nn.MSELoss


def test_no_grad_when_nothing_requires_it():
    pred, target = torch.randn(4, 3), torch.randn(4, 3)
    loss, grad = torch.ops.twolayer_ext.l2_loss_fwd(pred, target, "sum", False)
    assert grad is None
    loss, grad = torch.ops.twolayer_ext.l2_loss_fwd(pred, target, "mean", True)
    torch.testing.assert_close(grad, 2 * (pred - target) / pred.numel())


def test_large_sum_keeps_precision():
    # 4M float32 terms: a naive float32 running sum would be off by ~1e-3 relative.
    n = 1 << 22
    pred = torch.full((n,), 1.0, dtype=torch.float32) + torch.rand(n) * 1e-3
    target = torch.zeros(n, dtype=torch.float32)
    exact = float((pred.double() ** 2).sum())
    assert abs(tl.l2_loss(pred, target).item() - exact) / exact < 1e-6
