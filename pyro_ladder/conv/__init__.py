"""A convolutional ladder: residual conv blocks, spatial latents at several resolutions.

:class:`ConvLadderVAE` keeps the site contract of :class:`~pyro_ladder.vae.LadderVAE`
(flat ``x (B, H * W)``, sites ``z{L}`` .. ``z1`` and ``x`` in one ``plate("data")``), so
the estimators, ``evaluate`` and the diagnostics serve it unchanged.
"""

from .config import CONV_PRESETS, ConvLadderConfig, conv_preset
from .vae import ConvLadderVAE

__all__ = ["CONV_PRESETS", "ConvLadderConfig", "ConvLadderVAE", "conv_preset"]
