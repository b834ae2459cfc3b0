"""The training recipes: the ways of doing one training step (the numpy oracle, autograd,
nn.Module, torch.compile, our fused ops, ...), one registry for the CLI (train.py) and the
benchmark (bench.py). "Recipe", not "backend": the build's backend (CPU-only or CUDA) is another
thing; the CLIs still take --backend as another spelling of --recipe.

Every recipe trains the same problem (numpy arrays in the tutorial's layout: x [N, D_in],
y [N, D_out], w1 [D_in, H], w2 [H, D_out], optional b1, b2) from copies of the same initial
arrays, and one call of its step() is one training step that returns the loss before the update.

A name picks a recipe and, where it offers them, an optimizer and a CPU kernel variant:

    fused_loss            the recipe with torch.optim.SGD (every recipe trains with SGD)
    fused_loss+adam       ... with torch.optim.Adam instead (recipes listing "adam")
    sgd_step[reference]   sgd_step with the CPU kernel variant "reference" (any name in
                          twolayer_ext.CPU_KERNELS); plain sgd_step runs the variant in effect
"""

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import reference as R
from ..module import TwoLayerNet
from ..ops import (
    CPU_KERNELS,
    CPU_VARIANTS,
    cpu_kernel_choice,
    cpu_kernel_info,
    cpu_kernel_missing,
    l2_loss,
    set_cpu_kernel,
    sgd_step,
    use_cpu_kernel,
)

Arrays = Dict[str, Optional[np.ndarray]]


@dataclass(frozen=True)
class Problem:
    """What every recipe trains: float64 (or the CLI's dtype) numpy arrays, and how."""

    x: np.ndarray
    y: np.ndarray
    params: Arrays  # {"w1", "w2", "b1", "b2"}; the biases may be None
    lr: float
    reduction: str = "sum"
    device: str = "cpu"
    dtype: torch.dtype = torch.float64


class Runner(NamedTuple):
    step: Callable[[], Any]  # one training step; the loss before it (tensor or float)
    weights: Callable[[], Arrays]  # the current weights as numpy arrays, tutorial layout


@dataclass(frozen=True)
class Recipe:
    name: str
    label: str  # for tables and plots
    build: Callable[[Problem, str], Runner]  # (problem, optimizer) -> Runner
    optimizers: Tuple[str, ...] = ("sgd",)
    per_variant: bool = False  # the benchmark times it once per CPU kernel variant
    cpu_only: bool = False  # runs on the CPU whatever the device (numpy)
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None: every dtype torch has
    trains: bool = True  # False: timed for reference, not a training step
    warmup_calls: int = 2  # calls before timing (compile needs a few)
    compiled: bool = False  # torch.compile'd: a cold compile per build (tests and GPU runs skip it)
    ours: bool = False  # runs twolayer_ext's CPU kernels (a variant is chosen)
    whole_step: bool = False  # its calls run whole steps, where auto's trials happen (tuner.h)


class Spec(NamedTuple):
    """A parsed recipe name."""

    recipe: Recipe
    optimizer: str
    variant: Optional[str]  # the CPU kernel variant its [VARIANT] pins; None: the one in effect


# ---- the recipes --------------------------------------------------------------------------------


def _tensor(a, p: Problem, requires_grad=False):
    return (
        None
        if a is None
        else (torch.tensor(a, device=p.device).to(p.dtype).requires_grad_(requires_grad))
    )


def _tensors(p: Problem, requires_grad=False):
    """(x, y, {w1, w2, b1, b2}) as torch tensors on p.device in p.dtype."""
    return (
        _tensor(p.x, p),
        _tensor(p.y, p),
        {k: _tensor(v, p, requires_grad) for k, v in p.params.items()},
    )


def _to_numpy(weights):
    return {k: None if v is None else v.detach().cpu().numpy() for k, v in weights.items()}


def _optimizer(name, parameters, lr):
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name](parameters, lr=lr)


def _mse(reduction):
    return nn.MSELoss(reduction=reduction)


def build_numpy(p: Problem, optimizer: str) -> Runner:
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[p.dtype]
    x, y = p.x.astype(np_dtype), p.y.astype(np_dtype)
    w = {k: None if v is None else v.astype(np_dtype) for k, v in p.params.items()}
    return Runner(lambda: R.numpy_sgd_step(x, y, w, p.lr, p.reduction), lambda: w)


