"""Behaviour: batch sizes and shapes at the edges. N = 0, 1, 2 against the numpy oracle; an
empty batch in every dtype (sum 0 with zero gradients, mean NaN as numpy and nn.MSELoss); x of
shape [*, D_in] with leading dimensions (two_layer, the fused loss, sgd_step) equal to the CPU
reference kernel. Per device and per CPU kernel variant. Merged from test_inputs.py,
test_l2_loss.py and test_cuda.py. (gradcheck at N = 0 and 1: tests/test_opcheck.py.)
"""

import contextlib

import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import (
    ALL_DTYPES,
    assert_close_np,
    cpu_and_device_args,
    cpu_reference,
    problem,
    skip_unless_dtype_runs_on,
)

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, every CPU variant


@pytest.mark.parametrize("N", [0, 1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_tiny_batches(N, bias, device):
    x, y, params = problem(N, 13, 5, 3, bias=bias)
    h, h_relu, y_np = R.numpy_forward(x, params["w1"], params["w2"], params["b1"], params["b2"])
    p = {
        k: None if v is None else torch.tensor(v, device=device, requires_grad=True)
        for k, v in params.items()
    }
    xt = torch.tensor(x, device=device, requires_grad=True)
    out = tl.two_layer(xt, p["w1"], p["w2"], p["b1"], p["b2"])
    assert out.shape == (N, 3)
    assert_close_np(out, y_np, rtol=1e-10, atol=1e-12)
    loss = tl.l2_loss(out, torch.tensor(y, device=device))
    loss.backward()
    expected = R.numpy_backward(
        x, params["w1"], params["w2"], h, h_relu, R.numpy_loss_grad(y_np, y)
    )
    assert_close_np(p["w1"].grad, expected["w1"], rtol=1e-10, atol=1e-12)
    assert_close_np(xt.grad, expected["x"], rtol=1e-10, atol=1e-12)
    if N == 0:
        assert float(p["w1"].grad.abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empty_batch(dtype, reduction, device):
    skip_unless_dtype_runs_on(device, dtype)
    empty = torch.empty(0, 3, dtype=dtype, device=device)  # l2_loss alone, then after two_layer
    if reduction == "mean":
        assert np.isnan(tl.l2_loss(empty, empty, "mean").item())  # as numpy and nn.MSELoss
    else:
        assert tl.l2_loss(empty, empty).item() == 0.0
    x = torch.empty(0, 5, dtype=dtype, device=device, requires_grad=True)
    w1 = torch.randn(5, 4, dtype=dtype, device=device, requires_grad=True)
    w2 = torch.randn(4, 3, dtype=dtype, device=device, requires_grad=True)
    y = tl.two_layer(x, w1, w2)
    assert y.shape == (0, 3)
    loss = tl.l2_loss(y, torch.empty(0, 3, dtype=dtype, device=device), reduction)
    if reduction == "mean":
        assert np.isnan(loss.item())  # as numpy and nn.MSELoss
    else:
        assert loss.item() == 0.0
        loss.backward()
        assert float(w1.grad.abs().sum()) == 0.0 and float(w2.grad.abs().sum()) == 0.0


def test_leading_dimensions_match_the_cpu_reference(device):
    # x [*, D_in] is flattened in Python, the same for every device.
    cpu, dev = cpu_and_device_args(device, shape=(12, 7, 5, 3), lead=(2, 3, 2))
    with cpu_reference():
        want = tl.two_layer(cpu["x"], cpu["w1"], cpu["w2"], cpu["b1"], cpu["b2"])
    got = tl.two_layer(dev["x"], dev["w1"], dev["w2"], dev["b1"], dev["b2"])
    assert got.shape == want.shape == (2, 3, 2, 3)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    for a in (cpu, dev):
        with cpu_reference() if a is cpu else contextlib.nullcontext():
            a["fused"] = tl.two_layer_l2_loss(
                a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], reduction="mean"
            )
            a["step"] = tl.sgd_step(
                a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], lr=0.1, reduction="mean"
            )
    for k in ("fused", "step", "w1", "w2", "b1", "b2"):
        torch.testing.assert_close(dev[k].cpu(), cpu[k], rtol=1e-12, atol=1e-12, msg=k)
