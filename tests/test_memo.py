"""The guide's results reused by the model (pyro_ladder._memo): same numbers, less work."""

import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI

from pyro_ladder import ConfigError, LadderVAE, make_elbo
from pyro_ladder._memo import Memo, ReuseOutputs
from pyro_ladder._traces import parameter_roles


def _vae(batch_norm=False):
    torch.manual_seed(4)
    return LadderVAE(6, (4, 3, 2), (10, 8, 6), batch_norm=batch_norm).double()


def _x():
    torch.manual_seed(5)
    return torch.rand(7, 6, dtype=torch.float64).round()


def _loss_and_grads(vae, x, name, particles):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(3)
    elbo = make_elbo(name, particles, max_plate_nesting=1)
    loss = elbo.loss_and_grads(vae.model, vae.guide, x)
    return loss, [p.grad.clone() for p in vae.parameters()]


def _count_prior_calls(vae):
    calls = []
    for i, net in enumerate(vae.generative.priors):
        net.register_forward_hook(lambda *_, i=i: calls.append(i))
    return calls


@pytest.mark.parametrize(
    "name, particles", [("elbo", 1), ("iwae", 5), ("iwae-dreg", 5), ("stl", 3), ("miwae", 4)]
)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_reuse_gives_the_same_loss_and_gradients(monkeypatch, name, particles, batch_norm):
    vae, x = _vae(batch_norm), _x()
    if name == "iwae-dreg" and batch_norm:  # coupled particles: refused (elbo/coupling.py)
        with pytest.raises(ConfigError, match="training mode"):
            _loss_and_grads(vae, x, name, particles)
        return
    # the pair's parameter roles are found once per pair (a pass of its own): before counting
    parameter_roles(vae.model, vae.guide, (x,), {})
    calls = _count_prior_calls(vae)
    loss, grads = _loss_and_grads(vae, x, name, particles)
    with_memo = len(calls)
    vae.load_state_dict(_vae(batch_norm).state_dict())  # batch-norm statistics as before
    monkeypatch.setattr(Memo, "call", lambda self, key, module, inp, fn: fn(inp))
    calls.clear()
    ref_loss, ref_grads = _loss_and_grads(vae, x, name, particles)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-12)
    assert with_memo < len(calls)  # the model did not run the prior networks again


def test_batch_norm_statistics_move_once_per_step():
    vae, x = _vae(batch_norm=True), _x()
    _loss_and_grads(vae, x, "elbo", 1)
    counts = {int(m.num_batches_tracked) for m in vae.modules() if hasattr(m, "running_mean")}
    assert counts == {1}


