"""``RunSpec``: a frozen, typed description of one training run, and the per-data-set
defaults it is resolved with (once, by :meth:`RunSpec.resolved`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config import LadderConfig, preset
from ..conv import CONV_PRESETS, ConvLadderConfig, conv_preset
from ..errors import ConfigError
from .device import check_device_name

SEEDS = (0, 2**32 - 1)
"""The seeds a run accepts (those of ``pyro.set_rng_seed``, numpy's range)."""

DATASETS_WITH_LABELS = ("digits", "mnist", "fashion-mnist")
"""Data sets whose class labels a conditional run (``condition="label"``) can use."""


def default_preset(dataset: str) -> str:
    """The network a run on ``dataset`` uses unless it names one."""
    return "digits" if dataset == "digits" else "paper-mnist"


COMPILE_KINDS = ("step", "capture", "networks")  # make_elbo's compile, besides True and False


def is_conv(preset_name: str | None) -> bool:
    """Whether ``preset_name`` names a convolutional network (:data:`CONV_PRESETS`)."""
    return preset_name in CONV_PRESETS


def default_epochs(dataset: str) -> int:
    """Epochs unless given: the small digits train long, image data sets briefly."""
    return 200 if dataset == "digits" else 10


RESUMABLE = (
    "dataset", "preset", "latent_dims", "hidden_dims", "inference", "condition", "likelihood",
    "elbo", "particles", "epochs", "batch_size", "lr", "warmup_epochs", "batch_norm",
    "eval_samples", "eval_limit", "seed", "checkpoint_every", "free_bits",
)  # fmt: skip
"""The fields stored in a run's checkpoint; resuming takes them from it."""


@dataclass(frozen=True)
class RunSpec:
    """What ``pyro-ladder train`` does, as data; ``None`` means "the data set's default".

    Build one in Python (``RunSpec(dataset="digits", epochs=5)``) or let the CLI build it;
    :func:`~pyro_ladder.runs.train` resolves the defaults with :meth:`resolved`.
    """

    dataset: str = "digits"  # embedded, no download
    data_dir: Path | None = None  # where data files live; None: $PYRO_LADDER_DATA, then cache
    preset: str | None = None  # None: default_preset(dataset)
    latent_dims: tuple[int, ...] | None = None  # None: the preset's (conv: latent channels)
    hidden_dims: tuple[int, ...] | None = None  # None: the preset's (conv: channels)
    inference: str = "top-down"  # the ladder; "bottom-up" is the classic hierarchical VAE
    condition: str | None = None  # "label": a class-conditional model p(x | c)
    likelihood: str | None = None  # None: gaussian for continuous data, bernoulli otherwise
    elbo: str = "elbo"  # estimator name (pyro_ladder.elbo.ESTIMATORS)
    particles: int = 1  # samples per data point
    epochs: int | None = None  # None: default_epochs(dataset)
    batch_size: int = 100  # rows per step (per process)
    lr: float = 1e-3  # Adam learning rate
    warmup_epochs: int | None = None  # None: a tenth of the epochs, as in the paper
    batch_norm: bool | None = None  # None: on for MLPs (the paper's choice), off for conv
    free_bits: float = 0.0  # KL floor per latent layer in nats (Kingma et al. 2016); 0: off
    # torch.compile: "step" (or True) the whole step captured and compiled, "capture" the
    # captured step uncompiled, "networks" the networks only
    compile: bool | str = False
    eval_samples: int = 5000  # importance samples K of the final test log p(x)
    eval_limit: int | None = None  # score N test images (a fixed random subset); None: all
    seed: int = 0  # seeds the model's initial weights and training
    checkpoint_every: int | None = None  # also save every N steps within an epoch
    tensorboard: Path | None = None  # also log scalars for TensorBoard into this folder
    progress: bool = True  # show progress bars
    devices: int = 1  # processes per machine (Lightning beyond 1)
    num_nodes: int = 1  # machines (Lightning beyond 1)
    strategy: str | None = None  # None: ddp with more than one process
    accelerator: str | None = None  # Lightning's accelerator; None: one process, no Lightning
    sync_batchnorm: bool = False  # batch-norm statistics over every process's batch
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda or cuda:N

    def __post_init__(self):
        check_device_name(self.device)
        if not (self.compile is False or self.compile is True or self.compile in COMPILE_KINDS):
            raise ConfigError(
                f"argument `compile` must be false, true, 'step', 'capture' or 'networks', got "
                f"{self.compile!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"argument `seed` must be an integer, got {self.seed!r}")
        if not SEEDS[0] <= self.seed <= SEEDS[1]:
            raise ConfigError(
                f"argument `seed` {self.seed} is outside [0, 2**32 - 1] (the seeds torch, "
                "numpy and Python share): choose a seed in that range"
            )
        if self.batch_size == 1 and self.batch_norm:
            raise ConfigError(
                "argument `batch_size` 1 with batch norm: batch norm in training mode needs "
                "at least 2 rows per batch; use a larger batch or turn batch norm off "
                "(argument `batch_norm` False)"
            )

    @property
    def distributed(self) -> bool:
        """Whether the run asks for PyTorch Lightning (several processes, a GPU)."""
        return (
            self.devices > 1
            or self.num_nodes > 1
            or self.strategy is not None
            or self.accelerator is not None
            or self.sync_batchnorm
        )

    def replace(self, **changes) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def resolved(self, kind: str) -> RunSpec:
        """This spec with every per-data-set default filled in, for data of ``kind``
        (``"continuous"``, ``"grey"`` or ``"binary"``). Resolving twice changes nothing."""
        epochs = self.epochs or default_epochs(self.dataset)
        name = self.preset or default_preset(self.dataset)
        # conv: batch statistics couple the particles of a step (issue 21)
        batch_norm = not is_conv(name) if self.batch_norm is None else self.batch_norm
        return self.replace(
            preset=name,
            batch_norm=batch_norm,
            likelihood=self.likelihood or ("gaussian" if kind == "continuous" else "bernoulli"),
            epochs=epochs,
            warmup_epochs=epochs // 10 if self.warmup_epochs is None else self.warmup_epochs,
        )

    def notes(self) -> list[str]:
        """Warnings about a resolved spec that trains but not as a user would expect (a
        run's metrics and report record them)."""
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            last = (self.epochs - 1) / self.warmup_epochs
            return [
                f"argument `warmup_epochs` {self.warmup_epochs} is not shorter than argument "
                f"`epochs` {self.epochs}: the run trains only on a down-weighted objective "
                f"(the KL weight ends at {last:.2f}, not 1), so its test numbers are not "
                "those of a trained model; train longer or warm up for fewer epochs"
            ]
        return []

    def options(self) -> dict:
        """The resumable fields as plain data, as a checkpoint stores them."""
        return {k: _plain(getattr(self, k)) for k in RESUMABLE}

    def config(self, x_dim: int, condition_dim: int = 0) -> LadderConfig:
        """The MLP network of a resolved spec for data of ``x_dim`` features."""
        self._check_order()
        overrides = {
            "likelihood": self.likelihood,
            "inference": self.inference,
            "batch_norm": self.batch_norm,
            "condition_dim": condition_dim,
        }
        if self.latent_dims:
            overrides["latent_dims"] = self.latent_dims
        if self.hidden_dims:
            overrides["hidden_dims"] = self.hidden_dims
        return preset(self.preset, x_dim, **overrides)

    def conv_config(self, image_shape: tuple[int, int]) -> ConvLadderConfig:
        """The convolutional network of a resolved spec (a conv preset) for images of
        ``image_shape (H, W)``: ``latent_dims`` and ``hidden_dims``, when given, are its
        latent channels and deterministic channels per layer."""
        self._check_order()
        if self.condition is not None:
            raise ConfigError(
                f"argument `preset` {self.preset} is unconditional: drop argument `condition`, "
                "or choose an MLP preset (paper-mnist, digits, small) for a conditional model"
            )
        overrides = {
            "image_shape": tuple(image_shape),
            "likelihood": self.likelihood,
            "inference": self.inference,
            "batch_norm": self.batch_norm,
        }
        if self.latent_dims:
            overrides["latent_channels"] = self.latent_dims
        if self.hidden_dims:
            overrides["channels"] = self.hidden_dims
        return conv_preset(self.preset, **overrides)

    def _check_order(self) -> None:
        if self.inference == "bottom-up" and "meanfield" in self.elbo:
            raise ConfigError(
                "argument `elbo` meanfield needs the guide to sample in the model's "
                "(top-down) order; use it with argument `inference` top-down, or pick "
                "argument `elbo` elbo for bottom-up"
            )


def _plain(value):
    """Tuples as lists, as JSON and checkpoints hold them."""
    return list(value) if isinstance(value, tuple) else value


def from_options(stored: dict, **given) -> RunSpec:
    """The spec of a saved run: its stored options, with the non-resumable ``given`` fields
    (``data_dir``, ``progress``, ``tensorboard``...) and possibly a larger ``epochs``."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    return RunSpec(**{**values, **given})
