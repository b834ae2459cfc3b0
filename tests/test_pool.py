"""The CPU kernels' worker pool (csrc/cpu/pool.h): torch.set_num_threads governs it, results are
bitwise the same for any thread count and with a core kept busy, and a forked child (a
DataLoader worker) gets a working pool of its own."""

import os
import subprocess
import sys

import pytest
import torch

import twolayer_ext as tl

TUNED = [k for k in tl.CPU_VARIANTS if k.startswith("tuned-") and not tl.cpu_kernel_missing(k)]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def step_results(shape, variant, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, D_in, H, D_out = shape
    x, t = torch.randn(N, D_in, generator=g), torch.randn(N, D_out, generator=g)
    w = [
        torch.randn(D_in, H, generator=g) / D_in**0.5,
        torch.randn(H, D_out, generator=g) / H**0.5,
        torch.randn(H, generator=g),
        torch.randn(D_out, generator=g),
    ]
    with tl.use_cpu_kernel(variant):
        loss = tl.sgd_step(x, t, *w, lr=1e-3)
        p = [v.clone().requires_grad_() for v in w]
        fused = tl.two_layer_l2_loss(x, t, *p, reduction="mean")
        grads = torch.autograd.grad(fused, p)
    return [loss, *w, fused.detach(), *grads]


@pytest.mark.parametrize("variant", TUNED)
@pytest.mark.parametrize(
    "shape", [(300, 70, 50, 9), (5000, 24, 16, 3)], ids=["gemm", "row-blocked"]
)
def test_bitwise_identical_for_any_thread_count(variant, shape, restore_threads):
    results = {}
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        results[n] = step_results(shape, variant)
    for n in (2, 3):
        for a, b in zip(results[1], results[n]):
            assert torch.equal(a, b), f"{n} threads differ from 1"


@pytest.mark.slow  # busy-core timing and a forked child
def test_busy_core_and_fork_child(tmp_path):
    """With a busy-loop process on a core, two threads give the same bits as one; a forked
    child computes with its own pool and exits cleanly."""
    code = f"""
import os, subprocess, sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_pool import step_results
busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    torch.set_num_threads(1)
    one = step_results((300, 70, 50, 9), "tuned")
    torch.set_num_threads(2)
    two = step_results((300, 70, 50, 9), "tuned")
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    pid = os.fork()
    if pid == 0:
        child = step_results((300, 70, 50, 9), "tuned")
        os._exit(0 if all(torch.equal(a, b) for a, b in zip(one, child)) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, status
finally:
    busy.kill()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
