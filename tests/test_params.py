"""register_module sends the messages pyro.module sends, with the same values."""

import pyro
import pytest
import torch
from pyro import poutine

from pyro_ladder._params import RegisterOnce, register_module


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )


def _params(fn):
    trace = poutine.trace(fn).get_trace()
    return [(n, s["value"], s["kwargs"]) for n, s in trace.nodes.items() if s["type"] == "param"]


@pytest.mark.parametrize("registered_before", [False, True])
def test_same_sites_as_pyro_module(registered_before):
    pyro.clear_param_store()
    net = _net()
    if registered_before:  # the fast path: the store holds these very tensors
        pyro.module("net", net)
    ours = _params(lambda: register_module("net", net))
    theirs = _params(lambda: pyro.module("net", net))
    assert (
        [n for n, _, _ in ours]
        == [n for n, _, _ in theirs]
        == ["net$$$" + n for n, _ in net.named_parameters()]
    )
    for (_, a, ka), (_, b, kb) in zip(ours, theirs, strict=True):
        assert a is b and ka == kb
        assert a.unconstrained() is b  # what SVI steps
    assert set(pyro.get_param_store().keys()) == {"net$$$" + n for n, _ in net.named_parameters()}


def test_prefix_names_a_submodule_as_its_parent_does():
    pyro.clear_param_store()
    parent = torch.nn.Module()
    parent.sub = _net()
    register_module("p", parent)
    names = [n for n, _, _ in _params(lambda: register_module("p", parent.sub, "sub."))]
    assert names == ["p$$$sub." + n for n, _ in parent.sub.named_parameters()]


def test_a_stored_tensor_of_another_object_is_returned_as_pyro_returns_it():
    """Pyro's pitfall (the store outlives modules) is kept, not hidden: a second module
    registered under the same names gets the stored tensors in the trace, as with
    pyro.module."""
    pyro.clear_param_store()
    first, second = _net(), _net()
    pyro.module("net", first)
    ours = _params(lambda: register_module("net", second))
    theirs = _params(lambda: pyro.module("net", second))
    for (_, a, _), (_, b, _) in zip(ours, theirs, strict=True):
        assert a is b
    assert all(v is p for (_, v, _), p in zip(ours, first.parameters(), strict=True))


def test_frozen_parameters_are_skipped_with_pyro_s_warning():
    pyro.clear_param_store()
    net = _net()
    net[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="0.weight was not registered"):
        names = [n for n, _, _ in _params(lambda: register_module("net", net))]
    assert "net$$$0.weight" not in names and "net$$$0.bias" in names


def test_a_blocked_registration_leaves_no_site():
    pyro.clear_param_store()
    net = _net()
    pyro.module("net", net)
    blocked = poutine.block(lambda: register_module("net", net), hide_types=["param"])
    assert _params(blocked) == []


def test_registrations_in_a_register_once_scope_reach_outer_handlers_once():
    pyro.clear_param_store()
    net, once = _net(), RegisterOnce()
    names = {"net$$$" + n for n, _ in net.named_parameters()}
    with poutine.trace() as outer:
        with once:
            register_module("net", net)  # a first registration: every handler sees it
        with once, poutine.trace() as inner:  # a handler inside the scope sees it again
            register_module("net", net)
    with poutine.trace() as skipped:  # the scope innermost again: not sent
        with once:
            register_module("net", net)
    assert {n for n, s in outer.trace.nodes.items() if s["type"] == "param"} == names
    assert {n for n, s in inner.trace.nodes.items() if s["type"] == "param"} == names
    assert not [n for n, s in skipped.trace.nodes.items() if s["type"] == "param"]
    store = pyro.get_param_store()
    assert set(store.keys()) == names
    assert all(store["net$$$" + n] is p for n, p in net.named_parameters())


def test_a_seen_registration_sends_no_message(monkeypatch):
    import pyro_ladder._params as params_module

    pyro.clear_param_store()
    net, once, sent = _net(), RegisterOnce(), []
    pyro.module("net", net)
    real = params_module.apply_stack
    monkeypatch.setattr(params_module, "apply_stack", lambda msg: sent.append(msg) or real(msg))
    with poutine.trace():
        with once:
            register_module("net", net)
            register_module("net", net)
            register_module("net", net[2], "2.")  # another module: another registration
    assert len(sent) == len(list(net.parameters())) + 2  # the second call sent nothing


