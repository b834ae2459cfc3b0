"""Python face of the custom ops: the public functions, their fake (meta) kernels
for torch.compile, and their autograd formulas. The kernels are in csrc/."""
import contextlib

import torch

from . import _loader  # noqa: F401  (loads _C, which registers the ops)

_ops = torch.ops.twolayer_ext  # calls name .default: the overload itself, skipping resolution
_REDUCTIONS = ("sum", "mean")


def _require_tensor(fn, name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{fn}: {name} must be {expected}, got {type(value).__name__}")


def _require_reduction(fn, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f'{fn}: reduction must be "sum" or "mean", got {reduction!r}')


# ---- public functions ------------------------------------------------------------------------

def two_layer(x, w1, w2, b1=None, b2=None):
    """y = relu(x @ w1 + b1) @ w2 + b2, fused; differentiable in every tensor argument.

    x [N, D_in], w1 [D_in, H], w2 [H, D_out], b1 [H] or None, b2 [D_out] or None: the
    tutorial's layout, so `two_layer(x, w1, w2)` replaces `x.mm(w1).clamp(min=0).mm(w2)`.
    """
    for name, value in (("x", x), ("w1", w1), ("w2", w2)):
        _require_tensor("two_layer", name, value)
    _require_tensor("two_layer", "b1", b1, optional=True)
    _require_tensor("two_layer", "b2", b2, optional=True)
    y, _ = _ops.two_layer_fwd.default(x, w1, w2, b1, b2)
    return y


def l2_loss(pred, target, reduction="sum"):
    """Sum (the tutorial's loss, default) or mean of (pred - target)**2, as a 0-dim tensor.

    Equals (pred - target).pow(2).sum() and nn.MSELoss(reduction=...); the gradient is
    computed in the same pass when autograd will need it.
    """
    _require_tensor("l2_loss", "pred", pred)
    _require_tensor("l2_loss", "target", target)
    _require_reduction("l2_loss", reduction)
    need_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    loss, _ = _ops.l2_loss_fwd.default(pred, target, reduction, need_grad)
    return loss


# ---- CPU kernel variants ----------------------------------------------------------------------

CPU_KERNELS = ("tuned", "reference")


def set_cpu_kernel(name):
    """Selects the CPU kernels every op uses from now on: "tuned" (the default: blocked AVX2/FMA
    GEMMs with fused epilogues) or "reference" (plain loops, for checking and experiments).
    Returns the previous name. The environment variable TWOLAYER_CPU_KERNEL sets the start."""
    if name not in CPU_KERNELS:
        raise ValueError(f"set_cpu_kernel: name must be one of {CPU_KERNELS}, got {name!r}")
    return _ops.set_cpu_kernel(name)


def cpu_kernel_info():
    """The CPU kernel variant in use, the GEMM micro-kernel's ISA and the thread count."""
    return _ops.cpu_kernel_info()


@contextlib.contextmanager
def use_cpu_kernel(name):
    """with use_cpu_kernel("reference"): ...  (restores the previous variant on exit)"""
    previous = set_cpu_kernel(name)
    try:
        yield
    finally:
        set_cpu_kernel(previous)


# ---- fake kernels: shapes, dtypes, devices and strides of the real ones -----------------------

# The fake kernels check what the real ones check (same exception types and messages), so a
# bad call fails the same way on meta tensors and under torch.compile as in eager mode.

def _fake_check_like(fn, name, t, ref_name, ref):
    torch._check(t.device == ref.device, lambda: (
        f"{fn}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"))
    torch._check_type(t.dtype == ref.dtype, lambda: (
        f"{fn}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}"))


def _fake_check_float(fn, name, t):
    ok = (torch.float32, torch.float64)
    if t.device.type == "cuda":
        ok += (torch.float16, torch.bfloat16)
    torch._check_type(t.dtype in ok, lambda: (
        f"{fn}: {name} must be " + " or ".join(str(d).replace("torch.", "") for d in ok) +
        f" on {t.device}, got {t.dtype}"))


def _fake_check_rank(fn, name, t, layout):
    torch._check_value(t.dim() == 2, lambda: (
        f"{fn}: {name} must be a 2-D tensor {layout}, got {t.dim()}-D of shape {list(t.shape)}"))


def _fake_check_two_layer(fn, x, w1, w2, b1, b2):
    _fake_check_rank(fn, "x", x, "[N, D_in]")
    _fake_check_float(fn, "x", x)
    _fake_check_rank(fn, "w1", w1, "[D_in, H]")
    _fake_check_rank(fn, "w2", w2, "[H, D_out]")
    _fake_check_like(fn, "w1", w1, "x", x)
    _fake_check_like(fn, "w2", w2, "x", x)
    torch._check_value(w1.shape[0] == x.shape[1], lambda: (
        f"{fn}: w1 must have shape [D_in, H] with D_in = {x.shape[1]} (x.size(1)), got {list(w1.shape)}"))
    torch._check_value(w2.shape[0] == w1.shape[1], lambda: (
        f"{fn}: w2 must have shape [H, D_out] with H = {w1.shape[1]} (w1.size(1)), got {list(w2.shape)}"))
    for name, b, size, layout in (("b1", b1, w1.shape[1], "[H]"), ("b2", b2, w2.shape[1], "[D_out]")):
        if b is not None:
            _fake_check_like(fn, name, b, "x", x)
            torch._check_value(b.shape == (size,), lambda: (
                f"{fn}: {name} must have shape {layout} = [{size}], got {list(b.shape)}"))


@torch.library.register_fake("twolayer_ext::two_layer_fwd")
def _two_layer_fwd_fake(x, w1, w2, b1, b2):
    _fake_check_two_layer("two_layer", x, w1, w2, b1, b2)
    n = x.shape[0]
    return x.new_empty((n, w2.shape[1])), x.new_empty((n, w1.shape[1]))


@torch.library.register_fake("twolayer_ext::two_layer_bwd")
def _two_layer_bwd_fake(grad_y, x, w1, w2, act, output_mask):
    fn = "two_layer (backward)"
    _fake_check_rank(fn, "act", act, "[N, H]")
    _fake_check_float(fn, "act", act)
    for name, t in (("w2", w2), ("grad_y", grad_y), ("x", x), ("w1", w1)):
        if t is not None:
            _fake_check_like(fn, name, t, "act", act)
    n, h = act.shape
    d_out = w2.shape[1]
    need_x, need_w1, need_b1, need_w2, need_b2 = output_mask
    torch._check_value(not need_w1 or x is not None, lambda: f"{fn}: x [N, D_in] is needed for grad_w1")
    torch._check_value(not need_x or w1 is not None, lambda: f"{fn}: w1 [D_in, H] is needed for grad_x")
    torch._check_value(grad_y.shape == (n, d_out), lambda: (
        f"{fn}: grad_y must have shape [N, D_out] = [{n}, {d_out}], got {list(grad_y.shape)}"))
    return (
        grad_y.new_empty((n, w1.shape[0])) if need_x else None,
        grad_y.new_empty((x.shape[1], h)) if need_w1 else None,
        grad_y.new_empty((h,)) if need_b1 else None,
        grad_y.new_empty((h, d_out)) if need_w2 else None,
        grad_y.new_empty((d_out,)) if need_b2 else None,
    )


@torch.library.register_fake("twolayer_ext::l2_loss_fwd")
def _l2_loss_fwd_fake(pred, target, reduction, need_grad):
    _require_reduction("l2_loss", reduction)
    _fake_check_float("l2_loss", "pred", pred)
    _fake_check_like("l2_loss", "target", target, "pred", pred)
    torch._check_value(pred.shape == target.shape, lambda: (
        f"l2_loss: target must have the same shape as pred {list(pred.shape)}, "
        f"got {list(target.shape)} (no broadcasting)"))
    return pred.new_empty(()), (pred.new_empty(pred.shape) if need_grad else None)


@torch.library.register_fake("twolayer_ext::l2_loss_bwd")
def _l2_loss_bwd_fake(grad_loss, grad):
    torch._check_value(grad_loss.numel() == 1, lambda: (
        f"l2_loss (backward): grad_loss must have one element, got shape {list(grad_loss.shape)}"))
    _fake_check_like("l2_loss (backward)", "grad_loss", grad_loss, "grad", grad)
    return grad.new_empty(grad.shape)


# ---- autograd ----------------------------------------------------------------------------------

def _two_layer_setup_context(ctx, inputs, output):
    x, w1, w2, b1, b2 = inputs
    _, act = output
    need_x, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:5]
    ctx.output_mask = [need_x, need_w1, need_b1, need_w2, need_b2]
    # act is internal state for the backward, not a differentiable result.
    ctx.mark_non_differentiable(act)
    # Save only what the requested gradients read: x for grad_w1, w1 for grad_x.
    ctx.save_for_backward(x if need_w1 else None, w1 if need_x else None, w2, act)


