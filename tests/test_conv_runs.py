"""The convolutional ladder in the run layer: CLI train / evaluate / report / sample /
resume, checkpoints of kind "conv", spatial diagnostics, and free bits in ``fit``."""

import copy
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_ladder import ConfigError, evaluate, fit, make_elbo
from pyro_ladder.checkpoint import digest, load_checkpoint, save_checkpoint
from pyro_ladder.cli import main
from pyro_ladder.conv import ConvLadderVAE
from pyro_ladder.diagnostics import active_units, kl_per_unit, mutual_information
from pyro_ladder.errors import CheckpointError
from pyro_ladder.runs import RunSpec
from pyro_ladder.vae import LadderVAE

# conv-small on the embedded 8x8 digits: 2 layers at 4x4 and 2x2, seconds per epoch
CONV = ["--preset", "conv-small", "--eval-samples", "20", "--eval-limit", "60", "--no-progress"]


def _run(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def _state(path):
    return load_checkpoint(path)[0].state_dict()


def test_cli_trains_evaluates_reports_and_samples_a_conv_run(tmp_path, capsys):
    run = tmp_path / "run"
    status, out, err = _run(["train", *CONV, "--epochs", "2", "--out", str(run)], capsys)
    assert status == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    config = metrics["config"]
    assert config["image_shape"] == [8, 8] and config["latent_channels"] == [2, 2]
    assert config["batch_norm"] is False and metrics["free_bits"] == 0.0
    assert metrics["test_elbo"] <= metrics["test_iwae"]["5"] <= metrics["test_log_likelihood"] < 0
    vae, meta = load_checkpoint(run / "checkpoint.pt")
    assert isinstance(vae, ConvLadderVAE) and meta["image_shape"] == [8, 8]

    status, out, _ = _run(
        ["evaluate", str(run / "checkpoint.pt"), "--num-samples", "20", "--eval-limit", "60",
         "--no-progress"],
        capsys,
    )  # fmt: skip
    assert status == 0
    again = json.loads(out)
    assert again["num_test"] == 60
    assert abs(again["test_log_likelihood"] - metrics["test_log_likelihood"]) < 0.5

    rep = tmp_path / "rep"
    status, out, err = _run(
        ["report", str(run / "checkpoint.pt"), "--out", str(rep), "--num-samples", "20",
         "--eval-limit", "60", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert status == 0, err
    report = json.loads((rep / "report.json").read_text())
    # every channel and pixel of a layer is a unit: z1 is (2, 4, 4), z2 (2, 2, 2)
    assert report["units"] == {"z1": 32, "z2": 8}
    assert set(report["mutual_information"]) == {"z1", "z2"}
    for name in ("pca.png", "kl_per_unit.png", "samples.png", "report.md"):
        assert (rep / name).stat().st_size > 0, name

    status, out, err = _run(
        ["sample", str(run / "checkpoint.pt"), "--out", str(tmp_path / "s.png"), "--num", "16"],
        capsys,
    )
    assert status == 0, err
    assert (tmp_path / "s.png").stat().st_size > 0


def test_a_resumed_conv_run_equals_an_uninterrupted_one(tmp_path, capsys):
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert _run(["train", *CONV, "--epochs", "2", "--out", str(once)], capsys)[0] == 0
    assert _run(["train", *CONV, "--epochs", "1", "--out", str(twice)], capsys)[0] == 0
    status, _, err = _run(["train", "--resume", str(twice), "--epochs", "2", "--no-progress"],
                          capsys)  # fmt: skip
    assert status == 0, err
    a, b = _state(once / "checkpoint.pt"), _state(twice / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (once, twice))
    assert m1["test_log_likelihood"] == m2["test_log_likelihood"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--free-bits", "-1"], "--free-bits"),
        (["--free-bits", "0.5", "--elbo", "iwae"], "--free-bits floors the KL terms"),
        (["--condition", "label"], "--preset conv-small is unconditional"),
        (["--latent-dims", "2,2,2"], "latent_channels"),
        (["--elbo", "meanfield", "--inference", "bottom-up"], "--elbo meanfield"),
    ],
)
def test_bad_conv_options_exit_2_with_one_message(tmp_path, capsys, extra, fragment):
    status, _, err = _run(["train", *CONV, *extra, "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and fragment in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_spec_resolves_the_conv_network_from_the_data():
    mlp = RunSpec(dataset="digits").resolved("grey")
    conv = RunSpec(dataset="digits", preset="conv-mnist").resolved("grey")
    assert mlp.batch_norm is True and conv.batch_norm is False
    config = conv.replace(latent_dims=(3, 4), hidden_dims=(5, 6)).conv_config((20, 28))
    assert config.image_shape == (20, 28) and config.x_dim == 560
    assert config.latent_channels == (3, 4) and config.channels == (5, 6)
    explicit = RunSpec(preset="conv-small", batch_norm=True).resolved("grey")
    assert explicit.conv_config((8, 8)).batch_norm is True


# ---- checkpoints -------------------------------------------------------------------------


def _conv(**kw):
    torch.manual_seed(0)
    return ConvLadderVAE(image_shape=(6, 6), channels=(4, 4), latent_channels=(2, 2), **kw)


def test_conv_checkpoint_round_trip(tmp_path):
    vae = _conv(inference="bottom-up", skip=False)
    path = save_checkpoint(tmp_path / "c.pt", vae, {"dataset": "x"})
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == "conv"
    back, meta = load_checkpoint(path)
    assert isinstance(back, ConvLadderVAE) and back.config == vae.config
    assert meta == {"dataset": "x"}
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in vae.state_dict().items())
    torch.manual_seed(1)
    a = vae.sample(3)
    torch.manual_seed(1)
    assert torch.equal(a, back.sample(3))


def test_checkpoints_without_a_kind_hold_an_mlp_and_unknown_kinds_are_refused(tmp_path):
    vae = LadderVAE(6, (3,), (8,), batch_norm=False)
    path = save_checkpoint(tmp_path / "m.pt", vae)
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == "mlp"
    del payload["kind"]  # as files written before the conv ladder
    payload["digest"] = digest(payload)
    torch.save(payload, path)
    assert isinstance(load_checkpoint(path)[0], LadderVAE)
    payload["kind"] = "transformer"
    payload["digest"] = digest(payload)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="kind 'transformer'"):
        load_checkpoint(path)
    payload["kind"] = "conv"  # an MLP's config under the conv kind
    payload["digest"] = digest(payload)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="config is invalid"):
        load_checkpoint(path)


# ---- diagnostics on spatial latents ------------------------------------------------------


def _spatial_pair(scale1=1e-3):
    """z2 (2, 2, 2) equal to its prior in the guide; z1 (1, 2, 3) a near-deterministic
    function of x with loc ``x @ W`` and scale ``scale1``."""
    weight = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(2, 6)  # (D, units)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z2", dist.Normal(x.new_zeros(2, 2, 2), 1.0).to_event(3))
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(1, 2, 3), 1.0).to_event(3))
            pyro.sample("x", dist.Normal(z1.flatten(-3)[..., :2], 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z2", dist.Normal(x.new_zeros(2, 2, 2), 1.0).to_event(3))
            loc = (x @ weight).reshape(-1, 1, 2, 3)  # (B, 1, 2, 3)
            pyro.sample("z1", dist.Normal(loc, scale1).to_event(3))

    return model, guide, weight


def test_diagnostics_on_spatial_sites_against_closed_forms():
    model, guide, weight = _spatial_pair(scale1=0.5)
    torch.manual_seed(0)
    x = torch.randn(200, 2, dtype=torch.float64)
    kl = kl_per_unit(model, guide, x, num_samples=2)
    assert kl["z2"].shape == (8,) and kl["z2"].abs().max() == 0.0
    # KL(N(m, s) || N(0, 1)) per unit = (m^2 + s^2 - 1) / 2 - log s, averaged over rows
    m = x @ weight  # (N, 6), channel-major as (1, 2, 3) flattens
    closed = (0.5 * (m.square() + 0.25 - 1) - math.log(0.5)).mean(0)
    torch.testing.assert_close(kl["z1"], closed, rtol=1e-12, atol=1e-12)
    per_layer = evaluate(model, guide, x, num_samples=2)["kl"]
    assert kl["z1"].sum().item() == pytest.approx(per_layer["z1"].mean().item(), rel=1e-12)
    units = active_units(model, guide, x)
    assert units["z1"]["variance"].shape == (6,) and units["z2"]["units"] == 8
    torch.testing.assert_close(units["z1"]["variance"], m.var(0), rtol=1e-12, atol=0)
    assert units["z1"]["active"] == int((m.var(0) > 0.01).sum()) and units["z2"]["active"] == 0


def test_mutual_information_on_spatial_sites_in_chunks():
    model, guide, _ = _spatial_pair()
    torch.manual_seed(0)
    x = torch.randn(100, 2, dtype=torch.float64)
    pyro.set_rng_seed(4)
    whole = mutual_information(guide, x, num_samples=4)
    pyro.set_rng_seed(4)
    chunked = mutual_information(guide, x, num_samples=4, max_elements=1)  # a row at a time
    assert whole == pytest.approx(chunked, rel=1e-12)
    assert abs(whole["z2"]) < 0.05  # independent of x
    assert whole["z1"] > math.log(100) - 0.05  # deterministic: the ceiling log N


def test_conv_kl_per_unit_sums_to_evaluates_per_layer_kl():
    vae = _conv().double()
    torch.manual_seed(1)
    x = torch.rand(30, 36, dtype=torch.float64).round()
    per_unit = kl_per_unit(vae.model, vae.guide, x, num_samples=200)
    per_layer = evaluate(vae.model, vae.guide, x, num_samples=200)["kl"]
    assert per_unit["z1"].shape == (2 * 3 * 3,) and per_unit["z2"].shape == (2 * 2 * 2,)
    # z2's KL does not depend on the draws; z1's is a Monte Carlo average over z2
    assert per_unit["z2"].sum().item() == pytest.approx(per_layer["z2"].mean().item(), rel=1e-9)
    tol = 0.05 * per_layer["z1"].mean().item() + 1e-3
    assert per_unit["z1"].sum().item() == pytest.approx(per_layer["z1"].mean().item(), abs=tol)


# ---- free bits in fit --------------------------------------------------------------------


def test_fit_free_bits_floor_the_training_step_but_the_monitor_scores_the_elbo():
    """One step of fit, replayed by hand with the same random numbers: the training loss is
    the floored objective -(sum_b log p(x_b | z) - B sum_l max(lambda, KL_l)) / B, and the
    monitor (after the step) is the plain one-sample ELBO of the updated model."""
    vae = _conv().double()
    torch.manual_seed(2)
    x = torch.rand(16, 36, dtype=torch.float64).round()
    lam = 1.8  # above z2's KL (1.33), below z1's (2.16): one floor binds, one does not
    start = copy.deepcopy(vae.state_dict())
    history = fit(vae.model, vae.guide, x, epochs=1, batch_size=16, monitor=x, seed=7,
                  progress=False, free_bits=lam)  # fmt: skip
    end = copy.deepcopy(vae.state_dict())

    vae.load_state_dict(start)
    pyro.set_rng_seed(7)
    batch = x[torch.randperm(16)]
    guide = poutine.trace(vae.guide).get_trace(batch)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(batch)
    rec = model.nodes["x"]["fn"].log_prob(batch).sum()
    kl = {
        s: (guide.nodes[s]["fn"].log_prob(v) - model.nodes[s]["fn"].log_prob(v)).mean().item()
        for s in ("z1", "z2")
        for v in [guide.nodes[s]["value"]]
    }
    assert kl["z2"] < lam < kl["z1"]
    floored = -(rec.item() - 16 * sum(max(lam, k) for k in kl.values())) / 16
    assert history[0]["loss"] == pytest.approx(floored, rel=1e-10)

    vae.load_state_dict(end)
    plain = evaluate(vae.model, vae.guide, x, num_samples=1)["elbo"].mean().item()
    assert history[0]["monitor_elbo"] == pytest.approx(plain, rel=1e-10)


def test_fit_refuses_bad_free_bits():
    vae, x = _conv(), torch.zeros(4, 36)
    for bad in (-0.1, float("nan"), "1", True):
        with pytest.raises(ConfigError, match="free_bits"):
            fit(vae.model, vae.guide, x, epochs=1, batch_size=4, free_bits=bad, progress=False)
    with pytest.raises(ConfigError, match="argument `elbo` iwae"):
        fit(vae.model, vae.guide, x, epochs=1, batch_size=4, free_bits=1.0, elbo="iwae",
            progress=False)  # fmt: skip


def test_fit_resumes_states_saved_before_free_bits_existed():
    """A training state without the ``free_bits`` option (saved before it existed) resumes
    with free bits off, and is refused with them on."""
    vae = _conv()
    torch.manual_seed(3)
    x = torch.rand(8, 36).round()
    states = []
    fit(vae.model, vae.guide, x, epochs=1, batch_size=4, progress=False,
        checkpoint=lambda s: states.append(copy.deepcopy(s)))  # fmt: skip
    old = states[-1]
    assert old["options"].pop("free_bits") == 0.0
    history = fit(vae.model, vae.guide, x, epochs=2, batch_size=4, progress=False, resume=old)
    assert [r["epoch"] for r in history] == [1, 2]
    with pytest.raises(ConfigError, match="free_bits=0.0 \\(now 1.0\\)"):
        fit(vae.model, vae.guide, x, epochs=2, batch_size=4, progress=False, resume=old,
            free_bits=1.0)  # fmt: skip


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_conv_mnist_is_built_for_binarized_mnist():
    """What `pyro-ladder train --preset conv-mnist --dataset binarized-mnist` builds."""
    from pyro_ladder.data import load_dataset
    from pyro_ladder.runs import build_model
    from pyro_ladder.runs.training import checked_test_set

    data = load_dataset("binarized-mnist", SHARED)
    spec = RunSpec(dataset="binarized-mnist", preset="conv-mnist", eval_limit=8)
    spec = spec.resolved(data.kind)
    vae = build_model(spec, data)
    assert isinstance(vae, ConvLadderVAE) and vae.config.image_shape == (28, 28)
    assert sum(p.numel() for p in vae.parameters()) == 468_689
    test = checked_test_set(spec, vae, data)
    loss = make_elbo("elbo").loss(vae.model, vae.guide, test)
    assert math.isfinite(loss) and 0 < loss / len(test) < 784 * math.log(2) * 2


def test_a_conv_run_trains_through_lightning_on_one_process(tmp_path, capsys):
    pytest.importorskip("lightning")
    run = tmp_path / "run"
    argv = ["train", *CONV, "--epochs", "1", "--accelerator", "cpu", "--out", str(run)]
    status, _, err = _run(argv, capsys)
    assert status == 0, err
    vae, meta = load_checkpoint(run / "checkpoint.pt")
    assert isinstance(vae, ConvLadderVAE) and meta["processes"] == 1
    status, _, err = _run([*argv[:-2], "--free-bits", "0.5", "--out", str(tmp_path / "fb")],
                          capsys)  # fmt: skip
    assert status == 2 and "--free-bits runs in one process" in err
    assert not (tmp_path / "fb").exists()
