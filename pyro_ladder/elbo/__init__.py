"""Estimators by name: :func:`make_elbo` returns a Pyro ELBO object to hand to ``SVI``.

Each runs one call's guide and model in one reuse scope (:mod:`pyro_ladder._memo`); Pyro's
classes are used through same-named subclasses that open it (:mod:`.scoped`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from pyro.infer import ELBO

from ..errors import ConfigError
from .captured import CompiledStep
from .compiled import CompiledNetworks
from .dreg import MIWAE_DReG, PIWAE_DReG
from .enum import EnumELBO
from .renyi import Renyi
from .rws import RWS, RWS_DReG
from .scoped import (
    JitTrace_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from .vimco import VIMCO
from .weighted import (
    CIWAE,
    IWAE_STL,
    MIWAE,
    PIWAE,
    STL,
    CondKLSemiGradient,
    IWAE_DReG,
    WeightedELBO,
)

__all__ = [
    "CIWAE",
    "CompiledNetworks",
    "CompiledStep",
    "CondKLSemiGradient",
    "EnumELBO",
    "PIWAE",
    "ESTIMATORS",
    "Renyi",
    "IWAE_DReG",
    "IWAE_STL",
    "MIWAE",
    "MIWAE_DReG",
    "PIWAE_DReG",
    "RWS",
    "RWS_DReG",
    "VIMCO",
    "STL",
    "WeightedELBO",
    "describe_estimators",
    "make_elbo",
]


@dataclass(frozen=True)
class Estimator:
    """A named estimator: the Pyro class, fixed options, and one line for users."""

    cls: Callable[..., ELBO]
    fixed: dict
    summary: str


ESTIMATORS: dict[str, Estimator] = {
    "elbo": Estimator(Trace_ELBO, {}, "Monte Carlo ELBO (Trace_ELBO)"),
    "meanfield": Estimator(
        TraceMeanField_ELBO, {}, "ELBO with analytic KL where known (TraceMeanField_ELBO)"
    ),
    "tracegraph": Estimator(
        TraceGraph_ELBO, {}, "ELBO with score-function baselines (TraceGraph_ELBO)"
    ),
    "enum": Estimator(
        EnumELBO, {}, "ELBO, discrete sites summed out exactly (TraceEnum_ELBO, config_enumerate)"
    ),
    "iwae": Estimator(Renyi, {"alpha": 0}, "importance-weighted bound, K = num_particles"),
    "renyi": Estimator(Renyi, {}, "Renyi divergence bound, option alpha (default 0: IWAE)"),
    "iwae-dreg": Estimator(
        IWAE_DReG, {}, "IWAE bound, doubly reparameterized gradients (Tucker et al. 2019)"
    ),
    "stl": Estimator(STL, {}, "ELBO, sticking-the-landing gradients (unbiased)"),
    "iwae-stl": Estimator(IWAE_STL, {}, "IWAE bound, sticking-the-landing gradients (biased)"),
    "miwae": Estimator(MIWAE, {}, "mean of M IWAE_K bounds; option outer=M, K=num_particles"),
    "piwae": Estimator(
        PIWAE, {}, "encoder MIWAE(M, K), decoder IWAE(M K) gradients; option outer=M"
    ),
    "miwae-dreg": Estimator(
        MIWAE_DReG, {}, "MIWAE bound, doubly reparameterized guide gradients; option outer=M"
    ),
    "piwae-dreg": Estimator(
        PIWAE_DReG, {}, "encoder MIWAE(M, K) DReG, decoder IWAE(M K) gradients; option outer=M"
    ),
    "rws": Estimator(
        RWS, {}, "reweighted wake-sleep: wake-theta IWAE, wake-phi KL(p || q); discrete ok"
    ),
    "rws-dreg": Estimator(
        RWS_DReG, {}, "reweighted wake-sleep, doubly reparameterized wake-phi (Tucker 2019)"
    ),
    "vimco": Estimator(
        VIMCO, {}, "IWAE bound, leave-one-out baselines for discrete guide sites; K >= 2"
    ),
    "elbo-condkl-sg": Estimator(
        CondKLSemiGradient, {}, "ELBO; conditional KLs do not move upper samples (semi-gradient)"
    ),
    "ciwae": Estimator(CIWAE, {}, "beta ELBO_K + (1 - beta) IWAE_K; option beta"),
    "jit-elbo": Estimator(JitTrace_ELBO, {}, "Trace_ELBO compiled with the PyTorch JIT"),
    "jit-meanfield": Estimator(
        JitTraceMeanField_ELBO, {}, "TraceMeanField_ELBO compiled with the PyTorch JIT"
    ),
    "jit-tracegraph": Estimator(
        JitTraceGraph_ELBO, {}, "TraceGraph_ELBO compiled with the PyTorch JIT"
    ),
}


def make_elbo(name: str, num_particles: int = 1, compile=False, **options) -> ELBO:
    """The estimator called ``name``, drawing ``num_particles`` samples per data point.

    Particles are vectorized (one pass with a leading particle dimension) unless
    ``vectorize_particles=False`` is given. The ``jit-*`` estimators compile once per batch
    shape and silence the JIT's tracer warnings unless ``ignore_jit_warnings=False``.
    ``compile=True`` (or ``"step"``, or a dict of ``torch.compile`` options such as
    ``{"mode": "max-autotune-no-cudagraphs"}``) captures the whole training step, forward
    and backward, into one graph and runs it compiled (:mod:`pyro_ladder.elbo.captured`;
    the first step of each batch shape captures and compiles); ``compile="capture"`` runs
    the captured graph as recorded, without compiling it (a second to capture; Pyro's
    fixed cost per step gone); ``compile="networks"`` (or
    a dict with ``"kind": "networks"``) compiles only the ladder's networks and keeps
    Pyro's tracing eager (:mod:`pyro_ladder.elbo.compiled`), for pairs whose step reads
    tensor values in Python. Other ``options`` go to the Pyro class, e.g.
    ``max_plate_nesting`` or, for ``"renyi"``, ``alpha``. Known names: see
    :data:`ESTIMATORS` or :func:`describe_estimators`.

    :raises ConfigError: for an unknown name, a bad particle count, an unknown option or a
        ``compile`` that is neither a bool nor a dict.
    """
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    if not _is_positive_int(num_particles):
        raise ConfigError(f"num_particles must be a positive integer, got {num_particles!r}")
    est = ESTIMATORS[name]
    accepted = _accepted_options(est.cls)
    unknown = sorted(set(options) - accepted)
    fixed = sorted(set(options) & set(est.fixed))
    if unknown or fixed:
        raise ConfigError(
            f"estimator {name!r} does not take option(s) {unknown + fixed}; "
            f"it takes {sorted(accepted - set(est.fixed))}"
        )
    kwargs = {**est.fixed, **options}
    if "vectorize_particles" in accepted:
        kwargs.setdefault("vectorize_particles", num_particles > 1)
    if "ignore_jit_warnings" in accepted:
        # shape checks in batch norm and plates trace to constants; the JIT says so at every
        # compile, which is expected here: batches keep one size (fit drops the ragged one)
        kwargs.setdefault("ignore_jit_warnings", True)
    compiled = _compile_kind(name, compile)
    estimator = est.cls(num_particles=num_particles, **kwargs)
    if compiled is None:
        return estimator
    kind, compile_options = compiled
    wrapper = CompiledStep if kind == "step" else CompiledNetworks
    return wrapper(estimator, **compile_options)


def _compile_kind(name: str, compile) -> tuple[str, dict] | None:
    """``(kind, torch.compile options)`` from ``make_elbo``'s ``compile`` (None: eager);
    ``kind`` is ``"step"`` (the whole step captured and compiled) or ``"networks"``."""
    if compile is False:
        return None
    if name.startswith("jit-"):
        raise ConfigError(
            f"{name!r} compiles with the deprecated torch.jit.trace already; for the "
            f"torch.compile path use {name[4:]!r} with compile=True"
        )
    if compile is True:
        return "step", {}
    if compile == "capture":  # the captured graph run as recorded: no compile time
        return "step", {"backend": "eager"}
    if compile in ("step", "networks"):
        return compile, {}
    if isinstance(compile, dict):
        options = dict(compile)
        kind = options.pop("kind", "step")
        if kind not in ("step", "networks"):
            raise ConfigError(f"compile's 'kind' must be 'step' or 'networks', got {kind!r}")
        return kind, options
    raise ConfigError(
        "compile must be True (the whole step compiled), 'step', 'capture' (the whole step "
        "captured, run uncompiled), 'networks' (the networks compiled, Pyro eager), False or "
        f"a dict of torch.compile options, got {compile!r}"
    )


def describe_estimators() -> str:
    """One line per estimator name, for help texts."""
    return "\n".join(f"{name:15s} {est.summary}" for name, est in ESTIMATORS.items())


def _accepted_options(cls) -> set[str]:
    """Keyword arguments the estimator's constructor takes (its own signature)."""
    params = inspect.signature(cls).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named - {"num_particles"}


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
