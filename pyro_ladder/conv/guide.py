"""Convolutional inference networks: the ladder (top-down) and the bottom-up guide."""

from __future__ import annotations

import pyro
import torch
from torch import nn

from ..layers import gaussian
from ..merge import top_down_posterior
from .blocks import ConvGaussianHead, Down, Embed
from .config import ConvLadderConfig
from .model import ConvGenerative


def _image(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], 1, *shape)  # (B, H * W) -> (B, 1, H, W)


class ConvTopDownInference(nn.Module):
    r"""The Ladder VAE's inference network with convolutions (Sonderby et al. 2016, eq. 17-21).

    Upward pass ``d_n = Down(d_{n-1})``, ``d_0 = x`` as a ``(1, H, W)`` image, with heads
    ``(mu_hat_n, sigma_hat_n)`` at resolution ``r_n``. Downward pass: ``z_L`` from the top
    head, each lower ``z_i`` from :func:`~pyro_ladder.merge.precision_weighted` of its head
    (per pixel and channel) with the model's ``p(z_i | z_{i+1}, h_{i+1})``, whose networks
    (and skip state ``h``) are the model's own.

    References
    ----------
    [1] C. K. Sonderby et al., "Ladder Variational Autoencoders", NeurIPS 2016.
    """

    def __init__(self, config: ConvLadderConfig):
        super().__init__()
        c = config
        inputs = (1,) + c.channels[:-1]
        kw = dict(batch_norm=c.batch_norm, slope=c.leaky_slope)
        self.blocks = nn.ModuleList(
            Down(c_in, c_out, c.blocks, **kw)
            for c_in, c_out in zip(inputs, c.channels, strict=True)
        )
        self.heads = nn.ModuleList(
            ConvGaussianHead(ch, k, c.var_floor)
            for ch, k in zip(c.channels, c.latent_channels, strict=True)
        )
        self.image_shape = c.image_shape

    def upward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(mu_hat_n, sigma_hat_n)`` for n = 1..L, each ``(B, k_n, r_n)``."""
        out, d = [], _image(x, self.image_shape)
        for block, head in zip(self.blocks, self.heads, strict=True):
            d = block(d)  # (B, c_n, r_n)
            out.append(head(d))
        return out

    def guide(self, x: torch.Tensor, generative: ConvGenerative) -> None:
        """Sample ``z{L}`` .. ``z1`` given flat ``x (B, H * W)``, inside ``plate("data")``."""
        heads = self.upward(x)
        depth = len(heads)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(f"z{depth}", top_down_posterior(None, heads[-1], 3))
            h = None
            for i in range(depth - 1, 0, -1):  # z (..., B, k_i, r_i)
                loc_p, scale_p, h = generative.prior(i, z, h)
                posterior = top_down_posterior((loc_p, scale_p), heads[i - 1], 3)
                z = pyro.sample(f"z{i}", posterior)


class ConvBottomUpInference(nn.Module):
    """The classic hierarchical guide ``q(z_1 | x) prod_i q(z_i | z_{i-1}, e_{i-1})``.

    ``e_1 = Down(x)``, ``e_i = Down(Embed(z_{i-1}) [+ e_{i-1}])``, ``q = N(head(e_i))``; with
    skip connections the deterministic state ``e_{i-1}`` of the layer below is added, as in
    the generative model. Sites are sampled ``z1`` first, the reverse of the model's order:
    analytic-KL estimators that need the same order (``TraceMeanField_ELBO``) do not apply.
    """

    def __init__(self, config: ConvLadderConfig):
        super().__init__()
        c = config
        kw = dict(batch_norm=c.batch_norm, slope=c.leaky_slope)
        inputs = (1,) + c.channels[:-1]
        self.embeds = nn.ModuleList(
            Embed(k, ch) for k, ch in zip(c.latent_channels[:-1], c.channels[:-1], strict=True)
        )
        self.blocks = nn.ModuleList(
            Down(c_in, c_out, c.blocks, **kw)
            for c_in, c_out in zip(inputs, c.channels, strict=True)
        )
        self.heads = nn.ModuleList(
            ConvGaussianHead(ch, k, c.var_floor)
            for ch, k in zip(c.channels, c.latent_channels, strict=True)
        )
        self.image_shape, self.skip = c.image_shape, c.skip

    def guide(self, x: torch.Tensor, generative: ConvGenerative | None = None) -> None:
        """Sample ``z1`` .. ``z{L}`` given flat ``x (B, H * W)``; ``generative`` is unused."""
        with pyro.plate("data", x.shape[0], dim=-1):
            e = self.blocks[0](_image(x, self.image_shape))  # (B, c_1, r_1)
            z = pyro.sample("z1", gaussian(*self.heads[0](e), 3))  # (..., B, k_1, r_1)
            for i in range(2, len(self.blocks) + 1):
                t = self.embeds[i - 2](z)  # (..., B, c_{i-1}, r_{i-1})
                if self.skip:
                    t = t + e
                e = self.blocks[i - 1](t)  # (..., B, c_i, r_i)
                z = pyro.sample(f"z{i}", gaussian(*self.heads[i - 1](e), 3))


CONV_INFERENCE = {"top-down": ConvTopDownInference, "bottom-up": ConvBottomUpInference}
