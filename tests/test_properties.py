"""Property-based tests (hypothesis): random sizes (0 and 1 included), dtypes, bias on/off,
layouts (contiguous, transposed, sliced with steps and an offset, stride-0 expanded where the op
reads the tensor only) and value ranges (tiny, huge, mixed magnitudes, one sign, small integers),
every result compared with the numpy oracle (twolayer_ext.reference) run in float64 on the very
values the op was given.

Tolerance: an error bound, not a guess. For a result r computed from products and sums of the
inputs, |r - r64| <= gamma * M where M is the same computation on absolute values (|x| @ |w1| ...)
and gamma = C * eps(dtype) * (number of terms summed along the chain + a few). That is the
classic floating-point bound for dot products; it stays meaningful under cancellation and across
scales from 1e-10 to 1e10 (float32) or 1e-100 to 1e100 (float64), where a fixed rtol/atol would be
either useless or wrong.

Cases are derandomized (settings.derandomize=True): every `make test` runs the same cases, so a CI
failure reproduces locally, bit for bit, and never appears out of the blue. For exploration set
TWOLAYER_HYPOTHESIS=explore (random seeds, 10x the examples). The number of cases run is checked
(>= 2000 over the module) and printed at the end of the module.
"""

import functools
import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")  # `make test` installs it; a bare GPU machine may not have it
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import twolayer_ext as tl
from twolayer_ext import reference as R

pytestmark = [
    pytest.mark.filterwarnings(  # numpy's mean of an empty array (N = 0, "mean")
        "ignore:Mean of empty slice:RuntimeWarning",
        "ignore:invalid value encountered:RuntimeWarning",
    ),
    pytest.mark.slow,  # thousands of cases: a minute or more
]

EXPLORE = os.environ.get("TWOLAYER_HYPOTHESIS", "") == "explore"
SCALE = 10 if EXPLORE else 1
if os.environ.get("TWOLAYER_SANITIZE"):  # the sanitizer run checks memory, not numerics breadth
    SCALE = 0.2

EXAMPLES = {  # per property; the sum is the per-run case count (>= 2000)
    "two_layer_forward": 550,
    "two_layer_backward": 500,
    "l2_loss": 450,
    "sgd_step": 400,
    "raw_ops": 250,
}
MIN_CASES = 2000


