"""Class-conditional ladders: p(z | c) p(x | z, c) with guide q(z | x, c)."""

import json

import pyro
import pytest
import torch
from pyro import poutine
from sklearn.linear_model import LogisticRegression
from test_cli import SHARED, _run  # the CLI in-process: (status, stdout, stderr)

from pyro_ladder import ConfigError, DataError, LadderVAE, evaluate, fit, make_elbo
from pyro_ladder.checkpoint import load_checkpoint, load_training_checkpoint, save_checkpoint
from pyro_ladder.condition import one_hot, pack, unpack
from pyro_ladder.data import load_dataset

C = 3


def _vae(inference="top-down", **kw):
    torch.manual_seed(1)
    return LadderVAE(6, (3, 2), (8, 4), inference=inference, condition_dim=C, **kw).double()


@pytest.fixture
def batch():
    torch.manual_seed(2)
    x = torch.rand(8, 6, dtype=torch.float64).round()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return x, labels


def _log_joint(vae, guide_args, model_args):
    """log p(x, z | c) - log q(z | x, c) at one draw of the guide (seeded)."""
    pyro.set_rng_seed(7)
    guide = poutine.trace(vae.guide).get_trace(*guide_args)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(*model_args)
    return model.log_prob_sum() - guide.log_prob_sum()


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_packed_data_and_labels_are_the_same_model(inference, batch):
    x, labels = batch
    vae = _vae(inference, batch_norm=False)
    packed = pack(x, labels, C)
    assert packed.shape == (8, 6 + C) and torch.equal(unpack(packed, 6)[0], x)
    by_labels = _log_joint(vae, (x, labels), (x, labels))
    by_onehot = _log_joint(vae, (x, one_hot(labels, C, x.dtype)), (x, one_hot(labels, C, x.dtype)))
    by_packed = _log_joint(vae, (packed,), (packed,))
    assert torch.isfinite(by_packed)
    assert torch.allclose(by_labels, by_packed, atol=1e-12)
    assert torch.allclose(by_onehot, by_packed, atol=1e-12)


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_the_condition_enters_top_prior_likelihood_and_guide(inference, batch):
    """Changing only c changes log p(z_L | c), log p(x | z, c) and q(z | x, c)."""
    x, labels = batch
    vae = _vae(inference, batch_norm=False)
    pyro.set_rng_seed(3)
    guide = poutine.trace(vae.guide).get_trace(x, labels)
    other = (labels + 1) % C
    model_c = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, labels)
    model_o = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, other)
    for site in ("z2", "z1", "x"):  # the top prior, the conditional prior, the likelihood
        a = model_c.nodes[site]["fn"].log_prob(model_c.nodes[site]["value"])
        b = model_o.nodes[site]["fn"].log_prob(model_o.nodes[site]["value"])
        assert not torch.allclose(a, b), site
    pyro.set_rng_seed(3)
    guide_o = poutine.trace(vae.guide).get_trace(x, other)
    assert not torch.allclose(guide.nodes["z2"]["value"], guide_o.nodes["z2"]["value"])


def test_top_prior_is_a_free_gaussian_per_class():
    vae = _vae(batch_norm=False)
    head = vae.generative.top
    prior = vae.generative.top_prior(torch.empty(0), one_hot(torch.arange(C), C, torch.float64))
    assert prior.batch_shape == (C,) and prior.event_shape == (2,)
    loc = head.loc.weight.T + head.loc.bias  # (C, k): row k is class k's mean
    var = torch.nn.functional.softplus(head.var.weight.T + head.var.bias) + 1e-4
    assert torch.allclose(prior.base_dist.loc, loc)
    assert torch.allclose(prior.base_dist.scale, var.sqrt())


