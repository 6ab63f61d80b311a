"""pyro_ladder: hierarchical VAEs (the Ladder VAE and its bottom-up baseline) in Pyro."""

from .config import PRESETS, LadderConfig, preset
from .diagnostics import active_units, effective_sample_size, gradient_snr, mutual_information
from .elbo import ESTIMATORS, make_elbo
from .errors import CheckpointError, ConfigError, DataError, PyroLadderError, TrainingError
from .evaluate import evaluate, log_likelihood
from .merge import precision_weighted
from .train import fit
from .vae import LadderVAE
from .warmup import LatentWeight, kl_weight, with_kl_weight

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LadderConfig",
    "LadderVAE",
    "LatentWeight",
    "PyroLadderError",
    "TrainingError",
    "effective_sample_size",
    "active_units",
    "evaluate",
    "fit",
    "gradient_snr",
    "kl_weight",
    "log_likelihood",
    "mutual_information",
    "make_elbo",
    "precision_weighted",
    "preset",
    "with_kl_weight",
]