def _settings(name):
    return settings(
        max_examples=max(1, int(EXAMPLES[name] * SCALE)),
        deadline=None,  # shared 2-core machine: per-example timing is noise
        derandomize=not EXPLORE,  # same cases every run: reproducible in CI
        database=None,  # nothing written to the tree (.hypothesis/)
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


CASES = {name: 0 for name in EXAMPLES}


def _counted(name):
    """Counts the cases that ran to the end (not those hypothesis rejected with assume)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            CASES[name] += 1
            return out

        return wrapper

    return deco


_T0 = time.perf_counter()


@pytest.fixture(scope="module", autouse=True)
def _report_case_count(request):
    yield
    total = sum(CASES.values())
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None and total:
        with capman.global_and_fixture_disabled():
            tr.write_line(
                f"\ntest_properties: {total} hypothesis cases in "
                f"{time.perf_counter() - _T0:.1f} s ({CASES})"
            )


DTYPES = {"float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}
# Per-tensor scales as powers of ten; the op's result scale is their product, kept inside the
# dtype's normal range (and its square inside it where a loss is taken).
EXPONENTS = {
    "float32": [-10, -4, -1, 0, 0, 0, 1, 4, 10],
    "float64": [-90, -12, -1, 0, 0, 0, 1, 12, 90],
}
LIMIT = {"float32": 24, "float64": 250}  # |sum of exponents| of a product
LOSS_LIMIT = {"float32": 10, "float64": 120}  # ... of a value that gets squared

sizes = st.one_of(st.sampled_from([0, 1, 1, 2, 3]), st.integers(0, 9), st.integers(10, 40))


# ---- building tensors with a chosen layout and value distribution ---------------------------


def _values(rng, shape, mode, exponent, np_dtype):
    if mode == "ints":  # exact arithmetic: ties at ReLU's 0, exact zeros, cancellations
        v = rng.integers(-3, 4, size=shape).astype(np.float64)
    elif mode == "mixed":  # magnitudes spread over 6 decades, mixed signs
        v = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, size=shape)
    elif mode == "pos":
        v = np.abs(rng.standard_normal(shape)) + 0.1
    elif mode == "neg":
        v = -(np.abs(rng.standard_normal(shape)) + 0.1)
    else:  # "normal"
        v = rng.standard_normal(shape)
    scale = 1.0 if mode == "ints" else 10.0**exponent
    return np.asarray(v * scale).astype(np_dtype)


def _make(
    data, rng, shape, dtype, *, exponent=0, allow_expand=True, allow_slice=True, mode=None, label=""
):
    """A tensor of `shape` and `dtype` with a drawn layout and values; returns (tensor, float64
    numpy copy of exactly its values)."""
    torch_dtype, np_dtype = DTYPES[dtype]
    if mode is None:
        mode = data.draw(
            st.sampled_from(["normal", "normal", "mixed", "pos", "neg", "ints"]),
            label=f"{label}.mode",
        )
    layouts = ["contig", "contig"] + (["sliced"] if allow_slice else [])
    if len(shape) == 2:
        layouts.append("transposed")
    if allow_expand and len(shape) >= 1:
        layouts.append("expanded")
    layout = data.draw(st.sampled_from(layouts), label=f"{label}.layout")
    if layout == "expanded":
        # stride 0 along a drawn non-empty set of dims (values constant along them)
        dims = data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1), label=f"{label}.dims")
        base_shape = tuple(1 if i in dims else s for i, s in enumerate(shape))
        base = _values(rng, base_shape, mode, exponent, np_dtype)
        t = torch.from_numpy(base.copy()).to(torch_dtype).expand(*shape)
        assert 0 in t.stride() or t.numel() <= 1 or any(s == 1 for s in base_shape)
    else:
        v = _values(rng, shape, mode, exponent, np_dtype)
        if layout == "transposed":
            t = torch.from_numpy(np.ascontiguousarray(v.T)).to(torch_dtype).t()
        elif layout == "sliced":
            steps = [
                data.draw(st.integers(1, 3), label=f"{label}.step{i}") for i in range(len(shape))
            ]
            off = [data.draw(st.integers(0, 2), label=f"{label}.off{i}") for i in range(len(shape))]
            big = torch.full(
                [o + s * max(n, 1) for o, s, n in zip(off, steps, shape)],
                float("nan"),
                dtype=torch_dtype,
            )  # NaN padding: a wrong read shows
            idx = tuple(slice(o, o + s * n, s) for o, s, n in zip(off, steps, shape))
            big[idx] = torch.from_numpy(v).to(torch_dtype)
            t = big[idx]
        else:
            t = torch.from_numpy(v.copy()).to(torch_dtype)
    assert tuple(t.shape) == tuple(shape)
    return t, t.detach().to(torch.float64).numpy().copy()


def _draw_exponents(data, dtype, k, limit, label):
    es = []
    for i in range(k):
        choices = [e for e in EXPONENTS[dtype] if abs(sum(es) + e) <= limit] or [0]
        es.append(data.draw(st.sampled_from(choices), label=f"{label}{i}"))
    return es


def _gamma(dtype, terms, c=4.0):
    return c * float(np.finfo(DTYPES[dtype][1]).eps) * (terms + 4)


def _assert_within(actual, expected, magnitude, gamma, what, tiny):
    actual = (
        actual.detach().to(torch.float64).numpy() if isinstance(actual, torch.Tensor) else actual
    )
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bound = gamma * np.asarray(magnitude, np.float64) + tiny
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    if bad.any():
        i = np.argwhere(bad)[0]
        i = tuple(i) if i.size else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements out of bound; first at {i}: "
            f"got {actual[i]!r}, oracle {expected[i]!r}, |err| {err[i]:.3e} > bound {bound[i]:.3e}"
        )


def _representable(dtype, *magnitudes):
    """Skip draws whose exact results would overflow the dtype (that is not what is tested here;
    overflow to inf is covered in test_inputs.py). Rare by construction of the exponents."""
    top = float(np.finfo(DTYPES[dtype][1]).max) * 1e-4
    return all(np.asarray(m).size == 0 or float(np.max(m)) < top for m in magnitudes)


def _tiny(dtype):
    # Below the smallest normal number results may be subnormal or flushed to zero.
    return 64 * float(np.finfo(DTYPES[dtype][1]).tiny)


def _magnitudes(x, w1, w2, b1, b2):
    """Forward on absolute values: the bound's scale for h and y."""
    ax, aw1, aw2 = np.abs(x), np.abs(w1), np.abs(w2)
    mh = ax.dot(aw1) + (np.abs(b1) if b1 is not None else 0.0)
    my = mh.dot(aw2) + (np.abs(b2) if b2 is not None else 0.0)
    return mh, my


def _relu_ambiguous(h, mh, gamma):
    """True where the sign of h is within rounding: our kernel and the oracle may then take
    different ReLU branches, legitimately (the backward differs by a whole gradient term)."""
    return bool(np.any((np.abs(h) <= 4 * gamma * mh) & (mh > 0)))


def _draw_problem(data, *, allow_expand_weights=True, allow_slice_weights=True, loss_limit=False):
    _draw_kernel(data)
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dtype")
    N, D_in, H, D_out = (data.draw(sizes, label=n) for n in ("N", "D_in", "H", "D_out"))
    bias1, bias2 = data.draw(st.booleans(), label="b1"), data.draw(st.booleans(), label="b2")
    limit = (LOSS_LIMIT if loss_limit else LIMIT)[dtype]
    ex, e1, e2 = _draw_exponents(data, dtype, 3, limit, "exp")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    x = _make(data, rng, (N, D_in), dtype, exponent=ex, label="x")
    w1 = _make(
        data,
        rng,
        (D_in, H),
        dtype,
        exponent=e1,
        allow_expand=allow_expand_weights,
        allow_slice=allow_slice_weights,
        label="w1",
    )
    w2 = _make(
        data,
        rng,
        (H, D_out),
        dtype,
        exponent=e2,
        allow_expand=allow_expand_weights,
        allow_slice=allow_slice_weights,
        label="w2",
    )
    b1 = (
        _make(
            data,
            rng,
            (H,),
            dtype,
            exponent=ex + e1,
            allow_expand=allow_expand_weights,
            allow_slice=allow_slice_weights,
            label="b1",
        )
        if bias1
        else (None, None)
    )
    b2 = (
        _make(
            data,
            rng,
            (D_out,),
            dtype,
            exponent=ex + e1 + e2,
            allow_expand=allow_expand_weights,
            allow_slice=allow_slice_weights,
            label="b2",
        )
        if bias2
        else (None, None)
    )
    return dtype, (N, D_in, H, D_out), (x, w1, w2, b1, b2), rng, ex + e1 + e2


# Every variant this CPU runs, and the "auto" policy.
KERNELS = ("auto",) + tuple(k for k in tl.CPU_VARIANTS if not tl.cpu_kernel_missing(k))


def _draw_kernel(data):
    """Each case also draws the CPU kernel variant: same cost, every variant covered."""
    tl.set_cpu_kernel(data.draw(st.sampled_from(KERNELS), label="cpu_kernel"))


@pytest.fixture(scope="module", autouse=True)
def _restore_kernel():
    before = tl.set_cpu_kernel("auto")
    tl.set_cpu_kernel(before)
    yield
    tl.set_cpu_kernel(before)


# ---- properties -------------------------------------------------------------------------------


@_settings("two_layer_forward")
@given(data=st.data())
@_counted("two_layer_forward")
def test_two_layer_forward_matches_numpy(data):
    dtype, (N, D_in, H, D_out), args, _, _ = _draw_problem(data)
    (x, xn), (w1, w1n), (w2, w2n), (b1, b1n), (b2, b2n) = args
    y = tl.two_layer(x, w1, w2, b1, b2)
    assert y.dtype == x.dtype and tuple(y.shape) == (N, D_out) and not y.requires_grad
    _, _, y_np = R.numpy_forward(xn, w1n, w2n, b1n, b2n)
    _, my = _magnitudes(xn, w1n, w2n, b1n, b2n)
    assume(_representable(dtype, my))
    _assert_within(y, y_np, my, _gamma(dtype, D_in + H), "y", _tiny(dtype))
    # The op itself returns the same y.
    y_op, _ = torch.ops.twolayer_ext.two_layer_fwd(x, w1, w2, b1, b2)
    assert torch.equal(y_op, y) or (torch.isnan(y).any() and torch.equal(y_op.isnan(), y.isnan()))


@_settings("two_layer_backward")
@given(data=st.data())
@_counted("two_layer_backward")
def test_two_layer_backward_matches_numpy(data):
    dtype, (N, D_in, H, D_out), args, rng, e_y = _draw_problem(data)
    (x, xn), (w1, w1n), (w2, w2n), (b1, b1n), (b2, b2n) = args
    # Upstream gradient: any layout, stride 0 included (y.sum().backward() gives one).
    e_g = data.draw(
        st.sampled_from([e for e in EXPONENTS[dtype] if abs(e) <= LIMIT[dtype] // 3]), label="exp_g"
    )
    g, gn = _make(data, rng, (N, D_out), dtype, exponent=e_g, label="g")
    h, h_relu, y_np = R.numpy_forward(xn, w1n, w2n, b1n, b2n)
    mh, my = _magnitudes(xn, w1n, w2n, b1n, b2n)
    terms = N + D_in + H + D_out
    gamma = _gamma(dtype, terms)
    exact = all(np.all(a == np.round(a)) for a in (xn, w1n, w2n, gn)) and (
        b1n is None or np.all(b1n == np.round(b1n))
    )
    assume(exact or not _relu_ambiguous(h, mh, gamma))
    # Which inputs want a gradient is drawn too (the op computes only those).
    wanted = data.draw(st.lists(st.booleans(), min_size=5, max_size=5), label="requires_grad")
    leaves = []
    for t, want in zip((x, w1, w2, b1, b2), wanted):
        if t is None:
            leaves.append(None)
            continue
        leaf = t.detach().requires_grad_(want)
        leaves.append(leaf)
    y = tl.two_layer(*leaves)
    inputs = [t for t in leaves if t is not None and t.requires_grad]
    if not inputs:
        assert not y.requires_grad
        return
    grads = torch.autograd.grad(y, inputs, g)
    expected = R.numpy_backward(xn, w1n, w2n, h, h_relu, gn)
    ag, aw1, aw2 = np.abs(gn), np.abs(w1n), np.abs(w2n)
    m_gh = ag.dot(aw2.T)  # |grad_h| bound
    magnitude = {
        "x": m_gh.dot(aw1.T),
        "w1": np.abs(xn).T.dot(m_gh),
        "b1": m_gh.sum(axis=0),
        "w2": mh.T.dot(ag),
        "b2": ag.sum(axis=0),
    }
    assume(_representable(dtype, my, *magnitude.values()))
    tiny = _tiny(dtype) * (terms + 1)
    got = dict(
        zip(
            [
                n
                for n, t in zip(("x", "w1", "w2", "b1", "b2"), leaves)
                if t is not None and t.requires_grad
            ],
            grads,
        )
    )
    for name, grad in got.items():
        assert grad.dtype == x.dtype
        _assert_within(grad, expected[name], magnitude[name], gamma, f"grad_{name}", tiny)


@_settings("l2_loss")
@given(data=st.data())
@_counted("l2_loss")
def test_l2_loss_and_grad_match_numpy(data):
    _draw_kernel(data)
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dtype")
    shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=0, max_size=3), label="shape"))
    if data.draw(st.booleans(), label="long"):
        shape = (data.draw(st.integers(0, 5000), label="n"),)  # crosses any chunk/lane width
    reduction = data.draw(st.sampled_from(["sum", "mean"]), label="reduction")
    e = data.draw(
        st.sampled_from([v for v in EXPONENTS[dtype] if abs(v) <= LOSS_LIMIT[dtype]]), label="exp"
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    same = data.draw(st.booleans(), label="target_same_mode")
    p, pn = _make(data, rng, shape, dtype, exponent=e, label="pred")
    t, tn = _make(
        data,
        rng,
        shape,
        dtype,
        exponent=e,
        label="target",
        mode="ints" if same and data.draw(st.booleans(), label="ints") else None,
    )
    n = int(np.prod(shape)) if shape else 1
    want_grad = data.draw(st.booleans(), label="requires_grad")
    leaf = p.detach().requires_grad_(want_grad)
    loss = tl.l2_loss(leaf, t, reduction)
    assert loss.shape == () and loss.dtype == p.dtype
    expected = R.numpy_loss(pn, tn, reduction)
    scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
    magnitude = np.square(np.abs(pn) + np.abs(tn)).sum() * scale
    assume(_representable(dtype, magnitude))
    if n == 0 and reduction == "mean":
        assert torch.isnan(loss)  # mean of nothing is NaN, as numpy and MSELoss
    else:
        _assert_within(loss, expected, magnitude, _gamma(dtype, n), "loss", _tiny(dtype))
    if not want_grad:
        return
    grad_out = data.draw(st.sampled_from([1.0, -0.5, 3.0]), label="grad_loss")
    (grad,) = torch.autograd.grad(loss, leaf, torch.tensor(grad_out, dtype=p.dtype))
    expected_grad = R.numpy_loss_grad(pn, tn, reduction) * grad_out if n else np.zeros(shape)
    mag_grad = 2 * (np.abs(pn) + np.abs(tn)) * abs(grad_out) * scale
    _assert_within(grad, expected_grad, mag_grad, _gamma(dtype, 2), "grad_pred", _tiny(dtype))


@_settings("sgd_step")
@given(data=st.data())
@_counted("sgd_step")
def test_sgd_step_matches_numpy(data):
    dtype, (N, D_in, H, D_out), args, rng, e_y = _draw_problem(
        data, allow_expand_weights=False, loss_limit=True
    )
    (x, xn), (w1, w1n), (w2, w2n), (b1, b1n), (b2, b2n) = args
    reduction = data.draw(st.sampled_from(["sum", "mean"]), label="reduction")
    t, tn = _make(data, rng, (N, D_out), dtype, exponent=e_y, label="target")
    h, h_relu, y_np = R.numpy_forward(xn, w1n, w2n, b1n, b2n)
    mh, my = _magnitudes(xn, w1n, w2n, b1n, b2n)
    terms = N + D_in + H + D_out
    gamma = _gamma(dtype, terms, c=8.0)
    exact = all(np.all(a == np.round(a)) for a in (xn, w1n, w2n, tn)) and (
        b1n is None or np.all(b1n == np.round(b1n))
    )
    assume(exact or not _relu_ambiguous(h, mh, gamma))
    # lr scaled so the update is of the weights' order or smaller (any lr >= 0 is legal)
    lr = data.draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]), label="lr")
    n = N * D_out
    scale = 1.0 / n if (reduction == "mean" and n) else 1.0
    m_d = my + np.abs(tn)  # |y - t| bound
    m_g = 2 * m_d * scale  # |grad_y| bound
    m_gh = m_g.dot(np.abs(w2n).T)
    magnitude = {
        "w1": np.abs(xn).T.dot(m_gh),
        "b1": m_gh.sum(axis=0),
        "w2": mh.T.dot(m_g),
        "b2": m_g.sum(axis=0),
    }
    assume(
        _representable(
            dtype,
            np.square(m_d).sum(),
            *(lr * m for m in magnitude.values()),
            *(
                np.abs(w.detach().double().numpy()) + lr * magnitude[k]
                for k, w in (("w1", w1), ("w2", w2))
            ),
        )
    )
    params = {
        "w1": w1n.copy(),
        "w2": w2n.copy(),
        "b1": None if b1n is None else b1n.copy(),
        "b2": None if b2n is None else b2n.copy(),
    }
    expected_loss = R.numpy_sgd_step(xn, tn, params, lr, reduction)
    ptrs = [w.data_ptr() for w in (w1, w2, b1, b2) if w is not None]
    strides = [w.stride() for w in (w1, w2, b1, b2) if w is not None]
    x_before, t_before = x.clone(), t.clone()
    loss = tl.sgd_step(x, t, w1, w2, b1, b2, lr=lr, reduction=reduction)
    # in place: same storage, same strides; read-only inputs untouched
    assert [w.data_ptr() for w in (w1, w2, b1, b2) if w is not None] == ptrs
    assert [w.stride() for w in (w1, w2, b1, b2) if w is not None] == strides
    assert torch.equal(x, x_before) and torch.equal(t, t_before)
    if n == 0 and reduction == "mean":
        assert torch.isnan(loss)
        return  # NaN gradients by definition (0/0): the weights go NaN, as in numpy
    _assert_within(loss, expected_loss, np.square(m_d).sum() * scale, gamma, "loss", _tiny(dtype))
    tiny = _tiny(dtype) * (terms + 1) * max(lr, 1.0)
    for name, w, w0 in (("w1", w1, w1n), ("w2", w2, w2n), ("b1", b1, b1n), ("b2", b2, b2n)):
        if w is None:
            continue
        bound_mag = np.abs(w0) + lr * magnitude[name]
        _assert_within(w, params[name], bound_mag, gamma, f"updated {name}", tiny)


