"""Differentiable losses: the value of each estimator's loss and the gradient of its
``loss_and_grads``, on the same draws, for every estimator of make_elbo."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, TraceGraph_ELBO
from torch import nn

from pyro_ladder import ESTIMATORS, make_elbo
from pyro_ladder.elbo import scoped
from pyro_ladder.elbo.surrogate import differentiable_loss

# options that make the estimators differ from their special cases (outer=1 is IWAE, ...)
OPTIONS = {
    "renyi": {"alpha": 0.4},
    "miwae": {"outer": 2},
    "piwae": {"outer": 2},
    "miwae-dreg": {"outer": 2},
    "piwae-dreg": {"outer": 2},
    "ciwae": {"beta": 0.3},
}
# the JIT estimators' surrogates run uncompiled: compared with the estimator they compile
UNCOMPILED = {  # the library's uncompiled estimators (their plate probe leaves no trace)
    "jit-elbo": scoped.Trace_ELBO,
    "jit-meanfield": scoped.TraceMeanField_ELBO,
    "jit-tracegraph": scoped.TraceGraph_ELBO,
}


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def _surrogate_run(elbo, vae, model, guide, x, seed=3):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = differentiable_loss(elbo, model, guide, x)
    loss.backward()
    return loss.item(), _grads(vae)


def _pyro_run(elbo, vae, model, guide, x, seed=3):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model, guide, x)
    return loss, _grads(vae)


def _assert_same(run, reference):
    (loss, grads), (ref_loss, ref_grads) = run, reference
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    assert any(g.abs().sum() > 0 for g in ref_grads)  # a zero gradient would prove nothing
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_value_and_gradient_equal_the_estimators(vae, x, name):
    options = OPTIONS.get(name, {})

    def reference():
        if name in UNCOMPILED:
            return UNCOMPILED[name](num_particles=3, vectorize_particles=True)
        return make_elbo(name, 3, **options)

    ours = _surrogate_run(make_elbo(name, 3, **options), vae, vae.model, vae.guide, x)
    _assert_same(ours, _pyro_run(reference(), vae, vae.model, vae.guide, x))
    pyro.set_rng_seed(3)  # the same draws through the estimator's own loss()
    assert ours[0] == pytest.approx(reference().loss(vae.model, vae.guide, x), rel=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_renyi_particles_drawn_one_by_one(vae, x, alpha):
    def renyi():
        return RenyiELBO(alpha=alpha, num_particles=4, vectorize_particles=False)

    ours = _surrogate_run(renyi(), vae, vae.model, vae.guide, x)
    _assert_same(ours, _pyro_run(renyi(), vae, vae.model, vae.guide, x))


class DiscretePair(nn.Module):
    """A Bernoulli latent above a Gaussian one: score-function terms with a baseline."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.dec = nn.Linear(2, 3)

    def model(self, x):
        pyro.module("pair_dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.3)))
            loc = c.unsqueeze(-1).expand(*c.shape, 2)  # (..., B, 2)
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("pair_enc", self.enc)
        out = self.enc(x)  # (B, 3)
        baseline = {"baseline": {"use_decaying_avg_baseline": True}}
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=out[:, 0]), infer=baseline)
            pyro.sample("z", dist.Normal(out[:, 1:], 1.0).to_event(1))


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_renyi_score_function_term_of_a_discrete_site(x, alpha):
    torch.manual_seed(0)
    pair = DiscretePair().double()
    data = x[:, :3]

    def renyi():
        return RenyiELBO(alpha=alpha, num_particles=4, vectorize_particles=True)

    ours = _surrogate_run(renyi(), pair, pair.model, pair.guide, data)
    _assert_same(ours, _pyro_run(renyi(), pair, pair.model, pair.guide, data))


def test_tracegraph_score_function_and_baseline_terms(x):
    torch.manual_seed(0)
    pair = DiscretePair().double()
    data = x[:, :3]
    runs = []
    for run in (_surrogate_run, _pyro_run):
        pyro.clear_param_store()  # the decaying-average baseline starts from zero in both
        runs.append(run(TraceGraph_ELBO(), pair, pair.model, pair.guide, data))
    _assert_same(*runs)
    # the score-function term is present: the encoder's logit row gets a gradient
    assert runs[0][1][0][0].abs().sum() > 0
