r"""A differentiable loss for every estimator of :func:`~pyro_ladder.make_elbo`.

``SVI`` calls ``elbo.loss_and_grads``, which runs ``backward`` itself. Training loops that
own the backward pass (PyTorch Lightning, ``DistributedDataParallel``, which all-reduces
gradients in hooks fired by that pass) need a 0-dim tensor instead.
:func:`differentiable_loss` returns one for any estimator: its **value** is the estimator's
loss on the draws made, and its **gradient** is exactly the gradient ``loss_and_grads``
would have accumulated on the same draws (same seed, same random numbers consumed).

The tensor is built as ``loss + (s - sg(s))`` with ``s`` a surrogate whose gradient is the
estimator's and ``sg`` stop-gradient: the bracket is zero in value and ``grad s`` in the
backward pass.

* ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceEnum_ELBO`` and our
  :class:`~pyro_ladder.elbo.weighted.WeightedELBO` estimators (``"iwae"`` and ``"renyi"``
  included) have a ``differentiable_loss`` method; it is used as it is, so the scale rule
  of :mod:`pyro_ladder._traces` holds here too.
* Pyro's own ``RenyiELBO``, passed directly, has none: :func:`renyi_loss` computes its
  bound and surrogate (below), with Pyro's treatment of scales (inside the weights).
* ``TraceGraph_ELBO`` (``"tracegraph"``) has none either: :func:`tracegraph_loss` takes
  the value and the surrogate, score-function terms over downstream costs and baseline
  losses included, from the same computation ``TraceGraph_ELBO.loss_and_grads``
  differentiates.
* The JIT estimators (``"jit-elbo"``, ``"jit-meanfield"``, ``"jit-tracegraph"``) run
  **uncompiled**, as the estimator they compile: the same value and gradient, without the
  compilation: a traced graph would run inside ``DistributedDataParallel``'s forward
  untested.

**The Renyi / IWAE surrogate.** With ``K`` particles and ``log w_k = log p(x, z_k) -
log q(z_k | x)`` per data point (the dimensions of independent plates kept),
``L_alpha = 1/(1 - alpha) log (1/K) sum_k w_k^(1 - alpha)`` (``alpha = 0``: the IWAE
bound). For reparameterized draws its gradient is ``sum_k wbar_k grad log w_k`` with
``wbar = softmax_k((1 - alpha) log w)``, so the surrogate is ``sum_k sg(wbar_k) s_k`` where
``s_k`` is ``log p(x, z_k)`` minus the log-density of every reparameterized guide site
(Burda et al. 2016, eq. 14; Li & Turner 2016). A guide site without ``rsample``
contributes ``alpha / (1 - alpha) log q`` to ``s_k``, the convention of Pyro's
``RenyiELBO``, so the gradients agree for every guide that ``RenyiELBO`` accepts.

References
----------
[1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
[2] Y. Li, R. E. Turner, "Renyi Divergence Variational Inference", NeurIPS 2016.
[3] J. Schulman, N. Heess, T. Weber, P. Abbeel, "Gradient Estimation Using Stochastic
    Computation Graphs", NeurIPS 2015.
"""

from __future__ import annotations

import math

import torch
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.util import get_dependent_plate_dims, is_identically_zero, torch_sum

from .._checks import check_estimator_arg, check_pair_args
from .._memo import ReuseOutputs
from ..errors import ConfigError

__all__ = ["differentiable_loss", "renyi_loss", "tracegraph_loss", "value_with_gradient"]

# JIT estimators and the uncompiled estimator whose computation they compile
_UNCOMPILED = (
    (JitTrace_ELBO, Trace_ELBO),
    (JitTraceMeanField_ELBO, TraceMeanField_ELBO),
)


