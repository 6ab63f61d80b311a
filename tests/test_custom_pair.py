"""The "Write your own model and guide" pair: docs/custom-pairs.md shows the code of
examples/custom_pair.py, and that code trains with every estimator and goes through
evaluate and every diagnostic."""

import importlib.util
import math
import re
from pathlib import Path

import pyro
import pytest
import torch

from pyro_ladder import ESTIMATORS, evaluate, fit
from pyro_ladder.data import binarize, load_dataset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_pair.py"


def _load():
    spec = importlib.util.spec_from_file_location("custom_pair", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_blocks():
    text = (ROOT / "docs" / "custom-pairs.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_shows_the_example_code():
    source = EXAMPLE.read_text()
    blocks = _readme_blocks()
    assert len(blocks) == 2
    for block in blocks:
        assert block in source, "docs/custom-pairs.md code differs from examples/custom_pair.py"
    assert "class MixturePriorVAE" in blocks[0] and "def diagnose" in blocks[1]


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    test = binarize(data.test[:100], generator=torch.Generator().manual_seed(0))
    return data.train[:200], test


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_moves_every_network(name, digits):
    example = _load()
    vae = example.MixturePriorVAE(64, name=f"mix-{name}")
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    history = fit(vae.model, vae.guide, digits[0], elbo=name, num_particles=3, epochs=1,
                  batch_size=100, lr=1e-2, binarize=True, progress=False)
    assert all(math.isfinite(r["loss"]) for r in history)
    for net in ("top", "prior1", "likelihood", "up", "head1", "head2"):
        moved = [not torch.equal(before[k], v) for k, v in vae.state_dict().items()
                 if k.startswith(net + ".")]
        assert moved and all(moved), f"{name} left parameters of {net} unchanged"


def test_the_example_runs_every_estimator_then_every_diagnostic():
    example = _load()
    pyro.set_rng_seed(0)
    results, report = example.main(epochs=1, num_samples=20, train_limit=100)
    assert list(results) == list(ESTIMATORS)
    for _vae, result in results.values():
        assert torch.isfinite(result["log_likelihood"]).all()
        assert (result["elbo"] <= result["log_likelihood"] + 1e-5).all()
    n = 360  # the digits test images
    assert set(report) == {"gradient_snr", "effective_sample_size", "active_units",
                           "mutual_information", "kl_per_unit"}
    assert report["gradient_snr"]["shared"]["num_params"] > 0  # prior1, in both traces
    ess = report["effective_sample_size"]
    assert ess.shape == (n,) and (ess >= 1 - 1e-5).all() and (ess <= 100 + 1e-5).all()
    assert {s: r["units"] for s, r in report["active_units"].items()} == {"z2": 4, "z1": 8}
    # the estimate of I(x; z) can dip just below 0 when the layer carries almost nothing
    assert all(-0.05 <= v <= math.log(n) for v in report["mutual_information"].values())


def test_kl_per_unit_adds_up_to_the_layer_kl_under_the_mixture_prior(digits):
    """The mixture prior has no closed-form KL: the per-unit values are sampled, and must
    still add up to evaluate's per-layer KL (a different estimate of the same expectation)."""
    example = _load()
    vae = example.MixturePriorVAE(64, name="mix-kl")
    fit(vae.model, vae.guide, digits[0], epochs=3, lr=1e-2, binarize=True, progress=False)
    from pyro_ladder.diagnostics import kl_per_unit

    per_unit = kl_per_unit(vae.model, vae.guide, digits[1], num_samples=200)
    layer = evaluate(vae.model, vae.guide, digits[1], num_samples=200)["kl"]
    for site in ("z1", "z2"):
        total, expected = per_unit[site].sum().item(), layer[site].mean().item()
        assert total == pytest.approx(expected, rel=0.05), site


def _flow_pair(lower_flow=False):
    """One or two latent sites; the top prior is a spline flow (no closed-form KL), the
    lower one, when asked for, a Student-t."""
    flow = pyro.distributions.transforms.Spline(2, count_bins=4).double()
    dec, enc = torch.nn.Linear(2, 3).double(), torch.nn.Linear(3, 4).double()
    dist = pyro.distributions

    def model(x):
        pyro.module("flow", flow)
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(x.new_zeros(2), 1.0)
            z = pyro.sample("z2", dist.TransformedDistribution(base, [flow]).to_event(1))
            if lower_flow:  # a Student-t conditional: no closed-form KL from a Gaussian
                z = pyro.sample("z1", dist.StudentT(3.0, z, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        loc, raw = enc(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z2", dist.Normal(loc, raw.exp()).to_event(1))
            if lower_flow:
                pyro.sample("z1", dist.Normal(loc, 1.0).to_event(1))

    params = list(flow.parameters()) + list(dec.parameters()) + list(enc.parameters())
    return model, guide, params


def test_condkl_semigradient_with_a_flow_top_prior_is_the_elbo():
    """With one latent there is no upper sample to hold fixed: the semi-gradient, with the
    top KL sampled at the draw, is Trace_ELBO's value and gradient on the same draws."""
    from pyro.infer import Trace_ELBO

    from pyro_ladder import make_elbo

    torch.manual_seed(0)
    model, guide, params = _flow_pair()
    x = torch.randn(6, 3, dtype=torch.float64)
    out = []
    for elbo in (make_elbo("elbo-condkl-sg", 4, max_plate_nesting=1),
                 Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(3)
        loss = elbo.loss_and_grads(model, guide, x)
        out.append((loss, [p.grad.clone() for p in params]))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-10)
    for mine, ref in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12)


def test_condkl_semigradient_refuses_a_lower_site_without_a_closed_form_kl():
    from pyro_ladder import ConfigError, make_elbo

    model, guide, _ = _flow_pair(lower_flow=True)
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ConfigError, match="'z1'.*only the top site"):
        make_elbo("elbo-condkl-sg", 2).loss(model, guide, x)


def test_kl_per_unit_refuses_a_site_that_does_not_factorize_over_units():
    from pyro_ladder import ConfigError
    from pyro_ladder.diagnostics import kl_per_unit

    dist = pyro.distributions

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x.new_zeros(2), torch.eye(2)))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x[:, :2], torch.eye(2)))

    with pytest.raises(ConfigError, match="'z' is MultivariateNormal"):
        kl_per_unit(model, guide, torch.randn(5, 3))
