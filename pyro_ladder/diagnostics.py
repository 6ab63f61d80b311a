"""Estimator diagnostics: gradient signal-to-noise ratio and effective sample size."""

from __future__ import annotations

import torch

from ._traces import split_parameters
from .errors import ConfigError
from .evaluate import evaluate


def gradient_snr(model, guide, elbo, data, *args, num_draws: int = 64, **kwargs) -> dict:
    r"""Signal-to-noise ratio of ``elbo``'s gradient at fixed parameters (Rainforth et al. 2018).

    Draws ``num_draws`` independent gradients of the loss on the same batch ``data`` and,
    per parameter group, reports for the elementwise ratio ``|mean| / std`` its ``mean``
    and ``median`` (elements with zero spread are left out), and ``aggregate``: the mean
    of the squared means over the mean of the variances (Tucker et al. 2019's summary, on
    the squared scale). Groups: ``"guide"`` holds the guide's own parameters, ``"model"``
    every parameter the model registers, those it shares with the guide included, and
    ``"shared"`` those shared ones alone (empty for a guide with its own networks).
    Leaves the parameters' ``.grad`` cleared.

    :returns: ``{"guide": {...}, "model": {...}, "shared": {...}, "num_draws": n}``.
    """
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ConfigError(f"num_draws must be an integer >= 2, got {num_draws!r}")
    guide_only, model_params, shared = split_parameters(model, guide, (data, *args), kwargs)
    groups = {
        "guide": list(guide_only.values()),
        "model": list(model_params.values()),
        "shared": list(shared.values()),
    }
    everything = groups["guide"] + groups["model"]
    draws = {name: [] for name in groups}
    for _ in range(num_draws):
        for p in everything:
            p.grad = None
        elbo.loss_and_grads(model, guide, data, *args, **kwargs)
        for name, params in groups.items():
            draws[name].append(_flat_grad(params))
    for p in everything:
        p.grad = None
    out = {name: _summarize(torch.stack(d)) for name, d in draws.items()}
    out["num_draws"] = num_draws
    return out


def effective_sample_size(model, guide, data, *args, num_samples: int = 100, **kwargs):
    """``(sum_k w_k)^2 / sum_k w_k^2`` per data point, from ``num_samples`` draws: ``(N,)``."""
    return evaluate(model, guide, data, *args, num_samples=num_samples, **kwargs)["ess"]


def _flat_grad(params) -> torch.Tensor:
    if not params:
        return torch.zeros(0)
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
    ).detach()


def _summarize(draws: torch.Tensor) -> dict:
    """``draws (R, P)`` -> mean / median of ``|mean| / std`` and the aggregate ratio."""
    if draws.shape[1] == 0:
        return {
            "mean": float("nan"),
            "median": float("nan"),
            "aggregate": float("nan"),
            "num_params": 0,
        }
    mean, var = draws.mean(0), draws.var(0)
    spread = var > 0
    snr = mean[spread].abs() / var[spread].sqrt()
    return {
        "mean": snr.mean().item(),
        "median": snr.median().item(),
        "aggregate": (mean.square().mean() / var.mean()).item(),
        "num_params": draws.shape[1],
    }
