"""What makes a GPU run trustworthy, checked where it can be: here, without a GPU.

TWOLAYER_REQUIRE_CUDA=1 (tools/gpu_check.sh sets it) turns a session without CUDA into a
failure instead of a run of skips; gpu_check.sh's test selection includes the hostile-input
table (whose CUDA rows run only on a GPU); the fake kernels word a bad dtype exactly as the
real checks do, for CUDA tensors too (fake CUDA tensors need no GPU)."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import twolayer_ext as tl

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_run(*args, require=None):
    env = {k: v for k, v in os.environ.items() if k != "TWOLAYER_REQUIRE_CUDA"}
    if require is not None:
        env["TWOLAYER_REQUIRE_CUDA"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_required_gpu_fails_a_session_that_has_none():
    proc = pytest_run("--collect-only", "tests/test_l2_loss.py", require="1")
    out = proc.stdout + proc.stderr
    if HAS_CUDA:
        assert proc.returncode == 0, out[-2000:]
    else:
        assert proc.returncode == 3, out[-2000:]
        assert re.search(r"TWOLAYER_REQUIRE_CUDA=1: no usable CUDA device: \S", out), out[-2000:]
        assert "collected" not in out  # stopped before any test could skip


def test_gpu_check_selects_the_hostile_table_and_every_cuda_case():
    with open(os.path.join(ROOT, "tools", "gpu_check.sh")) as f:
        selection = re.findall(r'-k "([^"]+)"', f.read())
    assert len(selection) == 1, f"expected one pytest -k selection in gpu_check.sh, got {selection}"
    proc = pytest_run("--collect-only", "-k", selection[0], "tests/test_hostile.py",
                      "tests/test_cuda.py", "tests/test_sgd_step.py")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    chosen = proc.stdout.splitlines()
    assert "tests/test_hostile.py::test_hostile_inputs_raise_clear_errors_and_never_crash" in chosen
    assert any(c.startswith("tests/test_cuda.py::") for c in chosen)
    assert any(c.startswith("tests/test_sgd_step.py::") and "cuda" in c for c in chosen)
    assert not any(c.startswith("tests/test_sgd_step.py::") and "cuda" not in c for c in chosen)


def dtype_error(dtype, device="cpu"):
    x, w = (torch.ones(*shape, dtype=dtype, device=device) for shape in ((4, 3), (3, 3)))
    with pytest.raises(TypeError) as info:
        tl.two_layer(x, w, w)
    return str(info.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool], ids=str)
def test_fake_kernel_words_a_bad_dtype_as_the_real_check(dtype):
    real = dtype_error(dtype)
    with FakeTensorMode():
        assert dtype_error(dtype) == real


def test_fake_kernel_words_a_bad_cuda_dtype_as_the_real_check():
    with FakeTensorMode():  # a fake CUDA tensor needs no GPU
        fake = dtype_error(torch.int32, "cuda")
    # csrc/checks.cpp's words for any CUDA device (tests/test_cuda.py compares with the real one).
    assert fake == "two_layer: x must be float32, float64, float16 or bfloat16 on CUDA, got Int"
