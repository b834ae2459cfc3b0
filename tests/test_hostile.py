"""Behaviour: bad input is a clear error (the right exception type, a message naming the
argument), never a crash, on every device. (Mixed-device errors are CUDA-only: tests/test_cuda.py;
the fake kernels' wording of a bad dtype: tests/test_gpu_readiness.py.)

In-process tables (per CPU kernel variant; [cuda] cases where the call takes a device): two_layer,
l2_loss, two_layer_l2_loss and sgd_step arguments, mixed 16-bit dtypes, aliasing and non-leaf
weights for sgd_step, a bad reduction named by each op, TwoLayerNet sizes and from_sequential's
models, a CUDA dtype's wording.

The hostile-input table (tests/hostile_cases.py), run in a subprocess: a crash (segfault,
abort, sanitizer report) in one case is reported as that case's failure, and the run goes on
with the next case in a fresh process. Fails with the list of cases that crashed, raised nothing,
raised the wrong type or a message not naming the argument."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import twolayer_ext as tl

from conftest import HAS_CUDA, LOSS_ORDER, cpu_and_device_args

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "hostile_cases.py")
MIN_CASES = 100
KERNELS = pytest.mark.usefixtures("cpu_kernel")  # every CPU kernel variant (and CUDA)
OPS = torch.ops.twolayer_ext


def run_table():
    """Runs every case, restarting after each crash. Returns (results by index, crashes, total)."""
    results, crashes, start, total = {}, [], 0, None
    while True:
        proc = subprocess.run(
            [sys.executable, SCRIPT, "--start", str(start)],
            cwd=os.path.dirname(HERE),
            capture_output=True,
            text=True,
            timeout=900,
        )
        begun = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if rec.get("done"):
                total = rec["total"]
            elif rec.get("phase") == "begin":
                begun = rec
            else:
                results[rec["i"]] = rec
                begun = None
        if total is not None and proc.returncode == 0:
            return results, crashes, total
        if begun is None:  # died before the first case (import error...) or after the last
            raise AssertionError(
                f"hostile_cases.py failed outside any case (rc {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        crashes.append(dict(begun, rc=proc.returncode, stderr=proc.stderr[-1500:]))
        start = begun["i"] + 1


@pytest.mark.slow  # the table in subprocesses
def test_hostile_inputs_raise_clear_errors_and_never_crash():
    results, crashes, total = run_table()
    assert total >= MIN_CASES, f"only {total} hostile cases"
    failures, expected_failures, fixed = [], [], []
    for i in sorted(results):
        r = results[i]
        if r["status"] in ("pass", "skipped"):
            if r["status"] == "pass" and r.get("bug"):
                fixed.append(f"{r['id']}: passes now; remove its bug= mark ({r['bug']})")
            continue
        line = (
            f"{r['id']}: {r['status']}: expected {r['expected']} matching {r['pattern']!r}, "
            f"got {r.get('exc_type', 'no exception')}: {r.get('msg', '')[:200]!r}"
        )
        (expected_failures if r.get("bug") else failures).append(line)
    for c in crashes:
        failures.append(f"{c['id']}: CRASHED (rc {c['rc']}): {c['stderr'][-600:]}")
    ran = sum(r["status"] != "skipped" for r in results.values())
    summary = (
        f"hostile inputs: {total} cases, {ran} run, {total - ran} skipped (no GPU), "
        f"{len(crashes)} crashes, {len(failures)} failures, "
        f"{len(expected_failures)} known bugs (xfail)"
    )
    print(summary)
    assert not crashes and not failures and not fixed, "\n".join([summary] + failures + fixed)
    if expected_failures:
        pytest.xfail(f"{summary}; known bugs:\n" + "\n".join(expected_failures))


# ---- in-process tables ---------------------------------------------------------------------


def f64(*shape):
    return torch.randn(shape, dtype=torch.float64)


GOOD = dict(x=f64(4, 3), w1=f64(3, 5), w2=f64(5, 2), b1=f64(5), b2=f64(2))
BAD_TWO_LAYER = [
    ("x", f64(), ValueError, r"x must have at least one dimension \[\*, D_in\]"),
    ("x", f64(4), ValueError, r"w1 must have shape \[D_in, H\] with D_in = 4"),  # one sample of 4
    ("x", f64(4, 3, 1), ValueError, r"w1 must have shape \[D_in, H\] with D_in = 1"),
    ("w1", f64(4, 5), ValueError, r"w1 must have shape \[D_in, H\] with D_in = 3"),
    ("w1", f64(3), ValueError, "w1 must be a 2-D"),
    ("w2", f64(4, 2), ValueError, r"w2 must have shape \[H, D_out\] with H = 5"),
    ("w2", f64(5, 2, 1), ValueError, "w2 must be a 2-D"),
    ("b1", f64(4), ValueError, r"b1 must have shape \[H\]"),
    ("b1", f64(1, 5), ValueError, r"b1 must have shape \[H\]"),  # no broadcasting
    ("b2", f64(3), ValueError, r"b2 must have shape \[D_out\]"),
    ("b2", f64(1, 2), ValueError, r"b2 must have shape \[D_out\]"),
    (
        "x",
        torch.ones(4, 3, dtype=torch.int64),
        TypeError,
        "x must be float32, float64, float16 or bfloat16 on cpu, got Long",
    ),
    (
        "x",
        torch.ones(4, 3, dtype=torch.bool),
        TypeError,
        "x must be float32, float64, float16 or bfloat16 on cpu, got Bool",
    ),
    (
        "x",
        torch.ones(4, 3, dtype=torch.complex64),
        TypeError,
        "x must be float32, float64, float16 or bfloat16",
    ),
    ("w1", f64(3, 5).float(), TypeError, r"x must have the same dtype as w1 \(Float\), got Double"),
    ("w2", f64(5, 2).float(), TypeError, "w2 must have the same dtype as x"),
    ("b1", f64(5).float(), TypeError, "b1 must have the same dtype as x"),
    ("b2", f64(2).float(), TypeError, "b2 must have the same dtype as x"),
    ("w1", f64(3, 5).to("meta"), RuntimeError, "w1 must be on the same device as x"),
    ("x", [[1.0, 2.0, 3.0]], TypeError, "x must be a torch.Tensor"),
    ("w2", None, TypeError, "w2 must be a torch.Tensor"),
    ("b1", 1.0, TypeError, "b1 must be a torch.Tensor or None"),
]


@KERNELS
@pytest.mark.parametrize(
    "arg,value,exc,msg", BAD_TWO_LAYER, ids=[f"{a}-{i}" for i, (a, *_) in enumerate(BAD_TWO_LAYER)]
)
def test_bad_two_layer_input(arg, value, exc, msg):
    kwargs = dict(GOOD, **{arg: value})
    with pytest.raises(exc, match=msg):
        tl.two_layer(**kwargs)


BAD_LOSS = [
    (dict(target=f64(4, 3)), ValueError, r"target must have the same shape as pred"),
    (dict(target=f64(1, 2)), ValueError, r"target must have the same shape as pred"),
    (dict(target=f64(4, 2).float()), TypeError, "target must have the same dtype as pred"),
    (
        dict(pred=torch.ones(4, 2, dtype=torch.int32)),
        TypeError,
        "pred must be float32, float64, float16 or bfloat16 on cpu, got Int",
    ),
    (dict(reduction="avg"), ValueError, 'reduction must be "sum" or "mean"'),
    (dict(reduction=None), ValueError, 'reduction must be "sum" or "mean"'),
    (dict(pred=np.zeros((4, 2))), TypeError, "pred must be a torch.Tensor"),
    (dict(target=f64(4, 2).to("meta")), RuntimeError, "target must be on the same device as pred"),
]


@KERNELS
@pytest.mark.parametrize("kwargs,exc,msg", BAD_LOSS)
def test_bad_loss_input(kwargs, exc, msg):
    args = dict(pred=f64(4, 2), target=f64(4, 2), reduction="sum")
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        tl.l2_loss(**args)


BAD_SGD_STEP = [
    (dict(lr=-1.0), ValueError, "lr must be a finite number >= 0"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number >= 0"),
    (dict(lr=float("inf")), ValueError, "lr must be a finite number >= 0"),
    (dict(lr="0.1"), TypeError, "lr must be a float"),
    (dict(reduction="max"), ValueError, 'reduction must be "sum" or "mean"'),
    (dict(target=torch.zeros(4, 3)), ValueError, r"target must have shape \[N, D_out\]"),
    (
        dict(target=torch.zeros(3, 2, dtype=torch.float64)),
        TypeError,
        "target must have the same dtype",
    ),
    (dict(w1=torch.zeros(1, 1).expand(5, 4)), ValueError, "w1 is updated in place"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_SGD_STEP)
@KERNELS
def test_bad_sgd_step_input(kwargs, exc, msg):
    args = dict(
        x=torch.randn(3, 5),
        target=torch.randn(3, 2),
        w1=torch.randn(5, 4),
        w2=torch.randn(4, 2),
        lr=0.1,
    )
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        tl.sgd_step(**args)


@KERNELS
def test_aliasing_weights_refused():
    w = torch.randn(4, 4)
    with pytest.raises(
        ValueError, match="w1 is updated in place and must not share memory with w2"
    ):
        tl.sgd_step(torch.randn(3, 4), torch.randn(3, 4), w, w, lr=0.1)
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="must not share memory with x"):
        tl.sgd_step(x, torch.randn(4, 4), x, torch.randn(4, 4), lr=0.1)


@KERNELS
def test_non_leaf_weight_in_graph_refused():
    base = torch.randn(5, 4, requires_grad=True)
    w1 = base * 2
    with pytest.raises(RuntimeError, match="non-leaf tensor inside an autograd graph"):
        tl.sgd_step(torch.randn(3, 5), torch.randn(3, 2), w1, torch.randn(4, 2), lr=0.1)


@KERNELS
def test_bad_fused_loss_input_names_the_argument():
    torch.manual_seed(0)
    net = tl.TwoLayerNet(12, 9, 4, bias=True, dtype=torch.float64)
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"two_layer_l2_loss: target must have shape \[N, D_out\]"):
        tl.two_layer_l2_loss(x, y[:, :3], net.w1, net.w2)
    with pytest.raises(TypeError, match="two_layer_l2_loss: target must have the same dtype as x"):
        tl.two_layer_l2_loss(x, y.float(), net.w1, net.w2)
    with pytest.raises(ValueError, match='two_layer_l2_loss: reduction must be "sum" or "mean"'):
        tl.two_layer_l2_loss(x, y, net.w1, net.w2, reduction="max")
    with pytest.raises(TypeError, match="two_layer_l2_loss: w2 must be a torch.Tensor"):
        tl.two_layer_l2_loss(x, y, net.w1, None)


def test_mixed_dtypes_are_refused_by_name():
    x = torch.ones(4, 3, dtype=torch.bfloat16)
    with pytest.raises(
        TypeError,
        match=r"two_layer: x must have the same dtype as w1 "
        r"\(Half\), got BFloat16",
    ):
        tl.two_layer(
            x, torch.ones(3, 5, dtype=torch.float16), torch.ones(5, 2, dtype=torch.bfloat16)
        )


@KERNELS
def test_bad_reduction_names_the_op(device):
    _, a = cpu_and_device_args(device)
    calls = {
        "sgd_step": lambda: OPS.sgd_step(
            a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], 0.1, "avg", [True] * 4
        ),
        "two_layer_l2_loss": lambda: OPS.two_layer_l2_loss_fwd(
            *(a[k] for k in LOSS_ORDER), "avg", [True] * 6
        ),
        "l2_loss": lambda: OPS.l2_loss_fwd(a["target"], a["target"], "avg", True),
    }
    for name, call in calls.items():
        with pytest.raises(
            ValueError, match=rf'^{name}: reduction must be "sum" or "mean", got "avg"'
        ):
            call()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
def test_unsupported_dtype_on_cuda_is_a_type_error_worded_alike_by_the_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def message():
        x = torch.ones(4, 3, dtype=torch.int32, device="cuda")
        with pytest.raises(TypeError) as info:
            tl.two_layer(x, x.t().contiguous(), x.t().contiguous())
        return str(info.value)

    real = message()
    assert real == "two_layer: x must be float32, float64, float16 or bfloat16 on CUDA, got Int"
    with FakeTensorMode():
        fake = message()
    assert fake == real


@pytest.mark.parametrize("args", [(0, 2, 3), (2, -1, 3), (2, 2, 1.5), (True, 2, 2)])
def test_bad_sizes(args):
    with pytest.raises(ValueError, match="must be a positive int"):
        tl.TwoLayerNet(*args)


@pytest.mark.parametrize(
    "seq",
    [
        nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
        nn.Linear(3, 4),
    ],
)
def test_from_sequential_rejects_other_models(seq):
    with pytest.raises(TypeError, match=r"nn.Sequential\(nn.Linear, nn.ReLU, nn.Linear\)"):
        tl.TwoLayerNet.from_sequential(seq)
