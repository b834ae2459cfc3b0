"""two_layer_l2_loss (and TwoLayerNet.loss): the fused loss behaves like any autograd loss.

Its gradients are computed in the forward call, so these tests check the autograd contract
from the outside: optimizers, accumulation, clipping, frozen parameters, inputs requiring grad,
no_grad/inference_mode, N-D inputs, against the autograd witness and the numpy oracle."""

import numpy as np
import pytest
import torch
from torch import nn

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import problem, to_torch

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, every CPU variant


def pair(bias=True, seed=0, dtype=torch.float64, device="cpu", D=(12, 9, 4)):
    """A TwoLayerNet and an equal nn.Sequential (the autograd witness)."""
    torch.manual_seed(seed)
    net = tl.TwoLayerNet(*D, bias=bias, dtype=dtype, device=device)
    return net, net.to_sequential()


def seq_loss(seq, x, y, reduction="sum"):
    return nn.MSELoss(reduction=reduction)(seq(x), y)


def assert_grads_match(net, seq, rtol=1e-12):
    torch.testing.assert_close(net.weight1.grad, seq[0].weight.grad, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(net.weight2.grad, seq[2].weight.grad, rtol=rtol, atol=1e-12)
    if net.b1 is not None:
        torch.testing.assert_close(net.b1.grad, seq[0].bias.grad, rtol=rtol, atol=1e-12)
        torch.testing.assert_close(net.b2.grad, seq[2].bias.grad, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_and_gradients_equal_numpy_oracle(bias, reduction, device):
    x, y, params = problem(33, 20, 11, 6, bias=bias)
    ours = to_torch(params, device, requires_grad=True)
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    loss = tl.two_layer_l2_loss(
        xt, yt, ours["w1"], ours["w2"], ours["b1"], ours["b2"], reduction=reduction
    )
    loss.backward()
    np_params = {k: None if v is None else v.copy() for k, v in params.items()}
    h, h_relu, y_pred = R.numpy_forward(
        x, np_params["w1"], np_params["w2"], np_params["b1"], np_params["b2"]
    )
    n = y.size if reduction == "mean" else 1
    expected = R.numpy_backward(
        x, np_params["w1"], np_params["w2"], h, h_relu, 2.0 * (y_pred - y) / n
    )
    assert loss.item() == pytest.approx(np.square(y_pred - y).sum() / n, rel=1e-12)
    for k, w in ours.items():
        if w is not None:
            np.testing.assert_allclose(
                w.grad.cpu().numpy(), expected[k], rtol=1e-10, atol=1e-12, err_msg=k
            )


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.Adam(p),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.Adagrad(p),
        lambda p: torch.optim.Adadelta(p),
        lambda p: torch.optim.Adamax(p),
        lambda p: torch.optim.ASGD(p),
        lambda p: torch.optim.NAdam(p),
        lambda p: torch.optim.RAdam(p),
        lambda p: torch.optim.RMSprop(p),
        lambda p: torch.optim.Rprop(p),
        lambda p: torch.optim.LBFGS(p, max_iter=3),
    ],
    ids=[
        "SGD",
        "SGD-nesterov",
        "Adam",
        "AdamW",
        "Adagrad",
        "Adadelta",
        "Adamax",
        "ASGD",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "LBFGS",
    ],
)
def test_every_optimizer_trains_like_nn_sequential(make_opt):
    net, seq = pair()
    x, y = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    opt_ours, opt_ref = make_opt(net.parameters()), make_opt(seq.parameters())
    for _ in range(4):

        def closure_ours():
            opt_ours.zero_grad()
            loss = net.loss(x, y, "sum")
            loss.backward()
            return loss

        def closure_ref():
            opt_ref.zero_grad()
            loss = seq_loss(seq, x, y)
            loss.backward()
            return loss

        a, b = opt_ours.step(closure_ours), opt_ref.step(closure_ref)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    back = tl.TwoLayerNet.from_sequential(seq)
    for (name, p), q in zip(net.named_parameters(), back.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


def test_gradients_accumulate_and_clip():
    net, seq = pair()
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    for half in (slice(0, 5), slice(5, 10)):  # two micro-batches add into .grad
        (net.loss(x[half], y[half], "sum") * 0.5).backward()
        (seq_loss(seq, x[half], y[half]) * 0.5).backward()
    assert_grads_match(net, seq)
    n1 = nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
    n2 = nn.utils.clip_grad_norm_(seq.parameters(), max_norm=1.0)
    torch.testing.assert_close(n1, n2)
    assert_grads_match(net, seq)


def test_frozen_parameters_get_no_gradient_and_do_not_move():
    net, seq = pair()
    net.weight1.requires_grad_(False)
    net.b2.requires_grad_(False)
    seq[0].weight.requires_grad_(False)
    seq[2].bias.requires_grad_(False)
    frozen = (net.w1.clone(), net.b2.clone())
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad])
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        net.loss(x, y, "sum").backward()
        seq_loss(seq, x, y).backward()
        opt.step()
    assert net.weight1.grad is None and net.b2.grad is None
    assert torch.equal(net.w1, frozen[0]) and torch.equal(net.b2, frozen[1])
    assert net.weight2.grad is not None and net.b1.grad is not None


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_x_and_target_requiring_grad(reduction):
    net, seq = pair()
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    gx, gy = torch.autograd.grad(net.loss(x, y, reduction) * 3.0, (x, y))
    rx, ry = torch.autograd.grad(seq_loss(seq, x, y, reduction) * 3.0, (x, y))
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gy, ry, rtol=1e-12, atol=1e-12)


