"""Behaviour: what only CUDA has. Every dtype against the float64 numpy oracle (float32 with TF32
off and on, float16, bfloat16, and torch's default reduced-precision settings), through
two_layer + l2_loss and through the fused two_layer_l2_loss; sgd_step likewise; float16 mean
reduction at large n; torch.compile(mode="reduce-overhead") and CUDA graph capture of sgd_step;
mixed-device errors, side streams and a non-default device. Everything here skips without a GPU
and the CUDA build.

The device-generic behaviours run on CUDA as the [cuda] cases of the behaviour files (see
tests/README.md): NaN/Inf and the ReLU mask in every dtype (test_special_values.py), the empty
batch and leading dimensions (test_shapes.py), the large sum (test_l2_loss.py), the fused loss's
output mask (test_gradient_requests.py), frozen weights (test_sgd_step.py), bad reductions and a
bad CUDA dtype (test_hostile.py), opcheck in every dtype (test_opcheck.py).
"""

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import COLLECT_CUDA, HAS_CUDA, NO_CUDA_REASON, loss_through, matmul_precision, problem

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
OPS = torch.ops.twolayer_ext

# TF32's bound, derived. A TF32 GEMM rounds its float32 inputs to 10 mantissa bits,
# u = 2^-11 ~ 4.9e-4 (to nearest), and sums its K-term dot products in float32, which adds at
# most K * 2^-24 <= 6e-5 for K <= 1000: negligible next to u. The test's inputs are TF32 values
# already (quantize), so only intermediates are rounded: act into act @ w2 (y) and act^T @ grad_y,
# grad_y into grad_y @ w2^T (grad_h), grad_h into x^T @ grad_h and grad_h @ w1^T. A GEMM with one
# rounded operand errs by at most u * (|A| @ |B|) <= u * kappa * max|A @ B|, kappa the
# cancellation in the sums: at most 4.2 on these problems (2 typically). So y and grad_w2, one
# rounding deep, are within 4.2u; grad_x and grad_w1 sit three roundings deep (act, grad_y,
# grad_h), and three such errors of independent signs add in quadrature: sqrt(3) * 4.2u = 7.3u.
# Bound: 8u = 2^-8 ~ 3.9e-3. An emulation of exactly these roundings in float64 measures at most
# 0.84u; tensor cores that truncated instead of rounding would double it, still far inside.
TF32_U = 2.0**-11
TF32_TOL = 8 * TF32_U

# name: (dtype, TF32 on, reduced-precision fp16/bf16 GEMM reductions allowed, bound on
# max|error| / max|expected| against the float64 oracle). A CPU emulation of the roundings gives
# at most 4e-7 (float32), 4e-4 (TF32), 6e-4 (float16) and 4e-3 (bfloat16) on these problems.
# The "-default" ones run as torch ships (reduced-precision reductions allowed), the
# configuration most users have, where docs/gpu.md's "accumulating in float32" must still hold
# to 1e-2. There cuBLAS may split K and sum the partial products in float16/bfloat16, which can
# flip the ReLU mask where h is within that rounding of 0; a flip moves grad_x by 5-15% on a
# correct kernel, so those rows are bounded against the oracle run with the kernel's own mask
# (and the flips are checked to lie where h is that close to 0).
PRECISIONS = {
    "float64": (torch.float64, False, False, 1e-10),
    "float32": (torch.float32, False, False, 1e-5),
    "tf32": (torch.float32, True, False, TF32_TOL),
    "float16": (torch.float16, False, False, 1e-2),
    "bfloat16": (torch.bfloat16, False, False, 1e-2),
    "float16-default": (torch.float16, False, True, 1e-2),
    "bfloat16-default": (torch.bfloat16, False, True, 1e-2),
}
SHAPES = [(257, 129, 65, 17), (64, 1000, 100, 10)]


def test_default_config_allows_reduced_precision_reductions():
    # The "-default" precisions test what torch ships only while this holds.
    m = torch.backends.cuda.matmul
    assert m.allow_fp16_reduced_precision_reduction and m.allow_bf16_reduced_precision_reduction


def quantize(a, dtype, tf32):
    """a (numpy float64) as the CUDA kernels will see it: rounded to dtype, and for TF32 to
    TF32's 10-bit mantissa (the GEMM rounds its inputs so; rounding them here keeps that from
    flipping the ReLU mask where h is within TF32's error of 0, which is no kernel's fault)."""
    t = torch.tensor(a).to(dtype)
    if tf32:
        bits = t.view(torch.int32)
        t = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)  # round to nearest, 13 bits off
    return t


