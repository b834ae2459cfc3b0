"""bfloat16 and float16: every op against the float64 oracle within a rounding-error bound,
float32 accumulation, the ReLU's sign mask, opcheck, autocast, and a bfloat16 TwoLayerNet.

On the CPU one implementation serves every kernel variant (the composite step, csrc/composite/step.h with cpu_policy.h: ATen's GEMMs
plus our float32 elementwise passes), so these tests run once, not per variant;
test_every_cpu_variant_runs_the_same_low_precision_path checks that claim.

The accuracy bound. The inputs are rounded to the dtype first and the oracle runs on those
exact values, so only the kernels' own roundings count. Each stored intermediate (act, y,
grad_y, grad_h, each result) is rounded once to the dtype: an error of at most u = eps / 2
times its size; float32 accumulation adds ~K * 2^-24 per K-term sum (< u/8 for float16 at
K = 1000). Propagated through the products, every result's error is at most
C * u * M, where M is "the magnitude of the sums": the oracle's formula with every term
replaced by its absolute value (|x| @ |w1| + |b1|, and so on), and C the number of roundings on
the longest path (6: act, y, grad_y, grad_h, the result, plus one for the output's own) with
room for the float32 accumulation: C = 8. A float16/bfloat16 accumulator would exceed it
(test_sums_accumulate_in_float32 shows the failure it would cause directly).
"""

import contextlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.library import opcheck

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import loss_through, problem

OPS = torch.ops.twolayer_ext
LOWP = {"bfloat16": torch.bfloat16, "float16": torch.float16}
C = 8
SHAPES = [(257, 129, 65, 17), (64, 1000, 100, 10)]
shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


@contextlib.contextmanager
def float32_reductions(device):
    """On CUDA, float16/bfloat16 GEMMs reduce in float32 (torch allows reduced-precision
    split-K by default, which this bound does not cover); nothing to set on the CPU."""
    if device != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction
    m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


def quantized_problem(dtype, shape, bias, device, seed=0):
    """(tensors in dtype on device, float64 numpy arrays of exactly those values)."""
    x, y, params = problem(*shape, bias=bias, seed=seed)
    arrays = dict(params, x=x, y=y)
    t = {k: None if v is None else torch.tensor(v).to(dtype).to(device) for k, v in arrays.items()}
    e = {k: None if v is None else v.double().cpu().numpy() for k, v in t.items()}
    return t, e


def oracle(e, reduction):
    """The oracle's forward, loss and gradients, and the magnitude M of each (see the top)."""
    h, h_relu, y = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    grad_y = R.numpy_loss_grad(y, e["y"], reduction)
    grads = dict(R.numpy_backward(e["x"], e["w1"], e["w2"], h, h_relu, grad_y), target=-grad_y)
    a = {k: 0.0 if v is None else np.abs(v) for k, v in e.items()}
    n = y.size if reduction == "mean" else 1
    Hm = a["x"] @ a["w1"] + a["b1"]
    Ym = Hm @ a["w2"] + a["b2"]
    Gm = 2 * (Ym + a["y"]) / n  # >= |grad_y| and its error's scale
    GHm = Gm @ a["w2"].T
    mags = dict(
        y=Ym,
        w2=Hm.T @ Gm,
        b2=Gm.sum(0),
        w1=a["x"].T @ GHm,
        b1=GHm.sum(0),
        x=GHm @ a["w1"].T,
        target=Gm,
    )
    d = np.abs(y - e["y"])
    # loss = sum d^2 / n: each |d| off by at most its y's bound; the result rounded once.
    loss = R.numpy_loss(y, e["y"], reduction)
    loss_bound_scale = (2 * d * Ym).sum() / n + abs(loss)
    return y, loss, grads, mags, loss_bound_scale


def assert_within_bound(actual, expected, magnitude, dtype, what, c=C):
    actual = actual.detach().double().cpu().numpy()
    bound = c * unit_roundoff(dtype) * np.broadcast_to(magnitude, np.shape(expected))
    ratio = np.abs(actual - expected) / np.maximum(bound, np.finfo(np.float64).tiny)
    worst = float(ratio.max()) if ratio.size else 0.0
    assert worst <= 1.0, f"{what}: error up to {worst:.2f} x the bound {c} u M"
    return worst


# ---- accuracy against the float64 oracle -----------------------------------------------------


