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

import torch

from ..errors import ConfigError
from .weighted import MIWAE, PIWAE


def dreg_coefficients(log_w: torch.Tensor, outer: int):
    """``(c_p, c_q, c_path)`` of the DReG estimator of the mean of ``outer`` IWAE bounds
    over consecutive blocks of ``log_w`` ``(M K, B)``; each ``(M K, B)``, detached."""
    grouped = log_w.detach().reshape(outer, -1, *log_w.shape[1:])  # (M, K, B)
    w_bar = grouped.softmax(1).reshape(log_w.shape)  # (M K, B), normalized per bound
    c = w_bar / outer
    return c, torch.zeros_like(c), c * w_bar


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

    def coefficients(self, log_w):
        return dreg_coefficients(log_w, self.outer)

    def surrogate(self, draws, log_w):
        if self.shared == "dreg":
            return super().surrogate(draws, log_w)
        plain = (self._dF(log_w),) * 3  # dMIWAE/dlog w
        return self._split_surrogate(draws, self.coefficients(log_w), plain)


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
        return self._split_surrogate(draws, dreg_coefficients(log_w, self.outer), decoder)
