"""The ladder's merge of a bottom-up Gaussian with the top-down prior."""

from __future__ import annotations

import torch


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
