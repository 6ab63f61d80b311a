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

with ``|_z``: samples held fixed. Each estimator weights the three terms with its own
coefficients ``(c_p, c_q, c_path)``. The engine gets them from one pass of the guide and
the model at the live samples: autograd through ``sum_s c_path_s log w_s`` there gives
``c_path`` times all three terms (the path term through ``g`` into every parameter,
upstream samples included), and where ``c_p`` or ``c_q`` differs from ``c_path`` it adds
``(c_p - c_path) log p`` or ``-(c_q - c_path) log q`` evaluated at detached copies ``z~``
of the samples with live parameters (one more pass of the model or the guide), whose
gradient is the ``|_z`` term alone. Plain reparameterized estimators need no second pass.
The coefficients:

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
  parameter. The loss value is the IWAE bound. The identity is applied to ``w_bar_s`` as
  a function of ``z_s`` alone: it needs each ``log w_s`` to depend on its own sample only,
  which batch norm in training mode breaks; such pairs are refused (:mod:`.coupling`).

All guide sites must be reparameterized (``has_rsample``). Scales follow one rule
(:mod:`pyro_ladder._traces`, "Scales"): the data plate's subsample factor ``N / B``
multiplies the summed per-data-point objective, so a minibatch gives an unbiased estimate
of the full-data bound; a site's own scale (KL warm-up, :mod:`pyro_ladder.warmup`; a
``poutine.scale``) multiplies its log-density inside ``log w``. A pair with a site outside
``pyro.plate("data")`` (a global latent) gets one joint weight per particle for the whole
batch, ``log w_s = log p(x_1..x_B, z_s) - log q(z_s | x_1..x_B)``, and every objective
above is then the bound on ``log p(x_1..x_B)`` (such a pair cannot be subsampled).

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

import contextlib
import math
import threading
import warnings

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO

from .._capture import capturing
from .._checks import check_pair_args
from .._params import SentAlready
from .._traces import (
    WeightLayout,
    check_guide_covers_model,
    check_reparameterized,
    held_log_density,
    latent_sites,
    live_parameters,
    log_density,
    max_plate_nesting,
    own_scale,
    parameter_roles,
    particle_plate,
    particle_traces,
    per_datapoint,
    sample_sites,
    site_kl,
    weight_layout,
)
from .._util import held_statistics, rng_state, set_rng_state
from ..errors import ConfigError
from .coupling import (
    check_discrete_own_particle,
    check_no_training_batch_norm,
    check_own_sample_only,
    modules_run,
    signature,
)
from .scoped import ScopedELBO
from .surrogate import value_with_gradient