def rel_err(actual, expected):
    actual = actual.detach().double().cpu().numpy()
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


def precision_problem(name, shape, bias, seed=0):
    """(dtype, (tf32, reduced), tol, cuda tensors, float64 numpy arrays of the same values)."""
    dtype, tf32, reduced, tol = PRECISIONS[name]
    x, y, params = problem(*shape, bias=bias, seed=seed)
    arrays = dict(params, x=x, y=y)
    cuda = {k: None if v is None else quantize(v, dtype, tf32).cuda() for k, v in arrays.items()}
    exact = {k: None if v is None else v.double().cpu().numpy().copy() for k, v in cuda.items()}
    return dtype, (tf32, reduced), tol, cuda, exact


def kernel_mask(t, config, dtype):
    """Where the CUDA forward's ReLU blocked (sign bit of its act), as a numpy bool array; None
    unless reduced-precision reductions are on (config[1]), where cuBLAS's split-K may flip the
    mask near h = 0. The fused loss and sgd_step run the same forward (same GEMMs, same shapes,
    same stream), so they get the same mask. Checks that every flip against the float64 h lies
    where |h| is within 16 roundings of the dtype of |x| @ |w1| + |b1|."""
    if not config[1]:
        return None
    args = [None if t[k] is None else t[k].detach() for k in ("x", "w1", "w2", "b1", "b2")]
    with matmul_precision(*config):
        _, act = OPS.two_layer_fwd(*args)
    blocked = torch.signbit(act.float()).cpu().numpy()
    x, w1, b1 = (None if a is None else a.double().cpu().numpy() for a in args[:2] + args[3:4])
    h = x @ w1 + (0.0 if b1 is None else b1)
    size = np.abs(x) @ np.abs(w1) + (0.0 if b1 is None else np.abs(b1))
    u = torch.finfo(dtype).eps / 2  # unit roundoff
    flips = blocked != (h < 0)
    assert np.all(np.abs(h[flips]) <= 16 * u * size[flips]), (
        f"{int(flips.sum())} ReLU mask flips, some where h is far from 0: "
        f"max |h| / (|x| @ |w1|) there = {float((np.abs(h) / size)[flips].max()):.3g}"
    )
    return blocked


def oracle(e, reduction, blocked=None):
    """The float64 forward, loss and gradients (x, w1, w2, b1, b2, y) of numpy arrays e; with
    `blocked` (kernel_mask's), the ReLU blocks exactly there instead of where h < 0. Returns
    (y_pred, loss, grads)."""
    h, h_relu, y_pred = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    if blocked is not None:
        h_relu = np.where(blocked, 0.0, h)
        y_pred = h_relu @ e["w2"] + (0.0 if e["b2"] is None else e["b2"])
        h = np.where(blocked, -1.0, 1.0)  # numpy_backward reads h only for its sign
    grad_y = R.numpy_loss_grad(y_pred, e["y"], reduction)
    grads = dict(R.numpy_backward(e["x"], e["w1"], e["w2"], h, h_relu, grad_y), y=-grad_y)
    return y_pred, R.numpy_loss(y_pred, e["y"], reduction), grads


# ---- accuracy against the float64 oracle -----------------------------------------------------


