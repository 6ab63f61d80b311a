"""Write your own model and guide: a two-level VAE with a learned mixture prior on top.

The pair below is built from pyro_ladder's public blocks and keeps the site contract
(sites ``z2``, ``z1``, ``x`` inside ``pyro.plate("data")``, sampled top-down), so every
estimator, ``evaluate`` and every diagnostic of the library work on it unchanged.
docs/custom-pairs.md ("Write your own model and guide") shows this file's code;
tests/test_custom_pair.py checks that the two agree and runs it.

    python examples/custom_pair.py   # every estimator on digits, then diagnostics: ~4 min
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_ladder import (
    ESTIMATORS,
    MLP,
    BernoulliLikelihood,
    GaussianBlock,
    GaussianHead,
    diagnostics,
    evaluate,
    fit,
    make_elbo,
    precision_weighted,
)
from pyro_ladder.data import load_dataset
from pyro_ladder.runs import test_set


class UnitMixture(nn.Module):
    """p(z2): every unit its own learned mixture of Gaussians (factorized over units)."""

    def __init__(self, dim, components=5):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(dim, components))
        self.locs = nn.Parameter(torch.linspace(-2.0, 2.0, components).repeat(dim, 1))
        self.log_scales = nn.Parameter(torch.full((dim, components), -0.5))

    def forward(self):
        units = dist.MixtureSameFamily(
            dist.Categorical(logits=self.logits), dist.Normal(self.locs, self.log_scales.exp())
        )  # batch shape (dim,): one mixture per unit
        return units.to_event(1)


class MixturePriorVAE(nn.Module):
    """p(z2): a learned mixture per unit; p(z1 | z2) Gaussian; p(x | z1) Bernoulli.
    Guide: q(z2 | x), then q(z1 | z2, x), the ladder's precision-weighted merge of
    p(z1 | z2) with a bottom-up Gaussian."""

    def __init__(self, x_dim, z1_dim=8, z2_dim=4, hidden=64, name="mixvae"):
        super().__init__()
        self.name = name
        self.top = UnitMixture(z2_dim)  # p(z2)
        self.prior1 = GaussianBlock(z2_dim, hidden, z1_dim, batch_norm=False)  # p(z1 | z2)
        self.likelihood = BernoulliLikelihood(z1_dim, hidden, x_dim, batch_norm=False)
        self.up = MLP(x_dim, hidden, batch_norm=False)  # bottom-up pass d(x)
        self.head1 = GaussianHead(hidden, z1_dim)  # bottom-up Gaussian for z1
        self.head2 = GaussianBlock(hidden, hidden, z2_dim, batch_norm=False)  # q(z2 | x)

    def register(self, *names):
        """Give each network its Pyro name; the guide registers the prior it shares under
        the model's name, so both traces hold the same parameters."""
        for name in names:
            pyro.module(f"{self.name}.{name}", getattr(self, name))

    def model(self, x):  # x: (B, x_dim)
        self.register("top", "prior1", "likelihood")
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", self.top())  # (..., B, z2_dim)
            z1 = pyro.sample("z1", dist.Normal(*self.prior1(z2)).to_event(1))
            pyro.sample("x", self.likelihood(z1), obs=x)

    def guide(self, x):
        self.register("up", "head1", "head2", "prior1")
        d = self.up(x)  # (B, hidden)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(*self.head2(d)).to_event(1))
            loc, scale = precision_weighted(*self.prior1(z2), *self.head1(d))
            pyro.sample("z1", dist.Normal(loc, scale).to_event(1))


def train_with_every_estimator(train, test, epochs=50, particles=4, num_samples=500):
    """One fresh pair per estimator name; returns ``{name: (pair, evaluate's result)}``."""
    results = {}
    for name in ESTIMATORS:
        pyro.set_rng_seed(0)  # the same initial networks for every estimator
        vae = MixturePriorVAE(train.shape[1], name=f"mixvae-{name}")
        fit(
            vae.model,
            vae.guide,
            train,
            elbo=name,
            num_particles=particles,
            epochs=epochs,
            lr=3e-3,
            binarize=True,
            progress=False,
        )
        results[name] = vae, evaluate(vae.model, vae.guide, test, num_samples=num_samples)
        print(f"{name:15s} log-likelihood {results[name][1]['log_likelihood'].mean():8.2f}")
    return results


def diagnose(vae, x, particles=4):
    """Every diagnostic of pyro_ladder.diagnostics on one trained pair."""
    model, guide = vae.model, vae.guide
    return {
        "gradient_snr": diagnostics.gradient_snr(
            model, guide, make_elbo("iwae-dreg", particles), x[:16], num_draws=8
        ),
        "effective_sample_size": diagnostics.effective_sample_size(
            model, guide, x, num_samples=100
        ),
        "active_units": diagnostics.active_units(model, guide, x),
        "mutual_information": diagnostics.mutual_information(guide, x),
        "kl_per_unit": diagnostics.kl_per_unit(model, guide, x),
    }


def main(epochs=50, num_samples=500, train_limit=None):
    data = load_dataset("digits")
    test = test_set(data, "bernoulli")  # the test rows every run scores (binarized once)
    results = train_with_every_estimator(
        data.train[:train_limit], test, epochs, num_samples=num_samples
    )
    report = diagnose(results["elbo"][0], test)
    print({site: r["active"] for site, r in report["active_units"].items()}, "active units")
    return results, report


if __name__ == "__main__":
    pyro.set_rng_seed(0)
    main()
