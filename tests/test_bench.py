"""The benchmark harness runs end to end on a tiny size and reports what it measured."""
import json

import pytest
import torch

from twolayer_ext import bench

FAST = ["--size", "5,7,6,3", "--rounds", "2", "--min-time", "0.001", "--warmup", "0",
        "--threads", "1"]


def test_tiny_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    backends = ["numpy", "module", "ext_autograd", "sgd_step", "sgd_step[reference]", "gemm_floor"]
    bench.main(FAST + sum((["--backend", b] for b in backends), []) +
               ["--dtype", "float64", "--json", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["ceiling_gflops"]["float64"] > 0
    got = {r["backend"]: r for r in report["results"]}
    assert set(got) == set(backends)
    for name, r in got.items():
        assert r["status"] == "ok" and r["median_us"] > 0 and r["shape"] == [5, 7, 6, 3], name
        assert name in table
    assert got["module"]["speedup_vs_module"] == pytest.approx(1.0)
    assert got["sgd_step"]["mflop_per_step"] == pytest.approx(bench.step_flops(5, 7, 6, 3) / 1e6)


def test_non_finite_backend_is_reported_not_timed(monkeypatch, capsys):
    monkeypatch.setitem(bench.BACKENDS, "diverges",
                        lambda *a: (lambda: torch.tensor(float("inf"))))
    bench.main(FAST + ["--backend", "module", "--backend", "diverges"])
    line = next(l for l in capsys.readouterr().out.splitlines() if "diverges" in l)
    assert "non-finite loss" in line


@pytest.mark.parametrize("args", [["--size", "0,1,1,1"], ["--size", "big"], ["--threads", "0"],
                                  ["--dtype", "bfloat16"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
