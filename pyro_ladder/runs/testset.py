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

    The first ``limit`` test rows of ``data`` (a :class:`~pyro_ladder.data.Dataset`; all
    when None); grey images under a Bernoulli likelihood binarized once with
    :data:`TEST_SEED`; with ``condition_dim > 0`` the one-hot label packed beside each row
    afterwards, so a conditional run scores the same pixels as an unconditional one.
    """
    test = data.test if limit is None else data.test[:limit]  # (N, x_dim)
    if dynamic_binarization(data.kind, likelihood):
        test = binarize(test, generator=torch.Generator().manual_seed(TEST_SEED))
    return with_labels(test, data.test_labels, condition_dim)


def with_labels(x: torch.Tensor, labels, condition_dim: int) -> torch.Tensor:
    """``x' = (x, one_hot(label))`` for a model conditioned on the label, else ``x``."""
    if condition_dim == 0:
        return x
    return pack(x, labels[: len(x)], condition_dim)  # (N, x_dim + condition_dim)


test_set.__test__ = False  # a policy, not a pytest test function
