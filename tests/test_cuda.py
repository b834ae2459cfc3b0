"""CUDA-only checks; the device-generic tests (the `device` fixture) also run on CUDA.

Every dtype against the float64 numpy oracle (float32 with TF32 off and on, float16,
bfloat16, and torch's default reduced-precision settings), through two_layer + l2_loss and
through the fused two_layer_l2_loss; sgd_step likewise, with frozen weights; the fused loss's
output_mask and N-D inputs against the CPU kernels; float16 mean reduction at large n; NaN and
inf in every dtype; opcheck with half types, torch.compile(mode="reduce-overhead"), CUDA graph
capture of sgd_step, mixed-device errors, side streams and a non-default device.
Everything here skips without a GPU and the CUDA build.
"""
import contextlib
import copy

import numpy as np
import pytest
import torch
from torch.library import opcheck

import twolayer_ext as tl
from twolayer_ext import reference as R

from conftest import HAS_CUDA, problem

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
OPS = torch.ops.twolayer_ext

# name: (dtype, TF32 on, reduced-precision fp16/bf16 GEMM reductions allowed, bound on
# max|error| / max|expected| against the float64 oracle). A CPU emulation of the roundings gives
# at most 4e-7 (float32), 6e-4 (TF32, float16) and 4e-3 (bfloat16) on these problems. The
# "-default" ones run as torch ships (reduced-precision reductions allowed), the configuration
# most users have, where the README's "accumulating in float32" must still hold to 1e-2.
PRECISIONS = {
    "float64": (torch.float64, False, False, 1e-10),
    "float32": (torch.float32, False, False, 1e-5),
    "tf32": (torch.float32, True, False, 2e-3),
    "float16": (torch.float16, False, False, 1e-2),
    "bfloat16": (torch.bfloat16, False, False, 1e-2),
    "float16-default": (torch.float16, False, True, 1e-2),
    "bfloat16-default": (torch.bfloat16, False, True, 1e-2),
}
SHAPES = [(257, 129, 65, 17), (64, 1000, 100, 10)]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@contextlib.contextmanager
def matmul_precision(tf32, reduced=False):
    """TF32 on or off for float32 GEMMs; float16/bfloat16 GEMMs reduce in float32 (no
    reduced-precision split-K) unless `reduced`, so the only roundings are those of the dtype."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction,
             m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = tf32
    m.allow_fp16_reduced_precision_reduction = reduced
    m.allow_bf16_reduced_precision_reduction = reduced
    try:
        yield
    finally:
        (m.allow_tf32, m.allow_fp16_reduced_precision_reduction,
         m.allow_bf16_reduced_precision_reduction) = saved


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


# ---- accuracy against the float64 oracle -----------------------------------------------------

@pytest.mark.parametrize("path", ["two_layer+l2_loss", "fused"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_forward_loss_and_gradients_match_float64_oracle(precision, shape, bias, reduction, path):
    dtype, config, tol, t, e = precision_problem(precision, shape, bias)
    leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None}  # target too
    with matmul_precision(*config):
        if path == "fused":
            loss = tl.two_layer_l2_loss(t["x"], t["y"], t["w1"], t["w2"], t["b1"], t["b2"],
                                        reduction=reduction)
        else:
            y = tl.two_layer(t["x"], t["w1"], t["w2"], t["b1"], t["b2"])
            loss = tl.l2_loss(y, t["y"], reduction)
        loss.backward()
    assert loss.dtype == dtype and loss.is_cuda

    h, h_relu, y_np = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    loss_np = R.numpy_loss(y_np, e["y"], reduction)
    grad_y = R.numpy_loss_grad(y_np, e["y"], reduction)
    grads = dict(R.numpy_backward(e["x"], e["w1"], e["w2"], h, h_relu, grad_y), y=-grad_y)
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
    h, h_relu, y_np = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    g = R.numpy_backward(e["x"], e["w1"], e["w2"], h, h_relu,
                         R.numpy_loss_grad(y_np, e["y"], reduction))
    # A step that moves w1 by a fifth of its largest entry: visible in every dtype.
    lr = float(0.2 * np.abs(e["w1"]).max() / np.abs(g["w1"]).max())
    old = {k: e[k] for k in R.PARAM_NAMES}
    new = {k: None if v is None else v.copy() for k, v in old.items()}
    loss_np = R.numpy_sgd_step(e["x"], e["y"], new, lr, reduction)

    with matmul_precision(*config):
        loss = tl.sgd_step(t["x"], t["y"], t["w1"], t["w2"], t["b1"], t["b2"], lr=lr,
                           reduction=reduction)
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


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_relu_mask_is_numpys_at_zero(dtype):
    # h exactly 0 (and -0.0) passes the gradient in the tutorial's backward; h < 0 blocks it.
    x = torch.tensor([[1.0]], dtype=dtype, device="cuda", requires_grad=True)
    w1 = torch.tensor([[0.0, -0.0, -1.0, 1.0]], dtype=dtype, device="cuda", requires_grad=True)
    w2 = torch.ones(4, 1, dtype=dtype, device="cuda", requires_grad=True)
    _, act = OPS.two_layer_fwd(x, w1, w2, None, None)
    assert torch.signbit(act).tolist() == [[False, False, True, False]]
    assert act.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    tl.two_layer(x, w1, w2).sum().backward()
    assert w1.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_nan_and_inf_propagate_like_numpy(dtype):
    # Every value and product here is exact in every dtype, so numpy's float64 is the answer.
    x = np.array([[1.0, np.nan, 0.0], [np.inf, 1.0, 0.0], [-np.inf, 0.0, 1.0], [1.0, 1.0, 1.0]])
    w1 = np.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
    w2 = np.array([[1.0], [-2.0]])
    h, h_relu, y_np = R.numpy_forward(x, w1, w2)
    expected = R.numpy_backward(x, w1, w2, h, h_relu, np.ones_like(y_np))
    xt, w1t, w2t = (torch.tensor(a, device="cuda", dtype=dtype, requires_grad=True)
                    for a in (x, w1, w2))
    with matmul_precision(False):
        y = tl.two_layer(xt, w1t, w2t)
        y.backward(torch.ones_like(y))
    # assert_allclose treats NaN as equal to NaN, and needs Inf where numpy has Inf.
    np.testing.assert_allclose(y.detach().double().cpu().numpy(), y_np, rtol=0)
    np.testing.assert_allclose(w2t.grad.double().cpu().numpy(), expected["w2"], rtol=0)
    np.testing.assert_allclose(xt.grad.double().cpu().numpy(), expected["x"], rtol=0)
    pred = torch.tensor([1.0, np.inf, 2.0], device="cuda", dtype=dtype)
    assert np.isinf(tl.l2_loss(pred, torch.zeros_like(pred)).item())
    pred = torch.tensor([np.nan, 1.0], device="cuda", dtype=dtype)
    assert np.isnan(tl.l2_loss(pred, torch.zeros_like(pred)).item())


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_nan_activation_has_its_sign_bit_cleared(dtype):
    # h = +NaN and -NaN (via the bias, exactly as given): the saved act must hold NaN with the
    # sign bit clear, or the backward would read it as "h < 0" and block a gradient numpy passes.
    nan = torch.tensor(float("nan"), dtype=dtype)
    b1 = torch.stack([nan, -nan, torch.tensor(-1.0, dtype=dtype)]).cuda()
    assert torch.signbit(b1).tolist() == [False, True, True]
    x = torch.ones(1, 1, dtype=dtype, device="cuda")
    w1 = torch.zeros(1, 3, dtype=dtype, device="cuda")
    w2 = torch.ones(3, 1, dtype=dtype, device="cuda")
    _, act = OPS.two_layer_fwd(x, w1, w2, b1, None)
    assert torch.isnan(act[0, :2]).all() and act[0, 2].item() == 0.0
    assert torch.signbit(act).tolist() == [[False, False, True]]
    grads = OPS.two_layer_bwd(torch.ones(1, 1, dtype=dtype, device="cuda"), x, w1, w2, act,
                              [False, False, False, True, False])
    assert grads[3].tolist() == [1.0, 1.0, 0.0]  # grad_b1: only h < 0 blocks it


def test_large_sum_keeps_precision_and_is_deterministic():
    # 4M float32 terms: a naive float32 running sum would be off by ~1e-3 relative.
    n = 1 << 22
    g = torch.Generator().manual_seed(0)
    pred = (torch.full((n,), 1.0) + torch.rand(n, generator=g) * 1e-3).cuda()
    target = torch.zeros(n, device="cuda")
    exact = float((pred.double() ** 2).sum())
    losses = [tl.l2_loss(pred, target) for _ in range(3)]
    assert abs(losses[0].item() - exact) / exact < 1e-6
    assert all(torch.equal(loss, losses[0]) for loss in losses)  # fixed summation order


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empty_batch(dtype, reduction):
    x = torch.empty(0, 5, dtype=dtype, device="cuda", requires_grad=True)
    w1 = torch.randn(5, 4, dtype=dtype, device="cuda", requires_grad=True)
    w2 = torch.randn(4, 3, dtype=dtype, device="cuda", requires_grad=True)
    y = tl.two_layer(x, w1, w2)
    assert y.shape == (0, 3)
    loss = tl.l2_loss(y, torch.empty(0, 3, dtype=dtype, device="cuda"), reduction)
    if reduction == "mean":
        assert np.isnan(loss.item())  # as numpy and nn.MSELoss
    else:
        assert loss.item() == 0.0
        loss.backward()
        assert float(w1.grad.abs().sum()) == 0.0 and float(w2.grad.abs().sum()) == 0.0


def test_float16_mean_reduction_keeps_precision_at_large_n():
    # n = N * D_out = 2^24, as gpu_narrow: (2/n) * d would be ~1e-7 * d, a float16 subnormal
    # two or three steps of 6e-8 wide, so the gradients came out ~15% off. The kernels keep
    # 2 * d and scale by 1/n in float32 (the GEMMs' alpha, the bias sums and updates).
    _, config, tol, t, e = precision_problem("float16", (1 << 20, 16, 16, 16), bias=True, seed=5)
    h, h_relu, y_np = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    g = R.numpy_backward(e["x"], e["w1"], e["w2"], h, h_relu,
                         R.numpy_loss_grad(y_np, e["y"], "mean"))
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


def cpu_and_cuda_args(shape=(9, 7, 5, 3), bias=True, seed=0, lead=None):
    """The same float64 problem on the CPU and on CUDA: (cpu dict, cuda dict) with x, target,
    w1, w2, b1, b2 (x and target reshaped to lead + [D] when `lead` is given)."""
    x, y, params = problem(*shape, bias=bias, seed=seed)
    cpu = dict(x=torch.tensor(x), target=torch.tensor(y),
               **{k: None if v is None else torch.tensor(v) for k, v in params.items()})
    if lead is not None:
        cpu["x"] = cpu["x"].reshape(*lead, shape[1])
        cpu["target"] = cpu["target"].reshape(*lead, shape[3])
    return cpu, {k: None if v is None else v.cuda() for k, v in cpu.items()}


ORDER = ("x", "target", "w1", "w2", "b1", "b2")
MASKS = [[True] * 6, [False] * 6, [False, True, False, False, False, False],
         [True, False, False, True, False, True], [False, False, True, False, True, False]]


def bits(flags):
    return "".join("1" if f else "0" for f in flags)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mask", MASKS, ids=bits)
def test_fused_loss_kernel_matches_cpu(mask, reduction, bias):
    cpu, cuda = cpu_and_cuda_args(bias=bias)
    want = OPS.two_layer_l2_loss_fwd(*(cpu[k] for k in ORDER), reduction, mask)
    got = OPS.two_layer_l2_loss_fwd(*(cuda[k] for k in ORDER), reduction, mask)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-12, atol=0)
    for name, w, g, asked in zip(ORDER, want[1:], got[1:], mask):
        # A gradient comes back exactly when asked for and its tensor is given.
        assert (g is not None) == (asked and cpu[name] is not None), name
        assert (w is None) == (g is None), name
        if g is not None:
            assert g.is_cuda and g.shape == cpu[name].shape, name
            torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12, msg=name)


UPDATES = [[True] * 4, [False, True, False, True], [True, False, True, False], [False] * 4]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("update", UPDATES, ids=bits)
def test_sgd_step_frozen_weights_match_cpu(update, reduction):
    cpu, cuda = cpu_and_cuda_args(seed=1)
    before = {k: cuda[k].clone() for k in R.PARAM_NAMES}
    losses = [OPS.sgd_step(a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"], 0.05,
                           reduction, update) for a in (cpu, cuda)]
    torch.testing.assert_close(losses[1].cpu(), losses[0], rtol=1e-12, atol=0)
    for name, updated in zip(R.PARAM_NAMES, update):
        if updated:
            assert not torch.equal(cuda[name], before[name]), f"{name} did not move"
            torch.testing.assert_close(cuda[name].cpu(), cpu[name], rtol=1e-12, atol=1e-12,
                                       msg=name)
        else:
            assert torch.equal(cuda[name], before[name]), f"{name} is frozen but changed"


def test_frozen_parameters_through_the_module():
    # requires_grad=False freezes a parameter for sgd_step on CUDA as on the CPU.
    torch.manual_seed(0)
    cpu = tl.TwoLayerNet(12, 8, 3, dtype=torch.float64)
    cuda = copy.deepcopy(cpu).cuda()
    for net in (cpu, cuda):
        net.w1.requires_grad_(False)
        net.b2.requires_grad_(False)
    frozen = {k: getattr(cuda, k).clone() for k in ("w1", "b2")}
    x, y = torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    for _ in range(2):
        cpu.sgd_step(x, y, lr=1e-2)
        cuda.sgd_step(x.cuda(), y.cuda(), lr=1e-2)
    for k, v in frozen.items():
        assert torch.equal(getattr(cuda, k), v), k
    for (name, a), b in zip(cpu.named_parameters(), cuda.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12, msg=name)


def test_leading_dimensions_match_cpu():
    # x [*, D_in] is flattened in Python, the same for every device: one case suffices.
    cpu, cuda = cpu_and_cuda_args(shape=(12, 7, 5, 3), lead=(2, 3, 2))
    want = tl.two_layer(cpu["x"], cpu["w1"], cpu["w2"], cpu["b1"], cpu["b2"])
    got = tl.two_layer(cuda["x"], cuda["w1"], cuda["w2"], cuda["b1"], cuda["b2"])
    assert got.shape == want.shape == (2, 3, 2, 3)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    for a in (cpu, cuda):
        a["fused"] = tl.two_layer_l2_loss(a["x"], a["target"], a["w1"], a["w2"], a["b1"],
                                          a["b2"], reduction="mean")
        a["step"] = tl.sgd_step(a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"],
                                lr=0.1, reduction="mean")
    for k in ("fused", "step", "w1", "w2", "b1", "b2"):
        torch.testing.assert_close(cuda[k].cpu(), cpu[k], rtol=1e-12, atol=1e-12, msg=k)


def test_bad_reduction_names_the_op():
    _, a = cpu_and_cuda_args()
    calls = {
        "sgd_step": lambda: OPS.sgd_step(a["x"], a["target"], a["w1"], a["w2"], a["b1"],
                                         a["b2"], 0.1, "avg", [True] * 4),
        "two_layer_l2_loss": lambda: OPS.two_layer_l2_loss_fwd(
            *(a[k] for k in ORDER), "avg", [True] * 6),
        "l2_loss": lambda: OPS.l2_loss_fwd(a["target"], a["target"], "avg", True),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf'^{name}: reduction must be "sum" or "mean", got "avg"'):
            call()


# ---- opcheck, torch.compile, CUDA graphs --------------------------------------------------

def opcheck_inputs(dtype, bias, requires_grad, N=5):
    g = torch.Generator().manual_seed(0)

    def make(*shape):
        return (torch.randn(*shape, generator=g).to(dtype).cuda()
                .requires_grad_(requires_grad))
    x, w1, w2 = make(N, 4), make(4, 6), make(6, 3)
    b1, b2 = (make(6), make(3)) if bias else (None, None)
    return x, w1, w2, b1, b2


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_opcheck_every_op(dtype, requires_grad):
    x, w1, w2, b1, b2 = opcheck_inputs(dtype, True, requires_grad)
    opcheck(OPS.two_layer_fwd, (x, w1, w2, b1, b2))
    opcheck(OPS.two_layer_fwd, (x, w1, w2, None, None))
    _, act = OPS.two_layer_fwd(x, w1, w2, b1, b2)
    grad_y = torch.randn(5, 3, device="cuda").to(dtype)
    # (x, w1, w2, b1, b2): everything, the weights alone, nothing
    for mask in ([True] * 5, [False, True, True, False, False], [False] * 5):
        opcheck(OPS.two_layer_bwd, (grad_y, x.detach(), w1.detach(), w2.detach(), act, mask))
    pred = torch.randn(5, 3, device="cuda").to(dtype).requires_grad_(requires_grad)
    target = torch.randn(5, 3, device="cuda").to(dtype)
    for reduction in ("sum", "mean"):
        opcheck(OPS.l2_loss_fwd, (pred, target, reduction, requires_grad))
        opcheck(OPS.two_layer_l2_loss, (x, target, w1, w2, b1, b2, reduction))
    opcheck(OPS.l2_loss_bwd, (torch.tensor(1.5, device="cuda").to(dtype), grad_y))
    for mask in MASKS:
        opcheck(OPS.two_layer_l2_loss_fwd, (x.detach(), target, w1.detach(), w2.detach(),
                                            b1.detach(), b2.detach(), "mean", mask))
    for update in UPDATES:
        w1c, w2c, b1c, b2c = (t.detach().clone() for t in (w1, w2, b1, b2))
        opcheck(OPS.sgd_step, (x.detach(), target, w1c, w2c, b1c, b2c, 1e-2, "mean", update))


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_reduce_overhead_training_matches_eager(bias):
    torch.manual_seed(0)
    eager = tl.TwoLayerNet(64, 32, 8, bias=bias, device="cuda")
    compiled = copy.deepcopy(eager)
    x, y = torch.randn(128, 64, device="cuda"), torch.randn(128, 8, device="cuda")
    loss_fn = torch.compile(lambda x, y: tl.l2_loss(compiled(x), y, "mean"),
                            mode="reduce-overhead", fullgraph=True)
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
    step = torch.compile(lambda: net.sgd_step(x, y, lr=1e-3), mode="reduce-overhead",
                         fullgraph=True)
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
        a.update(act=act, grad_y=torch.ones(6, 3, device="cuda:0"),
                 grad_loss=torch.tensor(1.0, device="cuda:0"))
        a[moved] = a[moved].cpu()
        calls = {
            "two_layer": lambda: tl.two_layer(a["x"], a["w1"], a["w2"], a["b1"], a["b2"]),
            "l2_loss": lambda: tl.l2_loss(a["grad_y"], a["target"]),
            "two_layer_l2_loss": lambda: tl.two_layer_l2_loss(
                a["x"], a["target"], a["w1"], a["w2"], a["b1"], a["b2"]),
            "sgd_step": lambda: tl.sgd_step(a["x"], a["target"], a["w1"], a["w2"], a["b1"],
                                            a["b2"], lr=0.1),
            "two_layer_bwd": lambda: OPS.two_layer_bwd(a["grad_y"], a["x"], a["w1"], a["w2"],
                                                       a["act"], [True] * 5),
            "l2_loss_bwd": lambda: OPS.l2_loss_bwd(a["grad_loss"], a["grad_y"]),
        }
        with pytest.raises(RuntimeError, match=msg):
            calls[call]()


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
