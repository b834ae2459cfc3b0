"""two_layer forward and gradients against the numpy oracle and against autograd."""
import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import TORCH_DTYPE, assert_close_np, problem, to_torch

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, both CPU variants

SHAPES = [(64, 1000, 100, 10), (7, 13, 5, 3), (1, 4, 3, 2), (33, 65, 129, 17)]
PARAM_ORDER = ("w1", "w2", "b1", "b2")


def run_fused(x, params, grad_y, device, dtype):
    xt = torch.tensor(x, dtype=dtype, device=device, requires_grad=True)
    p = to_torch(params, device, dtype, requires_grad=True)
    y = tl.two_layer(xt, p["w1"], p["w2"], p["b1"], p["b2"])
    y.backward(torch.tensor(grad_y, dtype=dtype, device=device))
    grads = {k: (None if v is None else v.grad) for k, v in p.items()}
    grads["x"] = xt.grad
    return y, grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_numpy_float64(shape, bias, device):
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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_autograd(dtype, bias, device):
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


def test_backward_op_returns_only_requested():
    x, _, params = problem(6, 5, 4, 3, bias=False)
    p = to_torch(params, "cpu")
    xt = torch.tensor(x)
    _, act = torch.ops.twolayer_ext.two_layer_fwd(xt, p["w1"], p["w2"], None, None)
    out = torch.ops.twolayer_ext.two_layer_bwd(torch.ones(6, 3, dtype=torch.float64), None, None,
                                               p["w2"], act, [False, False, True, False, True])
    assert out[0] is None and out[1] is None and out[3] is None  # (x, w1, w2, b1, b2)
    assert out[2].shape == (4, 3) and out[4].shape == (3,)


def test_drop_in_for_tutorial_expression():
    x, _, params = R.tutorial_data(64, 1000, 100, 10, seed=7)
    xt, w1, w2 = (torch.tensor(a) for a in (x, params["w1"], params["w2"]))
    torch.testing.assert_close(tl.two_layer(xt, w1, w2), xt.mm(w1).clamp(min=0).mm(w2),
                               rtol=1e-12, atol=1e-6)