@pytest.mark.parametrize("path", ["two_layer+l2_loss", "fused"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype_name", LOWP)
def test_forward_loss_and_gradients_within_rounding_bound(
    dtype_name, shape, bias, reduction, path, device
):
    dtype = LOWP[dtype_name]
    t, e = quantized_problem(dtype, shape, bias, device)
    leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None}  # target too
    with float32_reductions(device):
        loss, y = loss_through(path, t, reduction)
        loss.backward()
    y_np, loss_np, grads, mags, loss_scale = oracle(e, reduction)
    assert loss.dtype == dtype and loss.device.type == device
    if path != "fused":
        assert y.dtype == dtype
        assert_within_bound(y, y_np, mags["y"], dtype, "y")
    assert abs(loss.item() - loss_np) <= C * unit_roundoff(dtype) * loss_scale, "loss"
    for name, leaf in leaves.items():
        key = "target" if name == "y" else name
        assert leaf.grad.dtype == dtype, name
        assert_within_bound(leaf.grad, grads[key], mags[key], dtype, f"grad {name}")


@pytest.mark.parametrize("dtype_name", LOWP)
def test_two_layer_bwd_op_within_rounding_bound(dtype_name, device):
    # The backward op on its own, with a grad_y that is not a loss's (the chain rule's input).
    dtype = LOWP[dtype_name]
    t, e = quantized_problem(dtype, SHAPES[0], True, device, seed=1)
    g = torch.randn(SHAPES[0][0], SHAPES[0][3], dtype=torch.float64).to(dtype).to(device)
    with float32_reductions(device):
        _, act = OPS.two_layer_fwd(t["x"], t["w1"], t["w2"], t["b1"], t["b2"])
        out = OPS.two_layer_bwd(g, t["x"], t["w1"], t["w2"], act, [True] * 5)
    h, h_relu, _ = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    gn = g.double().cpu().numpy()
    expected = R.numpy_backward(e["x"], e["w1"], e["w2"], h, h_relu, gn)
    a = {k: np.abs(v) for k, v in e.items() if v is not None}
    Hm = a["x"] @ a["w1"] + a["b1"]
    GHm = np.abs(gn) @ a["w2"].T
    mags = dict(
        x=GHm @ a["w1"].T,
        w1=a["x"].T @ GHm,
        w2=Hm.T @ np.abs(gn),
        b1=GHm.sum(0),
        b2=np.abs(gn).sum(0),
    )
    for name, got in zip(("x", "w1", "w2", "b1", "b2"), out):
        assert got.dtype == dtype
        assert_within_bound(got, expected[name], mags[name], dtype, f"grad {name}")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype_name", LOWP)
def test_sgd_step_within_rounding_bound(dtype_name, bias, reduction, device):
    dtype = LOWP[dtype_name]
    t, e = quantized_problem(dtype, SHAPES[0], bias, device, seed=3)
    _, loss_np, grads, mags, loss_scale = oracle(e, reduction)
    # A step that moves w1 by a fifth of its largest entry: far above the bound.
    lr = float(0.2 * np.abs(e["w1"]).max() / np.abs(grads["w1"]).max())
    with float32_reductions(device):
        loss = tl.sgd_step(
            t["x"], t["y"], t["w1"], t["w2"], t["b1"], t["b2"], lr=lr, reduction=reduction
        )
    assert loss.dtype == dtype
    assert abs(loss.item() - loss_np) <= C * unit_roundoff(dtype) * loss_scale, "loss"
    for name in R.PARAM_NAMES:
        if e[name] is None:
            continue
        new = e[name] - lr * grads[name]
        # The update w + (-lr) * grad is rounded once: u |new|, plus lr times the gradient's bound.
        mag = np.abs(new) + lr * mags[name]
        assert_within_bound(t[name], new, mag, dtype, f"updated {name}")
    # The step happened, the oracle's way: w1 ends far closer to the oracle's new w1 than it was.
    w1_error = np.abs(t["w1"].double().cpu().numpy() - (e["w1"] - lr * grads["w1"])).max()
    assert w1_error < 0.1 * lr * np.abs(grads["w1"]).max()


@pytest.mark.parametrize("dtype_name", LOWP)
def test_sgd_step_leaves_frozen_weights_alone(dtype_name, device):
    dtype = LOWP[dtype_name]
    t, _ = quantized_problem(dtype, (16, 8, 6, 4), True, device)
    for k in ("w1", "w2", "b1", "b2"):
        t[k].requires_grad_(k != "w1")
    before = {k: t[k].detach().clone() for k in ("w1", "w2", "b1", "b2")}
    tl.sgd_step(t["x"], t["y"], t["w1"], t["w2"], t["b1"], t["b2"], lr=0.1)
    assert torch.equal(t["w1"], before["w1"])
    assert all(not torch.equal(t[k], before[k]) for k in ("w2", "b1", "b2"))


@pytest.mark.parametrize("dtype_name", LOWP)
def test_sums_accumulate_in_float32(dtype_name, device):
    # 4096 ones: exact in float32 and in both dtypes, but a bfloat16 running sum stops at 256
    # (256 + 1 rounds back to 256) and a float16 one at 2048.
    dtype, K = LOWP[dtype_name], 4096
    ones = lambda *s: torch.ones(*s, dtype=dtype, device=device)  # noqa: E731
    with float32_reductions(device):
        assert tl.two_layer(ones(1, K), ones(K, 1), ones(1, 1)).item() == K  # a GEMM's sum
        assert tl.l2_loss(ones(K), 0 * ones(K)).item() == K  # the loss's sum
        w1, b1 = ones(1, 1).requires_grad_(), ones(1).requires_grad_()
        tl.two_layer(ones(K, 1), w1, ones(1, 1), b1).sum().backward()
        assert b1.grad.item() == K and w1.grad.item() == K  # column sums
        w1b, b1b = ones(1, 1).requires_grad_(), ones(1).requires_grad_()
        # The fused loss's "mean" 1/n rides in the GEMM alpha: 2 (y - 0) / n summed over K rows.
        tl.two_layer_l2_loss(
            ones(K, 1), 0 * ones(K, 1), w1b, ones(1, 1), b1b, reduction="mean"
        ).backward()
        assert b1b.grad.item() == 4.0 and w1b.grad.item() == 4.0


@pytest.mark.parametrize("dtype_name", LOWP)
def test_relu_sign_mask_matches_numpy_at_zero_and_nan(dtype_name, device):
    # h = x @ w1 over [0, -0, -1, 1, nan, -nan]: the forward keeps NaN (np.maximum) and stores
    # -0.0 only where h < 0; the backward blocks exactly there (grad_h[h < 0] = 0).
    dtype = LOWP[dtype_name]
    nan = float("nan")
    x = torch.ones(1, 1, dtype=dtype, device=device, requires_grad=True)
    w1 = torch.tensor(
        [[0.0, -0.0, -1.0, 1.0, nan, -nan]], dtype=dtype, device=device, requires_grad=True
    )
    w2 = torch.ones(6, 1, dtype=dtype, device=device)
    _, act = OPS.two_layer_fwd(x.detach(), w1.detach(), w2, None, None)
    assert torch.signbit(act).tolist() == [[False, False, True, False, False, False]]
    assert act[0, :4].tolist() == [0.0, 0.0, 0.0, 1.0] and act[0, 4:].isnan().all()
    tl.two_layer(x, w1, w2).sum().backward()
    assert w1.grad.tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]]


