"""Behaviour: strides. Transposed, sliced and stepped tensors (inputs, weights, biases, grad
outputs, expanded gradients) give the same answers as contiguous ones, and sgd_step updates a
strided weight in place (same storage), and takes a strided argument in each of its slots
(against the numpy oracle). Refused aliasing is tests/test_hostile.py (bad input). Per CPU kernel
variant, and per device where the test takes one.
"""

import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import problem, to_torch

pytestmark = pytest.mark.usefixtures("cpu_kernel")  # every test, every CPU variant


def fwd_bwd(x, w1, w2, b1=None, b2=None):
    tensors = [t for t in (x, w1, w2, b1, b2) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    y = tl.two_layer(x, w1, w2, b1, b2)
    grads = torch.autograd.grad(y.sum(), tensors, allow_unused=True) if y.numel() else None
    return y, grads


def test_strided_inputs_give_right_answers(device):
    x, _, params = problem(40, 12, 7, 5, bias=True)
    ref_y, ref_g = fwd_bwd(
        *(
            torch.tensor(a, device=device)
            for a in (x, params["w1"], params["w2"], params["b1"], params["b2"])
        )
    )
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
    x, w1, w2 = (
        torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True)
        for s in ((6, 4), (4, 5), (5, 3))
    )
    y = tl.two_layer(x, w1, w2)
    ref = x.mm(w1).clamp(min=0).mm(w2)
    for grad in (
        torch.ones(1, 1, dtype=torch.float64, device=device).expand(6, 3),
        torch.randn(3, 6, dtype=torch.float64, device=device).t(),
    ):
        got = torch.autograd.grad(y, (x, w1, w2), grad, retain_graph=True)
        want = torch.autograd.grad(ref, (x, w1, w2), grad, retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    p = torch.randn(6, 3, dtype=torch.float64, device=device)
    t = torch.randn(3, 6, dtype=torch.float64, device=device).t()
    torch.testing.assert_close(tl.l2_loss(p, t), (p - t).pow(2).sum())


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


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


STRIDED_SGD_ARGS = {
    # README: "Inputs may have any strides (a transposed weight, a sliced batch)"
    "sliced-batch-x": lambda: dict(x=_f64(6, 5)[::2]),
    "expanded-x": lambda: dict(x=_f64(1, 5).expand(3, 5)),
    "expanded-target": lambda: dict(target=_f64(1, 2).expand(3, 2)),
    "sliced-target": lambda: dict(target=_f64(3, 4)[:, ::2]),
    "sliced-w1": lambda: dict(w1=_f64(10, 8)[::2, :4]),
    "column-sliced-w2": lambda: dict(w2=_f64(4, 6)[:, ::3]),
    "sliced-b1": lambda: dict(b1=_f64(8)[::2]),
}


@pytest.mark.parametrize("what", list(STRIDED_SGD_ARGS))
def test_sgd_step_accepts_strided_arguments(what):
    torch.manual_seed(0)
    a = dict(x=_f64(3, 5), target=_f64(3, 2), w1=_f64(5, 4), w2=_f64(4, 2), b1=_f64(4), b2=None)
    a.update(STRIDED_SGD_ARGS[what]())
    params = {k: None if a[k] is None else a[k].numpy().copy() for k in ("w1", "w2", "b1", "b2")}
    expected = R.numpy_sgd_step(a["x"].numpy(), a["target"].numpy(), params, 0.1)
    loss = tl.sgd_step(a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], lr=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    for k in ("w1", "w2", "b1"):
        np.testing.assert_allclose(a[k].numpy(), params[k], rtol=1e-12, atol=1e-12)


# Several K blocks and edge tiles for every ISA's tiles, and the narrow row-blocked path.
LAYOUT_SHAPES = [(70, 600, 45, 7), (4100, 24, 20, 5)]


def layout_problem(shape, dtype, seed, device="cpu"):
    """x, y, a TwoLayerNet (weights in nn.Linear's layout) and row-major copies of its
    (w1, w2, b1, b2)."""
    N, D_in, H, D_out = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_in, generator=g, dtype=dtype).to(device)
    y = torch.randn(N, D_out, generator=g, dtype=dtype).to(device)
    net = tl.TwoLayerNet(D_in, H, D_out, device=device, dtype=dtype)
    rows = [
        p.detach().clone(memory_format=torch.contiguous_format)
        for p in (net.w1, net.w2, net.b1, net.b2)
    ]
    return x, y, net, rows


