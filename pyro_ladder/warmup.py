r"""KL warm-up (Sonderby et al. 2016): the latent terms' weight rises from 0 to 1.

The warmed-up objective is
``E_q[log p(x | z)] + beta * (E_q[log p(z)] - E_q[log q(z | x)])``: the reconstruction
term at full weight and the KL term at weight ``beta``. :class:`LatentWeight` applies
``beta`` with Pyro's poutine machinery to every latent (unobserved) sample site of the
function it wraps, so it warms up the model and the guide of any pair alike.

``poutine.scale`` refuses ``beta = 0``; here a Python ``0`` masks the latent sites
(``poutine.mask`` semantics: the sampled value is kept, its log-density dropped) and a
tensor weight is applied as a scale together with the mask ``beta > 0``. The site's mask
before the weight is kept in ``site["infer"][UNWEIGHTED_MASK]``, so that evaluation, which
scores the model's own density, ignores the warm-up's mask as it ignores its scale.

Under the multi-sample estimators (``iwae``, ``miwae``, ...) a site's own scale applies
*inside* the importance weight (:mod:`pyro_ladder._traces`, "Scales"), so the warmed-up
IWAE objective is ``log (1/K) sum_k p(x | z_k) [p(z_k) / q(z_k | x)]^beta``: a tempered
importance weight, not ``beta`` times the KL part of the IWAE bound. At ``beta = 1`` both
coincide with the usual bounds. A data plate's subsample factor is kept apart from
``beta`` and multiplies the per-data-point bound.
"""

from __future__ import annotations

import functools
import numbers

import torch
from pyro.poutine.messenger import Messenger

UNWEIGHTED_MASK = "pyro_ladder.mask_without_kl_weight"


class LatentWeight(Messenger):
    """Multiply the log-density of every unobserved sample site by ``weight``.

    :param weight: ``beta`` in ``[0, 1]``, a Python number or a 0-dim tensor. Pass a tensor
        under the JIT estimators so that a change of value does not recompile.
    """

    def __init__(self, weight: float | torch.Tensor):
        super().__init__()
        if isinstance(weight, numbers.Real) and not 0 <= weight <= 1:
            raise ValueError(f"the KL weight must lie in [0, 1], got {weight}")
        self.weight = weight

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        w = self.weight
        msg["infer"] = {**msg["infer"], UNWEIGHTED_MASK: msg["mask"]}
        if isinstance(w, torch.Tensor):
            keep = w > 0  # a zero weight must not turn an infinite log-density into NaN
            msg["mask"] = keep if msg["mask"] is None else msg["mask"] & keep
            msg["scale"] = w * msg["scale"]
        elif w == 0:
            msg["mask"] = False
        elif w != 1:
            msg["scale"] = w * msg["scale"]


def with_kl_weight(fn):
    """``fn(*args, **kwargs)`` -> ``annealed(weight, *args, **kwargs)`` under :class:`LatentWeight`.

    The weight travels as the first positional argument, so ``SVI.step(weight, x)`` passes
    it to model and guide alike and the JIT estimators treat it as an input, not a constant.
    """

    @functools.wraps(fn)
    def annealed(weight, *args, **kwargs):
        with LatentWeight(weight):
            return fn(*args, **kwargs)

    return annealed


def kl_weight(epoch: int, warmup_epochs: int) -> float:
    """``beta`` for an epoch (0-based): ``epoch / warmup_epochs``, capped at 1.

    ``warmup_epochs = 0`` means no warm-up (``beta = 1`` from the start).
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return 1.0
    return min(1.0, epoch / warmup_epochs)