def _two_layer_backward(ctx, grad_y, _grad_act):
    x, w1, w2, act = ctx.saved_tensors
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = _ops.two_layer_bwd.default(
        grad_y, x, w1, w2, act, ctx.output_mask)
    return grad_x, grad_w1, grad_w2, grad_b1, grad_b2


torch.library.register_autograd(
    "twolayer_ext::two_layer_fwd", _two_layer_backward, setup_context=_two_layer_setup_context)


def _l2_loss_setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


def _l2_loss_backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad is None:
        raise RuntimeError("l2_loss: backward needs the gradient saved by the forward; "
                           "call l2_loss_fwd with need_grad=True when inputs require grad")
    need_pred, need_target = ctx.needs_input_grad[:2]
    grad_pred = _ops.l2_loss_bwd.default(grad_loss, grad)
    return (grad_pred if need_pred else None, -grad_pred if need_target else None, None, None)


torch.library.register_autograd(
    "twolayer_ext::l2_loss_fwd", _l2_loss_backward, setup_context=_l2_loss_setup_context)


def _refuse_double_backward(public_name):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"twolayer_ext: double backward (create_graph=True, then a second backward) through "
            f"{public_name} is not supported; use the torch reference implementation for "
            f"higher-order gradients")
    return backward


for _op, _public in (("two_layer_bwd", "two_layer"), ("l2_loss_bwd", "l2_loss")):
    torch.library.register_autograd(
        f"twolayer_ext::{_op}", _refuse_double_backward(_public),
        setup_context=lambda ctx, inputs, output: None)


