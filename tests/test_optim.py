"""pyro_ladder.optim.Adam: pyro.optim.Adam's update and state, in one step per call."""

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI

from pyro_ladder import ConfigError, LadderVAE, make_elbo
from pyro_ladder.optim import Adam


def _vae(batch_norm=True):
    torch.manual_seed(6)
    return LadderVAE(8, (4, 3), (12, 6), batch_norm=batch_norm).double()


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


def _assert_same(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


# the fused kernel (the default on CPUs) rounds its one expression differently from the
# per-tensor loop: after a few float64 steps the weights differ in the last bits only.
# Compared without batch norm: the biases in front of it have a gradient of pure rounding
# noise, which Adam scales up to steps of about lr whatever the last bits of the weights
FUSED_TOLERANCE = {"rtol": 1e-12, "atol": 1e-14}


@pytest.mark.parametrize("options", [{"lr": 1e-2}, {"lr": 1e-2, "betas": (0.8, 0.9)}])
@pytest.mark.parametrize("kernel", [{"fused": False}, {"foreach": True}])
def test_same_update_as_pyro_adam_bit_for_bit_without_the_fused_kernel(options, kernel):
    vae = _vae()
    _train(vae, pyro.optim.Adam(options), 4)
    expected = _weights(vae)
    vae = _vae()
    ours = _train(vae, Adam({**options, **kernel}), 4)
    _assert_same(_weights(vae), expected)
    (opt,) = ours._by_options.values()
    assert not opt.param_groups[0]["fused"] and opt.param_groups[0]["foreach"]


@pytest.mark.parametrize("options", [{"lr": 1e-2}, {"lr": 1e-2, "betas": (0.8, 0.9)}])
def test_fused_by_default_and_the_same_update_to_rounding(options):
    vae = _vae(batch_norm=False)
    _train(vae, pyro.optim.Adam(options), 4)
    expected = _weights(vae)
    vae = _vae(batch_norm=False)
    ours = _train(vae, Adam(options), 4)
    (opt,) = ours._by_options.values()
    assert opt.param_groups[0]["fused"]  # the fast kernel is what users get
    moved = _weights(vae)
    _assert_same(moved, expected, **FUSED_TOLERANCE)
    start = _weights(_vae(batch_norm=False))  # the steps moved the weights far beyond the tolerance
    assert max((moved[k] - start[k]).abs().max() for k in start if k.endswith("weight")) > 1e-3


def test_fused_update_in_float32_against_a_hand_computed_adam():
    """Two steps of the default kernel on float32 against Adam's formulas in float64."""
    torch.manual_seed(0)
    w0, grads = torch.randn(50), [torch.randn(50), torch.randn(50)]
    w = torch.nn.Parameter(w0.clone())
    pyro.clear_param_store()
    pyro.param("w", w)
    optim = Adam({"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-8})
    for g in grads:
        w.grad = g.clone()
        optim([w])
    m, v, expected = torch.zeros(50).double(), torch.zeros(50).double(), w0.double()
    for t, g in enumerate(grads, 1):
        m = 0.8 * m + 0.2 * g.double()
        v = 0.9 * v + 0.1 * g.double() ** 2
        expected = expected - 0.1 * (m / (1 - 0.8**t)) / ((v / (1 - 0.9**t)).sqrt() + 1e-8)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-6, atol=1e-6)


def test_per_parameter_options_from_a_callable():
    def options(name):
        return {"lr": 1e-1 if "likelihood" in name else 1e-3}

    vae = _vae(batch_norm=False)
    _train(vae, pyro.optim.Adam(options), 3)
    expected = _weights(vae)
    vae = _vae(batch_norm=False)
    ours = _train(vae, Adam(options), 3)
    _assert_same(_weights(vae), expected, **FUSED_TOLERANCE)
    assert len(ours._by_options) == 2  # one torch optimizer per distinct set of options


@pytest.mark.parametrize("first, second", [(Adam, pyro.optim.Adam), (pyro.optim.Adam, Adam)])
def test_state_moves_between_pyro_adam_and_ours(first, second):
    vae = _vae(batch_norm=False)
    _train(vae, Adam({"lr": 1e-2}), 4)
    expected = _weights(vae)
    vae = _vae(batch_norm=False)
    state = _train(vae, first({"lr": 1e-2}), 2).get_state()
    resumed = second({"lr": 1e-2})
    resumed.set_state(state)
    _train(vae, resumed, 2, first_seed=2)
    _assert_same(_weights(vae), expected, **FUSED_TOLERANCE)


def test_state_resumes_bit_for_bit_with_the_fused_kernel():
    vae = _vae()
    _train(vae, Adam({"lr": 1e-2}), 4)
    expected = _weights(vae)
    vae = _vae()
    state = _train(vae, Adam({"lr": 1e-2}), 2).get_state()
    resumed = Adam({"lr": 1e-2})
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


@pytest.mark.parametrize("kernel", [{}, {"fused": False}])
def test_a_parameter_without_gradient_in_a_later_step_moves_as_with_pyro_adam(kernel):
    """adversary3: ``b`` is registered every step but feeds the loss only in the first two.
    ``pyro.optim.Adam`` (with SVI's zeroed gradients) keeps stepping it with g = 0, so its
    momentum moves it on; the truth is a hand-written float64 Adam doing the same."""
    import math

    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO

    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    def model(use_b):
        a = pyro.param("a", torch.tensor(0.0, dtype=torch.float64))
        b = pyro.param("b", torch.tensor(0.0, dtype=torch.float64))
        loc = a + b if use_b else a + 0 * b.detach()  # b in the loss only when use_b
        with pyro.plate("d", 3):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(use_b):
        pass

    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    a = b = ma = va = mb = vb = 0.0
    for t in range(1, 7):  # the hand-written Adam: gradients of -log p(x)
        ga = -sum(xi - (a + b if t <= 2 else a) for xi in x.tolist())
        gb = ga if t <= 2 else 0.0
        ma, va = b1 * ma + (1 - b1) * ga, b2 * va + (1 - b2) * ga * ga
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb * gb
        a -= lr * (ma / (1 - b1**t)) / (math.sqrt(va / (1 - b2**t)) + eps)
        b -= lr * (mb / (1 - b1**t)) / (math.sqrt(vb / (1 - b2**t)) + eps)

    pyro.clear_param_store()
    svi = SVI(model, guide, Adam({"lr": lr, **kernel}), Trace_ELBO())
    for t in range(6):
        svi.step(t < 2)
    store = pyro.get_param_store()
    assert store["a"].item() == pytest.approx(a, rel=1e-12)
    assert store["b"].item() == pytest.approx(b, rel=1e-12)  # 0.19959 (frozen) against 0.43886
