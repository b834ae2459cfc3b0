"""torch.func on the ops: grad, jacrev and vmap (per-sample gradients, ensembles), against
plain torch and a Python loop, and never through functorch's slow fallback."""

import contextlib

import pytest
import torch

import twolayer_ext as tl

pytestmark = pytest.mark.usefixtures("cpu_kernel")


def data(seed=0, N=5):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(N, 4), mk(N, 3), mk(4, 6), mk(6, 3), mk(6), mk(3)


def torch_loss(x, t, w1, w2, b1, b2):
    return ((torch.relu(x @ w1 + b1) @ w2 + b2 - t) ** 2).sum()


@contextlib.contextmanager
def no_fallback():
    """With functorch's slow per-sample fallback switched off, an op without a batching rule
    raises instead of quietly looping."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def test_the_guard_catches_an_op_without_a_rule():
    lib = torch.library.Library("twolayer_test", "FRAGMENT")
    lib.define("plain(Tensor x) -> Tensor")
    lib.impl("plain", lambda x: x * 2, "CPU")
    with no_fallback(), pytest.raises(RuntimeError):
        torch.vmap(torch.ops.twolayer_test.plain)(torch.ones(3, 2))


@pytest.mark.parametrize("loss_fn", ["separate", "fused"])
def test_grad_matches_torch(loss_fn):
    x, t, w1, w2, b1, b2 = data()
    ours = (
        (lambda *w: tl.l2_loss(tl.two_layer(x, *w), t))
        if loss_fn == "separate"
        else (lambda *w: tl.two_layer_l2_loss(x, t, *w))
    )
    got = torch.func.grad(ours, argnums=(0, 1, 2, 3))(w1, w2, b1, b2)
    want = torch.func.grad(lambda *w: torch_loss(x, t, *w), argnums=(0, 1, 2, 3))(w1, w2, b1, b2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_jacrev_matches_torch():
    x, _, w1, w2, b1, b2 = data()
    with no_fallback():
        got = torch.func.jacrev(lambda w: tl.two_layer(x, w, w2, b1, b2))(w1)
    want = torch.func.jacrev(lambda w: torch.relu(x @ w + b1) @ w2 + b2)(w1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_vmap_over_x_folds_the_batch_into_rows():
    _, _, w1, w2, b1, b2 = data()
    X = torch.randn(7, 5, 4, dtype=torch.float64)
    with no_fallback():
        got = torch.vmap(lambda x: tl.two_layer(x, w1, w2, b1, b2))(X)
    torch.testing.assert_close(
        got, torch.stack([tl.two_layer(x, w1, w2, b1, b2) for x in X]), rtol=0, atol=0
    )


@pytest.mark.parametrize("loss_fn", ["separate", "fused"])
def test_per_sample_gradients_equal_a_python_loop(loss_fn):
    x, t, w1, w2, b1, b2 = data(N=6)

    def loss(w1, w2, xs, ts):
        if loss_fn == "fused":
            return tl.two_layer_l2_loss(xs[None], ts[None], w1, w2, b1, b2)
        return tl.l2_loss(tl.two_layer(xs[None], w1, w2, b1, b2), ts[None])

    with no_fallback():
        got = torch.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
            w1, w2, x, t
        )
    for i in range(6):
        want = torch.func.grad(
            lambda a, b: torch_loss(x[i : i + 1], t[i : i + 1], a, b, b1, b2), argnums=(0, 1)
        )(w1, w2)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[i], w, rtol=1e-12, atol=1e-12)


def test_vmap_over_an_ensemble_of_weights():
    x, t, w1, w2, b1, b2 = data()
    W1 = torch.stack([w1, 2 * w1, -w1])
    with no_fallback():
        y = torch.vmap(lambda w: tl.two_layer(x, w, w2, b1, b2))(W1)
        losses = torch.vmap(lambda w: tl.two_layer_l2_loss(x, t, w, w2, b1, b2, reduction="mean"))(
            W1
        )
    for i in range(3):
        torch.testing.assert_close(y[i], tl.two_layer(x, W1[i], w2, b1, b2), rtol=0, atol=0)
        torch.testing.assert_close(
            losses[i],
            tl.two_layer_l2_loss(x, t, W1[i], w2, b1, b2, reduction="mean"),
            rtol=0,
            atol=0,
        )