def build_manual(p: Problem, optimizer: str) -> Runner:
    x, y, w = _tensors(p)
    return Runner(lambda: R.manual_sgd_step(x, y, w, p.lr, p.reduction), lambda: _to_numpy(w))


def build_autograd(p: Problem, optimizer: str) -> Runner:
    x, y, w = _tensors(p, requires_grad=True)
    return Runner(lambda: R.autograd_sgd_step(x, y, w, p.lr, p.reduction), lambda: _to_numpy(w))


def build_module(p: Problem, optimizer: str, compiled: bool = False) -> Runner:
    """What a PyTorch user writes: nn.Sequential + MSELoss + backward + a torch.optim optimizer;
    with compiled, the model as torch.compile(model) (inductor, default mode), the rest as it is."""
    x, y, w = _tensors(p)
    bias = w["b1"] is not None
    (D_in, H), D_out = w["w1"].shape, w["w2"].shape[1]
    lin1, lin2 = nn.Linear(D_in, H, bias=bias), nn.Linear(H, D_out, bias=bias)
    model = nn.Sequential(lin1, nn.ReLU(), lin2)
    model.to(device=p.device, dtype=p.dtype)  # in place: lin1, lin2 are model[0], model[2]
    layers = {"w1": lin1.weight, "w2": lin2.weight, "b1": lin1.bias, "b2": lin2.bias}
    with torch.no_grad():
        for k, v in w.items():
            if v is not None:
                layers[k].copy_(v.t() if v.dim() == 2 else v)  # nn.Linear stores weight^T
    opt, loss_fn = _optimizer(optimizer, model.parameters(), p.lr), _mse(p.reduction)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad()
        loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    def weights():
        return _to_numpy(
            {k: None if v is None else (v.t() if v.dim() == 2 else v) for k, v in layers.items()}
        )

    return Runner(step, weights)


def build_compile_module(p: Problem, optimizer: str) -> Runner:
    """torch.compile of the nn.Sequential model, its loss, backward and optimizer eager: the
    autograd route compiled, the like-for-like peer of the fused loss + optimizer."""
    return build_module(p, optimizer, compiled=True)


def _compiled_manual_step(x, y, w1, w2, b1, b2, lr: float, mean: bool):
    h, h_relu, y_pred = R.manual_forward(x, w1, w2, b1, b2)
    diff = y_pred - y
    grad_y = 2.0 * diff / diff.numel() if mean else 2.0 * diff
    grads = R.manual_backward(x, w1, w2, h, h_relu, grad_y)
    for w, g in ((w1, grads["w1"]), (w2, grads["w2"]), (b1, grads["b1"]), (b2, grads["b2"])):
        if w is not None:
            w.sub_(lr * g)
    return diff.pow(2).mean() if mean else diff.pow(2).sum()


def build_compile(p: Problem, optimizer: str) -> Runner:
    """torch.compile (inductor, default mode) of the tutorial's hand-written step."""
    x, y, w = _tensors(p)
    fn = torch.compile(_compiled_manual_step, fullgraph=True)
    mean = p.reduction == "mean"
    return Runner(
        lambda: fn(x, y, w["w1"], w["w2"], w["b1"], w["b2"], p.lr, mean), lambda: _to_numpy(w)
    )


def _net(p: Problem) -> TwoLayerNet:
    w1, w2 = p.params["w1"], p.params["w2"]
    assert w1 is not None and w2 is not None  # only the biases may be None
    (D_in, H), D_out = w1.shape, w2.shape[1]
    net = TwoLayerNet(
        D_in, H, D_out, bias=p.params["b1"] is not None, device=p.device, dtype=p.dtype
    )
    with torch.no_grad():
        for k, v in p.params.items():
            if v is not None:
                getattr(net, k).copy_(torch.from_numpy(v))
    return net


def _net_runner(p: Problem, optimizer: str, loss_of: Callable[[TwoLayerNet, Any, Any], Any]):
    """TwoLayerNet + loss_of(net, x, y) + backward + a torch.optim optimizer."""
    x, y, _ = _tensors(p)
    net = _net(p)
    opt = _optimizer(optimizer, net.parameters(), p.lr)

    def step():
        opt.zero_grad()
        loss = loss_of(net, x, y)
        loss.backward()
        opt.step()
        return loss.detach()

    return Runner(step, lambda: _to_numpy({k: getattr(net, k) for k in p.params}))


