"""make_elbo(name, compile=True): the whole step captured into one graph and compiled.

The captured graph must compute what the eager estimator computes on the same draws (loss,
every gradient, batch-norm statistics) step after step while the parameters move; refuse
what it cannot repeat (host reads of tensor values, Python state that changes between
calls); and capture anew when what it fixed changes (modes, non-tensor arguments, the
parameter store). Most tests run the captured graph uncompiled (``backend="eager"``), which
is the graph inductor compiles; one compiles it with inductor.
"""

import logging
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI
from torch import nn

from pyro_ladder import ConfigError, DataError, LadderVAE, fit, make_elbo
from pyro_ladder.elbo import ESTIMATORS, CompiledStep
from pyro_ladder.optim import Adam

EAGER = {"backend": "eager"}  # the captured graph, run without compiling it
DISCRETE = {"enum"}  # estimators whose step reads values on the host (refused, below)
# the DReG family and vimco refuse batch norm in training mode (elbo/coupling.py)
NO_BATCH_NORM = {"iwae-dreg", "miwae-dreg", "piwae-dreg", "rws-dreg", "vimco"}
SINGLE = {"elbo", "meanfield", "tracegraph", "stl", "elbo-condkl-sg"}
CAPTURED = [n for n in ESTIMATORS if not n.startswith("jit-") and n not in DISCRETE]


def _ladder(batch_norm=True):
    torch.manual_seed(0)
    return LadderVAE(10, (4, 3, 2), (12, 8, 6), batch_norm=batch_norm).double()


def _batches(n=3, rows=7, dim=10):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.rand(rows, dim, generator=g, dtype=torch.float64) < 0.4).double() for _ in range(n)
    ]


def _train(vae, elbo, batches, seed=3):
    """SVI with pyro_ladder's Adam over ``batches``: losses, then parameters and buffers."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 0.01}), elbo)
    losses = [svi.step(x) for x in batches]
    return losses, {k: v.clone() for k, v in vae.state_dict().items()}


def _same_training(make_vae, elbo_of, batches, rtol=1e-12):
    """Two identical models trained eagerly and captured: the same losses and states."""
    eager = _train(make_vae(), elbo_of(False), batches)
    elbo = elbo_of(EAGER)
    captured = _train(make_vae(), elbo, batches)
    assert isinstance(elbo, CompiledStep) and elbo.captures == 1
    assert captured[0] == pytest.approx(eager[0], rel=rtol, abs=rtol)
    for key, value in eager[1].items():
        torch.testing.assert_close(captured[1][key], value, rtol=rtol, atol=rtol, msg=key)
    return eager, captured


@pytest.mark.parametrize("name", CAPTURED)
def test_every_estimator_trains_captured_as_it_trains_eagerly(name):
    """Three SVI steps from the same seed: losses, weights after Adam and batch-norm
    statistics agree to float64 rounding, so the graph reads the live parameters and
    buffers at every step and draws the eager step's random numbers."""
    k = 1 if name in SINGLE else 3
    bn = name not in NO_BATCH_NORM
    eager, _ = _same_training(
        lambda: _ladder(bn), lambda c: make_elbo(name, k, compile=c), _batches()
    )
    assert len(set(eager[0])) == 3  # the losses move: the test compares moving numbers