class _Draws:
    """``S`` vectorized draws ``z ~ q(z | x)``, the model replaying them, and the
    log-densities per (sample, data point), computed once per step.

    ``log_p`` and ``log_q`` (``(S, B)``) are taken at the live samples, so their gradient is
    the full reparameterized one. :meth:`fixed_log_p` and :meth:`fixed_log_q` evaluate them
    again at detached copies of the samples with live parameters (the ``|_z`` terms of the
    module's derivation), running the model or the guide once more, only when asked.
    """

    def __init__(self, model, guide, args, kwargs, particles, nesting, estimator, rsample=True):
        self._call = (model, guide, args, kwargs)
        self.particles, self.nesting = particles, nesting
        self.guide_trace, self.model_trace = particle_traces(model, guide, args, kwargs, particles)
        if rsample:
            check_reparameterized(self.guide_trace, estimator)
        # site -> live reparameterized sample (S, ..., B, event)
        self.latents = {n: s["value"] for n, s in latent_sites(self.guide_trace)}
        check_guide_covers_model(self.model_trace, self.guide_trace)
        self.layout: WeightLayout = weight_layout(self.model_trace, self.guide_trace)
        log_p = self.log_density(self.model_trace)
        log_q = self.log_density(self.guide_trace, only=self.latents)
        self.shape = torch.broadcast_shapes(log_p.shape, log_q.shape)
        self.log_p, self.log_q = _full(log_p, self.shape), _full(log_q, self.shape)
        self._fixed = {}
        self._values = None  # detached samples, one set for every fixed pass

    def log_density(self, trace, only=None) -> torch.Tensor:
        """``(S, B)`` (``(S, 1)`` for a joint weight) log-density of a trace's sites."""
        return log_density(trace, self.nesting, True, only, self.layout.joint)

    def kl_weight(self):
        """``beta``: the one weight (own scale times scalar mask, e.g. a KL warm-up's) that
        every latent guide site carries inside ``log w``; a float or a 0-dim tensor.

        The DReG identities are taken for a guide density tempered as a whole; a weight
        that differs between sites, or between the elements of one site, is refused."""
        return common_kl_weight(self.guide_trace)

    def roles(self, refresh=False):
        """:func:`~pyro_ladder._traces.parameter_roles` of the pair, keyed by this pass's
        parameters (found again when ``refresh``; the fixed-sample passes, which froze the
        old model parameters, are then dropped too)."""
        if refresh:
            self._fixed.clear()
        traces = (self.guide_trace, self.model_trace)
        return parameter_roles(*self._call, traces=traces, refresh=refresh)

    def without_role(self, roles) -> dict:
        """``{name: tensor}`` of the parameters this pass registers (with
        ``requires_grad``) that ``roles`` leave out: those neither side depends on, or
        roles gone stale."""
        placed = {id(t) for group in roles for t in group.values()}
        params = live_parameters((self.guide_trace, self.model_trace))
        return {n: t for n, t in params.items() if id(t) not in placed}

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_p - self.log_q

    def fixed_trace(self, which: str, frozen=()):
        """The ``"guide"``'s or the ``"model"``'s trace at the detached samples, with the
        parameters in ``frozen`` taking no gradient."""
        key = (which, bool(frozen))
        if key not in self._fixed:
            if self._values is None:  # the same tensors for every pass: the memo may reuse work
                self._values = {n: v.detach() for n, v in self.latents.items()}
            model, guide, args, kwargs = self._call
            fn = SentAlready()(guide if which == "guide" else model)
            fn = poutine.condition(fn, data=self._values)
            # the live pass registered every parameter already: keep these registrations
            # from the outer handlers (SVI's parameter capture included) and from the trace;
            # the ladder's module registrations are not even sent (SentAlready)
            fn = poutine.block(fn, hide_types=["param"])
            # batch norm moves its statistics once per step, in the live pass
            with self.particles, _frozen(frozen), held_statistics(model, guide):
                self._fixed[key] = poutine.trace(fn).get_trace(*args, **kwargs)
        return self._fixed[key]

    def fixed_log_q(self, frozen=()) -> torch.Tensor:
        """``log q(z~ | x)`` ``(S, B)`` at the detached samples, live parameters but those
        in ``frozen``."""
        trace = self.fixed_trace("guide", frozen)
        return _full(self.log_density(trace, only=self.latents), self.shape)

    def held_log_q(self, roles):
        """``log q(z | x)`` ``(S, B)`` at the live samples with the guide's own parameters
        (``roles.guide_only``) held, their gradient the path term through the samples alone,
        from the guide's declarations (:func:`~pyro_ladder._traces.held_log_density`: the
        ladder's top-down guides), or ``None`` where ``roles`` do not vouch for them (then
        the guide's pass at detached samples is needed)."""
        if not getattr(roles, "heads_detach_guide", False):
            return None
        held = held_log_density(self.guide_trace, self.nesting, self.latents, self.layout.joint)
        return None if held is None else _full(held, self.shape)

    def fixed_log_p(self) -> torch.Tensor:
        """``log p(x, z~)`` ``(S, B)`` at the detached samples, live parameters."""
        return _full(self.log_density(self.fixed_trace("model")), self.shape)


