"""Batching rules (torch.vmap) for the ops, so that vmap, jacrev, jacfwd-free per-sample
gradients and the like never take functorch's slow fallback (or fail on the ops it cannot
fall back for, such as two_layer_bwd with its optional outputs).

The common case, x batched and the weights shared, folds the batch into the rows: one op call
for the whole batch. Anything else (per-sample weights, a batched backward) runs the op once
per sample and stacks the results: the same numbers as a Python loop over the batch, which is
what the tests check."""

import torch

_ops = torch.ops.twolayer_ext


def _per_sample(op):
    """A rule that calls `op` on each sample and stacks every tensor output along dim 0."""

    def rule(info, in_dims, *args):
        results = []
        for b in range(info.batch_size):
            sample = [
                a.select(d, b) if isinstance(a, torch.Tensor) and d is not None else a
                for a, d in zip(args, in_dims)
            ]
            results.append(op(*sample))
        if isinstance(results[0], torch.Tensor):
            return torch.stack(results), 0
        outs = tuple(
            None if r0 is None else torch.stack([r[i] for r in results])
            for i, r0 in enumerate(results[0])
        )
        return outs, tuple(None if o is None else 0 for o in outs)

    return rule


def _two_layer_rule(info, in_dims, x, w1, w2, b1=None, b2=None):
    x_dim, *weight_dims = in_dims
    if x_dim is None or any(d is not None for d in weight_dims):
        return _per_sample(_ops.two_layer.default)(info, in_dims, x, w1, w2, b1, b2)
    xb = x.movedim(x_dim, 0)  # [B, N, D_in]: the batch becomes more rows
    y = _ops.two_layer.default(xb.reshape(-1, xb.shape[-1]), w1, w2, b1, b2)
    return y.reshape(*xb.shape[:-1], y.shape[-1]), 0


def _l2_loss_bwd_rule(info, in_dims, grad_loss, grad):
    # grad_loss (0-dim per sample) times the saved gradient: a broadcast product.
    gl_dim, g_dim = in_dims
    gl = grad_loss.movedim(gl_dim, 0) if gl_dim is not None else grad_loss.expand(info.batch_size)
    g = grad.movedim(g_dim, 0) if g_dim is not None else grad.unsqueeze(0)
    return g * gl.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype), 0


for _name, _rule in (
    ("two_layer", _two_layer_rule),
    ("l2_loss", _per_sample(_ops.l2_loss.default)),
    ("two_layer_l2_loss", _per_sample(_ops.two_layer_l2_loss.default)),
    ("two_layer_fwd", _per_sample(_ops.two_layer_fwd.default)),
    ("two_layer_bwd", _per_sample(_ops.two_layer_bwd.default)),
    ("l2_loss_fwd", _per_sample(_ops.l2_loss_fwd.default)),
    ("l2_loss_bwd", _l2_loss_bwd_rule),
    ("two_layer_l2_loss_fwd", _per_sample(_ops.two_layer_l2_loss_fwd.default)),
):
    torch.library.register_vmap(f"twolayer_ext::{_name}", _rule)
