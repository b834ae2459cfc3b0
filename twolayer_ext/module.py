"""TwoLayerNet: an nn.Module over the fused ops, interchangeable with
nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)."""

from __future__ import annotations

import math
from typing import Any, MutableMapping, cast

import torch
from torch import Tensor, nn

from .ops import _sgd_step, _two_layer_l2_loss, two_layer


class TwoLayerNet(nn.Module):
    """y = relu(x @ w1 + b1) @ w2 + b2, interchangeable with
    nn.Sequential(nn.Linear(D_in, H), nn.ReLU(), nn.Linear(H, D_out)).

    The parameters are held as that nn.Sequential holds them, in its order and layout:
    weight1 [H, D_in], bias1 [H], weight2 [D_out, H], bias2 [D_out]. So an optimizer state
    saved from the nn.Sequential (Adam's moments, SGD's momentum) resumes here exactly, and
    the other way round. w1 [D_in, H] and w2 [H, D_out] are the tutorial's layout: views
    (weight1.t(), weight2.t()), which the ops read in place; b1 and b2 are bias1 and bias2.
    Gradients land on the parameters (net.weight1.grad, net.bias1.grad).

    Initialised like nn.Linear (uniform in ±1/sqrt(fan_in)). load_state_dict takes our state
    dict, an nn.Sequential(Linear, ReLU, Linear) one ("0.weight", "0.bias", "2.weight",
    "2.bias"), or one with the tutorial-layout keys w1, w2, b1, b2; to_sequential() gives the
    nn.Sequential itself.
    """

    def __init__(
        self,
        D_in: int,
        H: int,
        D_out: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """D_in, H, D_out: the layer widths (positive ints); bias: both layers get one, or
        neither; device, dtype: where the parameters live (as nn.Linear)."""
        super().__init__()
        for name, value in (("D_in", D_in), ("H", H), ("D_out", D_out)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TwoLayerNet: {name} must be a positive int, got {value!r}")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.D_in, self.H, self.D_out = D_in, H, D_out
        # Registration order is nn.Sequential's: an optimizer's state is keyed by it.
        self.weight1 = nn.Parameter(torch.empty(H, D_in, **kw))
        self.bias1 = nn.Parameter(torch.empty(H, **kw)) if bias else None
        self.weight2 = nn.Parameter(torch.empty(D_out, H, **kw))
        self.bias2 = nn.Parameter(torch.empty(D_out, **kw)) if bias else None
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(_accept_other_layouts)

    @property
    def w1(self) -> Tensor:
        """weight1 as the tutorial's [D_in, H] (a view)."""
        return self.weight1.t()

    @property
    def w2(self) -> Tensor:
        """weight2 as the tutorial's [H, D_out] (a view)."""
        return self.weight2.t()

    @property
    def b1(self) -> Tensor | None:
        return self.bias1

    @property
    def b2(self) -> Tensor | None:
        return self.bias2

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: uniform in ±1/sqrt(fan_in), weights and biases."""
        with torch.no_grad():
            for w, b in ((self.weight1, self.bias1), (self.weight2, self.bias2)):
                bound = 1.0 / math.sqrt(w.shape[1]) if w.shape[1] > 0 else 0.0
                w.uniform_(-bound, bound)
                if b is not None:
                    b.uniform_(-bound, bound)

    def forward(self, x: Tensor, target: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """y [*, D_out] for x [*, D_in]; given a target [*, D_out], the fused L2 loss instead
        (self.loss, same default), which is how DistributedDataParallel runs the fused loss:
        through forward."""
        if target is not None:
            return self.loss(x, target, reduction)
        return two_layer(x, self.w1, self.w2, self.bias1, self.bias2)

    def loss(self, x: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """l2_loss(self(x), target, reduction) in one fused op call, its gradients computed in
        the same call when autograd needs them (see twolayer_ext.two_layer_l2_loss): the fast
        route for loss.backward() with any torch.optim optimizer.

        The default is "mean", as nn.MSELoss()'s, so the module replaces nn.Sequential +
        nn.MSELoss() as it is; the tutorial's sum of squares is reduction="sum" (a gradient
        N * D_out times larger)."""
        # The nn.Linear-layout parameters themselves (no .t() views in the autograd graph).
        return _two_layer_l2_loss(x, target, *self._weights(), reduction, True)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        # weight1, weight2, bias1, bias2 read from _parameters (where torch.func.functional_call
        # swaps them too): nn.Module.__getattr__ costs ~1 us a name, 5% of a 1x1 step.
        p = self._parameters
        return (
            cast(Tensor, p["weight1"]),
            cast(Tensor, p["weight2"]),
            p.get("bias1"),
            p.get("bias2"),
        )

    def sgd_step(self, x: Tensor, target: Tensor, lr: float, reduction: str = "sum") -> Tensor:
        """One fused SGD step on this module's weights (see twolayer_ext.sgd_step); returns the
        loss before the update. Parameters with requires_grad=False are frozen: not touched."""
        params = (self.weight1, self.weight2, self.bias1, self.bias2)
        update = [p is not None and p.requires_grad for p in params]
        with torch.no_grad():  # the views are updated in place, as an optimizer updates
            w1, w2 = self.weight1.t(), self.weight2.t()
        return _sgd_step(x, target, w1, w2, self.bias1, self.bias2, lr, reduction, update)

    def extra_repr(self) -> str:
        return f"D_in={self.D_in}, H={self.H}, D_out={self.D_out}, bias={self.b1 is not None}"

    @classmethod
    def from_sequential(cls, seq: nn.Module) -> TwoLayerNet:
        """From nn.Sequential(nn.Linear(D_in, H), nn.ReLU(), nn.Linear(H, D_out))."""
        layers = list(seq.children()) if isinstance(seq, nn.Module) else None
        if (
            layers is None
            or len(layers) != 3
            or not isinstance(layers[0], nn.Linear)
            or not isinstance(layers[1], nn.ReLU)
            or not isinstance(layers[2], nn.Linear)
        ):
            raise TypeError(
                "TwoLayerNet.from_sequential: seq must be "
                "nn.Sequential(nn.Linear, nn.ReLU, nn.Linear), got "
                f"{type(seq).__name__}: {seq!r}"
            )
        lin1, lin2 = cast(nn.Linear, layers[0]), cast(nn.Linear, layers[2])  # checked above
        if lin2.in_features != lin1.out_features:
            raise ValueError(
                f"TwoLayerNet.from_sequential: the second Linear must take "
                f"{lin1.out_features} inputs, got {lin2.in_features}"
            )
        if (lin1.bias is None) != (lin2.bias is None):
            raise ValueError(
                "TwoLayerNet.from_sequential: both Linear layers must have a bias, or neither"
            )
        w = lin1.weight
        net = cls(
            lin1.in_features,
            lin1.out_features,
            lin2.out_features,
            bias=lin1.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        net.load_state_dict(seq.state_dict())
        return net

    def to_sequential(self) -> nn.Sequential:
        """An equal nn.Sequential(nn.Linear, nn.ReLU, nn.Linear) holding copies of the weights."""
        kw = {"device": self.weight1.device, "dtype": self.weight1.dtype}
        bias = self.bias1 is not None
        seq = nn.Sequential(
            nn.Linear(self.D_in, self.H, bias=bias, **kw),
            nn.ReLU(),
            nn.Linear(self.H, self.D_out, bias=bias, **kw),
        )
        seq.load_state_dict({_SEQUENTIAL_KEYS[k]: v for k, v in self.state_dict().items()})
        return seq


# Our parameter names -> nn.Sequential's keys (the same tensors, the same layout) and the
# tutorial-layout keys (w1, w2 transposed).
_SEQUENTIAL_KEYS = {
    "weight1": "0.weight",
    "bias1": "0.bias",
    "weight2": "2.weight",
    "bias2": "2.bias",
}
_TUTORIAL_KEYS = {"weight1": "w1", "bias1": "b1", "weight2": "w2", "bias2": "b2"}


def _accept_other_layouts(state_dict: MutableMapping[str, Any], prefix: str, *_args) -> None:
    """load_state_dict pre-hook: an nn.Sequential(Linear, ReLU, Linear) state dict, or one in
    the tutorial's layout (w1 [D_in, H], ...), becomes ours in place. A dict mixing layouts, or
    with none of them, is left for load_state_dict to judge."""
    if any(prefix + k in state_dict for k in _SEQUENTIAL_KEYS):
        return
    for keys, transpose in ((_SEQUENTIAL_KEYS, False), (_TUTORIAL_KEYS, True)):
        if not any(prefix + k in state_dict for k in keys.values()):
            continue
        if any(
            prefix + k in state_dict
            for other in (_SEQUENTIAL_KEYS, _TUTORIAL_KEYS)
            if other is not keys
            for k in other.values()
        ):
            return
        for name, key in keys.items():
            if prefix + key in state_dict:
                value = state_dict.pop(prefix + key)
                state_dict[prefix + name] = (
                    value.t() if transpose and name.startswith("weight") else value
                )
        return
