r"""``"iwae"`` and ``"renyi"``: the Renyi bound on the weighted engine (:mod:`.weighted`).

With ``S`` draws and ``log w_s`` per data point,
``L_alpha = 1 / (1 - alpha) log (1/S) sum_s w_s^(1 - alpha)`` (Li & Turner 2016);
``alpha = 0`` is the IWAE bound (Burda et al. 2016). Its gradient is the plain
reparameterized one, ``sum_s softmax_s((1 - alpha) log w)_s grad log w_s``.

Pyro's ``RenyiElBO`` computes the same numbers on a pair whose sites all sit in an
unsubsampled ``pyro.plate("data")``, but folds the data plate's subsample factor into the
weights (so a minibatch gives no bound) and, with vectorized particles, mixes a global
latent's particles with the data points' (a number far from any bound). On the weighted
engine the scale rule of :mod:`pyro_ladder._traces` holds: subsampling multiplies the
per-data-point bound, a global latent gives the joint bound. A guide site without
``rsample`` is refused (``RenyiELBO`` would leave its parameters without the score term).

References
----------
[1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
[2] Y. Li, R. E. Turner, "Renyi Divergence Variational Inference", NeurIPS 2016.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .weighted import WeightedELBO


class Renyi(WeightedELBO):
    """The Renyi bound ``L_alpha`` per data point (``"renyi"``; ``"iwae"`` is ``alpha = 0``).

    :param num_particles: ``S``, draws per data point.
    :param alpha: the Renyi order, any real number but 1 (``alpha = 1`` is the ELBO:
        ``"elbo"``); ``alpha < 1`` gives a lower bound on ``log p(x)``.
    """

    def __init__(self, num_particles: int = 1, alpha: float = 0.0, max_plate_nesting=float("inf")):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha == 1:
            raise ConfigError(
                f"alpha must be a real number other than 1, got {alpha!r} (alpha = 1 is the "
                "ELBO: use estimator 'elbo')"
            )
        self.alpha = float(alpha)
        super().__init__(num_particles, max_plate_nesting)

    def objective(self, log_w: torch.Tensor) -> torch.Tensor:
        tempered = (1.0 - self.alpha) * log_w  # (S, B)
        return (tempered.logsumexp(0) - math.log(log_w.shape[0])) / (1.0 - self.alpha)
