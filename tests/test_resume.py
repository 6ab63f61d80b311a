"""Exact resume: a run stopped anywhere and resumed ends bitwise equal to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pyro
import pytest
import torch

from pyro_ladder import CheckpointError, ConfigError, LadderVAE, TrainingError, fit
from pyro_ladder.checkpoint import load_checkpoint, load_training_checkpoint, save_checkpoint
from pyro_ladder.cli import main


def _data():
    torch.manual_seed(0)
    return torch.rand(90, 6)  # grey: binarized anew each epoch


OPTIONS = dict(epochs=3, batch_size=20, lr=1e-2, warmup_epochs=2, binarize=True, seed=3,
               progress=False, checkpoint_every=2)


def _train(folder, vae, resume=None, **options):
    """fit() writing a checkpoint file at every save; returns (history, paths of the saves)."""
    folder.mkdir(exist_ok=True)
    saves = []

    def save(state):
        path = folder / f"save{len(saves)}.pt"
        save_checkpoint(path, vae, {}, training=state)
        saves.append(path)

    monitor = _data()[:10].round()
    history = fit(vae.model, vae.guide, _data(), **{**OPTIONS, **options}, monitor=monitor,
                  checkpoint=save, resume=resume)
    return history, saves


def _without_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_resuming_from_every_save_point_reproduces_the_run(tmp_path, inference):
    torch.manual_seed(1)
    vae = LadderVAE(6, (3, 2), (8, 4), inference=inference)
    history, saves = _train(tmp_path / "ref", vae)
    positions = [torch.load(p, weights_only=True)["training"]["position"] for p in saves]
    # a save before the first step, two within each 4-step epoch, one after each epoch
    assert [(p["epoch"], p["step"]) for p in positions] == [
        (0, 0), (0, 2), (1, 0), (1, 2), (2, 0), (2, 2), (3, 0)]
    for path in saves:
        pyro.clear_param_store()
        resumed, _, training = load_training_checkpoint(path)
        again, _ = _train(tmp_path / path.stem, resumed, resume=training)
        assert _without_time(again) == _without_time(history), path.name
        assert _same_weights(resumed.state_dict(), vae.state_dict()), path.name


def test_resume_refuses_other_options_and_fewer_epochs(tmp_path):
    vae = LadderVAE(6, (3,), (8,))
    _, saves = _train(tmp_path, vae, epochs=2)
    resumed, _, training = load_training_checkpoint(saves[-1])
    with pytest.raises(ConfigError, match="batch_size=20 \\(now 30\\)"):
        fit(resumed.model, resumed.guide, _data(), **{**OPTIONS, "batch_size": 30},
            resume=training)
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        fit(resumed.model, resumed.guide, _data(), **{**OPTIONS, "epochs": 1}, resume=training)
    longer = fit(resumed.model, resumed.guide, _data(), **{**OPTIONS, "epochs": 4},
                 resume=training)
    assert [r["epoch"] for r in longer] == [1, 2, 3, 4]


def test_a_nan_keeps_the_last_good_checkpoint(tmp_path):
    vae = LadderVAE(6, (3,), (8,), batch_norm=False)
    written = []

    def save(state):
        save_checkpoint(tmp_path / "checkpoint.pt", vae, {}, training=state)
        written.append(state["position"])

    def spoil(record):  # after epoch 2 the weights go bad
        if record["epoch"] == 2:
            with torch.no_grad():
                vae.generative.likelihood.logits.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match="epoch 3, step 1"):
        fit(vae.model, vae.guide, _data().round(), epochs=4, batch_size=20, progress=False,
            checkpoint=save, callback=spoil)
    # the save after epoch 2 precedes the callback; nothing was written after the NaN
    assert (written[-1]["epoch"], written[-1]["step"]) == (2, 0)
    kept, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(t).all() for t in kept.state_dict().values())


def test_training_state_that_does_not_fit_the_model_is_refused(tmp_path):
    vae = LadderVAE(6, (3,), (8,))
    _, saves = _train(tmp_path, vae, epochs=1)
    finished = save_checkpoint(tmp_path / "final.pt", vae, {})
    with pytest.raises(CheckpointError, match="without its training state"):
        load_training_checkpoint(finished)
    payload = torch.load(saves[-1], weights_only=True)
    payload["training"]["optimizer"]["elsewhere$$$w"] = {}
    from pyro_ladder.checkpoint import digest

    payload["digest"] = digest(payload)  # a consistent file whose content is wrong
    torch.save(payload, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="parameters the model lacks"):
        load_training_checkpoint(tmp_path / "foreign.pt")
    del payload["training"]["rng"]
    payload["digest"] = digest(payload)
    torch.save(payload, tmp_path / "norng.pt")
    with pytest.raises(CheckpointError, match="training state is damaged"):
        load_training_checkpoint(tmp_path / "norng.pt")


TRAIN = ["train", "--preset", "small", "--epochs", "3", "--batch-size", "200",
         "--eval-samples", "10", "--eval-limit", "40", "--checkpoint-every", "2",
         "--no-progress", "--seed", "4"]


def _metrics(out):
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return metrics


def _position(path):
    try:
        return torch.load(path, weights_only=True)["training"]["position"]
    except Exception:  # not written yet (the rename is atomic, the load may race it)
        return None


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    assert main([*TRAIN, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    # same thread count as this process: float sums are bitwise equal only then
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "pyro_ladder", *TRAIN, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once it is inside epoch 2
        position = _position(killed / "checkpoint.pt")
        if position is not None and (position["epoch"], position["step"]) >= (1, 2):
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    kept = (killed / "checkpoint.pt").read_bytes()
    assert main([*TRAIN, "--out", str(killed)]) == 2  # a new run there is refused ...
    assert "--resume" in capsys.readouterr().err
    assert (killed / "checkpoint.pt").read_bytes() == kept
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0  # ... resumed
    assert _metrics(killed) == _metrics(tmp_path / "whole")
    a = torch.load(killed / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert _same_weights(a, b)


def test_cli_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    assert "has finished its 1 epochs: pass --epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--batch-size", "50"]) == 2
    assert "--batch-size 50 differs from the run's 200" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_same_seed_same_metrics(tmp_path):
    for name in ("a", "b"):
        assert main([*TRAIN, "--epochs", "1", "--out", str(tmp_path / name)]) == 0
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert (tmp_path / "a" / "history.csv").read_text().split("\n")[0] == \
        (tmp_path / "b" / "history.csv").read_text().split("\n")[0]


@pytest.mark.parametrize(
    "elbo, particles", [("elbo", 2), ("iwae", 2), ("stl", 1), ("iwae-dreg", 2)]
)
def test_a_fresh_estimator_probes_without_side_effects(tmp_path, elbo, particles):
    """Resuming builds a fresh estimator, which traces the pair once to learn its plates:
    that probe must not move batch-norm statistics or use random numbers, or the resumed
    run parts from the uninterrupted one (estimators that probe: vectorized particles and
    the weighted family)."""
    options = dict(elbo=elbo, num_particles=particles, warmup_epochs=0)
    torch.manual_seed(1)
    vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=elbo != "iwae-dreg")
    history, saves = _train(tmp_path / "ref", vae, **options)
    pyro.clear_param_store()
    resumed, _, training = load_training_checkpoint(saves[3])  # mid-run, within epoch 2
    again, _ = _train(tmp_path / "again", resumed, resume=training, **options)
    assert _without_time(again) == _without_time(history)
    assert _same_weights(resumed.state_dict(), vae.state_dict())


def test_the_probe_leaves_statistics_and_random_state_alone():
    from pyro_ladder._traces import max_plate_nesting

    torch.manual_seed(0)
    vae = LadderVAE(6, (3, 2), (8, 4))
    x = _data()[:10].round()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    state = torch.get_rng_state()
    assert max_plate_nesting(vae.model, vae.guide, (x,), {}) == 1
    assert torch.equal(torch.get_rng_state(), state)
    assert _same_weights(vae.state_dict(), before)


def _as_if_saved_on_a_gpu(path):
    """Rewrite the checkpoint at ``path`` so that every tensor claims to live on cuda:0, as
    torch.save records a GPU tensor (the bytes are the same; only the location tag moves)."""
    payload = torch.load(path, weights_only=True)
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(payload, path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU on a machine without one")
def test_a_checkpoint_saved_on_a_gpu_evaluates_and_resumes_on_a_cpu(tmp_path, capsys):
    assert main([*TRAIN, "--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    run = tmp_path / "gpu"
    assert main([*TRAIN, "--epochs", "1", "--out", str(run)]) == 0
    _as_if_saved_on_a_gpu(run / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # the simulation is real: torch refuses it
        torch.load(run / "checkpoint.pt", weights_only=True)
    vae, _ = load_checkpoint(run / "checkpoint.pt")
    assert {p.device.type for p in vae.state_dict().values()} == {"cpu"}
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(run / "checkpoint.pt"),
                "--num-samples",
                "10",
                "--eval-limit",
                "40",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert (
        shown["test_log_likelihood"]
        == json.loads((run / "metrics.json").read_text())["test_log_likelihood"]
    )
    resumed = ["train", "--resume", str(run), "--epochs", "2", "--device", "cpu", "--no-progress"]
    assert main(resumed) == 0
    assert _metrics(run) == _metrics(tmp_path / "whole")
    a = torch.load(run / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert _same_weights(a, b)


def test_resuming_a_model_registered_under_another_name_is_refused():
    """A second LadderVAE made in the same session registers under the next name, so the
    training state's Adam moments would wait for names it never meets and the run would
    go on with fresh ones, silently. The first resumed step refuses that; under the saved
    name the run resumes exactly."""
    import copy

    options = {**OPTIONS, "checkpoint_every": None}
    torch.manual_seed(1)
    vae = LadderVAE(6, (3, 2), (8, 4))
    kept = {}

    def keep(state):  # the state after epoch 1, and the weights it goes with
        if state["position"]["epoch"] == 1 and "state" not in kept:
            kept["state"] = copy.deepcopy(state)
            kept["weights"] = copy.deepcopy(vae.state_dict())

    history = fit(vae.model, vae.guide, _data(), **options, checkpoint=keep)
    for rename in (False, True):
        pyro.clear_param_store()
        other = LadderVAE(6, (3, 2), (8, 4))
        assert other.pyro_name != vae.pyro_name
        other.load_state_dict(kept["weights"])
        if rename:
            other.pyro_name = vae.pyro_name
            again = fit(other.model, other.guide, _data(), **options, resume=kept["state"])
            assert _without_time(again) == _without_time(history)
            assert _same_weights(other.state_dict(), vae.state_dict())
        else:
            before = {k: v.clone() for k, v in other.state_dict().items()}
            with pytest.raises(ConfigError, match="optimizer state is for .* parameters this"):
                fit(other.model, other.guide, _data(), **options, resume=kept["state"])
            assert _same_weights(other.state_dict(), before)  # refused before any step
