import math

import pyro
import pytest
import torch

from pyro_ladder import ConfigError, LadderVAE, TrainingError, fit


def _grey(n=60, d=6):
    torch.manual_seed(0)
    return torch.rand(n, d)


def test_fit_lowers_the_loss_and_returns_a_history():
    x = _grey().round()
    vae = LadderVAE(6, (3, 2), (16, 8))
    history = fit(vae.model, vae.guide, x, epochs=15, batch_size=20, lr=1e-2, progress=False,
                  monitor=x[:20])
    assert [r["epoch"] for r in history] == list(range(1, 16))
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert set(history[0]) >= {"loss", "kl_weight", "seconds", "monitor_elbo", "kl_z1", "kl_z2"}


def test_dynamic_binarization_trains_on_grey_data():
    vae = LadderVAE(6, (3,), (8,))
    history = fit(vae.model, vae.guide, _grey(), epochs=2, batch_size=20, binarize=True,
                  progress=False)
    assert len(history) == 2 and math.isfinite(history[-1]["loss"])


def test_same_seed_same_history():
    losses = []
    for _ in range(2):
        torch.manual_seed(5)  # same initial weights
        vae = LadderVAE(6, (3, 2), (8, 4))
        history = fit(vae.model, vae.guide, _grey(), epochs=3, batch_size=20, binarize=True,
                      seed=11, progress=False)
        losses.append([r["loss"] for r in history])
    assert losses[0] == losses[1]


def test_non_finite_loss_stops_training_with_the_step():
    vae = LadderVAE(6, (3,), (8,), batch_norm=False)
    with torch.no_grad():
        vae.generative.likelihood.logits.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="epoch 1, step 1") as caught:
        fit(vae.model, vae.guide, _grey().round(), epochs=1, batch_size=20, progress=False)
    assert "argument `lr`" in str(caught.value) and "--" not in str(caught.value)


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
@pytest.mark.parametrize("elbo", ["elbo", "iwae"])
@pytest.mark.parametrize("where", ["guide", "prior"])
def test_a_nan_in_a_latent_layer_stops_training_with_the_step(inference, elbo, where):
    """The ladder's Gaussians skip torch's argument checks (layers.gaussian): a NaN in a
    latent layer's network must still stop training at that step, through the loss."""
    vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=False, inference=inference)
    nets = vae.generative.priors if where == "prior" else vae.inference
    with torch.no_grad():
        next(nets.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="epoch 1, step 1"):
        fit(vae.model, vae.guide, _grey().round(), epochs=1, batch_size=20, progress=False,
            elbo=elbo, num_particles=2 if elbo == "iwae" else 1)


def test_an_invalid_value_with_finite_parameters_is_not_called_a_divergence():
    import pyro.distributions as dist

    def model(x):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Bernoulli(logits=loc), obs=x)  # x = 2: outside {0, 1}

    def guide(x):
        pass

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="support") as caught:
        fit(model, guide, torch.full((20,), 2.0), epochs=1, batch_size=20, progress=False)
    assert not isinstance(caught.value, TrainingError)


def test_library_messages_name_arguments_not_flags():
    vae = LadderVAE(6, (3,), (8,))
    with pytest.raises(ConfigError, match="argument `batch_size`") as caught:
        fit(vae.model, vae.guide, _grey().round(), batch_size=100, progress=False)
    assert "--" not in str(caught.value)


def test_one_registry_per_concept():
    from pyro_ladder import config, guide, likelihoods

    assert config.LIKELIHOODS is likelihoods.LIKELIHOODS
    assert set(config.INFERENCES) == set(guide.INFERENCE)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=100), "exceeds the 60 training rows"),
        (dict(batch_size=0), "batch_size"),
        (dict(epochs=0), "epochs"),
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(warmup_epochs=-2), "warmup_epochs"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(elbo="nope"), "unknown estimator"),
    ],
)
def test_bad_fit_options(kwargs, message):
    vae = LadderVAE(6, (3,), (8,))
    with pytest.raises(ConfigError, match=message):
        fit(vae.model, vae.guide, _grey().round(), progress=False, **{"batch_size": 20, **kwargs})


def test_empty_data_is_refused():
    vae = LadderVAE(6, (3,), (8,))
    with pytest.raises(ConfigError, match="empty"):
        fit(vae.model, vae.guide, torch.zeros(0, 6), progress=False)


def test_tensorboard_logging_writes_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vae = LadderVAE(6, (3, 2), (8, 4))
    x = _grey().round()
    fit(vae.model, vae.guide, x, epochs=3, batch_size=20, progress=False, monitor=x[:10],
        tensorboard=str(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "kl_weight", "monitor_elbo", "kl_z1", "kl_z2"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_an_aggressive_learning_rate_gives_large_losses_not_nan(inference, likelihood):
    from pyro_ladder.data import load_dataset

    x = load_dataset("digits").train[:400]
    if likelihood == "bernoulli":
        x = x.round()
    torch.manual_seed(0)
    vae = LadderVAE(64, (8, 4), (32, 16), inference=inference, likelihood=likelihood)
    history = fit(vae.model, vae.guide, x, epochs=3, batch_size=50, lr=1.0, progress=False)
    assert all(math.isfinite(r["loss"]) for r in history)


def _sqrt_pair(start):
    """A pair whose guide takes ``sqrt(s)``: at ``s = 0`` the loss is finite but the
    gradient infinite, so Adam writes NaN into the parameters (no loss shows it yet)."""
    import pyro.distributions as dist

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        s = pyro.param("s", torch.tensor(start, dtype=torch.float64))
        m = pyro.param("m", torch.tensor(0.3, dtype=torch.float64))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(m + s.sqrt(), 1.0))

    return model, guide


@pytest.mark.parametrize("sync_every", [1, 10])
def test_a_checkpoint_never_saves_non_finite_parameters(sync_every):
    x = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    saved = []

    def checkpoint(state):
        values = [p.detach().clone() for p in pyro.get_param_store().values()]
        saved.append((state["position"]["step"], values, state["optimizer"]))

    def run(start):
        pyro.clear_param_store()
        saved.clear()
        fit(*_sqrt_pair(start), x, epochs=1, batch_size=10, progress=False, seed=0,
            checkpoint=checkpoint, checkpoint_every=1, sync_every=sync_every)  # fmt: skip

    run(1.0)  # a finite gradient: a state after every step, the last at the epoch's end
    assert [step for step, _, _ in saved] == [0, 1, 2, 3, 0]
    with pytest.raises(TrainingError, match="parameters.*epoch 1, step 1 ") as caught:
        run(0.0)
    assert "argument `lr`" in str(caught.value)
    assert [step for step, _, _ in saved] == [0]  # the state before any step stays the last
    assert pyro.param("s").isnan()  # what would have been saved


def test_all_finite_reads_nested_optimizer_state():
    from pyro_ladder.train import all_finite

    state = {"s": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}}}
    assert all_finite([("m", torch.ones(3)), state, {"lr": 0.1, "ids": torch.arange(3)}])
    state["s"]["state"][0]["exp_avg"][1] = float("inf")
    assert not all_finite([("m", torch.ones(3)), state])
    assert not all_finite([("m", torch.tensor([0.0, float("nan")]))])
