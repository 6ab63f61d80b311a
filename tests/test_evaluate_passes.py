"""Evaluation's passes: what they skip (validation after a batch's first pass, the upward
pass after the first) changes no number and lets no invalid input through.

``pyro_ladder._validation`` explains when a pass may run without validation; these tests
compare, bit for bit, with every pass validated, and feed invalid inputs where the first
pass of a batch cannot see them.
"""

import contextlib
import importlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import Distribution

from pyro_ladder import LadderVAE, NumericalError, evaluate, log_likelihood
from pyro_ladder._validation import _only_nan, signature

evaluate_module = importlib.import_module("pyro_ladder.evaluate")  # the function shadows it


def _ladder():
    torch.manual_seed(2)
    return LadderVAE(12, (5, 4, 3), (16, 10, 8)).double()  # batch norm, eval mode in evaluate


def _rows(n=7):
    torch.manual_seed(3)
    return (torch.rand(n, 12) < 0.4).double()


def _everything(vae, x, **options):
    """evaluate's results flattened to ``{name: tensor}``, and the next random draw."""
    pyro.set_rng_seed(11)
    out = evaluate(vae.model, vae.guide, x, **options)
    flat = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    for group in ("iwae", "kl", "cross_entropy"):
        flat.update({f"{group}/{k}": v for k, v in out[group].items()})
    flat["next draw"] = torch.rand(2)
    return flat


OPTIONS = dict(num_samples=23, iwae_k=(2,), batch_size=3, max_rows=12)  # ragged passes


def test_later_passes_of_the_ladder_change_no_number(monkeypatch):
    vae, x = _ladder(), _rows()
    fast = _everything(vae, x, **OPTIONS)
    monkeypatch.setattr(evaluate_module, "signature", lambda *traces: None)
    slow = _everything(vae, x, **OPTIONS)  # every pass validated
    assert fast.keys() == slow.keys()
    for key in fast:
        assert torch.equal(fast[key], slow[key]), key


def test_log_likelihood_is_evaluates_estimate_from_the_same_draws():
    vae, x = _ladder(), _rows()
    full = _everything(vae, x, **OPTIONS)
    pyro.set_rng_seed(11)
    alone = log_likelihood(vae.model, vae.guide, x, **OPTIONS)
    assert torch.equal(alone, full["log_likelihood"])
    assert torch.equal(torch.rand(2), full["next draw"])  # the same draws were taken


def test_upward_pass_runs_once_per_batch(monkeypatch):
    vae, x = _ladder(), _rows()
    calls = []
    upward = vae.inference.upward
    monkeypatch.setattr(vae.inference, "upward", lambda *a: calls.append(1) or upward(*a))
    evaluate(vae.model, vae.guide, x, **OPTIONS)
    # 3 batches (3 + 3 + 1 rows) of 23 draws in passes of 4 or fewer; one plate probe
    assert len(calls) == 3 + 1


# A pair of Normals only (its validation refuses nothing but NaN): passes after a batch's
# first run unvalidated.


def _normal_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def _normal_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x / 2, 0.8).to_event(1))


def _data(n=6):
    torch.manual_seed(5)
    return torch.randn(n, 2, dtype=torch.float64)


def test_skipping_validation_of_a_validated_pair_changes_no_number(monkeypatch):
    def run():  # the ladder's Gaussians skip validation themselves: here Pyro's Normals
        pyro.set_rng_seed(4)
        out = evaluate(_normal_model, _normal_guide, _data(7), num_samples=23, iwae_k=(2,),
                       batch_size=3, max_rows=12)  # fmt: skip
        return out["log_likelihood"], out["elbo"], out["iwae"][2], out["kl"]["z"], torch.rand(2)

    fast = run()
    monkeypatch.setattr(evaluate_module, "signature", lambda *traces: None)  # all validated
    for got, expected in zip(fast, run(), strict=True):
        assert torch.equal(got, expected)


def test_invalid_observation_in_a_later_batch_is_refused_by_validation():
    x = _data()
    x[4, 1] = float("nan")  # in the second batch; its first pass validates it
    with pytest.raises(ValueError, match="support"):
        evaluate(_normal_model, _guide_at(0.0), x, num_samples=20, batch_size=3, max_rows=15)


def _counting(switch_at, early, late):
    """A function calling ``early`` until its ``switch_at``-th call, then ``late``."""
    calls = []

    def fn(x):
        calls.append(1)
        return (early if len(calls) < switch_at else late)(x)

    return fn


def test_invalid_scale_in_a_later_pass_is_refused():
    def bad_guide(x):  # a negative scale: NaN log q, which evaluation refuses
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, -0.8 * x.new_ones(2)).to_event(1))

    # call 1: the plate probe; 2: the first (validated) pass; 4: the third pass
    guide = _counting(4, _normal_guide, bad_guide)
    with pytest.raises((ValueError, NumericalError)):
        evaluate(_normal_model, guide, _data(), num_samples=20, batch_size=6, max_rows=30)


# An Exponential prior scored at a negative draw has a finite, wrong log-density: only
# validation refuses it, so such a pair is validated in every pass.


def _exponential_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Exponential(x.new_ones(2)).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def _guide_at(loc):
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_full((2,), loc), 0.01).to_event(1))

    return guide


def test_a_family_that_validation_protects_is_validated_in_every_pass():
    guide = _counting(4, _guide_at(3.0), _guide_at(-3.0))  # negative draws from pass 3 on
    with pytest.raises(ValueError, match="support"):
        evaluate(_exponential_model, guide, _data(), num_samples=20, batch_size=6, max_rows=30)


