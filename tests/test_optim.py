"""pyro_ladder.optim.Adam: pyro.optim.Adam's update and state, in one step per call."""

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI

from pyro_ladder import ConfigError, LadderVAE, make_elbo
from pyro_ladder.optim import Adam


def _vae():
    torch.manual_seed(6)
    return LadderVAE(8, (4, 3), (12, 6)).double()


def _x():
    torch.manual_seed(7)
    return (torch.rand(10, 8) < 0.5).double()


def _train(vae, optim, steps, first_seed=0):
    svi = SVI(vae.model, vae.guide, optim, make_elbo("elbo"))
    for step in range(first_seed, first_seed + steps):
        pyro.set_rng_seed(step)
        svi.step(_x())
    return optim


def _weights(vae):
    return {k: v.clone() for k, v in vae.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("options", [{"lr": 1e-2}, {"lr": 1e-2, "betas": (0.8, 0.9)}])
def test_same_update_as_pyro_adam_bit_for_bit(options):
    vae = _vae()
    _train(vae, pyro.optim.Adam(options), 4)
    expected = _weights(vae)
    vae = _vae()
    _train(vae, Adam(options), 4)
    _assert_same(_weights(vae), expected)


def test_per_parameter_options_from_a_callable():
    def options(name):
        return {"lr": 1e-1 if "likelihood" in name else 1e-3}

    vae = _vae()
    _train(vae, pyro.optim.Adam(options), 3)
    expected = _weights(vae)
    vae = _vae()
    ours = _train(vae, Adam(options), 3)
    _assert_same(_weights(vae), expected)
    assert len(ours._by_options) == 2  # one torch optimizer per distinct set of options


@pytest.mark.parametrize("first, second", [(Adam, pyro.optim.Adam), (pyro.optim.Adam, Adam)])
def test_state_moves_between_pyro_adam_and_ours(first, second):
    vae = _vae()
    _train(vae, Adam({"lr": 1e-2}), 4)
    expected = _weights(vae)
    vae = _vae()
    state = _train(vae, first({"lr": 1e-2}), 2).get_state()
    resumed = second({"lr": 1e-2})
    resumed.set_state(state)
    _train(vae, resumed, 2, first_seed=2)
    _assert_same(_weights(vae), expected)


def test_steps_only_the_parameters_it_is_given():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    pyro.param("a", a)
    pyro.param("b", b)
    optim = Adam({"lr": 0.1})
    for p in (a, b):
        p.grad = torch.ones_like(p)
    optim([a, b])
    before = b.detach().clone()
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    optim([a])
    torch.testing.assert_close(b.detach(), before, rtol=0, atol=0)
    assert b.grad is not None  # left as it was
    assert a.detach()[0] < 0.85  # two steps of about lr each


def test_gradient_clipping_is_refused_with_a_pointer():
    with pytest.raises(ConfigError, match="ClippedAdam"):
        Adam({"lr": 1e-3}, clip_args={"clip_norm": 1.0})


def test_gradients_are_released_after_the_step():
    vae = _vae()
    _train(vae, Adam({"lr": 1e-2}), 1)
    assert all(p.grad is None for p in vae.parameters())
