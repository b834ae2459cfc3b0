"""What makes a GPU run trustworthy, checked where it can be: here, without a GPU.

TWOLAYER_REQUIRE_CUDA=1 (tools/gpu_check.sh sets it) turns a session without CUDA into a
failure instead of a run of skips. tools/gpu_check.sh's dry run executes every step that needs
no GPU, and its results are checked here: the plan (order, limits within 9 minutes, printed
first), every test group's selection (the core correctness files first, every CUDA case in
exactly one group, the hostile-input table whose CUDA rows run only on a GPU), the benchmark's
backends (from twolayer_ext.backends, never a compiled one at every size) and command lines,
summary.json and the output-file budget; without a GPU the real run stops at its preflight. The
fake kernels word a bad dtype exactly as the real checks do, for CUDA tensors too (fake CUDA
tensors need no GPU)."""

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import twolayer_ext as tl
from twolayer_ext.tools import recipes as B

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(ROOT, "tools", "gpu_check.sh")
STEPS = [
    "preflight",
    "build",
    "core",
    "hostile",
    "rest",
    "opcheck",
    "compile",
    "bench",
    "bench_compile",
]
GROUPS = ["core", "hostile", "rest", "opcheck", "compile"]
CORE_FILES = [
    "test_oracle_agreement.py",
    "test_sgd_step.py",
    "test_shapes.py",
    "test_special_values.py",
    "test_strides.py",
    "test_fused_loss.py",
]


def clean_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TWOLAYER_REQUIRE_CUDA", "GPU_CHECK_DRY_RUN")
    }
    env.update(extra)
    return env


def pytest_run(*args, require=None, **env_vars):
    env = clean_env(**env_vars)
    if require is not None:
        env["TWOLAYER_REQUIRE_CUDA"] = require
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # a pytest subprocess
def test_required_gpu_fails_a_session_that_has_none():
    proc = pytest_run("--collect-only", "tests/test_l2_loss.py", require="1")
    out = proc.stdout + proc.stderr
    if HAS_CUDA:
        assert proc.returncode == 0, out[-2000:]
    else:
        assert proc.returncode == 3, out[-2000:]
        assert re.search(r"TWOLAYER_REQUIRE_CUDA=1: no usable CUDA device: \S", out), out[-2000:]
        assert "collected" not in out  # stopped before any test could skip


# ---- tools/gpu_check.sh --dry-run ----------------------------------------------------------------


