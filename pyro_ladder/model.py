"""The generative hierarchy ``p(z_L) prod_i p(z_i | z_{i+1}) p(x | z_1)`` as a Pyro model."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ._memo import Memo
from .config import LadderConfig
from .layers import GaussianBlock
from .likelihoods import make_likelihood


class Generative(nn.Module):
    """The networks of the generative model; shared with the top-down guide.

    ``p(z_L) = N(0, I)``; ``p(z_i | z_{i+1}) = N(mu(z_{i+1}), sigma^2(z_{i+1}))`` with
    ``d = MLP(z_{i+1})``, ``mu = Linear(d)``, ``sigma^2 = Softplus(Linear(d)) + floor``;
    ``p(x | z_1)`` from :mod:`pyro_ladder.likelihoods`.

    :param config: sizes and choices; layer ``i`` uses ``hidden_dims[i-1]`` units.
    """

    def __init__(self, config: LadderConfig):
        super().__init__()
        c = config
        kw = dict(batch_norm=c.batch_norm, slope=c.leaky_slope, var_floor=c.var_floor)
        # priors[i - 1] is p(z_i | z_{i+1}), for i = 1 .. L-1
        self.priors = nn.ModuleList(
            GaussianBlock(c.latent_dims[i], c.hidden_dims[i - 1], c.latent_dims[i - 1], **kw)
            for i in range(1, c.depth)
        )
        self.likelihood = make_likelihood(
            c.likelihood, c.latent_dims[0], c.hidden_dims[0], c.x_dim, **kw
        )
        self.depth = c.depth
        self.top_dim = c.latent_dims[-1]
        self._memo = Memo()

    def prior(self, i: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of ``p(z_i | z_{i+1})``: ``(..., k_{i+1}) -> 2 x (..., k_i)``.

        The top-down guide asks for this at its samples and the model, replaying them,
        asks again at the very same tensors: the second request reuses the first result
        (:class:`~pyro_ladder._memo.Memo`), so the prior networks run once per pass.
        """
        net = self.priors[i - 1]
        return self._memo.call(i, net, z_above, net)

    def top_prior(self, like: torch.Tensor) -> dist.Distribution:
        """``p(z_L) = N(0, I)``, event shape ``(k_L,)``, on the device and dtype of ``like``."""
        zeros = like.new_zeros(self.top_dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def model(self, x: torch.Tensor) -> None:
        """Score ``x (B, x_dim)``; samples ``z{L}`` .. ``z1`` top-down inside ``plate("data")``.

        ``x`` must have passed :meth:`LadderVAE.check_data` (``LadderVAE.model`` checks it):
        the likelihood skips Pyro's validation, which would check the same values again.
        """
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(f"z{self.depth}", self.top_prior(x))  # (..., B, k_L)
            for i in range(self.depth - 1, 0, -1):
                loc, scale = self.prior(i, z)
                z = pyro.sample(f"z{i}", dist.Normal(loc, scale).to_event(1))  # (..., B, k_i)
            # x passed LadderVAE.check_data: Pyro need not validate it (or the logits) again
            pyro.sample("x", self.likelihood(z, validate_args=False), obs=x)
