import collections
import contextlib
import os

# auto's measured picks stay in memory during the tests, unless a test asks for a file: the
# user's wisdom file is never read or written by them.
os.environ.setdefault("TWOLAYER_WISDOM", "off")


def _inductor_cache_dir():
    """Inductor's cache keyed by this build of the package: its cache key does not cover our
    fake kernels' Python, so a graph compiled against an older fake would be reused."""
    import hashlib
    import pathlib
    import tempfile

    pkg = pathlib.Path(__file__).resolve().parent.parent / "twolayer_ext"
    digest = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")) + sorted(pkg.glob("_C*.so")):
        digest.update(f.read_bytes())
    return os.path.join(tempfile.gettempdir(), f"twolayer-inductor-{digest.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())

import numpy as np
import pytest
import torch

import twolayer_ext
from twolayer_ext import reference as R

HAS_CUDA = torch.cuda.is_available() and "cuda" in twolayer_ext.available_devices()
NO_CUDA_REASON = "needs a GPU and the CUDA build"
# Only the cases that can run are generated. [cuda] cases exist where CUDA runs, and where a
# CUDA build is asked for (TWOLAYER_CUDA=1: tools/gpu_check.sh's dry run and make cuda-check
# collect them, without a GPU, to check each test group's selection; there they skip).
COLLECT_CUDA = HAS_CUDA or os.environ.get("TWOLAYER_CUDA") == "1"
CUDA_MARKS = () if HAS_CUDA else (pytest.mark.skipif(True, reason=NO_CUDA_REASON),)
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=CUDA_MARKS)] if COLLECT_CUDA else [])
# CPU kernel variants this CPU runs (a variant needs its ISA).
RUNNABLE_VARIANTS = [v for v in twolayer_ext.CPU_VARIANTS if not twolayer_ext.cpu_kernel_missing(v)]
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}
# Under the sanitizers (tools/sanitize.sh) the long loops are shorter and some runs are skipped.
SANITIZE = bool(os.environ.get("TWOLAYER_SANITIZE"))


def pytest_generate_tests(metafunc):
    """`device` and `cpu_kernel` together: one case per runnable CPU variant on the CPU and one
    [cuda] case (the variants are CPU kernels); each alone: its own values."""
    names = metafunc.fixturenames
    if "cpu_kernel" in names and "device" in names:
        cases = [pytest.param("cpu", v, id=f"{v}-cpu") for v in RUNNABLE_VARIANTS]
        if COLLECT_CUDA:
            cases.append(pytest.param("cuda", None, id="cuda", marks=CUDA_MARKS))
        metafunc.parametrize(("device", "cpu_kernel"), cases, indirect=True)
    elif "cpu_kernel" in names:
        metafunc.parametrize("cpu_kernel", RUNNABLE_VARIANTS, indirect=True)
    elif "device" in names:
        metafunc.parametrize("device", DEVICES, indirect=True)


@pytest.fixture
def cpu_kernel(request):
    """Runs a test once per CPU kernel variant this CPU runs (use with pytestmark usefixtures);
    with `device`, its [cuda] case gets None and no variant."""
    if request.param is None:
        yield None
        return
    with twolayer_ext.use_cpu_kernel(request.param):
        yield request.param


@pytest.fixture
def tuned_portable_missing(monkeypatch):
    """The recipe registry sees tuned-portable, which every CPU runs, as needing "a CPU with
    isa9": a variant for an ISA this CPU lacks (as tuned-avx512 on an AVX2-only one)."""
    from twolayer_ext.tools import recipes

    real = recipes.cpu_kernel_missing
    monkeypatch.setattr(
        recipes,
        "cpu_kernel_missing",
        lambda k: "needs a CPU with isa9" if k == "tuned-portable" else real(k),
    )


@pytest.fixture
def device(request):
    return request.param