def test_a_plain_pyro_pair_with_a_constrained_parameter_is_captured_exactly():
    """A pair written in plain Pyro: networks in closures registered with pyro.module, a
    positive pyro.param read through its constraint, batch norm in a closure. The graph
    finds the modules by running them and the parameter through the store."""

    def make():
        torch.manual_seed(2)
        enc = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 6))
        dec = nn.Sequential(nn.Linear(3, 10))
        enc.double(), dec.double()

        def model(x):
            pyro.module("dec", dec)
            s = pyro.param("s", torch.tensor(0.7, dtype=x.dtype), constraint=constraints.positive)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(3), s).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

        def guide(x):
            pyro.module("enc", enc)
            with pyro.plate("data", x.shape[0]):
                loc, log_scale = enc(x).chunk(2, -1)
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

        pair = nn.ModuleDict({"enc": enc, "dec": dec})
        pair.model, pair.guide = model, guide
        return pair

    for name, k in [("elbo", 1), ("iwae", 4)]:
        runs = []
        for compile in (False, EAGER):
            pair = make()
            pyro.clear_param_store()
            pyro.set_rng_seed(3)
            svi = SVI(
                pair.model, pair.guide, Adam({"lr": 0.05}), make_elbo(name, k, compile=compile)
            )
            losses = [svi.step(x) for x in _batches()]
            runs.append((losses, pyro.param("s").item(), pair.state_dict()))
        assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-12), name
        assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-12) and runs[0][1] != 0.7
        for key, value in runs[0][2].items():
            torch.testing.assert_close(runs[1][2][key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_differentiable_loss_hands_back_the_captured_gradients():
    vae = _ladder()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    grads = []
    for compile in (False, EAGER):
        vae.load_state_dict(state)
        vae.zero_grad(set_to_none=True)
        pyro.set_rng_seed(5)
        loss = make_elbo("iwae", 3, compile=compile).differentiable_loss(
            vae.model, vae.guide, _batches(1)[0]
        )
        (2 * loss).backward()  # an incoming gradient other than 1 scales them
        grads.append((loss.item(), {n: p.grad.clone() for n, p in vae.named_parameters()}))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-12)
    for key, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][key], g, rtol=1e-12, atol=1e-12, msg=key)


def test_data_checks_run_on_every_captured_call():
    """The graph cannot check values; the ladder's checks run eagerly on each call's data."""
    vae = _ladder()
    elbo = make_elbo("elbo", compile=EAGER)
    x = _batches(1)[0]
    elbo.loss_and_grads(vae.model, vae.guide, x)
    with pytest.raises(DataError, match="binary"):
        elbo.loss_and_grads(vae.model, vae.guide, x * 0.5)
    bad = x.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        elbo.loss_and_grads(vae.model, vae.guide, bad)
    assert elbo.captures == 1


def test_what_the_graph_fixed_changing_captures_anew():
    vae = _ladder()
    elbo = make_elbo("elbo", compile=EAGER)
    x = _batches(1)[0]
    elbo.loss_and_grads(vae.model, vae.guide, x)
    elbo.loss_and_grads(vae.model, vae.guide, _batches(2)[1])  # new values, same shapes
    assert elbo.captures == 1
    elbo.loss_and_grads(vae.model, vae.guide, x[:5])  # a new batch shape
    assert elbo.captures == 2
    vae.eval()  # batch norm on running statistics: another graph
    elbo.loss_and_grads(vae.model, vae.guide, x)
    assert elbo.captures == 3
    vae.train()
    elbo.loss_and_grads(vae.model, vae.guide, x)
    assert elbo.captures == 3
    pyro.clear_param_store()  # the graph's parameters are gone from the store: anew
    elbo.loss_and_grads(vae.model, vae.guide, x)
    assert elbo.captures == 4
    elbo.loss_and_grads(vae.model, vae.guide, x)
    assert elbo.captures == 4
    other = _ladder()  # another model: its own graph, its own parameters
    elbo.loss_and_grads(other.model, other.guide, x)
    assert elbo.captures == 5


