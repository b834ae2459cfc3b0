"""TwoLayerNet: an nn.Module over the fused ops, interchangeable with
nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .ops import _sgd_step, two_layer, two_layer_l2_loss


class TwoLayerNet(nn.Module):
    """y = relu(x @ w1 + b1) @ w2 + b2 with w1 [D_in, H], w2 [H, D_out] (the tutorial's layout).

    Initialised like nn.Linear (uniform in ±1/sqrt(fan_in)). nn.Linear stores weight^T, so
    from_sequential/to_sequential transpose; the values are moved exactly. load_state_dict
    also takes an nn.Sequential(Linear, ReLU, Linear) state dict ("0.weight", "0.bias",
    "2.weight", "2.bias"), transposing the weights; to go the other way, save
    `net.to_sequential().state_dict()`.
    """

    def __init__(self, D_in: int, H: int, D_out: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """D_in, H, D_out: the layer widths (positive ints); bias: both layers get one, or
        neither; device, dtype: where the parameters live (as nn.Linear)."""
        super().__init__()
        for name, value in (("D_in", D_in), ("H", H), ("D_out", D_out)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TwoLayerNet: {name} must be a positive int, got {value!r}")
        kw = {"device": device, "dtype": dtype}
        self.D_in, self.H, self.D_out = D_in, H, D_out
        self.w1 = nn.Parameter(torch.empty(D_in, H, **kw))
        self.w2 = nn.Parameter(torch.empty(H, D_out, **kw))
        self.b1 = nn.Parameter(torch.empty(H, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(D_out, **kw)) if bias else None
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(_accept_sequential_state_dict)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: uniform in ±1/sqrt(fan_in), weights and biases."""
        with torch.no_grad():
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                bound = 1.0 / math.sqrt(w.shape[0]) if w.shape[0] > 0 else 0.0
                w.uniform_(-bound, bound)
                if b is not None:
                    b.uniform_(-bound, bound)

    def forward(self, x: Tensor, target: Tensor | None = None, reduction: str = "sum") -> Tensor:
        """y [*, D_out] for x [*, D_in]; given a target [*, D_out], the fused L2 loss instead
        (self.loss), which is how DistributedDataParallel runs the fused loss: through forward."""
        if target is not None:
            return self.loss(x, target, reduction)
        return two_layer(x, self.w1, self.w2, self.b1, self.b2)

    def loss(self, x: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
        """l2_loss(self(x), target, reduction) in one fused op call, its gradients computed in
        the same call when autograd needs them (see twolayer_ext.two_layer_l2_loss): the fast
        route for loss.backward() with any torch.optim optimizer."""
        return two_layer_l2_loss(x, target, self.w1, self.w2, self.b1, self.b2, reduction=reduction)

    def sgd_step(self, x: Tensor, target: Tensor, lr: float, reduction: str = "sum") -> Tensor:
        """One fused SGD step on this module's weights (see twolayer_ext.sgd_step); returns the
        loss before the update. Parameters with requires_grad=False are frozen: not touched."""
        weights = (self.w1, self.w2, self.b1, self.b2)
        update = [w is not None and w.requires_grad for w in weights]
        return _sgd_step(x, target, *weights, lr, reduction, update)

    def extra_repr(self) -> str:
        return f"D_in={self.D_in}, H={self.H}, D_out={self.D_out}, bias={self.b1 is not None}"

    @classmethod
    def from_sequential(cls, seq: nn.Module) -> TwoLayerNet:
        """From nn.Sequential(nn.Linear(D_in, H), nn.ReLU(), nn.Linear(H, D_out))."""
        layers = list(seq.children()) if isinstance(seq, nn.Module) else None
        if (layers is None or len(layers) != 3 or not isinstance(layers[0], nn.Linear)
                or not isinstance(layers[1], nn.ReLU) or not isinstance(layers[2], nn.Linear)):
            raise TypeError("TwoLayerNet.from_sequential: seq must be "
                            "nn.Sequential(nn.Linear, nn.ReLU, nn.Linear), got "
                            f"{type(seq).__name__}: {seq!r}")
        lin1, _, lin2 = layers
        if lin2.in_features != lin1.out_features:
            raise ValueError(f"TwoLayerNet.from_sequential: the second Linear must take "
                             f"{lin1.out_features} inputs, got {lin2.in_features}")
        if (lin1.bias is None) != (lin2.bias is None):
            raise ValueError("TwoLayerNet.from_sequential: both Linear layers must have a bias, "
                             "or neither")
        w = lin1.weight
        net = cls(lin1.in_features, lin1.out_features, lin2.out_features,
                  bias=lin1.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            net.w1.copy_(lin1.weight.t())
            net.w2.copy_(lin2.weight.t())
            if net.b1 is not None:
                net.b1.copy_(lin1.bias)
                net.b2.copy_(lin2.bias)
        return net

    def to_sequential(self) -> nn.Sequential:
        """An equal nn.Sequential(nn.Linear, nn.ReLU, nn.Linear) holding copies of the weights."""
        kw = {"device": self.w1.device, "dtype": self.w1.dtype}
        bias = self.b1 is not None
        seq = nn.Sequential(nn.Linear(self.D_in, self.H, bias=bias, **kw), nn.ReLU(),
                            nn.Linear(self.H, self.D_out, bias=bias, **kw))
        with torch.no_grad():
            seq[0].weight.copy_(self.w1.t())
            seq[2].weight.copy_(self.w2.t())
            if bias:
                seq[0].bias.copy_(self.b1)
                seq[2].bias.copy_(self.b2)
        return seq


_SEQUENTIAL_KEYS = {"0.weight": "w1", "2.weight": "w2", "0.bias": "b1", "2.bias": "b2"}


def _accept_sequential_state_dict(state_dict: Mapping[str, Any], prefix: str, *_args) -> None:
    """load_state_dict pre-hook: an nn.Sequential(Linear, ReLU, Linear) state dict becomes
    ours in place (weights transposed: nn.Linear stores [out, in]). A dict holding both
    layouts, or neither, is left for load_state_dict to judge."""
    present = {k for k in _SEQUENTIAL_KEYS if prefix + k in state_dict}
    ours = {v for v in _SEQUENTIAL_KEYS.values() if prefix + v in state_dict}
    if not present or ours:
        return
    for seq_key, name in _SEQUENTIAL_KEYS.items():
        if prefix + seq_key in state_dict:
            value = state_dict.pop(prefix + seq_key)
            state_dict[prefix + name] = value.t() if name in ("w1", "w2") else value
