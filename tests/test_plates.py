"""A zoo of plate structures, each a small linear-Gaussian pair with an exact log p(x).

For every estimator of make_elbo (the registry is iterated, so new names are covered):
either a refusal naming what it cannot handle, or a loss that is a valid bound on average
(``E[loss] >= -log p(x)`` within Monte Carlo error, using the full data for subsampled
plates: the loss is scaled by ``N / B``) and, for the multi-sample estimators, tightens
toward it as K grows (issue 18).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO

from pyro_ladder import ESTIMATORS, ConfigError, evaluate, make_elbo
from pyro_ladder.elbo.surrogate import differentiable_loss

SIGMA = 1.0  # observation noise of every pair
N, B, M = 128, 32, 3  # data points, subsample size, observations per point (nested plate)
C = 2.0  # the scaled site's scale: the likelihood is tempered, p(x | z)^C
# estimators whose expected loss does not depend on K (the others must tighten with K)
SINGLE_SAMPLE = {
    "elbo", "meanfield", "tracegraph", "enum", "stl", "elbo-condkl-sg",
    "jit-elbo", "jit-meanfield", "jit-tracegraph",
}  # fmt: skip
# Pyro's own estimators take every structure (their objective is linear in the weights)
PYRO_ELBOS = SINGLE_SAMPLE - {"stl", "elbo-condkl-sg"}


def _x(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.8 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)


def _local(x, a, b, s):
    """Guide's z_n ~ N(a x_n + b, s), deliberately far from the posterior N(x/2, 0.707)
    (a KL of about 0.6 nats a point), so that the bounds visibly tighten with K."""
    return pyro.sample("z", dist.Normal(a * x + b, s))


def _guide_params(x):
    return (
        pyro.param("a", x.new_tensor(0.0)),
        pyro.param("b", x.new_tensor(0.3)),
        pyro.param("s", x.new_tensor(1.3), constraint=dist.constraints.positive),
    )


def _normal_lp(x, var):
    """sum_n log N(x_n; 0, var)."""
    return dist.Normal(0.0, math.sqrt(var)).log_prob(x).sum().item()


# ---- the pairs: model(*args), guide(*args), args per repeat, exact -log p ----


class Plain:
    """z_n ~ N(0, 1), x_n ~ N(z_n, SIGMA^2) in pyro.plate("data", B)."""

    x = _x(B)
    refusal = None

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    def guide(self, x):
        params = _guide_params(x)
        with pyro.plate("data", len(x)):
            _local(x, *params)

    def args(self, r):
        return (self.x,)

    def exact(self):
        return -_normal_lp(self.x, 1 + SIGMA**2)


class Subsampled(Plain):
    """The same pair on N points, minibatched by pyro.plate("data", N, subsample_size=B)."""

    x = _x(N)

    def model(self, x):
        with pyro.plate("data", len(x), subsample_size=B) as idx:
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x[idx])

    def guide(self, x):
        params = _guide_params(x)
        with pyro.plate("data", len(x), subsample_size=B) as idx:
            _local(x[idx], *params)


class SubsampledByIndices(Plain):
    """The same pair on N points, the minibatch's indices given: plate(..., subsample=idx)."""

    x = _x(N)

    def model(self, x, idx):
        with pyro.plate("data", len(x), subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x[idx])

    def guide(self, x, idx):
        params = _guide_params(x)
        with pyro.plate("data", len(x), subsample=idx):
            _local(x[idx], *params)

    def args(self, r):
        return self.x, torch.randperm(N, generator=torch.Generator().manual_seed(r))[:B]