def test_a_kl_weight_given_as_a_tensor_is_an_input_not_a_constant():
    """fit passes the warm-up's weight as a 0-dim tensor: one graph for every weight, and
    the gradients those of the eager step at each weight."""
    from pyro_ladder.warmup import with_kl_weight

    vae = _ladder()
    model, guide = with_kl_weight(vae.model), with_kl_weight(vae.guide)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    x = _batches(1)[0]
    elbo = make_elbo("iwae", 3, compile=EAGER)
    for beta in (0.0, 0.3, 1.0):
        results = []
        for e in (make_elbo("iwae", 3), elbo):
            vae.load_state_dict(state)
            vae.zero_grad(set_to_none=True)
            pyro.set_rng_seed(8)
            loss = e.loss_and_grads(model, guide, torch.tensor(beta).double(), x)
            results.append((loss, [p.grad.clone() for p in vae.parameters()]))
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-12), beta
        for a, b in zip(results[0][1], results[1][1], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert elbo.captures == 1


def test_a_host_read_in_the_pair_is_refused_naming_its_line():
    vae = _ladder()

    def model(x):
        if x.sum() > 0:  # a Python branch on a tensor's value
            return vae.model(x)
        return vae.model(x)

    with pytest.raises(ConfigError, match=r"test_captured\.py:\d+ \(model\) reads a tensor"):
        make_elbo("elbo", compile=EAGER).loss_and_grads(model, vae.guide, _batches(1)[0])


def test_the_enumerating_estimator_is_refused_by_name_of_its_read():
    vae = _ladder()
    with pytest.raises(ConfigError, match="compile='networks'"):
        make_elbo("enum", compile=EAGER).loss_and_grads(vae.model, vae.guide, _batches(1)[0])


def test_a_pair_whose_python_state_changes_between_calls_is_refused():
    """A computation that depends on a Python counter: the graph would fix one value. The
    check against the eager step at capture sees the difference."""
    vae = _ladder()
    calls = [0]

    def model(x):
        calls[0] += 1
        with poutine.scale(scale=float(calls[0])):
            vae.model(x)

    with pytest.raises(ConfigError, match="differs from the eager step"):
        make_elbo("elbo", compile=EAGER).loss_and_grads(model, vae.guide, _batches(1)[0])


def _fit_both(data, **options):
    """``fit`` eagerly and captured from the same start: [(losses, state_dict)] each."""
    runs = []
    for compile in (False, EAGER):
        pyro.clear_param_store()
        vae = _ladder()
        history = fit(
            vae.model, vae.guide, data, progress=False, compile=compile, seed=0, **options
        )
        runs.append(([r["loss"] for r in history], vae.state_dict()))
    return runs


def test_fit_with_compile_trains_as_eager_warm_up_included():
    runs = _fit_both(
        _batches(1, rows=24)[0], elbo="iwae", num_particles=3, epochs=3, warmup_epochs=2,
        batch_size=8,
    )  # fmt: skip
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-10)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][key], value, rtol=1e-10, atol=1e-10, msg=key)


def test_fit_says_once_that_its_first_step_compiles(caplog):
    """A compiling first step (half a minute on the paper network) is announced, in the log
    and the progress bar, once; settings that compile nothing are not announced."""
    from pyro_ladder.train import _compiles

    vae = _ladder()
    with caplog.at_level(logging.INFO, logger="pyro_ladder.train"):
        fit(
            vae.model, vae.guide, _batches(1, rows=16)[0], elbo="elbo", epochs=2,
            batch_size=8, compile={"backend": "aot_eager"}, progress=False, seed=0,
        )  # fmt: skip
    told = [r for r in caplog.records if "compiling the training step" in r.getMessage()]
    assert len(told) == 1
    assert all(_compiles(c) for c in (True, "step", "networks", {"mode": "default"}))
    assert not any(_compiles(c) for c in (False, "capture", EAGER))


def _inductor_runs(options):
    """Loss, gradients and buffers of the eager ``iwae`` step, then of the compiling and
    a compiled call of ``compile=options``, each from the same state and seed."""
    torch.manual_seed(0)
    vae = LadderVAE(10, (3, 2), (8, 6))  # float32, batch norm
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    elbo = make_elbo("iwae", 3, compile=options)
    results = []
    for e in (make_elbo("iwae", 3), elbo, elbo):  # the compiling call, then a compiled one
        vae.load_state_dict(state)
        vae.zero_grad(set_to_none=True)
        pyro.set_rng_seed(9)
        loss = e.loss_and_grads(vae.model, vae.guide, _batches(1)[0].float())
        grads = {n: p.grad.clone() for n, p in vae.named_parameters()}
        results.append((loss, grads, {n: b.clone() for n, b in vae.named_buffers()}))
    return results


def test_inductor_computes_the_eager_step_on_the_eager_draws():
    """The compiled graph (inductor's kernels) draws what the eager step draws, by
    default: the eager loss, gradients and batch-norm statistics to float32 rounding (the
    gradients to 1e-6 of the largest entry of any: the biases in front of batch norm have
    a zero gradient, rounding noise of 1e-7, which inductor's reordered sums change by
    1e-6). With inductor's own generator (``fallback_random`` off) the draws, and so the
    loss, differ: it is the default that makes them the eager ones."""
    (loss, grads, buffers), *compiled = _inductor_runs(True)
    for c_loss, c_grads, c_buffers in compiled:
        assert c_loss == pytest.approx(loss, rel=1e-5)
        scale = max(g.abs().max().item() for g in grads.values())
        for key, g in grads.items():
            torch.testing.assert_close(c_grads[key], g, rtol=1e-4, atol=1e-6 * scale, msg=key)
        for key, b in buffers.items():
            torch.testing.assert_close(c_buffers[key], b, rtol=1e-5, atol=1e-6, msg=key)
    (loss, _, _), *compiled = _inductor_runs({"options": {"fallback_random": False}})
    for c_loss, _, _ in compiled:
        assert abs(c_loss - loss) > 1e-3 * abs(loss)


