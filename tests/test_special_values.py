"""Behaviour: special values. NaN and Inf propagate exactly as in the numpy oracle (forward,
backward, l2_loss); the ReLU mask is numpy's `grad_h[h < 0] = 0` at h = 0, -0.0 and NaN (the
oracle itself, and the kernels' saved activation, whose sign bit carries the mask).

Every case runs per device ([cpu] per CPU kernel variant, [cuda]) and per dtype (float16 and
bfloat16 on CUDA only). Merged from test_inputs.py, test_oracles.py and test_cuda.py.
"""

import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import ALL_DTYPES, matmul_precision, skip_unless_dtype_runs_on

KERNELS = pytest.mark.usefixtures("cpu_kernel")  # every CPU kernel variant, and CUDA
OPS = torch.ops.twolayer_ext


@pytest.fixture(params=ALL_DTYPES, ids=str)
def dtype(request, device):
    skip_unless_dtype_runs_on(device, request.param)
    return request.param


@KERNELS
def test_nan_and_inf_propagate_like_numpy(device, dtype):
    # Every value and product here is exact in every dtype, so numpy's float64 is the answer.
    x = np.array([[1.0, np.nan, 0.0], [np.inf, 1.0, 0.0], [-np.inf, 0.0, 1.0], [1.0, 1.0, 1.0]])
    w1 = np.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
    w2 = np.array([[1.0], [-2.0]])
    h, h_relu, y_np = R.numpy_forward(x, w1, w2)
    expected = R.numpy_backward(x, w1, w2, h, h_relu, np.ones_like(y_np))
    xt, w1t, w2t = (
        torch.tensor(a, device=device, dtype=dtype, requires_grad=True) for a in (x, w1, w2)
    )
    with matmul_precision(False):
        y = tl.two_layer(xt, w1t, w2t)
        y.backward(torch.ones_like(y))
    # Exact: NaN where numpy has NaN, Inf where it has Inf, every other value equal.
    np.testing.assert_array_equal(y.detach().double().cpu().numpy(), y_np)
    np.testing.assert_array_equal(w2t.grad.double().cpu().numpy(), expected["w2"])
    np.testing.assert_array_equal(xt.grad.double().cpu().numpy(), expected["x"])
    pred = torch.tensor([1.0, np.inf, 2.0], device=device, dtype=dtype)
    assert np.isinf(tl.l2_loss(pred, torch.zeros_like(pred)).item())
    pred = torch.tensor([np.nan, 1.0], device=device, dtype=dtype)
    assert np.isnan(tl.l2_loss(pred, torch.zeros_like(pred)).item())


@KERNELS
def test_relu_mask_is_numpys_at_zero(device, dtype):
    # h exactly 0 (and -0.0) passes the gradient in the tutorial's backward; h < 0 blocks it.
    x = torch.tensor([[1.0]], dtype=dtype, device=device, requires_grad=True)
    w1 = torch.tensor([[0.0, -0.0, -1.0, 1.0]], dtype=dtype, device=device, requires_grad=True)
    w2 = torch.ones(4, 1, dtype=dtype, device=device, requires_grad=True)
    _, act = OPS.two_layer_fwd(x, w1, w2, None, None)
    assert torch.signbit(act).tolist() == [[False, False, True, False]]
    assert act.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    tl.two_layer(x, w1, w2).sum().backward()
    assert w1.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]


@KERNELS
def test_nan_activation_has_its_sign_bit_cleared(device, dtype):
    # h = +NaN and -NaN (via the bias, exactly as given): the saved act must hold NaN with the
    # sign bit clear, or the backward would read it as "h < 0" and block a gradient numpy passes.
    nan = torch.tensor(float("nan"), dtype=dtype)
    # -NaN from its bits: negating a 16-bit NaN on the CPU goes through float32 and comes
    # back as the canonical (positive) NaN.
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[nan.element_size()]
    neg_nan = (nan.view(as_int) | torch.iinfo(as_int).min).view(dtype)
    b1 = torch.stack([nan, neg_nan, torch.tensor(-1.0, dtype=dtype)]).to(device)
    assert torch.signbit(b1).tolist() == [False, True, True]
    x = torch.ones(1, 1, dtype=dtype, device=device)
    w1 = torch.zeros(1, 3, dtype=dtype, device=device)
    w2 = torch.ones(3, 1, dtype=dtype, device=device)
    _, act = OPS.two_layer_fwd(x, w1, w2, b1, None)
    assert torch.isnan(act[0, :2]).all() and act[0, 2].item() == 0.0
    assert torch.signbit(act).tolist() == [[False, False, True]]
    grads = OPS.two_layer_bwd(
        torch.ones(1, 1, dtype=dtype, device=device),
        x,
        w1,
        w2,
        act,
        [False, False, False, True, False],
    )
    assert grads[3].tolist() == [1.0, 1.0, 0.0]  # grad_b1: only h < 0 blocks it


def test_numpy_oracle_relu_mask_at_zero_and_nan():  # the oracle alone: no device, no kernel
    h = np.array([[-1.0, 0.0, -0.0, 2.0, np.nan]])
    g = np.ones_like(h)
    grads = R.numpy_backward(
        np.ones((1, 1)), np.ones((1, 5)), np.ones((5, 1)), h, np.maximum(h, 0), g[:, :1]
    )
    # numpy's grad_h[h < 0] = 0: the gradient passes at 0, -0.0 and NaN.
    np.testing.assert_array_equal(grads["b1"], [0.0, 1.0, 1.0, 1.0, 1.0])
