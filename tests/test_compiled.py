"""make_elbo(name, compile="networks"): the networks compiled, Pyro eager; the values and
gradients those of the eager estimator on the same draws, batch-norm statistics included.
(The whole step captured, ``compile=True``, is tested in test_captured.py.)"""

import pyro
import pytest
import torch

from pyro_ladder import ConfigError, LadderVAE, fit, make_elbo
from pyro_ladder.elbo import CompiledNetworks

ESTIMATORS = [("elbo", 1), ("iwae", 5), ("iwae-dreg", 5)]


def _vae(**kwargs):
    torch.manual_seed(0)
    return LadderVAE(12, (5, 4, 3), (16, 10, 8), **kwargs)  # float32, batch norm on


def _x():
    torch.manual_seed(1)
    return (torch.rand(9, 12) < 0.4).float()  # a tiny batch: batch norm in training mode


def _step(vae, state, name, k, compile):
    """Loss, gradients and buffers after one estimator call from ``state``, seed 7."""
    vae.load_state_dict(state)
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(7)
    elbo = make_elbo(name, k, max_plate_nesting=1, compile=compile)
    loss = elbo.loss_and_grads(vae.model, vae.guide, _x())
    grads = {n: p.grad.clone() for n, p in vae.named_parameters()}
    return loss, grads, {n: b.clone() for n, b in vae.named_buffers()}


def _assert_same(compile, rtol, atol, estimators=ESTIMATORS):
    for name, k in estimators:
        # iwae-dreg refuses batch norm in training mode (elbo/coupling.py); the others keep
        # it, so the running statistics are compared too
        vae = _vae(batch_norm=name != "iwae-dreg")
        state = {n: t.clone() for n, t in vae.state_dict().items()}
        loss, grads, buffers = _step(vae, state, name, k, False)
        c_loss, c_grads, c_buffers = _step(vae, state, name, k, compile)
        assert c_loss == pytest.approx(loss, rel=rtol), name
        for key in grads:
            scale = grads[key].abs().max().item()
            torch.testing.assert_close(
                c_grads[key], grads[key], rtol=rtol, atol=atol * scale, msg=f"{name} {key}"
            )
        for key in buffers:
            torch.testing.assert_close(c_buffers[key], buffers[key], rtol=rtol, atol=atol)


def test_compiled_graphs_give_the_eager_dreg_values_and_gradients():
    """The compiled graphs (dynamo's capture and AOT autograd's forward and backward, run
    without inductor's kernels) give the eager numbers for the estimator that asks most of
    them: iwae-dreg runs K particles through the networks, two backward passes through one
    graph, and a pass with frozen parameters."""
    _assert_same({"kind": "networks", "backend": "aot_eager"}, 1e-6, 1e-6, [("iwae-dreg", 5)])


@pytest.mark.slow
def test_compiled_graphs_give_the_eager_values_and_gradients():
    """As above for elbo and iwae (batch norm in training mode: the running statistics
    too) and iwae-dreg (about 40 s on 2 busy cores)."""
    _assert_same({"kind": "networks", "backend": "aot_eager"}, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_inductor_gives_the_eager_values_and_gradients_to_rounding():
    """The default compiler (inductor: fused C++ kernels; minutes to compile on 2 cores)
    reorders float32 arithmetic: the same numbers to 1e-6 relative to each gradient's
    largest entry (measured: about 2e-7 on this network)."""
    _assert_same("networks", rtol=1e-5, atol=1e-6)


def test_networks_stay_eager_outside_the_estimator():
    """Only the estimator's calls run compiled: the modules, their state_dict and sampling
    are untouched."""
    vae = _vae()
    keys = set(vae.state_dict())
    elbo = make_elbo("elbo", compile={"kind": "networks", "backend": "aot_eager"})
    assert isinstance(elbo, CompiledNetworks) and elbo.num_particles == 1
    elbo.loss(vae.model, vae.guide, _x())
    assert set(vae.state_dict()) == keys
    assert not any("compiled" in type(m).__name__.lower() for m in vae.modules())


def test_compiling_leaves_distribution_validation_as_it_was():
    """torch.compile's first use turns torch.distributions' validation off for the whole
    process; Pyro's validation (and fit's divergence checks) rest on it."""
    vae = _vae()
    make_elbo("elbo", compile={"kind": "networks", "backend": "eager"}).loss(
        vae.model, vae.guide, _x()
    )
    assert (
        torch.distributions.Distribution._validate_args == pyro.infer.util.is_validation_enabled()
    )
    with pytest.raises(ValueError, match="scale"):
        torch.distributions.Normal(0.0, -1.0)


def test_fit_with_compile_trains_as_eager():
    data = (torch.rand(24, 12, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    runs = []
    # dynamo's capture: the cheapest compile
    for compile in (False, {"kind": "networks", "backend": "eager"}):
        pyro.clear_param_store()
        vae = _vae()
        history = fit(
            vae.model, vae.guide, data, epochs=2, batch_size=8, progress=False, compile=compile
        )
        runs.append(([r["loss"] for r in history], vae.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "name, compile, match",
    [
        ("elbo", "yes", "compile must be True .* 'step', 'capture'"),
        ("elbo", 1, "compile must be True .* 'step', 'capture'"),
        ("elbo", {"kind": "graph"}, "'kind' must be 'step' or 'networks'"),
        ("jit-elbo", True, "use 'elbo' with compile=True"),
    ],
)
def test_bad_compile_options_are_refused(name, compile, match):
    with pytest.raises(ConfigError, match=match):
        make_elbo(name, compile=compile)


def test_fit_refuses_compile_with_an_elbo_object():
    vae = _vae()
    with pytest.raises(ConfigError, match="CompiledStep"):
        fit(
            vae.model,
            vae.guide,
            _x(),
            elbo=make_elbo("elbo"),
            compile=True,
            batch_size=3,
            progress=False,
        )
