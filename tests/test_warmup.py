import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_ladder import LadderVAE, LatentWeight, fit, kl_weight, make_elbo, with_kl_weight


def _terms(vae, x, weight):
    """(-loss, reconstruction, log p(z) - log q(z)) on one fixed draw of z."""
    pyro.set_rng_seed(7)
    loss = Trace_ELBO().loss(with_kl_weight(vae.model), with_kl_weight(vae.guide), weight, x)
    pyro.set_rng_seed(7)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    rec = model_trace.nodes["x"]["log_prob_sum"]
    latent = sum(
        model_trace.nodes[f"z{i}"]["log_prob_sum"] - guide_trace.nodes[f"z{i}"]["log_prob_sum"]
        for i in (1, 2)
    )
    return -loss, rec.item(), latent.item()


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0, torch.tensor(0.0), torch.tensor(0.3)])
def test_warmed_up_objective_weights_only_the_latent_terms(weight):
    vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=False).double()
    x = torch.rand(5, 6, dtype=torch.float64).round()
    objective, rec, latent = _terms(vae, x, weight)
    assert objective == pytest.approx(rec + float(weight) * latent, abs=1e-9)


def test_zero_weight_gives_no_gradient_from_the_kl_terms():
    """At beta = 0 only the reconstruction term drives the top layer's head."""
    vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=False).double()
    x = torch.rand(5, 6, dtype=torch.float64).round()
    elbo = Trace_ELBO()
    pyro.set_rng_seed(1)
    elbo.loss_and_grads(with_kl_weight(vae.model), with_kl_weight(vae.guide), 0.0, x)
    grad_zero = vae.inference.heads[1].var.weight.grad.clone()
    vae.zero_grad()
    # the same gradient from the reconstruction term alone, written out by hand
    pyro.set_rng_seed(1)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    (-model_trace.nodes["x"]["log_prob_sum"]).backward()
    torch.testing.assert_close(grad_zero, vae.inference.heads[1].var.weight.grad)


def test_weight_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LatentWeight(1.5)


def test_schedule_is_linear_then_flat():
    assert [kl_weight(e, 4) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_weight(0, 0) == 1.0
    with pytest.raises(ValueError):
        kl_weight(0, -1)


@pytest.mark.parametrize("estimator", ["elbo", "jit-elbo", "iwae"])
def test_fit_records_the_schedule_and_trains(estimator):
    vae = LadderVAE(6, (3, 2), (8, 4))
    x = torch.rand(40, 6).round()
    history = fit(
        vae.model,
        vae.guide,
        x,
        elbo=estimator,
        num_particles=2,
        epochs=4,
        batch_size=10,
        warmup_epochs=2,
        progress=False,
    )
    assert [r["kl_weight"] for r in history] == [0.0, 0.5, 1.0, 1.0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)


@pytest.mark.parametrize("weight", [0.0, 0.3, torch.tensor(0.3)])
def test_warm_up_tempers_the_importance_weight(weight):
    """iwae under LatentWeight(beta): log (1/K) sum_k p(x | z_k) [p(z_k) / q(z_k | x)]^beta,
    written out by hand on the same draws."""
    vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=False).double()
    x = torch.rand(5, 6, dtype=torch.float64).round()
    K = 4
    pyro.set_rng_seed(7)
    elbo = make_elbo("iwae", K, max_plate_nesting=1)
    loss = elbo.loss(with_kl_weight(vae.model), with_kl_weight(vae.guide), weight, x)
    pyro.set_rng_seed(7)
    with pyro.plate("particles", K, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)

    def log_prob(trace, name):
        return trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"])  # (K, B)

    rec = log_prob(model_trace, "x")
    latent = sum(log_prob(model_trace, z) - log_prob(guide_trace, z) for z in ("z1", "z2"))
    expected = -((rec + float(weight) * latent).logsumexp(0) - math.log(K)).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, torch.tensor(0.0), 0.3, torch.tensor(0.3)])
def test_evaluate_scores_the_model_itself_whatever_the_warm_up(beta):
    """evaluate ignores a warm-up's weight: its mask (beta = 0) as well as its scale. Before,
    a pair wrapped at beta = 0 scored KL 0 and a log p(x) above the truth."""
    from pyro_ladder import evaluate

    torch.manual_seed(0)
    vae = LadderVAE(5, (2, 2), (6, 4), likelihood="gaussian", batch_norm=False).double()
    x = torch.randn(6, 5, dtype=torch.float64)

    def model(x):
        with LatentWeight(beta):
            vae.model(x)

    def guide(x):
        with LatentWeight(beta):
            vae.guide(x)

    pyro.set_rng_seed(1)
    plain = evaluate(vae.model, vae.guide, x, num_samples=50)
    pyro.set_rng_seed(1)
    warmed = evaluate(model, guide, x, num_samples=50)
    assert all(v.mean() > 0.01 for v in plain["kl"].values())
    for key in ("log_likelihood", "elbo"):
        assert torch.allclose(warmed[key], plain[key], rtol=0, atol=1e-12), key
    for name, kl in plain["kl"].items():
        assert torch.allclose(warmed["kl"][name], kl, rtol=0, atol=1e-12), name
