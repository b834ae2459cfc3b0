"""The tutorial's network three ways, as plain functions: the oracles.

numpy with hand-written backprop is the truth; torch with hand-written backprop
and torch autograd (the tutorial's last cell, fixed) are the witnesses. Every
kernel is tested against these, and the benchmark and training CLI run them as
backends. Biases are optional (the tutorial has none); `reduction` is "sum"
(the tutorial's loss) or "mean".

Parameters travel as a dict {"w1", "w2", "b1", "b2"} (biases may be None);
the SGD steps update it in place and return the loss before the update.
"""

import numpy as np
import torch

PARAM_NAMES = ("w1", "w2", "b1", "b2")


def tutorial_data(
    N=64, D_in=1000, H=100, D_out=10, *, seed=0, bias=False, dtype=np.float64, weight_scale=1.0
):
    """The tutorial's problem: x, y and the weights drawn with randn (numpy arrays).

    weight_scale=1 is the tutorial's unscaled draw; biases, when asked for, are randn too.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D_in)).astype(dtype)
    y = rng.standard_normal((N, D_out)).astype(dtype)
    params = {
        "w1": (rng.standard_normal((D_in, H)) * weight_scale).astype(dtype),
        "w2": (rng.standard_normal((H, D_out)) * weight_scale).astype(dtype),
        "b1": rng.standard_normal(H).astype(dtype) if bias else None,
        "b2": rng.standard_normal(D_out).astype(dtype) if bias else None,
    }
    return x, y, params


def _check_reduction(reduction):
    if reduction not in ("sum", "mean"):
        raise ValueError(f'reduction must be "sum" or "mean", got {reduction!r}')


# ---- numpy, hand-written backprop (tutorial cell 1) ---------------------------------------


def numpy_forward(x, w1, w2, b1=None, b2=None):
    """Returns (h, h_relu, y_pred)."""
    h = x.dot(w1)
    if b1 is not None:
        h = h + b1
    h_relu = np.maximum(h, 0)
    y_pred = h_relu.dot(w2)
    if b2 is not None:
        y_pred = y_pred + b2
    return h, h_relu, y_pred


def numpy_loss(y_pred, y, reduction="sum"):
    _check_reduction(reduction)
    sq = np.square(y_pred - y)
    return sq.sum() if reduction == "sum" else sq.mean()


def numpy_loss_grad(y_pred, y, reduction="sum"):
    _check_reduction(reduction)
    grad = 2.0 * (y_pred - y)
    return grad if reduction == "sum" else grad / y_pred.size


def numpy_backward(x, w1, w2, h, h_relu, grad_y_pred):
    """Gradients of x, w1, b1, w2, b2 given dL/dy_pred."""
    grad_w2 = h_relu.T.dot(grad_y_pred)
    grad_h_relu = grad_y_pred.dot(w2.T)
    grad_h = grad_h_relu.copy()
    grad_h[h < 0] = 0
    return {
        "x": grad_h.dot(w1.T),
        "w1": x.T.dot(grad_h),
        "b1": grad_h.sum(axis=0),
        "w2": grad_w2,
        "b2": grad_y_pred.sum(axis=0),
    }


def numpy_sgd_step(x, y, params, lr, reduction="sum"):
    h, h_relu, y_pred = numpy_forward(x, params["w1"], params["w2"], params["b1"], params["b2"])
    loss = numpy_loss(y_pred, y, reduction)
    grads = numpy_backward(
        x, params["w1"], params["w2"], h, h_relu, numpy_loss_grad(y_pred, y, reduction)
    )
    for name in PARAM_NAMES:
        if params[name] is not None:
            params[name] -= lr * grads[name]
    return float(loss)


# ---- torch, hand-written backprop (tutorial cell 2) ---------------------------------------


def manual_forward(x, w1, w2, b1=None, b2=None):
    """Returns (h, h_relu, y_pred)."""
    h = x.mm(w1)
    if b1 is not None:
        h = h + b1
    h_relu = h.clamp(min=0)
    y_pred = h_relu.mm(w2)
    if b2 is not None:
        y_pred = y_pred + b2
    return h, h_relu, y_pred


def manual_backward(x, w1, w2, h, h_relu, grad_y_pred):
    grad_w2 = h_relu.t().mm(grad_y_pred)
    grad_h_relu = grad_y_pred.mm(w2.t())
    grad_h = grad_h_relu.clone()
    grad_h[h < 0] = 0
    return {
        "x": grad_h.mm(w1.t()),
        "w1": x.t().mm(grad_h),
        "b1": grad_h.sum(0),
        "w2": grad_w2,
        "b2": grad_y_pred.sum(0),
    }


def manual_sgd_step(x, y, params, lr, reduction="sum"):
    _check_reduction(reduction)
    h, h_relu, y_pred = manual_forward(x, params["w1"], params["w2"], params["b1"], params["b2"])
    diff = y_pred - y
    loss = diff.pow(2).sum() if reduction == "sum" else diff.pow(2).mean()
    grad_y_pred = 2.0 * diff if reduction == "sum" else 2.0 * diff / diff.numel()
    grads = manual_backward(x, params["w1"], params["w2"], h, h_relu, grad_y_pred)
    for name in PARAM_NAMES:
        if params[name] is not None:
            params[name] -= lr * grads[name]
    return loss.item()


# ---- torch autograd (tutorial cell 4, fixed) -----------------------------------------------


def autograd_forward(x, w1, w2, b1=None, b2=None):
    h = x.mm(w1)
    if b1 is not None:
        h = h + b1
    y_pred = h.clamp(min=0).mm(w2)
    return y_pred + b2 if b2 is not None else y_pred


def autograd_sgd_step(x, y, params, lr, reduction="sum"):
    """params hold leaf tensors with requires_grad=True.

    The tutorial's cell rebinds `w1 = w1 - lr * w1.grad`, which makes w1 a non-leaf whose
    .grad is None at the next step (its TypeError). Fixed: update in place under no_grad,
    then zero the gradients.
    """
    _check_reduction(reduction)
    y_pred = autograd_forward(x, params["w1"], params["w2"], params["b1"], params["b2"])
    diff = y_pred - y
    loss = diff.pow(2).sum() if reduction == "sum" else diff.pow(2).mean()
    loss.backward()
    with torch.no_grad():
        for name in PARAM_NAMES:
            p = params[name]
            if p is not None:
                p -= lr * p.grad
                p.grad.zero_()
    return loss.item()