def test_compile_options_keep_the_eager_draws_unless_told_otherwise():
    """``eager_draws``: inductor's ``fallback_random`` on by default, a mode turned into
    the settings torch.compile gives it (torch.compile takes one or the other), a user's
    setting kept, other backends untouched."""
    from torch._inductor import list_mode_options

    from pyro_ladder._compile import eager_draws

    assert eager_draws({}) == {"options": {"fallback_random": True}}
    assert eager_draws({"mode": "default"}) == {"options": {"fallback_random": True}}
    mode = "max-autotune-no-cudagraphs"
    assert eager_draws({"mode": mode, "fullgraph": True}) == {
        "fullgraph": True,
        "options": {**list_mode_options(mode), "fallback_random": True},
    }
    told = {"options": {"fallback_random": False, "max_autotune": True}}
    assert eager_draws(told) == told
    assert eager_draws({"backend": "eager"}) == {"backend": "eager"}
    assert eager_draws({"backend": "aot_eager", "mode": None}) == {
        "backend": "aot_eager",
        "mode": None,
    }


def test_handlers_around_the_call_are_part_of_the_key():
    """A handler's settings are fixed in the graph: another factor captures anew, and each
    factor's step equals the eager one under the same handler."""
    vae = _ladder()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    x = _batches(1)[0]
    elbo = make_elbo("elbo", compile=EAGER)
    for factor in (1.0, 0.25, 1.0):
        losses = []
        for e in (make_elbo("elbo"), elbo):
            vae.load_state_dict(state)
            pyro.set_rng_seed(4)
            with poutine.scale(scale=factor):
                losses.append(e.loss_and_grads(vae.model, vae.guide, x))
        assert losses[1] == pytest.approx(losses[0], rel=1e-12), factor
    assert elbo.captures == 2


def test_fit_with_free_bits_and_compile_trains_as_eager():
    runs = _fit_both(_batches(1, rows=16)[0], epochs=2, batch_size=8, free_bits=0.5)
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-10)


def test_a_pair_made_after_another_is_freed_gets_its_own_graph():
    """The key names the pair by identity; the graph keeps the pair's functions alive, so
    functions made after the first are dropped cannot take their identity (and their
    graph, which would step the old model's parameters)."""
    import gc
    import weakref

    elbo = make_elbo("elbo", compile=EAGER)
    x = _batches(1)[0]

    def train(vae, elbo):
        model, guide = (lambda x: vae.model(x)), (lambda x: vae.guide(x))
        pyro.set_rng_seed(0)
        SVI(model, guide, Adam({"lr": 0.01}), elbo).step(x)
        return weakref.ref(model)

    alive = train(_ladder(), elbo)
    gc.collect()
    assert alive() is not None  # held by the graph: its identity cannot be reused
    second = _ladder()
    before = {k: v.clone() for k, v in second.state_dict().items()}
    train(second, elbo)
    assert elbo.captures == 2
    moved = [k for k, v in second.state_dict().items() if not torch.equal(v, before[k])]
    assert any("weight" in k for k in moved)
    del elbo
    gc.collect()
    assert alive() is None  # and no longer than the estimator


# ------------------------------------------------- the fourth adversarial review's cases


def _both(run):
    """``run(compile)`` eagerly and captured: (truth, captured)."""
    return run(False), run(EAGER)


