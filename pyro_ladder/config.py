"""Configuration of a ladder network: a frozen, typed dataclass with named presets."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

from .errors import ConfigError
from .guide import INFERENCE
from .likelihoods import LIKELIHOODS

INFERENCES = tuple(INFERENCE)
"""Names of the inference networks: the keys of the one registry,
:data:`pyro_ladder.guide.INFERENCE`, which maps each to its class."""


@dataclass(frozen=True)
class LadderConfig:
    """Sizes and choices of a hierarchical VAE; layer 1 is next to the data.

    ``latent_dims[i]`` and ``hidden_dims[i]`` belong to stochastic layer ``i + 1``: the
    deterministic block below ``z{i+1}`` has ``hidden_dims[i]`` units and ``z{i+1}`` has
    ``latent_dims[i]`` dimensions. ``condition_dim > 0`` makes the model conditional
    (see :class:`~pyro_ladder.vae.LadderVAE`). Build one with :meth:`from_dict` (rejects
    unknown keys) or :func:`preset`.
    """

    x_dim: int  # pixels per image: the size of the observed vector x
    latent_dims: tuple[int, ...] = (64, 32, 16, 8, 4)  # the paper's MNIST ladder, z1 first
    hidden_dims: tuple[int, ...] = (512, 256, 128, 64, 32)  # the paper's MLP widths, d1 first
    likelihood: str = "bernoulli"  # binary pixels; "gaussian" for continuous data
    inference: str = "top-down"  # the ladder; "bottom-up" is the classic hierarchical VAE
    batch_norm: bool = True  # the paper reports BN as essential for deep ladders
    var_floor: float = 1e-4  # added to softplus variances: keeps precisions finite
    leaky_slope: float = 0.1  # slope of the leaky ReLU in every MLP
    condition_dim: int = 0  # size of c in p(z | c) p(x | z, c), e.g. the classes; 0: none

    def __post_init__(self):
        _check_positive("x_dim", (self.x_dim,))
        _check_positive("latent_dims", self.latent_dims)
        _check_positive("hidden_dims", self.hidden_dims)
        object.__setattr__(self, "latent_dims", tuple(int(d) for d in self.latent_dims))
        object.__setattr__(self, "hidden_dims", tuple(int(d) for d in self.hidden_dims))
        if len(self.latent_dims) != len(self.hidden_dims):
            raise ConfigError(
                f"latent_dims has {len(self.latent_dims)} layers but hidden_dims has "
                f"{len(self.hidden_dims)}: give one hidden size per stochastic layer "
                "(argument `hidden_dims`) for each latent size (argument `latent_dims`)"
            )
        _check_choice("likelihood", self.likelihood, sorted(LIKELIHOODS))
        _check_choice("inference", self.inference, INFERENCES)
        c = self.condition_dim
        if not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 0:
            raise ConfigError(
                f"condition_dim must be an integer >= 0 (0: unconditional; the number of "
                f"classes for a class label), got {c!r}"
            )
        object.__setattr__(self, "condition_dim", int(c))
        if not self.var_floor > 0:
            raise ConfigError(f"var_floor must be > 0, got {self.var_floor}")

    @property
    def depth(self) -> int:
        """Number of stochastic layers L."""
        return len(self.latent_dims)

    def to_dict(self) -> dict:
        """Plain data (lists, numbers, strings) for JSON and checkpoints."""
        out = dataclasses.asdict(self)
        out["latent_dims"] = list(self.latent_dims)
        out["hidden_dims"] = list(self.hidden_dims)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> LadderConfig:
        """Build a config, refusing keys it does not know (a misspelt key is an error)."""
        check_known_keys(cls, values)
        try:
            return cls(**values)
        except TypeError as err:  # a missing required key such as x_dim
            raise ConfigError(f"incomplete config: {err}") from None

    def replace(self, **changes) -> LadderConfig:
        """A copy with some fields changed, validated like a new config."""
        return LadderConfig.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class _Preset:
    latent_dims: tuple[int, ...]
    hidden_dims: tuple[int, ...]
    note: str = field(default="", compare=False)


PRESETS = {
    "paper-mnist": _Preset(
        (64, 32, 16, 8, 4),
        (512, 256, 128, 64, 32),
        "Sonderby et al. (2016): 5 stochastic layers on MNIST",
    ),
    "digits": _Preset(
        (16, 8, 4),
        (128, 64, 32),
        "3 layers sized for the 8x8 digits: trains in about a minute on 2 cores",
    ),
    "small": _Preset((8, 4), (64, 32), "2 layers for tests and quick checks"),
}


def preset(name: str, x_dim: int, **overrides) -> LadderConfig:
    """The named network for data of ``x_dim`` features, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    values = {"x_dim": x_dim, "latent_dims": p.latent_dims, "hidden_dims": p.hidden_dims}
    return LadderConfig.from_dict({**values, **overrides})


def _check_positive(name, values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ConfigError(f"{name} must be a list of sizes, got {values!r}")
    if len(values) == 0:
        raise ConfigError(f"{name} is empty: give at least one size")
    for v in values:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name} must hold positive integers, got {list(values)}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def check_known_keys(cls, values) -> None:
    """Refuse a ``values`` that is not a mapping or names a field ``cls`` (a config
    dataclass) does not have: a misspelt key is an error, never silently dropped."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys are {sorted(known)}")
