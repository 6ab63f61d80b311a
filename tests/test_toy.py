"""The toy hierarchy of seed 004: its true density, its draws, its pairs and figures."""

import math

import matplotlib
import pyro
import pytest
import torch

from pyro_ladder import ConfigError, evaluate, fit
from pyro_ladder.toy import DiscreteToyPair, GaussianToyPair, ToyHierarchy, figures, pack, unpack


def test_log_prob_of_a_single_cluster_is_the_gaussian_with_the_summed_variance():
    truth = ToyHierarchy(num_classes=2, coarse=1, fine=1, coarse_noise=0.3, fine_noise=0.4,
                         obs_noise=1.2)
    x = torch.randn(7, 2)
    c = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    centre = truth.fine_centres()[c, 0, 0]  # (7, 2)
    var = 0.3**2 + 0.4**2 + 1.2**2
    expected = torch.distributions.Normal(centre, math.sqrt(var)).log_prob(x).sum(-1)
    torch.testing.assert_close(truth.log_prob(x, c), expected)


def test_log_prob_integrates_to_one_for_every_class():
    truth = ToyHierarchy()
    grid = torch.linspace(-5.5, 5.5, 700)
    cell = (grid[1] - grid[0]) ** 2
    points = torch.cartesian_prod(grid, grid)  # (G^2, 2)
    for k in range(truth.num_classes):
        c = torch.full((len(points),), k)
        mass = truth.log_prob(points, c).exp().sum() * cell
        assert mass.item() == pytest.approx(1.0, abs=2e-3)


def test_draws_follow_the_process():
    truth = ToyHierarchy()
    s = truth.sample(60000, torch.Generator().manual_seed(0))
    # every level is centred on its class centre (the spots around each parent balance)
    for k in range(truth.num_classes):
        centre = truth.class_centres()[k]
        for value in (s.z2, s.z1, s.x):
            torch.testing.assert_close(value[s.c == k].mean(0), centre, atol=0.03, rtol=0)
    # x - z1 is the observation noise, z1 - z2 a fine offset plus noise
    assert (s.x - s.z1).std().item() == pytest.approx(truth.obs_noise, rel=0.02)
    lengths = (s.z1 - s.z2).norm(dim=-1)
    assert lengths.mean().item() == pytest.approx(truth.fine_radius, abs=0.01)
    # the mean true log-density of the draws is close to minus the entropy, and the draws
    # score far higher under their own class than under another
    own = truth.log_prob(s.x, s.c).mean()
    other = truth.log_prob(s.x, (s.c + 1) % truth.num_classes).mean()
    assert own > other + 50


def test_datasets_are_seeded():
    a = ToyHierarchy().dataset(50, 20, seed=3)
    b = ToyHierarchy().dataset(50, 20, seed=3)
    c = ToyHierarchy().dataset(50, 20, seed=4)
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(a.test.z1, b.test.z1)
    assert not torch.equal(a.train_inputs, c.train_inputs)
    x, onehot = unpack(a.train_inputs)
    assert torch.equal(x, a.train.x) and torch.equal(onehot.argmax(-1), a.train.c)
    assert torch.equal(pack(x, a.train.c, 3), a.train_inputs)


@pytest.mark.parametrize(
    "options, message",
    [({"num_classes": 0}, "num_classes"), ({"fine": 1.5}, "fine"), ({"obs_noise": 0}, "obs_noise"),
     ({"coarse_radius": -1.0}, "coarse_radius")],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        ToyHierarchy(**options)


PAIRS = [GaussianToyPair, DiscreteToyPair]


@pytest.mark.parametrize("make", PAIRS)
def test_pairs_keep_the_site_contract(make):
    pair = make()
    inputs = ToyHierarchy().dataset(10, 5).train_inputs
    with pyro.plate("particles", 4, dim=-2):
        guide = pyro.poutine.trace(pair.guide).get_trace(inputs)
        model = pyro.poutine.trace(pyro.poutine.replay(pair.model, trace=guide)).get_trace(inputs)
    for trace, sites in [(guide, ["z2", "z1"]), (model, ["z2", "z1", "x"])]:
        names = [n for n, s in trace.nodes.items() if s["type"] == "sample"
                 and n not in ("data", "particles")]
        assert names == sites
        for name in sites:
            frames = [f.name for f in trace.nodes[name]["cond_indep_stack"]]
            assert "data" in frames
    assert model.nodes["x"]["fn"].batch_shape == (4, 10)


@pytest.mark.parametrize("make", PAIRS)
def test_pairs_refuse_inputs_without_the_class(make):
    with pytest.raises(ConfigError, match=r"one_hot\(c\)"):
        make().model(torch.zeros(4, 2))


def test_the_guide_shares_the_prior_network_under_the_model_name():
    pair = GaussianToyPair()
    inputs = ToyHierarchy().dataset(10, 5).train_inputs
    guide = pyro.poutine.trace(pair.guide).get_trace(inputs)
    model = pyro.poutine.trace(pyro.poutine.replay(pair.model, trace=guide)).get_trace(inputs)
    params = lambda t: {n for n, s in t.nodes.items() if s["type"] == "param"}  # noqa: E731
    shared = params(guide) & params(model)
    assert shared and all(".prior1$$$" in n for n in shared)


def test_figures_draw_every_panel():
    matplotlib.use("Agg")
    truth = ToyHierarchy()
    data = truth.dataset(300, 300, seed=0)
    c = data.test.c
    draws = {"gaussian": GaussianToyPair().generate(c), "discrete": DiscreteToyPair().generate(c)}
    assert draws["discrete"]["z1"].shape == (300,) and draws["gaussian"]["x"].shape == (300, 2)
    shapes = {
        "data": (figures.data_figure(data.test), 3),
        "joint": (figures.joint_figure(draws, c, data.test), 6),
        "conditional": (figures.conditional_marginals_figure(draws, c, data.test), 9),
        "marginal": (figures.marginals_figure(draws, data.test, truth), 2),
    }
    for name, (fig, panels) in shapes.items():
        assert len(fig.axes) >= panels, name
        matplotlib.pyplot.close(fig)


def test_a_trained_discrete_pair_approaches_the_true_log_likelihood():
    """Against the exact log p(x | c) of the process: the learned model's importance-sampled
    estimate is a lower bound in expectation on the data's mean log-density, and after a short
    run it comes within a nat of it."""
    truth = ToyHierarchy()
    data = truth.dataset(1500, 300, seed=0)
    pair = DiscreteToyPair(categories=24, hidden=32)
    pair.init_emission(data.train.x, generator=torch.Generator().manual_seed(0))
    fit(pair.model, pair.guide, data.train_inputs, elbo="enum", epochs=12, batch_size=100,
        lr=3e-3, progress=False)
    result = evaluate(pair.model, pair.guide, data.test_inputs, num_samples=100)
    exact = truth.log_prob(data.test.x, data.test.c).mean().item()
    estimate = result["log_likelihood"].mean().item()
    assert exact - 1.0 < estimate < exact + 0.1, (estimate, exact)