@pytest.mark.parametrize(
    "estimator", ["elbo", "tracegraph", "iwae", "iwae-dreg", "miwae", "piwae", "jit-elbo"]
)
@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_every_estimator_trains_a_conditional_model(estimator, inference, batch):
    x, labels = batch
    data = pack(torch.cat([x] * 4), torch.cat([labels] * 4), C)  # (32, 6 + C)
    vae = _vae(inference, batch_norm=estimator != "iwae-dreg")  # DReG refuses batch norm
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    particles = 1 if estimator in ("elbo", "tracegraph", "jit-elbo") else 4
    history = fit(
        vae.model, vae.guide, data, elbo=estimator, num_particles=particles,
        epochs=2, batch_size=8, progress=False,
    )  # fmt: skip
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    top = vae.generative.top.loc.weight
    assert not torch.equal(top, before["generative.top.loc.weight"])  # p(z_L | c) learns
    first = "blocks.0.net.0.weight" if inference == "top-down" else "blocks.0.mlp.net.0.weight"
    w = vae.inference.state_dict()[first]
    assert w.shape[1] == 6 + C  # the guide's first block reads [x, c]
    assert not torch.equal(w[:, 6:], before[f"inference.{first}"][:, 6:])


def test_the_prior_networks_run_once_per_step_on_packed_data(batch):
    """The guide's prior-network outputs are reused by the model for the same (z, c)."""
    x, labels = batch
    vae = _vae()
    calls = []
    vae.generative.priors[0].register_forward_hook(lambda *_: calls.append(1))
    loss = make_elbo("elbo")
    loss.loss_and_grads(vae.model, vae.guide, pack(x, labels, C))
    assert len(calls) == 1


def test_evaluate_scores_log_p_x_given_c(batch):
    x, labels = batch
    vae = _vae(batch_norm=False)
    result = evaluate(vae.model, vae.guide, pack(x, labels, C), num_samples=200, iwae_k=(5,))
    assert result["log_likelihood"].shape == (8,)
    assert (result["elbo"] <= result["iwae"][5]).all()
    assert (result["iwae"][5] <= result["log_likelihood"] + 0.05).all()
    assert set(result["kl"]) == {"z1", "z2"}


def test_bad_conditions_are_refused_clearly(batch):
    x, labels = batch
    vae = _vae()
    with pytest.raises(DataError, match=r"takes x \(batch, 6\) with c, or x' = \(x, c\)"):
        vae.model(x)  # no c and no packed columns
    with pytest.raises(DataError, match=r"in \[0, 3\)"):
        vae.model(x, torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]))
    with pytest.raises(DataError, match="does not fit 8 rows"):
        vae.model(x, labels[:5])
    with pytest.raises(DataError, match="must be integers"):
        one_hot(torch.tensor([0.5]), C)
    with pytest.raises(DataError, match="NaN"):
        vae.model(x, torch.full((8, C), float("nan"), dtype=torch.float64))
    with pytest.raises(ConfigError, match="conditional.*vae.sample"):
        vae.sample(4)
    plain = LadderVAE(6, (3, 2), (8, 4))
    with pytest.raises(DataError, match="unconditional"):
        plain.model(x.float(), labels)
    with pytest.raises(ConfigError, match="unconditional"):
        plain.sample(4, c=1)
    with pytest.raises(ConfigError, match="condition_dim"):
        LadderVAE(6, (3, 2), (8, 4), condition_dim=-1)


def test_a_conditional_model_samples_the_class_it_is_asked_for():
    """Train on digits with their labels, draw 20 images of each class, and let a classifier
    trained on the real digits read them: they must be the classes asked for."""
    data = load_dataset("digits")
    classifier = LogisticRegression(max_iter=2000).fit(data.train.numpy(), data.train_labels)
    assert classifier.score(data.test.numpy(), data.test_labels) > 0.9  # the judge is sound
    pyro.set_rng_seed(0)
    vae = LadderVAE(64, (16, 8, 4), (128, 64, 32), likelihood="gaussian", condition_dim=10)
    fit(
        vae.model, vae.guide, pack(data.train, data.train_labels, 10),
        epochs=10, batch_size=100, lr=3e-3, progress=False,
    )  # fmt: skip
    asked = torch.arange(10).repeat_interleave(20)
    drawn = vae.sample(len(asked), asked)  # (200, 64) pixel means
    read = torch.as_tensor(classifier.predict(drawn.clamp(0, 1).numpy()))
    per_class = [(read[asked == k] == k).float().mean().item() for k in range(10)]
    assert sum(per_class) / 10 > 0.9, per_class
    assert min(per_class) >= 0.6, per_class