def _assert_same_numbers(truth, captured):
    for a, b in zip(truth, captured, strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        else:
            assert b == pytest.approx(a, rel=1e-12, abs=1e-12)


@pytest.mark.filterwarnings("ignore:.*was not registered in the param store")
def test_freezing_and_unfreezing_a_network_mid_training_is_followed():
    """requires_grad switched off (then on) for the guide after two steps: the graph,
    which fixed which parameters take a gradient, is captured anew each time."""

    def run(compile):
        vae = _ladder()
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        svi = SVI(vae.model, vae.guide, Adam({"lr": 0.01}), make_elbo("elbo", compile=compile))
        losses = []
        for i, x in enumerate(_batches(6)):
            if i in (2, 4):
                vae.inference.requires_grad_(i == 4)
            losses.append(svi.step(x))
        return [*losses, *vae.state_dict().values()]

    truth, captured = _both(run)
    _assert_same_numbers(truth, captured)


def test_a_network_the_pair_runs_without_registering_it_gets_its_gradient():
    """loss_and_grads leaves a gradient on every parameter the loss reaches, registered
    with Pyro or not (a training loop that steps it with its own optimizer needs it)."""
    extra = nn.Linear(10, 10).double()

    def model(x):
        vae.model(x)
        pyro.factor("extra", -1e-3 * extra(x).pow(2).sum())  # a network Pyro never hears of

    vae = _ladder()
    x = _batches(1)[0]
    grads = []
    for compile in (False, EAGER):
        extra.zero_grad(set_to_none=True)
        pyro.set_rng_seed(2)
        make_elbo("elbo", compile=compile).loss_and_grads(model, vae.guide, x)
        grads.append(extra.weight.grad)
    assert grads[0] is not None and grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "argument, match",
    [
        (lambda x: x.clone().requires_grad_(), "argument tensor requires grad"),
        (lambda x: object(), "tells them apart by value"),
    ],
)
def test_arguments_the_graph_cannot_serve_are_refused(argument, match):
    vae = _ladder()

    def model(x, extra):
        vae.model(x.detach())

    def guide(x, extra):
        vae.guide(x.detach())

    x = _batches(1)[0]
    with pytest.raises(ConfigError, match=match):
        make_elbo("elbo", compile=EAGER).loss_and_grads(model, guide, argument(x), x)


def test_state_the_graph_would_fix_is_refused():
    """A tensor attribute the pair reads (replaced each step, it would go unseen) and a
    NumPy draw (the graph would repeat the first one) are refused by name."""
    import numpy as np

    vae = _ladder()
    x = _batches(1)[0]
    holder = {"beta": torch.tensor(0.5, dtype=torch.float64)}

    def scaled(x):
        with poutine.scale(scale=holder["beta"]):
            vae.model(x)

    with pytest.raises(ConfigError, match="neither an argument"):
        make_elbo("elbo", compile=EAGER).loss_and_grads(scaled, vae.guide, x)

    def jittered(x):
        with poutine.scale(scale=1.0 + 0.1 * float(np.random.rand())):
            vae.model(x)

    with pytest.raises(ConfigError, match="NumPy's random generator"):
        make_elbo("elbo", compile=EAGER).loss_and_grads(jittered, vae.guide, x)


def test_a_changed_estimator_setting_captures_anew():
    """num_particles set on the wrapper reaches the estimator, and the graph follows."""

    def run(compile):
        vae = _ladder()
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        elbo = make_elbo("iwae", 2, compile=compile)
        svi = SVI(vae.model, vae.guide, Adam({"lr": 0.01}), elbo)
        losses = []
        for i, x in enumerate(_batches(4)):
            if i == 2:
                elbo.num_particles = 6
            losses.append(svi.step(x))
        return losses

    truth, captured = _both(run)
    _assert_same_numbers(truth, captured)


def test_pyro_validation_of_observed_values_runs_on_every_call():
    """A plain pair's Bernoulli observation: the graph cannot validate, so the support
    check runs eagerly on each call's data."""
    net = nn.Linear(2, 10).double()

    def model(x):
        pyro.module("net", net)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net(z)).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    elbo = make_elbo("elbo", compile=EAGER)
    x = _batches(1)[0]
    elbo.loss_and_grads(model, guide, x)
    with pytest.raises(ValueError, match="outside the support"):
        elbo.loss_and_grads(model, guide, x * 0.5)


