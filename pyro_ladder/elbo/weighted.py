r"""Importance-weighted estimators Pyro lacks, built on one per-data-point weight engine.

Every estimator here draws ``S`` vectorized samples ``z_s ~ q(z | x)`` per data point and
computes ``log w_s = log p(x, z_s) - log q(z_s | x)`` per (sample, data point), then an
objective ``F(log w)`` per data point (summed over the batch, as Pyro's ELBOs do).

**One surrogate for all.** Write ``eta`` for all parameters (guide, model, and shared
ones such as the ladder's prior networks, which both score ``p`` and shape the guide's
samples), ``z_s = g(eps_s; eta)`` for the joint reparameterization of the hierarchical
guide (upper samples feed lower conditionals), and ``c_s = dF / d log w_s`` (held fixed).
The reparameterized gradient of ``F`` is

.. math::

    \nabla F = \sum_s c_s \big[\partial_\eta \log p(x, z_s)\big|_z
               - \partial_\eta \log q(z_s | x)\big|_z
               + \partial_z \log w_s \cdot \nabla_\eta z_s\big]

with ``|_z``: samples held fixed. The engine evaluates ``log p`` and ``log q`` at detached
copies ``z~`` of the samples (live parameters, so autograd gives the ``|_z`` terms and
``d log w / d z~``), and adds ``sum_s sg(c_path_s d log w_s / d z~_s) . z_s`` with the
live samples for the path term, which carries the gradient through ``g`` into every
parameter, upstream samples included. Each estimator chooses three coefficients:

* plain reparameterization (``miwae``, ``ciwae``): ``c_p = c_q = c_path = c``;
* sticking the landing (``stl``, ``iwae-stl``; Roeder et al. 2017): ``c_q = 0``. The
  dropped term has mean zero for the ELBO (``c = 1/S`` is constant), so ``stl`` is
  unbiased; for IWAE ``c`` depends on ``z`` and the dropped term does not vanish, so
  ``iwae-stl`` is **biased** (Tucker et al. 2019);
* doubly reparameterized (``iwae-dreg``; Tucker et al. 2019, generalised to hierarchical
  guides sharing parameters with the model as in Bauer & Mnih 2021): ``c_p = w_bar``,
  ``c_q = 0``, ``c_path = w_bar^2``. Derivation: for any ``f`` not depending on ``eta``
  directly, ``E_q[f(z) d_eta log q_eta(z)] = E_eps[d_z f(z) . d_eta g(eps; eta)]`` (differentiate
  ``E_eps f(g(eps; eta))``; this holds for the *joint* reparameterization ``g``, so for a
  hierarchical guide the path includes the upstream samples). With ``f = w_bar_s``, whose
  derivative in ``z_s`` is ``(w_bar_s - w_bar_s^2) d_z log w_s``, the score term
  ``-sum_s w_bar_s d_eta log q|_z`` has the same expectation as
  ``-sum_s (w_bar_s - w_bar_s^2) d_z log w_s . d_eta z_s``; substituting leaves
  ``sum_s w_bar_s d_eta log p|_z + sum_s w_bar_s^2 d_z log w_s . d_eta z_s``. The first
  term is the direct model gradient (zero for pure guide parameters), the second the path
  term; a shared parameter receives both, so the estimator is unbiased for every
  parameter. The loss value is the IWAE bound.

All guide sites must be reparameterized (``has_rsample``); every site must sit in
``pyro.plate("data")``. Site scales (KL warm-up, :mod:`pyro_ladder.warmup`) apply inside
``log w``, as in Pyro's ``RenyiELBO``.

References
----------
[1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
[2] G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing", NeurIPS 2017.
[3] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
[4] G. Tucker, D. Lawson, S. Gu, C. J. Maddison, "Doubly Reparameterized Gradient
    Estimators for Monte Carlo Objectives", ICLR 2019.
[5] M. Bauer, A. Mnih, "Generalized Doubly Reparameterized Gradient Estimators", ICML 2021.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO

from .._traces import max_plate_nesting, per_datapoint, sample_sites, split_traced_parameters
from ..errors import ConfigError


class _Draws(NamedTuple):
    log_p: torch.Tensor  # (S, B): log p(x, z~) at detached samples, live parameters
    log_q: torch.Tensor  # (S, B): log q(z~ | x) likewise
    live: dict  # site -> live reparameterized sample (S, ..., B, event)
    leaves: dict  # site -> detached copy with requires_grad
    p_trace: object  # the model's trace at the detached samples
    q_trace: object  # the guide's trace at the detached samples
    nesting: int  # plates left of the event dims, the particle plate excluded

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_p - self.log_q


class WeightedELBO(ELBO):
    """Base class: ``S = num_particles`` vectorized draws, an objective ``F(log w)`` per data
    point, and the surrogate coefficients ``(c_p, c_q, c_path)`` described in the module.

    Subclasses implement :meth:`objective` and may override :meth:`coefficients`.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf")):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
        )

    def objective(self, log_w: torch.Tensor) -> torch.Tensor:
        """``F`` per data point: ``(S, B) -> (B,)``."""
        raise NotImplementedError

    def coefficients(self, log_w: torch.Tensor):
        """``(c_p, c_q, c_path)``, each ``(S, B)`` and detached; default: reparameterized."""
        c = self._dF(log_w)
        return c, c, c

    def loss(self, model, guide, *args, **kwargs) -> float:
        """``-sum_b F_b``, the negative objective summed over the batch."""
        with torch.no_grad():
            draws = self._draw(model, guide, args, kwargs, track=False)
            return -self.objective(draws.log_w).sum().item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The loss as a 0-dim tensor: its value is :meth:`loss`'s on these draws, its
        gradient the one :meth:`loss_and_grads` accumulates. For training loops that call
        ``backward`` themselves (PyTorch Lightning, ``DistributedDataParallel``)."""
        draws = self._draw(model, guide, args, kwargs, track=True)
        log_w = draws.log_w.detach()  # (S, B)
        surrogate = self._surrogate(draws, *self.coefficients(log_w))
        return _value_with_gradient(-self.objective(log_w).sum(), -surrogate)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.item()

    @staticmethod
    def _surrogate(draws: _Draws, c_p, c_q, c_path) -> torch.Tensor:
        """``sum c_p log p - sum c_q log q + sum sg(c_path d log w / d z~) . z``."""
        surrogate = (c_p * draws.log_p).sum() - (c_q * draws.log_q).sum()
        return surrogate + _path_term(draws, (c_path * draws.log_w).sum())

    def _split_surrogate(self, draws, guide_coeffs, model_coeffs) -> torch.Tensor:
        """A negative surrogate whose gradient comes from ``model_coeffs`` for the parameters
        the model registers and from ``guide_coeffs`` for the guide's own.

        Each group's gradient ``g`` is taken by autograd first; the result is the linear form
        ``sum_p <g_p, p>`` (``g`` held fixed), so a later ``backward`` gives every parameter
        exactly its group's gradient.
        """
        guide_only, model_params, _ = split_traced_parameters(draws.p_trace, draws.q_trace)
        groups = [(guide_only, guide_coeffs, True), (model_params, model_coeffs, False)]
        total = draws.log_p.new_zeros(())
        for params, coeffs, retain in groups:
            tensors = list(params.values())
            surrogate = -self._surrogate(draws, *coeffs)
            if not tensors or not surrogate.requires_grad:
                continue
            grads = torch.autograd.grad(surrogate, tensors, retain_graph=retain, allow_unused=True)
            for param, grad in zip(tensors, grads, strict=True):
                if grad is not None:
                    total = total + (grad * param).sum()
        return total

    def _get_trace(self, model, guide, args, kwargs):
        """One ``(model_trace, guide_trace)`` pair, for Pyro's generic ELBO helpers."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = poutine.replay(model, trace=guide_trace)
        return poutine.trace(replayed).get_trace(*args, **kwargs), guide_trace

    def _dF(self, log_w: torch.Tensor) -> torch.Tensor:
        """``dF / d log w``, ``(S, B)``, by autograd on a detached copy."""
        with torch.enable_grad():
            leaf = log_w.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.objective(leaf).sum(), leaf)
        return grad

    def _draw(self, model, guide, args, kwargs, track: bool) -> _Draws:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = max_plate_nesting(model, guide, args, kwargs)
        nesting = self.max_plate_nesting
        particles = pyro.plate("_num_particles_vectorized", self.num_particles, dim=-(nesting + 1))
        with particles:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        live = {n: s["value"] for n, s in sample_sites(guide_trace) if not s["is_observed"]}
        check_reparameterized(guide_trace, type(self).__name__)
        leaves = {n: v.detach().requires_grad_(track) for n, v in live.items()}
        with particles:
            q_trace = poutine.trace(poutine.condition(guide, data=leaves)).get_trace(
                *args, **kwargs
            )
            p_trace = poutine.trace(poutine.condition(model, data=leaves)).get_trace(
                *args, **kwargs
            )
        for name, site in sample_sites(p_trace):
            if name not in leaves and not site["is_observed"]:
                raise ConfigError(
                    f"model site {name!r} has no guide site: importance weighting needs the "
                    "guide to sample every latent (a discrete site summed out of the model "
                    "trains with 'enum' only)"
                )
        log_q = _sum_sites(q_trace, nesting, set(leaves))
        log_p = _sum_sites(p_trace, nesting, None)
        shape = torch.broadcast_shapes(log_p.shape, log_q.shape)
        return _Draws(
            log_p.expand(shape), log_q.expand(shape), live, leaves, p_trace, q_trace, nesting
        )


