r"""Per-data-point evaluation of any model/guide pair whose sites sit in ``plate("data")``.

With ``w_k = p(x, z_k) / q(z_k | x)`` for ``K`` draws ``z_k ~ q(z | x)``:

* ``log_likelihood``: ``log (1/K) sum_k w_k``, the importance-sampled estimate of
  ``log p(x)`` (Burda et al. 2015); a lower bound in expectation that tightens as ``K`` grows;
* ``elbo``: ``(1/K) sum_k log w_k``;
* ``iwae[k]``: the ``IWAE_k`` bound, averaged over ``K // k`` disjoint groups of ``k`` draws;
* ``ess``: the effective sample size ``(sum_k w_k)^2 / sum_k w_k^2`` of the ``K`` weights;
* ``kl[site]``: ``E_q[KL(q(z_l | .) || p(z_l | .))]`` per latent site, analytic where torch
  knows the KL, else Monte Carlo ``log q - log p``;
* ``cross_entropy[site]``: ``-E_q[log p(x | .)]`` per observed site. With ``kl`` this is the
  per-variable decomposition of the negative ELBO (a cross-entropy per observed variable, a
  KL per latent one): the terms add up to ``-elbo`` in expectation.

Pyro's ``vectorized_importance_weights`` sums over the data plate, so it yields one joint
weight per batch; here the weights are kept per data point. Draws are vectorized in a
particle plate left of the model's plates and processed in chunks of at most ``max_rows``
(particles x data points), so memory stays bounded for any ``K`` and any data size.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from . import device as placement
from ._checks import check_data_arg, check_pair_args
from ._memo import ReuseOutputs
from ._traces import (
    check_guide_covers_model,
    latent_sites,
    max_plate_nesting,
    model_mask,
    particle_plate,
    particle_traces,
    per_datapoint,
    sample_sites,
    site_kl,
    site_log_prob,
    weight_layout,
)
from ._util import eval_mode, modules_of
from .errors import ConfigError, NumericalError


@torch.no_grad()
def evaluate(
    model,
    guide,
    data: torch.Tensor,
    *args,
    num_samples: int = 5000,
    iwae_k: tuple[int, ...] = (),
    batch_size: int = 100,
    max_rows: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    **kwargs,
) -> dict:
    """Importance-sampled ``log p(x)``, ELBO, ``IWAE_k``, ESS and per-site KL, per data point.

    ``model(x, *args, **kwargs)`` and ``guide(x, *args, **kwargs)`` are called on batches
    ``x = data[i:j]``; networks that are bound methods of an ``nn.Module`` run in eval mode.

    :param data: ``(N, ...)`` data, split along the first dimension.
    :param num_samples: ``K``, importance samples per data point.
    :param iwae_k: group sizes ``k`` of the ``IWAE_k`` bounds to report (each ``<= K``).
    :param batch_size: data points per pass.
    :param max_rows: largest number of (sample, data point) pairs in one pass; memory stays
        bounded for any ``K`` and any data size. ``None``: 4096 on a CPU (a pass's
        activations stay in cache-sized blocks, measured fastest on the paper's network,
        ``benchmarks/``), 65536 on a GPU (see :mod:`pyro_ladder.device`).
    :param device: where to evaluate; the modules behind ``model`` and ``guide`` move there.
        ``None`` (default): where their parameters are (the data's device for a pair
        without modules). Each batch of ``data`` moves there as it is scored, so ``data``
        may stay on the host; the results are on that device.
    :returns: dict with ``log_likelihood``, ``elbo``, ``ess`` (each ``(N,)``), ``iwae``
        (``{k: (N,)}``), ``kl`` and ``cross_entropy`` (``{site: (N,)}``) and ``num_samples``.
    """
    check_pair_args("evaluate", model=model, guide=guide)
    check_data_arg("evaluate", data, nonempty=False)  # emptiness: _check_options
    device = placement.resolve(device, model, guide, data)
    max_rows = placement.default_max_rows(device) if max_rows is None else max_rows
    _check_options(data, num_samples, iwae_k, batch_size, max_rows)
    # inference mode: no autograd bookkeeping at all; the results leave it as ordinary
    # tensors (torch.cat below runs outside it)
    with eval_mode(*modules_of(model, guide)), torch.inference_mode():
        with ReuseOutputs():
            first = placement.to_device(data[:batch_size], device)
            nesting = max_plate_nesting(model, guide, (first, *args), kwargs)
        parts = defaultdict(list)
        for start in tqdm(range(0, len(data), batch_size), disable=not progress, unit="batch"):
            x = placement.to_device(data[start : start + batch_size], device)  # (B, ...)
            for key, value in _evaluate_batch(
                model, guide, x, args, kwargs, num_samples, iwae_k, max_rows, nesting
            ).items():
                parts[key].append(value)
    out = {key: torch.cat(values) for key, values in parts.items()}
    _check_finite(out)
    return {
        "log_likelihood": out.pop("log_likelihood"),
        "elbo": out.pop("elbo"),
        "ess": out.pop("ess"),
        "iwae": {k: out.pop(f"iwae{k}") for k in iwae_k},
        "kl": {name[3:]: value for name, value in out.items() if name.startswith("kl:")},
        "cross_entropy": {name[3:]: v for name, v in out.items() if name.startswith("ce:")},
        "num_samples": num_samples,
    }


def _check_finite(out: dict) -> None:
    """Refuse to report NaN or infinity as a log-likelihood, bound or KL."""
    for key, value in out.items():
        bad = ~torch.isfinite(value)
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            raise NumericalError(
                f"evaluation gave a non-finite {key} for {int(bad.sum())} data points (rows "
                f"{rows}...): the model or guide produces NaN or infinite log-densities there; "
                "check those rows and the networks' weights"
            )


def log_likelihood(model, guide, data, *args, num_samples: int = 5000, **kwargs) -> torch.Tensor:
    """Importance-sampled estimate of ``log p(x)`` in nats for each row of ``data``: ``(N,)``.

    Takes the options of :func:`evaluate`, which also returns the ELBO and ``IWAE_k``.
    """
    return evaluate(model, guide, data, *args, num_samples=num_samples, **kwargs)["log_likelihood"]


def _evaluate_batch(model, guide, x, args, kwargs, K, iwae_k, max_rows, nesting) -> dict:
    """Stream ``K`` draws for one batch ``x (B, ...)`` in chunks; reduce to ``(B,)`` tensors."""
    B = x.shape[0]
    chunk = _chunk_size(K, B, max_rows, iwae_k)
    lse = lse_sq = None
    sum_log_w = 0.0
    iwae_sum = {k: 0.0 for k in iwae_k}
    iwae_groups = {k: 0 for k in iwae_k}
    term_sum = defaultdict(float)
    for start in range(0, K, chunk):
        S = min(chunk, K - start)
        log_w, terms = _log_weights(model, guide, x, args, kwargs, S, nesting)  # (S, B)
        lse = _add_lse(lse, log_w.logsumexp(0))
        lse_sq = _add_lse(lse_sq, (2 * log_w).logsumexp(0))
        sum_log_w = sum_log_w + log_w.sum(0)
        for k in iwae_k:
            groups = S // k
            grouped = log_w[: groups * k].reshape(groups, k, B)  # (groups, k, B)
            iwae_sum[k] = iwae_sum[k] + (grouped.logsumexp(1) - math.log(k)).sum(0)
            iwae_groups[k] += groups
        for key, value in terms.items():
            term_sum[key] = term_sum[key] + value.sum(0)
    out = {
        "log_likelihood": lse - math.log(K),
        "elbo": sum_log_w / K,
        "ess": (2 * lse - lse_sq).exp(),
    }
    out.update({f"iwae{k}": iwae_sum[k] / iwae_groups[k] for k in iwae_k})
    out.update({key: value / K for key, value in term_sum.items()})
    return out


def _log_weights(model, guide, x, args, kwargs, S, nesting):
    """``log w (S, B)`` and per-site KL ``{site: (S, B)}`` for ``S`` vectorized draws.

    One pass is one reuse scope: the model may take the guide's network outputs of this
    pass, never an earlier one's (``pyro_ladder._memo``). Scales are ignored: this is the
    model's own density, whatever weight training gave a site."""
    particles = particle_plate("_eval_particles", S, nesting)
    with ReuseOutputs():
        guide_trace, model_trace = particle_traces(model, guide, (x, *args), kwargs, particles)
    check_guide_covers_model(model_trace, guide_trace)
    _check_every_row(model_trace, guide_trace)
    log_w = x.new_zeros(S, x.shape[0])
    terms = {}  # per-variable terms: "ce:<observed site>", "kl:<latent site>"
    for name, site in sample_sites(model_trace):
        log_p = per_datapoint(site, site_log_prob(site, scaled=False), nesting)
        log_w = log_w + log_p
        if site["is_observed"]:
            terms[f"ce:{name}"] = -log_p
    for name, q_site in latent_sites(guide_trace):
        log_w = log_w - per_datapoint(q_site, site_log_prob(q_site, scaled=False), nesting)
        kl, _ = site_kl(q_site, model_trace.nodes[name])
        terms[f"kl:{name}"] = per_datapoint(q_site, _masked(kl, model_mask(q_site)), nesting)
    return log_w, terms


