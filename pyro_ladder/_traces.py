"""Trace helpers shared by evaluation and the estimators: per-data-point log-densities."""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from .errors import ConfigError

DATA_PLATE = "data"


def sample_sites(trace):
    for name, site in prune_subsample_sites(trace).nodes.items():
        if site["type"] == "sample":
            yield name, site


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


def max_plate_nesting(model, guide, args, kwargs) -> int:
    """Deepest plate used by the guide or the model (None: the guide alone), from one trace
    of each."""
    traces = [poutine.trace(guide).get_trace(*args, **kwargs)]
    if model is not None:
        replayed = poutine.replay(model, trace=traces[0])
        traces.append(poutine.trace(replayed).get_trace(*args, **kwargs))
    dims = [
        -f.dim
        for trace in traces
        for _, site in sample_sites(trace)
        for f in site["cond_indep_stack"]
        if f.vectorized
    ]
    return max(dims, default=1)


def split_parameters(model, guide, args, kwargs) -> tuple[dict, dict, dict]:
    """Unconstrained parameters as ``(guide_only, model, shared)``, each ``{name: tensor}``.

    ``model`` holds every parameter the model registers, including those the guide
    shares (the ladder's prior networks), which ``shared`` lists on their own;
    ``guide_only`` holds the rest of the guide's.
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return split_traced_parameters(model_trace, guide_trace)


def split_traced_parameters(model_trace, guide_trace) -> tuple[dict, dict, dict]:
    """:func:`split_parameters` from traces already taken."""
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
