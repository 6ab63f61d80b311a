r"""Independent particles: what the doubly reparameterized (DReG) estimators need, and
the checks that refuse pairs which do not give it.

**Why DReG needs it.** DReG replaces the score term ``sum_s E[w_bar_s d_eta log q(z_s)]``
by the reparameterization identity ``E[f(z_s) d_eta log q(z_s)] = E[d_z f(z_s) . d_eta
z_s]``, applied to ``f = w_bar_s`` *as a function of ``z_s`` alone*, the other particles
held fixed. When ``log w_s`` depends only on its own sample (and each ``w_bar_s`` on the
others only through the normalization), ``d_{z_s} w_bar_s = (w_bar_s - w_bar_s^2)
d_{z_s} log w_s`` and one backward pass of ``sum_s w_bar_s^2 log w_s`` gives the
estimator (:mod:`.weighted`).

**Batch norm in training mode breaks it.** A network that reads the samples (the ladder's
prior networks and decoder; the guide's top-down networks) normalizes with statistics of
its batch, into which the particles are folded (:class:`~pyro_ladder.layers.MLP`). Then
``log w_s`` depends on every particle's and every data point's sample, and
``d_{z_s} w_bar_s`` contains ``d_{z_s} log w_{s'}`` for all ``s'``: the replacement needs,
for each ``s``, the derivative of its own weight in its own sample, a diagonal block of the
Jacobian ``d log w / d z``, which one backward pass (a vector-Jacobian product, summing over
``s'``) cannot separate; it costs ``S x B`` passes. Statistics per particle do not help:
they still couple the data points. There is no sound estimator at DReG's cost, so
the DReG estimators **refuse** such pairs (measured: on ``LadderVAE(4, (2, 2), (5, 5))``,
``B = K = 4``, the guide's gradient was off by up to 18 standard errors). Plain
reparameterized estimators (``iwae``, ``miwae``, ``stl`` ...) differentiate the coupled
objective exactly and stay unbiased for it.

The checks, run by every DReG estimator (and ``vimco``) before it takes a gradient:

* :func:`check_own_sample_only` (an autograd probe): does ``log w[0, 0]`` depend on a
  reparameterized sample other than particle 0's of data point 0? This catches any
  coupling layer in any pair. Its cost is one extra backward pass of the weights.
* :func:`check_discrete_own_particle` (a perturbation probe, for sites without
  ``rsample``, which autograd cannot see through): particle 0's discrete samples are
  changed, the pair is run again without gradient, and the other particles' weights must
  not move. Its cost is one more forward pass of the guide and the model.
* :func:`check_no_training_batch_norm` (structural): a model or guide that is a bound
  method of an ``nn.Module`` with a ``_BatchNorm`` submodule in training mode. The run
  layers call it before they write anything (the ladder's batch norm reads the samples);
  the estimators call it only once a probe has found a coupling, to name the layer: batch
  norm that reads only ``x`` (an encoder's deterministic pass) does not couple particles
  and is served.

The probes run once per estimator and :func:`signature`: the pair, the tensor arguments'
shapes and the train/eval mode of every module that ran in the draw, recorded by a global
forward pre-hook (:func:`modules_run`), so that plain functions closing over networks are
probed again when a network changes mode.
"""

from __future__ import annotations

import contextlib

import torch
from pyro import poutine
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._traces import latent_sites, per_datapoint
from .._util import before_each_forward, modules_of
from ..errors import ConfigError

_FIXES = (
    "turn batch norm off (LadderVAE(batch_norm=False); in the CLI --no-batch-norm), put "
    "the networks in eval mode, or choose an estimator without the DReG term, such as "
    "'iwae' or 'miwae'"
)


def check_no_training_batch_norm(estimator: str, model, guide) -> None:
    """Refuse a pair whose modules hold batch norm in training mode (module docstring)."""
    for module in modules_of(model, guide):
        for name, sub in module.named_modules():
            if isinstance(sub, _BatchNorm) and sub.training:
                raise ConfigError(
                    f"{estimator} needs each particle's weight to depend on its own sample "
                    f"only, but {type(module).__name__}.{name} ({type(sub).__name__}) is in "
                    "training mode: its batch statistics mix particles and data points, "
                    f"which biases the DReG gradient: {_FIXES}"
                )


def check_own_sample_only(estimator: str, log_w, guide_trace, latents, nesting, joint):
    """Refuse draws whose ``log w[0, 0]`` (``(S, B)`` live weights; ``(S, 1)`` when
    ``joint``, where only particles must be independent) depends on another particle's or
    data point's sample of the guide sites ``latents`` (``{name: live value}``)."""
    values = {n: v for n, v in latents.items() if v.requires_grad}
    if not log_w.requires_grad or not values or log_w.numel() < 2:
        return
    grads = torch.autograd.grad(
        log_w[0, 0], list(values.values()), retain_graph=True, allow_unused=True
    )
    for name, grad in zip(values, grads, strict=True):
        if grad is None:
            continue
        site = guide_trace.nodes[name]
        event = site["fn"].event_dim
        reach = grad.abs().sum(list(range(grad.dim() - event, grad.dim())))  # batch shape
        reach = per_datapoint(site, reach, nesting, joint).clone()  # (S, B)
        reach[0, 0] = 0.0
        if (reach > 0).any():
            raise ConfigError(
                f"{estimator} needs each particle's weight to depend on its own sample only, "
                f"but the weight of particle 0, data point 0 depends on other samples of site "
                f"{name!r}: a layer couples them (batch norm in training mode, attention "
                f"across the batch, ...), which biases the DReG gradient: {_FIXES}"
            )


