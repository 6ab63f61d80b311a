"""``"enum"``: the ELBO with every discrete latent summed out exactly (``TraceEnum_ELBO``).

A discrete layer has no reparameterized sample, so ``elbo`` and ``tracegraph`` estimate
its gradient by the score function. When the layer has few values the expectation over it
can instead be computed exactly: Pyro's ``TraceEnum_ELBO`` evaluates the site at every
value in parallel (a new tensor dimension left of the plates) and contracts the log-factors.
:class:`EnumELBO` marks the sites for enumeration itself (``config_enumerate``), so a
model/guide pair needs no annotation:

* a discrete site the guide samples is enumerated in the guide: the expectation over
  ``q(z1 | ...)`` becomes a weighted sum over its values, whose gradient is exact;
* a discrete site only the model has is summed out of the model (the guide must then
  leave it out).

Continuous sites are sampled as usual, so on a pair without discrete sites ``enum`` is
``Trace_ELBO`` (Pyro's "no enumerated sites" warning is off by default for that reason).
Existing ``infer={"enumerate": ...}`` annotations are kept. The cost grows with the
product of the enumerated sites' sizes that share a factor.

References
----------
[1] F. Obermeyer, E. Bingham, M. Jankowiak, J. Chiu, N. Pradhan, A. Rush, N. Goodman,
    "Tensor Variable Elimination for Plated Factor Graphs", ICML 2019.
"""

from __future__ import annotations

from pyro.infer import TraceEnum_ELBO, config_enumerate

from .scoped import ScopedELBO


class EnumELBO(ScopedELBO, TraceEnum_ELBO):
    """``TraceEnum_ELBO`` that enumerates every discrete latent site in parallel.

    :param num_particles: samples of the continuous sites.
    :param max_plate_nesting: plates in the model (found by one trace when not given).
    :param vectorize_particles: draw the particles in one vectorized pass.
    :param strict_enumeration_warning: warn when a pair has no discrete site.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = False,
    ):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
        )

    def loss(self, model, guide, *args, **kwargs) -> float:
        return super().loss(*_enumerated(model, guide), *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(*_enumerated(model, guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        return super().loss_and_grads(*_enumerated(model, guide), *args, **kwargs)


def _enumerated(model, guide):
    """Model and guide with their discrete sites marked ``enumerate="parallel"``; a site
    the guide samples takes its value from the guide, so only the model's own are summed."""
    return config_enumerate(model, "parallel"), config_enumerate(guide, "parallel")
