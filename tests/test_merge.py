import math

import pytest
import torch

from pyro_ladder import precision_weighted


def _normal_log_pdf(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)


def test_merge_is_normalised_product_of_two_gaussians():
    torch.manual_seed(0)
    loc_p, loc_q = torch.randn(2, 50, dtype=torch.float64)
    scale_p, scale_q = torch.rand(2, 50, dtype=torch.float64) * 3 + 0.05
    loc, scale = precision_weighted(loc_p, scale_p, loc_q, scale_q)
    x = torch.linspace(-6, 6, 101, dtype=torch.float64).unsqueeze(-1)  # (101, 1) grid
    lhs = _normal_log_pdf(x, loc_p, scale_p) + _normal_log_pdf(x, loc_q, scale_q)
    # N(x; a, s) N(x; b, t) = N(a; b, sqrt(s^2 + t^2)) N(x; loc, scale)
    norm = _normal_log_pdf(loc_p, loc_q, (scale_p**2 + scale_q**2).sqrt())
    rhs = norm + _normal_log_pdf(x, loc, scale)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-10)


def test_merge_precisions_add_and_mean_is_precision_weighted():
    loc, scale = precision_weighted(
        torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([1.0])
    )
    # precisions 1/4 + 1 = 5/4 -> var 0.8; mean (1 * 1/4 + (-1) * 1) / (5/4) = -0.6
    torch.testing.assert_close(scale**2, torch.tensor([0.8]))
    torch.testing.assert_close(loc, torch.tensor([-0.6]))


@pytest.mark.parametrize("s_p, s_q", [(1e-8, 1e8), (1e8, 1e-8), (1e-8, 1e-8), (1e8, 1e8)])
def test_merge_finite_for_extreme_scales_in_float32(s_p, s_q):
    loc, scale = precision_weighted(
        torch.tensor([3.0]), torch.tensor([s_p]), torch.tensor([-2.0]), torch.tensor([s_q])
    )
    assert torch.isfinite(loc).all() and torch.isfinite(scale).all() and (scale > 0).all()
    assert scale.item() <= min(s_p, s_q) * 1.0001  # the merge is never wider than its inputs
    # the narrower Gaussian dominates the mean
    expected = 3.0 if s_p < s_q else (-2.0 if s_q < s_p else 0.5)
    assert loc.item() == pytest.approx(expected, abs=1e-4)
