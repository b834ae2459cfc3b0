"""The CPU kernel variants: switching, and the portable build a CPU without AVX2 would run."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import twolayer_ext as tl


RUNNABLE = [k for k in tl.CPU_VARIANTS if not tl.cpu_kernel_missing(k)]


SMALL = (4, 8, 8, 2)  # a problem auto takes by rule, unmeasured


def test_switch_and_restore():
    start = tl.cpu_kernel_choice(SMALL)
    with tl.use_cpu_kernel("reference"):
        assert tl.cpu_kernel_choice(SMALL)["variant"] == "reference"
    assert tl.cpu_kernel_choice(SMALL) == start
    with pytest.raises(ValueError, match="name must be one of"):
        tl.set_cpu_kernel("fast")


def test_registry_names_and_isas():
    assert tl.CPU_KERNELS[:2] == ("auto", "tuned") and "reference" in tl.CPU_VARIANTS
    assert {"tuned-avx512", "tuned-avx2", "tuned-portable", "blas"} <= set(tl.CPU_VARIANTS)
    assert tl.cpu_kernel_missing("tuned-portable") == ""
    for name in tl.CPU_VARIANTS:
        missing = tl.cpu_kernel_missing(name)
        if missing:  # refused with the reason, never run on a CPU that lacks the ISA
            with pytest.raises(RuntimeError, match="needs a CPU with"):
                tl.set_cpu_kernel(name)
    with pytest.raises(ValueError, match="must be one of"):
        tl.cpu_kernel_missing("fast")


def test_auto_says_what_it_picks_per_shape():
    with tl.use_cpu_kernel("auto"):
        for shape in [(64, 1000, 100, 10), (4096, 1024, 1024, 256), (65536, 64, 64, 16)]:
            choice = tl.cpu_kernel_choice(shape)
            assert choice["choice"] == "auto" and choice["variant"] in RUNNABLE, choice
    with tl.use_cpu_kernel("tuned"):
        assert tl.cpu_kernel_choice((8, 8, 8, 8))["variant"].startswith("tuned-")


@pytest.mark.parametrize("variant", RUNNABLE)
def test_variants_agree_with_reference(variant):
    torch.manual_seed(0)
    x, y = torch.randn(37, 29, dtype=torch.float64), torch.randn(37, 7, dtype=torch.float64)
    params = [
        torch.randn(29, 19, dtype=torch.float64),
        torch.randn(19, 7, dtype=torch.float64),
        torch.randn(19, dtype=torch.float64),
        torch.randn(7, dtype=torch.float64),
    ]
    out = {}
    for name in (variant, "reference"):
        p = [t.clone() for t in params]
        with tl.use_cpu_kernel(name):
            loss = tl.sgd_step(x, y, *p, lr=1e-3)
            out[name] = (loss, tl.two_layer(x, *p), p)
    a, b = out[variant], out["reference"]
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-12)
    for u, v in zip(a[2], b[2]):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # a subprocess per ISA
@pytest.mark.parametrize(
    "isa", [k.removeprefix("tuned-") for k in RUNNABLE if k.startswith("tuned-")]
)
def test_twolayer_isa_forces_the_tuned_build(isa):
    # What a CPU with only that ISA runs (forced by TWOLAYER_ISA), against the numpy oracle; the
    # ISAs this CPU lacks are not generated.
    code = textwrap.dedent(f"""
        import numpy as np, torch, twolayer_ext as tl
        from twolayer_ext import reference as R
        choice = tl.cpu_kernel_choice((45, 70, 33, 19), torch.float64)
        assert choice["variant"] == "tuned-{isa}", choice
        x, y, p = R.tutorial_data(45, 70, 33, 19, seed=1, bias=True)
        P = {{k: torch.tensor(v) for k, v in p.items()}}
        loss = tl.sgd_step(torch.tensor(x), torch.tensor(y), P["w1"], P["w2"], P["b1"], P["b2"], lr=1e-4)
        expected = R.numpy_sgd_step(x, y, p, 1e-4)
        assert abs(loss.item() - expected) <= 1e-10 * abs(expected), (loss.item(), expected)
        for k in p:
            np.testing.assert_allclose(P[k].numpy(), p[k], rtol=1e-10, atol=1e-10)
        print("ok")
    """)
    env = dict(os.environ, TWOLAYER_ISA=isa)
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.slow  # a subprocess
def test_bad_twolayer_isa_is_a_clear_error():
    code = "import twolayer_ext as tl, torch; tl.two_layer(torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, TWOLAYER_ISA="sse9"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "TWOLAYER_ISA must be avx512, avx2 or portable" in r.stderr
