"""Odd shapes, strides, NaN/Inf, and bad input: right answers or a clear error, never a crash."""
import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import assert_close_np, problem

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, both CPU variants


def fwd_bwd(x, w1, w2, b1=None, b2=None):
    tensors = [t for t in (x, w1, w2, b1, b2) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    y = tl.two_layer(x, w1, w2, b1, b2)
    grads = torch.autograd.grad(y.sum(), tensors, allow_unused=True) if y.numel() else None
    return y, grads


@pytest.mark.parametrize("N", [0, 1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_tiny_batches(N, bias, device):
    x, y, params = problem(N, 13, 5, 3, bias=bias)
    h, h_relu, y_np = R.numpy_forward(x, params["w1"], params["w2"], params["b1"], params["b2"])
    p = {k: None if v is None else torch.tensor(v, device=device, requires_grad=True)
         for k, v in params.items()}
    xt = torch.tensor(x, device=device, requires_grad=True)
    out = tl.two_layer(xt, p["w1"], p["w2"], p["b1"], p["b2"])
    assert out.shape == (N, 3)
    assert_close_np(out, y_np, rtol=1e-10, atol=1e-12)
    loss = tl.l2_loss(out, torch.tensor(y, device=device))
    loss.backward()
    expected = R.numpy_backward(x, params["w1"], params["w2"], h, h_relu,
                                R.numpy_loss_grad(y_np, y))
    assert_close_np(p["w1"].grad, expected["w1"], rtol=1e-10, atol=1e-12)
    assert_close_np(xt.grad, expected["x"], rtol=1e-10, atol=1e-12)
    if N == 0:
        assert float(p["w1"].grad.abs().sum()) == 0.0


def test_strided_inputs_give_right_answers(device):
    x, _, params = problem(40, 12, 7, 5, bias=True)
    ref_y, ref_g = fwd_bwd(*(torch.tensor(a, device=device) for a in
                             (x, params["w1"], params["w2"], params["b1"], params["b2"])))
    # A transposed weight, a sliced batch with a step, a sliced bias.
    w1_t = torch.tensor(params["w1"].T.copy(), device=device).t()
    w2_t = torch.tensor(params["w2"].T.copy(), device=device).t()
    x_big = torch.zeros(80, 24, dtype=torch.float64, device=device)
    x_big[::2, ::2] = torch.tensor(x, device=device)
    x_s = x_big[::2, ::2]
    b1_big = torch.zeros(14, dtype=torch.float64, device=device)
    b1_big[::2] = torch.tensor(params["b1"], device=device)
    b1_s = b1_big[::2]
    b2 = torch.tensor(params["b2"], device=device)
    assert not w1_t.is_contiguous() and not x_s.is_contiguous() and not b1_s.is_contiguous()
    y, g = fwd_bwd(x_s.detach(), w1_t.detach(), w2_t.detach(), b1_s.detach(), b2)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_noncontiguous_and_expanded_grad_outputs(device):
    x, w1, w2 = (torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True)
                 for s in ((6, 4), (4, 5), (5, 3)))
    y = tl.two_layer(x, w1, w2)
    ref = x.mm(w1).clamp(min=0).mm(w2)
    for grad in (torch.ones(1, 1, dtype=torch.float64, device=device).expand(6, 3),
                 torch.randn(3, 6, dtype=torch.float64, device=device).t()):
        got = torch.autograd.grad(y, (x, w1, w2), grad, retain_graph=True)
        want = torch.autograd.grad(ref, (x, w1, w2), grad, retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    p = torch.randn(6, 3, dtype=torch.float64, device=device)
    t = torch.randn(3, 6, dtype=torch.float64, device=device).t()
    torch.testing.assert_close(tl.l2_loss(p, t), (p - t).pow(2).sum())


def test_nan_and_inf_propagate_like_numpy():
    x = np.array([[1.0, np.nan, 0.0], [np.inf, 1.0, 0.0], [-np.inf, 0.0, 1.0], [1.0, 1.0, 1.0]])
    w1 = np.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
    w2 = np.array([[1.0], [-2.0]])
    h, h_relu, y_np = R.numpy_forward(x, w1, w2)
    y = tl.two_layer(*(torch.tensor(a, requires_grad=True) for a in (x, w1, w2)))
    np.testing.assert_array_equal(y.detach().numpy(), y_np)  # NaN where numpy has NaN
    grad_y = np.ones_like(y_np)
    expected = R.numpy_backward(x, w1, w2, h, h_relu, grad_y)
    xt, w1t, w2t = (torch.tensor(a, requires_grad=True) for a in (x, w1, w2))
    out = tl.two_layer(xt, w1t, w2t)
    out.backward(torch.tensor(grad_y))
    np.testing.assert_array_equal(w2t.grad.numpy(), expected["w2"])
    np.testing.assert_array_equal(xt.grad.numpy(), expected["x"])
    pred = torch.tensor([1.0, np.inf, 2.0])
    assert np.isinf(tl.l2_loss(pred, torch.zeros(3)).item())
    assert np.isnan(tl.l2_loss(torch.tensor([np.nan, 1.0]), torch.zeros(2)).item())


def test_relu_mask_is_numpys_at_zero():
    # h exactly 0 (and -0.0) passes the gradient in the tutorial's backward; h < 0 blocks it.
    x = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    w1 = torch.tensor([[0.0, -0.0, -1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    w2 = torch.ones(4, 1, dtype=torch.float64, requires_grad=True)
    tl.two_layer(x, w1, w2).sum().backward()
    assert w1.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]


def f64(*shape):
    return torch.randn(shape, dtype=torch.float64)


GOOD = dict(x=f64(4, 3), w1=f64(3, 5), w2=f64(5, 2), b1=f64(5), b2=f64(2))
BAD_TWO_LAYER = [
    ("x", f64(), ValueError, r"x must have at least one dimension \[\*, D_in\]"),
    ("x", f64(4), ValueError, r"w1 must have shape \[D_in, H\] with D_in = 4"),  # one sample of 4
    ("x", f64(4, 3, 1), ValueError, r"w1 must have shape \[D_in, H\] with D_in = 1"),
    ("w1", f64(4, 5), ValueError, r"w1 must have shape \[D_in, H\] with D_in = 3"),
    ("w1", f64(3), ValueError, "w1 must be a 2-D"),
    ("w2", f64(4, 2), ValueError, r"w2 must have shape \[H, D_out\] with H = 5"),
    ("w2", f64(5, 2, 1), ValueError, "w2 must be a 2-D"),
    ("b1", f64(4), ValueError, r"b1 must have shape \[H\]"),
    ("b1", f64(1, 5), ValueError, r"b1 must have shape \[H\]"),  # no broadcasting
    ("b2", f64(3), ValueError, r"b2 must have shape \[D_out\]"),
    ("b2", f64(1, 2), ValueError, r"b2 must have shape \[D_out\]"),
    ("x", torch.ones(4, 3, dtype=torch.int64), TypeError, "x must be float32, float64, float16 or bfloat16 on cpu, got Long"),
    ("x", torch.ones(4, 3, dtype=torch.bool), TypeError, "x must be float32, float64, float16 or bfloat16 on cpu, got Bool"),
    ("x", torch.ones(4, 3, dtype=torch.complex64), TypeError, "x must be float32, float64, float16 or bfloat16"),
    ("w1", f64(3, 5).float(), TypeError, r"w1 must have the same dtype as x \(Double\)"),
    ("w2", f64(5, 2).float(), TypeError, "w2 must have the same dtype as x"),
    ("b1", f64(5).float(), TypeError, "b1 must have the same dtype as x"),
    ("b2", f64(2).float(), TypeError, "b2 must have the same dtype as x"),
    ("w1", f64(3, 5).to("meta"), RuntimeError, "w1 must be on the same device as x"),
    ("x", [[1.0, 2.0, 3.0]], TypeError, "x must be a torch.Tensor"),
    ("w2", None, TypeError, "w2 must be a torch.Tensor"),
    ("b1", 1.0, TypeError, "b1 must be a torch.Tensor or None"),
]


@pytest.mark.parametrize("arg,value,exc,msg", BAD_TWO_LAYER,
                         ids=[f"{a}-{i}" for i, (a, *_) in enumerate(BAD_TWO_LAYER)])
def test_bad_two_layer_input(arg, value, exc, msg):
    kwargs = dict(GOOD, **{arg: value})
    with pytest.raises(exc, match=msg):
        tl.two_layer(**kwargs)


BAD_LOSS = [
    (dict(target=f64(4, 3)), ValueError, r"target must have the same shape as pred"),
    (dict(target=f64(1, 2)), ValueError, r"target must have the same shape as pred"),
    (dict(target=f64(4, 2).float()), TypeError, "target must have the same dtype as pred"),
    (dict(pred=torch.ones(4, 2, dtype=torch.int32)), TypeError, "pred must be float32, float64, float16 or bfloat16 on cpu, got Int"),
    (dict(reduction="avg"), ValueError, 'reduction must be "sum" or "mean"'),
    (dict(reduction=None), ValueError, 'reduction must be "sum" or "mean"'),
    (dict(pred=np.zeros((4, 2))), TypeError, "pred must be a torch.Tensor"),
    (dict(target=f64(4, 2).to("meta")), RuntimeError, "target must be on the same device as pred"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_LOSS)
def test_bad_loss_input(kwargs, exc, msg):
    args = dict(pred=f64(4, 2), target=f64(4, 2), reduction="sum")
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        tl.l2_loss(**args)
