"""Robustness: leaks, threads, determinism, float32 numerics against the float64 oracle, and
sizes past 2^31 elements. Everything goes through the public functions and the ops, so it holds
for any kernel variant (each test runs on the default variant; see docs/hardening.md).

The leak run and the >2^31-element run happen in subprocesses (`python tests/test_robustness.py
leaks|large`): resident memory is measured on a clean process, and the large run gets an address
space limit, so a kernel that tried to materialise a 8 GiB copy fails with an error instead of
pushing a shared machine into the OOM killer. Under the sanitizers (TWOLAYER_SANITIZE=1, set by
tools/sanitize.sh) the loops are 10x shorter and the large run is skipped (ASan's shadow memory
needs the address space the limit takes away).
"""

import gc
import json
import math
import os
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import torch

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import SANITIZE, report as _report

HERE = os.path.dirname(os.path.abspath(__file__))
ops = torch.ops.twolayer_ext

SEED_SIZE = (64, 1000, 100, 10)
MEDIUM = (512, 1024, 256, 64)
LARGE = (4096, 1024, 1024, 256)


def _run_helper(mode, timeout=900, env=None):
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), mode],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(HERE),
        env=dict(os.environ, **(env or {})),
    )
    assert proc.returncode == 0, (
        f"{mode} helper died (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _problem(N, D_in, H, D_out, *, seed=0, dtype=torch.float32, bias=True):
    """Weights scaled so activations stay O(1) (as tests/conftest.problem), as torch tensors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_in, generator=g, dtype=torch.float64)
    t = torch.randn(N, D_out, generator=g, dtype=torch.float64)
    w1 = torch.randn(D_in, H, generator=g, dtype=torch.float64) / math.sqrt(max(D_in, 1))
    w2 = torch.randn(H, D_out, generator=g, dtype=torch.float64) / math.sqrt(max(H, 1))
    b1 = torch.randn(H, generator=g, dtype=torch.float64) * 0.1 if bias else None
    b2 = torch.randn(D_out, generator=g, dtype=torch.float64) * 0.1 if bias else None
    return [None if a is None else a.to(dtype) for a in (x, t, w1, w2, b1, b2)]


# ---- 4. leaks ------------------------------------------------------------------------------------


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def leak_helper():
    """Each op 100,000 times on small inputs; prints {case: RSS growth in bytes}."""
    calls = 10_000 if SANITIZE else 100_000
    torch.manual_seed(0)
    x, w1, w2, b1, b2, t = (torch.randn(*s) for s in ((4, 3), (3, 5), (5, 2), (5,), (2,), (4, 2)))
    leaves = [a.clone().requires_grad_(True) for a in (x, w1, w2, b1, b2)]
    y, act = ops.two_layer_fwd(x, w1, w2, b1, b2)
    g, one = torch.randn(4, 2), torch.tensor(1.0)
    ws = [a.clone() for a in (w1, w2, b1, b2)]

    def autograd_step():
        loss = tl.l2_loss(tl.two_layer(*leaves), t)
        loss.backward()  # two_layer_fwd, l2_loss_fwd, then their backward ops, with a graph

    # Every op runs `calls` times without autograd (two_layer_fwd and l2_loss_fwd through the
    # public functions; the backward ops directly) and with it (the autograd step runs
    # two_layer_fwd, l2_loss_fwd, l2_loss_bwd and two_layer_bwd through a graph each time).
    cases = {
        "two_layer (no grad)": (calls, lambda: tl.two_layer(x, w1, w2, b1, b2)),
        "l2_loss (no grad)": (calls, lambda: tl.l2_loss(y, t)),
        "two_layer+l2_loss forward+backward (autograd)": (calls, autograd_step),
        "sgd_step": (calls, lambda: tl.sgd_step(x, t, *ws, lr=0.0)),
        "op two_layer_bwd": (calls, lambda: ops.two_layer_bwd(g, x, w1, w2, act, [True] * 5)),
        "op l2_loss_bwd": (calls, lambda: ops.l2_loss_bwd(one, g)),
        "bad call (ValueError)": (calls // 5, lambda: _swallow(lambda: tl.two_layer(x, w2, w1))),
    }
    out = {}
    for name, (n, fn) in cases.items():
        for _ in range(2000):  # warm-up: allocator caches, autograd's first-use structures
            fn()
        gc.collect()
        before = _rss_bytes()
        for _ in range(n):
            fn()
        gc.collect()
        out[name] = _rss_bytes() - before
    out["_calls"] = calls
    print(json.dumps(out))


def _swallow(fn):
    try:
        fn()
    except ValueError:
        pass


@pytest.mark.slow  # 100k calls per op in a subprocess
@pytest.mark.skipif(
    SANITIZE,
    reason="ASan's quarantine holds freed memory: RSS says nothing there "
    "(and LeakSanitizer is off for the interpreter)",
)
def test_no_leaks_over_100k_calls(request):
    growth = _run_helper("leaks")
    calls = growth.pop("_calls")
    _report(
        request,
        "leaks: RSS growth over %d calls: " % calls
        + ", ".join(f"{k} {v / 2**20:+.2f} MiB" for k, v in growth.items()),
    )
    limit = 3 * 2**20  # "less than a few MB"; a leak of one small tensor per call is >= 10 MB
    assert all(v < limit for v in growth.values()), growth


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("gc_enabled", [False, True])
def test_autograd_graph_is_freed(backward, gc_enabled):
    """The graph (and the tensors it saves) goes away with the last reference to the output:
    by reference counting alone (gc disabled: no reference cycle through a ctx), and after a
    backward too."""
    torch.manual_seed(0)
    base = [torch.randn(*s, requires_grad=True) for s in ((6, 4), (4, 5), (5, 3), (5,), (3,))]
    t = torch.randn(6, 3)
    was = gc.isenabled()
    gc.collect()
    if not gc_enabled:
        gc.disable()
    try:
        x = base[0] * 1.0  # non-leaf tensors: only the graph keeps them alive
        w1 = base[1] * 1.0
        y = tl.two_layer(x, w1, *base[2:])
        loss = tl.l2_loss(y, t)
        refs = [weakref.ref(a) for a in (x, w1, y)]
        grad_fn_ref = weakref.ref(loss.grad_fn) if hasattr(loss.grad_fn, "__weakref__") else None
        del x, w1, y
        assert refs[0]() is not None and refs[1]() is not None  # alive: saved by the graph
        if backward:
            loss.backward()
        del loss
        if gc_enabled:
            gc.collect()
        alive = [n for n, r in zip(("x", "w1", "y"), refs) if r() is not None]
        assert not alive, f"still referenced after the graph was dropped: {alive}"
        if grad_fn_ref is not None:
            assert grad_fn_ref() is None
    finally:
        if was:
            gc.enable()


# ---- 5. threads ----------------------------------------------------------------------------------
# Sizes past every parallel grain: N*H and N*D_out >= 64k elements, so kernels go multi-threaded.
THREAD_SIZE = (256, 96, 256, 256)


def _workload(seed, sizes=THREAD_SIZE):
    """Forward, loss, every gradient and 3 sgd_steps; returns every result tensor."""
    x, t, w1, w2, b1, b2 = _problem(*sizes, seed=seed)
    leaves = [a.clone().requires_grad_(True) for a in (x, w1, w2, b1, b2)]
    y = tl.two_layer(*leaves)
    loss = tl.l2_loss(y, t)
    grads = torch.autograd.grad(loss, leaves)
    ws = [a.clone() for a in (w1, w2, b1, b2)]
    losses = [tl.sgd_step(x, t, *ws, lr=1e-4, reduction="sum") for _ in range(3)]
    return [y.detach(), loss.detach(), *grads, *losses, *ws]


def test_eight_threads_match_single_threaded_results():
    seeds = list(range(8))
    expected = [_workload(s) for s in seeds]
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)
    # torch's thread count is per thread (OpenMP's setting), and auto measures its pick per
    # thread count: each worker takes the one the expected results were computed with.
    threads_here = torch.get_num_threads()

    def worker(i):
        try:
            torch.set_num_threads(threads_here)
            barrier.wait()
            results[i] = [_workload(seeds[i]) for _ in range(2)]
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    mismatches = [
        (i, rep, k)
        for i in range(8)
        for rep in range(2)
        for k, (a, b) in enumerate(zip(results[i][rep], expected[i]))
        if not torch.equal(a, b)
    ]
    assert not mismatches, f"(thread, repeat, result index) differing bitwise: {mismatches}"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---- 6. determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_repeated_calls_are_bitwise_identical(threads, restore_threads):
    torch.set_num_threads(threads)
    first = _workload(0, MEDIUM)
    for _ in range(2):
        again = _workload(0, MEDIUM)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    # a long loss (many chunks, every thread busy) too
    p = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1))
    q = torch.randn(1 << 20, generator=torch.Generator().manual_seed(2))
    ref = tl.l2_loss(p, q)
    assert all(torch.equal(tl.l2_loss(p, q), ref) for _ in range(3))


@pytest.mark.slow  # large problems, twice
@pytest.mark.parametrize("variant", ["tuned", "blas"])
def test_one_and_two_threads_agree_to_rounding(restore_threads, request, variant):
    """What holds across thread counts is documented in docs/hardening.md: agreement to rounding
    is required; bitwise equality is reported (it holds when no reduction is split by thread).
    A variant is pinned: auto may measure another variant fastest at another thread count."""
    names = [
        "y",
        "loss",
        "grad_x",
        "grad_w1",
        "grad_w2",
        "grad_b1",
        "grad_b2",
        "sgd loss 1",
        "sgd loss 2",
        "sgd loss 3",
        "w1",
        "w2",
        "b1",
        "b2",
    ]
    res = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        with tl.use_cpu_kernel(variant):
            res[n] = _workload(0, MEDIUM)
        p = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1))
        res[n].append(tl.l2_loss(p, torch.zeros_like(p)))
    names.append("long l2_loss")
    bitwise = {}
    for name, a, b in zip(names, res[1], res[2]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        bitwise[name] = bool(torch.equal(a, b))
    _report(
        request,
        "threads 1 vs 2: bitwise equal: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in bitwise.items()),
    )


# ---- 7. numerics ---------------------------------------------------------------------------------


def _errors(N, D_in, H, D_out, seed=0):
    """float32 forward+backward (one each) against the float64 numpy oracle on the same values."""
    x, t, w1, w2, b1, b2 = _problem(N, D_in, H, D_out, seed=seed)
    leaves = [a.clone().requires_grad_(True) for a in (x, w1, w2, b1, b2)]
    y = tl.two_layer(*leaves)
    loss = tl.l2_loss(y, t)
    grads = dict(zip(("x", "w1", "w2", "b1", "b2"), torch.autograd.grad(loss, leaves)))
    n64 = [a.double().numpy() for a in (x, t, w1, w2, b1, b2)]
    xn, tn, w1n, w2n, b1n, b2n = n64
    h, h_relu, y_np = R.numpy_forward(xn, w1n, w2n, b1n, b2n)
    loss_np = R.numpy_loss(y_np, tn)
    expected = R.numpy_backward(xn, w1n, w2n, h, h_relu, R.numpy_loss_grad(y_np, tn))
    out = {}

    def rel(a, b):
        a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        b = np.asarray(b, dtype=np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny))

    out["y"] = rel(y, y_np)
    out["loss"] = rel(loss, loss_np)
    for k in ("x", "w1", "b1", "w2", "b2"):
        out[f"grad_{k}"] = rel(grads[k], expected[k])
    # ReLU ties flipped by float32 rounding (legitimate, and rare): counted for the record
    return out


@pytest.mark.slow  # up to the large size
def test_float32_error_against_float64_oracle(request):
    """max |float32 - float64| / max |float64| per result (normwise relative error), at the
    seed, medium and large sizes. Bounds: eps32 * sqrt(K) * 16 for the sums of K terms along the
    chain (random rounding grows like sqrt(K)); they fail only on a real precision loss."""
    eps = float(np.finfo(np.float32).eps)
    table = {}
    sizes = {"seed": SEED_SIZE, "medium": MEDIUM}
    if not SANITIZE:
        sizes["large"] = LARGE
    for label, size in sizes.items():
        errs = _errors(*size)
        table[label] = errs
        N, D_in, H, D_out = size
        k = N + D_in + H + D_out
        bound = 16 * eps * math.sqrt(k)
        bad = {name: e for name, e in errs.items() if not e <= bound}
        assert not bad, f"{label} {size}: errors above {bound:.2e}: {bad}"
    header = "float32 vs float64 oracle, max rel err: " + "; ".join(
        f"{label} {sizes[label]}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        for label, errs in table.items()
    )
    _report(request, header)


# ---- 8. more than 2^31 elements ------------------------------------------------------------------


def _zero_mapped(numel, dtype=np.float32):
    """A writable array of `numel` zeros backed by an anonymous private mapping: reading it maps
    the kernel's shared zero page, so it costs address space, not memory."""
    import mmap

    nbytes = numel * np.dtype(dtype).itemsize
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    buf = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # read faults then map the huge zero page: 512x fewer faults (3x faster here)
        buf.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buf, dtype=dtype, count=numel)


