"""Argument checks for the public entry points: a wrong type or a wrong order of the pair,
the estimator and the data gets an error naming the argument, before anything runs."""

from __future__ import annotations

import torch
from pyro.infer import ELBO

from .errors import ConfigError, DataError


def check_pair_args(where: str, **fns) -> None:
    """Each of ``fns`` (``model=...``, ``guide=...``) must be a callable pair function,
    not an estimator, a tensor or a config."""
    for name, fn in fns.items():
        if isinstance(fn, (ELBO, torch.Tensor)) or not callable(fn):
            raise ConfigError(
                f"{where}: {name} must be the pair's {name} function (e.g. vae.{name}), got "
                f"{_kind(fn)}; the arguments go in the order of {where}'s signature"
            )


def check_estimator_arg(where: str, elbo) -> None:
    """``elbo`` must be an estimator (``make_elbo(...)`` or a Pyro ELBO)."""
    if not isinstance(elbo, ELBO) and not callable(getattr(elbo, "loss_and_grads", None)):
        raise ConfigError(
            f"{where}: elbo must be an estimator such as make_elbo('iwae', 8), got "
            f"{_kind(elbo)}; the arguments go in the order of {where}'s signature"
        )


def check_data_arg(where: str, data, name: str = "data", nonempty: bool = True) -> None:
    """``data`` must be a tensor with a data dimension first (holding a data point, unless
    ``nonempty`` is False)."""
    if not isinstance(data, torch.Tensor):
        raise DataError(
            f"{where}: {name} must be a torch.Tensor of data points (N, ...), got {_kind(data)}"
        )
    if data.dim() == 0 or (nonempty and len(data) == 0):
        raise DataError(
            f"{where}: {name} must hold at least one data point along its first dimension, "
            f"got shape {tuple(data.shape)}"
        )


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r:.60}"