# ---- one-call SGD step ----------------------------------------------------------------------

def sgd_step(x, target, w1, w2, b1=None, b2=None, *, lr, reduction="sum"):
    """One SGD step in one op call: forward, l2 loss, backward, and w -= lr * grad in place
    for w1, w2 and the biases given. Returns the loss before the update (0-dim, no grad).

    The same weights as two_layer + l2_loss + autograd + `w -= lr * w.grad`. Like
    torch.optim.SGD.step() it updates under no_grad, so leaf parameters with requires_grad are
    fine (their .grad is left alone); a weight that is a non-leaf inside an autograd graph is
    refused, since updating it in place would corrupt that graph.
    """
    for name, value in (("x", x), ("target", target), ("w1", w1), ("w2", w2)):
        _require_tensor("sgd_step", name, value)
    _require_tensor("sgd_step", "b1", b1, optional=True)
    _require_tensor("sgd_step", "b2", b2, optional=True)
    _require_reduction("sgd_step", reduction)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"sgd_step: lr must be a float, got {type(lr).__name__}")
    if not (lr >= 0 and lr != float("inf")):
        raise ValueError(f"sgd_step: lr must be a finite number >= 0, got {lr}")
    if torch.is_grad_enabled():
        for name, w in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
            if w is not None and w.requires_grad and not w.is_leaf:
                raise RuntimeError(
                    f"sgd_step: {name} is a non-leaf tensor inside an autograd graph; updating "
                    f"it in place would corrupt that graph. Pass the leaf parameter, or call "
                    f"under torch.no_grad() on tensors you own")
    with torch.no_grad():
        return _ops.sgd_step.default(x, target, w1, w2, b1, b2, float(lr), reduction)


@torch.library.register_fake("twolayer_ext::sgd_step")
def _sgd_step_fake(x, target, w1, w2, b1, b2, lr, reduction):
    _fake_check_two_layer("sgd_step", x, w1, w2, b1, b2)
    _fake_check_like("sgd_step", "target", target, "x", x)
    torch._check_value(target.shape == (x.shape[0], w2.shape[1]), lambda: (
        f"sgd_step: target must have shape [N, D_out] = [{x.shape[0]}, {w2.shape[1]}], "
        f"got {list(target.shape)}"))
    torch._check_value(lr >= 0 and lr != float("inf"), lambda: (
        f"sgd_step: lr must be a finite number >= 0, got {lr}"))
    _require_reduction("sgd_step", reduction)
    return x.new_empty(())