def test_a_conditional_ladder_with_integer_labels_is_captured_and_checks_them():
    def make():
        torch.manual_seed(0)
        return LadderVAE(10, (3, 2), (8, 6), condition_dim=3).double()

    x, labels = _batches(1)[0], torch.tensor([0, 1, 2, 0, 1, 2, 0])
    results = []
    for compile in (False, EAGER):
        vae = make()
        pyro.set_rng_seed(1)
        elbo = make_elbo("elbo", compile=compile)
        results.append(elbo.loss_and_grads(vae.model, vae.guide, x, labels))
    assert results[1] == pytest.approx(results[0], rel=1e-12)
    with pytest.raises(DataError, match=r"class labels must lie in \[0, 3\)"):
        elbo.loss_and_grads(vae.model, vae.guide, x, labels + 1)


def test_no_gradient_mode_and_many_captures():
    """Under no_grad the estimator runs as it is (nothing to capture); a key that changes
    at every call warns, naming what changes."""
    vae = _ladder()
    x = _batches(1)[0]
    elbo = make_elbo("elbo", compile=EAGER)
    with torch.no_grad():
        value = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert not value.requires_grad and elbo.captures == 0
    with pytest.warns(RuntimeWarning, match="argument shapes, dtypes or devices changed"):
        for rows in range(2, 12):
            elbo.loss_and_grads(vae.model, vae.guide, _batches(1, rows=rows)[0])


def test_capture_names_the_uncompiled_graph_and_trains_as_eager():
    elbo = make_elbo("elbo", compile="capture")
    assert isinstance(elbo, CompiledStep) and elbo.options == {"backend": "eager"}
    truth = _train(_ladder(), make_elbo("elbo"), _batches(2))
    captured = _train(_ladder(), elbo, _batches(2))
    _assert_same_numbers(truth[0], captured[0])


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_the_convolutional_ladder_trains_captured_as_eagerly(inference):
    from pyro_ladder.conv import ConvLadderVAE

    def make():
        torch.manual_seed(0)
        return ConvLadderVAE(
            image_shape=(12, 12), channels=(6, 8), latent_channels=(2, 3), inference=inference
        ).double()

    batches = _batches(2, rows=6, dim=144)
    truth = _train(make(), make_elbo("iwae", 3), batches)
    captured = _train(make(), make_elbo("iwae", 3, compile="capture"), batches)
    _assert_same_numbers(truth[0], captured[0])
    for key, value in truth[1].items():
        torch.testing.assert_close(captured[1][key], value, rtol=1e-12, atol=1e-12, msg=key)


# ------------------------------------------------- the fifth adversarial review's cases


def test_capturing_leaves_distribution_validation_on():
    """torch.compile's first use switches torch.distributions' validation off for the
    process; a captured step puts it back."""
    vae = _ladder()
    make_elbo("elbo", compile="capture").loss_and_grads(vae.model, vae.guide, _batches(1)[0])
    with pytest.raises(ValueError, match="scale"):
        torch.distributions.Normal(0.0, -1.0)


def test_a_plain_setting_of_the_pair_object_is_followed():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae, self.beta = _ladder(), 1.0

        def model(self, x):
            with poutine.scale(scale=self.beta):
                self.vae.model(x)

        def guide(self, x):
            with poutine.scale(scale=self.beta):
                self.vae.guide(x)

    def run(compile):
        pair = Pair()
        pyro.set_rng_seed(1)
        elbo = make_elbo("elbo", compile=compile)
        losses = []
        for beta in (1.0, 0.5, 2.0):
            pair.beta = beta
            losses.append(elbo.loss_and_grads(pair.model, pair.guide, _batches(1)[0]))
        return losses

    truth, captured = _both(run)
    _assert_same_numbers(truth, captured)


def test_non_tensor_arguments_are_told_apart_by_type():
    vae = _ladder()

    def model(x, noise):
        with poutine.scale(scale=2.0 if noise is True else 1.0):
            vae.model(x)

    def guide(x, noise):
        vae.guide(x)

    elbo = make_elbo("elbo", compile="capture")
    x = _batches(1)[0]
    losses = [elbo.loss_and_grads(model, guide, x, v) for v in (1.0, True)]
    assert elbo.captures == 2 and losses[0] != losses[1]