def test_repeated_gradients_at_fixed_parameters_recompute_after_backward():
    """gradient_snr's pattern: the same x, unchanged parameters, one backward after another."""
    vae, x = _vae(), _x()
    first = _loss_and_grads(vae, x, "elbo", 1)
    second = _loss_and_grads(vae, x, "elbo", 1)  # a spent graph would raise here
    assert first[0] == second[0]
    for a, b in zip(first[1], second[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_changed_parameters_are_never_served_from_the_memo():
    vae, x = _vae(), _x()
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    with torch.no_grad():
        vae.generative.priors[0].head.loc.bias.add_(1.0)  # an optimizer step, in effect
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z2 = guide_trace.nodes["z2"]["value"]
    expected, _ = vae.generative.priors[0](z2)
    torch.testing.assert_close(model_trace.nodes["z1"]["fn"].base_dist.loc, expected)


def test_jit_elbo_compiles_with_one_and_several_particles():
    vae, x = _vae(batch_norm=True), _x()
    vae.float()
    for particles in (1, 3):
        svi = SVI(
            vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_elbo("jit-elbo", particles)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
            losses = [svi.step(x.float()) for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(losses)))


def test_memo_keeps_nothing_outside_a_scope_and_survives_deepcopy():
    import copy

    vae, x = _vae(), _x()
    poutine.trace(vae.guide).get_trace(x)  # outside a scope: nothing is stored anywhere
    assert vars(vae.generative._memo) == {} and vars(vae.inference._memo) == {}
    clone = copy.deepcopy(vae)
    assert vars(clone.generative._memo) == {}


def test_dreg_runs_each_prior_network_once_per_step():
    """The fixed-sample guide pass of iwae-dreg gets the priors from the live pass."""
    vae, x = _vae(batch_norm=False), _x()  # DReG refuses batch norm in training mode
    calls = _count_prior_calls(vae)
    elbo = make_elbo("iwae-dreg", 4, max_plate_nesting=1)
    elbo.loss_and_grads(vae.model, vae.guide, x)
    calls.clear()
    elbo.loss_and_grads(vae.model, vae.guide, x)
    assert sorted(calls) == [0, 1]


def test_a_copy_of_the_input_gets_stored_values_only_when_no_gradient_can_flow():
    torch.manual_seed(0)
    with ReuseOutputs():  # the memo is active inside a scope only
        memo, net, z = Memo(), torch.nn.Linear(3, 2), torch.randn(4, 3).requires_grad_()
        calls = []

        def fn(t):
            calls.append(t)
            return net(t)

        first = memo.call(0, net, z, fn)
        memo.call(0, net, z.detach(), fn)  # the weights want a gradient: computed again
        assert len(calls) == 2
        net.requires_grad_(False)
        memo.call(0, net, z.detach(), fn)  # the stored graph, handed out once
        served = memo.call(0, net, z.detach(), fn)
        assert len(calls) == 2 and served.grad_fn is None
        torch.testing.assert_close(served, first.detach(), rtol=0, atol=0)
        memo.call(0, net, z.clone(), fn)  # equal values in other memory: computed
        assert len(calls) == 3


def test_a_fresh_view_of_data_is_the_same_input():
    """Data sliced afresh on every call (x and c of a packed x') count as the same input
    when they view the same memory at the same version and carry no autograd history; the
    result's graph is still handed out once, and an in-place change forces a recompute."""
    torch.manual_seed(0)
    with ReuseOutputs():  # the memo is active inside a scope only
        memo, net = Memo(), torch.nn.Linear(3, 2)
        packed, z = torch.randn(4, 5), torch.randn(4, 1).requires_grad_()
        calls = []

        def fn(inp):
            calls.append(1)
            return net(torch.cat([inp[0], inp[1]], -1))

        first = memo.call("k", net, (z, packed[:, 3:5]), fn)
        again = memo.call("k", net, (z, packed[:, 3:5]), fn)  # a new view of the same columns
        assert len(calls) == 1 and again is first
        memo.call("k", net, (z, packed[:, 3:5]), fn)  # its graph was handed out once already
        assert len(calls) == 2
        memo.call("k", net, (z, packed[:, 2:4]), fn)  # other columns: computed
        assert len(calls) == 3
        packed.mul_(2)  # the data changed in place: computed
        memo.call("k", net, (z, packed[:, 2:4]), fn)
        assert len(calls) == 4
        memo.call("k", net, (z.detach().clone().requires_grad_(), packed[:, 2:4]), fn)
        assert len(calls) == 5  # another sample tensor: computed


def test_kl_warm_up_keeps_the_reuse():
    """Under warm-up (a scale and a mask on every latent site) the model still reuses the
    guide's prior networks: one run of each per step."""
    from pyro_ladder import with_kl_weight

    vae, x = _vae(batch_norm=True), _x()
    calls = _count_prior_calls(vae)
    model, guide = with_kl_weight(vae.model), with_kl_weight(vae.guide)
    make_elbo("elbo").loss_and_grads(model, guide, torch.tensor(0.5, dtype=x.dtype), x)
    assert sorted(calls) == [0, 1]


# ---- the switch: reuse on and off give the same numbers, for every estimator ----

MULTI = {
    "iwae", "renyi", "iwae-dreg", "iwae-stl", "miwae", "piwae", "ciwae",
    "miwae-dreg", "piwae-dreg", "rws", "rws-dreg", "vimco",
}


def _step(name, inference, reuse, method):
    """One estimator call on a float64 ladder with batch norm in training mode and a batch
    of 3: the loss, every gradient and every batch-norm buffer afterwards."""
    from pyro_ladder import reuse_outputs
    from pyro_ladder.elbo.surrogate import differentiable_loss

    pyro.clear_param_store()
    torch.manual_seed(4)
    vae = LadderVAE(6, (3, 2), (8, 8), inference=inference, batch_norm=True).double()
    x = _x()[:3]
    elbo = make_elbo(name, 3 if name in MULTI else 1, max_plate_nesting=1)
    if getattr(elbo, "needs_independent_particles", False):
        vae.eval()  # DReG refuses batch norm in training mode (elbo/coupling.py)
    pyro.set_rng_seed(3)
    with reuse_outputs(reuse), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        if method == "loss_and_grads":
            loss = elbo.loss_and_grads(vae.model, vae.guide, x)
        else:
            value = differentiable_loss(elbo, vae.model, vae.guide, x)
            value.backward()
            loss = value.item()
    grads = [p.grad for p in vae.parameters()]
    return loss, grads, [b.clone() for b in vae.buffers()]


@pytest.mark.parametrize("method", ["loss_and_grads", "differentiable_loss"])
@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
@pytest.mark.parametrize("name", sorted(__import__("pyro_ladder").ESTIMATORS))
def test_reuse_switch_changes_no_loss_gradient_or_statistic(name, inference, method):
    if name.endswith("meanfield") and inference == "bottom-up":
        pytest.skip("TraceMeanField_ELBO needs the model's site order (guide.py)")
    if name.startswith("jit-") and method == "differentiable_loss":
        pytest.skip("differentiable_loss runs jit estimators uncompiled: same as the plain one")
    on, off = _step(name, inference, True, method), _step(name, inference, False, method)
    assert on[0] == pytest.approx(off[0], rel=1e-13)
    for a, b in zip(on[1], off[1], strict=True):  # equal up to the order of summation
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    assert len(on[2]) == len(off[2]) > 0
    for a, b in zip(on[2], off[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reuse_switch_saves_the_prior_networks_second_pass():
    from pyro_ladder import reuse_outputs

    counts = {}
    for reuse in (True, False):
        vae, x = _vae(batch_norm=True), _x()
        calls = _count_prior_calls(vae)
        with reuse_outputs(reuse):
            make_elbo("iwae", 4, max_plate_nesting=1).loss_and_grads(vae.model, vae.guide, x)
        counts[reuse] = len(calls)
    assert counts == {True: 2, False: 4}


def test_reuse_switch_refuses_a_non_boolean():
    from pyro_ladder import ConfigError, reuse_outputs

    with pytest.raises(ConfigError, match="True or False"):
        reuse_outputs("no")
