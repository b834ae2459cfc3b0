"""CUDA-only checks; the device-generic tests (the `device` fixture) also run on CUDA.

Every dtype against the float64 numpy oracle (float32 with TF32 off and on, float16,
bfloat16), sgd_step likewise, opcheck with half types, torch.compile(mode="reduce-overhead"),
CUDA graph capture of sgd_step, mixed-device errors, side streams and a non-default device.
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

# name: (dtype, TF32 on, bound on max|error| / max|expected| against the float64 oracle).
# A CPU emulation of the roundings gives at most 4e-7 (float32), 6e-4 (TF32, float16) and
# 4e-3 (bfloat16) on these problems.
PRECISIONS = {
    "float64": (torch.float64, False, 1e-10),
    "float32": (torch.float32, False, 1e-5),
    "tf32": (torch.float32, True, 2e-3),
    "float16": (torch.float16, False, 1e-2),
    "bfloat16": (torch.bfloat16, False, 1e-2),
}
SHAPES = [(257, 129, 65, 17), (64, 1000, 100, 10)]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@contextlib.contextmanager
def matmul_precision(tf32):
    """TF32 on or off for float32 GEMMs; float16/bfloat16 GEMMs reduce in float32 (no
    reduced-precision split-K), so the only roundings are those of the dtype itself."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction,
             m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = tf32
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (m.allow_tf32, m.allow_fp16_reduced_precision_reduction,
         m.allow_bf16_reduced_precision_reduction) = saved


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
    """(dtype, tol, cuda tensors, float64 numpy arrays of the same values)."""
    dtype, tf32, tol = PRECISIONS[name]
    x, y, params = problem(*shape, bias=bias, seed=seed)
    arrays = dict(params, x=x, y=y)
    cuda = {k: None if v is None else quantize(v, dtype, tf32).cuda() for k, v in arrays.items()}
    exact = {k: None if v is None else v.double().cpu().numpy().copy() for k, v in cuda.items()}
    return dtype, tf32, tol, cuda, exact


# ---- accuracy against the float64 oracle -----------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_forward_loss_and_gradients_match_float64_oracle(precision, shape, bias, reduction):
    dtype, tf32, tol, t, e = precision_problem(precision, shape, bias)
    leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None and k != "y"}
    with matmul_precision(tf32):
        y = tl.two_layer(t["x"], t["w1"], t["w2"], t["b1"], t["b2"])
        loss = tl.l2_loss(y, t["y"], reduction)
        loss.backward()
    assert y.dtype == dtype and loss.dtype == dtype and y.is_cuda

    h, h_relu, y_np = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    loss_np = R.numpy_loss(y_np, e["y"], reduction)
    grads = R.numpy_backward(e["x"], e["w1"], e["w2"], h, h_relu,
                             R.numpy_loss_grad(y_np, e["y"], reduction))
    assert rel_err(y, y_np) < tol, "y"
    assert abs(loss.item() - loss_np) / loss_np < tol, "loss"
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == dtype
        assert rel_err(leaf.grad, grads[name]) < tol, name


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_sgd_step_matches_float64_oracle(precision, bias, reduction):
    dtype, tf32, tol, t, e = precision_problem(precision, SHAPES[0], bias, seed=3)
    h, h_relu, y_np = R.numpy_forward(e["x"], e["w1"], e["w2"], e["b1"], e["b2"])
    g = R.numpy_backward(e["x"], e["w1"], e["w2"], h, h_relu,
                         R.numpy_loss_grad(y_np, e["y"], reduction))
    # A step that moves w1 by a fifth of its largest entry: visible in every dtype.
    lr = float(0.2 * np.abs(e["w1"]).max() / np.abs(g["w1"]).max())
    old = {k: e[k] for k in R.PARAM_NAMES}
    new = {k: None if v is None else v.copy() for k, v in old.items()}
    loss_np = R.numpy_sgd_step(e["x"], e["y"], new, lr, reduction)

    with matmul_precision(tf32):
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


def test_nan_and_inf_propagate_like_numpy():
    x = np.array([[1.0, np.nan, 0.0], [np.inf, 1.0, 0.0], [-np.inf, 0.0, 1.0], [1.0, 1.0, 1.0]])
    w1 = np.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
    w2 = np.array([[1.0], [-2.0]])
    h, h_relu, y_np = R.numpy_forward(x, w1, w2)
    expected = R.numpy_backward(x, w1, w2, h, h_relu, np.ones_like(y_np))
    xt, w1t, w2t = (torch.tensor(a, device="cuda", requires_grad=True) for a in (x, w1, w2))
    y = tl.two_layer(xt, w1t, w2t)
    y.backward(torch.ones_like(y))
    # assert_allclose treats NaN as equal to NaN, and needs Inf where numpy has Inf.
    np.testing.assert_allclose(y.detach().cpu().numpy(), y_np, rtol=1e-12)
    np.testing.assert_allclose(w2t.grad.cpu().numpy(), expected["w2"], rtol=1e-12)
    np.testing.assert_allclose(xt.grad.cpu().numpy(), expected["x"], rtol=1e-12)
    pred = torch.tensor([1.0, np.inf, 2.0], device="cuda")
    assert np.isinf(tl.l2_loss(pred, torch.zeros(3, device="cuda")).item())
    assert np.isnan(tl.l2_loss(torch.tensor([np.nan, 1.0], device="cuda"),
                               torch.zeros(2, device="cuda")).item())


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
    for mask in ([True] * 5, [False, True, False, True, False], [False] * 5):
        opcheck(OPS.two_layer_bwd, (grad_y, x.detach(), w1.detach(), w2.detach(), act, mask))
    pred = torch.randn(5, 3, device="cuda").to(dtype).requires_grad_(requires_grad)
    target = torch.randn(5, 3, device="cuda").to(dtype)
    for reduction in ("sum", "mean"):
        opcheck(OPS.l2_loss_fwd, (pred, target, reduction, requires_grad))
    opcheck(OPS.l2_loss_bwd, (torch.tensor(1.5, device="cuda").to(dtype), grad_y))
    w1c, w2c, b1c, b2c = (t.detach().clone() for t in (w1, w2, b1, b2))
    opcheck(OPS.sgd_step, (x.detach(), target, w1c, w2c, b1c, b2c, 1e-2, "mean"))


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
            "sgd_step": lambda: tl.sgd_step(a["x"], a["target"], a["w1"], a["w2"], a["b1"],
                                            a["b2"], lr=0.1),
            "two_layer_bwd": lambda: OPS.two_layer_bwd(a["grad_y"], a["x"], a["w1"], a["w2"],
                                                       a["act"], [True] * 5),
            "l2_loss_bwd": lambda: OPS.l2_loss_bwd(a["grad_loss"], a["grad_y"]),
        }
        with pytest.raises(RuntimeError, match=msg):
            calls[call]()


def test_unsupported_dtype_on_cuda_is_a_type_error():
    x = torch.ones(4, 3, dtype=torch.int32, device="cuda")
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16 on CUDA"):
        tl.two_layer(x, x.t().contiguous(), x.t().contiguous())


def test_ops_follow_the_current_stream():
    a = two_layer_args("cuda")
    want = tl.two_layer(a["x"], a["w1"], a["w2"], a["b1"], a["b2"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = tl.two_layer(a["x"], a["w1"], a["w2"], a["b1"], a["b2"])
        loss = tl.l2_loss(got, want)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loss.item() == 0.0


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