def _full(log_density: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``log_density`` broadcast to ``shape`` (``(S, B)``); itself when it has that shape
    (no view, and no node for autograd to pass through)."""
    return log_density if log_density.shape == shape else log_density.expand(shape)


class WeightedELBO(ScopedELBO, ELBO):
    """Base class: ``S = num_particles`` vectorized draws, an objective ``F(log w)`` per data
    point, and the surrogate coefficients ``(c_p, c_q, c_path)`` described in the module.

    Subclasses implement :meth:`objective` and may override :meth:`coefficients`.
    A subclass whose gradient assumes that each weight depends on its own sample only
    (the DReG family) sets :attr:`needs_independent_particles`; it then refuses pairs that
    couple particles (:mod:`.coupling`). One that serves guides with discrete sites sets
    ``rsample = False``.
    """

    #: the gradient assumes ``log w_s`` depends on ``z_s`` alone (checked, :mod:`.coupling`)
    needs_independent_particles: bool = False
    rsample = True  # refuse guide sites without rsample

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
        """``-(N / B) sum_b F_b``, the negative objective summed over the batch, times the
        data plate's subsample factor (1 without subsampling)."""
        with torch.no_grad():
            draws = self._draw(model, guide, args, kwargs)
            return -draws.layout.scale * self.value(draws.log_w).item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The loss as a 0-dim tensor: its value is :meth:`loss`'s on these draws, its
        gradient the one :meth:`loss_and_grads` accumulates. For training loops that call
        ``backward`` themselves (PyTorch Lightning, ``DistributedDataParallel``)."""
        # the networks the pair ran, for the coupling probes (only estimators that probe)
        recorder = modules_run() if self.needs_independent_particles else contextlib.nullcontext(())
        with recorder as ran:
            draws = self._draw(model, guide, args, kwargs)
        self.check_draws(draws, (model, guide, args, kwargs), ran)
        log_w = draws.log_w.detach()  # (S, B)
        scale = draws.layout.scale
        value, surrogate = self.value(log_w), self.surrogate(draws, log_w)
        return value_with_gradient(-scale * value, -scale * surrogate)

    def value(self, log_w: torch.Tensor) -> torch.Tensor:
        """The objective summed over the batch (0-dim); the loss is minus it, scaled."""
        return self.objective(log_w).sum()

    def surrogate(self, draws: _Draws, log_w: torch.Tensor) -> torch.Tensor:
        """A scalar whose gradient is the estimator's gradient of :meth:`value`
        (``log_w``: the draws' weights, detached); default: :meth:`coefficients`."""
        return self._surrogate(draws, *self.coefficients(log_w))

    def check_pair(self, model, guide) -> None:
        """Refuse, before any draw, a pair this estimator cannot serve: for the DReG family,
        modules with batch norm in training mode (:mod:`.coupling`; structural, stricter than
        the probes: it also refuses batch norm that reads no sample). Run layers call it
        before they write anything."""
        if self.needs_independent_particles:
            check_no_training_batch_norm(self._name(), model, guide)

    def check_draws(self, draws: _Draws, call, ran=()) -> None:
        """Refuse draws the estimator cannot serve, before any gradient: for the DReG
        family the probes of :mod:`.coupling`, once per :func:`~.coupling.signature`
        (remembered on the instance; ``ran``: the modules that ran in the draw). A coupling
        found in a pair with batch norm in training mode is refused by the layer's name
        (:meth:`check_pair`); batch norm that couples nothing is served."""
        if not self.needs_independent_particles:
            return
        model, guide, args, kwargs = call
        key = signature(model, guide, args, kwargs, ran)
        probed = self.__dict__.setdefault("_probed", set())
        if key in probed:
            return
        # the probes leave the generators as they were (the discrete one may draw): a
        # fresh estimator, as a resumed run or a captured step builds, draws what the
        # probed one draws
        state = rng_state()
        try:
            check_own_sample_only(
                self._name(), draws.log_w, draws.guide_trace, draws.latents,
                draws.nesting, draws.layout.joint,
            )  # fmt: skip
            check_discrete_own_particle(self._name(), draws, ran)
        except ConfigError:
            self.check_pair(model, guide)  # names the batch norm layer, if that is the cause
            raise
        finally:
            set_rng_state(state)
        probed.add(key)

    def _name(self) -> str:
        return getattr(self, "label", type(self).__name__)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        # this call owns the loss's one backward pass: a split surrogate may hand its
        # gradient tensors over instead of keeping them (_GivenGradients)
        outer, _HANDING_OVER.estimator = getattr(_HANDING_OVER, "estimator", None), self
        try:
            loss = self.differentiable_loss(model, guide, *args, **kwargs)
        finally:
            _HANDING_OVER.estimator = outer
        if loss.requires_grad:
            loss.backward()
        return loss.item()

    @staticmethod
    def _surrogate(draws: _Draws, c_p, c_q, c_path, frozen=None, roles=None):
        """A scalar whose gradient is ``sum c_p d log p|_z - sum c_q d log q|_z`` plus the
        path term with ``c_path``, evaluated as

        ``sum c_path log w + sum (c_p - c_path) log p(z~) - sum (c_q - c_path) log q(z~)``

        (``log w`` at the live samples carries the path term and ``c_path`` times both direct
        terms; the fixed-sample terms correct the direct ones). A coefficient that *is*
        ``c_path`` (the same tensor) needs no correction and no extra pass.

        ``frozen``: the model's parameters, when only the guide's own (``roles.guide_only``)
        will be differentiated. The model's correction is then left out (its gradient for them
        is zero) and the guide's fixed-sample pass runs with ``frozen`` taking no gradient,
        which lets the ladder's memo serve the prior networks' outputs from the live pass.
        Where moreover ``c_q`` is :data:`NO_SCORE` and the guide declares its density with
        its own parameters held (:meth:`_Draws.held_log_q`, the ladder's top-down guides),
        no pass is needed: ``sum c_path (log p - log q_held)`` at the live samples has the
        path term alone as its gradient for the guide's own (the reference's one-pass DReG).
        """
        if c_q is NO_SCORE and frozen is not None and roles is not None:
            held = draws.held_log_q(roles)
            if held is not None:
                return (c_path * (draws.log_p - held)).sum()
        surrogate = (c_path * draws.log_w).sum()
        if c_q is not c_path:
            surrogate = surrogate - ((c_q - c_path) * draws.fixed_log_q(frozen or ())).sum()
        if frozen is None and c_p is not c_path:
            surrogate = surrogate + ((c_p - c_path) * draws.fixed_log_p()).sum()
        return surrogate

    def _split_surrogate(self, draws, guide_coeffs, model_coeffs) -> torch.Tensor:
        """A surrogate whose gradient comes from ``model_coeffs`` for the parameters the
        model's density depends on (shared ones included) and from ``guide_coeffs`` for the
        guide's own (:func:`~pyro_ladder._traces.parameter_roles`: by dependence).

        Each group's gradient ``g`` is taken by autograd first; the result is a zero whose
        backward hands every parameter ``g`` (the gradient of the linear form
        ``sum_p <g_p, p>`` with ``g`` held fixed, without forming it), so a later
        ``backward`` gives every parameter exactly its group's gradient.
        """
        # the loss is -scale times the surrogate (differentiable_loss): its gradients are
        # taken with that factor, and divided out of the result, so that the backward of a
        # loss hands them over as they are (_GivenGradients)
        factor = -draws.layout.scale
        found = self._group_gradients(draws, draws.roles(), guide_coeffs, model_coeffs, factor)
        if isinstance(found, list):  # the live pass reaches parameters without a role
            found = self._group_gradients(
                draws, draws.roles(refresh=True), guide_coeffs, model_coeffs, factor
            )
        if isinstance(found, list):
            raise ConfigError(
                f"{self._name()}: the pass reaches parameters {found[:3]} that the "
                "dependence pass of parameter_roles (eval mode, its own random numbers) "
                "does not: the pair's structure must not depend on random draws or on "
                "training mode; train it with 'iwae' or 'elbo', which need no roles"
            )
        params, grads = found
        if not params:
            return draws.log_p.new_zeros(())
        hand_over = getattr(_HANDING_OVER, "estimator", None) is self
        return _GivenGradients.apply(tuple(grads), hand_over, *params) / factor

    def _group_gradients(self, draws, roles, guide_coeffs, model_coeffs, factor=1.0):
        """``(params, grads)`` of :meth:`_split_surrogate` (the gradients times ``factor``),
        or a list of the names of the parameters that the live pass reaches but ``roles``
        leave out (their gradients would be lost).

        The check costs no extra backward: the guide group's ``autograd.grad`` also asks
        for those parameters, and its surrogate holds ``log w`` of the live pass, which
        reaches every parameter either side uses."""
        guide_only, model_params, _ = roles
        unplaced = draws.without_role(roles)
        frozen = list(model_params.values())
        groups = [(guide_only, guide_coeffs, True), (model_params, model_coeffs, False)]
        params, grads = [], []
        for group, coeffs, retain in groups:
            tensors = [p for p in group.values() if p.requires_grad]
            extra = unplaced if retain else {}  # asked once, of the guide group's pass
            if retain:
                surrogate = self._surrogate(draws, *coeffs, frozen, roles)
            else:
                surrogate = self._surrogate(draws, *coeffs)
            if not (tensors or extra) or not surrogate.requires_grad:
                continue
            found = torch.autograd.grad(
                surrogate,
                tensors + list(extra.values()),
                grad_outputs=torch.full_like(surrogate, factor),
                retain_graph=retain,
                allow_unused=True,
            )
            reached = [
                n for n, g in zip(extra, found[len(tensors) :], strict=True) if g is not None
            ]
            if reached:
                return reached
            for param, grad in zip(tensors, found, strict=False):
                if grad is not None:
                    params.append(param)
                    grads.append(grad)
        return params, grads

    def _get_trace(self, model, guide, args, kwargs):
        """One ``(model_trace, guide_trace)`` pair, for Pyro's generic ELBO helpers."""
        guide_trace, model_trace = particle_traces(model, guide, args, kwargs)
        return model_trace, guide_trace

    def _dF(self, log_w: torch.Tensor) -> torch.Tensor:
        """``dF / d log w``, ``(S, B)``, by autograd on a detached copy."""
        with torch.enable_grad():
            leaf = log_w.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.objective(leaf).sum(), leaf)
        return grad

    def _draw(self, model, guide, args, kwargs) -> _Draws:
        check_pair_args(type(self).__name__, model=model, guide=guide)
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = max_plate_nesting(model, guide, args, kwargs)
        nesting = self.max_plate_nesting
        particles = particle_plate("_num_particles_vectorized", self.num_particles, nesting)
        name = type(self).__name__
        return _Draws(model, guide, args, kwargs, particles, nesting, name, self.rsample)


def dreg_coefficients(log_w: torch.Tensor, outer: int, beta=1.0):
    r"""``(c_p, c_q, c_path)`` of the DReG estimator of the mean of ``outer`` IWAE bounds
    over consecutive blocks of ``log_w`` ``(M K, B)``: ``c_p`` and ``c_path`` ``(M K, B)``,
    detached; ``c_q`` is :data:`NO_SCORE`.

    ``beta`` is the KL weight every latent guide site carries inside ``log w`` (a warm-up:
    ``log w = log p(x | z) + beta (log p(z) - log q(z | x))``). The guide's direct term is
    then ``-beta sum_s c_s d log q|_z`` and the identity turns it into
    ``-beta sum_s (c_s - c_s w_bar_s) d_z log w_s . d z_s``, so
    ``c_path = c ((1 - beta) + beta w_bar)``: ``c w_bar`` at ``beta = 1``, the plain path
    term ``c`` at ``beta = 0`` (no guide density in the weight)."""
    grouped = log_w.detach().reshape(outer, -1, *log_w.shape[1:])  # (M, K, B)
    w_bar = grouped.softmax(1).reshape(log_w.shape)  # (M K, B), normalized per bound
    c = w_bar / outer
    path = c * w_bar if _is_one(beta) else c * ((1 - beta) + beta * w_bar)
    return c, NO_SCORE, path


NO_SCORE = 0.0
"""``c_q`` of the estimators that drop the guide's direct term (DReG): zero, a number
rather than a tensor of zeros, so that :meth:`WeightedELBO._surrogate` can see it."""


def _is_one(beta) -> bool:
    return not isinstance(beta, torch.Tensor) and beta == 1


def common_kl_weight(guide_trace):
    """The KL weight shared by every latent site of a guide trace (see
    :meth:`_Draws.kl_weight`)."""
    weights = {}
    for name, site in latent_sites(guide_trace):
        mask, beta = site["mask"], own_scale(site)
        if isinstance(beta, torch.Tensor) and beta.numel() != 1:
            beta = None
        if mask is False:
            beta = 0.0
        elif isinstance(mask, torch.Tensor):
            beta = None if mask.numel() != 1 or beta is None else beta * mask.to(log_dtype(site))
        if beta is None:
            raise ConfigError(
                f"guide site {name!r} carries a scale or mask that varies between its "
                "elements: the doubly reparameterized estimators need one KL weight per "
                "site (a KL warm-up's beta); use 'iwae' or 'miwae' for such a pair"
            )
        weights[name] = beta
    values = list(weights.values())
    if any(not _same_weight(values[0], v) for v in values[1:]):
        raise ConfigError(
            "the doubly reparameterized estimators need one KL weight for every latent "
            f"guide site, got {_describe(weights)}: warm all layers up together (LatentWeight "
            "around the whole model and guide), or use 'iwae' / 'miwae'"
        )
    return values[0] if values else 1.0


def log_dtype(site):
    return site["value"].dtype if site["value"].is_floating_point() else torch.get_default_dtype()


def _same_weight(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if capturing():  # no host read in a captured step: its eager check ran this test
            return True
        return bool(torch.as_tensor(a) == torch.as_tensor(b))
    return a == b


def _describe(weights) -> str:
    return ", ".join(f"{n}: {float(w):g}" for n, w in weights.items())


# per thread: the estimator whose loss_and_grads is running (it owns the backward pass)
_HANDING_OVER = threading.local()


class _GivenGradients(torch.autograd.Function):
    """A zero scalar whose backward gives each of ``params`` its entry of ``grads`` (times
    the incoming gradient): ``sum_p <g_p, p>``'s gradient at the cost of handing it over.

    The usual incoming gradient is exactly 1 (:meth:`WeightedELBO._split_surrogate` takes
    the loss's factor into ``grads``), and the tensors are then returned as they are. With
    ``hand_over`` (``loss_and_grads``, which owns the loss's one backward pass) the node
    also lets go of them, so that autograd stores each as the parameter's ``.grad`` instead
    of copying it; otherwise (``differentiable_loss``: a caller may take the gradient in
    parts, ``autograd.grad`` over some parameters with ``retain_graph``, then the rest) it
    keeps them for every backward pass through it."""

    @staticmethod
    def forward(ctx, grads, hand_over, *params):
        ctx.grads, ctx.hand_over = grads, hand_over
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, out):
        grads = ctx.grads
        if ctx.hand_over:
            ctx.grads = None  # loss_and_grads runs one backward pass
        # on a CPU the test is free; elsewhere it would wait for the device, so scale
        if not capturing() and out.device.type == "cpu" and bool(out == 1):
            return (None, None, *grads)
        return (None, None, *(out * g for g in grads))


@contextlib.contextmanager
def _frozen(params):
    """``requires_grad`` off for ``params`` inside the block (graphs built before it keep
    their parameters; no backward may run inside). ``pyro.module`` warns about frozen
    parameters it meets there; they were registered by the live pass."""
    flipped = [p for p in params if p.requires_grad]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(?s).*requires_grad=False", UserWarning)
        try:
            for p in flipped:
                p.requires_grad_(False)
            yield
        finally:
            for p in flipped:
                p.requires_grad_(True)


def _iwae(log_w: torch.Tensor) -> torch.Tensor:
    return log_w.logsumexp(0) - math.log(log_w.shape[0])


class IWAE_DReG(WeightedELBO):
    """IWAE bound with doubly reparameterized gradients (``"iwae-dreg"``); see the module.

    :param shared: ``"dreg"`` applies the doubly reparameterized estimate to every
        parameter (the derivation above). ``"iwae"`` keeps it for the parameters only the
        guide depends on and gives those the model's density depends on (shared ones
        included) the plain IWAE gradient, which is just as unbiased; measured on the
        ladder, the DReG
        path term makes the shared prior networks' gradient far noisier (README), so this
        is the default.

    Refuses pairs whose weights couple particles (batch norm in training mode, the
    ladder's default): the estimator is then biased and none exists at its cost
    (:mod:`pyro_ladder.elbo.coupling`).
    """

    needs_independent_particles = True
    label = "iwae-dreg"

    def __init__(self, num_particles=1, shared: str = "iwae", max_plate_nesting=float("inf")):
        if shared not in ("dreg", "iwae"):
            raise ConfigError(f"shared must be 'dreg' or 'iwae', got {shared!r}")
        self.shared = shared
        super().__init__(num_particles, max_plate_nesting)

    def objective(self, log_w):
        return _iwae(log_w)

    def coefficients(self, log_w, beta=1.0):
        """``(w_bar, 0, w_bar ((1 - beta) + beta w_bar))``; ``beta``: the guide's KL weight
        (:meth:`_Draws.kl_weight`), 1 without warm-up (the module's derivation)."""
        return dreg_coefficients(log_w, 1, beta)

    def surrogate(self, draws, log_w):
        coefficients = self.coefficients(log_w, draws.kl_weight())
        if self.shared == "dreg":
            return self._surrogate(draws, *coefficients)
        w_bar = log_w.softmax(0)
        return self._split_surrogate(draws, coefficients, (w_bar,) * 3)


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

    Encoder and decoder are split by autograd dependence, whatever the registration: the
    decoder is every parameter the model's density depends on, those the guide uses too
    included (the
    ladder's prior networks, which define ``p(z_i | z_{i+1})`` and serve the merge); the
    encoder is the guide's own remaining parameters. The prior networks go with the decoder
    because they are parameters of the generative model, whose gradient signal improves
    with more samples, while the encoder's falls (Rainforth et al. 2018).
    """

    def value(self, log_w):
        return _iwae(log_w).sum()

    def surrogate(self, draws, log_w):
        c_dec = log_w.softmax(0)  # dIWAE(MK)/dlog w
        c_enc = self._dF(log_w)  # dMIWAE(M, K)/dlog w
        return self._split_surrogate(draws, (c_enc,) * 3, (c_dec,) * 3)


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
            draws = self._draw(model, guide, args, kwargs)
            rec, kl = self._terms(draws, fixed=False)
        return -draws.layout.scale * (rec - kl).mean(0).sum().item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        draws = self._draw(model, guide, args, kwargs)
        rec, kl = self._terms(draws, fixed=True)  # (S, B) each
        surrogate = draws.layout.scale * (rec - kl).mean(0).sum()
        return value_with_gradient(-surrogate.detach(), -surrogate)

    def _terms(self, draws: _Draws, fixed: bool):
        """Reconstruction ``(S, B)`` (observed sites) at the live samples, so its gradient
        takes the path through them, and summed conditional KL ``(S, B)``: at the samples
        held fixed (``fixed=True``, the semi-gradient) or at the live ones (same values)."""
        observed = [n for n, _ in sample_sites(draws.model_trace) if n not in draws.latents]
        rec = draws.log_density(draws.model_trace, only=observed)
        if fixed:
            q_trace, p_trace = draws.fixed_trace("guide"), draws.fixed_trace("model")
        else:
            q_trace, p_trace = draws.guide_trace, draws.model_trace
        kl = 0.0
        for name in draws.latents:
            q_site, p_site = q_trace.nodes[name], p_trace.nodes[name]
            value, analytic = site_kl(q_site, p_site)
            if not analytic:
                value = _sampled_top_kl(draws, name)
            value = scale_and_mask(value, own_scale(q_site), q_site["mask"])
            kl = kl + per_datapoint(q_site, value, draws.nesting, draws.layout.joint)
        return rec, kl


def _sampled_top_kl(draws: _Draws, name: str) -> torch.Tensor:
    """``log q(z) - log p(z)`` at the live sample ``(S, B, ...)`` for a site whose KL has no
    closed form. Only the first latent of both traces qualifies: it has no upper sample to
    hold fixed, so its semi-gradient is the full reparameterized gradient."""
    q_site, p_site = draws.guide_trace.nodes[name], draws.model_trace.nodes[name]
    firsts = [
        next(n for n, _ in sample_sites(t) if n in draws.latents)
        for t in (draws.guide_trace, draws.model_trace)
    ]
    if firsts != [name, name]:
        raise ConfigError(
            f"elbo-condkl-sg needs an analytic KL at site {name!r} "
            f"({type(q_site['fn']).__name__} vs {type(p_site['fn']).__name__}): only the top "
            "site may use a distribution without a closed-form KL"
        )
    return site_kl(q_site, p_site)[0]  # log q - log p at the live sample
