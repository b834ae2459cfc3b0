"""Behaviour: l2_loss's sum at large n keeps float32 precision and is deterministic (a fixed
summation order: the same bits every call), per device. Merged from test_l2_loss.py and
test_cuda.py. (l2_loss against numpy and nn.MSELoss: tests/test_oracle_agreement.py; empty
input: tests/test_shapes.py; NaN/Inf: tests/test_special_values.py; float16 mean at large n on
CUDA: tests/test_cuda.py.) tests/test_gpu_readiness.py runs a collection of this file.
"""
import torch

import twolayer_ext as tl


def test_large_sum_keeps_precision_and_is_deterministic(device):
    # 4M float32 terms: a naive float32 running sum would be off by ~1e-3 relative.
    n = 1 << 22
    g = torch.Generator().manual_seed(0)
    pred = (torch.full((n,), 1.0) + torch.rand(n, generator=g) * 1e-3).to(device)
    target = torch.zeros(n, device=device)
    exact = float((pred.double() ** 2).sum())
    losses = [tl.l2_loss(pred, target) for _ in range(3)]
    assert abs(losses[0].item() - exact) / exact < 1e-6
    assert all(torch.equal(loss, losses[0]) for loss in losses)  # fixed summation order