def report(request, text):
    """Writes a line of measurements to the terminal, past pytest's output capture."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line("\n" + text)


def problem(N, D_in, H, D_out, *, bias, seed=0):
    """A float64 numpy problem with weights scaled so activations stay O(1)."""
    x, y, params = R.tutorial_data(N, D_in, H, D_out, seed=seed, bias=bias)
    params["w1"] /= np.sqrt(max(D_in, 1))
    params["w2"] /= np.sqrt(max(H, 1))
    return x, y, params


def loss_through(path, t, reduction):
    """The loss of problem tensors t {x, y, w1, w2, b1, b2} through the fused loss ("fused") or
    two_layer + l2_loss (anything else); returns (loss, y or None)."""
    if path == "fused":
        return twolayer_ext.two_layer_l2_loss(
            t["x"], t["y"], t["w1"], t["w2"], t["b1"], t["b2"], reduction=reduction
        ), None
    y = twolayer_ext.two_layer(t["x"], t["w1"], t["w2"], t["b1"], t["b2"])
    return twolayer_ext.l2_loss(y, t["y"], reduction), y


def to_torch(params, device, dtype=torch.float64, requires_grad=False):
    return {
        k: (
            None
            if v is None
            else torch.tensor(v, dtype=dtype, device=device).requires_grad_(requires_grad)
        )
        for k, v in params.items()
    }


def assert_close_np(actual, expected, rtol, atol=0.0, what=""):
    actual = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# ---- TWOLAYER_REQUIRE_CUDA=1 (tools/gpu_check.sh sets it): no CUDA is a failed session --------


def cuda_unusable_reason():
    """None when the CUDA cases can run here; else why not, in one line."""
    if HAS_CUDA:
        return None
    if not torch.cuda.is_available():
        return (
            f"torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda or 'none: a CPU-only build'})"
        )
    return f"the extension has no CUDA kernels: {twolayer_ext.BUILD_INFO}"


def pytest_sessionstart(session):
    if os.environ.get("TWOLAYER_REQUIRE_CUDA") == "1":
        reason = cuda_unusable_reason()
        if reason:  # otherwise every CUDA case skips and the run reads as a pass
            pytest.exit(f"TWOLAYER_REQUIRE_CUDA=1: no usable CUDA device: {reason}", returncode=3)


# ---- the summary: cases not generated, then skips as one line per reason ------------------


def pytest_terminal_summary(terminalreporter):
    # What was not generated, and why: the cases a GPU or another CPU would add.
    if not COLLECT_CUDA:
        terminalreporter.write_line(f"NOT GENERATED: the [cuda] cases: {cuda_unusable_reason()}")
    for v in twolayer_ext.CPU_VARIANTS:
        if v not in RUNNABLE_VARIANTS:
            terminalreporter.write_line(
                f"NOT GENERATED: the {v} cases: {twolayer_ext.cpu_kernel_missing(v)}"
            )
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"SKIPPED {count} cases: {reason}")


# ---- shared by the behaviour files -----------------------------------------------------------

# Every dtype the ops take: float32/float64/float16/bfloat16 on every device (the accuracy of
# the 16-bit ones is bounded in tests/test_low_precision.py).
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CPU_DTYPES = tuple(ALL_DTYPES)


def skip_unless_dtype_runs_on(device, dtype):
    """Skips a case for a dtype the device's kernels do not take (today: none)."""
    if device == "cpu" and dtype not in CPU_DTYPES:
        pytest.skip(f"{dtype} does not run on the CPU")


@contextlib.contextmanager
def matmul_precision(tf32, reduced=False):
    """TF32 on or off for float32 CUDA GEMMs; float16/bfloat16 GEMMs reduce in float32 (no
    reduced-precision split-K) unless `reduced`, so the only roundings are those of the dtype.
    Only torch's CUDA matmul flags: a no-op for the CPU kernels."""
    m = torch.backends.cuda.matmul
    saved = (
        m.allow_tf32,
        m.allow_fp16_reduced_precision_reduction,
        m.allow_bf16_reduced_precision_reduction,
    )
    m.allow_tf32 = tf32
    m.allow_fp16_reduced_precision_reduction = reduced
    m.allow_bf16_reduced_precision_reduction = reduced
    try:
        yield
    finally:
        (
            m.allow_tf32,
            m.allow_fp16_reduced_precision_reduction,
            m.allow_bf16_reduced_precision_reduction,
        ) = saved


def cpu_reference():
    """The CPU `reference` kernel variant: what another device or variant is compared with."""
    return twolayer_ext.use_cpu_kernel("reference")


# Output masks of two_layer_l2_loss_fwd, in its argument order (x, target, w1, w2, b1, b2), and
# update masks of sgd_step (w1, w2, b1, b2).
LOSS_ORDER = ("x", "target", "w1", "w2", "b1", "b2")
OUTPUT_MASKS = [
    [True] * 6,
    [False] * 6,
    [False, True, False, False, False, False],
    [True, False, False, True, False, True],
    [False, False, True, False, True, False],
]
UPDATE_MASKS = [[True] * 4, [False, True, False, True], [True, False, True, False], [False] * 4]


def bits(flags):
    return "".join("1" if f else "0" for f in flags)


def cpu_and_device_args(device, shape=(9, 7, 5, 3), bias=True, seed=0, lead=None):
    """The same float64 problem on the CPU and on `device`: (cpu dict, device dict) with x,
    target, w1, w2, b1, b2 (x and target reshaped to lead + [D] when `lead` is given). On the
    CPU the two dicts hold separate copies."""
    x, y, params = problem(*shape, bias=bias, seed=seed)
    cpu = dict(
        x=torch.tensor(x),
        target=torch.tensor(y),
        **{k: None if v is None else torch.tensor(v) for k, v in params.items()},
    )
    if lead is not None:
        cpu["x"] = cpu["x"].reshape(*lead, shape[1])
        cpu["target"] = cpu["target"].reshape(*lead, shape[3])
    return cpu, {k: None if v is None else v.to(device, copy=True) for k, v in cpu.items()}
