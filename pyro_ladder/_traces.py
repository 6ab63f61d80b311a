"""The one home of trace plumbing for the estimators, evaluation, diagnostics and surrogates.

* :func:`particle_traces`: ``S`` vectorized draws of a guide and the model replayed on
  them (the particle plate left of every plate the pair uses);
* :func:`per_datapoint`, :func:`site_log_prob` and :func:`log_density`: a trace's
  log-densities reduced to ``(S, B)`` per (particle, data point). Whether site scales
  apply is decided in :func:`site_log_prob` alone;
* :func:`site_kl`: ``KL(q || p)`` of one latent site, analytic where torch knows it, else
  the Monte Carlo ``log q - log p`` at the sample;
* :func:`check_guide_covers_model` and :func:`check_reparameterized`: what importance
  weighting needs of a pair;
* :func:`parameter_roles` (and :func:`split_parameters`): which parameters a pair uses, by
  role. Every estimator and diagnostic asks here, so the rule lives in one place.

None of these open a reuse scope (:mod:`pyro_ladder._memo`): the caller opens one around
the whole computation whose guide outputs its model may reuse.
"""

from __future__ import annotations

import contextlib

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites

from ._util import without_side_effects
from .errors import ConfigError

DATA_PLATE = "data"


def sample_sites(trace):
    for name, site in prune_subsample_sites(trace).nodes.items():
        if site["type"] == "sample":
            yield name, site


def latent_sites(trace):
    """``(name, site)`` of the unobserved sample sites, in trace order."""
    return [(n, s) for n, s in sample_sites(trace) if not s["is_observed"]]


def particle_traces(model, guide, args, kwargs, particles=None):
    """``(guide_trace, model_trace)``: the guide traced, and the model replayed on it
    (``None`` when ``model`` is ``None``), inside ``particles`` (a ``pyro.plate`` of the
    vectorized draws; ``None``: one draw, no particle plate)."""
    with particles if particles is not None else contextlib.nullcontext():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if model is None:
            return guide_trace, None
        replayed = poutine.replay(model, trace=guide_trace)
        return guide_trace, poutine.trace(replayed).get_trace(*args, **kwargs)


def particle_plate(name: str, size: int, nesting: int):
    """The plate of ``size`` vectorized draws, left of ``nesting`` plates."""
    return pyro.plate(name, size, dim=-(nesting + 1))


def max_plate_nesting(model, guide, args, kwargs) -> int:
    """Deepest plate used by the guide or the model (None: the guide alone), from one trace
    of each, taken without side effects (:func:`~pyro_ladder._util.without_side_effects`)."""
    with without_side_effects(model, guide):
        traces = [t for t in particle_traces(model, guide, args, kwargs) if t is not None]
    dims = [
        -f.dim
        for trace in traces
        for _, site in sample_sites(trace)
        for f in site["cond_indep_stack"]
        if f.vectorized
    ]
    return max(dims, default=1)


