"""The ladder's merge of a bottom-up Gaussian with the top-down prior."""

from __future__ import annotations

import torch

from .layers import gaussian


def precision_weighted(
    loc_p: torch.Tensor, scale_p: torch.Tensor, loc_q: torch.Tensor, scale_q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Combine two Gaussians by adding their precisions (Sonderby et al. 2016, eq. 19-20).

    .. math::

        \sigma^2 = \frac{1}{\sigma_q^{-2} + \sigma_p^{-2}}, \qquad
        \mu = \frac{\mu_q \sigma_q^{-2} + \mu_p \sigma_p^{-2}}{\sigma_q^{-2} + \sigma_p^{-2}}

    ``N(loc, scale)`` is the normalised product ``N(loc_p, scale_p) N(loc_q, scale_q)``.
    The formula is evaluated as ``v_p v_q / (v_p + v_q)`` with variances ``v = scale**2``,
    which never forms a reciprocal, so it stays finite for scales from 1e-8 to 1e8 in
    float32. All four arguments broadcast together; the results have the broadcast shape.

    :param loc_p: mean of the top-down prior ``p(z_i | z_{i+1})``.
    :param scale_p: its standard deviation (> 0).
    :param loc_q: mean of the bottom-up "approximate likelihood" head.
    :param scale_q: its standard deviation (> 0).
    :returns: ``(loc, scale)`` of the merged Gaussian.

    References
    ----------
    [1] C. K. Sonderby, T. Raiko, L. Maaloe, S. K. Sonderby, O. Winther,
        "Ladder Variational Autoencoders", NeurIPS 2016.
    """
    var_p = scale_p.square()
    var_q = scale_q.square()
    total = var_p + var_q
    loc = (loc_q * var_p + loc_p * var_q) / total
    scale = (var_p * var_q / total).sqrt()
    return loc, scale


class HeadDetached:
    """What a site of a top-down ladder guide declares about its density: the same
    Gaussian with its bottom-up head detached, as a function of everything else (the
    upstream sample through the prior networks, their parameters, a condition).

    The doubly reparameterized estimators need ``log q(z | x)`` with the guide's own
    parameters held but the samples live (Tucker et al. 2019). A generic guide gets it from
    a second pass at detached samples; a top-down ladder site has it at hand where the
    guide's own parameters (the inference network's) enter its density only through the
    head. :func:`~pyro_ladder._traces.held_log_density` reads the declarations, where the
    pair's roles vouch for that (:class:`~pyro_ladder._traces.HeldRoles`: every latent
    site declares one, no head depends on a sample, and at detached samples no tensor only
    the guide depends on reaches the declared densities) and the live trace's heads were
    all made before its first sample.
    """

    __slots__ = ("prior", "head", "event_dims")

    def __init__(self, prior, head, event_dims: int):
        self.prior, self.head, self.event_dims = prior, head, event_dims

    def density(self):
        """The site's distribution with the head detached (the prior kept live)."""
        head = (self.head[0].detach(), self.head[1].detach())
        loc, scale = head if self.prior is None else precision_weighted(*self.prior, *head)
        return gaussian(loc, scale, self.event_dims)


def top_down_posterior(prior, head, event_dims: int = 1, declare: bool = True):
    """``q(z_i | z_{i+1}, x)`` of a top-down ladder site: the Gaussian ``head`` merged with
    the ``prior`` ``(loc_p, scale_p)`` (:func:`precision_weighted`), or the head alone at
    the top (``prior=None``), declaring :class:`HeadDetached` unless ``declare`` is False
    (a guide whose prior takes an input that may carry the guide's own parameters, such as
    a condition that requires grad)."""
    loc, scale = head if prior is None else precision_weighted(*prior, *head)
    fn = gaussian(loc, scale, event_dims)
    if declare:
        fn.base_dist.head_detached = HeadDetached(prior, head, event_dims)
    return fn
