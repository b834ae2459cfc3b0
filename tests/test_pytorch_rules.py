"""Behaviour: where PyTorch has a rule, the ops follow it instead of returning a quietly wrong
number: in-place updates bump version counters and leave inference tensors alone, an op without
a forward-mode or second-order formula says so, an overflowing loss is inf, an lr the weights'
dtype cannot hold is refused before anything moves, the kernel choice of use_cpu_kernel is
thread-local, optimizer state moves between nn.Sequential and TwoLayerNet exactly, and a large
call does not keep its workspace."""

import copy
import os
import threading

import pytest
import torch
from torch import nn

import twolayer_ext as tl

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, every CPU variant


def f64(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- in-place updates: version counters and inference tensors ----------------------------------


@pytest.mark.parametrize("how", ["module", "function"])
def test_sgd_step_bumps_versions_so_a_stale_graph_refuses_backward(how, device):
    net = tl.TwoLayerNet(8, 6, 3, device=device)
    x, y = torch.randn(5, 8, device=device), torch.randn(5, 3, device=device)
    loss = tl.l2_loss(net(x), y)
    before = [p._version for p in net.parameters()]
    if how == "module":
        net.sgd_step(x, y, lr=0.5)
    else:
        w1, w2 = net.w1.detach(), net.w2.detach()  # share the parameters' version counters
        tl.sgd_step(x, y, w1, w2, net.b1.detach(), net.b2.detach(), lr=0.5)
    assert all(p._version > v for p, v in zip(net.parameters(), before))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_frozen_weights_keep_their_version(device):
    net = tl.TwoLayerNet(8, 6, 3, device=device)
    net.weight1.requires_grad_(False)
    x, y = torch.randn(5, 8, device=device), torch.randn(5, 3, device=device)
    v1, v2 = net.weight1._version, net.weight2._version
    net.sgd_step(x, y, lr=0.1)
    assert net.weight1._version == v1 and net.weight2._version > v2


def test_inference_tensors_are_updated_only_inside_inference_mode(device):
    x, y = torch.randn(5, 8, device=device), torch.randn(5, 3, device=device)
    with torch.inference_mode():
        w1, w2 = torch.randn(8, 6, device=device), torch.randn(6, 3, device=device)
    before = w1.clone()
    with pytest.raises(
        RuntimeError,
        match=r"sgd_step: w1 is an inference tensor .* outside "
        r"InferenceMode is not allowed",
    ):
        tl.sgd_step(x, y, w1, w2, lr=0.1)
    assert torch.equal(w1, before)  # refused before anything moved
    with torch.inference_mode():
        tl.sgd_step(x, y, w1, w2, lr=0.1)
    assert not torch.equal(w1, before)
    # a normal tensor updated inside inference_mode still bumps its version, as torch does
    n1, n2 = torch.randn(8, 6, device=device), torch.randn(6, 3, device=device)
    v = n1._version
    with torch.inference_mode():
        tl.sgd_step(x, y, n1, n2, lr=0.1)
    assert n1._version > v


# ---- derivatives the ops have no formula for: refused, never zero ------------------------------


def _fns():
    x, y, w2 = f64(5, 4, seed=1), f64(5, 3, seed=2), f64(6, 3, seed=3)
    return {
        "two_layer": lambda w: tl.two_layer(x, w, w2).sum(),
        "two_layer+l2_loss": lambda w: tl.l2_loss(tl.two_layer(x, w, w2), y),
        "two_layer_l2_loss": lambda w: tl.two_layer_l2_loss(x, y, w, w2),
    }


@pytest.mark.parametrize("name", list(_fns()))
def test_forward_mode_ad_is_refused(name):
    f, w = _fns()[name], f64(4, 6, seed=4)
    with pytest.raises(NotImplementedError, match="forward-mode AD .* is not implemented"):
        torch.func.jvp(f, (w,), (torch.ones_like(w),))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jacfwd(f)(w)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        f(fwAD.make_dual(w, torch.ones_like(w)))


@pytest.mark.parametrize("name", ["two_layer+l2_loss", "two_layer_l2_loss"])
@pytest.mark.parametrize("transform", ["hessian", "jacrev(jacrev)", "grad(grad)"])
def test_second_order_transforms_are_refused(name, transform):
    f, w = _fns()[name], f64(4, 6, seed=4)
    with pytest.raises((RuntimeError, NotImplementedError), match="not supported|not implemented"):
        if transform == "hessian":
            torch.func.hessian(f)(w)
        elif transform == "jacrev(jacrev)":
            torch.func.jacrev(torch.func.jacrev(f))(w)
        else:
            torch.func.grad(lambda v: torch.func.grad(f)(v).sum())(w)
    # the first-order transforms still agree with torch
    x, y, w2 = f64(5, 4, seed=1), f64(5, 3, seed=2), f64(6, 3, seed=3)
    want = torch.func.grad(lambda v: ((torch.relu(x @ v) @ w2 - y) ** 2).sum())(w)
    torch.testing.assert_close(torch.func.grad(f)(w), want, rtol=1e-12, atol=1e-12)


def test_kernel_ops_called_directly_refuse_backward():
    w1 = f64(4, 6).requires_grad_()
    y, act = torch.ops.twolayer_ext.two_layer_fwd(f64(5, 4), w1, f64(6, 3), None, None)
    with pytest.raises(RuntimeError, match="two_layer_fwd has no derivative formula"):
        y.sum().backward()


# ---- overflow: inf, as torch; never an error after an update ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_an_overflowing_loss_is_inf(dtype, reduction, device):
    big = torch.finfo(dtype).max / 4
    p, t = (
        torch.full((4, 4), big, dtype=dtype, device=device),
        torch.zeros(4, 4, dtype=dtype, device=device),
    )
    want = nn.functional.mse_loss(p, t, reduction=reduction)
    assert torch.isinf(want)  # torch's own answer
    got = tl.l2_loss(p, t, reduction)
    assert got.dtype == dtype and torch.isinf(got) and got > 0


def test_an_overflowing_fused_loss_and_sgd_step_return_inf(device):
    net = tl.TwoLayerNet(4, 4, 4, device=device)
    with torch.no_grad():  # every unit active: y grows with x
        for p in net.parameters():
            p.fill_(0.1)
    x, y = torch.full((3, 4), 1e22, device=device), torch.zeros(3, 4, device=device)
    assert torch.isinf(nn.functional.mse_loss(net(x), y, reduction="sum"))  # torch's answer
    assert torch.isinf(net.loss(x, y, "sum"))
    assert torch.isinf(net.sgd_step(x, y, lr=1e-30))  # no error after the weights moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_lr_the_weights_dtype_cannot_hold_is_refused_before_any_update(dtype, device):
    net = tl.TwoLayerNet(4, 4, 4, device=device, dtype=dtype)
    x, y = (
        torch.randn(3, 4, device=device, dtype=dtype),
        torch.randn(3, 4, device=device, dtype=dtype),
    )
    before = [p.detach().clone() for p in net.parameters()]
    lr = float(torch.finfo(dtype).max) * 10
    with pytest.raises(RuntimeError):  # torch.optim refuses it too
        opt = torch.optim.SGD(copy.deepcopy(net).parameters(), lr=lr)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
    with pytest.raises(
        ValueError, match=r"sgd_step: lr must be at most .* the weights' dtype\), got"
    ):
        net.sgd_step(x, y, lr=lr)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


# ---- use_cpu_kernel is thread-local ----------------------------------------------------------


def test_use_cpu_kernel_is_thread_local():
    seen, inside, release = {}, threading.Event(), threading.Event()

    def choice():
        return tl.cpu_kernel_choice((4, 8, 8, 2))["choice"]

    def chooser():
        with tl.use_cpu_kernel("reference"):
            seen["inside"] = choice()
            inside.set()
            release.wait()

    def other():
        inside.wait()
        seen["other"] = choice()
        release.set()

    start = choice()
    threads = [threading.Thread(target=chooser), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["inside"] == "reference"
    assert seen["other"] == "auto"  # the process-wide choice, not the other thread's
    assert choice() == start
    with tl.use_cpu_kernel("blas"):  # nested: each exit restores its own entry
        with tl.use_cpu_kernel("reference"):
            assert choice() == "reference"
        assert choice() == "blas"
    assert choice() == start


# ---- optimizer state carries over from nn.Sequential -----------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("widths", [(6, 6, 6), (8, 6, 3)])
def test_optimizer_state_from_nn_sequential_resumes_exactly(bias, widths):
    torch.manual_seed(0)
    D_in, H, D_out = widths
    seq = nn.Sequential(
        nn.Linear(D_in, H, bias=bias), nn.ReLU(), nn.Linear(H, D_out, bias=bias)
    ).double()
    x, y = f64(16, D_in, seed=5), f64(16, D_out, seed=6)
    opt = torch.optim.AdamW(seq.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(seq(x), y, reduction="sum").backward()
        opt.step()
    checkpoint = copy.deepcopy({"model": seq.state_dict(), "opt": opt.state_dict()})
    net = tl.TwoLayerNet(D_in, H, D_out, bias=bias, dtype=torch.float64)
    net.load_state_dict(checkpoint["model"])
    opt2 = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt2.load_state_dict(checkpoint["opt"])
    for _ in range(2):
        for o, loss in (
            (opt, lambda: nn.functional.mse_loss(seq(x), y, reduction="sum")),
            (opt2, lambda: net.loss(x, y, "sum")),
        ):
            o.zero_grad()
            loss().backward()
            o.step()
    for a, b in zip(net.parameters(), seq.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and back: TwoLayerNet's optimizer state resumes in nn.Sequential
    seq2 = copy.deepcopy(seq)
    opt3 = torch.optim.AdamW(seq2.parameters(), lr=1e-2)
    opt3.load_state_dict(copy.deepcopy(opt2.state_dict()))
    assert all(
        torch.equal(s["exp_avg"], opt2.state[p]["exp_avg"])
        for s, p in zip(opt3.state.values(), net.parameters())
    )


# ---- a large call does not keep its workspace ------------------------------------------------


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow  # a large step per variant
@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="ASan's quarantine keeps freed memory resident",
)
def test_a_large_step_releases_its_workspace(cpu_kernel):
    N, D_in, H, D_out = 9000, 16, 2048, 4  # intermediates ~150 MB, arithmetic ~1 GFLOP
    x, y = torch.randn(N, D_in), torch.randn(N, D_out)
    w1, w2 = torch.randn(D_in, H) * 0.1, torch.randn(H, D_out) * 0.01
    tl.sgd_step(x, y, w1, w2, lr=1e-9)  # once, so lazy one-time allocations are made
    base = _rss_mib()
    tl.sgd_step(x, y, w1, w2, lr=1e-9)
    tl.two_layer_l2_loss(x, y, w1.requires_grad_(), w2)
    assert _rss_mib() - base < 40, f"{_rss_mib() - base:.0f} MiB still held after the calls"
