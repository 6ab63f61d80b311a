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

Two checks, both run by every DReG estimator before it takes a gradient:

* :func:`check_no_training_batch_norm` (structural, every call): a model or guide that is a
  bound method of an ``nn.Module`` with a ``_BatchNorm`` submodule in training mode;
* :func:`check_own_sample_only` (an autograd probe, once per estimator, pair and mode):
  does ``log w[0, 0]`` depend on a sample other than particle 0's of data point 0? This
  catches any coupling layer in any pair. Its cost is one extra backward pass of the
  weights through the guide and the model, once per pair and train/eval mode.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .._traces import per_datapoint
from .._util import modules_of
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


def signature(model, guide, args, kwargs) -> tuple:
    """What decides whether a probe's answer still holds: the pair, the train/eval mode
    of its modules, and the shapes of its tensor arguments."""

    def ident(fn):
        return id(getattr(fn, "__self__", fn)), id(getattr(fn, "__func__", fn))

    shapes = tuple(
        tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in (*args, *kwargs.values())
    )
    modes = tuple(m.training for module in modules_of(model, guide) for m in module.modules())
    return ident(model), ident(guide), shapes, modes