def test_a_pass_whose_sites_change_is_run_again_validated():
    # passes 1-2 are all Normal (validation may be skipped from pass 2 on); from pass 3 the
    # model turns Exponential, which the negative draws violate: the pass must be refused
    model = _counting(4, _normal_model, _exponential_model)
    guide = _counting(4, _guide_at(3.0), _guide_at(-3.0))
    with pytest.raises(ValueError, match="support"):
        evaluate(model, guide, _data(), num_samples=20, batch_size=6, max_rows=30)


def test_a_pass_run_again_takes_the_same_draws(monkeypatch):
    def run():
        pyro.set_rng_seed(1)
        model = _counting(4, _normal_model, _exponential_model)  # valid: positive draws
        # (the KL of a Normal from an Exponential is infinite: log_likelihood alone)
        ll = log_likelihood(model, _guide_at(3.0), _data(), num_samples=20, batch_size=6,
                            max_rows=30)  # fmt: skip
        return ll, torch.rand(2)

    fast = run()
    monkeypatch.setattr(evaluate_module, "signature", lambda *traces: None)  # all validated
    for got, expected in zip(fast, run(), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("fails", [False, True])
def test_the_users_validation_settings_are_restored(enabled, fails):
    x = _data()
    if fails:
        x[4, 1] = float("nan")
    torch_default = Distribution._validate_args
    try:
        with pyro.validation_enabled(enabled):
            Distribution.set_default_validate_args(not enabled)  # torch's may differ
            with pytest.raises((ValueError, NumericalError)) if fails else contextlib.nullcontext():
                evaluate(_normal_model, _normal_guide, x, num_samples=20, batch_size=6, max_rows=30)
            assert pyro.infer.is_validation_enabled() is enabled
            assert pyro.poutine.is_validation_enabled() is enabled
            assert dist.is_validation_enabled() is enabled
            assert Distribution._validate_args is (not enabled)
    finally:
        Distribution.set_default_validate_args(torch_default)


def test_only_normals_and_unvalidated_distributions_pass_unvalidated():
    loc, scale = torch.zeros(3), torch.ones(3)
    assert _only_nan(dist.Normal(loc, scale).to_event(1))
    assert _only_nan(torch.distributions.Normal(loc, scale))
    assert _only_nan(dist.Bernoulli(logits=loc, validate_args=False).to_event(1))
    assert not _only_nan(dist.Bernoulli(logits=loc).to_event(1))
    assert not _only_nan(dist.Exponential(scale))
    assert not _only_nan(dist.Normal(loc, scale).mask(False))  # a wrapper with its own rules
    trace = pyro.poutine.trace(_exponential_model).get_trace(_data())
    assert signature(trace) is None


def test_a_parameter_substituted_by_a_handler_around_evaluate_is_used():
    """adversary3: a user's ``poutine.substitute`` around the call sets ``loc``; the passes'
    blocked registrations must not hide it. The guide is the exact posterior, so each weight
    is ``p(x)`` and the estimate equals ``log N(x; loc, sqrt(2))`` for any draws."""
    import math

    from pyro import poutine

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0, dtype=torch.float64))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + loc, 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0, dtype=torch.float64))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x - loc) / 2, math.sqrt(0.5)).to_event(1))

    x = torch.tensor([[0.3], [1.7], [-0.4]], dtype=torch.float64)
    loc = torch.tensor(2.0, dtype=torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with poutine.substitute(data={"loc": loc}):
        ll = log_likelihood(model, guide, x, num_samples=4, max_rows=3)
    truth = dist.Normal(loc, math.sqrt(2.0)).log_prob(x[:, 0])
    torch.testing.assert_close(ll, truth, rtol=1e-12, atol=1e-12)


def test_an_invalid_scale_masked_out_in_a_later_pass_is_refused():
    """adversary3: under ``poutine.mask`` a Normal's invalid scale gives no NaN (the masked
    log-density is 0), so skipping validation after the first pass lets it through; with
    every pass validated the call raises. The first pass (seed 1, 5 draws) has no z <= 0."""
    from pyro import poutine

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            with poutine.mask(mask=(z > 0).squeeze(-1)):
                pyro.sample("x", dist.Normal(z, z).to_event(1), obs=x)  # scale z <= 0

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.full_like(x, 2.0), 1.0).to_event(1))

    x = torch.tensor([[1.5]], dtype=torch.float64)
    pyro.set_rng_seed(1)
    with pytest.raises(ValueError, match="scale"):
        log_likelihood(model, guide, x, num_samples=2000, max_rows=5)


def test_networks_left_in_training_mode_move_their_statistics_once_per_pass():
    """adversary3: a pair evaluate cannot put in eval mode (lambdas) runs batch norm in
    training mode; sharing one reuse scope across a batch's passes must not change how
    often its running statistics move: once per pass (7 rows, max_rows 21: 3 draws a
    pass, 4 passes for K = 12), as with a scope per pass. The plate probe leaves them as
    they were (it restores the statistics of every module that ran in it, networks held
    in closures included; before, it moved them once)."""
    from pyro_ladder import LadderVAE, evaluate

    torch.manual_seed(0)
    vae = LadderVAE(6, (4, 3), (10, 8)).double()
    vae.train()
    x = (torch.rand(7, 6) < 0.5).double()
    pyro.set_rng_seed(5)
    evaluate(lambda x: vae.model(x), lambda x: vae.guide(x), x, num_samples=12, max_rows=21)
    assert int(vae.inference.blocks[0].net[1].num_batches_tracked) == 4
