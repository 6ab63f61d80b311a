r"""Reweighted wake-sleep (wake phases), plain and doubly reparameterized.

With ``K`` draws ``z_k ~ q(z | x)``, ``log w_k = log p(x, z_k) - log q(z_k | x)`` and
normalized weights ``w_bar``, reweighted wake-sleep (Bornschein & Bengio 2015) moves

* the model by **wake-theta**, ``sum_k w_bar_k d log p(x, z_k)`` with the samples held
  fixed: the IWAE bound's gradient for a parameter only the model depends on, draw by draw;
* the guide by **wake-phi**, ``sum_k w_bar_k d log q(z_k | x)`` with the samples held fixed:
  a self-normalized estimate of ``-d KL(p(z | x) || q(z | x))``, so the guide chases the
  posterior from the inclusive side, whatever the bound says.

A parameter both depend on (the ladder's prior networks) gets both terms (``shared="both"``,
the default). In :mod:`.weighted`'s engine these are the coefficients ``(c_p, c_q, c_path)
= (w_bar, -w_bar, 0)`` for every parameter, so no split by role is needed.
``shared="theta"`` gives the shared ones wake-theta alone (roles by autograd dependence,
:func:`~pyro_ladder._traces.parameter_roles`): wake-phi's score term has mean zero at
``K = 1`` and is noisy for them. The sleep phases (fitting
``q`` to dreamt ``(x, z)``) are not implemented. The loss value is the IWAE bound.

``rws-dreg`` (Tucker et al. 2019, section 4) replaces wake-phi's score term by its doubly
reparameterized form: for ``f = w_bar_k`` as a function of ``z_k`` (direct parameter
dependence frozen), ``E_q[f d log q] = E_eps[d_z f . d z_k]`` and ``d_{z_k} w_bar_k =
(w_bar_k - w_bar_k^2) d_z log w_k``, so wake-phi becomes the path term with ``c_path =
w_bar - w_bar^2`` (coefficients ``(w_bar, 0, w_bar - w_bar^2)``). It needs reparameterized
guide sites; ``rws`` does not (discrete layers train with it).

**What "unbiased" means here.** Wake-phi is not the gradient of any bound: ``rws``'s
expectation *defines* the target (for ``K -> inf`` the gradient of ``-KL(p || q)``).
``rws-dreg`` is unbiased for that same expectation, for every parameter; wake-theta is
unbiased for the IWAE gradient of the model-only parameters (it *is* that gradient).

References
----------
[1] J. Bornschein, Y. Bengio, "Reweighted Wake-Sleep", ICLR 2015.
[2] T. A. Le et al., "Revisiting Reweighted Wake-Sleep for Models with Stochastic Control
    Flow", UAI 2019.
[3] G. Tucker, D. Lawson, S. Gu, C. J. Maddison, "Doubly Reparameterized Gradient
    Estimators for Monte Carlo Objectives", ICLR 2019.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .weighted import NO_SCORE, WeightedELBO, _is_one, _iwae


class RWS(WeightedELBO):
    """Reweighted wake-sleep, wake-theta and wake-phi (``"rws"``; see the module). Guide
    sites need not be reparameterized.

    :param shared: ``"both"`` (default): parameters the model and the guide both depend on
        get wake-theta plus wake-phi; ``"theta"``: wake-theta alone.
    """

    rsample = False

    def __init__(self, num_particles=1, shared: str = "both", max_plate_nesting=float("inf")):
        if shared not in ("both", "theta"):
            raise ConfigError(f"shared must be 'both' or 'theta', got {shared!r}")
        self.shared = shared
        super().__init__(num_particles, max_plate_nesting)

    def objective(self, log_w):
        return _iwae(log_w)

    def coefficients(self, log_w):
        w_bar = log_w.softmax(0)  # (K, B)
        return w_bar, -w_bar, torch.zeros_like(w_bar)

    def surrogate(self, draws, log_w):
        if self.shared == "both":
            return super().surrogate(draws, log_w)
        zero = torch.zeros_like(log_w)
        wake_theta = (log_w.softmax(0), zero, zero)  # c_q is c_path: no guide pass
        return self._split_surrogate(draws, self.coefficients(log_w), wake_theta)


class RWS_DReG(RWS):
    """Reweighted wake-sleep with doubly reparameterized wake-phi (``"rws-dreg"``; see the
    module). Needs reparameterized guide sites and, as every DReG estimator, particles
    that do not couple (:mod:`.coupling`)."""

    rsample = True
    needs_independent_particles = True
    label = "rws-dreg"

    def coefficients(self, log_w, beta=1.0):
        """``(w_bar, 0, beta (w_bar - w_bar^2))``: under a KL weight ``beta`` (warm-up)
        wake-phi's score term is ``beta sum_k w_bar_k d log q|_z`` (the tempered guide
        density), and the identity turns ``sum_k w_bar_k d log q|_z`` into the path term
        with ``w_bar - w_bar^2``."""
        w_bar = log_w.softmax(0)  # (K, B)
        path = w_bar - w_bar.square()
        return w_bar, NO_SCORE, path if _is_one(beta) else beta * path

    def surrogate(self, draws, log_w):
        coefficients = self.coefficients(log_w, draws.kl_weight())
        if self.shared == "both":
            return self._surrogate(draws, *coefficients)
        zero = torch.zeros_like(log_w)
        wake_theta = (log_w.softmax(0), zero, zero)
        return self._split_surrogate(draws, coefficients, wake_theta)
