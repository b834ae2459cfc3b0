"""Behaviour: l2_loss's sum at large n keeps float32 precision and is deterministic (a fixed
summation order: the same bits every call), per device; at ~21M elements (past float32's 2^24),
sum and mean stay within a few eps on the CPU. (l2_loss against numpy and nn.MSELoss:
tests/test_oracle_agreement.py; empty input: tests/test_shapes.py; NaN/Inf:
tests/test_special_values.py; float16 mean at large n on CUDA: tests/test_cuda.py.) tests/test_gpu_readiness.py runs a collection of this file.
"""

import math

import numpy as np
import pytest
import torch

import twolayer_ext as tl

from conftest import SANITIZE, report


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


@pytest.mark.slow
def test_loss_sum_keeps_precision_at_large_n(request):
    """~21M float32 squared errors: a plain float32 running sum is off by ~1e-2 here (it stalls at
    2^24 for ones); pairwise or wider accumulation stays within a few eps."""
    n = (1 << 24) + (1 << 22)
    if SANITIZE:
        n = 1 << 21
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(n, generator=g) + 0.5  # d^2 in [0.25, 2.25): full mantissas
    target = torch.zeros(n)
    exact = (
        math.fsum((pred.double() ** 2).tolist())
        if n <= 1 << 21
        else float(np.sum(np.square(pred.double().numpy()), dtype=np.float64))
    )
    errs = {}
    for reduction in ("sum", "mean"):
        want = exact if reduction == "sum" else exact / n
        got = tl.l2_loss(pred, target, reduction).item()
        errs[reduction] = abs(got - want) / want
    ones = torch.ones(n)
    got_ones = tl.l2_loss(ones, target).item()
    errs["ones"] = abs(got_ones - n) / n
    report(
        request,
        f"l2_loss over {n} float32 elements: rel err "
        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
    )
    assert all(e < 1e-5 for e in errs.values()), errs
