r"""VIMCO: the IWAE bound for guides with discrete sites (Mnih & Rezende 2016).

With ``K`` draws per data point, ``log w_k`` and ``L = log (1/K) sum_k w_k``, the gradient
of ``E_q[L]`` is

.. math::

    \nabla E_q[L] = E_q\Big[\sum_k \bar w_k \nabla \log w_k
                    + \sum_k L \, \nabla \log q_d(z_k \mid x)\Big]

where ``log q_d`` sums the guide sites without ``rsample`` (discrete layers) and ``nabla log
w_k`` keeps the pathwise gradient through the reparameterized sites (a stochastic
computation graph, Schulman et al. 2015). The score term's learning signal ``L`` is the
same for all ``K`` samples and very noisy; VIMCO subtracts from it, for sample ``k``, the
bound with ``w_k`` replaced by the geometric mean of the others,

.. math::

    L_{-k} = \log \frac{1}{K}\Big(\sum_{j \ne k} w_j + \exp \frac{1}{K - 1}
             \sum_{j \ne k} \log w_j\Big),

which does not depend on ``z_k``, so ``E[L_{-k} \nabla \log q_d(z_k)] = 0``: **unbiased**
for the IWAE bound's gradient, every parameter. ``log q_d`` is taken without site scales
(the sampling density; a KL warm-up's weight stays inside ``log w``). Needs ``K >= 2``.
With no discrete site it is the reparameterized IWAE gradient.

References
----------
[1] A. Mnih, D. J. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
[2] J. Schulman, N. Heess, T. Weber, P. Abbeel, "Gradient Estimation Using Stochastic
    Computation Graphs", NeurIPS 2015.
"""

from __future__ import annotations

import math

import torch

from .._traces import latent_sites, log_density
from ..errors import ConfigError
from .weighted import WeightedELBO, _iwae


def leave_one_out_bounds(log_w: torch.Tensor) -> torch.Tensor:
    """``L_{-k}`` per (sample, data point) ``(K, B)`` from ``log w`` ``(K, B)``: sample
    ``k``'s weight replaced by the geometric mean of the others' (Mnih & Rezende 2016)."""
    k = log_w.shape[0]
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # (K, B)
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device).unsqueeze(-1)  # (K, K, 1)
    rows = log_w.unsqueeze(0).expand(k, *log_w.shape)  # (K, K, B): row k holds every log w_j
    rows = torch.where(eye, others_mean.unsqueeze(1), rows)  # log w_k -> geometric mean
    return rows.logsumexp(1) - math.log(k)


class VIMCO(WeightedELBO):
    """IWAE bound with leave-one-out score-function baselines (``"vimco"``; see the module).

    :param num_particles: ``K >= 2`` samples per data point.
    """

    rsample = False
    # L_{-k} must not depend on z_k: particles coupled by batch norm would bias it
    needs_independent_particles = True
    label = "vimco"

    def __init__(self, num_particles: int = 2, max_plate_nesting=float("inf")):
        if num_particles < 2:
            raise ConfigError(
                f"vimco needs num_particles >= 2 (its baselines leave one sample out), "
                f"got {num_particles}"
            )
        super().__init__(num_particles, max_plate_nesting)

    def objective(self, log_w):
        return _iwae(log_w)

    def learning_signal(self, log_w: torch.Tensor) -> torch.Tensor:
        """The score term's signal per (sample, data point), ``(K, B)``: ``L - L_{-k}``."""
        return _iwae(log_w) - leave_one_out_bounds(log_w)

    def surrogate(self, draws, log_w):
        live = draws.log_w  # (K, B), pathwise through the reparameterized sites
        surrogate = (log_w.softmax(0) * live).sum()
        scored = [n for n, s in latent_sites(draws.guide_trace) if not s["fn"].has_rsample]
        if scored:  # the sampling density: unscaled
            log_q = log_density(
                draws.guide_trace, draws.nesting, False, scored, draws.layout.joint
            )  # (K, B)
            surrogate = surrogate + (self.learning_signal(log_w) * log_q).sum()
        return surrogate