def _param_messages(monkeypatch):
    """Count every ``param`` message sent, by ``pyro.param`` or by ``register_module``."""
    from pyro.poutine import runtime

    from pyro_ladder import _params as params

    count = {"n": 0}
    real = runtime.apply_stack

    def counted(msg):
        count["n"] += msg["type"] == "param"
        return real(msg)

    monkeypatch.setattr(runtime, "apply_stack", counted)
    monkeypatch.setattr(params, "apply_stack", counted)
    return count


@pytest.mark.parametrize("estimator", ["elbo", "iwae", "iwae-dreg", "rws"])
def test_one_estimator_call_sends_each_registration_once(monkeypatch, estimator):
    """The ladder's guide registers the prior networks it shares with the model; within one
    estimator call the model's registration of the same tensors is not sent again. SVI's
    parameter capture still sees every parameter, and steps it."""
    from pyro.infer import SVI

    from pyro_ladder import LadderVAE, make_elbo
    from pyro_ladder.optim import Adam

    torch.manual_seed(0)
    vae = LadderVAE(12, (3, 2, 2), (8, 6, 4), batch_norm=False)
    x = torch.rand(5, 12).round()
    names = {n for n, p in vae.named_parameters()}
    svi = SVI(vae.model, vae.guide, Adam({"lr": 0.01}), make_elbo(estimator, 3))
    svi.step(x)  # first registrations go into the store
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    count = _param_messages(monkeypatch)
    with poutine.trace(param_only=True) as seen:
        svi.step(x)
    assert count["n"] == len(names)  # 166 - 48 on the paper's network
    assert {id(s["value"]) for s in seen.trace.nodes.values()} == {id(p) for p in vae.parameters()}
    assert all(not torch.equal(p, before[n]) for n, p in vae.named_parameters())
    # a standalone pass of the model registers all its networks, the priors included
    trace = poutine.trace(vae.model).get_trace(x)
    alone = {id(s["value"]) for s in trace.nodes.values() if s["type"] == "param"}
    assert alone == {id(p) for p in vae.generative.parameters()}


def test_a_handler_of_a_user_around_the_model_sees_every_registration(monkeypatch):
    """A handler the user puts around one side (here ``poutine.scale``) may act on what it
    sees: that side's registrations are then sent in full, as Pyro sends them."""
    from pyro_ladder import LadderVAE, make_elbo

    torch.manual_seed(0)
    vae = LadderVAE(12, (3, 2), (8, 6), batch_norm=False)
    x = torch.rand(5, 12).round()
    elbo = make_elbo("elbo")
    model = poutine.scale(vae.model, scale=1.0)
    elbo.loss(model, vae.guide, x)
    plain = _param_messages(monkeypatch)
    elbo.loss(vae.model, vae.guide, x)
    once = plain["n"]
    plain["n"] = 0
    elbo.loss(model, vae.guide, x)
    generative = sum(1 for _ in vae.generative.priors.parameters())
    assert plain["n"] == once + generative


@pytest.mark.parametrize("estimator", ["Trace_ELBO", "TraceGraph_ELBO"])
def test_particles_drawn_one_after_another_keep_their_gradients(monkeypatch, estimator):
    """Pyro's ELBOs with ``num_particles`` drawn in a loop differentiate a particle only if
    one of its two traces holds a parameter: a registration is left out of a model's pass
    only where the guide trace it replays holds it, so every particle keeps its gradient.
    (Leaving out what any earlier pass of the call had sent lost particles 2 and 3: the
    gradient was off by up to 1.03.) Truth: every pass sending every registration."""
    from pyro_ladder import LadderVAE, _params
    from pyro_ladder.elbo import scoped

    torch.manual_seed(0)
    vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=False).double()
    x = torch.rand(5, 6, dtype=torch.float64).round()
    grads = {}
    for once in (True, False):
        if not once:
            monkeypatch.setattr(_params, "_replayed_trace", lambda: None)
        vae.zero_grad(set_to_none=True)
        pyro.set_rng_seed(1)
        getattr(scoped, estimator)(num_particles=3).loss_and_grads(vae.model, vae.guide, x)
        grads[once] = {n: p.grad.clone() for n, p in vae.named_parameters()}
    assert grads[True].keys() == grads[False].keys() == {n for n, _ in vae.named_parameters()}
    for name, grad in grads[False].items():
        assert torch.equal(grads[True][name], grad), name
