"""Behaviour: only the gradients asked for are computed and returned.

two_layer through autograd (requires_grad on some inputs only), the two_layer_bwd op's mask,
l2_loss_fwd's need_grad flag, and the fused loss kernel's output mask (each masked result equal
to the CPU reference kernel's). Per device and per CPU kernel variant. sgd_step's update mask
(frozen weights) is tests/test_sgd_step.py. Merged from test_two_layer.py, test_l2_loss.py and
test_cuda.py (test_fused_loss_kernel_matches_cpu).
"""

import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import (
    LOSS_ORDER,
    OUTPUT_MASKS,
    assert_close_np,
    bits,
    cpu_and_device_args,
    cpu_reference,
    problem,
    to_torch,
)

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, every CPU variant
OPS = torch.ops.twolayer_ext


@pytest.mark.parametrize("needs", [("x",), ("w1",), ("w2",), ("b1",), ("b2",), ("w1", "b2")])
def test_only_requested_gradients(needs, device):
    x, _, params = problem(6, 5, 4, 3, bias=True)
    xt = torch.tensor(x, device=device, requires_grad="x" in needs)
    p = {k: torch.tensor(v, device=device, requires_grad=k in needs) for k, v in params.items()}
    y = tl.two_layer(xt, p["w1"], p["w2"], p["b1"], p["b2"])
    y.sum().backward()
    h, h_relu, _ = R.numpy_forward(x, params["w1"], params["w2"], params["b1"], params["b2"])
    expected = R.numpy_backward(x, params["w1"], params["w2"], h, h_relu, np.ones((6, 3)))
    for name, t in [("x", xt)] + list(p.items()):
        if name in needs:
            assert_close_np(t.grad, expected[name], rtol=1e-10, atol=1e-12, what=name)
        else:
            assert t.grad is None


def test_backward_op_returns_only_requested(device):
    x, _, params = problem(6, 5, 4, 3, bias=False)
    p = to_torch(params, device)
    xt = torch.tensor(x, device=device)
    _, act = OPS.two_layer_fwd(xt, p["w1"], p["w2"], None, None)
    out = OPS.two_layer_bwd(
        torch.ones(6, 3, dtype=torch.float64, device=device),
        None,
        None,
        p["w2"],
        act,
        [False, False, True, False, True],
    )
    assert out[0] is None and out[1] is None and out[3] is None  # (x, w1, w2, b1, b2)
    assert out[2].shape == (4, 3) and out[4].shape == (3,)


def test_l2_loss_no_grad_when_nothing_requires_it(device):
    pred, target = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    loss, grad = OPS.l2_loss_fwd(pred, target, "sum", False)
    assert grad is None
    loss, grad = OPS.l2_loss_fwd(pred, target, "mean", True)
    torch.testing.assert_close(grad, 2 * (pred - target) / pred.numel())


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mask", OUTPUT_MASKS, ids=bits)
def test_fused_loss_kernel_output_mask(mask, reduction, bias, device):
    cpu, dev = cpu_and_device_args(device, bias=bias)
    with cpu_reference():
        want = OPS.two_layer_l2_loss_fwd(*(cpu[k] for k in LOSS_ORDER), reduction, mask)
    got = OPS.two_layer_l2_loss_fwd(*(dev[k] for k in LOSS_ORDER), reduction, mask)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-12, atol=0)
    for name, w, g, asked in zip(LOSS_ORDER, want[1:], got[1:], mask):
        # A gradient comes back exactly when asked for and its tensor is given.
        assert (g is not None) == (asked and cpu[name] is not None), name
        assert (w is None) == (g is None), name
        if g is not None:
            assert g.device.type == device and g.shape == cpu[name].shape, name
            torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12, msg=name)
