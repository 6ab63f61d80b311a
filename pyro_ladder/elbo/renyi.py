"""``"iwae"`` and ``"renyi"``: Pyro's ``RenyiELBO``, refusing discrete guide sites.

For a guide site without a reparameterized sampler ``RenyiELBO`` adds
``alpha / (1 - alpha) * log q`` to its surrogate: the score-function term of the
log-mean-weight is missing, and at ``alpha = 0`` (IWAE) the guide's parameters behind a
discrete site get no gradient at all. Training would go on silently with a wrong
gradient, so :class:`CheckedRenyiELBO` stops at the first trace with a message naming the
site and the estimators that do handle it.
"""

from __future__ import annotations

from pyro.infer import RenyiELBO

from .._traces import check_reparameterized
from .scoped import ScopedELBO


class CheckedRenyiELBO(ScopedELBO, RenyiELBO):
    """``RenyiELBO`` that raises :class:`~pyro_ladder.ConfigError` for a guide site
    without ``rsample`` (a discrete layer) instead of returning a gradient without its
    score-function term."""

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        check_reparameterized(guide_trace, f"RenyiELBO (alpha={self.alpha})")
        return model_trace, guide_trace
