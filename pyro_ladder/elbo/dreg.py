r"""Doubly reparameterized guide gradients for the multi-sample bounds beyond IWAE.

``iwae-dreg`` (:class:`~pyro_ladder.elbo.weighted.IWAE_DReG`) derives the guide term for
one IWAE bound. A mean of ``M`` independent IWAE bounds of ``K`` samples each (MIWAE, and
the encoder's objective in PIWAE) takes it bound by bound: with ``w_bar_{m,k}`` normalized
within bound ``m``, the coefficients of :mod:`.weighted`'s engine are

.. math::

    c_p = w\_bar / M, \qquad c_q = 0, \qquad c_{path} = w\_bar^2 / M,

and the derivation of :mod:`.weighted` applies to each bound unchanged (Tucker et al.
2019, section 3; the same identity holds for any ``f = w_bar_{m,k}`` of one bound's
samples). Unbiased: the mean of these gradients is the gradient of the MIWAE bound for
every parameter, shared ones included.

Which parameters take the DReG term and which the plain gradient is decided by autograd
dependence (:func:`~pyro_ladder._traces.parameter_roles`), whatever the registration.

References
----------
[1] G. Tucker, D. Lawson, S. Gu, C. J. Maddison, "Doubly Reparameterized Gradient
    Estimators for Monte Carlo Objectives", ICLR 2019.
[2] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
"""

from __future__ import annotations

from ..errors import ConfigError
from .weighted import MIWAE, PIWAE, dreg_coefficients


def check_shared(shared: str) -> str:
    if shared not in ("dreg", "iwae"):
        raise ConfigError(f"shared must be 'dreg' or 'iwae', got {shared!r}")
    return shared


class MIWAE_DReG(MIWAE):
    """MIWAE bound with doubly reparameterized gradients (``"miwae-dreg"``; see the module).
    The loss value is MIWAE's; ``outer=1`` is ``iwae-dreg``, draw by draw. Refuses pairs
    that couple particles, as ``iwae-dreg`` does (:mod:`.coupling`).

    :param num_particles: ``K``, inner samples per bound.
    :param outer: ``M``, independent bounds averaged.
    :param shared: ``"iwae"`` (default) gives the DReG term to the parameters only the guide
        depends on and the plain MIWAE gradient to those the model's density depends on,
        shared ones included; ``"dreg"`` gives every parameter the DReG estimate. Both are
        unbiased (as for ``iwae-dreg``).
    """

    needs_independent_particles = True
    label = "miwae-dreg"

    def __init__(
        self, num_particles=1, outer=1, shared: str = "iwae", max_plate_nesting=float("inf")
    ):
        self.shared = check_shared(shared)
        super().__init__(num_particles, outer, max_plate_nesting)

    def coefficients(self, log_w, beta=1.0):
        return dreg_coefficients(log_w, self.outer, beta)

    def surrogate(self, draws, log_w):
        coefficients = self.coefficients(log_w, draws.kl_weight())
        if self.shared == "dreg":
            return self._surrogate(draws, *coefficients)
        plain = (self._dF(log_w),) * 3  # dMIWAE/dlog w
        return self._split_surrogate(draws, coefficients, plain)


class PIWAE_DReG(PIWAE):
    """PIWAE with the encoder's MIWAE gradient doubly reparameterized (``"piwae-dreg"``):
    from the same ``M * K`` draws the parameters only the guide depends on get the
    ``miwae-dreg`` estimate, those the model's density depends on (shared ones included)
    the ``IWAE(M K)`` gradient. Unbiased for PIWAE's two gradients; the loss value is
    ``IWAE(M K)``. Refuses pairs that couple particles (:mod:`.coupling`).
    """

    needs_independent_particles = True
    label = "piwae-dreg"

    def surrogate(self, draws, log_w):
        decoder = (log_w.softmax(0),) * 3  # dIWAE(MK)/dlog w
        encoder = dreg_coefficients(log_w, self.outer, draws.kl_weight())
        return self._split_surrogate(draws, encoder, decoder)
