"""Free bits: the objective against a hand computation (float64), and on a conv ladder."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_ladder import ConfigError
from pyro_ladder.conv import ConvLadderVAE
from pyro_ladder.freebits import FreeBits

B, K = 3, 2  # data points, latent units


def _normal_logpdf(v, loc, scale, per_unit=False):
    """Written out, not taken from torch.distributions: the test's independent truth."""
    log_p = -0.5 * ((v - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)
    return log_p if per_unit else log_p.sum(-1)


class Tiny:
    """``z ~ N(0, I)``, ``x ~ N(w z, 1)``; guide ``q(z | x) = N(a x + c, softplus(s))``."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
        self.a = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
        self.c = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
        self.s = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()

    def q(self, x):
        return self.a * x + self.c, torch.nn.functional.softplus(self.s)

    def model(self, x):
        with pyro.plate("data", B, dim=-1):
            zero = x.new_zeros(K)
            z = pyro.sample("z", dist.Normal(zero, zero + 1).to_event(1))
            pyro.sample("x", dist.Normal(self.w * z, 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", B, dim=-1):
            pyro.sample("z", dist.Normal(*self.q(x)).to_event(1))

    def params(self):
        return [self.w, self.a, self.c, self.s]


def _x():
    return torch.randn(B, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _hand_loss(pair, x, z_drawn, lam, groups=1):
    """``-(sum_b log p(x_b | z_b) - B sum_g max(lam, KL_g))`` per particle, averaged over
    particles, groups ``g`` of ``K / groups`` consecutive units;
    ``z`` rebuilt from its noise so that gradients flow as under reparameterization."""
    loc, scale = pair.q(x)
    z = loc + scale * ((z_drawn - loc) / scale).detach()  # (S, B, K)
    one = torch.ones((), dtype=torch.float64)
    log_lik = _normal_logpdf(x, pair.w * z, one)  # (S, B)
    kl = _normal_logpdf(z, loc, scale, True) - _normal_logpdf(z, 0 * z, one, True)  # (S, B, K)
    kl = kl.reshape(*kl.shape[:-1], groups, K // groups).sum(-1)  # (S, B, G)
    batch_kl = kl.mean(-2)  # (S, G)
    floored = torch.maximum(batch_kl.new_tensor(lam), batch_kl).sum(-1)  # (S,)
    objective = log_lik.sum(-1) - B * floored
    return -objective.mean(), batch_kl


def _drawn(pair, x, particles, seed=7):
    pyro.set_rng_seed(seed)
    with pyro.plate("num_particles_vectorized", particles, dim=-2):
        return poutine.trace(pair.guide).get_trace(x).nodes["z"]["value"]  # (S, B, K)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("particles", [1, 4])
@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0, 50.0])
def test_objective_and_gradient_match_the_hand_computation(lam, particles, groups):
    pair, x = Tiny(), _x()
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(7)
    with FreeBits(lam, groups=groups):
        loss = elbo.differentiable_loss(pair.model, pair.guide, x)
    expected, batch_kl = _hand_loss(pair, x, _drawn(pair, x, particles), lam, groups)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, pair.params())
    hand = torch.autograd.grad(expected, pair.params())
    for g, h in zip(grads, hand, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    if lam == 50.0:  # every particle is floored: w feels the likelihood alone
        assert (batch_kl < lam).all()
    if lam == 0.5 and particles == 4:  # the floor binds for some particles, not others
        assert (batch_kl < lam).any() and (batch_kl > lam).any(), batch_kl


@pytest.mark.parametrize("seed", [7, 8])
def test_a_floor_only_lowers_the_elbo_and_is_inert_below_every_kl(seed):
    """max(lam, KL) >= KL: the floored loss is never below the ELBO's, and equal to it
    exactly when every particle's batch KL is >= lam (a Monte Carlo KL can be < 0)."""
    pair, x = Tiny(), _x()
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    _, batch_kl = _hand_loss(pair, x, _drawn(pair, x, 4, seed), 0.0)
    pyro.set_rng_seed(seed)
    plain = elbo.differentiable_loss(pair.model, pair.guide, x)
    floors = (0.0, 0.5 * batch_kl.min().item(), 0.5, 2.0)
    assert (batch_kl >= floors[1]).all() == (seed == 8)  # seed 8: every batch KL > 0
    for lam in floors:
        if lam < 0:
            continue
        pyro.set_rng_seed(seed)
        with FreeBits(lam):
            floored = elbo.differentiable_loss(pair.model, pair.guide, x)
        if (batch_kl >= lam).all():
            torch.testing.assert_close(floored, plain, rtol=1e-14, atol=0)
        else:
            assert floored > plain


def test_floored_layer_gives_the_guide_no_kl_gradient():
    """With a huge floor on a pair whose likelihood ignores z, nothing moves the guide."""
    pair, x = Tiny(), _x()
    with torch.no_grad():
        pair.w.zero_()
    pyro.set_rng_seed(7)
    with FreeBits(1e3):
        loss = Trace_ELBO().differentiable_loss(pair.model, pair.guide, x)
    for g in torch.autograd.grad(loss, [pair.a, pair.c, pair.s]):
        assert g.abs().max() < 1e-12


def test_meanfield_falls_back_to_the_same_floored_value():
    pair, x = Tiny(), _x()
    pyro.set_rng_seed(7)
    with FreeBits(50.0):
        loss = TraceMeanField_ELBO().differentiable_loss(pair.model, pair.guide, x)
    expected, _ = _hand_loss(pair, x, _drawn(pair, x, 1), 50.0)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_per_site_floors_on_a_conv_ladder():
    torch.manual_seed(0)
    vae = ConvLadderVAE(image_shape=(8, 8), channels=(4, 4), latent_channels=(2, 2)).double()
    x = torch.rand(4, 64, dtype=torch.float64).round()

    def loss(floor):
        pyro.set_rng_seed(3)
        if floor is None:
            return Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
        with FreeBits(floor):
            return Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)

    plain, z1_only, both = loss(None), loss({"z1": 1e3}), loss(1e3)
    assert plain < z1_only < both
    pyro.set_rng_seed(3)
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    kl1 = guide.nodes["z1"]["fn"].log_prob(guide.nodes["z1"]["value"]) - model.nodes["z1"][
        "fn"
    ].log_prob(guide.nodes["z1"]["value"])
    # the z1 term -sum_b kl_b is replaced by -B * 1e3
    torch.testing.assert_close(z1_only - plain, 4 * 1e3 - kl1.sum(), rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("floor", [-1.0, float("nan"), {"z1": -0.1}, True])
def test_bad_floors_are_refused(floor):
    with pytest.raises(ConfigError, match="free-bits floor"):
        FreeBits(floor)


def test_site_outside_the_data_plate_is_refused():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ConfigError, match="plate"), FreeBits(1.0):
        Trace_ELBO().differentiable_loss(model, guide)


