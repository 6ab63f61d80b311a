"""Evaluation against a model whose log p(x) is known: a linear-Gaussian chain.

z2 ~ N(0, I), z1 | z2 ~ N(a z2, s1^2), x | z1 ~ N(b z1, s0^2), per dimension, so
x ~ N(0, b^2 (a^2 + s1^2) + s0^2) and the exact posterior is Gaussian.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ladder import ConfigError, evaluate, log_likelihood

A, S1, B, S0 = 0.8, 0.6, 1.5, 0.5
D = 3


def chain_model(x):
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        z1 = pyro.sample("z1", dist.Normal(A * z2, S1).to_event(1))
        pyro.sample("x", dist.Normal(B * z1, S0).to_event(1), obs=x)


def exact_log_px(x):
    var = B**2 * (A**2 + S1**2) + S0**2
    return dist.Normal(x.new_zeros(()), x.new_tensor(var).sqrt()).log_prob(x).sum(-1)


def posterior_guide(x, shift=0.0, widen=1.0):
    """The exact posterior, top-down; ``shift``/``widen`` spoil it on purpose."""
    var_x_given_z2 = B**2 * S1**2 + S0**2
    prec2 = 1.0 + (A * B) ** 2 / var_x_given_z2
    loc2 = (A * B * x / var_x_given_z2) / prec2
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample(
            "z2", dist.Normal(loc2 + shift, widen * prec2**-0.5).to_event(1)
        )
        prec1 = 1 / S1**2 + B**2 / S0**2
        loc1 = (A * z2 / S1**2 + B * x / S0**2) / prec1
        pyro.sample("z1", dist.Normal(loc1 + shift, widen * prec1**-0.5).to_event(1))


def _data(n=40):
    torch.manual_seed(3)
    return torch.randn(n, D, dtype=torch.float64) * 2


def test_exact_posterior_gives_exact_log_likelihood_for_every_bound():
    x = _data()
    result = evaluate(chain_model, posterior_guide, x, num_samples=100, iwae_k=(5, 50))
    truth = exact_log_px(x)
    # with q = p(z | x) every weight equals p(x): all estimates coincide with the truth
    for key in ("log_likelihood", "elbo"):
        torch.testing.assert_close(result[key], truth, rtol=0, atol=1e-9)
    for k in (5, 50):
        torch.testing.assert_close(result["iwae"][k], truth, rtol=0, atol=1e-9)
    torch.testing.assert_close(result["ess"], torch.full_like(truth, 100.0))


def test_importance_sampled_estimate_converges_to_log_px():
    x = _data()

    def guide(x):
        posterior_guide(x, shift=0.3, widen=1.6)

    result = evaluate(chain_model, guide, x, num_samples=5000, iwae_k=(5, 50), max_rows=10_000)
    truth = exact_log_px(x)
    ll, elbo, iw5, iw50 = result["log_likelihood"], result["elbo"], *result["iwae"].values()
    # the groups of k partition the 5000 draws, so these hold exactly, per data point
    assert (elbo <= iw5 + 1e-9).all() and (iw5 <= ll + 1e-9).all() and (iw50 <= ll + 1e-9).all()
    # the ELBO is a real gap below log p(x); the estimate closes it
    assert (truth - elbo).mean() > 0.2
    # Monte Carlo standard error of log(mean w) by the delta method: sqrt((K/ESS - 1) / K)
    stderr = ((5000 / result["ess"] - 1) / 5000).sqrt()
    assert (stderr < 0.05).all()
    assert ((ll - truth).abs() < 5 * stderr).all()
    assert (iw50 - truth).abs().mean() < (iw5 - truth).abs().mean() < (elbo - truth).abs().mean()


def test_chunking_does_not_change_the_estimate():
    x = _data(10)

    def guide(x):
        posterior_guide(x, shift=0.2, widen=1.3)

    pyro.set_rng_seed(5)
    small = evaluate(chain_model, guide, x, num_samples=600, iwae_k=(5,), max_rows=100,
                     batch_size=3)
    pyro.set_rng_seed(6)
    large = evaluate(chain_model, guide, x, num_samples=600, iwae_k=(5,), max_rows=10**6)
    # different draws, same quantity: equal within Monte Carlo error (delta-method stderr)
    var = sum((600 / r["ess"] - 1) / 600 for r in (small, large))
    diff = (small["log_likelihood"] - large["log_likelihood"]).abs()
    assert (diff < 5 * var.sqrt()).all()
    assert len(small["iwae"][5]) == 10
    assert small["log_likelihood"].shape == (10,)


def test_estimate_is_invariant_to_the_order_of_data_points():
    x = _data(12)
    perm = torch.randperm(12)

    def guide(x):
        posterior_guide(x, shift=0.0, widen=1.0)

    a = log_likelihood(chain_model, guide, x, num_samples=10)
    b = log_likelihood(chain_model, guide, x[perm], num_samples=10)
    torch.testing.assert_close(a[perm], b, rtol=0, atol=1e-9)


def test_kl_per_site_is_analytic_for_gaussians():
    x = _data(8)
    result = evaluate(chain_model, posterior_guide, x, num_samples=2000)
    # KL(q(z2|x) || p(z2)) in closed form for the exact posterior of z2
    var_x_given_z2 = B**2 * S1**2 + S0**2
    prec2 = 1.0 + (A * B) ** 2 / var_x_given_z2
    loc2 = (A * B * x / var_x_given_z2) / prec2
    q = dist.Normal(loc2, prec2**-0.5)
    prior = dist.Normal(x.new_zeros(()), x.new_ones(()))
    expected = torch.distributions.kl_divergence(q, prior).sum(-1)
    torch.testing.assert_close(result["kl"]["z2"], expected, rtol=0, atol=1e-9)
    assert (result["kl"]["z1"] > 0).all()


def test_sites_outside_the_data_plate_are_refused():
    def model(x):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(g, 1.0), obs=x[:, 0])

    def guide(x):
        pyro.sample("g", dist.Normal(0.0, 1.0))

    with pytest.raises(ConfigError, match="outside pyro.plate"):
        evaluate(model, guide, _data(4), num_samples=4)


def test_model_latent_missing_from_guide_is_refused():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z2", dist.Normal(x.new_zeros(D), 1.0).to_event(1))

    with pytest.raises(ConfigError, match="no guide site"):
        evaluate(chain_model, guide, _data(4), num_samples=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=10, iwae_k=(20,)), "iwae_k"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(chain_model, posterior_guide, _data(4), **kwargs)


def test_empty_data_is_refused():
    with pytest.raises(ConfigError, match="empty"):
        evaluate(chain_model, posterior_guide, torch.zeros(0, D), num_samples=4)


def test_per_variable_terms_add_up_to_the_negative_elbo():
    """Seed 004's decomposition: a cross-entropy for x, a KL per latent."""
    x = _data(10)
    result = evaluate(chain_model, posterior_guide, x, num_samples=4000)
    assert set(result["cross_entropy"]) == {"x"} and set(result["kl"]) == {"z1", "z2"}
    total = result["cross_entropy"]["x"] + result["kl"]["z1"] + result["kl"]["z2"]
    # with the exact posterior -ELBO = -log p(x); the terms carry Monte Carlo noise only
    torch.testing.assert_close(total, -exact_log_px(x), atol=0.05, rtol=0)
    assert (result["cross_entropy"]["x"] > 0).all()


@pytest.mark.parametrize("max_rows", [1, 7, 100, 10**6])
def test_iwae_groups_survive_passes_smaller_than_a_group(max_rows):
    x = _data(10)
    result = evaluate(chain_model, posterior_guide, x, num_samples=60, iwae_k=(5, 50),
                      max_rows=max_rows)
    for k in (5, 50):  # the exact posterior: every bound equals log p(x) whatever the passes
        torch.testing.assert_close(result["iwae"][k], exact_log_px(x), rtol=0, atol=1e-9)