def test_every_cpu_variant_runs_the_same_low_precision_path():
    t, _ = quantized_problem(torch.bfloat16, (33, 20, 11, 6), True, "cpu")
    results = {}
    for name in tl.CPU_KERNELS:
        if name in tl.CPU_VARIANTS and tl.cpu_kernel_missing(name):
            continue  # this CPU lacks the variant's ISA
        with tl.use_cpu_kernel(name):
            y = tl.two_layer(t["x"], t["w1"], t["w2"], t["b1"], t["b2"])
            loss = OPS.two_layer_l2_loss_fwd(
                t["x"], t["y"], t["w1"], t["w2"], t["b1"], t["b2"], "mean", [True] * 6
            )
        results[name] = (y, *loss)
    first = next(iter(results.values()))
    for name, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, first)), name


# ---- opcheck ---------------------------------------------------------------------------------


def bf16_inputs(device, requires_grad, N=5):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (
        torch.randn(*s, generator=g).to(torch.bfloat16).to(device).requires_grad_(requires_grad)
    )  # noqa: E731
    return mk(N, 4), mk(4, 6), mk(6, 3), mk(6), mk(3)


@pytest.mark.slow  # opcheck: seconds per case
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_bfloat16(device, requires_grad):
    x, w1, w2, b1, b2 = bf16_inputs(device, requires_grad)
    target = torch.randn(5, 3).to(torch.bfloat16).to(device)
    opcheck(OPS.two_layer, (x, w1, w2, b1, b2))
    opcheck(
        OPS.l2_loss,
        (tl.two_layer(x, w1, w2, b1, b2).detach().requires_grad_(requires_grad), target, "mean"),
    )
    opcheck(OPS.two_layer_l2_loss, (x, target, w1, w2, b1, b2, "mean"))
    plain = [t.detach() for t in (x, w1, w2, b1, b2)]
    y, act = OPS.two_layer_fwd(*plain)
    opcheck(OPS.two_layer_fwd, tuple(plain))
    opcheck(OPS.two_layer_bwd, (torch.randn_like(y), plain[0], plain[1], plain[2], act, [True] * 5))
    opcheck(OPS.l2_loss_fwd, (y, target, "sum", True))
    opcheck(OPS.l2_loss_bwd, (torch.tensor(1.5, dtype=torch.bfloat16, device=device), y))
    opcheck(OPS.two_layer_l2_loss_fwd, (plain[0], target, *plain[1:], "sum", [True] * 6))
    opcheck(
        OPS.sgd_step, (plain[0], target, *[w.clone() for w in plain[1:]], 0.01, "mean", [True] * 4)
    )


