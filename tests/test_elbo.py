import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_ladder import ESTIMATORS, ConfigError, LadderVAE, evaluate, make_elbo
from pyro_ladder.data import binarize, load_dataset


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return binarize(data.train[:200], generator=torch.Generator().manual_seed(0))


class TinyVAE(nn.Module):
    """A model/guide pair written by a user: one latent layer, plain Pyro."""

    def __init__(self, x_dim=64, z_dim=4):
        super().__init__()
        self.enc = nn.Linear(x_dim, 2 * z_dim)
        self.dec = nn.Linear(z_dim, x_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("tiny_dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("tiny_enc", self.enc)
        loc, raw = self.enc(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def _options(name):
    return {"alpha": 0.5} if name == "renyi" else {}


def _train(model, guide, data, name, particles, steps=80):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
              make_elbo(name, particles, **_options(name)))
    for _ in range(steps):
        svi.step(data)


def _elbo(model, guide, data):
    pyro.set_rng_seed(123)
    return evaluate(model, guide, data, num_samples=20)["elbo"].mean().item()


PAIRS = ["top-down", "bottom-up", "user"]


def _pair(kind, batch_norm=True):
    if kind == "user":
        vae = TinyVAE()
    else:
        vae = LadderVAE(64, (8, 4), (32, 16), inference=kind, batch_norm=batch_norm)
    return vae.model, vae.guide


# analytic KL needs the model's site order, which the bottom-up guide reverses: the
# next test checks that Pyro flags that pair
COMBINATIONS = [(name, kind) for name in sorted(ESTIMATORS) for kind in PAIRS
                if not (kind == "bottom-up" and "meanfield" in name)]


@pytest.mark.parametrize("name, kind", COMBINATIONS)
def test_every_estimator_trains_every_pair(name, kind, digits):
    # DReG and VIMCO refuse batch norm in training mode (elbo/coupling.py)
    coupled = getattr(ESTIMATORS[name].cls, "needs_independent_particles", False)
    model, guide = _pair(kind, batch_norm=not coupled)
    weighted = ("iwae", "renyi", "iwae-dreg", "iwae-stl", "miwae", "ciwae", "piwae",
                "miwae-dreg", "piwae-dreg", "rws", "rws-dreg", "vimco")
    particles = 3 if name in weighted else 1
    before = _elbo(model, guide, digits)
    _train(model, guide, digits, name, particles)
    after = _elbo(model, guide, digits)
    assert after > before + 3.0, (before, after)


def test_meanfield_with_bottom_up_order_is_flagged_by_pyro(digits):
    vae = LadderVAE(64, (8, 4), (32, 16), inference="bottom-up")
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo("meanfield"))
    with pytest.warns(UserWarning, match="same order"):
        svi.step(digits)


def test_vectorized_particles_give_particle_dimension(digits):
    vae = LadderVAE(64, (8, 4), (32, 16))
    elbo = make_elbo("iwae", 7)
    assert elbo.vectorize_particles and elbo.num_particles == 7 and elbo.alpha == 0
    loss = elbo.loss(vae.model, vae.guide, digits[:10])
    assert torch.isfinite(torch.tensor(loss))


def test_unknown_estimator_lists_the_known_names():
    with pytest.raises(ConfigError) as info:
        make_elbo("dreg-ish")
    for name in ESTIMATORS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("elbo", 0), {}, "num_particles"),
        (("elbo", 2.5), {}, "num_particles"),
        (("elbo",), {"alpah": 0.5}, "does not take option"),
        (("iwae",), {"alpha": 0.5}, "does not take option"),
    ],
)
def test_bad_estimator_options(args, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_elbo(*args, **kwargs)


def test_options_reach_pyro():
    elbo = make_elbo("renyi", 4, alpha=0.25, max_plate_nesting=1)
    assert elbo.alpha == 0.25 and elbo.num_particles == 4
    assert elbo.max_plate_nesting == 2  # Pyro adds the vectorized particle plate
