"""TwoLayerNet: an nn.Module over the fused ops, interchangeable with
nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)."""
import math

import torch
from torch import nn

from .ops import _sgd_step, two_layer, two_layer_l2_loss


class TwoLayerNet(nn.Module):
    """y = relu(x @ w1 + b1) @ w2 + b2 with w1 [D_in, H], w2 [H, D_out] (the tutorial's layout).

    Initialised like nn.Linear (uniform in ±1/sqrt(fan_in)). nn.Linear stores weight^T, so
    from_sequential/to_sequential transpose; the values are moved exactly.
    """

    def __init__(self, D_in, H, D_out, bias=True, *, device=None, dtype=None):
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

    def reset_parameters(self):
        with torch.no_grad():
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                bound = 1.0 / math.sqrt(w.shape[0]) if w.shape[0] > 0 else 0.0
                w.uniform_(-bound, bound)
                if b is not None:
                    b.uniform_(-bound, bound)

    def forward(self, x, target=None, reduction="sum"):
        """y [*, D_out] for x [*, D_in]; given a target [*, D_out], the fused L2 loss instead
        (self.loss), which is how DistributedDataParallel runs the fused loss: through forward."""
        if target is not None:
            return self.loss(x, target, reduction)
        return two_layer(x, self.w1, self.w2, self.b1, self.b2)

    def loss(self, x, target, reduction="sum"):
        """l2_loss(self(x), target, reduction) in one fused op call, its gradients computed in
        the same call when autograd needs them (see twolayer_ext.two_layer_l2_loss): the fast
        route for loss.backward() with any torch.optim optimizer."""
        return two_layer_l2_loss(x, target, self.w1, self.w2, self.b1, self.b2, reduction=reduction)

    def sgd_step(self, x, target, lr, reduction="sum"):
        """One fused SGD step on this module's weights (see twolayer_ext.sgd_step); returns the
        loss before the update. Parameters with requires_grad=False are frozen: not touched."""
        weights = (self.w1, self.w2, self.b1, self.b2)
        update = [w is not None and w.requires_grad for w in weights]
        return _sgd_step(x, target, *weights, lr, reduction, update)

    def extra_repr(self):
        return f"D_in={self.D_in}, H={self.H}, D_out={self.D_out}, bias={self.b1 is not None}"

    @classmethod
    def from_sequential(cls, seq):
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

    def to_sequential(self):
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
