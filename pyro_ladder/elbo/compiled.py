"""Estimators whose networks run compiled: ``make_elbo(name, compile=True)``.

Pyro's handlers cannot be compiled whole (dynamo recompiles ``pyro.param`` for every
parameter name; GUIDE.md). :class:`CompiledNetworks` therefore keeps the estimator and all
of Pyro's tracing eager and opens a :func:`~pyro_ladder._compile.compiled_networks` scope
around each call, inside which the ladder's networks (the upward pass, each prior network,
the likelihood's network) run through ``torch.compile``. The values and gradients are
those of the eager estimator on the same draws, up to floating-point rounding
(``tests/test_compiled.py``). The first call of each new shape compiles (tens of seconds
on a CPU: ``docs/performance.md`` says how long and after how many steps it pays off).

A user's own model/guide pair runs eager under it: only networks built from
:mod:`pyro_ladder.layers`, :mod:`pyro_ladder.likelihoods` and the top-down guide are
compiled. The ``jit-*`` estimators rest on ``torch.jit.trace``, which torch 2.14
deprecates; they stay for now, documented as deprecated, and this is the supported path.
"""

from __future__ import annotations

from pyro.infer import ELBO

from .._compile import compiled_networks


class CompiledNetworks(ELBO):
    """``estimator`` with the networks compiled during each of its calls.

    :param estimator: any ELBO object (from :func:`~pyro_ladder.make_elbo` or Pyro's).
    :param options: keyword arguments of ``torch.compile`` (``backend``, ``mode``,
        ``dynamic``, ``options``); none: inductor, the default mode.

    Attributes it does not have itself (``num_particles``, ``max_plate_nesting`` ...) are
    the estimator's.
    """

    def __init__(self, estimator: ELBO, **options):
        # no ELBO.__init__: every setting is the wrapped estimator's
        self.estimator, self.options = estimator, options

    def __getattr__(self, name):
        if name in ("estimator", "options"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.estimator, name)

    def loss(self, model, guide, *args, **kwargs) -> float:
        with compiled_networks(**self.options):
            return self.estimator.loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        with compiled_networks(**self.options):
            return self.estimator.loss_and_grads(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        with compiled_networks(**self.options):
            return self.estimator.differentiable_loss(model, guide, *args, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        with compiled_networks(**self.options):
            return self.estimator._get_trace(model, guide, args, kwargs)
