"""The one home of trace plumbing for the estimators, evaluation, diagnostics and surrogates.

* :func:`particle_traces`: ``S`` vectorized draws of a guide and the model replayed on
  them (the particle plate left of every plate the pair uses);
* :func:`per_datapoint`, :func:`site_log_prob` and :func:`log_density`: a trace's
  log-densities reduced to ``(S, B)`` per (particle, data point), or to ``(S, 1)`` for a
  joint weight. What scales mean is decided here alone (:func:`weight_layout` and
  :func:`site_log_prob`, see "Scales" below);
* :func:`site_kl`: ``KL(q || p)`` of one latent site, analytic where torch knows it, else
  the Monte Carlo ``log q - log p`` at the sample;
* :func:`check_guide_covers_model` and :func:`check_reparameterized`: what importance
  weighting needs of a pair;
* :func:`parameter_roles`: which parameters feed the model, the guide or both, by autograd
  dependence (never by registration). Every estimator and diagnostic asks here, so the
  rule lives in one place.

None of these open a reuse scope (:mod:`pyro_ladder._memo`): the caller opens one around
the whole computation whose guide outputs its model may reuse.

**Scales.** A site's ``scale`` is the product of the subsample factors ``N / B`` of its
subsampled plates and of any ``poutine.scale`` around it (the KL warm-up's
:class:`~pyro_ladder.warmup.LatentWeight` included). The multi-sample estimators read the
two differently:

* the **data plate's subsample factor** multiplies the per-data-point bound, outside the
  logsumexp over particles: ``(N / B) sum_b F(log w_b)`` is an unbiased estimate of the
  full-data bound ``sum_n F(log w_n)`` (:attr:`WeightLayout.scale`);
* **a site's own scale** (what is left once the subsample factors are divided out)
  multiplies that site's log-density inside ``log w``: a tempered weight, which is what a
  KL warm-up or a scaled likelihood ``p(x | z)^c`` means for an importance-weighted bound;
* a subsampled plate other than ``"data"`` is refused: its factor would sit inside the
  logsumexp, where it does not give an unbiased estimate of anything.

A pair with a site outside ``pyro.plate("data")`` (a global latent, a second data plate)
gets a **joint** weight, one per particle for the whole batch, as Pyro's sequential
``RenyiELBO`` computes: a valid bound on ``log p(x_1..x_B)``, which cannot be split into
data points (so :func:`~pyro_ladder.evaluate` refuses such pairs) and is refused together
with subsampling (the factor would sit inside the logsumexp).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites

from ._memo import ReuseOutputs, reuse_outputs
from ._util import eval_as_met, eval_mode, held_statistics, modules_of, without_side_effects
from .errors import ConfigError
from .warmup import UNWEIGHTED_MASK

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


@dataclass(frozen=True)
class WeightLayout:
    """How a pair's log-weights are reduced, from :func:`weight_layout`.

    :param joint: one weight per particle for the whole batch (``(S, 1)``) instead of one
        per data point (``(S, B)``): some site lies outside ``pyro.plate("data")``.
    :param scale: the data plate's subsample factor ``N / B`` (1 without subsampling),
        which multiplies the summed per-data-point objective.
    """

    joint: bool = False
    scale: float = 1.0


def weight_layout(*traces) -> WeightLayout:
    """The :class:`WeightLayout` of the sample sites of ``traces`` (the model's, the
    guide's), after checking that their subsampling has a meaning (module docstring).

    :raises ConfigError: for a subsampled plate other than ``"data"``, or a subsampled
        data plate together with a site outside it.
    """
    outside, factors = None, {}
    for trace in traces:
        for name, site in sample_sites(trace):
            frames = site["cond_indep_stack"]
            if not any(f.name == DATA_PLATE and f.vectorized for f in frames):
                outside = outside or name
            factors.update((f.name, factor) for f in frames if (factor := _subsample(f)) != 1)
    others = sorted(set(factors) - {DATA_PLATE})
    if others:
        raise ConfigError(
            f"plate {others[0]!r} is subsampled: a multi-sample bound can only take the "
            f"subsample factor of pyro.plate({DATA_PLATE!r}, ...) (it multiplies the "
            "per-data-point bound); inside the logsumexp any other factor gives no bound: "
            "use the whole plate, or train with 'elbo'"
        )
    if outside is not None and factors:
        raise ConfigError(
            f"site {outside!r} is outside pyro.plate({DATA_PLATE!r}, ...), so the weight is "
            "joint over the batch, and a joint weight cannot take the data plate's subsample "
            "factor (it would sit inside the logsumexp): pass whole batches (no "
            "subsample_size / subsample), or train with 'elbo'"
        )
    return WeightLayout(joint=outside is not None, scale=factors.get(DATA_PLATE, 1.0))


def _subsample(frame) -> float:
    """``N / B`` of a plate frame (1 when the plate is not subsampled)."""
    if frame.full_size is None or frame.full_size == frame.size:
        return 1
    return frame.full_size / frame.size


def per_datapoint(site, value: torch.Tensor, nesting: int, joint: bool = False) -> torch.Tensor:
    """Reduce a site's ``log_prob`` to ``(S, B)``: sum every plate but particles and data.

    ``joint``: sum the data plate too (and accept sites outside it): ``(S, 1)``.
    """
    full = nesting + 1
    if value.dim() < full:  # (S|1, ..., B|1, ...)
        value = value.reshape((1,) * (full - value.dim()) + value.shape)
    if joint:
        return value.sum(list(range(1, full))).reshape(value.shape[0], 1)  # (S|1, 1)
    data_dims = [f.dim for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    if not data_dims or data_dims[0] is None:
        raise ConfigError(
            f"site {site['name']!r} is outside pyro.plate({DATA_PLATE!r}, ...): per-data-point "
            "evaluation needs every sample site inside that plate"
        )
    keep = {0, full + data_dims[0]}
    others = [d for d in range(full) if d not in keep]
    if others:
        value = value.sum(others, keepdim=True)
    if value.dim() == 2:  # (S|1, B|1) already: no view (a node fewer for autograd)
        return value
    return value.reshape(value.shape[0], value.shape[full + data_dims[0]])  # (S|1, B|1)


def site_log_prob(site, scaled: bool, fn=None) -> torch.Tensor:
    """A site's elementwise log-density with its mask applied, times its **own** scale when
    ``scaled`` (the estimators: the site's scale with its plates' subsample factors divided
    out, e.g. a KL warm-up's weight; the data plate's factor is applied to the bound
    instead, :class:`WeightLayout`) or not (evaluation: the model's own density). The one
    place that decides what a site's scale means inside a weight. ``fn``: a distribution
    that stands for the site's own (:func:`held_log_density`)."""
    log_p = (site["fn"] if fn is None else fn).log_prob(site["value"])
    if scaled:
        return scale_and_mask(log_p, own_scale(site), site["mask"])
    mask = model_mask(site)
    if mask is False:
        return torch.zeros_like(log_p)
    if mask is not None and mask is not True:
        log_p = torch.where(mask, log_p, torch.zeros_like(log_p))
    return log_p


def model_mask(site):
    """The site's mask without a KL warm-up's (:class:`~pyro_ladder.warmup.LatentWeight`
    masks latent sites at ``beta = 0``: a weight, which evaluation ignores like a scale)."""
    return site["infer"].get(UNWEIGHTED_MASK, site["mask"])


def own_scale(site):
    """The site's ``scale`` without its plates' subsample factors (``poutine.scale`` and
    warm-up weights only)."""
    factor = math.prod(_subsample(f) for f in site["cond_indep_stack"])
    return site["scale"] if factor == 1 else site["scale"] / factor


def log_density(trace, nesting: int, scaled: bool, only=None, joint: bool = False):
    """Sum of the sites' log-densities (those named in ``only``, default all) per
    (particle, data point): ``(S|1, B|1)``, or ``(S|1, 1)`` when ``joint``."""
    total = 0.0
    for name, site in sample_sites(trace):
        if only is None or name in only:
            term = per_datapoint(site, site_log_prob(site, scaled), nesting, joint)
            total = term if isinstance(total, float) else total + term
    return total


def held_log_density(trace, nesting: int, only=None, joint: bool = False):
    """:func:`log_density` (scaled) of a guide trace at its live samples with the guide's
    own parameters held (their gradient: the path term through the samples alone), read
    from the declarations of the ladder's top-down guides
    (:class:`~pyro_ladder.merge.HeadDetached`: each site's density with its bottom-up head
    detached); ``None`` where a site declares none (a user's guide, a handler that
    replaced a site's distribution). Exact for the parameters that reach the declared
    densities only through the samples, which :func:`parameter_roles` checks
    (:attr:`HeldRoles.heads_detach_guide`): the caller must ask it first.

    The roles are cached; whether a head reads a sample is also checked here, on the live
    trace, at no cost: autograd numbers its nodes in the order they are made, so heads all
    made before the first sample (the ladder computes them in its upward pass) cannot
    depend on one. A guide that starts feeding a sample into a head after its roles were
    cached (a flag, a patched method) answers ``None``."""
    declared = _declarations(trace, only)
    if declared is None or not _heads_before_samples(declared):
        return None
    total = 0.0
    for site, declaration in declared:
        log_q = site_log_prob(site, True, declaration.density())
        term = per_datapoint(site, log_q, nesting, joint)
        total = term if isinstance(total, float) else total + term
    return total


def _heads_before_samples(declared) -> bool:
    """Were all heads of ``[(site, HeadDetached)]`` made before every sample that carries a
    graph (autograd's sequence numbers, which grow as this thread makes nodes)? Then no
    head depends on a sample."""
    heads = [t.grad_fn for _, d in declared for t in d.head if t.grad_fn is not None]
    samples = [s["value"].grad_fn for s, _ in declared if s["value"].grad_fn is not None]
    if not heads or not samples:
        return True
    return max(h._sequence_nr() for h in heads) < min(z._sequence_nr() for z in samples)


def _declarations(trace, only=None):
    """``[(site, HeadDetached)]`` of a trace's sample sites (those in ``only``), or
    ``None`` where one has no declaration."""
    sites = [(n, s) for n, s in sample_sites(trace) if only is None or n in only]
    return _declarations_of(sites)


def _declarations_of(sites):
    declared = []
    for _, site in sites:
        base = site["fn"]
        while isinstance(base, torch.distributions.Independent):
            base = base.base_dist
        declaration = getattr(base, "head_detached", None)
        if declaration is None:
            return None
        declared.append((site, declaration))
    return declared or None


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


class Roles(NamedTuple):
    """Unconstrained parameters of a pair by what they feed, each ``{name: tensor}``.

    ``model``: every parameter the model's log-density depends on at fixed latents,
    ``shared`` ones included; ``shared``: those the guide's samples or density depend on
    too (the ladder's prior networks); ``guide_only``: the guide's remaining ones.
    """

    guide_only: dict
    model: dict
    shared: dict


class HeldRoles(Roles):
    """:class:`Roles` as :func:`parameter_roles` answers them, with what the same pass
    found about the guide's declarations (:func:`held_log_density`).

    ``heads_detach_guide``: every latent site of the guide declares its density with its
    head detached, no head depends on a sample, and at detached samples those declared
    densities depend on no tensor of ``guide_only`` (autograd's answers, in the dependence
    pass: :func:`_heads_read_no_sample`, :func:`_held_exactly`). The guide's own parameters
    then reach them only through the samples, so :func:`held_log_density` is ``log q`` with
    them held, exactly. False where a site declares nothing, or where a guide-only tensor
    reaches the density beside the heads (an inference network's parameter carried into
    the prior by a condition, prior networks the model does not use), or where a head reads
    a sample."""

    heads_detach_guide = False


_ROLES_CACHE: collections.OrderedDict = collections.OrderedDict()
_ROLES_CACHE_SIZE = 16


def clear_roles_cache() -> None:
    """Forget every pair's cached parameter roles (:func:`parameter_roles`), and with them
    what the roles' pass found about a guide's declared densities
    (:class:`HeldRoles`). The cache is keyed by the pair, its registered parameters and
    the structure of its arguments; call this after changing which parameters feed the
    model or the guide in a way those do not show (a flag the pair reads, a patched
    method), before the next estimator call. The estimators' own live checks refresh the
    roles when a pass reaches a parameter without one, and check on every call that no
    declared head reads a sample; a parameter moving from one side to the other under the
    same key is not seen without this."""
    _ROLES_CACHE.clear()


def parameter_roles(model, guide, args, kwargs, traces=None, refresh=False) -> Roles:
    """:class:`Roles` of a pair's parameters, found by autograd dependence, never by
    where a parameter is registered (a module registered whole in both the model and the
    guide, a ``PyroModule`` or ``pyro.param`` give the same roles as per-network
    registration).

    One traced pass (eval mode, its own random numbers, no reuse, outer handlers not told
    of its parameters) gives ``log q`` plus the guide's reparameterized samples, and the
    model's ``log p(x, z~)`` at detached samples ``z~``; a parameter whose gradient of one
    of them is ``None`` does not feed it. The answer is cached per pair (the identity of
    ``model`` and ``guide``), parameter set (the tensors the pair registers and their
    ``requires_grad``), read from ``traces`` (``(guide_trace, model_trace)`` of the
    caller's pass) or from one trace of each, and the structure of the arguments
    (:func:`_arg_signature`: which are ``None``, tensor shapes, dtypes and devices, other
    values), since which parameters a pair uses may depend on them (an optional condition
    that switches a prior network on). A pair rebuilt at every call (a new lambda) is
    examined at every call; ``refresh`` examines it again whatever the cache holds (a
    caller that saw a parameter without a role reached by its live pass). Parameters that
    take no gradient have no role, nor do parameters neither side depends on. Tensors the
    pass reaches that the pair does not register with Pyro (a network run without
    ``pyro.module``, data that requires grad) get their roles by dependence too, named
    ``unregistered:...``; a pair with any is examined at every call (one more pass per
    step), since the cache's key cannot tell when they change.
    """
    if traces is None:
        with _quiet_pass(model, guide):
            traces = particle_traces(model, guide, args, kwargs)
    params = live_parameters(traces)
    key = (
        _identity(model),
        _identity(guide),
        tuple((n, id(t)) for n, t in params.items()),
        _arg_signature((args, kwargs), objects := []),
    )
    held = getattr(_HELD_ROLES, "entries", None)
    if held is not None and not refresh and key in held:
        return held[key][1]
    entry = None if refresh else _ROLES_CACHE.get(key)
    if entry is not None and entry[0]() is not None and entry[1]() is not None:
        _ROLES_CACHE.move_to_end(key)
        return entry[3]
    roles, registered_only = _roles_by_dependence(model, guide, args, kwargs, params)
    if held is not None:  # the entry holds the key's tensors and objects, as below
        held[key] = ((tuple(params.values()), objects, model, guide), roles)
    refs = (_weak(model), _weak(guide))
    # the key names the registered tensors only: roles that hold unregistered ones (a
    # network run without pyro.module, data that requires grad) would go stale unseen
    # when those change (a new batch, a replaced network), so they are found at every call
    if registered_only and refs[0] is not None and refs[1] is not None:
        # the entry holds the key's tensors and objects, so their ids cannot pass to new ones
        _ROLES_CACHE[key] = (*refs, (tuple(params.values()), objects), roles)
        while len(_ROLES_CACHE) > _ROLES_CACHE_SIZE:
            _ROLES_CACHE.popitem(last=False)
    return roles


_HELD_ROLES = threading.local()


@contextlib.contextmanager
def roles_held():
    """Inside the block (in this thread), :func:`parameter_roles` answers a pair as it
    first did in the block, also where it would not cache the answer (a pair with tensors
    it does not register): for a captured step (:mod:`pyro_ladder.elbo.captured`), whose
    recording must not run the dependence pass again (its draws would be recorded into
    the graph, and each replay would draw them)."""
    outer = getattr(_HELD_ROLES, "entries", None)
    _HELD_ROLES.entries = {} if outer is None else outer
    try:
        yield
    finally:
        _HELD_ROLES.entries = outer


def live_parameters(traces) -> dict:
    """``{name: tensor}`` of the parameters with ``requires_grad`` that ``traces`` register
    (one entry per tensor)."""
    store = dict(pyro.get_param_store().named_parameters())
    params, seen = {}, set()  # one entry per tensor: it may be registered under two names
    for trace in traces:
        for name, site in trace.nodes.items():
            tensor = store.get(name) if site["type"] == "param" else None
            if tensor is not None and tensor.requires_grad and id(tensor) not in seen:
                params[name] = tensor
                seen.add(id(tensor))
    return params


def _arg_signature(value, objects: list):
    """A hashable description of the structure of a call's arguments: ``None``, a
    tensor's shape, dtype, device and ``requires_grad``, a number's or string's value,
    containers element by element; any other object by its type and identity (a new
    object is a new structure: roles are found again, which costs one pass, never a
    wrong answer). Such objects are appended to ``objects``, which the cache entry holds
    so that their identities cannot pass to new objects."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_arg_signature(v, objects) for v in value))
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: repr(kv[0]))
        return ("dict", tuple((repr(k), _arg_signature(v, objects)) for k, v in items))
    objects.append(value)
    return ("object", type(value).__qualname__, id(value))


def _roles_by_dependence(model, guide, args, kwargs, params: dict) -> tuple[Roles, bool]:
    """The pass :func:`parameter_roles` describes, on the parameters ``params`` and the
    tensors it reaches that the pair does not register; whether there were none such."""
    names, tensors = list(params), list(params.values())
    # the caller may run under no_grad (a check before training): the pass and its
    # log-densities need a graph all the same
    with _quiet_pass(model, guide), torch.inference_mode(False), torch.enable_grad():
        guide_trace, _ = particle_traces(None, guide, args, kwargs)
        latents = latent_sites(guide_trace)
        values = {n: s["value"].detach() for n, s in latents}
        conditioned = poutine.condition(model, data=values)
        model_trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        q_terms = [s["fn"].log_prob(s["value"]).sum() for _, s in latents]
        # a reparameterized sample carries its parameters even where no density does
        q_terms += [s["value"].sum() for _, s in latents if s["value"].requires_grad]
        p_terms = [s["fn"].log_prob(s["value"]).sum() for _, s in sample_sites(model_trace)]
        # tensors the pass reaches that the pair never registers with Pyro (a network it
        # runs without pyro.module): autograd gives them gradients as it gives Pyro's own
        # ELBOs, so they take part by dependence too
        unregistered = _unregistered(q_terms + p_terms, tensors, (model, guide))
        for name, tensor in unregistered.items():
            names.append(name)
            tensors.append(tensor)
        declared = _heads_read_no_sample(latents)  # asked first: it keeps the graph
        in_guide, in_model = (_depends(terms, tensors) for terms in (q_terms, p_terms))
        rows = list(zip(names, tensors, in_model, in_guide, strict=True))
        model_params = {n: t for n, t, m, _ in rows if m}
        shared = {n: t for n, t, m, g in rows if m and g}
        guide_only = {n: t for n, t, m, g in rows if g and not m}
        roles = HeldRoles(guide_only, model_params, shared)
        if declared:
            roles.heads_detach_guide = _held_exactly(guide, args, kwargs, values, roles)
    return roles, not unregistered


def _heads_read_no_sample(latents) -> bool:
    """Inside the dependence pass: does every latent site declare its density with its
    head detached, and no head depend on a sample (detaching it would cut that sample's
    path into the density)? First half of :attr:`HeldRoles.heads_detach_guide`."""
    live = _declarations_of(latents)
    if live is None:
        return False
    heads = [t.sum() for _, d in live for t in d.head if t.requires_grad]
    samples = [s["value"] for _, s in latents if s["value"].requires_grad]
    return not (heads and samples and any(_depends(heads, samples, retain=True)))


def _held_exactly(guide, args, kwargs, values, roles) -> bool:
    """Inside the dependence pass: the guide run again at the detached samples ``values``
    gives declared densities that depend on no guide-only tensor (the heads detached, the
    prior live: whatever reaches them is a direct term that detaching the heads would
    keep). Second half of :attr:`HeldRoles.heads_detach_guide`."""
    fixed = poutine.trace(poutine.condition(guide, data=values)).get_trace(*args, **kwargs)
    declared = _declarations(fixed, values)
    if declared is None:
        return False
    terms = [d.density().log_prob(s["value"]).sum() for s, d in declared]
    return not any(_depends(terms, list(roles.guide_only.values())))


def _unregistered(terms, known, fns) -> dict:
    """``{name: tensor}`` of the leaves with ``requires_grad`` that ``terms``' graph reaches
    and ``known`` does not hold: named ``unregistered:<Module>.<parameter>`` where a module
    behind ``fns`` (:func:`~pyro_ladder._util.modules_of`) holds them, else by position
    and shape."""
    known_ids = {id(t) for t in known}
    found, seen = {}, set()
    stack = [t.grad_fn for t in terms if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node
        if leaf is not None and id(leaf) not in known_ids:
            found.setdefault(id(leaf), leaf)
        stack.extend(n for n, _ in node.next_functions if n is not None and n not in seen)
    if not found:
        return {}
    owners = {}
    for module in modules_of(*fns):
        for pname, param in module.named_parameters():
            owners.setdefault(id(param), f"{type(module).__name__}.{pname}")
    out = {}
    for i, (key, leaf) in enumerate(found.items()):
        name = f"unregistered:{owners.get(key, f'tensor{i}{tuple(leaf.shape)}')}"
        out[name if name not in out else f"{name}#{i}"] = leaf
    return out


def _depends(terms, tensors, retain: bool = False) -> list[bool]:
    """Per tensor: does the sum of ``terms`` depend on it (autograd's ``None``: no)?
    ``retain``: keep the graph for another question."""
    live = [t for t in terms if t.requires_grad]
    if not tensors or not live:
        return [False] * len(tensors)
    total = sum(live[1:], live[0])
    grads = torch.autograd.grad(total, tensors, allow_unused=True, retain_graph=retain)
    return [g is not None for g in grads]


@contextlib.contextmanager
def _quiet_pass(model, guide):
    """A pass that leaves no trace on the caller: torch's random state restored (CPU and
    the current CUDA device; Pyro draws from nothing else), batch-norm statistics untouched
    (eval mode; held where a TorchScript module's layers stay in training mode), its own
    reuse scope with reuse off, and its parameter registrations kept from outer handlers
    (SVI's capture).

    Buffers are left alone, not restored afterwards (``preserved_state``): a restoring copy
    would bump the version of buffers that the caller's live graph saved for its backward.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with (
        torch.random.fork_rng(devices=devices),
        eval_mode(*modules_of(model, guide)),
        eval_as_met(),  # networks held in closures, which modules_of cannot name
        held_statistics(model, guide),  # layers inside TorchScript, which eval_as_met misses
        reuse_outputs(False),
        ReuseOutputs(),
        poutine.block(hide_types=["param"]),
    ):
        yield


def _identity(fn):
    """A hashable identity of a callable: a bound method by its object and function."""
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return (id(owner), id(getattr(fn, "__func__", fn)))
    return (id(fn),)


def _weak(fn):
    """A weak reference to ``fn`` (a bound method's object kept by ``WeakMethod``), or
    ``None`` when ``fn`` cannot be weakly referenced (then nothing is cached)."""
    try:
        if getattr(fn, "__self__", None) is not None and hasattr(fn, "__func__"):
            return weakref.WeakMethod(fn)
        return weakref.ref(fn)
    except TypeError:
        return None
