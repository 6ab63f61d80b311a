"""The convolutional generative hierarchy ``p(z_L) prod_i p(z_i | z_{>i}) p(x | z_{>=1})``."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ..layers import gaussian
from ..likelihoods import Bernoulli, BernoulliLikelihood, GaussianLikelihood
from .blocks import ConvGaussianHead, Embed, Up, fold, resolutions
from .config import ConvLadderConfig


class PriorStep(nn.Module):
    """``p(z_i | z_{i+1}, h_{i+1})`` and the deterministic state ``h_i`` it passes down.

    ``t = Embed(z_{i+1}) [+ h_{i+1}]`` at ``r_{i+1}``; ``h_i = Up(t)`` at ``r_i``;
    ``(loc, scale) = ConvGaussianHead(h_i)``. With ``skip`` the state ``h_{i+1}`` of the
    layer above is added to ``t``: a deterministic path from the top to the pixels that
    keeps information flowing past a collapsed stochastic layer.
    Shape contract: ``z (..., k_{i+1}, r_{i+1}), h (..., c_{i+1}, r_{i+1}) or None ->
    loc, scale (..., k_i, r_i), h_i (..., c_i, r_i)``.
    """

    def __init__(self, k_above, c_above, c, k, size, blocks, batch_norm, slope, var_floor):
        super().__init__()
        self.embed = Embed(k_above, c_above)
        self.up = Up(c_above, c, size, blocks, batch_norm, slope)
        self.head = ConvGaussianHead(c, k, var_floor)

    def forward(self, z_above, h_above=None):
        t = self.embed(z_above)  # (..., c_{i+1}, r_{i+1})
        if h_above is not None:
            t = t + h_above
        h = self.up(t)  # (..., c_i, r_i)
        return (*self.head(h), h)


class ConvLikelihood(nn.Module):
    """``p(x | z_1, h_1)`` on flat pixels ``(..., H * W)``: Bernoulli logits, or a Gaussian.

    ``t = Embed(z_1) [+ h_1]``, upsampled to the image and mapped by a 1x1 convolution to
    one channel (Bernoulli logits) or two (Gaussian loc and variance). Data checks and
    pixel means are those of :mod:`pyro_ladder.likelihoods`.
    """

    def __init__(self, config: ConvLadderConfig):
        super().__init__()
        c = config
        self.kind = {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}[c.likelihood]
        out = 1 if c.likelihood == "bernoulli" else 2
        self.embed = Embed(c.latent_channels[0], c.channels[0])
        self.up = Up(
            c.channels[0], c.channels[0], c.image_shape, c.blocks, c.batch_norm, c.leaky_slope
        )
        self.out = nn.Conv2d(c.channels[0], out, 1)
        self.var_floor = c.var_floor

    def forward(self, z1, h1=None, validate_args=None) -> dist.Distribution:
        t = self.embed(z1)  # (..., c_1, r_1)
        if h1 is not None:
            t = t + h1
        y = fold(self.out, self.up(t)).flatten(-2)  # (..., 1 or 2, H * W)
        if y.shape[-2] == 1:
            return Bernoulli(logits=y[..., 0, :], validate_args=validate_args).to_event(1)
        scale = (F.softplus(y[..., 1, :]) + self.var_floor).sqrt()
        return dist.Normal(y[..., 0, :], scale, validate_args=validate_args).to_event(1)

    def mean(self, d: dist.Distribution) -> torch.Tensor:
        """Pixel means ``(..., H * W)``."""
        return self.kind.mean(d)

    def check(self, x: torch.Tensor) -> None:
        """Raise :class:`~pyro_ladder.errors.DataError` if ``x`` does not suit the likelihood."""
        self.kind.check(x)


class ConvGenerative(nn.Module):
    """The networks of the convolutional generative model; shared with the top-down guide.

    ``p(z_L) = N(0, I)`` on ``(k_L, r_L)``; ``p(z_i | z_{i+1}, h_{i+1})`` from
    :class:`PriorStep`; ``p(x | z_1, h_1)`` from :class:`ConvLikelihood`. Without skip
    connections ``h`` is ``None`` and the hierarchy is a Markov chain as in the MLP ladder.
    """

    def __init__(self, config: ConvLadderConfig):
        super().__init__()
        c = config
        res = resolutions(c.image_shape, c.depth)
        kw = dict(
            blocks=c.blocks, batch_norm=c.batch_norm, slope=c.leaky_slope, var_floor=c.var_floor
        )
        # priors[i - 1] is p(z_i | z_{i+1}, h_{i+1}), for i = 1 .. L-1
        self.priors = nn.ModuleList(
            PriorStep(
                c.latent_channels[i],
                c.channels[i],
                c.channels[i - 1],
                c.latent_channels[i - 1],
                res[i - 1],
                **kw,
            )
            for i in range(1, c.depth)
        )
        self.likelihood = ConvLikelihood(c)
        self.depth, self.skip = c.depth, c.skip
        self.top_shape = (c.latent_channels[-1], *res[-1])

    def prior(self, i: int, z_above: torch.Tensor, h_above: torch.Tensor | None):
        """``(loc, scale, h_i)`` of ``p(z_i | z_{i+1}, h_{i+1})``; ``h_i`` is ``None``
        without skip connections (then ``h_above`` is ignored)."""
        loc, scale, h = self.priors[i - 1](z_above, h_above if self.skip else None)
        return loc, scale, (h if self.skip else None)

    def top_prior(self, like: torch.Tensor) -> dist.Distribution:
        """``p(z_L) = N(0, I)``, event shape ``(k_L, h_L, w_L)``, on ``like``'s device/dtype."""
        zeros = like.new_zeros(self.top_shape)
        return gaussian(zeros, torch.ones_like(zeros), 3)

    def model(self, x: torch.Tensor) -> None:
        """Score flat ``x (B, H * W)``; samples ``z{L}`` .. ``z1`` top-down in ``plate("data")``.

        ``x`` must have passed the likelihood's check (``ConvLadderVAE.model`` does it).
        """
        with pyro.plate("data", x.shape[0], dim=-1):
            z, h = pyro.sample(f"z{self.depth}", self.top_prior(x)), None  # (..., B, k_L, r_L)
            for i in range(self.depth - 1, 0, -1):
                loc, scale, h = self.prior(i, z, h)
                z = pyro.sample(f"z{i}", gaussian(loc, scale, 3))  # (..., B, k_i, r_i)
            pyro.sample("x", self.likelihood(z, h, validate_args=False), obs=x)
