"""The generative hierarchy ``p(z_L) prod_i p(z_i | z_{i+1}) p(x | z_1)`` as a Pyro model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ._memo import Memo
from .errors import DataError
from .layers import GaussianBlock, GaussianHead, broadcast_cat, gaussian
from .likelihoods import make_likelihood

if TYPE_CHECKING:  # annotations only: config imports the guide, which imports this module
    from .config import LadderConfig


class Generative(nn.Module):
    """The networks of the generative model; shared with the top-down guide.

    ``p(z_L) = N(0, I)``; ``p(z_i | z_{i+1}) = N(mu(z_{i+1}), sigma^2(z_{i+1}))`` with
    ``d = MLP(z_{i+1})``, ``mu = Linear(d)``, ``sigma^2 = Softplus(Linear(d)) + floor``;
    ``p(x | z_1)`` from :mod:`pyro_ladder.likelihoods`.

    With ``config.condition_dim = C > 0`` the model is conditional, ``p(z | c) p(x | z, c)``:
    ``c (B, C)`` enters every network beside its input (``MLP([z_{i+1}, c])``,
    ``p(x | [z_1, c])``) and the top prior becomes ``p(z_L | c) = N(mu(c), sigma^2(c))``
    with ``mu = Linear(c)``, ``sigma^2 = Softplus(Linear(c)) + floor``; for a one-hot label
    that is a free mean and variance per class.

    :param config: sizes and choices; layer ``i`` uses ``hidden_dims[i-1]`` units.
    """

    def __init__(self, config: LadderConfig):
        super().__init__()
        c = config
        C = c.condition_dim
        kw = dict(batch_norm=c.batch_norm, slope=c.leaky_slope, var_floor=c.var_floor)
        # priors[i - 1] is p(z_i | z_{i+1}[, c]), for i = 1 .. L-1
        self.priors = nn.ModuleList(
            GaussianBlock(c.latent_dims[i] + C, c.hidden_dims[i - 1], c.latent_dims[i - 1], **kw)
            for i in range(1, c.depth)
        )
        self.likelihood = make_likelihood(
            c.likelihood, c.latent_dims[0] + C, c.hidden_dims[0], c.x_dim, **kw
        )
        self.top = GaussianHead(C, c.latent_dims[-1], c.var_floor) if C else None  # p(z_L | c)
        self.depth = c.depth
        self.top_dim = c.latent_dims[-1]
        self._memo = Memo()

    def prior(
        self, i: int, z_above: torch.Tensor, c: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of ``p(z_i | z_{i+1}[, c])``: ``(..., k_{i+1}) -> 2 x (..., k_i)``.

        The top-down guide asks for this at its samples and the model, replaying them,
        asks again at the very same tensors: inside one estimator call the second request
        reuses the first result (:mod:`pyro_ladder._memo`), so the prior networks run once
        per pass; outside one (``sample``, a user's own Pyro estimator) it is computed.
        """
        net = self.priors[i - 1]
        if c is None:
            return self._memo.call(i, net, z_above, net)
        return self._memo.call(i, net, (z_above, c), lambda _: net(broadcast_cat(z_above, c)))

    def top_prior(self, like: torch.Tensor, c: torch.Tensor | None = None) -> dist.Distribution:
        """``p(z_L)``, event shape ``(k_L,)``: ``N(0, I)`` on the device and dtype of ``like``,
        or for a conditional model ``p(z_L | c)`` with batch shape ``c.shape[:-1]``."""
        if self.top is not None:
            if c is None:
                raise DataError("this model is conditional: p(z_L | c) needs the condition c")
            return gaussian(*self.top(c))
        zeros = like.new_zeros(self.top_dim)
        return gaussian(zeros, torch.ones_like(zeros))

    def observation(self, z1: torch.Tensor, c: torch.Tensor | None = None, **kwargs):
        """``p(x | z_1[, c])``, a distribution with event shape ``(x_dim,)``."""
        return self.likelihood(z1 if c is None else broadcast_cat(z1, c), **kwargs)

    def model(self, x: torch.Tensor, c: torch.Tensor | None = None) -> None:
        """Score ``x (B, x_dim)`` [given ``c (B, C)``]; samples ``z{L}`` .. ``z1`` top-down
        inside ``plate("data")``.

        ``x`` must have passed :meth:`LadderVAE.check_data` (``LadderVAE.model`` checks it):
        the likelihood skips Pyro's validation, which would check the same values again.
        """
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(f"z{self.depth}", self.top_prior(x, c))  # (..., B, k_L)
            for i in range(self.depth - 1, 0, -1):
                loc, scale = self.prior(i, z, c)
                z = pyro.sample(f"z{i}", gaussian(loc, scale))  # (..., B, k_i)
            # x passed LadderVAE.check_data: Pyro need not validate it (or the logits) again
            pyro.sample("x", self.observation(z, c, validate_args=False), obs=x)
