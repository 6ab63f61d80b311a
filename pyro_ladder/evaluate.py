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

import pyro.util
import torch
from tqdm.auto import tqdm

from . import device as placement
from ._checks import check_data_arg, check_pair_args
from ._memo import ReuseOutputs
from ._params import RegisterOnce
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
from ._validation import signature, validation_off
from .errors import ConfigError, NumericalError

_OPTIONS = ("iwae_k", "batch_size", "max_rows", "progress", "device")


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
    options = dict(iwae_k=iwae_k, batch_size=batch_size, max_rows=max_rows, progress=progress)
    out = _score(model, guide, data, args, kwargs, _Summary, num_samples, device, **options)
    return {
        "log_likelihood": out.pop("log_likelihood"),
        "elbo": out.pop("elbo"),
        "ess": out.pop("ess"),
        "iwae": {k: out.pop(f"iwae{k}") for k in iwae_k},
        "kl": {name[3:]: value for name, value in out.items() if name.startswith("kl:")},
        "cross_entropy": {name[3:]: v for name, v in out.items() if name.startswith("ce:")},
        "num_samples": num_samples,
    }


@torch.no_grad()
def log_likelihood(model, guide, data, *args, num_samples: int = 5000, **kwargs) -> torch.Tensor:
    """Importance-sampled estimate of ``log p(x)`` in nats for each row of ``data``: ``(N,)``.

    Takes the options of :func:`evaluate` and returns its ``log_likelihood``, the same
    numbers from the same draws, without computing the other results.
    """
    options = {name: kwargs.pop(name) for name in _OPTIONS if name in kwargs}
    device = options.pop("device", None)
    out = _score(model, guide, data, args, kwargs, _LogMeanWeight, num_samples, device, **options)
    return out["log_likelihood"]


def _score(
    model, guide, data, args, kwargs, summary, num_samples, device,
    iwae_k=(), batch_size=100, max_rows=None, progress=False,
) -> dict:  # fmt: skip
    """``{name: (N,)}``: the results of ``summary`` (a class: :class:`_LogMeanWeight` or
    :class:`_Summary`) over every batch of ``data``, after checking the arguments."""
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
            batch = _Batch(model, guide, x, args, kwargs, nesting)
            stream = summary(num_samples, iwae_k)
            for key, value in _score_batch(batch, stream, max_rows).items():
                parts[key].append(value)
    out = {key: torch.cat(values) for key, values in parts.items()}
    _check_finite(out)
    return out


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


def _score_batch(batch: _Batch, stream, max_rows) -> dict:
    """Stream ``K`` draws for one batch ``x (B, ...)`` in passes into ``stream``; its
    ``(B,)`` results.

    One reuse scope (``pyro_ladder._memo``) serves all passes of the batch: nothing a
    network's output depends on can change between them (inference and eval mode, no
    optimizer), so an output that depends on ``x`` alone (the ladder's upward pass) is
    computed once per batch, not once per pass; unless a network ran in training mode
    (a pair whose modules evaluate could not find), whose running statistics then move
    once per pass as they did before reuse. Outputs at one pass's draws never match
    another pass's draws (the scope keeps the inputs it stored alive, so their memory
    cannot pass to new draws)."""
    K = stream.num_samples
    chunk = _chunk_size(K, batch.x.shape[0], max_rows, stream.iwae_k)
    with ReuseOutputs() as scope:
        for start in range(0, K, chunk):
            if scope.saw_training:
                # a network in training mode (a pair evaluate could not put in eval mode):
                # its batch-norm statistics move at each computation, so every pass
                # computes afresh, as with one scope per pass
                scope.clear()
            stream.add(batch, min(chunk, K - start))
    return stream.result()


class _LogMeanWeight:
    """``log (1/K) sum_k w_k`` per data point, streamed over passes of draws."""

    def __init__(self, num_samples: int, iwae_k=()):
        self.num_samples, self.iwae_k = num_samples, iwae_k  # iwae_k: sizes passes to fit
        self.lse = None

    def add(self, batch: _Batch, S: int) -> None:
        model_trace, guide_trace = batch.traces(S)
        log_p, log_q = _site_log_densities(model_trace, guide_trace, batch.nesting)
        self._add(_log_weight(log_p, log_q, batch.x, S))

    def _add(self, log_w: torch.Tensor) -> None:
        self.lse = _add_lse(self.lse, log_w.logsumexp(0))  # (B,)

    def result(self) -> dict:
        return {"log_likelihood": self.lse - math.log(self.num_samples)}