FAST = ["--preset", "small", "--epochs", "2", "--eval-samples", "10", "--eval-limit", "40"]


def test_cli_trains_a_conditional_model_and_samples_a_row_per_class(tmp_path, capsys):
    run = tmp_path / "run"
    status, out, err = _run(
        ["train", *FAST, "--condition", "label", "--no-progress", "--out", str(run)], capsys
    )
    assert status == 0, err
    assert "log p(x | c)" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["condition"] == "label" and metrics["config"]["condition_dim"] == 10
    vae, meta = load_checkpoint(run / "checkpoint.pt")
    assert vae.condition_dim == 10 and meta["options"]["condition"] == "label"
    png = tmp_path / "grid.png"
    status, out, err = _run(
        ["sample", str(run / "checkpoint.pt"), "--out", str(png), "--classes", "2,5"], capsys
    )
    assert status == 0 and png.stat().st_size > 0 and "one row per class" in out
    status, _, err = _run(
        ["sample", str(run / "checkpoint.pt"), "--out", str(png), "--classes", "12"], capsys
    )
    assert status == 2 and "0 to 9" in err and len(err.strip().splitlines()) == 1
    report = tmp_path / "report"
    status, _, err = _run(
        ["report", str(run / "checkpoint.pt"), "--out", str(report), "--num-samples", "10",
         "--eval-limit", "40", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert status == 0, err
    assert "test log p(x | c)" in (report / "report.md").read_text()
    # resuming takes --condition from the run
    status, _, err = _run(["train", "--resume", str(run), "--epochs", "3"], capsys)
    assert status == 0, err
    assert load_checkpoint(run / "checkpoint.pt")[0].condition_dim == 10


def test_a_run_saved_before_condition_existed_still_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(["train", *FAST, "--no-progress", "--out", str(run)], capsys)[0] == 0
    vae, meta, training = load_training_checkpoint(run / "checkpoint.pt")
    del meta["options"]["condition"]  # what an older release wrote
    save_checkpoint(run / "checkpoint.pt", vae, meta, training=training)
    status, out, err = _run(["train", "--resume", str(run), "--epochs", "3"], capsys)
    assert status == 0, err
    assert "log p(x)" in out and load_checkpoint(run / "checkpoint.pt")[0].condition_dim == 0


def test_cli_sample_of_an_unconditional_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(["train", *FAST, "--no-progress", "--out", str(run)], capsys)[0] == 0
    png = tmp_path / "s.png"
    status, out, _ = _run(["sample", str(run / "checkpoint.pt"), "--out", str(png)], capsys)
    assert status == 0 and png.stat().st_size > 0 and "64 images" in out
    vae, meta = load_checkpoint(run / "checkpoint.pt")
    del meta["image_shape"]  # a run saved before the shape was recorded: asks the data set
    save_checkpoint(tmp_path / "old.pt", vae, meta)
    status, _, err = _run(["sample", str(tmp_path / "old.pt"), "--out", str(png)], capsys)
    assert status == 0, err
    status, _, err = _run(
        ["sample", str(run / "checkpoint.pt"), "--out", str(png), "--classes", "1"], capsys
    )
    assert status == 2 and "--condition label" in err


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_cli_refuses_condition_on_unlabelled_data_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    status, _, err = _run(
        ["train", "--dataset", "binarized-mnist", "--data-dir", str(SHARED), "--condition",
         "label", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert status == 2 and "needs class labels" in err and "digits" in err
    assert not out.exists()