class DryRun:
    def __init__(self, out_dir):
        proc = subprocess.run(
            ["bash", GPU_CHECK, "--dry-run", str(out_dir)],
            cwd=ROOT,
            env=clean_env(PYTHON=sys.executable),
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.rc, self.output, self.dir = proc.returncode, proc.stdout + proc.stderr, out_dir
        with open(out_dir / "summary.json") as f:
            self.summary = json.load(f)
        with tarfile.open(out_dir / "logs.tar.gz") as tar:
            self.logs = {
                os.path.basename(m.name): tar.extractfile(m).read().decode()
                for m in tar.getmembers()
                if m.isfile()
            }
        # Each group's selected test ids, from its collection log.
        self.selected = {
            g: {line.strip() for line in self.logs[f"collect_{g}.log"].splitlines() if "::" in line}
            for g in GROUPS
        }


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return DryRun(tmp_path_factory.mktemp("gpu-check-dry-run"))


@pytest.mark.slow  # gpu_check.sh's dry run
def test_dry_run_runs_every_step_that_needs_no_gpu_and_passes(dry_run):
    assert dry_run.rc == 0, dry_run.output[-3000:]
    s = dry_run.summary
    assert s["ok"] and s["dry_run"] and s["finished"] and s["reason"] is None, s
    assert list(s["steps"]) == STEPS
    for name, step in s["steps"].items():
        assert step["status"] == "ok" and step["detail"].startswith("dry run"), (name, step)
    assert dry_run.output.rstrip().splitlines()[-1].startswith("dry run: ok")


@pytest.mark.slow  # gpu_check.sh's dry run
def test_plan_is_printed_first_and_fits_nine_minutes(dry_run):
    s = dry_run.summary
    assert s["planned_seconds"] <= 540
    assert sum(step["limit"] for step in s["steps"].values()) <= s["planned_seconds"]
    assert all(s["steps"][name]["limit"] > 0 for name in STEPS[:-1])  # bench_compile: time left
    lines = dry_run.output.splitlines()
    assert lines[0].startswith("=== gpu_check plan")
    plan = lines[: lines.index(next(l for l in lines if l.startswith("=== preflight")))]
    for name in STEPS:  # each step with its limit, in order
        assert any(l.split()[:1] == [name] for l in plan), (name, plan)
    order = [next(i for i, l in enumerate(plan) if l.split()[:1] == [name]) for name in STEPS]
    assert order == sorted(order)


@pytest.mark.slow  # gpu_check.sh's dry run
def test_core_correctness_files_run_first_and_alone(dry_run):
    core = dry_run.selected["core"]
    for name in CORE_FILES:
        assert any(t.startswith(f"tests/{name}::") and "cuda" in t for t in core), name
    assert any(t.startswith("tests/test_cuda.py::test_forward_loss_and_gradients") for t in core)
    assert not any("opcheck" in t or "reduce_overhead" in t for t in core)
    hostile = dry_run.selected["hostile"]
    assert (
        "tests/test_hostile.py::test_hostile_inputs_raise_clear_errors_and_never_crash" in hostile
    )
    assert all(t.startswith("tests/test_opcheck.py::") for t in dry_run.selected["opcheck"])
    assert any("reduce_overhead" in t for t in dry_run.selected["compile"])


@pytest.mark.slow  # gpu_check.sh's dry run and a collection
def test_every_cuda_case_runs_in_exactly_one_group(dry_run):
    # Collected as gpu_check.sh collects them: TWOLAYER_CUDA=1 generates the [cuda] cases with no
    # GPU (tests/conftest.py).
    proc = pytest_run(
        "--collect-only",
        "-k",
        "cuda",
        "tests",
        "--ignore=tests/test_gpu_readiness.py",
        *([] if has_hypothesis() else ["--ignore=tests/test_properties.py"]),
        TWOLAYER_CUDA="1",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    cuda_cases = {line.strip() for line in proc.stdout.splitlines() if "::" in line}
    assert len(cuda_cases) > 100
    seen = {}
    for g, tests in dry_run.selected.items():
        for t in tests:
            assert t not in seen, f"{t} runs in both {seen[t]} and {g}"
            seen[t] = g
    missing = sorted(cuda_cases - set(seen))
    assert not missing, f"{len(missing)} CUDA cases in no group, e.g. {missing[:5]}"


def has_hypothesis():
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow  # gpu_check.sh's dry run
def test_benchmark_backends_come_from_the_registry_without_compile(dry_run):
    s = dry_run.summary
    want = [
        n for n in B.names(device="cuda", optimizers=("sgd",)) if not B.parse(n).recipe.compiled
    ]
    assert s["bench_backends"] == want and "sgd_step" in want and "module" in want
    # Both command lines were accepted by the benchmark's own parser; compile at the seed only.
    assert "backends ['module', 'compile']" in s["steps"]["bench_compile"]["detail"]
    assert "sizes ['seed']" in s["steps"]["bench_compile"]["detail"]
    for b in want:
        assert f"--backend {b}" in dry_run.output


@pytest.mark.slow  # gpu_check.sh's dry run
def test_output_folder_stays_within_what_a_gpu_machine_hands_back(dry_run):
    files = sorted(str(p.relative_to(dry_run.dir)) for p in dry_run.dir.rglob("*") if p.is_file())
    assert dry_run.summary["max_output_files"] == 8
    assert len(files) <= 8 and files == dry_run.summary["output_files"], files
    assert {"gpu_check.log", "summary.json", "logs.tar.gz"} <= set(files)


@pytest.mark.slow  # gpu_check.sh in a subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the real run would run")
def test_real_run_without_a_gpu_stops_at_the_preflight(tmp_path):
    proc = subprocess.run(
        ["bash", GPU_CHECK, str(tmp_path)],
        cwd=ROOT,
        env=clean_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert out.rstrip().splitlines()[-1].startswith("no usable CUDA device: "), out[-2000:]
    assert "=== build" not in out  # nothing built, nothing run
    with open(tmp_path / "summary.json") as f:
        s = json.load(f)
    assert s["ok"] is False and s["reason"].startswith("no usable CUDA device: "), s
    assert s["steps"]["preflight"]["status"].startswith("FAILED")


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