@_settings("raw_ops")
@given(data=st.data())
@_counted("raw_ops")
def test_raw_ops_match_numpy(data):
    """torch.ops.twolayer_ext.* directly: two_layer_bwd with every output_mask, l2_loss_fwd with
    and without the gradient, l2_loss_bwd."""
    ops = torch.ops.twolayer_ext
    dtype, (N, D_in, H, D_out), args, rng, _ = _draw_problem(data)
    (x, xn), (w1, w1n), (w2, w2n), (b1, b1n), (b2, b2n) = args
    h, h_relu, y_np = R.numpy_forward(xn, w1n, w2n, b1n, b2n)
    mh, my = _magnitudes(xn, w1n, w2n, b1n, b2n)
    terms = N + D_in + H + D_out
    gamma = _gamma(dtype, terms)
    assume(
        not _relu_ambiguous(h, mh, gamma)
        or all(np.all(a == np.round(a)) for a in (xn, w1n, w2n))
        and b1n is None
    )
    g, gn = _make(data, rng, (N, D_out), dtype, label="g")
    ag = np.abs(gn)
    m_gh = ag.dot(np.abs(w2n).T)
    magnitude = {
        "x": m_gh.dot(np.abs(w1n).T),
        "w1": np.abs(xn).T.dot(m_gh),
        "b1": m_gh.sum(axis=0),
        "w2": mh.T.dot(ag),
        "b2": ag.sum(axis=0),
    }
    assume(_representable(dtype, my, *magnitude.values(), np.square(ag).sum()))
    y, act = ops.two_layer_fwd(x, w1, w2, b1, b2)
    _assert_within(y, y_np, my, gamma, "two_layer_fwd y", _tiny(dtype))
    mask = data.draw(st.lists(st.booleans(), min_size=5, max_size=5), label="output_mask")
    gx, gw1, gw2, gb1, gb2 = ops.two_layer_bwd(g, x, w1, w2, act, mask)
    expected = R.numpy_backward(xn, w1n, w2n, h, h_relu, gn)
    tiny = _tiny(dtype) * (terms + 1)
    for name, want, got in zip(("x", "w1", "w2", "b1", "b2"), mask, (gx, gw1, gw2, gb1, gb2)):
        if not want:
            assert got is None, f"grad_{name} computed though output_mask said no"
        else:
            _assert_within(got, expected[name], magnitude[name], gamma, f"grad_{name}", tiny)
    # l2_loss_fwd / l2_loss_bwd on y against a target
    t, tn = _make(data, rng, (N, D_out), dtype, label="target")
    reduction = data.draw(st.sampled_from(["sum", "mean"]), label="reduction")
    need_grad = data.draw(st.booleans(), label="need_grad")
    loss, grad = ops.l2_loss_fwd(g, t, reduction, need_grad)
    n = N * D_out
    scale = 1.0 / n if (reduction == "mean" and n) else 1.0
    if not (n == 0 and reduction == "mean"):
        _assert_within(
            loss,
            R.numpy_loss(gn, tn, reduction),
            np.square(np.abs(gn) + np.abs(tn)).sum() * scale,
            _gamma(dtype, n),
            "l2_loss_fwd loss",
            _tiny(dtype),
        )
    if not need_grad:
        assert grad is None
        return
    _assert_within(
        grad,
        R.numpy_loss_grad(gn, tn, reduction) if n else np.zeros((N, D_out)),
        2 * (np.abs(gn) + np.abs(tn)) * scale,
        _gamma(dtype, 2),
        "l2_loss_fwd grad",
        _tiny(dtype),
    )
    gl = torch.tensor(
        data.draw(st.sampled_from([1.0, 0.0, -2.5]), label="grad_loss"), dtype=g.dtype
    )
    out = ops.l2_loss_bwd(gl, grad)
    assert torch.equal(out, grad * gl) or torch.allclose(
        out, grad * gl, rtol=0, atol=0, equal_nan=True
    )


def test_case_count():
    """The module ran enough cases (when run whole; skipped under -k selections)."""
    if not all(CASES.values()):
        pytest.skip("only part of the module ran")
    total = sum(CASES.values())
    # hypothesis may stop early only if the space is exhausted, which it is not here
    assert total >= (MIN_CASES if SCALE >= 1 else 1), CASES
