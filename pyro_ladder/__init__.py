"""pyro_ladder: hierarchical VAEs (the Ladder VAE and its bottom-up baseline) in Pyro.

Building blocks for new model/guide pairs: :class:`MLP`, :class:`GaussianHead`,
:class:`GaussianBlock` and :func:`broadcast_cat` (networks), :func:`precision_weighted` (the
ladder's merge), :class:`BernoulliLikelihood` / :class:`GaussianLikelihood` (``p(x | z1)``)
and :class:`LatentWeight` (KL warm-up for any pair); ``examples/custom_pair.py`` builds a
pair from them. ``LadderVAE(..., condition_dim=C)`` is a class-conditional ladder; its data
are packed ``x' = (x, c)`` by :func:`pyro_ladder.condition.pack`. :class:`ConvLadderVAE`
is a convolutional ladder with the same site contract; :class:`FreeBits` floors each
layer's KL (Kingma et al. 2016) for any pair.
"""

from ._memo import reuse_outputs
from ._traces import clear_roles_cache
from .allocator import keep_freed_memory
from .config import PRESETS, LadderConfig, preset
from .conv import ConvLadderConfig, ConvLadderVAE
from .diagnostics import active_units, effective_sample_size, gradient_snr, mutual_information
from .elbo import ESTIMATORS, make_elbo
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NumericalError,
    PyroLadderError,
    TrainingError,
)
from .evaluate import evaluate, log_likelihood
from .freebits import FreeBits
from .layers import MLP, GaussianBlock, GaussianHead, broadcast_cat
from .likelihoods import BernoulliLikelihood, GaussianLikelihood, make_likelihood
from .merge import precision_weighted
from .train import fit
from .vae import LadderVAE
from .warmup import LatentWeight, kl_weight, with_kl_weight

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "MLP",
    "BernoulliLikelihood",
    "GaussianBlock",
    "GaussianHead",
    "GaussianLikelihood",
    "broadcast_cat",
    "make_likelihood",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "ConvLadderConfig",
    "ConvLadderVAE",
    "DataError",
    "FreeBits",
    "LadderConfig",
    "LadderVAE",
    "LatentWeight",
    "NumericalError",
    "PyroLadderError",
    "TrainingError",
    "effective_sample_size",
    "active_units",
    "evaluate",
    "fit",
    "gradient_snr",
    "keep_freed_memory",
    "kl_weight",
    "log_likelihood",
    "mutual_information",
    "make_elbo",
    "precision_weighted",
    "preset",
    "reuse_outputs",
    "clear_roles_cache",
    "with_kl_weight",
]
