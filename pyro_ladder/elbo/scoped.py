"""Estimators that open a :class:`~pyro_ladder._memo.ReuseOutputs` scope per call.

Every estimator :func:`~pyro_ladder.make_elbo` returns runs the guide and the model of one
call inside one scope, so the ladder's networks may hand the guide's outputs to the model
(:mod:`pyro_ladder._memo`) and nothing is reused across calls. Pyro's own classes get a
subclass of the same name here; ours take :class:`ScopedELBO` as a base.
"""

from __future__ import annotations

from pyro import infer

from .._memo import scoped
from .._util import without_side_effects

_METHODS = ("loss", "loss_and_grads", "differentiable_loss")


class ScopedELBO:
    """Mixin: each of ``loss``, ``loss_and_grads`` and ``differentiable_loss`` that the
    class has (its own or inherited) runs in a scope of its own."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in _METHODS:
            method = getattr(cls, name, None)
            if method is not None and not getattr(method, "_scoped", False):
                setattr(cls, name, scoped(method))

    def _guess_max_plate_nesting(self, model, guide, args, kwargs):
        """Pyro's one-trace guess of the plate nesting, leaving the random state and the
        pair's batch-norm statistics as they were (a resumed run probes again)."""
        with without_side_effects(model, guide):
            super()._guess_max_plate_nesting(model, guide, args, kwargs)


class Trace_ELBO(ScopedELBO, infer.Trace_ELBO):
    """Pyro's ``Trace_ELBO``, one reuse scope per call."""


class TraceMeanField_ELBO(ScopedELBO, infer.TraceMeanField_ELBO):
    """Pyro's ``TraceMeanField_ELBO``, one reuse scope per call."""


class TraceGraph_ELBO(ScopedELBO, infer.TraceGraph_ELBO):
    """Pyro's ``TraceGraph_ELBO``, one reuse scope per call."""


class JitTrace_ELBO(ScopedELBO, infer.JitTrace_ELBO):
    """Pyro's ``JitTrace_ELBO``, one reuse scope per call."""


class JitTraceMeanField_ELBO(ScopedELBO, infer.JitTraceMeanField_ELBO):
    """Pyro's ``JitTraceMeanField_ELBO``, one reuse scope per call."""


class JitTraceGraph_ELBO(ScopedELBO, infer.JitTraceGraph_ELBO):
    """Pyro's ``JitTraceGraph_ELBO``, one reuse scope per call."""