def test_channel_groups_on_a_conv_ladder():
    """groups=2 on latents of 2 channels: one floor per channel, each binding on its own."""
    torch.manual_seed(0)
    vae = ConvLadderVAE(image_shape=(8, 8), channels=(4, 4), latent_channels=(2, 2)).double()
    x = torch.rand(4, 64, dtype=torch.float64).round()
    pyro.set_rng_seed(3)
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    z = guide.nodes["z1"]["value"]  # (4, 2, 4, 4)
    q, p = guide.nodes["z1"]["fn"].base_dist, model.nodes["z1"]["fn"].base_dist
    per_channel = (q.log_prob(z) - p.log_prob(z)).sum((-1, -2)).mean(0)  # (2,): KL per channel
    lam = per_channel.mean().item()  # between the two channels' KLs
    assert per_channel.min() < lam < per_channel.max()
    losses = []
    for floor in (None, {"z1": lam}):
        pyro.set_rng_seed(3)
        if floor is None:
            losses.append(Trace_ELBO().differentiable_loss(vae.model, vae.guide, x))
            continue
        with FreeBits(floor, groups=2):
            losses.append(Trace_ELBO().differentiable_loss(vae.model, vae.guide, x))
    expected = 4 * (lam - per_channel.min())  # only the channel below the floor moves
    torch.testing.assert_close(losses[1] - losses[0], expected, rtol=1e-10, atol=1e-10)


def test_groups_that_do_not_divide_the_channels_are_refused():
    torch.manual_seed(0)
    vae = ConvLadderVAE(image_shape=(8, 8), channels=(4, 4), latent_channels=(3, 2)).double()
    x = torch.rand(4, 64, dtype=torch.float64).round()
    with (
        pytest.raises(ConfigError, match="first event size divides by 2"),
        FreeBits({"z1": 1.0}, groups=2),
    ):
        Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    with pytest.raises(ConfigError, match="groups must be an integer"):
        FreeBits(1.0, groups=0)
