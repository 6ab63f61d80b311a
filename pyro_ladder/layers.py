"""Building blocks: MLP blocks that accept any leading batch shape, and Gaussian heads."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ._compile import network_call


def gaussian(loc: torch.Tensor, scale: torch.Tensor, event_dims: int = 1) -> dist.Distribution:
    """``Normal(loc, scale).to_event(event_dims)`` for the ladder's own latent layers,
    without torch's argument checks.

    ``loc`` and ``scale`` come from the ladder's heads (a linear map; a square root of a
    softplus plus a floor; their precision-weighted merge), so the only values the checks
    could refuse are NaN, and a NaN parameter gives a NaN sample and a NaN loss, which
    ``fit`` refuses naming the step. The checks cost a reduction over every parameter and
    sample at every site (on a GPU a host synchronization each: most of the 76 per step the
    device check counted), 1 to 2% of a CPU training step. Distributions a user's pair
    builds keep Pyro's validation as the user set it.
    """
    return Normal(loc, scale, validate_args=False).to_event(event_dims)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Normal(dist.Normal):
    """``pyro.distributions.Normal`` whose ``log_prob`` takes two elementwise operations
    fewer: ``-(z - loc)^2 / (2 scale^2) - log scale - log sqrt(2 pi)`` computed as
    ``-0.5 ((z - loc) / scale)^2 - log scale - log sqrt(2 pi)`` (no separate variance,
    negation or doubling; the tests compare it with Pyro's). The ladder evaluates it at
    every latent site of every pass, and autograd runs each operation again backward.
    Its ``expand`` to the shape it already has (which Pyro's plates ask of every site)
    shares its tensors; any other ``expand`` is Pyro's, as are sampling, KL divergences
    and the name in a rendered model.

    ``head_detached``: a top-down ladder site's declaration of its density with the head
    detached (:class:`~pyro_ladder.merge.HeadDetached`), kept by ``expand``; ``None``
    elsewhere."""

    head_detached = None

    def __init__(self, loc, scale, validate_args=None):
        if isinstance(loc, torch.Tensor) and isinstance(scale, torch.Tensor):
            if loc.shape == scale.shape and loc.dtype == scale.dtype:  # the ladder's heads
                # as broadcast_all would leave them, without its two views (and the two
                # nodes autograd would pass through)
                self.loc, self.scale = loc, scale
                torch.distributions.Distribution.__init__(
                    self, loc.shape, validate_args=validate_args
                )
                return
        super().__init__(loc, scale, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        if _instance is None and type(self).__init__ is not Normal.__init__:
            # a subclass with settings of its own: torch's rule (it refuses, naming the fix)
            return super().expand(batch_shape)
        new = self.__new__(type(self)) if _instance is None else _instance
        new.head_detached = self.head_detached  # log_prob broadcasts it to the new shape
        if torch.Size(batch_shape) != self.batch_shape:
            return super().expand(batch_shape, _instance=new)
        # Pyro's plates expand every site, to the shape it has as often as not
        new.loc, new.scale = self.loc, self.scale
        torch.distributions.Distribution.__init__(new, self.batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return -0.5 * ((value - self.loc) / self.scale).square() - self.scale.log() - _HALF_LOG_2PI


class MLP(nn.Module):
    """Two dense layers, each ``Linear -> [BatchNorm] -> LeakyReLU`` (the paper's block).

    Shape contract: ``(..., in_dim) -> (..., hidden_dim)``. Leading dimensions (particles,
    data) are flattened for batch norm, so vectorized particles share one set of batch
    statistics, then restored.

    :param in_dim: input features.
    :param hidden_dim: units of both layers.
    :param batch_norm: insert ``BatchNorm1d`` before each nonlinearity.
    :param slope: negative slope of the leaky ReLU.
    """

    def __init__(self, in_dim: int, hidden_dim: int, batch_norm: bool = True, slope: float = 0.1):
        super().__init__()
        layers = []
        for d_in in (in_dim, hidden_dim):
            layers.append(nn.Linear(d_in, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.LeakyReLU(slope))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = self.net(x.reshape(-1, x.shape[-1]))  # (prod(lead), hidden)
        return h.reshape(*lead, h.shape[-1])  # (..., hidden)


class GaussianHead(nn.Module):
    """``loc = Linear(d)``, ``scale = sqrt(Softplus(Linear(d)) + var_floor)``.

    The paper parameterises the variance with a softplus; the floor keeps precisions
    finite. Shape contract: ``(..., in_dim) -> ((..., out_dim), (..., out_dim))``.

    :param in_dim: features of ``d``.
    :param out_dim: dimension of the Gaussian.
    :param var_floor: smallest variance the head can return.
    """

    def __init__(self, in_dim: int, out_dim: int, var_floor: float = 1e-4):
        super().__init__()
        self.loc = nn.Linear(in_dim, out_dim)
        self.var = nn.Linear(in_dim, out_dim)
        self.var_floor = var_floor

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (F.softplus(self.var(d)) + self.var_floor).sqrt()
        return self.loc(d), scale


class GaussianBlock(nn.Module):
    """An MLP followed by a Gaussian head: the map ``y -> (mu(y), sigma(y))`` of the paper.

    Used for ``p(z_i | z_{i+1})`` in the generative model and ``q(z_i | z_{i-1})`` in the
    bottom-up guide. Shape contract: ``(..., in_dim) -> ((..., out_dim), (..., out_dim))``;
    ``dist.Normal(*block(y)).to_event(1)`` is the Gaussian.

    :param in_dim: features of ``y``.
    :param hidden_dim: units of the MLP's two layers.
    :param out_dim: dimension of the Gaussian.
    :param batch_norm: batch norm in the MLP (off for small or variable batches).
    :param slope: negative slope of the leaky ReLU.
    :param var_floor: smallest variance.
    """

    def __init__(self, in_dim, hidden_dim, out_dim, batch_norm=True, slope=0.1, var_floor=1e-4):
        super().__init__()
        self.mlp = MLP(in_dim, hidden_dim, batch_norm, slope)
        self.head = GaussianHead(hidden_dim, out_dim, var_floor)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return network_call(self, self._forward, y)  # compiled inside a compile scope

    def _forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.mlp(y))


def broadcast_cat(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dimension after broadcasting the leading ones.

    Network inputs in a guide mix tensors with and without the particle (and
    enumeration) dimensions Pyro adds on the left, e.g. ``x (B, D)`` with
    ``z2 (S, B, k)``; ``torch.cat`` does not broadcast, this does.
    Shape contract: ``(..._i, d_i) -> (broadcast(..._i), sum_i d_i)``.
    """
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*lead, t.shape[-1]) for t in tensors], -1)
