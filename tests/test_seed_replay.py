"""Behaviour: the tutorial's 500 SGD steps in float64: ours replays the numpy loop step for step,
through two_layer + l2_loss + autograd and through TwoLayerNet.sgd_step (moved here from
test_sgd_step.py). Per CPU kernel variant."""

import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

pytestmark = [
    pytest.mark.usefixtures("cpu_kernel"),  # every test, every CPU variant
    pytest.mark.slow,
]  # 500 steps each

STEPS, LR = 500, 1e-6


def numpy_losses(x, y, params):
    params = {k: None if v is None else v.copy() for k, v in params.items()}
    return [R.numpy_sgd_step(x, y, params, LR) for _ in range(STEPS)], params


def test_two_layer_autograd_replays_numpy():
    x, y, params = R.tutorial_data(seed=0)  # the tutorial's unscaled randn draw
    expected, final = numpy_losses(x, y, params)

    xt, yt = torch.tensor(x), torch.tensor(y)
    w1 = torch.tensor(params["w1"], requires_grad=True)
    w2 = torch.tensor(params["w2"], requires_grad=True)
    losses = []
    for _ in range(STEPS):  # the tutorial's autograd cell, fixed, with our ops
        loss = tl.l2_loss(tl.two_layer(xt, w1, w2), yt)
        loss.backward()
        with torch.no_grad():
            w1 -= LR * w1.grad
            w2 -= LR * w2.grad
            w1.grad.zero_()
            w2.grad.zero_()
        losses.append(loss.item())

    np.testing.assert_allclose(losses, expected, rtol=1e-8)
    assert expected[-1] < 1e-2 * expected[0]  # it trained
    np.testing.assert_allclose(w1.detach().numpy(), final["w1"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w2.detach().numpy(), final["w2"], rtol=1e-8, atol=1e-10)


def test_seed_replay_through_sgd_step():
    x, y, params = R.tutorial_data(seed=0)
    np_params = {k: None if v is None else v.copy() for k, v in params.items()}
    expected = [R.numpy_sgd_step(x, y, np_params, 1e-6) for _ in range(500)]
    net = tl.TwoLayerNet(1000, 100, 10, bias=False, dtype=torch.float64)
    with torch.no_grad():
        net.w1.copy_(torch.tensor(params["w1"]))
        net.w2.copy_(torch.tensor(params["w2"]))
    xt, yt = torch.tensor(x), torch.tensor(y)
    losses = [net.sgd_step(xt, yt, lr=1e-6).item() for _ in range(500)]
    np.testing.assert_allclose(losses, expected, rtol=1e-8)
    np.testing.assert_allclose(net.w1.detach().numpy(), np_params["w1"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(net.w2.detach().numpy(), np_params["w2"], rtol=1e-8, atol=1e-10)
