"""Discrete latent layers: exact enumeration (``enum``), score-function training
(``tracegraph`` with baselines), and the estimators and evaluation that must refuse or
handle a discrete site.

The reference model is a Gaussian mixture, ``z ~ Cat(softmax(a))``, ``x | z ~ N(m_z, 1)``,
whose ``log p(x)`` and ELBO for a categorical guide have closed forms.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ladder import ConfigError, evaluate, make_elbo
from pyro_ladder.toy import DiscreteToyPair, ToyHierarchy
from pyro_ladder.toy.data import unpack

K = 3
A = torch.tensor([0.2, -0.4, 0.7], dtype=torch.float64)  # prior logits
M = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)  # component means
W = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)  # guide: logits x w + b
BIAS = torch.tensor([0.1, 0.0, -0.3], dtype=torch.float64)


def mixture_model(x):
    logits = pyro.param("a", A.clone())
    means = pyro.param("m", M.clone())
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(logits=logits))
        pyro.sample("x", dist.Normal(means[z], 1.0), obs=x)


def categorical_guide(x, baseline=None):
    w = pyro.param("w", W.clone())
    b = pyro.param("b", BIAS.clone())
    infer = {"baseline": baseline} if baseline else {}
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Categorical(logits=x[:, None] * w + b), infer=infer)


def posterior_guide(x):
    """The exact posterior ``p(z | x)`` of the mixture at its initial parameters."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Categorical(logits=_log_joint(x)))


def empty_guide(x):
    pass


def _log_joint(x):
    """``log p(x, z = k)``: ``(N,) -> (N, K)``."""
    log_prior = A.log_softmax(-1)
    return log_prior + dist.Normal(M, 1.0).log_prob(x[:, None])


def _exact_elbo(x):
    """``sum_n sum_k q(k | x_n) [log p(x_n, k) - log q(k | x_n)]`` at the guide's start."""
    log_q = (x[:, None] * W + BIAS).log_softmax(-1)
    return (log_q.exp() * (_log_joint(x) - log_q)).sum()


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(50, dtype=torch.float64) * 2


def test_enum_sums_a_guide_site_out_exactly(x):
    loss = make_elbo("enum").loss(mixture_model, categorical_guide, x)
    assert loss == pytest.approx(-_exact_elbo(x).item(), rel=1e-12)


def test_enum_sums_a_model_only_site_out_exactly(x):
    loss = make_elbo("enum").loss(mixture_model, empty_guide, x)
    exact = _log_joint(x).logsumexp(-1).sum()
    assert loss == pytest.approx(-exact.item(), rel=1e-12)


def _param_grads():
    store = pyro.get_param_store()
    return torch.cat([store.get_param(n).unconstrained().grad.flatten() for n in "ambw"])


def _gradient(elbo, guide, x, seed):
    store = pyro.get_param_store()
    for name in store.keys():
        store.get_param(name).unconstrained().grad = None
    pyro.set_rng_seed(seed)
    elbo.loss_and_grads(mixture_model, guide, x)
    return _param_grads()


@pytest.mark.parametrize(
    "baseline",
    [None, {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}],
    ids=["no-baseline", "average-baseline"],
)
def test_tracegraph_gradient_matches_the_exact_enum_gradient_in_expectation(baseline):
    torch.manual_seed(1)
    x = torch.randn(4096, dtype=torch.float64) * 2
    guide = lambda x: categorical_guide(x, baseline)  # noqa: E731
    exact = _gradient(make_elbo("enum"), guide, x, seed=0)
    assert torch.equal(exact, _gradient(make_elbo("enum"), guide, x, seed=1))  # no noise
    elbo = make_elbo("tracegraph")
    draws = torch.stack([_gradient(elbo, guide, x, seed=10 + r) for r in range(24)])
    z = (draws.mean(0) - exact).abs() / (draws.std(0) / math.sqrt(len(draws)))
    assert z.max() < 5.0, z


def test_a_baseline_lowers_the_score_function_variance():
    """Pyro keeps the decaying average per batch position; the rows are shuffled for every
    draw, as in training, so the average acts as one baseline for all rows."""
    torch.manual_seed(1)
    x = torch.randn(512, dtype=torch.float64) * 2
    spread = {}
    for label, baseline in [("none", None), ("avg", {"use_decaying_avg_baseline": True})]:
        pyro.clear_param_store()
        guide = lambda x, b=baseline: categorical_guide(x, b)  # noqa: E731
        elbo = make_elbo("tracegraph")
        for r in range(20):  # let the average settle
            _gradient(elbo, guide, x[torch.randperm(len(x))], seed=r)
        draws = torch.stack(
            [_gradient(elbo, guide, x[torch.randperm(len(x))], seed=100 + r) for r in range(24)]
        )
        spread[label] = draws[:, 6:].var(0).sum()  # the guide's parameters w and b
    assert spread["avg"] < 0.5 * spread["none"], spread


WEIGHTED = [
    ("iwae", {}),
    ("renyi", {"alpha": 0.5}),
    ("iwae-dreg", {}),
    ("stl", {}),
    ("iwae-stl", {}),
    ("miwae", {"outer": 2}),
    ("ciwae", {}),
    ("piwae", {"outer": 2}),
    ("miwae-dreg", {"outer": 2}),
    ("piwae-dreg", {"outer": 2}),
    ("rws-dreg", {}),
    ("elbo-condkl-sg", {}),
]


