r"""The toy hierarchy of seed 004: ``c -> z2 -> z1 -> x`` with one-to-many steps, in 2-D.

The true generative process (all points in the plane):

* ``c`` is uniform on ``{0, ..., C-1}``; class ``c`` sits at angle ``2 pi c / C`` on a
  circle of radius ``class_radius``;
* ``z2 | c``, the coarse level: one of ``J`` spots around the class centre (uniform), at
  distance ``coarse_radius``, plus ``N(0, coarse_noise^2 I)``;
* ``z1 | z2``, the fine level: one of ``K`` spots around ``z2`` (uniform), at distance
  ``fine_radius``, plus ``N(0, fine_noise^2 I)``;
* ``x | z1 = N(z1, obs_noise^2 I)``.

So every class spawns ``J`` coarse clusters and every coarse cluster ``K`` fine ones
(a super-resolution-like hierarchy). The exact ``p(x | c)`` is a mixture of ``J K``
isotropic Gaussians with variance ``coarse_noise^2 + fine_noise^2 + obs_noise^2`` (the
noises add up along the chain), which :meth:`ToyHierarchy.log_prob` evaluates.

A data set is held as ``x' = (x, one_hot(c))`` in one ``(N, 2 + C)`` tensor: seed 004's
``x'``, with ``c`` upstream of the latents. Keeping both in one row lets every library
function that splits data by rows (``fit``, ``evaluate``, the diagnostics) serve the
conditional pairs of :mod:`pyro_ladder.toy.pairs` unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import condition
from ..errors import ConfigError


class ToySample(NamedTuple):
    """Draws of the true process; ``N`` rows each."""

    x: torch.Tensor  # (N, 2)
    c: torch.Tensor  # (N,) int64 class
    z2: torch.Tensor  # (N, 2) coarse latent
    z1: torch.Tensor  # (N, 2) fine latent


@dataclass(frozen=True)
class ToyHierarchy:
    """Sizes and scales of the true process (module docstring); defaults draw 18 tight
    fine clusters in three classes."""

    num_classes: int = 3  # C: classes, on a circle
    coarse: int = 2  # J: coarse clusters per class
    fine: int = 3  # K: fine clusters per coarse cluster
    class_radius: float = 3.0  # distance of the class centres from the origin
    coarse_radius: float = 1.2  # distance of the coarse spots from their class centre
    fine_radius: float = 0.45  # distance of the fine spots from their coarse spot
    coarse_noise: float = 0.08  # spread of z2 around its spot
    fine_noise: float = 0.06  # spread of z1 around its spot
    obs_noise: float = 0.08  # spread of x around z1

    def __post_init__(self):
        for name in ("num_classes", "coarse", "fine"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("class_radius", "coarse_radius", "fine_radius"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("coarse_noise", "fine_noise", "obs_noise"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def input_dim(self) -> int:
        """Columns of ``x' = (x, one_hot(c))``."""
        return 2 + self.num_classes

    def class_centres(self) -> torch.Tensor:
        """``(C, 2)``."""
        return self.class_radius * _unit(torch.arange(self.num_classes) / self.num_classes)

    def coarse_centres(self) -> torch.Tensor:
        """Noise-free ``z2`` spots: ``(C, J, 2)``."""
        C, J = self.num_classes, self.coarse
        turn = torch.arange(C)[:, None] / C + torch.arange(J)[None, :] / J + 0.25 / J
        return self.class_centres()[:, None] + self.coarse_radius * _unit(turn)

    def fine_centres(self) -> torch.Tensor:
        """Noise-free ``z1`` spots given the noise-free ``z2`` spot: ``(C, J, K, 2)``."""
        offsets = self.fine_radius * _unit(torch.arange(self.fine) / self.fine)  # (K, 2)
        return self.coarse_centres()[:, :, None] + offsets

    def sample(self, n: int, generator: torch.Generator | None = None) -> ToySample:
        """``n`` draws of ``(x, c, z2, z1)`` from the true process."""
        g = generator
        c = torch.randint(self.num_classes, (n,), generator=g)
        j = torch.randint(self.coarse, (n,), generator=g)
        k = torch.randint(self.fine, (n,), generator=g)
        offsets = self.fine_radius * _unit(torch.arange(self.fine) / self.fine)  # (K, 2)
        z2 = self.coarse_centres()[c, j] + self.coarse_noise * torch.randn(n, 2, generator=g)
        z1 = z2 + offsets[k] + self.fine_noise * torch.randn(n, 2, generator=g)
        x = z1 + self.obs_noise * torch.randn(n, 2, generator=g)
        return ToySample(x, c, z2, z1)

    def log_prob(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x | c)``: ``x (..., 2)``, ``c (...)`` -> ``(...)``, nats."""
        var = self.coarse_noise**2 + self.fine_noise**2 + self.obs_noise**2
        means = self.fine_centres()[c].flatten(-3, -2)  # (..., J K, 2)
        sq = (x.unsqueeze(-2) - means).square().sum(-1)  # (..., J K)
        log_n = -0.5 * sq / var - math.log(2 * math.pi * var)
        return log_n.logsumexp(-1) - math.log(self.coarse * self.fine)

    def dataset(self, n_train: int, n_test: int, seed: int = 0) -> ToyData:
        """Seeded train and test draws."""
        g = torch.Generator().manual_seed(seed)
        return ToyData(self, self.sample(n_train, g), self.sample(n_test, g))


@dataclass(frozen=True)
class ToyData:
    """Train and test draws of a :class:`ToyHierarchy`; ``train_inputs`` / ``test_inputs``
    are the ``(N, 2 + C)`` tensors ``x' = (x, one_hot(c))`` the toy pairs take."""

    truth: ToyHierarchy
    train: ToySample
    test: ToySample

    @property
    def train_inputs(self) -> torch.Tensor:
        return pack(self.train.x, self.train.c, self.truth.num_classes)

    @property
    def test_inputs(self) -> torch.Tensor:
        return pack(self.test.x, self.test.c, self.truth.num_classes)


def pack(x: torch.Tensor, c: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``x (N, 2)``, ``c (N,)`` -> ``x' = (x, one_hot(c))``: ``(N, 2 + C)``."""
    return condition.pack(x, c, num_classes)


def unpack(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' (..., 2 + C)`` -> ``(x (..., 2), one_hot(c) (..., C))``."""
    return condition.unpack(inputs, 2)


def _unit(turns: torch.Tensor) -> torch.Tensor:
    """Unit vectors at ``turns`` full turns: ``(...) -> (..., 2)``."""
    angle = 2 * math.pi * turns.float()
    return torch.stack([angle.cos(), angle.sin()], -1)
