"""Device and dtype follow the model and the data: mistakes caught on a CPU-only machine.

Every case builds a pair and its data first, then runs one operation (each estimator's
``loss_and_grads`` and ``differentiable_loss``, ``evaluate``, every diagnostic, ``sample``,
``reconstruct``, a ``fit`` with warm-up, dynamic binarization and a monitor, the toy
pairs, the example pair) under a *placement* that makes a tensor created on torch's
default device or dtype show:

* ``float64``: model and data in float64, torch's default dtype float32. A stray float32
  tensor fails where it meets the data in a matrix product, and every result and
  gradient must come back float64.
* ``float32-under-float64``: model and data in float32 while the default dtype is
  float64. A stray tensor of the default dtype then promotes whatever it touches to
  float64, even in the elementwise arithmetic where the first placement would silently
  promote it away, so the check that results and gradients are float32 catches it.
* ``stray-device``: model and data on the CPU while torch's default device is ``meta``
  (``torch.set_default_device``). A factory call without ``device=`` (``torch.zeros(n)``,
  ``torch.randperm(n)``...) makes a meta tensor, which refuses to mix with the CPU data
  ("Tensor on device meta is not on the expected device cpu"), and every result must be
  on the CPU. It is a GPU run (model on ``cuda``, default device ``cpu``) with the roles
  swapped. We chose it over putting the model itself on ``meta`` because the values stay
  real: the data checks and the loss values that Pyro's estimators read with ``.item()``
  work, so every public function runs unchanged. It is stricter than CUDA, which lets a
  0-dim CPU tensor mix with its tensors.

``PYRO_LADDER_TEST_DEVICE=cuda`` (or ``cuda:1``) adds the real device: model and data
there, results checked to stay there (``benchmarks/gpu_check.sh`` runs this file so).
"""

import contextlib
import copy
import importlib.util
import math
import os
from pathlib import Path

import pyro
import pytest
import torch

from pyro_ladder import ESTIMATORS, LadderVAE, diagnostics, evaluate, fit, make_elbo
from pyro_ladder import device as placement
from pyro_ladder.elbo.surrogate import differentiable_loss
from pyro_ladder.errors import ConfigError, DataError, TrainingError
from pyro_ladder.toy import DiscreteToyPair, GaussianToyPair, ToyHierarchy

DEVICE = os.environ.get("PYRO_LADDER_TEST_DEVICE")
PLACEMENTS = ["float64", "float32-under-float64", "stray-device"] + ([DEVICE] if DEVICE else [])
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_pair.py"
CONV_SMALL = dict(image_shape=(12, 12), channels=(6, 8), latent_channels=(2, 3))


def _where(placement):
    """``(device, dtype)`` of the model and data under ``placement``."""
    if placement == "float64":
        return torch.device("cpu"), torch.float64
    if placement in ("float32-under-float64", "stray-device"):
        return torch.device("cpu"), torch.float32
    return torch.device(placement), torch.float32


@contextlib.contextmanager
def _strict(placement):
    """torch's defaults set so that a tensor made on them cannot pass unnoticed."""
    dtype, device = torch.get_default_dtype(), None
    try:
        if placement == "float64":
            torch.set_default_dtype(torch.float32)
        elif placement == "float32-under-float64":
            torch.set_default_dtype(torch.float64)
        elif placement == "stray-device":
            torch.set_default_device("meta")
            device = "cpu"
        yield
    finally:
        torch.set_default_dtype(dtype)
        if device is not None:
            torch.set_default_device(device)


