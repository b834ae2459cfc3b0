"""The backend registry trains what the oracle trains, and the benchmark harness runs end to end
on a tiny size: what it measured, its JSON after every size, its busy-loop helpers, its plot."""

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import twolayer_ext
from twolayer_ext.tools import recipes as B
from twolayer_ext.tools import bench
from twolayer_ext import reference as R

FAST = [
    "--size",
    "5,7,6,3",
    "--rounds",
    "2",
    "--min-time",
    "0.001",
    "--warmup",
    "0",
    "--threads",
    "1",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- the registry -------------------------------------------------------------------------------


def tiny_problem(lr=1e-3, reduction="sum"):
    x, y, params = R.tutorial_data(6, 5, 4, 3, seed=1, bias=True)
    return B.Problem(x, y, params, lr, reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
# (compile, compile_module: a cold compile per case; the CLI's --backend all test runs them
# against the oracle)
@pytest.mark.parametrize(
    "name",
    [n for n in B.names(optimizers=("sgd",), training_only=True) if not B.parse(n).recipe.compiled],
)
def test_every_sgd_backend_trains_like_the_numpy_oracle(name, reduction):
    problem = tiny_problem(reduction=reduction)
    oracle = {k: v.copy() for k, v in problem.params.items()}
    runner = B.build(name, problem)
    for _ in range(3):
        expected = R.numpy_sgd_step(problem.x, problem.y, oracle, problem.lr, reduction)
        assert float(runner.step()) == pytest.approx(expected, rel=1e-10), name
    for k, v in runner.weights().items():
        np.testing.assert_allclose(v, oracle[k], rtol=1e-10, atol=1e-12, err_msg=f"{name} {k}")
    assert problem.params["w1"] is not oracle["w1"]  # each backend trains its own copy


def test_fused_loss_with_adam_matches_the_module_with_adam():
    problem = tiny_problem()
    module, fused = (B.build(n, problem) for n in ("module+adam", "fused_loss+adam"))
    for _ in range(3):
        assert float(fused.step()) == pytest.approx(float(module.step()), rel=1e-10)
    for k, v in fused.weights().items():
        np.testing.assert_allclose(v, module.weights()[k], rtol=1e-10, atol=1e-12)
    assert not np.allclose(fused.weights()["w1"], problem.params["w1"])  # it trained


def test_names_come_from_the_registry_and_the_cpu_kernels():
    names = B.names()
    assert len(names) == len(set(names))
    assert {"module+adam", "fused_loss+adam", "gemm_floor"} <= set(names)
    assert names.index("module+adam") == names.index("module") + 1
    default = B.current_cpu_kernel()
    assert "sgd_step" in names and f"sgd_step[{default}]" not in names
    variants = {f"sgd_step[{k}]" for k in twolayer_ext.CPU_KERNELS if k != default}
    assert {n for n in variants if not B.missing(n)} <= set(names)
    assert "numpy" not in B.names(device="cuda") and "numpy" not in B.names(dtype=torch.float16)
    assert not any("[" in n for n in B.names(device="cuda"))
    assert B.baseline("fused_loss+adam") == "module+adam" and B.baseline("sgd_step") == "module"
    assert B.label("fused_loss+adam") == "fused loss+adam"


@pytest.mark.parametrize(
    "name, says",
    [
        ("jax", "recipe must be one of"),
        ("module+rmsprop", "optimizer of module"),
        ("sgd_step+adam", "optimizer of sgd_step"),
        ("module[tuned]", "takes no [VARIANT]"),
        ("sgd_step[nope]", "CPU kernel must be one of"),
        (3, "recipe must be one of"),
    ],
)
def test_bad_backend_names_say_what_was_expected(name, says):
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        B.parse(name)
    assert str(e.value).startswith("recipe")


# ---- the harness --------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    backends = [
        "numpy",
        "module",
        "module+adam",
        "ext_autograd",
        "fused_loss",
        "fused_loss+adam",
        "sgd_step",
        "gemm_floor",
    ]
    backends += [f"sgd_step[{k}]" for k in twolayer_ext.CPU_KERNELS]
    bench.main(
        FAST
        + sum((["--backend", b] for b in backends), [])
        + ["--dtype", "float64", "--json", str(out)]
    )
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["busy"] == 0
    assert report["ceiling_gflops"]["float64"] > 0 and report["bandwidth_gbs"] > 0
    got = {r["backend"]: r for r in report["results"]}
    assert set(got) == set(backends)
    for name, r in got.items():
        assert name in table and r["shape"] == [5, 7, 6, 3], name
        if B.missing(name):  # a variant for an ISA this CPU lacks: its row says so
            assert r["status"] == f"skipped ({B.missing(name)})" and r["variant"] == "-", name
            continue
        assert r["status"] == "ok" and r["median_us"] > 0, name
    for base in ("module", "module+adam"):  # each optimizer against its own module row
        assert got[base]["speedup_vs_module"] == pytest.approx(1.0)
    assert got["fused_loss+adam"]["speedup_vs_module"] == pytest.approx(
        got["module+adam"]["median_us"] / got["fused_loss+adam"]["median_us"]
    )
    flops, nbytes = bench.step_flops(5, 7, 6, 3), bench.step_bytes(5, 7, 6, 3, 8)
    assert nbytes == 8 * (5 * 7 + 5 * 3 + 2 * (7 * 6 + 6 * 3))
    assert got["sgd_step"]["mflop_per_step"] == pytest.approx(flops / 1e6)
    assert got["sgd_step"]["flop_per_byte"] == pytest.approx(flops / nbytes)
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary left


def test_a_variant_this_cpu_lacks(tmp_path, capsys, tuned_portable_missing):
    """A CPU without an ISA (an AVX2-only one lacks avx512): the default list leaves that
    variant out, and named on the command line its row says why, the rest of the run goes on.
    Pretended for tuned-portable (the fixture)."""
    assert "sgd_step[tuned-portable]" not in B.names() and "sgd_step[reference]" in B.names()
    out = tmp_path / "bench.json"
    names = ["sgd_step[tuned-portable]", "sgd_step[reference]"]
    bench.main(FAST + sum((["--backend", n] for n in names), []) + ["--json", str(out)])
    got = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert got["sgd_step[tuned-portable]"]["status"] == "skipped (needs a CPU with isa9)"
    assert got["sgd_step[reference]"]["status"] == "ok"
    assert "skipped (needs a CPU with isa9)" in capsys.readouterr().out


@pytest.mark.slow
def test_json_is_written_after_each_size(tmp_path, monkeypatch):
    """A run cut short (here: interrupted during the second size) keeps the first size."""
    out = tmp_path / "bench.json"
    measure, calls = bench.measure, []

    def measure_then_stop(size_name, *a, **k):
        calls.append(size_name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(size_name, *a, **k)

    monkeypatch.setattr(bench, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        bench.main(
            FAST
            + [
                "--size",
                "4,3,2,1",
                "--backend",
                "module",
                "--backend",
                "sgd_step",
                "--json",
                str(out),
            ]
        )
    report = json.loads(out.read_text())
    assert {(r["size"], r["backend"]) for r in report["results"]} == {
        ("5,7,6,3", "module"),
        ("5,7,6,3", "sgd_step"),
    }
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


@pytest.mark.slow
def test_non_finite_backend_is_reported_not_timed(monkeypatch, capsys):
    diverges = B.Recipe(
        "diverges",
        "diverges",
        lambda p, opt: B.Runner(lambda: torch.tensor(float("inf")), lambda: {}),
    )
    monkeypatch.setitem(B.RECIPES, "diverges", diverges)
    bench.main(FAST + ["--backend", "module", "--backend", "diverges"])
    line = next(l for l in capsys.readouterr().out.splitlines() if "diverges" in l)
    assert "non-finite loss" in line


@pytest.mark.slow
def test_plot_is_a_roofline_png(tmp_path):
    png = tmp_path / "bench.png"
    bench.main(FAST + ["--backend", "module", "--backend", "sgd_step", "--plot", str(png)])
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


# ---- busy-loop helpers --------------------------------------------------------------------------


def _gone(pid):
    """The process has exited (a zombie whose parent has not reaped it yet counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _children(pid):
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


@pytest.mark.slow
def test_busy_helpers_spin_while_timing_and_stop_after(tmp_path):
    with bench.busy_loops(1) as procs:
        assert len(procs) == 1 and procs[0].poll() is None
        time.sleep(0.3)
        with open(f"/proc/{procs[0].pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[11]) > 0  # utime: it computes
    assert procs[0].poll() is not None
    out = tmp_path / "bench.json"
    before = set(_children(os.getpid()))
    bench.main(FAST + ["--busy", "1", "--backend", "sgd_step", "--json", str(out)])
    assert json.loads(out.read_text())["busy"] == 1
    assert set(_children(os.getpid())) == before  # no helper left behind


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_busy_helpers_end_when_the_benchmark_is_killed():
    """A benchmark killed by a timeout (SIGKILL: no cleanup runs) leaves no spinning orphan."""
    code = (
        "import sys, time\nfrom twolayer_ext.tools import bench\n"
        "with bench.busy_loops(1) as procs:\n"
        "    print(procs[0].pid, flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        helper = int(proc.stdout.readline())
        assert not _gone(helper)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while not _gone(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(helper)


@pytest.mark.parametrize(
    "args",
    [
        ["--size", "0,1,1,1"],
        ["--size", "big"],
        ["--threads", "0"],
        ["--dtype", "int8"],
        ["--busy", "-1"],
        ["--backend", "jax"],
        ["--backend", "module+rmsprop"],
        ["--backend", "sgd_step[nope]"],
    ],
)
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    assert "error: " in capsys.readouterr().err


def test_routes_reports_each_route_and_optimizer(capsys):
    from twolayer_ext.tools import routes

    assert (
        routes.main(
            [
                "--size",
                "9,7,6,3",
                "--size",
                "mlp",
                "--rounds",
                "1",
                "--block",
                "0.0005",
                "--threads",
                "1",
                "--dtype",
                "float64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    header = out[1]
    for col in (
        "sgd_step",
        "fused f+b",
        "seq f+b",
        "floor",
        "bwd floor",
        "SGD foreach",
        "Adam fused",
        "f+b/sgd",
        "vs seq+SGD",
    ):
        assert col in header
    rows = [
        line for line in out[2:] if line.split()[:2] in (["9,7,6,3", "float64"], ["mlp", "float64"])
    ]
    assert len(rows) == 2 and all(line.rstrip().endswith("x") for line in rows)
    assert any("AdamW + clip, whole step" in line for line in out)


@pytest.mark.slow
def test_bench_table_names_the_variant_each_cell_ran(tmp_path):
    out = tmp_path / "b.json"
    bench.main(
        [
            *FAST,
            "--backend",
            "module",
            "--backend",
            "sgd_step",
            "--backend",
            "sgd_step[reference]",
            "--json",
            str(out),
        ]
    )
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert (
        rows["module"]["variant"] == "-" and rows["sgd_step[reference]"]["variant"] == "reference"
    )
    assert rows["sgd_step"]["variant"] in twolayer_ext.CPU_VARIANTS


def test_plot_without_matplotlib_fails_before_running(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a),
    )
    monkeypatch.setattr(bench, "memory_bandwidth", lambda *a: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as e:
        bench.main(FAST + ["--backend", "module", "--plot", "never.png"])
    assert e.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_table_columns_fit_long_names(capsys):
    """Every column is as wide as its widest cell: long names and sizes keep the table aligned."""
    long_name, long_size = "fused_loss+adam[" + "x" * 30 + "]", "1048576,4096,4096,1024"
    ok = dict(
        status="ok",
        median_us=1234567.0,
        iqr_us=5.0,
        gflops=1.5,
        pct_ceiling=3.0,
        speedup_vs_module=2.0,
    )
    report = {
        "machine": {"cpu": "cpu", "torch": "t", "numpy": "n"},
        "threads": 1,
        "busy": 0,
        "kernel": "auto",
        "ceiling_gflops": {"float32": 1.0},
        "bandwidth_gbs": 1.0,
        "results": [
            dict(size="seed", dtype="float32", backend="module", variant="-", **ok),
            dict(
                size=long_size, dtype="bfloat16", backend=long_name, variant="tuned-portable", **ok
            ),
            dict(
                size="seed",
                dtype="float32",
                backend="diverges",
                variant="-",
                status="non-finite loss",
            ),
        ],
    }
    bench.print_table(report)
    lines = capsys.readouterr().out.splitlines()[2:]
    header, rows = lines[0], lines[1:]
    for row in rows:
        cells = [m.span() for m in re.finditer(r"\S+", row)]
        for c, col in enumerate(("size", "dtype", "recipe", "variant")):  # flush left
            assert cells[c][0] == header.index(col), (col, lines)
        if "non-finite" not in row:
            for c, col in zip((4, 8), ("median us", "x module")):  # flush right
                assert cells[c][1] == header.index(col) + len(col), (col, lines)
    assert rows[1].split() == [
        long_size,
        "bfloat16",
        long_name,
        "tuned-portable",
        "1,234,567",
        "5",
        "1.5",
        "3%",
        "2.00",
    ]
    assert rows[2].split()[-2:] == ["non-finite", "loss"]


@pytest.mark.slow
def test_progress_shows_without_a_terminal(capsys):
    """Not on a terminal (a log, a pipe): a line per warm-up and timing round on stderr."""
    bench.main(FAST + ["--backend", "module", "--backend", "sgd_step"])
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert "\r" not in captured.err
    for name in ("module", "sgd_step"):
        assert f"bench: 5,7,6,3 float32 {name}: warm-up" in err
    assert [line for line in err if " round " in line] == [
        "bench: 5,7,6,3 float32 round 1/2",
        "bench: 5,7,6,3 float32 round 2/2",
    ]
    assert "module" in captured.out


def test_progress_on_a_terminal_rewrites_one_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    progress = bench.Progress(term)
    progress("seed module: warm-up", line=True)
    progress("seed round 1/7 module")
    progress.close()
    assert term.getvalue() == ("\r\033[Kseed module: warm-up\r\033[Kseed round 1/7 module\r\033[K")
