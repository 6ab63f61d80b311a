"""Cached parameter roles must not answer for a call that uses other parameters.

A pair registered whole (``pyro.module("pair", self)`` on both sides) whose model uses its
prior network only when a condition ``c`` is passed: roles found for ``c=None`` leave the
prior out. Truth, same seed: every estimator that splits its gradient by role gives the
model's parameters exactly IWAE's model gradient (the DReG family, PIWAE and RWS with
``shared="theta"``), so a dropped gradient shows as a difference of the prior's norm.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_ladder import gradient_snr, make_elbo
from pyro_ladder._traces import parameter_roles
from pyro_ladder.errors import ConfigError

SPLITTING = [
    ("iwae-dreg", {}),
    ("miwae-dreg", {}),
    ("piwae", {}),
    ("piwae-dreg", {}),
    ("rws", {"shared": "theta"}),
]
MODEL_SIDE = ("prior.weight", "prior.bias", "dec.weight", "dec.bias")


class Pair(nn.Module):
    """Encoder, optional prior network ``p(z | c)``, decoder; all registered whole."""

    def __init__(self, use_prior=None):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.prior, self.dec = nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(2, 3)
        self.use_prior = use_prior  # None: decided by the argument c
        self.double()

    def _prior_on(self, c):
        return c is not None if self.use_prior is None else self.use_prior

    def model(self, x, c=None):
        pyro.module("pair", self)
        with pyro.plate("data", x.shape[0]):
            on = self._prior_on(c)
            loc = self.prior(c) if on else x.new_zeros(x.shape[0], 2)  # (B, 2)
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x, c=None):
        pyro.module("pair", self)
        h = self.enc(x)  # (B, 4)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))


@pytest.fixture
def xc():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 2, generator=g, dtype=torch.float64),
    )


def _grads(name, pair, *args, **options):
    pyro.set_rng_seed(3)
    for p in pair.parameters():
        p.grad = None
    make_elbo(name, num_particles=4, **options).loss_and_grads(pair.model, pair.guide, *args)
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in pair.named_parameters()
    }


def _assert_model_side_is_iwae(got, truth):
    assert truth["prior.weight"].norm() > 1.0  # the prior matters: a dropped gradient shows
    for n in MODEL_SIDE:
        torch.testing.assert_close(got[n], truth[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,options", SPLITTING, ids=[n for n, _ in SPLITTING])
def test_roles_found_without_the_condition_do_not_answer_with_it(xc, name, options):
    x, c = xc
    pair = Pair()
    _grads(name, pair, x, None, **options)  # roles cached with the prior unused
    got = _grads(name, pair, x, c, **options)
    _assert_model_side_is_iwae(got, _grads("iwae", pair, x, c))


@pytest.mark.parametrize("name,options", SPLITTING, ids=[n for n, _ in SPLITTING])
def test_a_parameter_reached_without_a_role_makes_the_roles_be_found_again(xc, name, options):
    # the arguments are the same; the pair's state switches the prior on: only the check on
    # the live pass (a parameter reached without a role) can see the roles are stale
    x, c = xc
    pair = Pair(use_prior=False)
    _grads(name, pair, x, c, **options)
    pair.use_prior = True
    got = _grads(name, pair, x, c, **options)
    _assert_model_side_is_iwae(got, _grads("iwae", pair, x, c))


def test_roles_follow_the_structure_of_the_arguments(xc, monkeypatch):
    import pyro_ladder._traces as traces

    calls = []
    real = traces._roles_by_dependence
    monkeypatch.setattr(traces, "_roles_by_dependence", lambda *a: calls.append(1) or real(*a))
    x, c = xc
    pair = Pair()
    without = parameter_roles(pair.model, pair.guide, (x, None), {})
    assert not {"prior.weight", "prior.bias"} & {n.split("$$$")[-1] for n in without.model}
    with_c = parameter_roles(pair.model, pair.guide, (x, c), {})
    assert len(calls) == 2
    assert {id(pair.prior.weight), id(pair.prior.bias)} <= {id(t) for t in with_c.model.values()}
    as_kwarg = parameter_roles(pair.model, pair.guide, (x,), {"c": c})
    assert len(calls) == 3 and as_kwarg.model.keys() == with_c.model.keys()
    # the same structure with new values: the cached answer
    assert parameter_roles(pair.model, pair.guide, (x + 1, c * 2), {}) is with_c
    assert parameter_roles(pair.model, pair.guide, (x[:3], c[:3]), {}) is not with_c
    assert len(calls) == 4


def test_gradient_snr_groups_follow_the_arguments(xc):
    x, c = xc
    pair = Pair()
    elbo = make_elbo("iwae-dreg", num_particles=2)
    first = gradient_snr(pair.model, pair.guide, elbo, x, None, num_draws=2)
    second = gradient_snr(pair.model, pair.guide, elbo, x, c, num_draws=2)
    assert second["model"]["mean"] != first["model"]["mean"]
    roles = parameter_roles(pair.model, pair.guide, (x, c), {})
    assert id(pair.prior.weight) in {id(t) for t in roles.model.values()}


class TrainingOnly(Pair):
    """Uses its prior network in training mode only: the dependence pass (eval mode)
    never sees it, so no recomputation can give it a role."""

    def _prior_on(self, c):
        return self.training


def test_a_parameter_no_dependence_pass_finds_is_refused_not_dropped(xc):
    x, c = xc
    pair = TrainingOnly()
    with pytest.raises(ConfigError, match="reaches parameters"):
        _grads("iwae-dreg", pair, x, c)


def test_clear_roles_cache_after_a_change_of_structure_the_key_does_not_show():
    """A flag that makes the model use the guide's network changes the roles without
    changing the pair, its registered tensors or its arguments: the cached roles stay until
    ``clear_roles_cache``, after which the next call finds the new ones."""
    import pyro.distributions as dist

    from pyro_ladder import clear_roles_cache
    from pyro_ladder._traces import parameter_roles

    torch.manual_seed(0)
    net = torch.nn.Linear(1, 1)
    uses = {"model": False}

    def model(x):
        pyro.module("net", net)
        with pyro.plate("data", len(x)):
            loc = net(x[:, None]).squeeze(-1) if uses["model"] else torch.zeros_like(x)
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.module("net", net)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(net(x[:, None]).squeeze(-1), 1.0))

    x = torch.randn(4)
    names = {"net$$$weight", "net$$$bias"}
    before = parameter_roles(model, guide, (x,), {})
    assert set(before.guide_only) == names and not before.model
    uses["model"] = True
    assert parameter_roles(model, guide, (x,), {}) is before  # the key cannot tell
    clear_roles_cache()
    after = parameter_roles(model, guide, (x,), {})
    assert not after.guide_only and set(after.model) == set(after.shared) == names