def _check(value, placement, where=""):
    """Every floating tensor in ``value`` (nested dicts, lists, tuples) is on the
    placement's device and dtype; integer tensors on its device."""
    device, dtype = _where(placement)
    if isinstance(value, torch.Tensor):
        same = value.device.type == device.type and device.index in (None, value.device.index)
        assert same, f"{where}: on {value.device}, not {device}"  # "cuda" means "cuda:0" too
        if value.is_floating_point():
            assert value.dtype == dtype, f"{where}: {value.dtype}, not {dtype}"
    elif isinstance(value, dict):
        for k, v in value.items():
            _check(v, placement, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check(v, placement, f"{where}[{i}]")


def _check_grads(module, placement):
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert grads, "no parameter got a gradient"
    _check(grads, placement, "grad")
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


def _ladder(
    placement, condition_dim=0, inference="top-down", likelihood="bernoulli", batch_norm=True
):
    """A small ladder, with batch norm (training mode) by default, and data ``(6, 10)``,
    binary for the Bernoulli likelihood."""
    device, dtype = _where(placement)
    torch.manual_seed(0)
    vae = LadderVAE(
        10, (3, 2), (8, 6), likelihood, inference, batch_norm, condition_dim=condition_dim
    )
    x = torch.rand(6, 10)
    x = x.round() if likelihood == "bernoulli" else x
    return vae.to(device, dtype), x.to(device, dtype)


ESTIMATOR_NAMES = sorted(ESTIMATORS)


def _refuses_batch_norm(elbo, vae) -> bool:
    try:
        getattr(elbo, "check_pair", lambda model, guide: None)(vae.model, vae.guide)
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_every_estimator_steps_on_the_placement(name, placement):
    if placement == "stray-device" and name.startswith("jit-"):
        pytest.skip(
            "under the JIT, Pyro's plate makes its scale a 0-dim tensor on the default "
            "device (torch.tensor(1.0)): CUDA accepts a 0-dim CPU tensor, meta does not"
        )
    vae, x = _ladder(placement)
    elbo = make_elbo(name, 2)
    if _refuses_batch_norm(elbo, vae):  # the DReG family: batch norm couples particles
        vae, x = _ladder(placement, batch_norm=False)
    with _strict(placement):
        loss = elbo.loss_and_grads(vae.model, vae.guide, x)
    assert math.isfinite(loss)
    _check_grads(vae, placement)
    vae.zero_grad()
    with _strict(placement):
        value = differentiable_loss(elbo, vae.model, vae.guide, x)
        value.backward()
    _check(value, placement, "differentiable_loss")
    _check_grads(vae, placement)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_evaluate_sample_and_reconstruct_stay_on_the_placement(inference, placement):
    vae, x = _ladder(placement, inference=inference)
    with _strict(placement):
        result = evaluate(vae.model, vae.guide, x, num_samples=6, iwae_k=(2, 3), batch_size=4)
        samples, recon = vae.sample(3), vae.reconstruct(x)
    _check(result, placement, "evaluate")
    assert torch.isfinite(result["log_likelihood"]).all()
    _check([samples, recon], placement, "sample/reconstruct")
    assert samples.shape == (3, 10) and recon.shape == (6, 10)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_gaussian_likelihood_stays_on_the_placement(placement):
    vae, x = _ladder(placement, likelihood="gaussian")
    with _strict(placement):
        loss = make_elbo("iwae", 2).loss_and_grads(vae.model, vae.guide, x)
        result = evaluate(vae.model, vae.guide, x, num_samples=4)
        drawn = vae.sample(3), vae.reconstruct(x)
    assert math.isfinite(loss)
    _check_grads(vae, placement)
    _check([result, drawn], placement, "gaussian")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_conditional_model_stays_on_the_placement(placement):
    vae, x = _ladder(placement, condition_dim=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=x.device)
    with _strict(placement):
        loss = make_elbo("iwae", 2).loss_and_grads(vae.model, vae.guide, x, labels)
        samples = vae.sample(4, c=1), vae.sample(3, labels[:3])
        result = evaluate(vae.model, vae.guide, x, labels, num_samples=4)
    assert math.isfinite(loss)
    _check_grads(vae, placement)
    _check([samples, result], placement, "conditional")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_diagnostic_stays_on_the_placement(placement):
    vae, x = _ladder(placement)
    model, guide = vae.model, vae.guide
    with _strict(placement):
        snr = diagnostics.gradient_snr(model, guide, make_elbo("iwae", 2), x, num_draws=3)
        units = diagnostics.active_units(model, guide, x, num_samples=2)
        mi = diagnostics.mutual_information(guide, x, num_samples=2)
        kl = diagnostics.kl_per_unit(model, guide, x, num_samples=2)
        ess = diagnostics.effective_sample_size(model, guide, x, num_samples=4)
    assert all(math.isfinite(snr[g]["aggregate"]) for g in ("guide", "model", "shared"))
    assert set(mi) == {"z1", "z2"} and all(math.isfinite(v) for v in mi.values())
    _check([units, kl, ess], placement, "diagnostics")


def _torch_adam_steps_on_the_default_device() -> bool:
    """Whether this torch's own Adam makes its step counters on the default device (torch
    2.11 does; 2.14 does not): then the stray-device placement cannot run an optimizer
    step, whatever our code does."""
    p = torch.nn.Parameter(torch.zeros(1, device="cpu"))
    p.grad = torch.zeros(1, device="cpu")
    opt = torch.optim.Adam([p], foreach=True)
    torch.set_default_device("meta")
    try:
        opt.step()
        return False
    except RuntimeError:
        return True
    finally:
        torch.set_default_device(None)


def _skip_if_torch_adam_cannot(placement):
    if placement == "stray-device" and _torch_adam_steps_on_the_default_device():
        pytest.skip("this torch's Adam makes its step counters on the default device (meta)")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fit_with_warm_up_binarization_and_monitor_stays_on_the_placement(placement):
    _skip_if_torch_adam_cannot(placement)
    vae, x = _ladder(placement)
    grey = torch.rand(8, 10, device=x.device, dtype=x.dtype)  # binarized anew each epoch
    states = []
    with _strict(placement):
        history = fit(
            vae.model,
            vae.guide,
            grey,
            elbo="iwae",
            num_particles=2,
            epochs=2,
            batch_size=4,
            warmup_epochs=2,
            binarize=True,
            monitor=x,
            progress=False,
            checkpoint=states.append,
        )
    assert [r["kl_weight"] for r in history] == [0.0, 0.5]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["monitor_elbo"]) for r in history)
    # Adam's moments follow the parameters (its step count is torch's own CPU scalar)
    moments = [
        {k: v for k, v in saved["state"][0].items() if k != "step"}
        for saved in states[-1]["optimizer"].values()
    ]
    assert len(moments) == len(list(vae.parameters()))
    _check([dict(vae.named_parameters()), moments], placement, "fit")


