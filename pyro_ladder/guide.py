"""Inference networks as Pyro guides: the ladder (top-down) and the classic bottom-up VAE."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import torch
from torch import nn

from ._compile import network_call
from ._memo import Memo
from .layers import MLP, GaussianBlock, GaussianHead, broadcast_cat, gaussian
from .merge import top_down_posterior
from .model import Generative

if TYPE_CHECKING:  # annotations only: config imports this module's registry
    from .config import LadderConfig


class TopDownInference(nn.Module):
    r"""The Ladder VAE's inference network (Sonderby et al. 2016, eq. 17-21).

    Upward pass: ``d_n = MLP(d_{n-1})``, ``d_0 = x``, with heads
    ``(mu_hat_n, sigma_hat_n)``. Downward pass: ``z_L ~ N(mu_hat_L, sigma_hat_L^2)`` and
    each lower ``z_i`` from :func:`~pyro_ladder.merge.precision_weighted` of its head with
    the generative prior ``p(z_i | z_{i+1})`` at the sampled ``z_{i+1}``. The prior
    networks are the model's own (shared parameters), as in the paper. A conditional
    model (``config.condition_dim = C > 0``) gives every upward block ``[d_{n-1}, c]``.

    References
    ----------
    [1] C. K. Sonderby et al., "Ladder Variational Autoencoders", NeurIPS 2016.
    """

    def __init__(self, config: LadderConfig):
        super().__init__()
        c = config
        inputs = (c.x_dim,) + c.hidden_dims[:-1]
        self.blocks = nn.ModuleList(
            MLP(d_in + c.condition_dim, h, c.batch_norm, c.leaky_slope)
            for d_in, h in zip(inputs, c.hidden_dims, strict=True)
        )
        self.heads = nn.ModuleList(
            GaussianHead(h, k, c.var_floor)
            for h, k in zip(c.hidden_dims, c.latent_dims, strict=True)
        )
        self._memo = Memo()

    def upward(
        self, x: torch.Tensor, c: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The "approximate likelihood" ``(mu_hat_n, sigma_hat_n)`` for n = 1..L, each (B, k_n)."""
        return network_call(self, self._upward, x, c)  # compiled inside a compile scope

    def _upward(self, x, c):
        out, d = [], x
        for block, head in zip(self.blocks, self.heads, strict=True):
            d = block(d if c is None else broadcast_cat(d, c))  # (B, h_n)
            out.append(head(d))
        return out

    def guide(self, x: torch.Tensor, generative: Generative, c: torch.Tensor | None = None) -> None:
        """Sample ``z{L}`` .. ``z1`` given ``x (B, x_dim)`` [and ``c (B, C)``], inside
        ``plate("data")``.

        The upward pass does not depend on the samples: within one estimator call, a guide
        run twice on the same ``x`` (e.g. by ``iwae-dreg``) computes it once (see
        ``pyro_ladder._memo``); separate calls always compute it afresh. Each site declares
        its density with the head detached (:func:`~pyro_ladder.merge.top_down_posterior`),
        which spares the doubly reparameterized estimators a second pass of the guide.
        """
        if c is None:
            heads = self._memo.call("upward", self, x, self.upward)
        else:
            heads = self._memo.call("upward", self, (x, c), lambda _: self.upward(x, c))
        # the declaration assumes the guide's own parameters reach a site only through its
        # head: a condition that requires grad may carry them into the prior as well
        # (the parameter roles check it too)
        declare = c is None or not c.requires_grad
        depth = len(heads)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(f"z{depth}", top_down_posterior(None, heads[-1], declare=declare))
            for i in range(depth - 1, 0, -1):  # z (..., B, k_i)
                prior = generative.prior(i, z, c)
                posterior = top_down_posterior(prior, heads[i - 1], declare=declare)
                z = pyro.sample(f"z{i}", posterior)


class BottomUpInference(nn.Module):
    """The classic hierarchical VAE guide ``q(z_1 | x) prod_i q(z_i | z_{i-1})``.

    Each conditional is ``N(mu(y), sigma^2(y))`` with ``d = MLP(y)``. Sites are sampled
    ``z1`` first, the reverse of the model's order; analytic-KL estimators that need the
    two orders to agree (``TraceMeanField_ELBO``) do not apply to this guide. A conditional
    model (``config.condition_dim = C > 0``) gives every block ``[y, c]``.
    """

    def __init__(self, config: LadderConfig):
        super().__init__()
        c = config
        inputs = (c.x_dim,) + c.latent_dims[:-1]
        kw = dict(batch_norm=c.batch_norm, slope=c.leaky_slope, var_floor=c.var_floor)
        self.blocks = nn.ModuleList(
            GaussianBlock(d_in + c.condition_dim, h, k, **kw)
            for d_in, h, k in zip(inputs, c.hidden_dims, c.latent_dims, strict=True)
        )

    def guide(
        self, x: torch.Tensor, generative: Generative | None = None, c: torch.Tensor | None = None
    ) -> None:
        """Sample ``z1`` .. ``z{L}`` given ``x (B, x_dim)`` [and ``c (B, C)``];
        ``generative`` is unused."""
        with pyro.plate("data", x.shape[0], dim=-1):
            z = x
            for i, block in enumerate(self.blocks, start=1):
                loc, scale = block(z if c is None else broadcast_cat(z, c))
                z = pyro.sample(f"z{i}", gaussian(loc, scale))  # (..., B, k_i)


INFERENCE = {"top-down": TopDownInference, "bottom-up": BottomUpInference}