# ---- autocast --------------------------------------------------------------------------------


def autocast_dtype(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_autocast_runs_in_the_autocast_dtype_like_nn_sequential(bias, device):
    torch.manual_seed(0)
    net = tl.TwoLayerNet(20, 11, 6, bias=bias, device=device)
    seq = net.to_sequential()
    x, target = torch.randn(33, 20, device=device), torch.randn(33, 6, device=device)
    dtype = autocast_dtype(device)
    with torch.autocast(device, dtype=dtype):
        y, y_seq = net(x), seq(x)
        loss, loss_seq = tl.l2_loss(y, target), nn.MSELoss(reduction="sum")(y_seq, target)
        fused = net.loss(x, target, "sum")
    assert y.dtype == y_seq.dtype == dtype
    assert loss.dtype == loss_seq.dtype == torch.float32  # mse_loss's fp32 policy
    assert fused.dtype == torch.float32
    assert net.w1.dtype == torch.float32  # the parameters themselves are untouched


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_autocast_fused_loss_accumulates_in_float32(reduction, device):
    """The fused loss under autocast is nn.MSELoss's: the prediction in the autocast dtype, the
    loss summed in float32 against the float32 target (not rounded to the autocast dtype)."""
    torch.manual_seed(0)
    net = tl.TwoLayerNet(64, 64, 16, device=device)
    x, target = torch.randn(128, 64, device=device), 5 * torch.randn(128, 16, device=device)
    with torch.autocast(device, dtype=autocast_dtype(device)):
        fused, pred = net.loss(x, target, reduction), net(x)
    want = nn.functional.mse_loss(pred.float(), target, reduction=reduction)
    torch.testing.assert_close(fused, want, rtol=1e-6, atol=0)
    if device == "cuda":  # a sum above float16's range stays finite
        with torch.autocast(device, dtype=torch.float16):
            assert torch.isfinite(net.loss(x, 1000 * target, "sum"))


@pytest.mark.parametrize("path", ["two_layer+l2_loss", "fused"])
def test_autocast_gradients_of_float32_parameters_within_bound(path, device):
    dtype = autocast_dtype(device)
    t, e = quantized_problem(torch.float32, SHAPES[0], True, device)
    leaves = {k: t[k].requires_grad_() for k in R.PARAM_NAMES}
    with torch.autocast(device, dtype=dtype), float32_reductions(device):
        if path == "fused":
            loss = tl.two_layer_l2_loss(t["x"], t["y"], *(leaves[k] for k in R.PARAM_NAMES))
        else:
            loss = tl.l2_loss(tl.two_layer(t["x"], *(leaves[k] for k in R.PARAM_NAMES)), t["y"])
    loss.backward()
    _, loss_np, grads, mags, loss_scale = oracle(e, "sum")
    # The casts add one rounding to each input of the longest product (x, w1, w2, target):
    # four more u M on top of the kernels' own.
    c = C + 4
    assert abs(loss.item() - loss_np) <= c * unit_roundoff(dtype) * loss_scale
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == torch.float32, name
        assert_within_bound(leaf.grad, grads[name], mags[name], dtype, f"grad {name}", c=c)


def test_autocast_leaves_float64_and_sgd_step_alone(device):
    net = tl.TwoLayerNet(5, 4, 3, device=device, dtype=torch.float64)
    x = torch.randn(6, 5, device=device, dtype=torch.float64)
    target = torch.randn(6, 3, device=device, dtype=torch.float64)
    w1 = net.w1.detach().clone()
    with torch.autocast(device, dtype=autocast_dtype(device)):
        assert net(x).dtype == torch.float64  # autocast never casts float64, as for nn.Linear
        net.sgd_step(x, target, lr=0.1)  # updates the float64 weights in place
    assert net.w1.dtype == torch.float64 and not torch.equal(net.w1, w1)


# ---- a bfloat16 module -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", LOWP)
def test_module_to_low_precision_trains(dtype_name):
    dtype = LOWP[dtype_name]
    torch.manual_seed(0)
    net = tl.TwoLayerNet(20, 16, 4).to(dtype)
    x, target = torch.randn(64, 20, dtype=dtype), torch.randn(64, 4, dtype=dtype)
    assert net(x).dtype == dtype
    loss = net.loss(x, target, "sum")
    loss.backward()
    assert loss.dtype == dtype and all(p.grad.dtype == dtype for p in net.parameters())
    first = net.sgd_step(x, target, lr=1e-3).item()
    for _ in range(30):
        last = net.sgd_step(x, target, lr=1e-3).item()
    assert all(p.dtype == dtype for p in net.parameters())
    assert last < 0.9 * first, (first, last)