def _toy_inputs(placement, n=30):
    device, dtype = _where(placement)
    data = ToyHierarchy().dataset(n, 2, seed=0)
    return data.train_inputs.to(device, dtype), data.train.c.to(device)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    "kind, names", [("gaussian", ["elbo", "iwae"]), ("discrete", ["tracegraph", "enum"])]
)
def test_the_toy_pairs_stay_on_the_placement(kind, names, placement):
    device, dtype = _where(placement)
    inputs, c = _toy_inputs(placement)
    torch.manual_seed(0)
    if kind == "gaussian":
        pair = GaussianToyPair().to(device, dtype)
    else:
        pair = DiscreteToyPair(baseline="net").to(device, dtype)
        pair.init_emission(inputs[:, :2])
    for name in names:
        with _strict(placement):
            loss = make_elbo(name).loss_and_grads(pair.model, pair.guide, inputs)
        assert math.isfinite(loss), name
        _check_grads(pair, placement)
        pair.zero_grad()
    with _strict(placement):
        drawn = pair.generate(c)
        result = evaluate(pair.model, pair.guide, inputs, num_samples=4)
    _check([drawn, result], placement, "toy")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_example_pair_stays_on_the_placement(placement):
    spec = importlib.util.spec_from_file_location("custom_pair", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    device, dtype = _where(placement)
    torch.manual_seed(0)
    vae = example.MixturePriorVAE(10, name=f"mix-device-{placement}").to(device, dtype)
    x = torch.rand(6, 10).round().to(device, dtype)
    with _strict(placement):
        loss = make_elbo("iwae-dreg", 2).loss_and_grads(vae.model, vae.guide, x)
        result = evaluate(vae.model, vae.guide, x, num_samples=4)
        report = example.diagnose(vae, x, particles=2)
    assert math.isfinite(loss)
    _check([result, report["active_units"], report["kl_per_unit"]], placement, "example")


def test_the_placements_catch_a_stray_tensor():
    """The guards themselves: a tensor made without ``device=`` fails to mix with the data
    under ``stray-device``, and one made without ``dtype=`` turns a float32 result into
    float64 under ``float32-under-float64``, which the dtype check refuses."""
    _, x = _ladder("stray-device")
    with _strict("stray-device"), pytest.raises(RuntimeError, match="device"):
        x + torch.zeros(x.shape[-1])
    with _strict("float32-under-float64"):
        stray = x + torch.linspace(0, 1, x.shape[-1])
    with pytest.raises(AssertionError, match="float64"):
        _check(stray, "float32-under-float64")


# ------------------------------------------------------------------ fit and evaluate's device


class _TensorLossSVI:
    """Stands in for ``SVI``: its steps return the loss as a tensor (as a step that never
    reads it on the host would), from ``losses``; records how many were still unread."""

    def __init__(self, losses, run_ref):
        self.losses, self.run_ref, self.unread = iter(losses), run_ref, []
        self.optim = type("Optim", (), {"get_state": lambda self: {}})()

    def step(self, batch):
        self.unread.append(len(self.run_ref[0].pending))
        return torch.tensor(next(self.losses), dtype=torch.float64)


def _tensor_run(losses, sync_every, checkpoint_every, saved):
    from pyro_ladder.train import _Run

    ref = []
    svi = _TensorLossSVI(losses, ref)
    options = {"batch_size": 2, "binarize": False, "warmup_epochs": 0, "free_bits": 0.0}
    run = _Run(
        svi, torch.zeros(2 * len(losses), 3), options, (), {}, saved.append, checkpoint_every
    )
    run.sync_every = sync_every
    ref.append(run)
    return run, svi


def test_tensor_losses_are_read_every_sync_every_steps():
    losses = [float(v) for v in range(1, 13)]  # 12 steps of 2 rows
    run, svi = _tensor_run(losses, sync_every=5, checkpoint_every=None, saved=[])
    history = run.train(1, None, False, None, None)
    # unread losses before each step: 0..4, then read at step 5, 0..4, read at 10, 0, 1
    assert svi.unread == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert history[0]["loss"] == sum(losses) / 24  # nats per row, every step counted once


def test_a_non_finite_tensor_loss_stops_at_the_next_read_naming_its_step():
    losses = [1.0] * 6 + [float("nan")] + [1.0] * 5
    saved = []
    run, svi = _tensor_run(losses, sync_every=5, checkpoint_every=3, saved=saved)
    with pytest.raises(TrainingError, match=r"nan at epoch 1, step 7"):
        run.train(1, None, False, None, None)
    assert len(svi.unread) == 9  # stopped at the checkpoint due after step 9, the next read
    # the state after step 6 was saved; the one due after step 9 (past the NaN) was not
    assert [s["position"]["step"] for s in saved] == [0, 3, 6]


def test_fit_refuses_data_of_another_dtype_than_the_model_before_training():
    vae, x = _ladder("float64")
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(DataError, match=r"float32 but the model's parameters are torch.float64"):
        fit(vae.model, vae.guide, x.float(), epochs=1, batch_size=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


def test_a_device_argument_moves_the_pair_and_names_are_checked():
    vae, x = _ladder("stray-device")
    assert placement.resolve(None, vae.model, vae.guide, x.to("meta")) == torch.device("cpu")
    assert placement.resolve("meta", vae.model, vae.guide, x) == torch.device("meta")
    assert all(p.device.type == "meta" for p in vae.parameters())
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        fit(vae.model, vae.guide, x, batch_size=3, device="gpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            evaluate(vae.model, vae.guide, x, device="cuda")
    with pytest.raises(ConfigError, match="sync_every"):
        fit(vae.model, vae.guide, x, batch_size=3, sync_every=0, progress=False)


def test_evaluate_picks_the_cpu_pass_size_by_default():
    vae, x = _ladder("float64")
    pyro.set_rng_seed(3)
    default = evaluate(vae.model, vae.guide, x, num_samples=1500, batch_size=6)
    pyro.set_rng_seed(3)
    cpu = evaluate(vae.model, vae.guide, x, num_samples=1500, batch_size=6, max_rows=4096)
    pyro.set_rng_seed(3)
    other = evaluate(vae.model, vae.guide, x, num_samples=1500, batch_size=6, max_rows=2**16)
    assert torch.equal(default["log_likelihood"], cpu["log_likelihood"])
    assert not torch.equal(default["log_likelihood"], other["log_likelihood"])  # other passes


@pytest.mark.skipif(not DEVICE, reason="needs PYRO_LADDER_TEST_DEVICE (e.g. cuda)")
@pytest.mark.parametrize("fits", [True, False])
def test_fit_and_evaluate_follow_the_model_to_the_device(fits, monkeypatch):
    """Model on the device, data on the host: fit moves the set once (or, when it does
    not fit, each batch) and evaluate each batch; the results stay on the device."""
    if not fits:
        monkeypatch.setattr(placement, "FIT_FRACTION", 0.0)
    vae, _ = _ladder(DEVICE)
    grey = torch.rand(40, 10)
    states = []
    history = fit(
        vae.model,
        vae.guide,
        grey,
        elbo="iwae",
        num_particles=2,
        epochs=2,
        batch_size=8,
        binarize=True,
        progress=False,
        checkpoint=states.append,
        sync_every=3,
    )
    assert all(math.isfinite(r["loss"]) for r in history)
    assert "cuda" in states[-1]["rng"] if DEVICE.startswith("cuda") else True
    result = evaluate(vae.model, vae.guide, grey.round(), num_samples=50)
    _check(result, DEVICE, "evaluate")
    _check(dict(vae.named_parameters()), DEVICE, "fit")


@pytest.mark.skipif(not DEVICE, reason="needs PYRO_LADDER_TEST_DEVICE (e.g. cuda)")
def test_a_run_on_the_device_resumes_mid_epoch_with_the_same_draws():
    """The binarization and Pyro's samples draw on the device: its generator's state is
    saved and restored, so the resumed run redraws the same numbers (to float rounding:
    GPU kernels need not be bitwise reproducible)."""
    grey = torch.rand(40, 10)
    options = dict(
        epochs=2,
        batch_size=8,
        lr=1e-2,
        binarize=True,
        seed=3,
        progress=False,
        checkpoint_every=2,
        device=DEVICE,
    )
    saves = []

    def train(vae, resume=None):
        def save(state):
            saves.append((copy.deepcopy(state), copy.deepcopy(vae.state_dict())))

        return fit(vae.model, vae.guide, grey, **options, checkpoint=save, resume=resume)

    vae, _ = _ladder(DEVICE)
    history = train(vae)
    final = copy.deepcopy(vae.state_dict())
    ((state, weights),) = [
        s for s in saves if (s[0]["position"]["epoch"], s[0]["position"]["step"]) == (1, 2)
    ]
    vae.load_state_dict(weights)  # the same pair: its parameter names key the optimizer's state
    resumed = train(vae, resume=state)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in history], rel=1e-5)
    for name, value in vae.state_dict().items():
        assert torch.allclose(value, final[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_conv_ladder_and_free_bits_stay_on_the_placement(placement):
    from pyro_ladder.conv import ConvLadderVAE

    _skip_if_torch_adam_cannot(placement)
    device, dtype = _where(placement)
    torch.manual_seed(3)
    vae = ConvLadderVAE(**CONV_SMALL).to(device, dtype)
    x = torch.rand(4, 144).round().to(device, dtype)
    with _strict(placement):
        loss = make_elbo("iwae", 2).loss_and_grads(vae.model, vae.guide, x)
        result = evaluate(vae.model, vae.guide, x, num_samples=4)
        drawn = vae.sample(2), vae.reconstruct(x)
        history = fit(
            vae.model, vae.guide, x, epochs=1, batch_size=2, free_bits=0.5, progress=False
        )
    assert math.isfinite(loss) and math.isfinite(history[0]["loss"])
    _check([result, drawn, dict(vae.named_parameters())], placement, "conv")