@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nn_linear_layout_changes_no_bit(cpu_kernel, shape, dtype):
    """TwoLayerNet keeps its weights in nn.Linear's layout (the transpose of the row-major
    matrices sgd_step takes): its step and its fused loss's gradients are bit for bit those of
    row-major copies. Our kernels only reorder the loops for it; the BLAS's own rounding may
    depend on the layout."""
    if cpu_kernel in ("blas", "blas-mt"):
        pytest.skip("the BLAS rounds by layout")
    x, y, net, rows = layout_problem(shape, dtype, seed=1)
    assert not net.w1.is_contiguous() and rows[0].is_contiguous()

    leaves = [p.clone().requires_grad_() for p in rows]
    net.loss(x, y, "sum").backward()
    tl.two_layer_l2_loss(x, y, *leaves, reduction="sum").backward()
    grads = (net.weight1.grad.t(), net.weight2.grad.t(), net.bias1.grad, net.bias2.grad)
    for got, q in zip(grads, leaves):
        assert torch.equal(got, q.grad)

    loss = net.sgd_step(x, y, lr=1e-3)
    expected = tl.sgd_step(x, y, *rows, lr=1e-3)
    assert torch.equal(loss, expected)
    for p, q in zip((net.w1, net.w2, net.b1, net.b2), rows):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_forward_gradients_arrive_in_the_parameters_layout(device, cpu_kernel, shape, dtype):
    """TwoLayerNet(x) with a loss of torch's own: two_layer's backward gives w1's and w2's
    gradients in the layout of the .t() views it was handed, so they reach the nn.Linear-layout
    parameters as they are (no copy by AccumulateGrad); the numbers are those of row-major
    weights, bit for bit in our CPU kernels."""
    x, y, net, rows = layout_problem(shape, dtype, seed=2, device=device)
    leaves = [p.requires_grad_() for p in rows]
    arriving, nodes = {}, []  # the gradient each parameter's AccumulateGrad receives
    for name in ("weight1", "weight2"):
        p = getattr(net, name)
        nodes.append(p.view_as(p).grad_fn.next_functions[0][0])  # alive: kept, with its hook
        # (its address only: a reference held here would keep AccumulateGrad from taking it)
        nodes[-1].register_prehook(lambda g, name=name: arriving.update({name: g[0].data_ptr()}))
    torch.nn.functional.mse_loss(net(x), y, reduction="sum").backward()
    torch.nn.functional.mse_loss(tl.two_layer(x, *leaves), y, reduction="sum").backward()
    for name in ("weight1", "weight2"):  # taken as it came: no copy into the parameter's layout
        assert getattr(net, name).grad.data_ptr() == arriving[name]

    def same(got, want):
        if device != "cpu" or cpu_kernel in ("blas", "blas-mt"):  # a BLAS rounds by layout
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        else:
            assert torch.equal(got, want)

    grads = (net.weight1.grad.t(), net.weight2.grad.t(), net.bias1.grad, net.bias2.grad)
    for got, q in zip(grads, leaves):
        same(got, q.grad)

    _, act = torch.ops.twolayer_ext.two_layer_fwd(x, net.w1, net.w2, net.b1, net.b2)
    gy = torch.randn_like(y)
    mask = [False, True, True, False, False]
    args = (gy, x, net.w1.detach(), net.w2.detach(), act, mask)
    plain = torch.ops.twolayer_ext.two_layer_bwd(*args)
    flipped = torch.ops.twolayer_ext.two_layer_bwd(*args, [True, True])
    for p, f in zip(plain[1:3], flipped[1:3]):
        assert p.is_contiguous() and f.t().is_contiguous() and not f.is_contiguous()
        same(f, p)