def build_ext_autograd(p: Problem, optimizer: str) -> Runner:
    """The drop-in path: TwoLayerNet forward (two_layer) + l2_loss + backward + optimizer."""
    return _net_runner(p, optimizer, lambda net, x, y: l2_loss(net(x), y, p.reduction))


def build_fused_loss(p: Problem, optimizer: str) -> Runner:
    """TwoLayerNet.loss (two_layer_l2_loss: gradients made in the forward) + backward + optimizer."""
    return _net_runner(p, optimizer, lambda net, x, y: net.loss(x, y, p.reduction))


def build_sgd_step(p: Problem, optimizer: str) -> Runner:
    """The whole step (forward, loss, backward, SGD update) in one op call."""
    x, y, w = _tensors(p)
    return Runner(
        lambda: sgd_step(x, y, w["w1"], w["w2"], w["b1"], w["b2"], lr=p.lr, reduction=p.reduction),
        lambda: _to_numpy(w),
    )


def five_gemms(x, y, w1, w2) -> Callable[[], None]:
    """The five bare torch.mm calls of a step (forward 2, backward 3, no grad_x) into buffers
    of their own: the BLAS / cuBLAS floor of any unfused step."""
    h = x.new_empty(x.shape[0], w1.shape[1])
    out, gh = x.new_empty(y.shape), torch.empty_like(h)
    gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)

    def gemms():
        torch.mm(x, w1, out=h)
        torch.mm(h, w2, out=out)
        torch.mm(h.t(), y, out=gw2)
        torch.mm(y, w2.t(), out=gh)
        torch.mm(x.t(), gh, out=gw1)

    return gemms


def build_gemm_floor(p: Problem, optimizer: str) -> Runner:
    """Not a training step: the five bare torch.mm calls of one, as a floor."""
    x, y, w = _tensors(p)
    gemms, zero = five_gemms(x, y, w["w1"], w["w2"]), torch.zeros((), device=p.device)

    def step():
        gemms()
        return zero

    return Runner(step, lambda: _to_numpy(w))


_NUMPY_DTYPES = (torch.float32, torch.float64)
_OPTIMIZERS = ("sgd", "adam")

RECIPES: Dict[str, Recipe] = {
    b.name: b
    for b in (
        Recipe("numpy", "numpy (oracle)", build_numpy, cpu_only=True, dtypes=_NUMPY_DTYPES),
        Recipe("manual", "torch by hand", build_manual),
        Recipe("autograd", "autograd", build_autograd),
        Recipe("module", "nn.Module", build_module, optimizers=_OPTIMIZERS),
        Recipe("compile", "torch.compile", build_compile, warmup_calls=5, compiled=True),
        Recipe(
            "compile_module",
            "torch.compile(module)",
            build_compile_module,
            warmup_calls=5,
            compiled=True,
        ),
        Recipe("ext_autograd", "two_layer+l2_loss", build_ext_autograd, ours=True),
        Recipe(
            "fused_loss",
            "fused loss",
            build_fused_loss,
            optimizers=_OPTIMIZERS,
            ours=True,
            whole_step=True,
        ),
        Recipe(
            "sgd_step",
            "fused sgd_step",
            build_sgd_step,
            per_variant=True,
            ours=True,
            whole_step=True,
        ),
        Recipe("gemm_floor", "GEMM floor", build_gemm_floor, trains=False),
    )
}
BASELINE = "module"  # what a PyTorch user writes; ratios are against it, same optimizer

_NAME = re.compile(r"^(?P<base>[a-z_0-9]+)(\+(?P<opt>[a-z_0-9]+))?(\[(?P<kernel>[^\]]+)\])?$")


def parse(name: str) -> Spec:
    """Spec of a recipe name such as "module", "fused_loss+adam" or "sgd_step[reference]";
    ValueError naming what was expected otherwise."""
    m = _NAME.match(name) if isinstance(name, str) else None
    recipe = RECIPES.get(m["base"]) if m else None
    if recipe is None:
        raise ValueError(
            f"recipe must be one of {', '.join(RECIPES)} (with +OPTIMIZER or "
            f"[VARIANT] where offered), got {name!r}"
        )
    assert m is not None  # a recipe was found, so the name matched
    optimizer = m["opt"] or "sgd"
    if optimizer not in recipe.optimizers:
        raise ValueError(
            f"recipe {name!r}: the optimizer of {recipe.name} must be one of "
            f"{', '.join(recipe.optimizers)}, got {optimizer!r}"
        )
    variant = m["kernel"]
    if variant is not None and not recipe.per_variant:
        raise ValueError(f"recipe {name!r}: {recipe.name} takes no [VARIANT]")
    if variant is not None and variant not in CPU_KERNELS:
        raise ValueError(
            f"recipe {name!r}: the CPU kernel must be one of "
            f"{', '.join(CPU_KERNELS)}, got {variant!r}"
        )
    return Spec(recipe, optimizer, variant)


