"""Python face of the custom ops: the public functions, their fake (meta) kernels
for torch.compile, and their autograd formulas. The kernels are in csrc/."""

from __future__ import annotations

import contextlib
import json
from typing import Iterator, Sequence

import torch
from torch import Tensor

from . import _loader  # noqa: F401  (loads _C, which registers the ops)

_ops = torch.ops.twolayer_ext  # calls name .default: the overload itself, skipping resolution


def _require_args(fn, b1, b2, **tensors):
    """The tensors (named in call order) must be tensors, the biases tensors or None."""
    for name, value in tensors.items():
        _require_tensor(fn, name, value)
    _require_tensor(fn, "b1", b1, optional=True)
    _require_tensor(fn, "b2", b2, optional=True)


def _require_reduction(fn, reduction):
    # A Python value the schema's str cannot take (None, bytes, ...) is named here; the kernels
    # check the string itself.
    if reduction not in ("sum", "mean"):
        raise ValueError(f'{fn}: reduction must be "sum" or "mean", got {reduction!r}')


def _require_tensor(fn, name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{fn}: {name} must be {expected}, got {type(value).__name__}")


# ---- public functions ------------------------------------------------------------------------


def _rows(fn, x, name="x", layout="[*, D_in]"):
    """x [*, D] as [N, D] (a view wherever the strides allow, as nn.Linear does), and how to
    shape a [N, D_out] result back: [*, D_out]."""
    if x.dim() == 2:
        return x, None
    if x.dim() == 0:
        raise ValueError(
            f"{fn}: {name} must have at least one dimension {layout}, got a 0-dim tensor"
        )
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _unrows(y, lead):
    return y if lead is None else y.reshape(*lead, y.shape[-1])


def _d_out(w2, linear_layout=False):
    """D_out of a 2-D w2 ([H, D_out], or [D_out, H] in nn.Linear's layout), for messages."""
    if not isinstance(w2, Tensor) or w2.dim() != 2:
        return "D_out"
    return w2.shape[0] if linear_layout else w2.shape[1]


def _target_rows(fn, x, lead, target, d_out):
    """target [*, D_out] with the leading dimensions of x, as [N, D_out]."""
    if lead is None and target.dim() == 2:
        return target
    x_lead = list(x.shape[:-1]) if lead is None else list(lead)
    if target.dim() == 0 or list(target.shape[:-1]) != x_lead:
        expected = x_lead + [d_out]
        raise ValueError(
            f"{fn}: target must have shape [*, D_out] = {expected} (x's leading "
            f"dimensions, then D_out), got {list(target.shape)}"
        )
    return target.reshape(-1, target.shape[-1])


def two_layer(
    x: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None = None, b2: Tensor | None = None
) -> Tensor:
    """y = relu(x @ w1 + b1) @ w2 + b2, fused; differentiable in every tensor argument.

    x [*, D_in] (any leading dimensions, as nn.Linear), w1 [D_in, H], w2 [H, D_out], b1 [H] or
    None, b2 [D_out] or None: the tutorial's layout, so `two_layer(x, w1, w2)` replaces
    `x.mm(w1).clamp(min=0).mm(w2)`. Returns [*, D_out].
    """
    _require_args("two_layer", b1, b2, x=x, w1=w1, w2=w2)
    x2, lead = _rows("two_layer", x)
    return _unrows(_ops.two_layer.default(x2, w1, w2, b1, b2), lead)


def l2_loss(pred: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
    """Sum (the tutorial's loss, default) or mean of (pred - target)**2, as a 0-dim tensor.

    Equals (pred - target).pow(2).sum() and nn.MSELoss(reduction=...); the gradient is
    computed in the same pass when autograd will need it.
    """
    _require_tensor("l2_loss", "pred", pred)
    _require_tensor("l2_loss", "target", target)
    _require_reduction("l2_loss", reduction)
    return _ops.l2_loss.default(pred, target, reduction)


def two_layer_l2_loss(
    x: Tensor,
    target: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    *,
    reduction: str = "sum",
) -> Tensor:
    """l2_loss(two_layer(x, w1, w2, b1, b2), target, reduction) in one op call.

    When autograd will need them, the same call computes the gradients of every input that
    requires grad (the forward, loss and backward of sgd_step, without the update); its
    backward then only scales them by the incoming gradient. Under no_grad or inference_mode
    it is the forward and the loss alone. x [*, D_in], target [*, D_out] with x's leading
    dimensions. Works with any torch.optim optimizer, gradient accumulation and DDP.
    """
    return _two_layer_l2_loss(x, target, w1, w2, b1, b2, reduction, False)


def _two_layer_l2_loss(x, target, w1, w2, b1, b2, reduction, linear_layout):
    """two_layer_l2_loss; linear_layout: w1, w2 are nn.Linear weights [H, D_in], [D_out, H]
    (TwoLayerNet's parameters, passed without .t() views in the autograd graph)."""
    _require_args("two_layer_l2_loss", b1, b2, x=x, target=target, w1=w1, w2=w2)
    _require_reduction("two_layer_l2_loss", reduction)
    x2, lead = _rows("two_layer_l2_loss", x)
    t2 = _target_rows("two_layer_l2_loss", x, lead, target, _d_out(w2, linear_layout))
    return _ops.two_layer_l2_loss.default(x2, t2, w1, w2, b1, b2, reduction, linear_layout)


# ---- CPU kernel variants ----------------------------------------------------------------------

# The table of variants lives in C++ (csrc/cpu/variants.cpp): these are read from it.
CPU_VARIANTS = tuple(_ops.cpu_kernels())
CPU_KERNELS = ("auto", "tuned") + CPU_VARIANTS  # every name set_cpu_kernel takes


def cpu_kernel_missing(name: str) -> str:
    """Why this CPU cannot run the variant `name` ("" when it can), e.g. "needs a CPU with avx512"."""
    return _ops.cpu_kernel_missing(name)


def set_cpu_kernel(name: str) -> str:
    """Selects the CPU kernels every op uses from now on; returns the previous choice.

    "auto" (the default) picks per problem shape between our tuned kernels and "blas" (the
    platform BLAS, with our fused elementwise passes) by a rule measured on the machine;
    "tuned" is our kernels for the best ISA this CPU has (TWOLAYER_ISA=avx512|avx2|portable
    forces one); or any of CPU_VARIANTS, e.g. "tuned-avx2", "blas", "reference" (plain loops,
    for checking). The environment variable TWOLAYER_CPU_KERNEL sets the start.
    """
    if name not in CPU_KERNELS:
        raise ValueError(f"set_cpu_kernel: name must be one of {CPU_KERNELS}, got {name!r}")
    return _ops.set_cpu_kernel(name)


def cpu_kernel_info(shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32) -> str:
    """The CPU kernel choice and the thread count; given shape = (N, D_in, H, D_out), also
    the variant it runs for that problem in that dtype, e.g. "auto: blas, threads: 2"."""
    return _ops.cpu_kernel_info(None if shape is None else [int(v) for v in shape], dtype)


def cpu_kernel_choice(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> dict:
    """What runs for a problem of shape (N, D_in, H, D_out) in that dtype, as data:
    {"choice": "auto", "variant": "blas", "how": "measured", "threads": 2, "busy_core": false};
    "how" is "measured", "wisdom", "rule", "pinned", "low precision" (float16/bfloat16: variant
    "composite") or "trying" (a large step's first whole-step calls try the candidates at full
    size; "variant" is the measured pick meanwhile); "busy_core": another process holds a core
    now (csrc/cpu/busy_core.h)."""
    return json.loads(_ops.cpu_kernel_choice([int(v) for v in shape], dtype))


@contextlib.contextmanager
def use_cpu_kernel(name: str) -> Iterator[None]:
    """with use_cpu_kernel("reference"): ...  The choice for the calling thread alone, as
    torch's own context managers are thread-local (other threads keep theirs, or the
    process-wide set_cpu_kernel choice); the previous one is restored on exit."""
    if name not in CPU_KERNELS:
        raise ValueError(f"use_cpu_kernel: name must be one of {CPU_KERNELS}, got {name!r}")
    previous = _ops.set_cpu_kernel(name, True)
    try:
        yield
    finally:
        _ops.set_cpu_kernel(previous, True)


# ---- fake kernels: shapes, dtypes, devices and strides of the real ones -----------------------

# Each fake runs its op's C++ argument check first (the op `<name>_check`, csrc/checks.cpp: the
# one source of checks and messages), so a bad call fails alike on meta tensors, under
# torch.compile and in eager mode; then it computes the output metadata.


@torch.library.register_fake("twolayer_ext::two_layer_fwd")
def _two_layer_fwd_fake(x, w1, w2, b1, b2):
    _ops.two_layer_fwd_check.default(x, w1, w2, b1, b2)
    n = x.shape[0]
    return x.new_empty((n, w2.shape[1])), x.new_empty((n, w1.shape[1]))


@torch.library.register_fake("twolayer_ext::two_layer")
def _two_layer_fake(x, w1, w2, b1=None, b2=None):
    return _two_layer_fwd_fake(x, w1, w2, b1, b2)[0]


@torch.library.register_fake("twolayer_ext::two_layer_bwd")
def _two_layer_bwd_fake(grad_y, x, w1, w2, act, output_mask, grad_transposed=(False, False)):
    _ops.two_layer_bwd_check.default(grad_y, x, w1, w2, act, output_mask, grad_transposed)
    n, h = act.shape
    d_out = w2.shape[1]
    need_x, need_w1, need_w2, need_b1, need_b2 = output_mask

    def weight_grad(rows, cols, transposed):  # as the kernels allocate it (kernels.h)
        return grad_y.new_empty((cols, rows)).t() if transposed else grad_y.new_empty((rows, cols))

    return (
        grad_y.new_empty((n, w1.shape[0])) if need_x else None,
        weight_grad(x.shape[1], h, grad_transposed[0]) if need_w1 else None,
        weight_grad(h, d_out, grad_transposed[1]) if need_w2 else None,
        grad_y.new_empty((h,)) if need_b1 else None,
        grad_y.new_empty((d_out,)) if need_b2 else None,
    )


@torch.library.register_fake("twolayer_ext::l2_loss_fwd")
def _l2_loss_fwd_fake(pred, target, reduction, need_grad):
    _ops.l2_loss_fwd_check.default(pred, target, reduction, need_grad)
    return pred.new_empty(()), (pred.new_empty(pred.shape) if need_grad else None)


@torch.library.register_fake("twolayer_ext::l2_loss")
def _l2_loss_fake(pred, target, reduction="sum"):
    return _l2_loss_fwd_fake(pred, target, reduction, False)[0]


@torch.library.register_fake("twolayer_ext::l2_loss_bwd")
def _l2_loss_bwd_fake(grad_loss, grad):
    _ops.l2_loss_bwd_check.default(grad_loss, grad)
    return torch.empty_like(grad)  # at::mul keeps a dense grad's layout (a transposed one too)


@torch.library.register_fake("twolayer_ext::two_layer_l2_loss_fwd")
def _two_layer_l2_loss_fwd_fake(
    x, target, w1, w2, b1, b2, reduction, output_mask, grad_transposed=(False, False)
):
    _ops.two_layer_l2_loss_fwd_check.default(
        x, target, w1, w2, b1, b2, reduction, output_mask, grad_transposed
    )
    transposed = [False, False, *grad_transposed, False, False]
    grads = [
        None
        if t is None or not want
        else t.new_empty((t.shape[1], t.shape[0])).t()
        if flip
        else t.new_empty(t.shape)
        for t, want, flip in zip((x, target, w1, w2, b1, b2), output_mask, transposed)
    ]
    return (x.new_empty(()), *grads)


@torch.library.register_fake("twolayer_ext::two_layer_l2_loss")
def _two_layer_l2_loss_fake(
    x, target, w1, w2, b1=None, b2=None, reduction="sum", linear_layout=False
):
    if linear_layout:
        w1, w2 = w1.t(), w2.t()
    return _two_layer_l2_loss_fwd_fake(x, target, w1, w2, b1, b2, reduction, [False] * 6)[0]


# ---- one-call SGD step ----------------------------------------------------------------------


def sgd_step(
    x: Tensor,
    target: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    *,
    lr: float,
    reduction: str = "sum",
) -> Tensor:
    """One SGD step in one op call: forward, l2 loss, backward, and w -= lr * grad in place
    for w1, w2 and the biases given. Returns the loss before the update (0-dim, no grad).

    The same weights as two_layer + l2_loss + autograd + `w -= lr * w.grad`. Like
    torch.optim.SGD.step() it updates under no_grad, so leaf parameters with requires_grad are
    fine (their .grad is left alone); a weight that is a non-leaf inside an autograd graph is
    refused, since updating it in place would corrupt that graph.

    Frozen weights: once any weight requires grad, those with requires_grad=False are frozen
    (neither their gradient is computed nor are they touched), as torch.optim skips them. Plain
    tensors, none of which requires grad (the tutorial's style), are all trained.
    """
    weights = (w1, w2, b1, b2)
    if any(w is not None and getattr(w, "requires_grad", False) for w in weights):
        update = [w is not None and w.requires_grad for w in weights]
    else:
        update = [w is not None for w in weights]
    return _sgd_step(x, target, w1, w2, b1, b2, lr, reduction, update)


def _sgd_step(x, target, w1, w2, b1, b2, lr, reduction, update):
    _require_args("sgd_step", b1, b2, x=x, target=target, w1=w1, w2=w2)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"sgd_step: lr must be a float, got {type(lr).__name__}")
    if torch.is_grad_enabled():
        for name, w in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
            if w is not None and w.requires_grad and not w.is_leaf:
                raise RuntimeError(
                    f"sgd_step: {name} is a non-leaf tensor inside an autograd graph; updating "
                    f"it in place would corrupt that graph. Pass the leaf parameter, or call "
                    f"under torch.no_grad() on tensors you own"
                )
    _require_reduction("sgd_step", reduction)
    x2, lead = _rows("sgd_step", x)
    t2 = _target_rows("sgd_step", x, lead, target, _d_out(w2))
    with torch.no_grad():
        return _ops.sgd_step.default(x2, t2, w1, w2, b1, b2, float(lr), reduction, update)


@torch.library.register_fake("twolayer_ext::sgd_step")
def _sgd_step_fake(x, target, w1, w2, b1, b2, lr, reduction, update):
    _ops.sgd_step_check.default(x, target, w1, w2, b1, b2, lr, reduction, update)
    return x.new_empty(())


from . import _vmap  # noqa: E402,F401  (batching rules for torch.vmap, registered on import)
