"""Behaviour: the ops are well-formed torch ops. opcheck on every op (with and without
requires_grad; float64, and every dtype a device takes: float16/bfloat16 on CUDA, moved here from
test_cuda.py), float64 gradcheck (N = 0, 1, 5), and double backward as a clear error. Per device."""

import pytest
import torch
from torch.library import opcheck

import twolayer_ext as tl

from conftest import ALL_DTYPES, OUTPUT_MASKS, UPDATE_MASKS, skip_unless_dtype_runs_on

OPS = torch.ops.twolayer_ext


def inputs(device, bias, requires_grad, N=5):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (
        torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_(requires_grad)
    )  # noqa: E731
    x, w1, w2 = mk(N, 4), mk(4, 6), mk(6, 3)
    b1, b2 = (mk(6), mk(3)) if bias else (None, None)
    return x, w1, w2, b1, b2


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_two_layer(device, bias, requires_grad):
    # The public op carries the autograd formula; the kernel op behind it is checked without.
    opcheck(OPS.two_layer, inputs(device, bias, requires_grad))
    opcheck(OPS.two_layer_fwd, inputs(device, bias, False))


@pytest.mark.parametrize(
    "mask",
    [[True] * 5, [False, True, False, True, False], [True, False, True, False, False], [False] * 5],
)
def test_opcheck_two_layer_bwd(device, mask):  # mask order: (x, w1, w2, b1, b2)
    x, w1, w2, b1, b2 = inputs(device, True, False)
    _, act = OPS.two_layer_fwd(x, w1, w2, b1, b2)
    grad_y = torch.randn(5, 3, dtype=torch.float64, device=device)
    opcheck(OPS.two_layer_bwd, (grad_y, x, w1, w2, act, mask))
    # Weight gradients in nn.Linear's layout (the transpose of a row-major matrix).
    opcheck(OPS.two_layer_bwd, (grad_y, x, w1, w2, act, mask, [True, True]))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_opcheck_l2_loss(device, reduction, requires_grad):
    pred = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=requires_grad)
    target = torch.randn(5, 3, dtype=torch.float64, device=device)
    opcheck(OPS.l2_loss, (pred, target, reduction))
    opcheck(OPS.l2_loss_fwd, (pred.detach(), target, reduction, requires_grad))
    grad_loss = torch.tensor(1.5, dtype=torch.float64, device=device)
    opcheck(OPS.l2_loss_bwd, (grad_loss, pred.detach()))


@pytest.mark.parametrize("which", ["weights", "all", "none"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_two_layer_l2_loss(device, bias, reduction, which):
    x, w1, w2, b1, b2 = inputs(device, bias, which != "none")
    target = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=which == "all")
    if which == "weights":
        x = x.detach()
    opcheck(OPS.two_layer_l2_loss, (x, target, w1, w2, b1, b2, reduction))
    # nn.Linear-layout weights (TwoLayerNet's own parameters)
    lin = [w.detach().t().contiguous().requires_grad_(w.requires_grad) for w in (w1, w2)]
    opcheck(OPS.two_layer_l2_loss, (x, target, *lin, b1, b2, reduction, True))
    mask = [which == "all"] * 2 + [which != "none"] * 2 + [which != "none" and bias] * 2
    plain = [None if t is None else t.detach() for t in (x, target, w1, w2, b1, b2)]
    opcheck(OPS.two_layer_l2_loss_fwd, (*plain, reduction, mask))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N", [0, 1, 5])
def test_gradcheck_two_layer_l2_loss(device, bias, N):
    x, w1, w2, b1, b2 = inputs(device, bias, True, N=N)
    target = torch.randn(N, 3, dtype=torch.float64, device=device, requires_grad=True)
    for reduction in ("sum", "mean") if N else ("sum",):
        assert torch.autograd.gradcheck(
            lambda *a: tl.two_layer_l2_loss(*a, reduction=reduction), (x, target, w1, w2, b1, b2)
        )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N", [0, 1, 5])
def test_gradcheck_two_layer(device, bias, N):
    assert torch.autograd.gradcheck(tl.two_layer, inputs(device, bias, True, N=N))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck_l2_loss(device, reduction):
    pred = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: tl.l2_loss(p, t, reduction), (pred, target))


def test_double_backward_is_a_clear_error(device):
    x, w1, w2, b1, b2 = inputs(device, True, True)
    loss = tl.l2_loss(
        tl.two_layer(x, w1, w2, b1, b2), torch.zeros(5, 3, dtype=torch.float64, device=device)
    )
    (gw1,) = torch.autograd.grad(loss, w1, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gw1.sum().backward()
    fused = tl.two_layer_l2_loss(
        x, torch.zeros(5, 3, dtype=torch.float64, device=device), w1, w2, b1, b2
    )
    (gw1,) = torch.autograd.grad(fused, w1, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gw1.sum().backward()


def dtype_inputs(device, dtype, bias, requires_grad, N=5):
    g = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device).requires_grad_(requires_grad)

    x, w1, w2 = make(N, 4), make(4, 6), make(6, 3)
    b1, b2 = (make(6), make(3)) if bias else (None, None)
    return x, w1, w2, b1, b2


@pytest.mark.slow  # opcheck of every op: seconds per dtype
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_opcheck_every_op_in_every_dtype(device, dtype, requires_grad):
    # The public ops carry the autograd formulas, so they are the ones checked with inputs that
    # require grad; the kernel ops behind them are internal (no autograd) and checked without.
    skip_unless_dtype_runs_on(device, dtype)
    x, w1, w2, b1, b2 = dtype_inputs(device, dtype, True, requires_grad)
    target = torch.randn(5, 3, device=device).to(dtype)
    pred = torch.randn(5, 3, device=device).to(dtype).requires_grad_(requires_grad)
    opcheck(OPS.two_layer, (x, w1, w2, b1, b2))
    opcheck(OPS.two_layer, (x, w1, w2, None, None))
    for reduction in ("sum", "mean"):
        opcheck(OPS.l2_loss, (pred, target, reduction))
        opcheck(OPS.two_layer_l2_loss, (x, target, w1, w2, b1, b2, reduction))
    x, w1, w2, b1, b2 = (t.detach() for t in (x, w1, w2, b1, b2))
    opcheck(OPS.two_layer_fwd, (x, w1, w2, b1, b2))
    opcheck(OPS.two_layer_fwd, (x, w1, w2, None, None))
    _, act = OPS.two_layer_fwd(x, w1, w2, b1, b2)
    grad_y = torch.randn(5, 3, device=device).to(dtype)
    # (x, w1, w2, b1, b2): everything, the weights alone, nothing
    for mask in ([True] * 5, [False, True, True, False, False], [False] * 5):
        opcheck(OPS.two_layer_bwd, (grad_y, x, w1, w2, act, mask))
    for reduction in ("sum", "mean"):
        opcheck(OPS.l2_loss_fwd, (pred.detach(), target, reduction, requires_grad))
    opcheck(OPS.l2_loss_bwd, (torch.tensor(1.5, device=device).to(dtype), grad_y))
    for mask in OUTPUT_MASKS:
        opcheck(OPS.two_layer_l2_loss_fwd, (x, target, w1, w2, b1, b2, "mean", mask))
    for update in UPDATE_MASKS:
        w1c, w2c, b1c, b2c = (t.clone() for t in (w1, w2, b1, b2))
        opcheck(OPS.sgd_step, (x, target, w1c, w2c, b1c, b2c, 1e-2, "mean", update))
