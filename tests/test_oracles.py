"""The three oracles agree with each other (float64): numpy, torch manual, autograd."""
import numpy as np
import pytest
import torch

from twolayer_ext import reference as R

from conftest import problem, to_torch


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_one_sgd_step_agrees(bias, reduction):
    x, y, params = problem(9, 17, 6, 4, bias=bias)
    lr = 1e-2
    np_params = {k: None if v is None else v.copy() for k, v in params.items()}
    loss_np = R.numpy_sgd_step(x, y, np_params, lr, reduction)

    man = to_torch(params, "cpu")
    loss_man = R.manual_sgd_step(torch.tensor(x), torch.tensor(y), man, lr, reduction)

    auto = to_torch(params, "cpu", requires_grad=True)
    loss_auto = R.autograd_sgd_step(torch.tensor(x), torch.tensor(y), auto, lr, reduction)

    assert loss_man == pytest.approx(loss_np, rel=1e-12)
    assert loss_auto == pytest.approx(loss_np, rel=1e-12)
    for k, v in np_params.items():
        if v is None:
            assert man[k] is None and auto[k] is None
            continue
        np.testing.assert_allclose(man[k].numpy(), v, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(auto[k].detach().numpy(), v, rtol=1e-12, atol=1e-14)


def test_fixed_autograd_cell_trains():
    # The tutorial's last cell died at step 1 (w1.grad was None); the fixed one keeps going.
    x, y, params = R.tutorial_data(64, 1000, 100, 10, seed=3)
    p = to_torch(params, "cpu", requires_grad=True)
    losses = [R.autograd_sgd_step(torch.tensor(x), torch.tensor(y), p, 1e-6) for _ in range(20)]
    assert losses[-1] < losses[0] / 10
    assert p["w1"].is_leaf and p["w1"].grad is not None


def test_relu_mask_matches_numpy_at_zero_and_nan():
    h = np.array([[-1.0, 0.0, -0.0, 2.0, np.nan]])
    g = np.ones_like(h)
    grads = R.numpy_backward(np.ones((1, 1)), np.ones((1, 5)), np.ones((5, 1)), h,
                             np.maximum(h, 0), g[:, :1])
    # numpy's grad_h[h < 0] = 0: the gradient passes at 0, -0.0 and NaN.
    np.testing.assert_array_equal(grads["b1"], [0.0, 1.0, 1.0, 1.0, 1.0])
