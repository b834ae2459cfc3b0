"""--ddp under torchrun: 2 gloo ranks on localhost, each on its shard of the batch, end with
the weights of one process on the whole batch (the numpy oracle)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from twolayer_ext import reference as R

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two torchrun ranks per case
D_IN, H, D_OUT, STEPS = 40, 16, 5, 6


def torchrun(args, timeout=150):
    """torchrun --standalone (it picks a free port) with 2 ranks; the whole process group is
    killed on timeout, so a stuck rank cannot outlive the test."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "twolayer_ext.train",
        "--ddp",
        *args,
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s")
    return proc.returncode, out, err


# sum: each rank must backpropagate 2 * its loss, since DDP averages gradients.
# mean over uneven shards (17 + 16 rows): averaging per-rank means would weight the rows
# unequally; the global numel must divide instead.
@pytest.mark.parametrize(
    "reduction, N, bias, lr", [("sum", 32, False, 1e-5), ("mean", 33, True, 1e-2)]
)
def test_two_ranks_equal_one_process(tmp_path, reduction, N, bias, lr):
    out, weights = tmp_path / "ddp.json", tmp_path / "w.pt"
    rc, stdout, stderr = torchrun(
        [
            "--N",
            str(N),
            "--D-in",
            str(D_IN),
            "--H",
            str(H),
            "--D-out",
            str(D_OUT),
            "--steps",
            str(STEPS),
            "--lr",
            str(lr),
            "--reduction",
            reduction,
            "--bias" if bias else "--no-bias",
            "--log-every",
            "1",
            "--json",
            str(out),
            "--save",
            str(weights),
        ]
    )
    assert rc == 0, stdout + stderr
    assert stdout.count("DDP over 2 ranks (gloo)") == 1  # only rank 0 reports
    shards = [N - N // 2, N // 2]
    assert f"rows per rank: {shards}" in stdout

    x, y, params = R.tutorial_data(N, D_IN, H, D_OUT, seed=0, bias=bias)
    initial = {k: v.copy() for k, v in params.items() if v is not None}
    expected = [R.numpy_sgd_step(x, y, params, lr, reduction) for _ in range(STEPS)]
    assert expected[-1] < 0.9 * expected[0]  # the weights really moved

    summary = json.loads(out.read_text())
    assert summary["mode"] == "ddp" and summary["world_size"] == 2
    np.testing.assert_allclose(summary["losses"], expected, rtol=1e-12)
    final = torch.load(weights)
    assert sorted(final) == sorted(initial)
    for k, w0 in initial.items():
        # compare the updates, not just the weights, so a wrong gradient scale cannot hide
        np.testing.assert_allclose(
            final[k].numpy() - w0,
            params[k] - w0,
            rtol=1e-9,
            atol=1e-12 * np.abs(params[k] - w0).max(),
            err_msg=k,
        )