def test_freezing_a_store_parameter_is_followed():
    vae = _ladder()

    def model(x):
        w = pyro.param("w", torch.tensor(0.1, dtype=x.dtype))
        with poutine.scale(scale=1.0 + w**2):
            vae.model(x)

    def run(compile):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        elbo = make_elbo("elbo", compile=compile)
        out = []
        for step in range(3):
            if step == 1:
                pyro.param("w").requires_grad_(False)
            for p in pyro.get_param_store().values():
                p.grad = None
            elbo.loss_and_grads(model, vae.guide, _batches(1)[0])
            w = pyro.param("w").unconstrained()
            out.append(None if w.grad is None else w.grad.item())
        return out

    truth, captured = _both(run)
    assert truth[1] is None and truth[0] is not None
    assert captured == truth


def test_the_probe_restores_replaced_and_lazy_buffers():
    """kept_buffers puts back a buffer a module replaced (out-of-place update) and leaves a
    lazy module's uninitialized buffers alone."""
    from pyro_ladder._util import kept_buffers

    class Averager(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("avg", torch.zeros(3))

        def forward(self, x):
            self.avg = 0.9 * self.avg + 0.1 * x.mean(0)
            return x

    avg, lazy = Averager(), nn.LazyBatchNorm1d()
    original = avg.avg
    with kept_buffers():
        avg(torch.ones(2, 3))
        lazy(torch.ones(4, 3))
    assert avg.avg is original and torch.equal(avg.avg, torch.zeros(3))


def test_dregs_first_call_moves_a_closure_networks_statistics_as_later_calls_do():
    """The dependence pass of parameter_roles runs every module it meets in evaluation
    mode: iwae-dreg's first call (which runs that pass) moves a closure network's batch
    norm as often as any later call, so a resumed run, whose fresh estimator runs it again,
    stays the uninterrupted one."""
    enc, dec = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4)).double(), nn.Linear(2, 10)
    dec.double()

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("data", x.shape[0]):
            h = enc(x)
            pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    elbo, counts = make_elbo("iwae-dreg", 3), []
    for x in _batches(2):
        elbo.loss_and_grads(model, guide, x)
        counts.append(int(enc[1].num_batches_tracked))
    assert counts[1] == 2 * counts[0]


def test_one_label_for_the_whole_batch_is_captured():
    def make():
        torch.manual_seed(0)
        return LadderVAE(10, (3, 2), (8, 6), condition_dim=3).double()

    for label in (2, torch.tensor(2)):
        results = []
        for compile in (False, "capture"):
            vae = make()
            pyro.set_rng_seed(1)
            elbo = make_elbo("elbo", compile=compile)
            results.append(elbo.loss_and_grads(vae.model, vae.guide, _batches(1)[0], label))
        assert results[1] == pytest.approx(results[0], rel=1e-12)
    with pytest.raises(DataError, match="class labels must lie in"):
        elbo.loss_and_grads(vae.model, vae.guide, _batches(1)[0], 3)


def test_free_bits_state_does_not_capture_anew_at_every_step():
    from pyro_ladder.freebits import FreeBits

    vae = _ladder()
    elbo = make_elbo("elbo", compile="capture")
    for x in _batches(3):
        with FreeBits(0.5):
            elbo.loss_and_grads(vae.model, vae.guide, x)
    assert elbo.captures == 1


def test_no_gradient_mode_serves_estimators_without_their_own_differentiable_loss():
    vae = _ladder()
    x = _batches(1)[0]
    with torch.no_grad():
        value = make_elbo("tracegraph", compile="capture").differentiable_loss(
            vae.model, vae.guide, x
        )
    assert torch.isfinite(value) and not value.requires_grad