def large_helper():
    """Runs each >2^31-element case; prints {case: "ok" | "error: <message>"}. Wrong answers are
    reported as "WRONG: ..."."""
    import resource

    out = {}
    big = (1 << 31) + 64
    # Address-space limit: the mappings below plus 6 GiB. A kernel that copies its input whole
    # fails to allocate (a clean error) instead of taking 8+ GiB of a shared machine.
    with open("/proc/self/statm") as f:
        vm_now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    mapped = 2 * big * 4 + ((1 << 30) + 1) * 2 * 4 + ((1 << 30) + 1) * 4
    limit = vm_now + mapped + (6 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def attempt(name, fn):
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001  (a clear error is an accepted outcome)
            out[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"

    # l2_loss over 2^31 + 64 elements, values planted past index 2^31 (32-bit wrap would miss them)
    p_np, t_np = _zero_mapped(big), _zero_mapped(big)
    p_np[5], p_np[(1 << 31) + 3], t_np[big - 1] = 1.0, 3.0, -2.0
    pred, target = torch.from_numpy(p_np), torch.from_numpy(t_np)

    def loss_sum(pred=pred, target=target):
        got = tl.l2_loss(pred, target).item()
        return "ok" if got == 14.0 else f"WRONG: sum {got}, expected 14"

    attempt("l2_loss sum, 2^31+64 elements", loss_sum)
    del pred, target, p_np, t_np, loss_sum

    # two_layer forward with x [2, 2^30 + 1] (2^31 + 2 elements), planted past index 2^31
    d_in = (1 << 30) + 1
    x_np, w1_np = _zero_mapped(2 * d_in), _zero_mapped(d_in)
    x_np[7], w1_np[7] = 1.0, 0.5  # h[0, 0] = 0.5
    x_np[d_in + (d_in - 1)], w1_np[d_in - 1] = 2.0, 3.0  # x[1, -1] at flat index 2^31 + 1
    x = torch.from_numpy(x_np).view(2, d_in)
    w1 = torch.from_numpy(w1_np).view(d_in, 1)
    w2 = torch.tensor([[2.0]])

    def forward():
        y = tl.two_layer(x, w1, w2)
        want = [[1.0], [12.0]]
        return "ok" if y.tolist() == want else f"WRONG: y {y.tolist()}, expected {want}"

    attempt("two_layer forward, x with 2^31+2 elements", forward)
    print(json.dumps(out))


@pytest.mark.slow  # >2^31 elements, in a subprocess
@pytest.mark.skipif(SANITIZE, reason="ASan's shadow memory and the address-space limit collide")
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses Linux mmap/zero-page semantics"
)
def test_more_than_2_31_elements_work_or_fail_clearly(request):
    res = _run_helper("large")
    _report(request, "more than 2^31 elements: " + "; ".join(f"{k}: {v}" for k, v in res.items()))
    wrong = {k: v for k, v in res.items() if v != "ok" and not v.startswith("error: ")}
    assert not wrong, wrong
    unclear = {
        k: v
        for k, v in res.items()
        if v.startswith("error: ")
        and not any(
            w in v
            for w in (
                "allocate",
                "memory",
                "2^31",
                "2**31",
                "too large",
                "INT_MAX",
                "int32",
                "exceeds",
                "overflow",
            )
        )
    }
    assert not unclear, f"errors that do not say what is wrong: {unclear}"


if __name__ == "__main__":
    {"leaks": leak_helper, "large": large_helper}[sys.argv[1]]()
