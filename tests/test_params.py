"""register_module sends the messages pyro.module sends, with the same values."""

import pyro
import pytest
import torch
from pyro import poutine

from pyro_ladder._params import register_module


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