def differentiable_loss(elbo: ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """The loss of ``elbo`` on one set of draws as a 0-dim tensor carrying its gradient.

    ``loss.backward()`` accumulates the gradient ``elbo.loss_and_grads(model, guide,
    *args, **kwargs)`` would, and ``loss.item()`` is the value it would return.

    :raises ConfigError: for an estimator that has no differentiable form here.
    """
    check_estimator_arg("differentiable_loss", elbo)
    check_pair_args("differentiable_loss", model=model, guide=guide)
    with ReuseOutputs(owner=elbo):  # one scope: the guide's outputs serve this call's model
        return _differentiable_loss(elbo, model, guide, *args, **kwargs)


def _differentiable_loss(elbo: ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    if isinstance(elbo, RenyiELBO):
        return renyi_loss(elbo, model, guide, *args, **kwargs)
    if isinstance(elbo, TraceGraph_ELBO):  # JitTraceGraph_ELBO included, uncompiled
        return tracegraph_loss(elbo, model, guide, *args, **kwargs)
    for compiled, plain in _UNCOMPILED:
        if isinstance(elbo, compiled):
            return plain.differentiable_loss(elbo, model, guide, *args, **kwargs)
    method = getattr(elbo, "differentiable_loss", None)
    if method is None:
        raise ConfigError(
            f"{type(elbo).__name__} has no differentiable loss, which training with PyTorch "
            "Lightning needs: pick an estimator of pyro_ladder.make_elbo"
        )
    return method(model, guide, *args, **kwargs)


def renyi_loss(elbo: RenyiELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """``-L_alpha`` summed over the data, with the gradient of ``RenyiELBO.loss_and_grads``.

    Draws ``elbo.num_particles`` particles (vectorized or one by one, as ``elbo`` is
    configured) through ``elbo``'s own tracing, so it consumes the random numbers
    ``loss_and_grads`` would.
    """
    log_w, surrogate = [], []
    for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
        particle_log_w, particle_surrogate = _renyi_particle(model_trace, guide_trace, elbo.alpha)
        log_w.append(particle_log_w)
        surrogate.append(particle_surrogate)
    vectorized = elbo.vectorize_particles and elbo.num_particles > 1
    if vectorized:  # one trace whose leading dimension is the particle
        log_w, surrogate = log_w[0], surrogate[0]  # (K, ...) each
    else:
        log_w, surrogate = _stack(log_w), _stack(surrogate)  # (K, ...)
    scaled = (1.0 - elbo.alpha) * log_w.detach()  # (K, ...)
    bound = (scaled.logsumexp(0) - math.log(elbo.num_particles)).sum() / (1.0 - elbo.alpha)
    weights = scaled.softmax(0)  # (K, ...) normalized, held fixed
    return value_with_gradient(-bound, -(weights * surrogate).sum())


def _renyi_particle(model_trace, guide_trace, alpha: float):
    """``log w`` and the surrogate ``s`` of one (possibly vectorized) particle, each summed
    over the dimensions of dependent (non-plate) batch axes only."""
    sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
    log_w, surrogate = 0.0, 0.0
    for _, site in _samples(model_trace):
        log_p = torch_sum(site["log_prob"], sum_dims)
        log_w, surrogate = log_w + log_p, surrogate + log_p
    for name, site in _samples(guide_trace):
        log_q = torch_sum(site["log_prob"], sum_dims)
        _, score, entropy = site["score_parts"]
        log_w = log_w - log_q
        if not is_identically_zero(entropy) and not is_identically_zero(score):
            raise ConfigError(
                f"guide site {name!r} is partially reparameterized, which RenyiELBO does not "
                "support: use 'elbo' or 'tracegraph'"
            )
        if not is_identically_zero(entropy):  # reparameterized: log q moves with its sample
            surrogate = surrogate - log_q
        elif not is_identically_zero(score):
            surrogate = surrogate + alpha / (1.0 - alpha) * log_q
    return _as_tensor(log_w), _as_tensor(surrogate)


def tracegraph_loss(elbo: TraceGraph_ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """``-ELBO`` with the gradient of ``TraceGraph_ELBO.loss_and_grads``: reparameterized
    terms, score-function terms weighted by each site's downstream cost minus its
    baseline, and the baselines' own regression losses (their state, such as a decaying
    average, advances once, as in one ``loss_and_grads`` call)."""
    compute = getattr(elbo, "_loss_and_surrogate_loss", None)
    if compute is None:  # a Pyro release that reorganised TraceGraph_ELBO's internals
        raise ConfigError(
            "this Pyro release's TraceGraph_ELBO lacks _loss_and_surrogate_loss; install "
            "pyro-ppl 1.9.x or train 'tracegraph' without Lightning"
        )
    value, surrogate = compute(model, guide, args, kwargs)  # value is the ELBO
    return value_with_gradient(-_as_tensor(value), _as_tensor(surrogate))


def value_with_gradient(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, ``surrogate``'s gradient in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def _samples(trace):
    return ((n, s) for n, s in trace.nodes.items() if s["type"] == "sample")


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(float(value))


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    shape = torch.broadcast_shapes(*(v.shape for v in values))
    return torch.stack([v.expand(shape) for v in values])