@contextlib.contextmanager
def modules_run():
    """Inside the block, every ``nn.Module`` whose forward runs is appended to the yielded
    list (a global forward pre-hook), plain functions' networks included."""
    ran: list[nn.Module] = []
    with before_each_forward(ran.append):
        yield ran


def check_discrete_own_particle(estimator: str, draws, ran=()) -> None:
    """Refuse draws where changing particle 0's samples of the guide sites without
    ``rsample`` moves another particle's weight (``draws``: the estimator's ``_Draws``;
    ``ran``: the modules that ran, whose buffers the extra pass must not change)."""
    scored = [(n, s) for n, s in latent_sites(draws.guide_trace) if not s["fn"].has_rsample]
    log_w = draws.log_w.detach()  # (S, B)
    if not scored or log_w.shape[0] < 2:
        return
    values = {n: v.detach() for n, v in draws.latents.items()}
    for name, site in scored:
        values[name] = _other_first_particle(site, draws.nesting)
    moved = _log_w_at(draws, values, ran)[1:] - log_w[1:]  # (S - 1, B)
    if (moved.abs() > 1e-4 * (1 + log_w[1:].abs())).any():
        names = ", ".join(repr(n) for n, _ in scored)
        raise ConfigError(
            f"{estimator} needs each particle's weight to depend on its own sample only, "
            f"but the weights of particles 1.. change with particle 0's samples of {names}: "
            "a layer couples them (batch norm in training mode, attention across the "
            "batch, ...), which biases the gradient: turn batch norm off "
            "(LadderVAE(batch_norm=False); in the CLI --no-batch-norm) or put the networks "
            "in eval mode"
        )


def _other_first_particle(site, nesting: int) -> torch.Tensor:
    """The site's value with particle 0's entries replaced by other values in the support
    (the first or second enumerated value; a fresh draw where the support is not
    enumerable)."""
    fn, value = site["fn"], site["value"].detach()
    event = fn.event_dim
    if value.dim() - event != nesting + 1 or value.shape[0] < 2:
        return value  # no particle dimension: shared by all particles
    support = fn.enumerate_support(expand=False) if fn.has_enumerate_support else None
    if support is not None and support.shape[0] < 2:
        return value  # one value: nothing to change
    if support is not None:  # (n, 1, ..., 1, event)
        first, second = support[0].expand_as(value), support[1].expand_as(value)
        same = value == first
        if event:
            same = same.flatten(value.dim() - event).all(-1)
            same = same.reshape(same.shape + (1,) * event)
        other = torch.where(same, second, first)
    else:
        other = fn.sample().expand_as(value)
    changed = value.clone()
    changed[0] = other[0]
    return changed


def _log_w_at(draws, values, ran) -> torch.Tensor:
    """``log w`` ``(S, B)`` of the pair conditioned on ``values``, without gradient. The
    modules in ``ran`` run on copies of their buffers (batch-norm running statistics): the
    originals are neither changed nor bumped in version (the draw's graph saved them)."""
    model, guide, args, kwargs = draws._call
    owners = [m for m in {id(m): m for m in ran}.values() if m._buffers]
    kept = [dict(m._buffers) for m in owners]
    traces = []
    try:
        for module, buffers in zip(owners, kept, strict=True):
            module._buffers.update(
                {k: None if b is None else b.clone() for k, b in buffers.items()}
            )
        with torch.no_grad(), draws.particles:
            for fn in (guide, model):
                fn = poutine.block(poutine.condition(fn, data=values), hide_types=["param"])
                traces.append(poutine.trace(fn).get_trace(*args, **kwargs))
    finally:
        for module, buffers in zip(owners, kept, strict=True):
            module._buffers.update(buffers)
    log_q = draws.log_density(traces[0], only=draws.latents)
    return (draws.log_density(traces[1]) - log_q).expand(draws.shape)


def signature(model, guide, args, kwargs, ran=()) -> tuple:
    """What decides whether a probe's answer still holds: the pair, the shapes of its
    tensor arguments and the train/eval mode of its modules: those behind bound methods
    and those in ``ran`` (the modules that ran in the draw, :func:`modules_run`)."""

    def ident(fn):
        return id(getattr(fn, "__self__", fn)), id(getattr(fn, "__func__", fn))

    shapes = tuple(
        tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in (*args, *kwargs.values())
    )
    modes = tuple(m.training for module in modules_of(model, guide) for m in module.modules())
    seen = tuple(sorted({(id(m), m.training) for m in ran}))
    return ident(model), ident(guide), shapes, modes, seen
