"""Behaviour: auto's choice is measured on this machine the first time a problem class is
seen, remembered for the process and in the wisdom file, read back by later processes (the
same picks), and a missing, corrupt, read-only or stale wisdom file never fails a call."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import twolayer_ext as tl

SHAPE = (96, 200, 64, 8)  # ~5 MFLOP a step: measured, in a few ms

CHILD = textwrap.dedent(
    """
    import json, sys, warnings, torch, twolayer_ext as tl
    warnings.simplefilter("always")
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        info = tl.cpu_kernel_choice(%r)
        x, y = torch.randn(96, 200), torch.randn(96, 8)
        w1, w2 = torch.randn(200, 64) * 0.07, torch.randn(64, 8) * 0.1
        loss = tl.sgd_step(x, y, w1, w2, lr=1e-3).item()
    print(json.dumps({"info": info, "loss": loss,
                      "warnings": [str(w.message) for w in caught if "twolayer_ext" in str(w.message)]}))
"""
    % (SHAPE,)
)


def child(wisdom, **env):
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TWOLAYER_WISDOM": str(wisdom), **env},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_measured_once_then_remembered():
    with tl.use_cpu_kernel("auto"):
        first = tl.cpu_kernel_choice(SHAPE)
        assert first["how"] == "measured" and first["variant"] in tl.CPU_VARIANTS, first
        report = tl.cpu_kernel_info(SHAPE)
        assert first["variant"] in report
        assert tl.cpu_kernel_info(SHAPE) == report  # the same times: not measured again
        # another shape of the same bucket shares the pick
        assert tl.cpu_kernel_choice((100, 190, 60, 7))["variant"] == first["variant"]
    with tl.use_cpu_kernel("blas"):  # a pinned variant is never measured
        choice = tl.cpu_kernel_choice(SHAPE)
        assert (choice["choice"], choice["variant"], choice["how"]) == ("blas", "blas", "pinned")


def test_measuring_leaves_the_random_stream_alone():
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    with tl.use_cpu_kernel("auto"):
        tl.cpu_kernel_info((200, 96, 64, 8), torch.float64)  # a key not measured before
    assert torch.equal(torch.rand(4), want)


def test_tiny_problems_take_the_rule_unmeasured():
    with tl.use_cpu_kernel("auto"):
        assert tl.cpu_kernel_choice((4, 8, 8, 2))["how"] == "rule"


@pytest.mark.slow  # two subprocesses, each measuring
def test_wisdom_file_is_written_and_read_back_with_the_same_pick(tmp_path):
    wisdom = tmp_path / "sub" / "wisdom.txt"
    first = child(wisdom)
    assert first["info"]["how"] == "measured" and not first["warnings"]
    lines = wisdom.read_text().splitlines()
    assert lines[0] == "twolayer_ext wisdom 1" and lines[1].startswith("identity ")
    assert any(line.startswith("step float32 t") and "128x256x64x8" in line for line in lines[2:])
    second = child(wisdom)
    assert second["info"]["how"] == "wisdom" and not second["warnings"]
    assert second["info"]["variant"] == first["info"]["variant"]
    assert second["loss"] == first["loss"]  # the same variant: the same bits


@pytest.mark.slow  # a subprocess that measures
@pytest.mark.parametrize("bad", ["corrupt", "stale", "bad-line"])
def test_bad_wisdom_warns_once_and_measures_again(tmp_path, bad):
    wisdom = tmp_path / "wisdom.txt"
    child(wisdom)  # a good file, then spoiled
    lines = wisdom.read_text().splitlines()
    if bad == "corrupt":
        wisdom.write_bytes(b"\x00\xffnot wisdom\n")
    elif bad == "stale":
        wisdom.write_text(
            "\n".join(
                [lines[0], "identity another CPU | tuned-avx2 | torch 1.0 | build 0", *lines[2:]]
            )
            + "\n"
        )
    else:
        wisdom.write_text(
            "\n".join([*lines, "step float32 t1 64x64x64x64\t64\tno-such-variant=1"]) + "\n"
        )
    got = child(wisdom)
    assert got["info"]["how"] == "measured"
    assert len(got["warnings"]) == 1 and "measures its choices again" in got["warnings"][0]
    assert child(wisdom)["warnings"] == []  # rewritten whole, good again


@pytest.mark.slow  # a subprocess that measures
def test_unwritable_wisdom_never_fails_a_call(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            wisdom = "/proc/version/wisdom.txt"  # root writes anywhere; /proc does not take files
        else:
            wisdom = folder / "wisdom.txt"
        got = child(wisdom)
        assert got["info"]["how"] == "measured"
        assert len(got["warnings"]) == 1 and "cannot write the wisdom file" in got["warnings"][0]
    finally:
        folder.chmod(0o700)


@pytest.mark.slow  # a subprocess that measures
def test_wisdom_off_writes_nothing(tmp_path):
    got = child("off", HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert got["info"]["how"] == "measured" and not any(tmp_path.rglob("*wisdom*"))


@pytest.mark.slow  # the tune CLI in a subprocess
def test_tune_cli_measures_and_reports(tmp_path):
    out = tmp_path / "tune.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "twolayer_ext.tune",
            "--size",
            "96,200,64,8",
            "--dtype",
            "float64",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TWOLAYER_WISDOM": str(tmp_path / "w.txt")},
    )
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())
    assert row["pick"] in tl.CPU_VARIANTS and row["pick"] == min(row["us"], key=row["us"].get)
    assert row["key"].startswith("step float64 t1 128x256x64x8") and row["threads"] == 1
    assert row["pick"] in r.stdout and "w.txt" in r.stdout
    assert "step float64 t1 128x256x64x8" in (tmp_path / "w.txt").read_text()
    with pytest.raises(SystemExit):
        from twolayer_ext.tools.tune import parse_args

        parse_args(["--threads", "0"])


def test_auto_never_offers_reference_and_names_its_candidates():
    info = tl.cpu_kernel_info()
    if info.startswith("auto"):
        assert "reference" not in info and "blas" in info
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.twolayer_ext.cpu_kernel_tune([8, 8, 8, 8], torch.float16)
