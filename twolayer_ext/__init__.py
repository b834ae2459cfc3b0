"""twolayer_ext: a fused two-layer ReLU MLP (forward, L2 loss, backward) as PyTorch custom ops.

    y = relu(x @ w1 + b1) @ w2 + b2

two_layer and l2_loss are differentiable drop-ins for the tutorial's
x.mm(w1).clamp(min=0).mm(w2) and (y_pred - y).pow(2).sum(); TwoLayerNet is the nn.Module.
The numpy and autograd oracles they are validated against are in twolayer_ext.reference.
"""

from ._loader import BUILD_INFO, available_devices
from .module import TwoLayerNet
from .ops import (
    CPU_KERNELS,
    CPU_VARIANTS,
    cpu_kernel_choice,
    cpu_kernel_info,
    cpu_kernel_missing,
    l2_loss,
    set_cpu_kernel,
    sgd_step,
    two_layer,
    two_layer_l2_loss,
    use_cpu_kernel,
)

__all__ = [
    "two_layer",
    "l2_loss",
    "two_layer_l2_loss",
    "sgd_step",
    "TwoLayerNet",
    "available_devices",
    "BUILD_INFO",
    "CPU_KERNELS",
    "CPU_VARIANTS",
    "cpu_kernel_missing",
    "set_cpu_kernel",
    "use_cpu_kernel",
    "cpu_kernel_info",
    "cpu_kernel_choice",
]
__version__ = "0.1.0"