class _Summary(_LogMeanWeight):
    """Everything :func:`evaluate` reports, streamed over passes of draws."""

    def __init__(self, num_samples: int, iwae_k=()):
        super().__init__(num_samples, iwae_k)
        self.lse_sq = None
        self.sum_log_w = 0.0
        self.iwae_sum = {k: 0.0 for k in iwae_k}
        self.iwae_groups = {k: 0 for k in iwae_k}
        self.term_sum = defaultdict(float)

    def add(self, batch: _Batch, S: int) -> None:
        log_w, terms = _log_weights(batch, S)  # (S, B)
        self._add(log_w)
        self.lse_sq = _add_lse(self.lse_sq, (2 * log_w).logsumexp(0))
        self.sum_log_w = self.sum_log_w + log_w.sum(0)
        B = log_w.shape[1]
        for k in self.iwae_k:
            groups = S // k
            grouped = log_w[: groups * k].reshape(groups, k, B)  # (groups, k, B)
            self.iwae_sum[k] = self.iwae_sum[k] + (grouped.logsumexp(1) - math.log(k)).sum(0)
            self.iwae_groups[k] += groups
        for key, value in terms.items():
            self.term_sum[key] = self.term_sum[key] + value.sum(0)

    def result(self) -> dict:
        K = self.num_samples
        out = super().result()
        out["elbo"] = self.sum_log_w / K
        out["ess"] = (2 * self.lse - self.lse_sq).exp()
        out.update({f"iwae{k}": self.iwae_sum[k] / self.iwae_groups[k] for k in self.iwae_k})
        out.update({key: value / K for key, value in self.term_sum.items()})
        return out


class _Batch:
    """The passes over one batch ``x (B, ...)``: traces of ``S`` vectorized draws each.

    Distribution validation runs on the first pass of each size and on every pass whose
    sites it could refuse for more than a NaN (:mod:`pyro_ladder._validation`). Each
    module's parameter registrations are sent in the batch's first pass only
    (:class:`RegisterOnce`): evaluation reads sample sites only, and each of the ladder's
    166 registrations would otherwise be a message through the whole handler stack in
    every pass. A user's ``pyro.param`` calls go through in every pass, so handlers around
    the call (``poutine.substitute``) still apply."""

    def __init__(self, model, guide, x, args, kwargs, nesting: int):
        once = RegisterOnce()  # once per batch: pyro_ladder._params
        self.model, self.guide = once(model), once(guide)
        self.x, self.args, self.kwargs, self.nesting = x, args, kwargs, nesting
        self.validated = {}  # S -> signature of a validated pass of S draws

    def traces(self, S: int):
        """``(model_trace, guide_trace)`` of ``S`` draws, checked (:func:`_check_traces`)."""
        known = self.validated.get(S)
        if known is None:
            traces = self._trace(S)
            sig = signature(*traces)
            if sig is not None:
                self.validated[S] = sig
            return traces
        state = _random_state(self.x.device)
        with validation_off():
            traces = self._trace(S)
        if signature(*traces) == known:
            return traces
        _set_random_state(state)  # the sites changed with the draws: validate, same draws
        return self._trace(S)

    def _trace(self, S: int):
        particles = particle_plate("_eval_particles", S, self.nesting)
        guide_trace, model_trace = particle_traces(
            self.model, self.guide, (self.x, *self.args), self.kwargs, particles
        )
        check_guide_covers_model(model_trace, guide_trace)
        _check_every_row(model_trace, guide_trace)
        return model_trace, guide_trace


def _log_weights(batch: _Batch, S: int):
    """``log w (S, B)`` and the per-variable terms ``{"ce:<observed site>" | "kl:<latent
    site>": (S, B)}`` (KL analytic where torch knows it) of one pass of ``S`` draws.

    Scales are ignored: this is the model's own density, whatever weight training gave a
    site."""
    model_trace, guide_trace = batch.traces(S)
    log_p, log_q = _site_log_densities(model_trace, guide_trace, batch.nesting)
    terms = {f"ce:{name}": -log_p[name] for name in log_p if model_trace.nodes[name]["is_observed"]}
    for name, q_site in latent_sites(guide_trace):
        kl, _ = site_kl(q_site, model_trace.nodes[name])
        kl = per_datapoint(q_site, _masked(kl, model_mask(q_site)), batch.nesting)
        terms[f"kl:{name}"] = kl
    return _log_weight(log_p, log_q, batch.x, S), terms


def _site_log_densities(model_trace, guide_trace, nesting: int):
    """``({model site: log p (S, B)}, {latent guide site: log q (S, B)})``, unscaled."""
    log_p = {
        name: per_datapoint(site, site_log_prob(site, scaled=False), nesting)
        for name, site in sample_sites(model_trace)
    }
    log_q = {
        name: per_datapoint(site, site_log_prob(site, scaled=False), nesting)
        for name, site in latent_sites(guide_trace)
    }
    return log_p, log_q


def _log_weight(log_p: dict, log_q: dict, x: torch.Tensor, S: int) -> torch.Tensor:
    """``log w = sum log p - sum log q``, ``(S, B)``, summed in trace order."""
    log_w = x.new_zeros(S, x.shape[0])
    for value in log_p.values():
        log_w = log_w + value
    for value in log_q.values():
        log_w = log_w - value
    return log_w


def _random_state(device: torch.device) -> dict:
    """The random state a pass draws from (torch's, Python's, NumPy's, the device's)."""
    state = pyro.util.get_rng_state()
    if device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    return state


def _set_random_state(state: dict) -> None:
    pyro.util.set_rng_state(state)
    if "cuda" in state:
        device, cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda, device)


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
