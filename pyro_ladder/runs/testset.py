"""The test-set policy every run and experiment shares, so their numbers compare."""

from __future__ import annotations

import torch

from ..condition import pack
from ..data import binarize

TEST_SEED = 0
"""Grey test images are binarized once with this seed: every run scores the same pixels."""


def dynamic_binarization(kind: str, likelihood: str) -> bool:
    """Grey images (``kind == "grey"``) under a Bernoulli likelihood are binarized anew
    every epoch in training, and once (:func:`test_set`) for testing."""
    return kind == "grey" and likelihood == "bernoulli"


def test_set(data, likelihood: str, limit: int | None = None, condition_dim: int = 0):
    """The test rows a run scores, ``(N, x_dim + condition_dim)``.

    All test rows of ``data`` (a :class:`~pyro_ladder.data.Dataset`) when ``limit`` is
    None or not smaller than the test set, else the ``limit`` rows :func:`test_rows`
    picks: a fixed random subset, never the first rows (a test file may be sorted by
    class: the statically binarized MNIST file holds its zeros first, then the ones,
    so its first 1000 images are nearly all zeros). Grey images under a Bernoulli likelihood are
    binarized once, all of them, with :data:`TEST_SEED` (a row gets the same pixels
    whatever the limit); with ``condition_dim > 0`` the one-hot label
    is packed beside each row afterwards, so a conditional run scores the same pixels as
    an unconditional one.
    """
    test = data.test  # (N_test, x_dim)
    if dynamic_binarization(data.kind, likelihood):  # all rows: a row's pixels whatever limit
        test = binarize(test, generator=torch.Generator().manual_seed(TEST_SEED))
    rows = test_rows(len(test), limit)
    test = test if rows is None else test[rows]  # (N, x_dim)
    labels = data.test_labels
    if labels is not None and rows is not None:
        labels = labels[rows]
    return with_labels(test, labels, condition_dim)


def test_rows(n: int, limit: int | None) -> torch.Tensor | None:
    """Indices ``(limit,)`` of the test rows a run with ``limit`` scores, ascending: the
    first ``limit`` of a permutation of ``range(n)`` drawn with :data:`TEST_SEED`, so
    that every run and data set size picks the same rows and a smaller limit picks a
    subset of a larger one's; None (every row) when ``limit`` is None or ``>= n``."""
    if limit is None or limit >= n:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SEED))
    return order[:limit].sort().values


def with_labels(x: torch.Tensor, labels, condition_dim: int) -> torch.Tensor:
    """``x' = (x, one_hot(label))`` for a model conditioned on the label, else ``x``."""
    if condition_dim == 0:
        return x
    return pack(x, labels[: len(x)], condition_dim)  # (N, x_dim + condition_dim)


test_set.__test__ = False  # a policy, not a pytest test function
test_rows.__test__ = False
