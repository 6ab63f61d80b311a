"""Observation models ``p(x | z_1)``: a network head that returns a Pyro distribution."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from ._compile import network_call
from .errors import ConfigError, DataError
from .layers import MLP, GaussianBlock


class BernoulliLikelihood(nn.Module):
    """``p(x | z_1) = Bernoulli(logits = Linear(MLP(z_1)))`` for binary pixels.

    Shape contract: ``z1 (..., z_dim) -> Bernoulli`` with batch shape ``(...)`` and event
    shape ``(x_dim,)``; use it as ``pyro.sample("x", likelihood(z1), obs=x)``.

    :param z_dim: size of ``z_1``.
    :param hidden_dim: units of the MLP.
    :param x_dim: pixels of ``x``.
    :param batch_norm: batch norm in the MLP.
    :param slope: negative slope of the leaky ReLU.
    :param var_floor: unused; accepted so that every likelihood takes the same arguments.
    """

    def __init__(self, z_dim, hidden_dim, x_dim, batch_norm=True, slope=0.1, var_floor=1e-4):
        super().__init__()
        self.mlp = MLP(z_dim, hidden_dim, batch_norm, slope)
        self.logits = nn.Linear(hidden_dim, x_dim)

    def forward(self, z1: torch.Tensor, validate_args: bool | None = None) -> dist.Distribution:
        """``validate_args=False`` skips Pyro's checks of the logits and of the observed
        values, for callers that checked the data with :meth:`check` already."""
        logits = network_call(self, self._logits, z1)  # (..., x_dim); compiled in a scope
        return dist.Bernoulli(logits=logits, validate_args=validate_args).to_event(1)

    def _logits(self, z1: torch.Tensor) -> torch.Tensor:
        return self.logits(self.mlp(z1))

    @staticmethod
    def mean(d: dist.Distribution) -> torch.Tensor:
        """Pixel means ``(..., x_dim)`` of a distribution returned by :meth:`forward`."""
        return d.base_dist.probs

    @staticmethod
    def check(x: torch.Tensor) -> None:
        """Raise :class:`DataError` unless every value is 0 or 1 (one pass over binary data)."""
        if not ((x == 0) | (x == 1)).all():
            _check_finite(x)  # NaN and infinity get their own message
            raise DataError(
                "the Bernoulli likelihood needs binary data (0/1) but got other values: "
                "binarize grey images (fit(..., binarize=True), the CLI does it for grey data "
                "sets) or use the Gaussian likelihood (argument `likelihood` gaussian)"
            )


class GaussianLikelihood(nn.Module):
    """``p(x | z_1) = Normal(Linear(d), sqrt(Softplus(Linear(d)) + floor))``, ``d = MLP(z_1)``.

    For continuous data; the log-likelihood is then a density in nats. Shape contract and
    arguments as :class:`BernoulliLikelihood`; ``var_floor`` is the smallest variance.
    """

    def __init__(self, z_dim, hidden_dim, x_dim, batch_norm=True, slope=0.1, var_floor=1e-4):
        super().__init__()
        self.net = GaussianBlock(z_dim, hidden_dim, x_dim, batch_norm, slope, var_floor)

    def forward(self, z1: torch.Tensor, validate_args: bool | None = None) -> dist.Distribution:
        """``validate_args`` as in :meth:`BernoulliLikelihood.forward`."""
        loc, scale = self.net(z1)  # (..., x_dim) each
        return dist.Normal(loc, scale, validate_args=validate_args).to_event(1)

    @staticmethod
    def mean(d: dist.Distribution) -> torch.Tensor:
        return d.base_dist.loc

    @staticmethod
    def check(x: torch.Tensor) -> None:
        """Raise :class:`DataError` if a value is NaN or infinite."""
        _check_finite(x)


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(-1).nonzero().flatten()[:5].tolist()
        raise DataError(
            f"the data hold NaN or infinite values (rows {bad}...): clean or drop those rows"
        )


LIKELIHOODS = {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}


def make_likelihood(name: str, z_dim, hidden_dim, x_dim, **kwargs) -> nn.Module:
    """The observation model called ``name`` (``"bernoulli"`` or ``"gaussian"``)."""
    if name not in LIKELIHOODS:
        raise ConfigError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name](z_dim, hidden_dim, x_dim, **kwargs)
