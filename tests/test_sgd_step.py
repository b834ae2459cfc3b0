"""sgd_step: one call for forward, loss, backward and the in-place update, equal to autograd."""
import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import problem, to_torch

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, both CPU variants


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_one_step_equals_autograd_float64(bias, reduction, device):
    x, y, params = problem(33, 65, 29, 7, bias=bias)
    lr = 1e-2
    ours = to_torch(params, device)
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    loss = tl.sgd_step(xt, yt, ours["w1"], ours["w2"], ours["b1"], ours["b2"], lr=lr,
                       reduction=reduction)
    ref = to_torch(params, device, requires_grad=True)
    ref_loss = R.autograd_sgd_step(xt, yt, ref, lr, reduction)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert not loss.requires_grad
    for k in ours:
        if ours[k] is None:
            continue
        err = (ours[k] - ref[k].detach()).abs().max() / ref[k].detach().abs().max()
        assert err < 1e-12, k


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


def test_many_float32_steps_track_autograd():
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


def test_strided_weights_updated_in_place(device):
    x, y, params = problem(8, 6, 5, 3, bias=False)
    w1_t = torch.tensor(params["w1"].T.copy(), device=device).t()  # transposed storage
    w2 = torch.tensor(params["w2"], device=device)
    ptr = w1_t.data_ptr()
    ref = to_torch(params, device, requires_grad=True)
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    tl.sgd_step(xt, yt, w1_t, w2, lr=1e-2)
    R.autograd_sgd_step(xt, yt, ref, 1e-2)
    assert w1_t.data_ptr() == ptr and not w1_t.is_contiguous()
    torch.testing.assert_close(w1_t, ref["w1"].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w2, ref["w2"].detach(), rtol=1e-12, atol=1e-12)


def test_leaf_parameters_and_no_grad():
    net = tl.TwoLayerNet(5, 4, 2)
    x, y = torch.randn(3, 5), torch.randn(3, 2)
    net.sgd_step(x, y, lr=0.1)  # leaf params with requires_grad: fine, like optimizer.step()
    with torch.no_grad():
        net.sgd_step(x, y, lr=0.1)
    assert net.w1.grad is None


def test_compiled_sgd_step():
    torch.manual_seed(0)
    net, ref = tl.TwoLayerNet(6, 5, 2), tl.TwoLayerNet(6, 5, 2)
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(4, 6), torch.randn(4, 2)
    step = torch.compile(lambda: net.sgd_step(x, y, lr=1e-2), fullgraph=True)
    for _ in range(3):
        torch.testing.assert_close(step(), ref.sgd_step(x, y, lr=1e-2))
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


BAD = [
    (dict(lr=-1.0), ValueError, "lr must be a finite number >= 0"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number >= 0"),
    (dict(lr=float("inf")), ValueError, "lr must be a finite number >= 0"),
    (dict(lr="0.1"), TypeError, "lr must be a float"),
    (dict(reduction="max"), ValueError, 'reduction must be "sum" or "mean"'),
    (dict(target=torch.zeros(4, 3)), ValueError, r"target must have shape \[N, D_out\]"),
    (dict(target=torch.zeros(3, 2, dtype=torch.float64)), TypeError, "target must have the same dtype"),
    (dict(w1=torch.zeros(1, 1).expand(5, 4)), ValueError, "w1 is updated in place"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD)
def test_bad_sgd_step_input(kwargs, exc, msg):
    args = dict(x=torch.randn(3, 5), target=torch.randn(3, 2), w1=torch.randn(5, 4),
                w2=torch.randn(4, 2), lr=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        tl.sgd_step(**args)


def test_aliasing_weights_refused():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="w1 is updated in place and must not share memory with w2"):
        tl.sgd_step(torch.randn(3, 4), torch.randn(3, 4), w, w, lr=0.1)
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="must not share memory with x"):
        tl.sgd_step(x, torch.randn(4, 4), x, torch.randn(4, 4), lr=0.1)


def test_non_leaf_weight_in_graph_refused():
    base = torch.randn(5, 4, requires_grad=True)
    w1 = base * 2
    with pytest.raises(RuntimeError, match="non-leaf tensor inside an autograd graph"):
        tl.sgd_step(torch.randn(3, 5), torch.randn(3, 2), w1, torch.randn(4, 2), lr=0.1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_many_rows_narrow_layers(bias, reduction, device):
    # Many rows and small weights: the CPU's row-blocked path (N >= 4096).
    x, y, params = problem(5000, 33, 40, 9, bias=bias, seed=3)
    ours = to_torch(params, device)
    ours["w1"] = ours["w1"].t().contiguous().t()  # a transposed weight, updated in place
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    loss = tl.sgd_step(xt, yt, ours["w1"], ours["w2"], ours["b1"], ours["b2"], lr=1e-4,
                       reduction=reduction)
    ref = to_torch(params, device, requires_grad=True)
    assert loss.item() == pytest.approx(R.autograd_sgd_step(xt, yt, ref, 1e-4, reduction), rel=1e-12)
    for k, v in ours.items():
        if v is not None:
            err = (v - ref[k].detach()).abs().max() / ref[k].detach().abs().max()
            assert err < 1e-12, k


@pytest.mark.parametrize("frozen", [("w1",), ("b2",), ("w1", "w2", "b1", "b2")])
def test_frozen_weights_are_not_touched(frozen):
    """requires_grad=False freezes a parameter: sgd_step neither computes its gradient nor
    updates it, and the others move exactly as autograd + SGD on the unfrozen ones."""
    torch.manual_seed(0)
    net = tl.TwoLayerNet(12, 8, 3, dtype=torch.float64)
    ref = tl.TwoLayerNet(12, 8, 3, dtype=torch.float64)
    ref.load_state_dict(net.state_dict())
    for name in frozen:
        getattr(net, name).requires_grad_(False)
        getattr(ref, name).requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad] or [torch.zeros(1)],
                          lr=1e-2)
    for _ in range(3):
        loss = net.sgd_step(x, y, lr=1e-2)
        ref_loss = tl.l2_loss(ref(x), y)
        if ref_loss.requires_grad:
            opt.zero_grad()
            ref_loss.backward()
            opt.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for name, p in net.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), f"{name} is frozen but moved"
        else:
            assert not torch.equal(p, before[name]), f"{name} did not move"
        torch.testing.assert_close(p, getattr(ref, name), rtol=1e-12, atol=1e-12, msg=name)


def test_functional_sgd_step_freezes_only_once_a_weight_requires_grad():
    x, y, params = problem(10, 6, 5, 2, bias=True)
    plain = to_torch(params, "cpu")
    start = {k: v.clone() for k, v in plain.items()}
    tl.sgd_step(torch.tensor(x), torch.tensor(y), plain["w1"], plain["w2"], plain["b1"],
                plain["b2"], lr=1e-2)
    assert all(not torch.equal(plain[k], start[k]) for k in plain)  # the tutorial's style
    mixed = to_torch(params, "cpu")
    mixed["w2"].requires_grad_(True)
    tl.sgd_step(torch.tensor(x), torch.tensor(y), mixed["w1"], mixed["w2"], mixed["b1"],
                mixed["b2"], lr=1e-2)
    assert not torch.equal(mixed["w2"], start["w2"])
    for k in ("w1", "b1", "b2"):
        assert torch.equal(mixed[k], start[k]), f"{k} does not require grad, so it is frozen"