def test_no_grad_and_inference_mode_compute_only_the_loss():
    net, seq = pair()
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    expected = seq_loss(seq, x, y).detach()
    with torch.no_grad():
        a = net.loss(x, y, "sum")
    with torch.inference_mode():
        b = net.loss(x, y, "sum")
    for loss in (a, b):
        assert not loss.requires_grad and loss.grad_fn is None
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 12), (12,), (1, 1, 5, 12), (0, 12)])
def test_leading_dimensions_like_nn_linear(shape):
    net, seq = pair()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    torch.testing.assert_close(net(x), seq(x), rtol=1e-12, atol=1e-12)
    assert net(x).shape == seq(x).shape
    net.loss(x, y, "sum").backward()
    seq_loss(seq, x, y).backward()
    assert_grads_match(net, seq)
    with pytest.raises(ValueError, match=r"target must have shape \[\*, D_out\] = \[[0-9, ]*4\]"):
        net.loss(x, y.reshape(-1, 4)[:1] if x.dim() > 2 else torch.randn(3, 2, 4), "sum")


def test_transposed_weights_read_in_place():
    net, seq = pair()
    x, y = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    w1 = net.w1.detach().t().contiguous().t().requires_grad_()  # column-major [D_in, H]
    w2 = net.w2.detach().t().contiguous().t().requires_grad_()
    loss = tl.two_layer_l2_loss(x, y, w1, w2, net.b1, net.b2)
    loss.backward()
    seq_loss(seq, x, y).backward()
    torch.testing.assert_close(w1.grad, seq[0].weight.grad.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w2.grad, seq[2].weight.grad.t(), rtol=1e-12, atol=1e-12)


def test_backward_hands_the_saved_gradients_over_without_a_copy():
    """loss.backward() seeds 1: the gradients made in the forward go to .grad as they are (no
    scaling, no copy: they are in the parameters' own layout); retain_graph keeps them for a
    second backward, and any other seed scales them."""
    net, seq = pair()
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    loss = net.loss(x, y, "sum")
    with torch.profiler.profile() as prof:
        loss.backward()
    ran = {e.name for e in prof.events()}
    assert not ran & {"aten::mul", "aten::clone", "aten::copy_", "twolayer_ext::l2_loss_bwd"}, ran
    seq_loss(seq, x, y).backward()
    assert_grads_match(net, seq)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    loss = net.loss(x, y, "sum")
    loss.backward(retain_graph=True)  # shared with .grad, so copied there
    loss.backward()  # the retained graph: the same gradients once more
    for _ in range(2):
        seq_loss(seq, x, y).backward()
    assert_grads_match(net, seq)
    (net.loss(x, y, "sum") * 0.5).backward()
    (seq_loss(seq, x, y) * 0.5).backward()
    assert_grads_match(net, seq)


def test_default_reduction_is_mse_loss_default():
    # A drop-in for nn.Sequential + nn.MSELoss(): the same loss and gradient with no argument.
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    seq = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    net = tl.TwoLayerNet.from_sequential(seq)
    ours, ref = net.loss(x, y), nn.MSELoss()(seq(x), y)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(net(x, y), ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(net.weight1.grad, seq[0].weight.grad)
    torch.testing.assert_close(net.bias2.grad, seq[2].bias.grad)


def test_module_loss_graph_has_no_view_nodes_and_matches_the_views():
    # TwoLayerNet.loss passes its nn.Linear-layout parameters as they are (linear_layout): the
    # same loss and gradients as through the tutorial-layout views, without TBackward nodes,
    # and the gradients land in the parameters' own layout.
    torch.manual_seed(0)
    net = tl.TwoLayerNet(6, 5, 3, dtype=torch.float64)
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    loss = net.loss(x, y, "sum")
    assert {e[0].name() for e in loss.grad_fn.next_functions if e[0]} == {
        "torch::autograd::AccumulateGrad"
    }
    loss.backward()
    fused = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    tl.two_layer_l2_loss(x, y, net.w1, net.w2, net.b1, net.b2, reduction="sum").backward()
    for p, g in zip(net.parameters(), fused):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
        assert g.stride() == p.stride()
    torch.testing.assert_close(
        loss, tl.two_layer_l2_loss(x, y, net.w1, net.w2, net.b1, net.b2, reduction="sum")
    )