@pytest.mark.parametrize("name, options", WEIGHTED, ids=[n for n, _ in WEIGHTED])
def test_importance_weighted_estimators_refuse_a_discrete_guide_site(name, options, x):
    elbo = make_elbo(name, 2, **options)
    for method in (elbo.loss_and_grads, elbo.loss):
        with pytest.raises(ConfigError, match=r"'z'.*Categorical.*'tracegraph'.*'enum'"):
            method(mixture_model, categorical_guide, x)


def test_weighted_estimators_name_a_site_summed_out_of_the_model(x):
    with pytest.raises(ConfigError, match=r"model site 'z'.*'enum'"):
        make_elbo("iwae-dreg", 2).loss(mixture_model, empty_guide, x)


def test_evaluate_is_exact_with_the_exact_categorical_posterior(x):
    result = evaluate(mixture_model, posterior_guide, x, num_samples=30, iwae_k=(5,))
    exact = _log_joint(x).logsumexp(-1)
    for value in (result["log_likelihood"], result["elbo"], result["iwae"][5]):
        torch.testing.assert_close(value, exact, rtol=0, atol=1e-12)
    # analytic categorical KL(q || p) at the posterior: log p(x_n) - E_q log p(x_n | z)
    log_lik = dist.Normal(M, 1.0).log_prob(x[:, None])  # (N, K)
    post = (_log_joint(x) - exact[:, None]).exp()
    torch.testing.assert_close(result["kl"]["z"], (post * log_lik).sum(-1) - exact)


def test_evaluate_names_a_site_summed_out_of_the_model(x):
    with pytest.raises(ConfigError, match=r"model site 'z' has no guide site.*enum"):
        evaluate(mixture_model, empty_guide, x, num_samples=4)


@pytest.fixture(scope="module")
def toy():
    return ToyHierarchy().dataset(600, 200, seed=0)


def test_enum_on_the_toy_pair_is_the_exact_sum_over_z1(toy):
    pair = DiscreteToyPair(categories=5, hidden=16).double()
    inputs = toy.test_inputs[:20].double()
    pyro.set_rng_seed(7)
    loss = make_elbo("enum", max_plate_nesting=1).loss(pair.model, pair.guide, inputs)
    pyro.set_rng_seed(7)
    trace = pyro.poutine.trace(pair.guide).get_trace(inputs)  # the same draw of z2
    z2 = trace.nodes["z2"]["value"]
    x, c = unpack(inputs)
    prior = pair.prior1(torch.cat([z2, c], -1)).log_softmax(-1)  # (B, K)
    log_q = (pair.prior1(torch.cat([z2, c], -1)) + pair._bottom_up(x)).log_softmax(-1)
    values = torch.arange(5)[:, None]  # (K, 1): every value of z1
    log_x = pair._emission(values).log_prob(x).T  # (B, K)
    z2_terms = trace.nodes["z2"]["fn"].log_prob(z2)  # log q(z2)
    log_p_z2 = pyro.distributions.Normal(*pair.top(c)).to_event(1).log_prob(z2)
    exact = (log_q.exp() * (prior + log_x - log_q)).sum(-1) + log_p_z2 - z2_terms
    assert loss == pytest.approx(-exact.sum().item(), rel=1e-10)


@pytest.mark.parametrize(
    "name, baseline",
    [("tracegraph", "average"), ("tracegraph", "net"), ("tracegraph", None), ("enum", None)],
)
def test_the_discrete_toy_pair_trains(name, baseline, toy):
    pair = DiscreteToyPair(categories=12, hidden=32, baseline=baseline)
    pair.init_emission(toy.train.x, generator=torch.Generator().manual_seed(0))
    svi = pyro.infer.SVI(
        pair.model, pair.guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo(name, max_plate_nesting=1)
    )
    before = evaluate(pair.model, pair.guide, toy.test_inputs, num_samples=10)["elbo"].mean()
    for step in range(60):
        svi.step(toy.train_inputs[(step % 6) * 100 : (step % 6 + 1) * 100])
    after = evaluate(pair.model, pair.guide, toy.test_inputs, num_samples=10)["elbo"].mean()
    assert after > before + 0.5, (before, after)


def test_unit_diagnostics_leave_out_or_refuse_a_discrete_layer(toy):
    from pyro_ladder import active_units, mutual_information
    from pyro_ladder.diagnostics import kl_per_unit

    pair = DiscreteToyPair(categories=5, hidden=16)
    result = active_units(pair.model, pair.guide, toy.test_inputs, num_samples=4)
    assert set(result) == {"z2"} and result["z2"]["units"] == 2
    assert torch.isfinite(result["z2"]["variance"]).all()
    with pytest.raises(ConfigError, match="'z1'"):
        kl_per_unit(pair.model, pair.guide, toy.test_inputs)
    with pytest.raises(ConfigError, match="'z1'"):
        mutual_information(pair.guide, toy.test_inputs[:50])