def _value_with_gradient(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, ``surrogate``'s gradient in the backward pass."""
    return value + (surrogate - surrogate.detach())


def _path_term(draws: _Draws, scalar: torch.Tensor) -> torch.Tensor:
    """``sum_l sg(d scalar / d z~_l) . z_l``: carries ``scalar``'s sample gradient into the
    parameters through the live reparameterized samples."""
    names = [n for n in draws.leaves if draws.leaves[n].requires_grad]
    if not names or not scalar.requires_grad:
        return scalar.new_zeros(())
    slopes = torch.autograd.grad(
        scalar, [draws.leaves[n] for n in names], retain_graph=True, allow_unused=True
    )
    total = scalar.new_zeros(())
    for name, slope in zip(names, slopes, strict=True):
        if slope is not None:
            total = total + (slope.detach() * draws.live[name]).sum()
    return total


def _sum_sites(trace, nesting, only) -> torch.Tensor:
    """Sum of scaled, masked log-densities per (sample, data point): ``(S, B)``."""
    total = 0.0
    for name, site in sample_sites(trace):
        if only is not None and name not in only:
            continue
        log_p = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
        total = total + per_datapoint(site, log_p, nesting)
    return total


def check_reparameterized(trace, estimator: str) -> None:
    """Raise :class:`ConfigError` naming the first latent guide site without ``rsample``."""
    for name, site in sample_sites(trace):
        if not site["is_observed"] and not site["fn"].has_rsample:
            raise ConfigError(
                f"{estimator} needs reparameterized guide sites, but site {name!r} "
                f"({type(site['fn']).__name__}) has no rsample (a discrete layer): train it "
                "with 'tracegraph' (score function with baselines) or 'enum' (exact sum)"
            )


def _iwae(log_w: torch.Tensor) -> torch.Tensor:
    return log_w.logsumexp(0) - math.log(log_w.shape[0])


class IWAE_DReG(WeightedELBO):
    """IWAE bound with doubly reparameterized gradients (``"iwae-dreg"``); see the module.

    :param shared: ``"dreg"`` applies the doubly reparameterized estimate to every
        parameter (the derivation above). ``"iwae"`` keeps it for the guide's own
        parameters and gives the parameters the model registers (shared ones included) the
        plain IWAE gradient, which is just as unbiased; measured on the ladder, the DReG
        path term makes the shared prior networks' gradient far noisier (README), so this
        is the default.
    """

    def __init__(self, num_particles=1, shared: str = "iwae", max_plate_nesting=float("inf")):
        if shared not in ("dreg", "iwae"):
            raise ConfigError(f"shared must be 'dreg' or 'iwae', got {shared!r}")
        self.shared = shared
        super().__init__(num_particles, max_plate_nesting)

    def objective(self, log_w):
        return _iwae(log_w)

    def coefficients(self, log_w):
        w_bar = log_w.softmax(0)  # (S, B) normalized weights
        return w_bar, torch.zeros_like(w_bar), w_bar.square()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        if self.shared == "dreg":
            return super().differentiable_loss(model, guide, *args, **kwargs)
        draws = self._draw(model, guide, args, kwargs, track=True)
        log_w = draws.log_w.detach()
        w_bar = log_w.softmax(0)
        surrogate = self._split_surrogate(draws, self.coefficients(log_w), (w_bar,) * 3)
        return _value_with_gradient(-_iwae(log_w).sum(), surrogate)


class STL(WeightedELBO):
    """Sticking the landing for the ELBO (``"stl"``): unbiased; the score term is dropped."""

    def objective(self, log_w):
        return log_w.mean(0)

    def coefficients(self, log_w):
        c = self._dF(log_w)
        return c, torch.zeros_like(c), c


class IWAE_STL(STL):
    """Sticking the landing for IWAE (``"iwae-stl"``): lower variance but **biased** for the
    guide (the dropped term has non-zero mean when ``w_bar`` depends on ``z``)."""

    def objective(self, log_w):
        return _iwae(log_w)


class MIWAE(WeightedELBO):
    """``(1/M) sum_m log (1/K) sum_k w_{m,k}`` (``"miwae"``), ``S = M * K`` draws.

    :param num_particles: ``K``, inner samples per bound.
    :param outer: ``M``, independent bounds averaged.
    """

    def __init__(self, num_particles: int = 1, outer: int = 1, max_plate_nesting=float("inf")):
        if not (isinstance(outer, int) and outer >= 1):
            raise ConfigError(f"outer (M) must be a positive integer, got {outer!r}")
        self.outer, self.inner = outer, num_particles
        super().__init__(num_particles * outer, max_plate_nesting)

    def objective(self, log_w):
        grouped = log_w.reshape(self.outer, self.inner, *log_w.shape[1:])  # (M, K, B)
        return (grouped.logsumexp(1) - math.log(self.inner)).mean(0)


class CIWAE(WeightedELBO):
    """``beta ELBO_K + (1 - beta) IWAE_K`` on the same ``K`` draws (``"ciwae"``)."""

    def __init__(self, num_particles: int = 1, beta: float = 0.5, max_plate_nesting=float("inf")):
        if not 0 <= beta <= 1:
            raise ConfigError(f"beta must lie in [0, 1], got {beta!r}")
        self.beta = beta
        super().__init__(num_particles, max_plate_nesting)

    def objective(self, log_w):
        return self.beta * log_w.mean(0) + (1 - self.beta) * _iwae(log_w)


class PIWAE(MIWAE):
    """Partially importance-weighted (``"piwae"``; Rainforth et al. 2018): from the same
    ``M * K`` draws the encoder gets the ``MIWAE(M, K)`` gradient and the decoder the
    ``IWAE(M K)`` gradient. The loss value is ``IWAE(M K)``.

    Encoder and decoder are split by where parameters are registered: the decoder is every
    parameter the model registers, parameters the guide shares with it included (the
    ladder's prior networks, which define ``p(z_i | z_{i+1})`` and serve the merge); the
    encoder is the guide's own remaining parameters. The prior networks go with the decoder
    because they are parameters of the generative model, whose gradient signal improves
    with more samples, while the encoder's falls (Rainforth et al. 2018).
    """

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            log_w = self._draw(model, guide, args, kwargs, track=False).log_w
        return -_iwae(log_w).sum().item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        draws = self._draw(model, guide, args, kwargs, track=True)
        log_w = draws.log_w.detach()
        c_dec = log_w.softmax(0)  # dIWAE(MK)/dlog w
        c_enc = self._dF(log_w)  # dMIWAE(M, K)/dlog w
        surrogate = self._split_surrogate(draws, (c_enc,) * 3, (c_dec,) * 3)
        return _value_with_gradient(-_iwae(log_w).sum(), surrogate)


class CondKLSemiGradient(WeightedELBO):
    r"""The ELBO whose conditional KL terms do not move the upper samples
    (``"elbo-condkl-sg"``, the scheme proposed in the seed note on hierarchical posteriors).

    Value: ``E_q[log p(x | z)] - sum_l E_q[KL(q(z_l | z_{>l}, x) || p(z_l | z_{>l}))]`` with
    analytic KL terms (for a top site without a closed form, such as a flow prior,
    ``log q - log p`` at the sample), averaged over ``num_particles`` draws. Gradient: the
    reconstruction term's full reparameterized gradient; each KL term's gradient with the
    upper samples ``z_{>l}`` held fixed, so it reaches the parameters that enter the
    conditional directly but not, through ``z_{>l}``, the parameters that produced them. This is a
    **semi-gradient**: it is not the gradient of any objective (the dropped path terms are
    part of the ELBO's gradient), so it is an algorithmic choice to be judged by results.
    """

    def objective(self, log_w):  # the value comes from analytic terms, see _terms
        raise NotImplementedError("CondKLSemiGradient scores with analytic KL terms")

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            rec, kl = self._terms(self._draw(model, guide, args, kwargs, track=False))
        return -(rec - kl).mean(0).sum().item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        draws = self._draw(model, guide, args, kwargs, track=True)
        rec, kl = self._terms(draws)  # (S, B) each
        S = rec.shape[0]
        surrogate = (rec - kl).sum() / S + _path_term(draws, rec.sum() / S)
        return _value_with_gradient(-(rec - kl).detach().mean(0).sum(), -surrogate)

    def _terms(self, draws: _Draws):
        """Reconstruction ``(S, B)`` (observed sites) and summed conditional KL ``(S, B)``."""
        rec = 0.0
        for name, site in sample_sites(draws.p_trace):
            if name not in draws.leaves:
                log_p = site["fn"].log_prob(site["value"])
                rec = rec + per_datapoint(
                    site, scale_and_mask(log_p, site["scale"], site["mask"]), draws.nesting
                )
        kl = 0.0
        for name in draws.leaves:
            q_site, p_site = draws.q_trace.nodes[name], draws.p_trace.nodes[name]
            try:
                value = torch.distributions.kl_divergence(q_site["fn"], p_site["fn"])
            except NotImplementedError:
                value = _sampled_top_kl(draws, name)
            value = scale_and_mask(value, q_site["scale"], q_site["mask"])
            kl = kl + per_datapoint(q_site, value, draws.nesting)
        return rec, kl


def _sampled_top_kl(draws: _Draws, name: str) -> torch.Tensor:
    """``log q(z) - log p(z)`` at the live sample ``(S, B, ...)`` for a site whose KL has no
    closed form. Only the first latent of both traces qualifies: it has no upper sample to
    hold fixed, so its semi-gradient is the full reparameterized gradient."""
    q_site, p_site = draws.q_trace.nodes[name], draws.p_trace.nodes[name]
    firsts = [
        next(n for n, _ in sample_sites(t) if n in draws.leaves)  # leaves: the latents
        for t in (draws.q_trace, draws.p_trace)
    ]
    if firsts != [name, name]:
        raise ConfigError(
            f"elbo-condkl-sg needs an analytic KL at site {name!r} "
            f"({type(q_site['fn']).__name__} vs {type(p_site['fn']).__name__}): only the top "
            "site may use a distribution without a closed-form KL"
        )
    z = draws.live[name]
    return q_site["fn"].log_prob(z) - p_site["fn"].log_prob(z)
