"""torch.compile(fullgraph=True): a whole training step (forward, loss, backward, SGD update)
with TwoLayerNet, the forward + loss, the fused loss (TwoLayerNet.loss, per CPU kernel variant),
sgd_step (per CPU kernel variant) and a bfloat16 autocast forward: no graph break, and the same
numbers as eager. (CUDA graphs and mode="reduce-overhead", CUDA only: tests/test_cuda.py.)"""

import pytest
import torch

import twolayer_ext as tl


def sgd_train_step(model, x, y, lr=1e-2):
    # autograd.grad rather than loss.backward() + p.grad = None: with torch 2.13 the latter
    # gives a wrong third step under compile, for nn.Sequential just the same (not our ops).
    loss = tl.l2_loss(model(x), y)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
    return loss.detach()


@pytest.mark.slow  # inductor compiles a training step
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_training_step_matches_eager(bias):
    torch.manual_seed(0)
    eager = tl.TwoLayerNet(12, 8, 3, bias=bias, dtype=torch.float64)
    compiled = tl.TwoLayerNet(12, 8, 3, bias=bias, dtype=torch.float64)
    compiled.load_state_dict(eager.state_dict())
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)

    # Tracing autograd into the graph needs trace_autograd_ops (off by default in 2.13).
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(sgd_train_step, fullgraph=True)
        for _ in range(5):
            torch.testing.assert_close(step(compiled, x, y), sgd_train_step(eager, x, y))
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.slow  # an inductor compile with backward
def test_compiled_forward_and_loss():
    torch.manual_seed(1)
    model = tl.TwoLayerNet(12, 8, 3, dtype=torch.float64)
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    fn = torch.compile(lambda x, y: tl.l2_loss(model(x), y, "mean"), fullgraph=True)
    loss = fn(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = tl.l2_loss(model(x), y, "mean")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.usefixtures("cpu_kernel")
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


def fused_loss_pair():
    torch.manual_seed(3)
    return tl.TwoLayerNet(12, 9, 4, bias=True, dtype=torch.float64)


@pytest.mark.usefixtures("cpu_kernel")
def test_compile_fullgraph_module_and_fused_loss():
    net, ref = fused_loss_pair(), fused_loss_pair()
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    fn = torch.compile(lambda x, y: net.loss(x, y, "mean"), fullgraph=True)
    loss = fn(x, y)
    loss.backward()
    ref_loss = ref.loss(x, y, "mean")
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.slow  # an inductor compile under autocast
def test_autocast_under_torch_compile():
    torch.manual_seed(0)
    net = tl.TwoLayerNet(8, 6, 3)
    x = torch.randn(5, 8)
    compiled = torch.compile(net, fullgraph=True, dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, got = net(x), compiled(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, eager)