def missing(name: str) -> str:
    """Why this CPU cannot run recipe `name` ("" when it can): its [VARIANT] needs an ISA the
    CPU lacks, e.g. "needs a CPU with avx512"."""
    variant = parse(name).variant
    return cpu_kernel_missing(variant) if variant is not None and variant in CPU_VARIANTS else ""


def label(name: str) -> str:
    """The table label of a recipe name, e.g. "fused loss+adam"."""
    spec = parse(name)
    return spec.recipe.label + name[len(spec.recipe.name) :]


def baseline(name: str) -> str:
    """The row a recipe's speedup is against: the module with the same optimizer."""
    optimizer = parse(name).optimizer
    return BASELINE if optimizer == "sgd" else f"{BASELINE}+{optimizer}"


def current_cpu_kernel() -> str:
    """The CPU kernel variant in effect (what plain "sgd_step" runs)."""
    current = set_cpu_kernel(CPU_KERNELS[0])  # returns the previous one
    set_cpu_kernel(current)
    return current


def variant_ran(
    name: str, shape: Tuple[int, int, int, int], dtype: torch.dtype, device: str = "cpu"
) -> str:
    """The CPU kernel variant recipe `name` runs for this problem ("-" where none of ours
    does): its [VARIANT], else the choice in effect, auto's pick resolved for the shape."""
    spec = parse(name)
    if not spec.recipe.ours or device != "cpu" or missing(name):
        return "-"
    if dtype in (torch.float16, torch.bfloat16):
        return "lowp"
    with use_cpu_kernel(spec.variant or current_cpu_kernel()):
        return cpu_kernel_info(shape, dtype).split(":")[1].split(",")[0].strip()


def trying(
    name: str, shape: Tuple[int, int, int, int], dtype: torch.dtype, device: str = "cpu"
) -> bool:
    """Whether auto is still trying its candidates at full size for this problem, in calls
    that recipe `name` makes (a large step's first whole-step calls: see docs/design.md).
    False for a recipe whose calls make no trials (two_layer + l2_loss): its calls would not
    end them."""
    spec = parse(name)
    if not spec.recipe.whole_step or device != "cpu" or dtype in (torch.float16, torch.bfloat16):
        return False
    with use_cpu_kernel(spec.variant or current_cpu_kernel()):
        return cpu_kernel_choice(shape, dtype)["how"] == "trying"


def runs_on(name: str, device: str, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether recipe `name` has a place in a run on device in dtype (None: any dtype)."""
    spec = parse(name)
    b = spec.recipe
    return not (
        (device != "cpu" and (b.cpu_only or spec.variant is not None))
        or (dtype is not None and b.dtypes is not None and dtype not in b.dtypes)
    )


def names(
    *,
    device: str = "cpu",
    dtype: Optional[torch.dtype] = None,
    optimizers: Tuple[str, ...] = _OPTIMIZERS,
    training_only: bool = False,
) -> List[str]:
    """Every recipe name that runs on device in dtype, each optimizer variant right after its
    SGD row and, on the CPU, sgd_step once per other CPU kernel variant this CPU can run."""
    out = []
    for b in RECIPES.values():
        if training_only and not b.trains:
            continue
        out += [b.name if o == "sgd" else f"{b.name}+{o}" for o in b.optimizers if o in optimizers]
        if b.per_variant:
            default = current_cpu_kernel()
            out += [f"{b.name}[{k}]" for k in CPU_KERNELS if k != default]
    return [n for n in out if runs_on(n, device, dtype) and not missing(n)]


def build(name: str, problem: Problem) -> Runner:
    """A fresh Runner of recipe `name` on its own copy of the problem's arrays."""
    spec = parse(name)
    runner = spec.recipe.build(problem, spec.optimizer)
    if spec.variant is None:
        return runner  # the default: no switching inside the timed call

    def step():
        with use_cpu_kernel(spec.variant):
            return runner.step()

    return Runner(step, runner.weights)
