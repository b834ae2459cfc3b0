"""Behaviour: the ops agree with the oracles (twolayer_ext.reference).

- two_layer forward and gradients against the numpy float64 oracle and against autograd, and as a
  drop-in for the tutorial's expression;
- l2_loss and its gradient against numpy, (pred - target).pow(2).sum() and nn.MSELoss;
- sgd_step (forward, loss, backward, in-place update) against autograd + SGD: one step, many rows
  (the CPU's row-blocked path), and 50 float32 steps;
- the three oracles (numpy, torch manual, autograd) agree with each other.

Per device ([cuda] cases skip without a GPU) and per CPU kernel variant. The tutorial's 500-step
replay is tests/test_seed_replay.py; CUDA's float16/bfloat16/TF32 accuracy is tests/test_cuda.py.
Merged from test_two_layer.py, test_l2_loss.py, test_sgd_step.py and test_oracles.py.
"""

import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import TORCH_DTYPE, assert_close_np, problem, to_torch

KERNELS = pytest.mark.usefixtures("cpu_kernel")  # every CPU kernel variant, and CUDA

SHAPES = [(64, 1000, 100, 10), (7, 13, 5, 3), (1, 4, 3, 2), (33, 65, 129, 17)]
PARAM_ORDER = ("w1", "w2", "b1", "b2")


# ---- two_layer ---------------------------------------------------------------------------------


def run_fused(x, params, grad_y, device, dtype):
    xt = torch.tensor(x, dtype=dtype, device=device, requires_grad=True)
    p = to_torch(params, device, dtype, requires_grad=True)
    y = tl.two_layer(xt, p["w1"], p["w2"], p["b1"], p["b2"])
    y.backward(torch.tensor(grad_y, dtype=dtype, device=device))
    grads = {k: (None if v is None else v.grad) for k, v in p.items()}
    grads["x"] = xt.grad
    return y, grads


@KERNELS
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_two_layer_matches_numpy_float64(shape, bias, device):
    x, _, params = problem(*shape, bias=bias)
    grad_y = np.random.default_rng(1).standard_normal((shape[0], shape[3]))
    y, grads = run_fused(x, params, grad_y, device, torch.float64)

    h, h_relu, y_np = R.numpy_forward(x, params["w1"], params["w2"], params["b1"], params["b2"])
    expected = R.numpy_backward(x, params["w1"], params["w2"], h, h_relu, grad_y)
    assert_close_np(y, y_np, rtol=1e-10, atol=1e-12, what="y")
    for name in ("x",) + PARAM_ORDER:
        if params.get(name, x) is None:
            assert grads[name] is None
            continue
        assert_close_np(grads[name], expected[name], rtol=1e-10, atol=1e-12, what=name)


@KERNELS
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_two_layer_matches_autograd(dtype, bias, device):
    dt = TORCH_DTYPE[dtype]
    x, _, params = problem(33, 65, 129, 17, bias=bias, seed=5)
    grad_y = np.random.default_rng(2).standard_normal((33, 17))
    y, grads = run_fused(x, params, grad_y, device, dt)

    xt = torch.tensor(x, dtype=dt, device=device, requires_grad=True)
    p = to_torch(params, device, dt, requires_grad=True)
    y_ref = R.autograd_forward(xt, p["w1"], p["w2"], p["b1"], p["b2"])
    y_ref.backward(torch.tensor(grad_y, dtype=dt, device=device))

    tol = dict(rtol=1e-5, atol=1e-5) if dt == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(grads["x"], xt.grad, **tol)
    for name in PARAM_ORDER:
        if p[name] is not None:
            torch.testing.assert_close(grads[name], p[name].grad, **tol, msg=name)
    assert y.dtype == dt and y.device.type == device


@KERNELS
def test_drop_in_for_tutorial_expression(device):
    x, _, params = R.tutorial_data(64, 1000, 100, 10, seed=7)
    xt, w1, w2 = (torch.tensor(a, device=device) for a in (x, params["w1"], params["w2"]))
    torch.testing.assert_close(
        tl.two_layer(xt, w1, w2), xt.mm(w1).clamp(min=0).mm(w2), rtol=1e-12, atol=1e-6
    )


# ---- l2_loss -----------------------------------------------------------------------------------


@KERNELS
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(64, 10), (7, 3), (1, 1), (5,), (2, 3, 4), ()])
def test_l2_loss_matches_numpy_and_gradient(reduction, shape, device):
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


@KERNELS
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_l2_loss_matches_torch(dtype, reduction, device):
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


# ---- sgd_step ----------------------------------------------------------------------------------


@KERNELS
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sgd_step_equals_autograd_float64(bias, reduction, device):
    x, y, params = problem(33, 65, 29, 7, bias=bias)
    lr = 1e-2
    ours = to_torch(params, device)
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    loss = tl.sgd_step(
        xt, yt, ours["w1"], ours["w2"], ours["b1"], ours["b2"], lr=lr, reduction=reduction
    )
    ref = to_torch(params, device, requires_grad=True)
    ref_loss = R.autograd_sgd_step(xt, yt, ref, lr, reduction)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert not loss.requires_grad
    for k in ours:
        if ours[k] is None:
            continue
        err = (ours[k] - ref[k].detach()).abs().max() / ref[k].detach().abs().max()
        assert err < 1e-12, k


@KERNELS
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sgd_step_many_rows_narrow_layers(bias, reduction, device):
    # Many rows and small weights: the CPU's row-blocked path (N >= 4096).
    x, y, params = problem(5000, 33, 40, 9, bias=bias, seed=3)
    ours = to_torch(params, device)
    ours["w1"] = ours["w1"].t().contiguous().t()  # a transposed weight, updated in place
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    loss = tl.sgd_step(
        xt, yt, ours["w1"], ours["w2"], ours["b1"], ours["b2"], lr=1e-4, reduction=reduction
    )
    ref = to_torch(params, device, requires_grad=True)
    assert loss.item() == pytest.approx(
        R.autograd_sgd_step(xt, yt, ref, 1e-4, reduction), rel=1e-12
    )
    for k, v in ours.items():
        if v is not None:
            err = (v - ref[k].detach()).abs().max() / ref[k].detach().abs().max()
            assert err < 1e-12, k


@KERNELS
def test_many_float32_sgd_steps_track_autograd():
    torch.manual_seed(0)
    net = tl.TwoLayerNet(20, 16, 4)
    ref = tl.TwoLayerNet(20, 16, 4)
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(50, 20), torch.randn(50, 4)
    for _ in range(50):
        net.sgd_step(x, y, lr=1e-3)
        loss = tl.l2_loss(ref(x), y)
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= 1e-3 * g
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the oracles among themselves (float64, no kernel of ours) -------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_three_oracles_agree_on_one_sgd_step(bias, reduction):
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
