"""Convolutional building blocks that accept any leading batch shape: ``(..., C, H, W)``.

Pyro adds particle (and enumeration) dimensions on the left of a site's value, so a
guide's ``z2`` can be ``(S, B, C, H, W)`` while ``x`` is ``(B, 1, H, W)``. Every block here
folds the leading dimensions into one batch dimension for ``nn.Conv2d`` and restores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fold(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net`` applied to ``x (..., C, H, W)``: ``(..., C', H', W')``."""
    lead = x.shape[:-3]
    y = net(x.reshape(-1, *x.shape[-3:]))  # (prod(lead), C', H', W')
    return y.reshape(*lead, *y.shape[-3:])


def _conv_bn_act(c_in: int, c_out: int, batch_norm: bool, slope: float, stride: int = 1):
    layers = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.LeakyReLU(slope))
    return layers


class ResBlock(nn.Module):
    """``y = x + Conv(act(Conv(x)))``, two 3x3 convolutions, shape-preserving.

    The residual path starts at zero-ish output, so a deep stack begins near the identity
    and gradients reach the lower layers. Shape contract: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int, batch_norm: bool = False, slope: float = 0.1):
        super().__init__()
        layers = _conv_bn_act(channels, channels, batch_norm, slope)
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.net(x))


class Down(nn.Module):
    """Halve the resolution (``ceil(H / 2)``: 28 -> 14 -> 7 -> 4) and run residual blocks.

    Shape contract: ``(..., c_in, H, W) -> (..., c_out, ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, c_in, c_out, blocks=1, batch_norm=False, slope=0.1):
        super().__init__()
        layers = _conv_bn_act(c_in, c_out, batch_norm, slope, stride=2)
        layers += [ResBlock(c_out, batch_norm, slope) for _ in range(blocks)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fold(self.net, x)


class Up(nn.Module):
    """Residual blocks at the input resolution, then resize to ``size`` and convolve.

    Nearest-neighbour resizing to an exact ``size`` undoes :class:`Down`'s ``ceil`` for
    odd sizes (4 -> 7), which a stride-2 transposed convolution cannot.
    Shape contract: ``(..., c_in, h, w) -> (..., c_out, *size)``.
    """

    def __init__(self, c_in, c_out, size, blocks=1, batch_norm=False, slope=0.1):
        super().__init__()
        self.res = nn.Sequential(*[ResBlock(c_in, batch_norm, slope) for _ in range(blocks)])
        self.out = nn.Sequential(*_conv_bn_act(c_in, c_out, batch_norm, slope))
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fold(self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.res(x), size=self.size, mode="nearest")  # (N, c_in, *size)
        return self.out(h)


class ConvGaussianHead(nn.Module):
    """``loc = Conv1x1(d)``, ``scale = sqrt(Softplus(Conv1x1(d)) + var_floor)`` per pixel.

    The convolutional twin of :class:`~pyro_ladder.layers.GaussianHead`.
    Shape contract: ``(..., c_in, H, W) -> 2 x (..., c_out, H, W)``.
    """

    def __init__(self, c_in: int, c_out: int, var_floor: float = 1e-4):
        super().__init__()
        self.net = nn.Conv2d(c_in, 2 * c_out, 1)
        self.var_floor = var_floor

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, var = fold(self.net, d).chunk(2, dim=-3)  # (..., c_out, H, W) each
        return loc, (F.softplus(var) + self.var_floor).sqrt()


class Embed(nn.Module):
    """A 3x3 convolution that maps a latent ``z (..., k, H, W)`` into ``(..., c, H, W)``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.net = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return fold(self.net, z)


def resolutions(image_shape: tuple[int, int], depth: int) -> list[tuple[int, int]]:
    """Latent resolutions ``[r_1, .., r_L]``: each :class:`Down` halves (rounding up)."""
    out, (h, w) = [], image_shape
    for _ in range(depth):
        h, w = (h + 1) // 2, (w + 1) // 2
        out.append((h, w))
    return out