def per_datapoint(site, value: torch.Tensor, nesting: int) -> torch.Tensor:
    """Reduce a site's ``log_prob`` to ``(S, B)``: sum every plate but particles and data."""
    data_dims = [f.dim for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    if not data_dims or data_dims[0] is None:
        raise ConfigError(
            f"site {site['name']!r} is outside pyro.plate({DATA_PLATE!r}, ...): per-data-point "
            "evaluation needs every sample site inside that plate"
        )
    full = nesting + 1
    value = value.reshape((1,) * (full - value.dim()) + value.shape)  # (S|1, ..., B|1, ...)
    keep = {0, full + data_dims[0]}
    others = [d for d in range(full) if d not in keep]
    if others:
        value = value.sum(others, keepdim=True)
    return value.reshape(value.shape[0], value.shape[full + data_dims[0]])  # (S|1, B|1)


def site_log_prob(site, scaled: bool) -> torch.Tensor:
    """A site's elementwise log-density with its mask applied, times its scale when
    ``scaled`` (the estimators: a KL warm-up's weight, and today also the data plate's
    subsample scale, apply inside the weights, as in Pyro's ``RenyiELBO``) or not
    (evaluation: the model's own density). The one place that decides what scales mean."""
    log_p = site["fn"].log_prob(site["value"])
    if scaled:
        return scale_and_mask(log_p, site["scale"], site["mask"])
    mask = site["mask"]
    if mask is False:
        return torch.zeros_like(log_p)
    if mask is not None and mask is not True:
        log_p = torch.where(mask, log_p, torch.zeros_like(log_p))
    return log_p


def log_density(trace, nesting: int, scaled: bool, only=None) -> torch.Tensor:
    """Sum of the sites' log-densities (those named in ``only``, default all) per
    (particle, data point): ``(S|1, B|1)``."""
    total = 0.0
    for name, site in sample_sites(trace):
        if only is None or name in only:
            total = total + per_datapoint(site, site_log_prob(site, scaled), nesting)
    return total


def site_kl(q_site, p_site) -> tuple[torch.Tensor, bool]:
    """``(KL(q || p), analytic)`` of one latent site at the sampled parents, elementwise
    over the batch: analytic where torch knows it, else ``log q - log p`` at the sample
    (``analytic`` False). Unscaled, unmasked."""
    try:
        return torch.distributions.kl_divergence(q_site["fn"], p_site["fn"]), True
    except NotImplementedError:
        value = q_site["value"]
        return q_site["fn"].log_prob(value) - p_site["fn"].log_prob(value), False


def check_guide_covers_model(model_trace, guide_trace) -> None:
    """Refuse a latent model site the guide does not sample: importance weighting needs it."""
    for name, site in sample_sites(model_trace):
        if not site["is_observed"] and name not in guide_trace.nodes:
            raise ConfigError(
                f"model site {name!r} has no guide site: importance weighting needs the "
                "guide to sample every latent of the model (a discrete site summed out of "
                "the model trains with 'enum' only, and needs a guide site to be evaluated)"
            )


def check_reparameterized(trace, estimator: str) -> None:
    """Raise :class:`ConfigError` naming the first latent guide site without ``rsample``."""
    for name, site in latent_sites(trace):
        if not site["fn"].has_rsample:
            raise ConfigError(
                f"{estimator} needs reparameterized guide sites, but site {name!r} "
                f"({type(site['fn']).__name__}) has no rsample (a discrete layer): train it "
                "with 'tracegraph' (score function with baselines) or 'enum' (exact sum)"
            )


def split_parameters(model, guide, args, kwargs) -> tuple[dict, dict, dict]:
    """:func:`parameter_roles` of a pair, from one trace of the guide and the model."""
    guide_trace, model_trace = particle_traces(model, guide, args, kwargs)
    return parameter_roles(model_trace, guide_trace)


def parameter_roles(model_trace, guide_trace) -> tuple[dict, dict, dict]:
    """Unconstrained parameters as ``(guide_only, model, shared)``, each ``{name: tensor}``.

    ``model`` holds every parameter the model registers, including those the guide
    shares (the ladder's prior networks), which ``shared`` lists on their own;
    ``guide_only`` holds the rest of the guide's. Roles follow registration today; this is
    the one function that decides them.
    """
    store = dict(pyro.get_param_store().named_parameters())

    def params(trace):  # by tensor identity: one tensor may be registered under two names
        found = {}
        for name, site in trace.nodes.items():
            if site["type"] == "param":
                found.setdefault(id(store[name]), (name, store[name]))
        return found

    in_model, in_guide = params(model_trace), params(guide_trace)
    model_params = dict(in_model.values())
    guide_only = dict(v for k, v in in_guide.items() if k not in in_model)
    shared = dict(v for k, v in in_guide.items() if k in in_model)
    return guide_only, model_params, shared
