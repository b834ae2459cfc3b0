"""A busy core (csrc/cpu/busy_core.h): while another process holds a core, every loop of ours
runs on our pool and ATen's parallel regions on the calling thread run on one thread, with one
thread's results (for every variant but blas-mt, any thread count's); the thread count comes back when the core is free, a torch.set_num_threads made
in between is kept, other threads are untouched, and TWOLAYER_BUSY_CORE=off turns it off."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import twolayer_ext as tl

_ops = torch.ops.twolayer_ext
SHAPE = (256, 300, 128, 16)  # large enough that every variant's loops use two threads


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    _ops._assume_busy_core(0)
    torch.set_num_threads(n)


@pytest.fixture
def busy():
    """Counts a core as busy (as two late parallel regions would), restores everything after."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    _ops._assume_busy_core(60_000)
    yield
    _ops._assume_busy_core(0)
    torch.set_num_threads(n)


def fused(variant, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, D_in, H, D_out = SHAPE
    x, t = torch.randn(N, D_in, generator=g), torch.randn(N, D_out, generator=g)
    w1 = (torch.randn(D_in, H, generator=g) / D_in**0.5).requires_grad_()
    w2 = (torch.randn(H, D_out, generator=g) / H**0.5).requires_grad_()
    b1, b2 = torch.zeros(H, requires_grad=True), torch.zeros(D_out, requires_grad=True)
    with tl.use_cpu_kernel(variant):
        loss = tl.two_layer_l2_loss(x, t, w1, w2, b1, b2)
        loss.backward()
        pred = tl.two_layer(x, w1.detach(), w2.detach(), b1.detach(), b2.detach())
    return [loss.detach(), pred, w1.grad, w2.grad, b1.grad, b2.grad]


def run_child(code, **env):
    """Runs `code` in a fresh interpreter with `env` added; returns its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


VARIANTS = [v for v in tl.CPU_VARIANTS if not tl.cpu_kernel_missing(v)]


def quiet_bits(variant, call):
    """What `call(variant)` gives on a quiet machine, pinned to what auto picks at two threads:
    a busy core runs that pick on one thread, which for every variant but blas-mt (whose BLAS may
    split a sum by thread) gives two threads' bits."""
    torch.set_num_threads(2)
    pick = tl.cpu_kernel_choice(SHAPE)["variant"] if variant == "auto" else variant
    # A first call brings this thread's count back from an earlier test's busy core: a 1 set
    # before it would read as the busy core's own (docs/design.md).
    call(pick)
    torch.set_num_threads(1 if pick == "blas-mt" else 2)
    out = call(pick)
    torch.set_num_threads(2)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_busy_core_gives_the_same_bits(variant, restore_threads):
    quiet = quiet_bits(variant, fused)
    _ops._assume_busy_core(60_000)
    try:
        busy = fused(variant)
        assert torch.get_num_threads() == 1  # ATen's regions on this thread: one thread
    finally:
        _ops._assume_busy_core(0)
    for a, b in zip(quiet, busy):
        assert torch.equal(a, b)


def test_the_thread_count_comes_back_when_the_core_is_free(busy):
    fused("auto")
    assert torch.get_num_threads() == 1
    info = tl.cpu_kernel_choice(SHAPE)
    assert info["busy_core"] is True and info["threads"] == 2  # the user's count, not the 1
    assert "a core is busy" in tl.cpu_kernel_info(SHAPE)
    _ops._assume_busy_core(0)
    fused("auto")
    assert torch.get_num_threads() == 2
    assert tl.cpu_kernel_choice(SHAPE)["busy_core"] is False


def test_a_thread_count_set_meanwhile_is_kept(busy):
    fused("auto")
    torch.set_num_threads(3)  # the user's, while a core counts as busy
    _ops._assume_busy_core(0)
    fused("auto")
    assert torch.get_num_threads() == 3


def test_other_threads_keep_their_thread_count(busy):
    seen = {}

    def other():
        seen["before"] = torch.get_num_threads()
        done.wait()
        seen["after"] = torch.get_num_threads()

    done = threading.Event()
    t = threading.Thread(target=other)
    t.start()
    fused("auto")
    done.set()
    t.join()
    assert torch.get_num_threads() == 1
    assert seen["after"] == seen["before"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_sgd_step_lowers_aten_too(variant, busy):
    g = torch.Generator().manual_seed(1)
    N, D_in, H, D_out = SHAPE
    x, t = torch.randn(N, D_in, generator=g), torch.randn(N, D_out, generator=g)
    w = [torch.randn(D_in, H, generator=g) * 0.05, torch.randn(H, D_out, generator=g) * 0.1]

    def step(v):
        p = [u.clone() for u in w]
        with tl.use_cpu_kernel(v):
            return [tl.sgd_step(x, t, *p, lr=1e-4), *p]

    _ops._assume_busy_core(0)
    quiet = quiet_bits(variant, step)
    _ops._assume_busy_core(60_000)
    busy = step(variant)
    assert torch.get_num_threads() == 1
    for a, b in zip(quiet, busy):
        assert torch.equal(a, b)


def test_off_leaves_the_thread_count_alone():
    out = run_child(
        """
        import torch, twolayer_ext as tl
        torch.set_num_threads(2)
        torch.ops.twolayer_ext._assume_busy_core(60_000)
        x, t = torch.randn(256, 300), torch.randn(256, 16)
        w1, w2 = torch.randn(300, 128) * 0.05, torch.randn(128, 16) * 0.1
        tl.sgd_step(x, t, w1, w2, lr=1e-4)
        print(torch.get_num_threads(), tl.cpu_kernel_choice((256, 300, 128, 16))["busy_core"])
        """,
        TWOLAYER_BUSY_CORE="off",
    )
    assert out.split() == ["2", "False"]


def test_new_threads_start_with_the_usual_count(busy):
    def count_in_a_new_thread():
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    usual = count_in_a_new_thread()
    fused("auto")
    assert torch.get_num_threads() == 1  # this thread's regions, lowered
    assert count_in_a_new_thread() == usual  # not the process-wide count


def test_a_pick_measured_while_a_core_is_busy_is_not_written(tmp_path):
    wisdom = str(tmp_path / "wisdom.txt")
    out = run_child(
        """
        import json, os, torch, twolayer_ext as tl
        torch.set_num_threads(2)
        ops, shape, path = torch.ops.twolayer_ext, (96, 200, 64, 8), os.environ["TWOLAYER_WISDOM"]
        ops._assume_busy_core(60_000)
        busy = tl.cpu_kernel_info(shape)
        written_busy = open(path).read() if os.path.exists(path) else ""
        ops._assume_busy_core(0)
        quiet = tl.cpu_kernel_info(shape)
        print(json.dumps([busy, written_busy, quiet, open(path).read()]))
        """,
        TWOLAYER_WISDOM=wisdom,
    )
    busy, written_busy, quiet, written_quiet = json.loads(out)
    assert "a core was busy: measured again when it is free" in busy
    assert "t2 128x256x64x8" not in written_busy  # not written while busy
    assert "measured at" in quiet and "a core was busy" not in quiet  # measured again
    assert "t2 128x256x64x8" in written_quiet


def test_while_a_core_is_busy_auto_takes_one_threads_quiet_pick(tmp_path):
    wisdom = str(tmp_path / "wisdom.txt")
    out = run_child(
        """
        import json, os, torch, twolayer_ext as tl
        ops, shape = torch.ops.twolayer_ext, (96, 200, 64, 8)
        torch.set_num_threads(1)
        one = tl.cpu_kernel_info(shape)
        torch.set_num_threads(2)
        ops._assume_busy_core(60_000)
        busy = tl.cpu_kernel_info(shape)
        ops._assume_busy_core(0)
        print(json.dumps([one, busy, open(os.environ["TWOLAYER_WISDOM"]).read()]))
        """,
        TWOLAYER_WISDOM=wisdom,
    )
    one, busy, written = json.loads(out)
    # the same variant and the same times: one thread's entry, nothing measured for two
    assert one.split(", threads")[0] == busy.split(", threads")[0]
    assert busy.split("; ", 1)[1].startswith(one.split("; ", 1)[1])
    assert "t1 128x256x64x8" in written and "t2 128x256x64x8" not in written


# Signs of a lost core (late workers), given over more than the interval in which other
# processes' CPU use is measured, while `during` runs; then whether a core counts as busy.
def signs_then_busy(during="", after=""):
    code = textwrap.dedent(during) + textwrap.dedent(
        """
        import time, torch, twolayer_ext as tl
        ops = torch.ops.twolayer_ext
        for _ in range(3):
            ops._busy_core_signs(5)
            time.sleep(0.15)
        ops._busy_core_signs(5)
        busy = tl.cpu_kernel_choice((64, 1000, 100, 10))["busy_core"]
        """
    )
    return run_child(code + textwrap.dedent(after) + "print(busy)\n").strip() == "True"


def test_signs_while_another_process_holds_a_core_make_a_busy_core():
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert signs_then_busy()
    finally:
        loop.kill()
        loop.wait()


def test_blas_mt_calls_that_lose_a_core_make_a_busy_core():
    # blas-mt hands whole GEMMs to the BLAS's own threads, whose barriers no region of ours
    # sees (at the tutorial's size its elementwise passes are too small for regions): its
    # calls watch for losing their core themselves. Busy-loop processes on all cores but one,
    # so that one of the two threads has to share.
    cores = len(os.sched_getaffinity(0))
    if cores > 8:
        pytest.skip(f"{cores} cores: too many busy-loop processes to start")
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores - 1)]
    try:
        out = run_child(
            """
            import time, torch, twolayer_ext as tl
            torch.set_num_threads(2)
            g = torch.Generator().manual_seed(0)
            x, t = torch.randn(64, 1000, generator=g), torch.randn(64, 10, generator=g)
            w1 = torch.randn(1000, 100, generator=g) * 0.03
            w2 = torch.randn(100, 10, generator=g) * 0.1
            busy, end = False, time.time() + 30
            with tl.use_cpu_kernel("blas-mt"):
                while not busy and time.time() < end:
                    tl.sgd_step(x, t, w1, w2, lr=1e-12)
                    busy = tl.cpu_kernel_choice((64, 1000, 100, 10))["busy_core"]
                tl.sgd_step(x, t, w1, w2, lr=1e-12)  # the next call: ATen on this thread alone
            print(busy, torch.get_num_threads())
            """
        )
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert out.split() == ["True", "1"]


def test_signs_from_this_processs_own_threads_alone_are_not_a_busy_core():
    # OpenMP's threads spinning after each region are this process's CPU time, not another's:
    # here two threads of matrix products keep the machine's cores busy meanwhile.
    products = """
        import threading, torch
        stop = threading.Event()
        def products():
            a = torch.randn(256, 256)
            while not stop.is_set():
                a @ a
        threads = [threading.Thread(target=products) for _ in range(2)]
        for t in threads:
            t.start()
    """
    assert not signs_then_busy(during=products, after="stop.set()\n")


def test_a_bad_busy_core_setting_is_named():
    with pytest.raises(subprocess.CalledProcessError) as err:
        subprocess.run(
            [sys.executable, "-c", "import twolayer_ext as tl; tl.cpu_kernel_info((8, 8, 8, 8))"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TWOLAYER_BUSY_CORE": "yes"},
        )
    assert 'TWOLAYER_BUSY_CORE must be on or off, got "yes"' in err.value.stderr
