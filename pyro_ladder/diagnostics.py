"""Estimator diagnostics: gradient signal-to-noise ratio and effective sample size."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ._checks import check_data_arg, check_estimator_arg, check_pair_args
from ._memo import ReuseOutputs
from ._traces import (
    latent_sites,
    max_plate_nesting,
    parameter_roles,
    particle_plate,
    particle_traces,
    site_kl,
)
from ._util import eval_mode, kept_buffers, modules_of
from .errors import ConfigError
from .evaluate import evaluate


def gradient_snr(model, guide, elbo, data, *args, num_draws: int = 64, **kwargs) -> dict:
    r"""Signal-to-noise ratio of ``elbo``'s gradient at fixed parameters (Rainforth et al. 2018).

    Draws ``num_draws`` independent gradients of the loss on the same batch ``data`` and,
    per parameter group, reports for the elementwise ratio ``|mean| / std`` its ``mean``
    and ``median`` (elements with zero spread are left out), and ``aggregate``: the mean
    of the squared means over the mean of the variances (Tucker et al. 2019's summary, on
    the squared scale). Groups, by autograd dependence whatever the registration
    (:func:`~pyro_ladder._traces.parameter_roles`): ``"guide"`` holds the parameters only
    the guide depends on, ``"model"`` every parameter the model's density depends on,
    those the guide depends on too included, and ``"shared"`` those shared ones alone
    (empty for a guide with its own networks).
    Leaves the parameters' ``.grad`` cleared and the model as it found it: the draws run
    in training mode, but the batch-norm statistics they move are put back afterwards
    (modules behind bound methods such as ``vae.model``).

    :returns: ``{"guide": {...}, "model": {...}, "shared": {...}, "num_draws": n}``.
    """
    check_pair_args("gradient_snr", model=model, guide=guide)
    check_estimator_arg("gradient_snr", elbo)
    check_data_arg("gradient_snr", data)
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ConfigError(f"num_draws must be an integer >= 2, got {num_draws!r}")
    guide_only, model_params, shared = parameter_roles(model, guide, (data, *args), kwargs)
    groups = {
        "guide": list(guide_only.values()),
        "model": list(model_params.values()),
        "shared": list(shared.values()),
    }
    everything = groups["guide"] + groups["model"]
    draws = {name: [] for name in groups}
    with kept_buffers(model, guide):
        for _ in range(num_draws):
            for p in everything:
                p.grad = None
            elbo.loss_and_grads(model, guide, data, *args, **kwargs)
            for name, params in groups.items():
                draws[name].append(_flat_grad(params, data))
    for p in everything:
        p.grad = None
    out = {name: _summarize(torch.stack(d)) for name, d in draws.items()}
    out["num_draws"] = num_draws
    return out


def effective_sample_size(model, guide, data, *args, num_samples: int = 100, **kwargs):
    """``(sum_k w_k)^2 / sum_k w_k^2`` per data point, from ``num_samples`` draws: ``(N,)``."""
    check_pair_args("effective_sample_size", model=model, guide=guide)
    check_data_arg("effective_sample_size", data)
    return evaluate(model, guide, data, *args, num_samples=num_samples, **kwargs)["ess"]


def _flat_grad(params, like: torch.Tensor) -> torch.Tensor:
    if not params:  # an empty group: (0,) on the data's device and dtype
        return like.new_zeros(0)
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


@torch.no_grad()
def active_units(
    model,
    guide,
    data,
    *args,
    num_samples: int = 16,
    threshold: float = 0.01,
    batch_size: int = 500,
    **kwargs,
) -> dict:
    """Active units per latent site (Burda et al. 2015): unit ``u`` of ``z_l`` is active
    when ``Cov_x(E_q[u | x]) > threshold``.

    ``E_q[z_l | x]`` is the mean of the site's guide distribution averaged over
    ``num_samples`` draws of the sites sampled before it (exact for the first site).
    Discrete sites (a categorical layer) have no units and are left out. A spatial
    site ``(C, h, w)`` has ``k = C * h * w`` units, flattened channel-major.

    :returns: ``{site: {"variance": (k,), "active": int, "units": k}}``.
    """
    check_pair_args("active_units", guide=guide)  # the model is not used
    check_data_arg("active_units", data)
    means = defaultdict(list)
    with eval_mode(*modules_of(model, guide)):
        for start in range(0, len(data), batch_size):
            x = data[start : start + batch_size]
            for name, site in _guide_sites(guide, (x, *args), kwargs, num_samples):
                if site["fn"].support.is_discrete:
                    continue
                loc = site["fn"].mean.expand(site["value"].shape)  # (S, B, *event)
                means[name].append(loc.mean(0))  # (B, *event)
    out = {}
    for name, parts in means.items():
        variance = torch.cat(parts).var(0).flatten()  # (k,): spatial units flattened
        out[name] = {
            "variance": variance,
            "active": int((variance > threshold).sum()),
            "units": variance.numel(),
        }
    return out


@torch.no_grad()
def mutual_information(
    guide, data, *args, num_samples: int = 16, max_elements: int = 2**24, **kwargs
) -> dict:
    r"""``I_q(x; z_l)`` per latent site in nats, over the data points in ``data``.

    The "ELBO surgery" decomposition ``E_x KL(q(z_l|x) || p(z_l)) - KL(q(z_l) || p(z_l))``
    equals ``E_x E_{q(z_l|x)}[log q(z_l|x) - log q(z_l)]``, estimated here with the aggregate
    posterior ``q(z_l) = (1/N) sum_m q(z_l | x_m)`` over the ``N`` rows of ``data`` (so the
    estimate cannot exceed ``log N``: use a few hundred rows or more). For a site sampled
    after others, ``q(z_l | x)`` is the mixture of its conditional over ``num_samples`` draws
    of those sites. A site may have several event dimensions (a spatial ``(C, h, w)``
    latent). The ``N^2 * num_samples * units`` log-densities are computed in chunks of
    about ``max_elements``, so memory stays bounded.

    :returns: ``{site: float}``.
    """
    check_pair_args("mutual_information", guide=guide)
    check_data_arg("mutual_information", data)
    n = len(data)
    out = {}
    with eval_mode(*modules_of(guide)):
        sites = _guide_sites(guide, (data, *args), kwargs, num_samples)
    for name, site in sites:
        if site["value"].shape[:2] != (num_samples, n) or site["fn"].event_dim < 1:
            raise ConfigError(
                f"mutual_information needs site {name!r} shaped (particles, data, *units) "
                "inside pyro.plate('data') alone, with at least one event dimension"
            )
        log_q = _cross_log_density(site["fn"], site["value"][0], max_elements)  # (N_z, S, N_x)
        log_q = log_q.logsumexp(1) - math.log(num_samples)  # (N_z, N_x): log q(z_n | x_m)
        own = log_q.diagonal()
        aggregate = log_q.logsumexp(1) - math.log(n)
        out[name] = (own - aggregate).mean().item()
    return out


def _cross_log_density(fn, z: torch.Tensor, max_elements: int) -> torch.Tensor:
    """``fn.log_prob`` of every ``z_n (N, *event)`` under every component of ``fn`` (batch
    ``(S, N)``): ``(N, S, N)``, a chunk of ``z`` rows at a time."""
    per_row = max(1, fn.batch_shape.numel() * fn.event_shape.numel())
    chunk = max(1, max_elements // per_row)
    event = z.shape[1:]
    parts = [
        fn.log_prob(rows.reshape(len(rows), 1, 1, *event)).expand(len(rows), *fn.batch_shape)
        for rows in z.split(chunk)
    ]
    return torch.cat(parts)  # (N_z, S, N_x)


@torch.no_grad()
def kl_per_unit(model, guide, data, *args, num_samples: int = 16, **kwargs) -> dict:
    """Mean ``KL(q(u | .) || p(u | .))`` per unit of every latent site, nats: ``{site: (k,)}``.

    For sites whose distributions factorize over units (``Independent`` over per-unit
    distributions; a spatial ``(C, h, w)`` site has ``k = C * h * w`` units, flattened
    channel-major): analytic per unit where torch has the KL
    (Gaussians), else ``log q(u) - log p(u)`` at the sampled unit (an elementwise flow
    prior, say); at the sampled parents, averaged over ``num_samples`` draws and the rows
    of ``data``. A site's units sum to its per-layer KL; the paper plots them sorted, on a
    log scale.
    """
    check_pair_args("kl_per_unit", model=model, guide=guide)
    check_data_arg("kl_per_unit", data)
    with eval_mode(*modules_of(model, guide)):
        guide_trace, model_trace = _particle_traces(
            model, guide, (data, *args), kwargs, num_samples
        )
    out = {}
    for name, q_site in latent_sites(guide_trace):
        q, n = _per_unit(q_site["fn"], name)  # n event dimensions: 1, or 3 for (C, h, w)
        p, _ = _per_unit(model_trace.nodes[name]["fn"], name)
        kl, _ = site_kl({"fn": q, "value": q_site["value"]}, {"fn": p})  # (S, B, *event)
        kl = kl.flatten(-n) if n > 1 else kl  # (S, B, k)
        out[name] = kl.reshape(-1, kl.shape[-1]).mean(0)
    return out


def _per_unit(fn, name):
    """``(base, n)``: the per-unit distribution behind a site ``Independent(base, n)``
    (``base.log_prob`` has one value per unit, over the last ``n`` dimensions)."""
    independent = isinstance(fn, torch.distributions.Independent)
    if not independent or fn.base_dist.event_shape != ():
        raise ConfigError(
            f"kl_per_unit needs sites that factorize over units, Independent(base, n) with a "
            f"per-unit base (dist.Normal(loc, scale).to_event(n)); {name!r} is "
            f"{type(fn).__name__} with event shape {tuple(fn.event_shape)}"
        )
    return fn.base_dist, fn.reinterpreted_batch_ndims


def _particle_traces(model, guide, args, kwargs, num_samples):
    """Guide trace and replayed model trace (``None`` without a model) with
    ``num_samples`` vectorized draws, in one reuse scope."""
    with ReuseOutputs():
        nesting = max_plate_nesting(None, guide, args, kwargs)
        particles = particle_plate("_diagnostic_particles", num_samples, nesting)
        return particle_traces(model, guide, args, kwargs, particles)


def _guide_sites(guide, args, kwargs, num_samples):
    """Latent guide sites of one vectorized trace with a particle plate left of the plates."""
    trace, _ = _particle_traces(None, guide, args, kwargs, num_samples)
    return latent_sites(trace)