class Nested(Plain):
    """M observations per data point in an inner plate: x_nm ~ N(z_n, SIGMA^2)."""

    x = _x(M * B).reshape(M, B)  # (M, B): the inner plate left of the data plate

    def model(self, x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            with pyro.plate("obs", M, dim=-2):
                pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    def guide(self, x):
        params = _guide_params(x)
        with pyro.plate("data", x.shape[-1]):
            _local(x.mean(0), *params)

    def exact(self):
        cov = torch.ones(M, M, dtype=torch.float64) + SIGMA**2 * torch.eye(M)
        return -dist.MultivariateNormal(torch.zeros(M), cov).log_prob(self.x.T).sum().item()


class Global(Plain):
    """A global latent t ~ N(0, 1) outside the data plate; z_n ~ N(t, 1), x_n ~ N(z_n, 1).
    The weight is joint over the batch: a few points, so that K = 32 tightens it."""

    x = _x(6)
    refusal = None

    def model(self, x):
        t = pyro.sample("t", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(t, 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    def guide(self, x):
        a, b, s = _guide_params(x)
        t = pyro.sample("t", dist.Normal(pyro.param("t_loc", x.new_tensor(0.2)), 0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(a * x + b + 0.3 * t, s))

    def exact(self):
        n = len(self.x)
        cov = torch.ones(n, n, dtype=torch.float64) + (1 + SIGMA**2) * torch.eye(n)
        return -dist.MultivariateNormal(torch.zeros(n), cov).log_prob(self.x).item()


class GlobalSubsampled(Global):
    """A global latent with a minibatched data plate: the ELBO's estimate stays unbiased;
    a multi-sample bound would need the subsample factor inside the logsumexp."""

    x = _x(N // 4)
    refusal = "outside pyro.plate"

    def model(self, x):
        t = pyro.sample("t", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", len(x), subsample_size=8) as idx:
            z = pyro.sample("z", dist.Normal(t, 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x[idx])

    def guide(self, x):
        a, b, s = _guide_params(x)
        t = pyro.sample("t", dist.Normal(pyro.param("t_loc", x.new_tensor(0.2)), 0.5))
        with pyro.plate("data", len(x), subsample_size=8) as idx:
            pyro.sample("z", dist.Normal(a * x[idx] + b + 0.3 * t, s))


class ScaledSite(Plain):
    """poutine.scale(C) on the likelihood: the bound is on log Z = log int p(z) p(x|z)^C dz."""

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            with poutine.scale(scale=C):
                pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    def exact(self):
        # N(x; z, s^2)^C = (2 pi s^2)^((1 - C)/2) C^(-1/2) N(x; z, s^2 / C)
        per_point = 0.5 * (1 - C) * math.log(2 * math.pi * SIGMA**2) - 0.5 * math.log(C)
        return -(len(self.x) * per_point + _normal_lp(self.x, 1 + SIGMA**2 / C))


class TwoDataPlates(Plain):
    """pyro.plate("data") and an independent plate("extra") of other points, each with its
    own local latents: the sites of "extra" lie outside the data plate (a joint weight)."""

    x = _x(4)
    y = _x(3, seed=1)

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x)
        with pyro.plate("extra", len(self.y)):
            u = pyro.sample("u", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("y", dist.Normal(u, SIGMA), obs=self.y)

    def guide(self, x):
        params = _guide_params(x)
        with pyro.plate("data", len(x)):
            _local(x, *params)
        with pyro.plate("extra", len(self.y)):
            pyro.sample("u", dist.Normal(0.4 * self.y, 0.8))

    def exact(self):
        return -_normal_lp(self.x, 1 + SIGMA**2) - _normal_lp(self.y, 1 + SIGMA**2)


ZOO = {
    "plain": Plain(),
    "subsample_size": Subsampled(),
    "subsample=": SubsampledByIndices(),
    "nested": Nested(),
    "global": Global(),
    "global+subsample": GlobalSubsampled(),
    "scaled-site": ScaledSite(),
    "two-plates": TwoDataPlates(),
}
REPEATS = 16
K_BIG = 32


def _losses(name, pair, k) -> torch.Tensor:
    """``REPEATS`` losses of estimator ``name`` with ``k`` particles, seeds 0, 1, ..."""
    elbo = make_elbo(name, k)
    out = []
    for r in range(REPEATS):
        pyro.set_rng_seed(r)
        out.append(elbo.loss(pair.model, pair.guide, *pair.args(r)))
    return torch.tensor(out, dtype=torch.float64)


_ELBO_DRAWS = 2048
_elbo_cache = {}


def _one_sample_bound(case) -> torch.Tensor:
    """The ELBO (the K = 1 bound) of each repeat, from many draws: the seeds match
    :func:`_losses`, so a subsampled pair scores the same rows (the indices are drawn
    before the particles)."""
    if case not in _elbo_cache:
        pair = ZOO[case]
        _elbo_cache[case] = _losses("elbo", pair, _ELBO_DRAWS)
    return _elbo_cache[case]


def _summary(losses):
    return losses.mean().item(), (losses.std() / math.sqrt(len(losses))).item()


@pytest.mark.parametrize("case", sorted(ZOO))
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_bounds_or_refuses_on_every_plate_structure(name, case):
    pair = ZOO[case]
    multi = name not in SINGLE_SAMPLE
    try:
        big = _losses(name, pair, K_BIG if multi else 2)
    except ConfigError as err:
        assert pair.refusal is not None and name not in PYRO_ELBOS, f"{name}, {case}: {err}"
        assert pair.refusal in str(err)
        return
    assert pair.refusal is None or not multi, f"{name} gave a number on {case}"
    exact = pair.exact()
    mean, se = _summary(big)
    assert mean >= exact - 4 * se - 1e-9, (mean, se, exact)  # a bound, on average
    if multi:  # tighter than the one-sample bound, repeat by repeat, and much nearer exact
        one = _one_sample_bound(case)
        gain, gain_se = _summary(one - big)
        assert gain > 4 * gain_se, (gain, gain_se)
        assert mean - exact < 0.7 * (one.mean().item() - exact), (mean, one.mean(), exact)


def test_the_zoo_catches_the_subsample_factor_inside_the_logsumexp():
    """Pyro's RenyiELBO folds N / B into the weights: on the subsampled pair its number lies
    above log p(x) by many standard errors. The same check passes ours (test above)."""
    pair = ZOO["subsample_size"]
    elbo = RenyiELBO(alpha=0, num_particles=K_BIG, vectorize_particles=True)
    losses = []
    for r in range(REPEATS):
        pyro.set_rng_seed(r)
        losses.append(elbo.loss(pair.model, pair.guide, pair.x))
    mean, se = _summary(torch.tensor(losses))
    assert mean < pair.exact() - 4 * se


@pytest.mark.parametrize("name", sorted(set(ESTIMATORS) - SINGLE_SAMPLE))
def test_the_minibatch_bound_is_the_full_data_bound_times_nothing_else(name):
    """With every row in the minibatch (subsample=all indices, factor 1) the subsampled pair
    gives the plain pair's number draw for draw; with B of N rows the factor N / B
    multiplies the same per-data-point bounds (the rows drawn are the same)."""
    full, sub = ZOO["plain"], ZOO["subsample="]
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:B]
    rows = sub.x[idx]
    pyro.set_rng_seed(0)  # one instance each: the first call traces the pair once
    plain = make_elbo(name, 4).loss(full.model, full.guide, rows)
    pyro.set_rng_seed(0)
    scaled = make_elbo(name, 4).loss(sub.model, sub.guide, sub.x, idx)
    assert scaled == pytest.approx(N / B * plain, rel=1e-10)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_the_differentiable_loss_follows_the_same_rule(name):
    """The Lightning surrogate's value is the estimator's loss on the subsampled pair."""
    pair = ZOO["subsample="]
    pyro.set_rng_seed(1)
    value = differentiable_loss(make_elbo(name, 3), pair.model, pair.guide, *pair.args(0))
    pyro.set_rng_seed(1)
    expected = make_elbo(name, 3).loss(pair.model, pair.guide, *pair.args(0))
    assert value.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    "case, message",
    [("subsample_size", "subsamples"), ("global", "outside pyro.plate"), ("plain", None)],
)
def test_evaluate_scores_rows_or_refuses(case, message):
    pair = ZOO[case]
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            evaluate(pair.model, pair.guide, pair.x, num_samples=4)
        return
    out = evaluate(pair.model, pair.guide, pair.x, num_samples=2000, batch_size=len(pair.x))
    total = out["log_likelihood"].sum().item()  # 32 points: a bias of ~0.002 nats each
    assert -pair.exact() - 0.15 < total < -pair.exact() + 0.05


def test_another_subsampled_plate_is_refused_by_name():
    def model(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            with pyro.plate("obs", 10, subsample_size=M, dim=-2):
                pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    pair = ZOO["nested"]
    with pytest.raises(ConfigError, match="plate 'obs' is subsampled"):
        make_elbo("iwae", 4).loss(model, pair.guide, pair.x)
