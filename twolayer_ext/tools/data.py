"""Data sets for the training CLI: the tutorial's random problem and scikit-learn's digits.

Every function is deterministic in its seed, so each DDP rank builds the same arrays and the
same batch order without talking to the others.
"""

from dataclasses import dataclass

import torch

from .. import reference as R

DIGITS_FEATURES, DIGITS_CLASSES = 64, 10


def tutorial_problem(N, D_in, H, D_out, *, seed, bias, dtype):
    """The tutorial's unscaled randn draw (x, y, {"w1", "w2", "b1", "b2"}) as numpy arrays."""
    return R.tutorial_data(N, D_in, H, D_out, seed=seed, bias=bias, dtype=dtype)


@dataclass
class Digits:
    """The 8x8 handwritten digits: pixels scaled from 0..16 to [0, 1], one-hot targets."""

    x_train: torch.Tensor  # [n_train, 64]
    y_train: torch.Tensor  # [n_train, 10] one-hot
    x_test: torch.Tensor
    y_test: torch.Tensor
    labels_test: torch.Tensor  # [n_test] int64


def load_digits(*, seed, test_fraction=0.25, dtype=torch.float32, device="cpu"):
    """scikit-learn's bundled digits (1797 images, no download), a stratified split.

    The split depends on the seed only; the features need no statistics from the data.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = bunch.data / 16.0
    x_tr, x_te, l_tr, l_te = train_test_split(
        x, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target
    )

    def features(a):
        return torch.tensor(a, dtype=dtype, device=device)

    def one_hot(labels):
        return torch.nn.functional.one_hot(torch.tensor(labels, device=device), DIGITS_CLASSES).to(
            dtype
        )

    return Digits(
        features(x_tr),
        one_hot(l_tr),
        features(x_te),
        one_hot(l_te),
        torch.tensor(l_te, device=device),
    )


def epoch_batches(n, batch_size, *, seed, epoch):
    """Index tensors of one epoch's shuffled mini-batches (the last may be short); the same
    on every process for the same (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).split(batch_size)