@pytest.mark.parametrize("path", ["two_layer+l2_loss", "fused"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_forward_loss_and_gradients_match_float64_oracle(precision, shape, bias, reduction, path):
    dtype, config, tol, t, e = precision_problem(precision, shape, bias)
    blocked = kernel_mask(t, config, dtype)
    leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None}  # target too
    with matmul_precision(*config):
        loss, y = loss_through(path, t, reduction)
        loss.backward()
    assert loss.dtype == dtype and loss.is_cuda

    y_np, loss_np, grads = oracle(e, reduction, blocked)
    if path != "fused":
        assert y.dtype == dtype and y.is_cuda
        assert rel_err(y, y_np) < tol, "y"
    assert abs(loss.item() - loss_np) / loss_np < tol, "loss"
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == dtype
        assert rel_err(leaf.grad, grads[name]) < tol, name


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_sgd_step_matches_float64_oracle(precision, bias, reduction):
    dtype, config, tol, t, e = precision_problem(precision, SHAPES[0], bias, seed=3)
    _, loss_np, g = oracle(e, reduction, kernel_mask(t, config, dtype))
    # A step that moves w1 by a fifth of its largest entry: visible in every dtype.
    lr = float(0.2 * np.abs(e["w1"]).max() / np.abs(g["w1"]).max())
    old = {k: e[k] for k in R.PARAM_NAMES}
    new = {k: None if v is None else v - lr * g[k] for k, v in old.items()}

    with matmul_precision(*config):
        loss = tl.sgd_step(
            t["x"], t["y"], t["w1"], t["w2"], t["b1"], t["b2"], lr=lr, reduction=reduction
        )
    assert loss.dtype == dtype and not loss.requires_grad
    assert abs(loss.item() - loss_np) / loss_np < tol, "loss"
    eps = torch.finfo(dtype).eps
    for name in R.PARAM_NAMES:
        if old[name] is None:
            continue
        # Error relative to the step's size; the new weight is rounded to dtype, which alone
        # may miss the step by an ulp of the weight.
        step = np.abs(new[name] - old[name]).max()
        err = np.abs(t[name].double().cpu().numpy() - new[name]).max() / step
        assert err < tol + 2 * eps * np.abs(old[name]).max() / step, name


def test_float16_mean_reduction_keeps_precision_at_large_n():
    # n = N * D_out = 2^24, as gpu_narrow: (2/n) * d would be ~1e-7 * d, a float16 subnormal
    # two or three steps of 6e-8 wide, so the gradients came out ~15% off. The kernels keep
    # 2 * d and scale by 1/n in float32 (the GEMMs' alpha, the bias sums and updates).
    _, config, tol, t, e = precision_problem("float16", (1 << 20, 16, 16, 16), bias=True, seed=5)
    h, h_relu, y_np = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    g = R.numpy_backward(
        e["x"], e["w1"], e["w2"], h, h_relu, R.numpy_loss_grad(y_np, e["y"], "mean")
    )
    leaves = {k: t[k].clone().requires_grad_() for k in R.PARAM_NAMES}
    with matmul_precision(*config):
        tl.two_layer_l2_loss(t["x"], t["y"], *leaves.values(), reduction="mean").backward()
    errors = {k: rel_err(leaf.grad, g[k]) for k, leaf in leaves.items()}
    print("float16, n = 2^24, relative error of the fused loss's gradients:", errors)
    assert max(errors.values()) < tol, errors

    lr = float(0.2 * np.abs(e["w1"]).max() / np.abs(g["w1"]).max())  # w1 moves visibly
    new = {k: e[k].copy() for k in R.PARAM_NAMES}
    R.numpy_sgd_step(e["x"], e["y"], new, lr, "mean")
    with matmul_precision(*config):
        tl.sgd_step(t["x"], t["y"], t["w1"], t["w2"], t["b1"], t["b2"], lr=lr, reduction="mean")
    eps = torch.finfo(torch.float16).eps
    for name in R.PARAM_NAMES:
        # As in test_sgd_step_matches_float64_oracle: relative to the step, plus rounding to dtype.
        step = np.abs(new[name] - e[name]).max()
        err = np.abs(t[name].double().cpu().numpy() - new[name]).max() / step
        assert err < tol + 2 * eps * np.abs(e[name]).max() / step, f"sgd_step {name}: {err}"


# ---- losses beyond the dtype's range; autocast ------------------------------------------------


def overflowing_problem(dtype=torch.float32):
    """A problem whose float32 loss overflows: y = 2e19 against target 0, so d^2 = 4e38 is past
    float32's 3.4e38 (the gradient 2 * d = 4e19 is not)."""
    x = torch.full((2, 1), 1e10, dtype=dtype, device="cuda")
    w1 = torch.full((1, 1), 1e9, dtype=dtype, device="cuda")
    w2 = torch.full((1, 1), 2.0, dtype=dtype, device="cuda")
    return x, torch.zeros(2, 1, dtype=dtype, device="cuda"), w1, w2


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_overflowing_float32_loss_is_inf(reduction):
    # As torch's own: inf, never "value cannot be converted to type float without overflow".
    x, target, w1, w2 = overflowing_problem()
    y = tl.two_layer(x, w1, w2)
    assert y.isfinite().all()
    assert tl.l2_loss(y, target, reduction).item() == float("inf")
    assert tl.two_layer_l2_loss(x, target, w1, w2, reduction=reduction).item() == float("inf")
    assert torch.nn.functional.mse_loss(y, target, reduction=reduction).item() == float("inf")
    loss = tl.sgd_step(x, target, w1.clone(), w2.clone(), None, None, lr=1e-30, reduction=reduction)
    assert loss.item() == float("inf")


@pytest.mark.parametrize("dtype,lr", [(torch.float32, 1e39), (torch.float16, 1e5)], ids=str)
def test_sgd_step_refuses_an_lr_beyond_the_dtype_and_changes_nothing(dtype, lr):
    a = two_layer_args("cuda", dtype)
    before = {k: a[k].clone() for k in ("w1", "w2", "b1", "b2")}
    with pytest.raises(ValueError, match="sgd_step: lr must be"):
        tl.sgd_step(a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], lr=lr)
    for k, v in before.items():
        assert torch.equal(a[k], v), k


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_loss_under_float16_autocast_is_float32_like_linear_and_mse_loss(reduction):
    # Under autocast the fused loss is l2_loss (float32, as nn.MSELoss) of the float16 prediction
    # (as nn.Linear): a sum far past float16's 65504 is finite, and the loss carries no float16
    # rounding of its own.
    g = torch.Generator(device="cuda").manual_seed(0)
    D_in, H, D_out = 64, 32, 8
    w = {
        k: (torch.randn(*shape, generator=g, device="cuda") / scale).requires_grad_()
        for k, shape, scale in (
            ("w1", (D_in, H), D_in**0.5),
            ("w2", (H, D_out), H**0.5),
            ("b1", (H,), 1.0),
            ("b2", (D_out,), 1.0),
        )
    }
    seq = nn.Sequential(nn.Linear(D_in, H), nn.ReLU(), nn.Linear(H, D_out)).cuda()
    with torch.no_grad():
        for layer, wk, bk in ((seq[0], "w1", "b1"), (seq[2], "w2", "b2")):
            layer.weight.copy_(w[wk].t())
            layer.bias.copy_(w[bk])
    x = torch.randn(4096, D_in, generator=g, device="cuda")
    target = 8 * torch.randn(4096, D_out, generator=g, device="cuda")
    params = [w[k] for k in R.PARAM_NAMES]

    def split_loss():
        return tl.l2_loss(tl.two_layer(x, *params), target, reduction)

    with torch.autocast("cuda", dtype=torch.float16):
        fused = tl.two_layer_l2_loss(x, target, *params, reduction=reduction)
        pred = tl.two_layer(x, *params)
        split = split_loss()
        seq_loss = nn.MSELoss(reduction=reduction)(seq(x), target)
    assert pred.dtype == torch.float16
    assert fused.dtype == split.dtype == seq_loss.dtype == torch.float32
    exact = (pred.double() - target.double()).square()
    exact = exact.sum() if reduction == "sum" else exact.mean()
    if reduction == "sum":
        assert exact.item() > 10 * 65504  # the case that came out inf in float16
    assert fused.isfinite()
    torch.testing.assert_close(fused.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused, split, rtol=1e-6, atol=0)
    # nn.Linear's float16 GEMMs round the prediction differently, by float16's ~1e-3.
    torch.testing.assert_close(fused, seq_loss, rtol=1e-2, atol=0)

    grads = torch.autograd.grad(fused, params)
    with torch.autocast("cuda", dtype=torch.float16):
        want = torch.autograd.grad(split_loss(), params)
    for name, got, ref in zip(R.PARAM_NAMES, grads, want):
        assert got.dtype == torch.float32 and got.isfinite().all(), name
        torch.testing.assert_close(
            got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item(), msg=name
        )