def _check_every_row(model_trace, guide_trace) -> None:
    """Refuse a data plate that subsamples its rows: evaluation scores every row given."""
    if weight_layout(model_trace, guide_trace).scale != 1:
        raise ConfigError(
            "pyro.plate('data', ...) subsamples the rows, but evaluate scores each row of "
            "data: drop subsample_size / subsample from the plate when evaluating (e.g. make "
            "it an argument of the model and guide)"
        )


def _masked(value: torch.Tensor, mask) -> torch.Tensor:
    """``value`` with the site's mask applied (as :func:`site_log_prob` does)."""
    if mask is False:
        return torch.zeros_like(value)
    if mask is None or mask is True:
        return value
    return torch.where(mask, value, torch.zeros_like(value))


def _chunk_size(K, B, max_rows, iwae_k) -> int:
    """Draws per pass: as many as fit ``max_rows``, a multiple of every ``k`` when possible.

    A pass never holds fewer draws than the largest group that fits in ``K``, even past
    ``max_rows``: every ``IWAE_k`` needs at least one whole group of ``k`` draws in a pass.
    """
    chunk = max(1, min(K, max_rows // max(B, 1)))
    step = math.lcm(*iwae_k) if iwae_k else 1
    return max(step, chunk - chunk % step) if chunk >= step else min(K, step)


def _add_lse(total, value):
    return value if total is None else torch.logaddexp(total, value)


def _check_options(data, num_samples, iwae_k, batch_size, max_rows):
    if len(data) == 0:
        raise ConfigError("no data to evaluate: the data set is empty")
    for name, v in [
        ("num_samples", num_samples),
        ("batch_size", batch_size),
        ("max_rows", max_rows),
    ]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    for k in iwae_k:
        if not isinstance(k, int) or not 1 <= k <= num_samples:
            raise ConfigError(f"iwae_k values must be integers in [1, num_samples], got {k!r}")
