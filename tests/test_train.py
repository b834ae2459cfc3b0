"""The training CLI (python -m twolayer_ext.train) end to end: the table and the JSON hold the
oracle's numbers, the plot is a PNG, digits learns, and bad input exits 2 with one line."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import twolayer_ext
from twolayer_ext.tools import recipes as B
from twolayer_ext import reference as R
from twolayer_ext.tools import train

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = [
    "--N",
    "16",
    "--D-in",
    "50",
    "--H",
    "20",
    "--D-out",
    "4",
    "--steps",
    "40",
    "--log-every",
    "10",
    "--lr",
    "1e-4",
]


def table_rows(stdout):
    """{step: [numbers...]} from the lines of the loss table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit():
            rows[int(parts[0])] = [float(p.rstrip("%")) for p in parts[1:]]
    return rows


@pytest.mark.slow
def test_default_run_is_the_tutorial(tmp_path):
    """The real CLI with its defaults (make demo): 500 steps of the tutorial, four backends."""
    out, png = tmp_path / "demo.json", tmp_path / "demo.png"
    proc = subprocess.run(
        [sys.executable, "-m", "twolayer_ext.train", "--json", str(out), "--plot", str(png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    assert len(proc.stdout.splitlines()) <= 25  # one screen
    assert "N=64 D_in=1000 H=100 D_out=10" in proc.stdout and "lr=1e-06" in proc.stdout

    summary = json.loads(out.read_text())
    assert summary["config"]["steps"] == 500 and summary["config"]["bias"] is False
    backends = summary["backends"]
    assert list(backends) == ["numpy", "manual", "autograd", "sgd_step"]
    x, y, params = R.tutorial_data(seed=0)
    first = R.numpy_loss(R.numpy_forward(x, params["w1"], params["w2"])[2], y)
    for b in backends.values():
        assert len(b["losses"]) == 500
        assert b["losses"][0] == pytest.approx(first, rel=1e-12)
        np.testing.assert_allclose(b["losses"], backends["numpy"]["losses"], rtol=1e-8)
        assert b["losses"][-1] < 1e-6 * b["losses"][0]  # it trained
        assert b["median_step_s"] > 0
    assert backends["autograd"]["speedup_vs_autograd"] == 1.0
    assert summary["max_rel_diff"]["loss"] < 1e-8
    assert summary["max_rel_diff"]["weights"] < 1e-10

    rows = table_rows(proc.stdout)
    assert sorted(rows) == list(range(0, 500, 50)) + [499]
    for step, values in rows.items():  # the table prints the JSON's numbers
        losses = [backends[n]["losses"][step] for n in backends]
        np.testing.assert_allclose(values[:4], losses, rtol=1e-6)
        assert values[4] >= 0
    assert "fused sgd_step" in proc.stdout and "recipes agree" in proc.stdout
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.png"]


def test_small_run_replays_the_oracle(tmp_path, capsys):
    out, weights = tmp_path / "run.json", tmp_path / "w.pt"
    threads = torch.get_num_threads()
    assert (
        train.main(
            SMALL
            + [
                "--bias",
                "--reduction",
                "mean",
                "--json",
                str(out),
                "--save",
                str(weights),
                "--threads",
                "3",
            ]
        )
        == 0
    )
    assert torch.get_num_threads() == threads  # main() leaves the process as it found it
    stdout = capsys.readouterr().out

    x, y, params = R.tutorial_data(16, 50, 20, 4, seed=0, bias=True)
    expected = [R.numpy_sgd_step(x, y, params, 1e-4, "mean") for _ in range(40)]
    summary = json.loads(out.read_text())
    assert summary["config"]["reduction"] == "mean" and summary["config"]["bias"] is True
    assert summary["backends"]["numpy"]["losses"] == expected  # the same code, bit for bit
    for name in ("manual", "autograd", "sgd_step"):
        np.testing.assert_allclose(summary["backends"][name]["losses"], expected, rtol=1e-10)
    assert expected[-1] < expected[0]

    saved = torch.load(weights)  # sgd_step's final weights
    assert sorted(saved) == ["b1", "b2", "w1", "w2"]
    for k, v in saved.items():
        np.testing.assert_allclose(v.numpy(), params[k], rtol=1e-10, atol=1e-12)
    twolayer_ext.TwoLayerNet(50, 20, 4).load_state_dict(saved)  # loadable as the module

    rows = table_rows(stdout)
    assert sorted(rows) == [0, 10, 20, 30, 39]
    assert all(len(v) == 5 for v in rows.values())
    np.testing.assert_allclose([rows[t][0] for t in rows], [expected[t] for t in rows], rtol=1e-6)


def test_one_backend_float32(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert (
        train.main(SMALL + ["--backend", "sgd_step", "--dtype", "float32", "--json", str(out)]) == 0
    )
    stdout = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert list(summary["backends"]) == ["sgd_step"]
    fused = summary["backends"]["sgd_step"]
    assert fused["speedup_vs_autograd"] is None and "n/a" in stdout
    assert "max rel diff" not in stdout and "recipes agree" not in stdout
    x, y, params = R.tutorial_data(16, 50, 20, 4, seed=0)
    expected = [R.numpy_sgd_step(x, y, params, 1e-4) for _ in range(40)]
    np.testing.assert_allclose(fused["losses"], expected, rtol=1e-3)  # float32 vs float64


def test_backend_list_and_plot(tmp_path, capsys):
    png = tmp_path / "loss.png"
    assert train.main(SMALL + ["--backend", "numpy,autograd", "--plot", str(png)]) == 0
    stdout = capsys.readouterr().out
    header = next(line for line in stdout.splitlines() if line.split()[:1] == ["step"])
    assert header.split() == ["step", "numpy", "autograd", "max", "rel", "diff"]
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary left behind


@pytest.mark.slow
def test_every_registry_backend_replays_the_oracle(tmp_path, capsys):
    """--backend all: every training backend of twolayer_ext.backends, one table."""
    out = tmp_path / "run.json"
    assert train.main(SMALL + ["--bias", "--backend", "all", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    backends = json.loads(out.read_text())["backends"]
    assert list(backends) == list(train.CHOICES)
    assert {"module", "compile", "ext_autograd", "fused_loss", "sgd_step"} <= set(backends)
    assert all(
        f"sgd_step[{k}]" in backends
        for k in twolayer_ext.CPU_KERNELS
        if k != B.current_cpu_kernel() and not B.missing(f"sgd_step[{k}]")
    )
    for name, b in backends.items():
        np.testing.assert_allclose(
            b["losses"], backends["numpy"]["losses"], rtol=1e-9, err_msg=name
        )
        assert B.label(name) in stdout


@pytest.mark.slow
def test_diverging_run_stops_with_one_line_and_exit_1():
    """--lr 1e-2 on the tutorial's problem overflows within a few steps."""
    proc = subprocess.run(
        [sys.executable, "-m", "twolayer_ext.train", "--lr", "1e-2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # no numpy RuntimeWarning
    assert lines[0].startswith("twolayer_ext.train: stopped at step ")
    assert "of numpy" in lines[0] and "--lr 0.01" in lines[0]
    assert "nan" not in proc.stdout  # no rows of nan


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "sgd_step,fused_loss"],
        pytest.param(["--data", "digits", "--epochs", "1"], marks=pytest.mark.slow),
    ],
)
def test_diverging_torch_paths_stop_too(argv, tmp_path, capsys, recwarn):
    out = tmp_path / "run.json"
    base = [] if "digits" in argv else SMALL
    assert train.main(base + argv + ["--lr", "50", "--json", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "stopped at step " in err[0] and "--lr 50" in err[0]
    assert not out.exists()  # nothing written for a run that did not finish
    assert len(recwarn) == 0


def test_digits_learns(tmp_path, capsys):
    """The defaults for --data digits reach well above 90% held-out accuracy."""
    out, png = tmp_path / "digits.json", tmp_path / "digits.png"
    assert train.main(["--data", "digits", "--json", str(out), "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(out.read_text())
    assert summary["config"]["D_in"] == 64 and summary["config"]["D_out"] == 10
    history = summary["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, 21))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert summary["final_test_accuracy"] > 0.93
    assert lines[-3].startswith("test accuracy ") and "/450)" in lines[-3]
    assert len(table_rows("\n".join(lines))) == 20
    assert png.read_bytes()[:8] == PNG_MAGIC


BAD = [
    (["--N", "0"], "--N"),
    (["--H", "-3"], "--H"),
    (["--D-in", "ten"], "--D-in"),
    (["--steps", "0"], "--steps"),
    (["--backend", "jax"], "jax"),
    (["--backend", "numpy,jax"], "jax"),
    (["--data", "mnist"], "mnist"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--dtype", "float16"], "--dtype"),
    (["--seed", "-1"], "--seed"),
    (["--epochs", "3"], "--epochs"),
    (["--data", "digits", "--D-in", "10"], "--D-in"),
    (["--data", "digits", "--backend", "sgd_step"], "--backend"),
    (["--backend", "fused"], "fused"),
    (["--backend", "module+adam"], "module+adam"),  # the comparison trains with SGD
    (["--backend", "gemm_floor"], "gemm_floor"),  # not a training step
    (["--ddp"], "torchrun"),
    (["--frobnicate"], "--frobnicate"),
    (["--plot", "{tmp}/missing/loss.png"], "does not exist"),
    (["--plot", "{tmp}/a_file/loss.png"], "does not exist"),
    (["--plot", "{tmp}/loss.jpg"], ".png"),
    (["--plot", "{tmp}/a_dir.png"], "is a directory"),
    (["--json", "{tmp}/missing/run.json"], "--json"),
]
if "cuda" not in twolayer_ext.available_devices() or not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "--device cuda"))


@pytest.mark.parametrize(
    "argv, says", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_input_exits_2_with_one_line(argv, says, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir.png").mkdir()
    before = sorted(tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    outputs = (
        []
        if "--plot" in argv or "--json" in argv
        else ["--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")]
    )
    base = [] if "digits" in argv else SMALL
    assert train.main(base + argv + outputs) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("twolayer_ext.train: error: ")
    assert says in lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even half


def test_a_variant_this_cpu_lacks_is_refused_with_the_reason(capsys, tuned_portable_missing):
    """Named, a variant for an ISA the CPU lacks stops the CLI before it starts, saying why (an
    AVX2-only CPU and tuned-avx512); pretended for tuned-portable (the fixture)."""
    assert train.main(SMALL + ["--backend", "sgd_step,sgd_step[tuned-portable]"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert "recipe 'sgd_step[tuned-portable]' needs a CPU with isa9, which this one lacks" in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_unwritable_plot_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert train.main(SMALL + ["--plot", str(locked / "loss.png")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


@pytest.mark.slow
def test_bad_input_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "twolayer_ext.train", "--N", "-5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        "twolayer_ext.train: error: argument --N: must be a positive integer, got '-5'"
    )


def test_digits_without_scikit_learn_names_the_extra(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sklearn" else find_spec(name, *a),
    )
    assert train.main(["--data", "digits"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "twolayer_ext.train: error: --data digits needs scikit-learn: "
        "pip install 'twolayer_ext[digits]'"
    ]