# ---- torch.compile(mode="reduce-overhead"), CUDA graphs --------------------------------------------------


@contextlib.contextmanager
def cuda_graphs_required():
    """Around the calls of a mode="reduce-overhead" function: fails the test if inductor skipped
    CUDA graphs for any graph it compiled (it would log a warning and run that graph eagerly, and
    the results would still match), or recorded none. Inductor counts each skip in
    counters["inductor"]["cudagraph_skips"]; cudagraph_or_error makes a skip raise at once, with
    inductor's reason, where this torch has it."""
    from torch._dynamo.utils import counters
    from torch._inductor import config, cudagraph_trees

    torch._dynamo.reset()  # fresh compiles and CUDA graph trees: nothing cached from another test
    counters.clear()
    patch = (
        {"triton.cudagraph_or_error": True} if hasattr(config.triton, "cudagraph_or_error") else {}
    )
    with config.patch(patch):
        yield
    skips = counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"inductor skipped CUDA graphs {skips} times (see its warnings in the log)"
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and any(manager.roots.values()), "no CUDA graph was recorded"


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_reduce_overhead_training_matches_eager(bias):
    torch.manual_seed(0)
    eager = tl.TwoLayerNet(64, 32, 8, bias=bias, device="cuda")
    compiled = copy.deepcopy(eager)
    x, y = torch.randn(128, 64, device="cuda"), torch.randn(128, 8, device="cuda")
    loss_fn = torch.compile(
        lambda x, y: tl.l2_loss(compiled(x), y, "mean"), mode="reduce-overhead", fullgraph=True
    )
    with cuda_graphs_required():
        for _ in range(4):  # the first calls record the CUDA graphs, the later ones replay them
            torch.compiler.cudagraph_mark_step_begin()
            loss = loss_fn(x, y)
            loss.backward()
            ref = tl.l2_loss(eager(x), y, "mean")
            ref.backward()
            torch.testing.assert_close(loss, ref)
            with torch.no_grad():
                for a, b in zip(eager.parameters(), compiled.parameters()):
                    torch.testing.assert_close(b.grad, a.grad)
                    a -= 0.1 * a.grad
                    b -= 0.1 * b.grad
                    a.grad = b.grad = None
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a)


