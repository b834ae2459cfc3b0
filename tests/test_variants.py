"""The CPU kernel variants: switching, and the portable build a CPU without AVX2 would run."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import twolayer_ext as tl


def test_switch_and_restore():
    start = tl.cpu_kernel_info().split()[0]
    with tl.use_cpu_kernel("reference"):
        assert tl.cpu_kernel_info().startswith("reference")
    assert tl.cpu_kernel_info().startswith(start)
    with pytest.raises(ValueError, match="name must be one of"):
        tl.set_cpu_kernel("fast")


def test_variants_agree():
    torch.manual_seed(0)
    x, y = torch.randn(37, 29, dtype=torch.float64), torch.randn(37, 7, dtype=torch.float64)
    params = [torch.randn(29, 19, dtype=torch.float64), torch.randn(19, 7, dtype=torch.float64),
              torch.randn(19, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    out = {}
    for variant in tl.CPU_KERNELS:
        p = [t.clone() for t in params]
        with tl.use_cpu_kernel(variant):
            loss = tl.sgd_step(x, y, *p, lr=1e-3)
            out[variant] = (loss, tl.two_layer(x, *p), p)
    a, b = out["tuned"], out["reference"]
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-12)
    for u, v in zip(a[2], b[2]):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_portable_build_without_avx2():
    # What a CPU without AVX2 runs (forced by TWOLAYER_NO_AVX2=1), against the numpy oracle.
    code = textwrap.dedent("""
        import numpy as np, torch, twolayer_ext as tl
        from twolayer_ext import reference as R
        assert "portable" in tl.cpu_kernel_info(), tl.cpu_kernel_info()
        x, y, p = R.tutorial_data(45, 70, 33, 19, seed=1, bias=True)
        P = {k: torch.tensor(v) for k, v in p.items()}
        loss = tl.sgd_step(torch.tensor(x), torch.tensor(y), P["w1"], P["w2"], P["b1"], P["b2"], lr=1e-4)
        expected = R.numpy_sgd_step(x, y, p, 1e-4)
        assert abs(loss.item() - expected) <= 1e-10 * abs(expected), (loss.item(), expected)
        for k in p:
            np.testing.assert_allclose(P[k].numpy(), p[k], rtol=1e-10, atol=1e-10)
        print("ok")
    """)
    env = dict(os.environ, TWOLAYER_NO_AVX2="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
