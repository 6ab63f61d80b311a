import pytest
import torch

from pyro_ladder import ConfigError, LadderVAE, make_elbo
from pyro_ladder.diagnostics import effective_sample_size, gradient_snr


def _setup():
    torch.manual_seed(11)
    vae = LadderVAE(4, (2, 2), (5, 5), batch_norm=False).double()
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64).expand(32, 4)
    return vae, x


def test_iwae_guide_snr_falls_and_model_snr_rises_with_k():
    """Rainforth et al. (2018): SNR(phi) = O(sqrt(M/K)), SNR(theta) = O(sqrt(MK))."""
    vae, x = _setup()
    low = gradient_snr(vae.model, vae.guide, make_elbo("iwae", 2), x, num_draws=32)
    high = gradient_snr(vae.model, vae.guide, make_elbo("iwae", 128), x, num_draws=32)
    assert high["guide"]["aggregate"] < low["guide"]["aggregate"]
    assert high["model"]["aggregate"] > low["model"]["aggregate"]
    assert low["num_draws"] == 32
    assert low["guide"]["num_params"] > 0 and low["model"]["num_params"] > 0
    assert all(p.grad is None for p in vae.parameters())


def test_snr_needs_two_draws():
    vae, x = _setup()
    with pytest.raises(ConfigError, match="num_draws"):
        gradient_snr(vae.model, vae.guide, make_elbo("elbo"), x, num_draws=1)


def test_effective_sample_size_lies_between_one_and_k():
    vae, x = _setup()
    ess = effective_sample_size(vae.model, vae.guide, x[:5], num_samples=50)
    assert ess.shape == (5,) and (ess >= 1).all() and (ess <= 50 + 1e-9).all()


def test_parameter_groups_follow_registration():
    vae, x = _setup()
    snr = gradient_snr(vae.model, vae.guide, make_elbo("elbo"), x, num_draws=2)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert snr["guide"]["num_params"] == count(vae.inference)
    assert snr["model"]["num_params"] == count(vae.generative)
    assert snr["shared"]["num_params"] == count(vae.generative.priors)
    bottom_up = LadderVAE(4, (2, 2), (5, 5), inference="bottom-up", batch_norm=False).double()
    snr = gradient_snr(bottom_up.model, bottom_up.guide, make_elbo("elbo"), x, num_draws=2)
    assert snr["shared"]["num_params"] == 0