def test_compiled_reduce_overhead_sgd_step_matches_eager():
    torch.manual_seed(0)
    net = tl.TwoLayerNet(64, 32, 8, device="cuda")
    ref = copy.deepcopy(net)
    x, y = torch.randn(128, 64, device="cuda"), torch.randn(128, 8, device="cuda")
    step = torch.compile(
        lambda: net.sgd_step(x, y, lr=1e-3), mode="reduce-overhead", fullgraph=True
    )
    with cuda_graphs_required():
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            loss = step().clone()  # a replay reuses the output's memory
            torch.testing.assert_close(loss, ref.sgd_step(x, y, lr=1e-3))
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_sgd_step_captured_in_a_cuda_graph(bias):
    torch.manual_seed(0)
    net = tl.TwoLayerNet(64, 32, 8, bias=bias, device="cuda")
    ref = copy.deepcopy(net)
    x, y = torch.randn(128, 64, device="cuda"), torch.randn(128, 8, device="cuda")
    # Warm-up on a side stream before capture (cuBLAS handles, workspaces), as torch advises.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            net.sgd_step(x, y, lr=1e-3)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        ref.sgd_step(x, y, lr=1e-3)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails on any host sync inside the op
        loss = net.sgd_step(x, y, lr=1e-3)
    for _ in range(3):
        graph.replay()
        torch.testing.assert_close(loss, ref.sgd_step(x, y, lr=1e-3), rtol=1e-5, atol=1e-6)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- devices and streams ---------------------------------------------------------------------