class _SharedGradients(nn.Module):
    """A pair whose parameters get gradients that a graph may return as one tensor:
    ``a + b`` (the same gradient for both) and ``c.sum()`` (a broadcast, stride 0)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.1, 0.4], dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64))
        self.dec = nn.Linear(2, 2).double()

    def model(self, x):
        pyro.module("shared_dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.param("shared_a", self.a)
        pyro.param("shared_b", self.b)
        pyro.param("shared_c", self.c)
        with pyro.plate("data", x.shape[0]):
            loc = 0.5 * x + self.a + self.b + self.c.sum()
            pyro.sample("z", dist.Normal(loc, 0.7).to_event(1))


@pytest.mark.parametrize("name", ["elbo", "iwae"])
def test_captured_gradients_are_each_parameters_own(name):
    """Each parameter gets a .grad of its own, laid out like it, as eagerly: two steps
    accumulated without zeroing, then an in-place clip, give the eager numbers (before,
    a.grad was b.grad, so the second step and the clip hit both twice; c.grad had stride
    0 and the accumulation raised)."""
    grads = {}
    for compile in (False, EAGER):
        pyro.clear_param_store()
        torch.manual_seed(0)
        pair = _SharedGradients()
        x = torch.randn(4, 2, dtype=torch.float64)
        elbo = make_elbo(name, 3, max_plate_nesting=1, compile=compile)
        torch.manual_seed(1)
        for _ in range(2):
            elbo.loss_and_grads(pair.model, pair.guide, x)
        torch.nn.utils.clip_grad_norm_([pair.a, pair.b, pair.c], 0.1)
        grads[bool(compile)] = [p.grad.clone() for p in (pair.a, pair.b, pair.c)]
        assert pair.a.grad.data_ptr() != pair.b.grad.data_ptr()
        assert pair.c.grad.stride() == pair.c.stride()
    for eager, captured in zip(grads[False], grads[True], strict=True):
        assert torch.allclose(captured, eager, rtol=1e-10, atol=1e-12)


def test_a_pair_with_a_torchscript_module_is_captured_as_eagerly_or_refused_by_name():
    """kept_buffers (the capture's exploring pass) puts back TorchScript modules' buffers
    too (it crashed on their buffer dict with an AttributeError): two iwae steps are
    captured as eagerly, or the capture is refused naming the way out (the buffers of a
    scripted batch norm are no module's that ran, as the hooks see it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 deprecates TorchScript
        scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)))

    def model(x):
        pyro.module("scripted_dec", scripted)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            h = scripted(z.reshape(-1, 2)).reshape(*z.shape[:-1], 4)
            pyro.sample("x", dist.Normal(h[..., :3], 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("scripted_loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc + 0.1 * x[..., :2], 0.8).to_event(1))

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in scripted.state_dict().items()}
    results = []
    for compile in (False, EAGER):
        pyro.clear_param_store()
        scripted.load_state_dict(state)
        elbo = make_elbo("iwae", 3, max_plate_nesting=1, compile=compile)
        torch.manual_seed(1)
        try:
            losses = [elbo.loss_and_grads(model, guide, x) for _ in range(2)]
        except ConfigError as err:
            assert compile and "compile='networks'" in str(err)
            return
        results.append((losses, {k: v.clone() for k, v in scripted.state_dict().items()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for key, value in results[0][1].items():
        assert torch.allclose(results[1][1][key], value, rtol=1e-6, atol=1e-7), key


# the fixed-sample passes observe the data through a view the capture cannot place (older
# than this test, and not what it tests)
@pytest.mark.filterwarnings("ignore:compile=True. Pyro's support check")
@pytest.mark.parametrize(
    "name, options", [("iwae-dreg", {}), ("piwae", {}), ("rws", {"shared": "theta"})]
)
def test_a_split_estimator_with_an_unregistered_network_trains_captured_as_eagerly(name, options):
    """Such a pair has its parameter roles found at every eager call (a dependence pass with
    its own random draws): the capture must not record that pass, or every replayed step
    would draw its samples too and train on other draws than the eager step. Truth: eager,
    three steps with the same seed."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(compile):
        pyro.clear_param_store()
        torch.manual_seed(1)
        enc, dec = nn.Linear(3, 4).double(), nn.Linear(2, 3).double()

        def model(x):  # the decoder is never registered with Pyro
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(dec(z), 1.0).to_event(1), obs=x)

        def guide(x):
            pyro.module("unreg_enc", enc)
            with pyro.plate("data", x.shape[0]):
                h = enc(x)
                scale = nn.functional.softplus(h[..., 2:])
                pyro.sample("z", dist.Normal(h[..., :2], scale).to_event(1))

        params = [*enc.parameters(), *dec.parameters()]
        optimizer = torch.optim.Adam(params, lr=0.01)
        elbo = make_elbo(name, 4, max_plate_nesting=1, compile=compile, **options)
        pyro.set_rng_seed(9)
        losses = []
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            losses.append(elbo.loss_and_grads(model, guide, x))
            optimizer.step()
        return losses, [p.detach().clone() for p in params]

    (eager_losses, eager), (losses, captured) = run(False), run(EAGER)
    assert losses == pytest.approx(eager_losses, rel=1e-12)
    for a, b in zip(eager, captured, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
