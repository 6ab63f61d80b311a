"""Configuration of a convolutional ladder: a frozen, typed dataclass with presets."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from ..config import INFERENCES, LIKELIHOODS, check_known_keys
from ..errors import ConfigError


@dataclass(frozen=True)
class ConvLadderConfig:
    """Sizes and choices of a convolutional hierarchical VAE; layer 1 is next to the data.

    Stochastic layer ``i`` lives at resolution ``r_i = ceil(r_{i-1} / 2)`` (``r_0`` the
    image; 28x28 gives 14x14, 7x7, 4x4), with ``latent_channels[i-1]`` channels, and the
    deterministic paths at that resolution have ``channels[i-1]`` channels. Build one with
    :meth:`from_dict` (rejects unknown keys) or :func:`conv_preset`.
    """

    image_shape: tuple[int, int] = (28, 28)  # (H, W) of one image; x is (B, H * W)
    channels: tuple[int, ...] = (32, 64, 64)  # deterministic channels per layer, d1 first
    latent_channels: tuple[int, ...] = (8, 8, 8)  # channels of z1 .. zL (spatial latents)
    blocks: int = 1  # residual blocks per deterministic stage: depth at small CPU cost
    likelihood: str = "bernoulli"  # binary pixels; "gaussian" for grey/continuous data
    inference: str = "top-down"  # the ladder; "bottom-up" is the classic hierarchical VAE
    skip: bool = True  # deterministic skip path between layers: bypasses collapsed z's
    batch_norm: bool = False  # off: batch statistics couple particles (issue 21)
    var_floor: float = 1e-4  # added to softplus variances: keeps precisions finite
    leaky_slope: float = 0.1  # slope of every leaky ReLU

    def __post_init__(self):
        for name in ("image_shape", "channels", "latent_channels"):
            _check_positive(name, getattr(self, name))
            object.__setattr__(self, name, tuple(int(d) for d in getattr(self, name)))
        if len(self.image_shape) != 2:
            raise ConfigError(f"image_shape must be (H, W), got {self.image_shape}")
        if len(self.channels) != len(self.latent_channels):
            raise ConfigError(
                f"channels has {len(self.channels)} layers but latent_channels has "
                f"{len(self.latent_channels)}: give one of each per stochastic layer"
            )
        b = self.blocks
        if not isinstance(b, numbers.Integral) or isinstance(b, bool) or b < 0:
            raise ConfigError(f"blocks must be an integer >= 0, got {b!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(
                f"unknown likelihood {self.likelihood!r}; choose one of {LIKELIHOODS}"
            )
        if self.inference not in INFERENCES:
            raise ConfigError(f"unknown inference {self.inference!r}; choose one of {INFERENCES}")
        if not self.var_floor > 0:
            raise ConfigError(f"var_floor must be > 0, got {self.var_floor}")

    @property
    def depth(self) -> int:
        """Number of stochastic layers L."""
        return len(self.channels)

    @property
    def x_dim(self) -> int:
        """Pixels of one flattened image."""
        return self.image_shape[0] * self.image_shape[1]

    def to_dict(self) -> dict:
        """Plain data (lists, numbers, strings) for JSON and checkpoints."""
        out = dataclasses.asdict(self)
        for name in ("image_shape", "channels", "latent_channels"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, values: dict) -> ConvLadderConfig:
        """Build a config, refusing keys it does not know (a misspelt key is an error)."""
        check_known_keys(cls, values)
        return cls(**values)


CONV_PRESETS = {
    # 3 layers at 14x14, 7x7, 4x4 for 28x28 images; sized to train on a CPU in minutes
    "conv-mnist": dict(image_shape=(28, 28), channels=(32, 64, 64), latent_channels=(8, 8, 8)),
    # 2 layers for tests and quick checks
    "conv-small": dict(image_shape=(8, 8), channels=(8, 8), latent_channels=(2, 2)),
}


def conv_preset(name: str, **overrides) -> ConvLadderConfig:
    """The named convolutional network, with optional field overrides."""
    if name not in CONV_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(CONV_PRESETS)}")
    return ConvLadderConfig.from_dict({**CONV_PRESETS[name], **overrides})


def _check_positive(name, values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
        raise ConfigError(f"{name} must be a non-empty list of sizes, got {values!r}")
    for v in values:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name} must hold positive integers, got {list(values)}")