def two_layer_args(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = dict(x=(6, 4), w1=(4, 5), w2=(5, 3), b1=(5,), b2=(3,), target=(6, 3))
    return {k: torch.randn(*s, generator=g, dtype=dtype).to(device) for k, s in shapes.items()}


MIXED = [  # (call, the argument moved to the CPU, the error)
    ("two_layer", "w1", r"w1 must be on the same device as x \(cuda:0\), got cpu"),
    ("two_layer", "x", r"w1 must be on the same device as x \(cpu\), got cuda:0"),
    ("two_layer", "b1", "b1 must be on the same device as x"),
    ("two_layer", "b2", "b2 must be on the same device as x"),
    ("l2_loss", "target", r"target must be on the same device as pred \(cuda:0\), got cpu"),
    ("sgd_step", "target", "target must be on the same device as x"),
    ("sgd_step", "w2", "w2 must be on the same device as x"),
    ("two_layer_l2_loss", "target", "two_layer_l2_loss: target must be on the same device as x"),
    ("two_layer_l2_loss", "b2", "two_layer_l2_loss: b2 must be on the same device as x"),
    ("two_layer_bwd", "grad_y", "grad_y must be on the same device as act"),
    ("two_layer_bwd", "x", "x must be on the same device as act"),
    ("l2_loss_bwd", "grad_loss", "grad_loss must be on the same device as grad"),
]


@pytest.mark.parametrize("call,moved,msg", MIXED, ids=[f"{c}-{m}" for c, m, _ in MIXED])
def test_mixed_devices_are_a_clear_error(call, moved, msg):
    with torch.cuda.device(0):
        a = two_layer_args("cuda:0")
        _, act = OPS.two_layer_fwd(a["x"], a["w1"], a["w2"], None, None)
        a.update(
            act=act,
            grad_y=torch.ones(6, 3, device="cuda:0"),
            grad_loss=torch.tensor(1.0, device="cuda:0"),
        )
        a[moved] = a[moved].cpu()
        calls = {
            "two_layer": lambda: tl.two_layer(a["x"], a["w1"], a["w2"], a["b1"], a["b2"]),
            "l2_loss": lambda: tl.l2_loss(a["grad_y"], a["target"]),
            "two_layer_l2_loss": lambda: tl.two_layer_l2_loss(
                a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"]
            ),
            "sgd_step": lambda: tl.sgd_step(
                a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], lr=0.1
            ),
            "two_layer_bwd": lambda: OPS.two_layer_bwd(
                a["grad_y"], a["x"], a["w1"], a["w2"], a["act"], [True] * 5
            ),
            "l2_loss_bwd": lambda: OPS.l2_loss_bwd(a["grad_loss"], a["grad_y"]),
        }
        with pytest.raises(RuntimeError, match=msg):
            calls[call]()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_ops_follow_the_current_stream(bias):
    # The side stream sleeps, then makes the inputs and runs the ops. An op launched on any
    # other stream would run at once, on inputs not yet written, and get the wrong answer.
    base = two_layer_args("cuda")
    if not bias:
        base["b1"] = base["b2"] = None
    names = ("x", "w1", "w2", "b1", "b2")
    want = tl.two_layer(*(base[k] for k in names))
    want_loss = tl.two_layer_l2_loss(base["x"], base["target"], *(base[k] for k in names[1:]))
    want_step = {k: None if base[k] is None else base[k].clone() for k in names[1:]}
    tl.sgd_step(base["x"], base["target"], *want_step.values(), lr=0.1)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock cycles before the inputs exist
        a = {k: None if v is None else v * 1 for k, v in base.items()}
        got = tl.two_layer(*(a[k] for k in names))
        loss = tl.l2_loss(got, want)
        fused = tl.two_layer_l2_loss(a["x"], a["target"], *(a[k] for k in names[1:]))
        tl.sgd_step(a["x"], a["target"], *(a[k] for k in names[1:]), lr=0.1)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loss.item() == 0.0
    torch.testing.assert_close(fused, want_loss, rtol=0, atol=0)
    for k, v in want_step.items():
        if v is not None:
            torch.testing.assert_close(a[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_non_default_device():
    with torch.cuda.device(0):  # the current device is not the tensors' one
        a1, a0 = two_layer_args("cuda:1"), two_layer_args("cuda:0")
        y1 = tl.two_layer(a1["x"], a1["w1"], a1["w2"], a1["b1"], a1["b2"])
        y0 = tl.two_layer(a0["x"], a0["w1"], a0["w2"], a0["b1"], a0["b2"])
        assert y1.device == torch.device("cuda:1")
        torch.testing.assert_close(y1.cpu(), y0.cpu())
        loss1 = tl.sgd_step(a1["x"], a1["target"], a1["w1"], a1["w2"], a1["b1"], a1["b2"], lr=0.1)
        loss0 = tl.sgd_step(a0["x"], a0["target"], a0["w1"], a0["w2"], a0["b1"], a0["b2"], lr=0.1)
        assert loss1.device == torch.device("cuda:1")
        torch.testing.assert_close(loss1.cpu(), loss0.cpu())
        torch.testing.assert_close(a1["w1"].cpu(), a0["w1"].cpu())
        with pytest.raises(RuntimeError, match=r"w1 must be on the same device as x \(cuda:1\)"):
            tl.two_layer(a1["x"], a0["w1"], a1["w2"])


# Where no [cuda] case is generated (tests/conftest.py), the whole module is one skip: imported
# to its end first, so every name and parametrization above is still evaluated here.
if not COLLECT_CUDA:
    pytest.skip(NO_CUDA_REASON, allow_module_level=True)
