"""Slow tier: training reaches a known quality (run with ``pytest -m slow``)."""

import pytest
import torch

from pyro_ladder import LadderVAE, evaluate, fit
from pyro_ladder.data import binarize, load_dataset


@pytest.mark.slow
@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_digits_reach_a_good_log_likelihood(inference):
    data = load_dataset("digits")
    vae = LadderVAE(64, (16, 8, 4), (128, 64, 32), inference=inference)
    fit(vae.model, vae.guide, data.train, epochs=100, warmup_epochs=10, binarize=True,
        progress=False)
    test = binarize(data.test, generator=torch.Generator().manual_seed(0))
    result = evaluate(vae.model, vae.guide, test, num_samples=1000, iwae_k=(50,))
    ll = result["log_likelihood"].mean().item()
    # measured: about -22.4 after 100 epochs; an untrained model scores about -44
    assert ll > -23.5
    assert result["elbo"].mean().item() < result["iwae"][50].mean().item() <= ll
