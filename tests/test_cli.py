import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_ladder.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = ["--preset", "small", "--epochs", "2", "--eval-samples", "20", "--no-progress"]


def _run(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def _assert_clean_error(status, err, fragment):
    assert status == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1, err  # one line: no usage text, no traceback


def test_train_on_digits_writes_every_output(tmp_path, capsys):
    status, out, _ = _run(["train", *FAST, "--out", str(tmp_path / "run")], capsys)
    assert status == 0
    run = tmp_path / "run"
    for name in (
        "checkpoint.pt",
        "metrics.json",
        "history.csv",
        "samples.png",
        "reconstructions.png",
        "curves.png",
    ):
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "dataset",
        "inference",
        "elbo",
        "particles",
        "epochs",
        "train_seconds",
        "test_elbo",
        "test_log_likelihood",
        "eval_samples",
        "kl_per_layer",
    ):
        assert key in metrics, key
    assert metrics["dataset"] == "digits" and metrics["eval_samples"] == 20
    assert metrics["test_elbo"] <= metrics["test_iwae"]["5"] <= metrics["test_log_likelihood"] < 0
    assert set(metrics["kl_per_layer"]) == {"z1", "z2"}
    assert "test log-likelihood" in out
    lines = (run / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,loss") and len(lines) == 3

    status, out, _ = _run(
        [
            "report",
            str(run / "checkpoint.pt"),
            "--out",
            str(tmp_path / "rep"),
            "--num-samples",
            "20",
            "--no-progress",
        ],
        capsys,
    )
    assert status == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| z1 |" in report and "| z2 |" in report and "test log p(x)" in report
    assert "cross-entropy of x" in report
    for name in (
        "samples.png",
        "reconstructions.png",
        "kl_per_unit.png",
        "pca.png",
        "curves.png",
        "report.json",
    ):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
        assert name.endswith(".json") or f"({name})" in report  # the summary shows each picture
    facts = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(facts["active_units"]) == {"z1", "z2"} and facts["num_test"] == 360
    assert facts["seed"] == 0 and facts["notes"] == []
    # report: its first 1000 rows are all 360, at K = 20: the run's own numbers again
    assert facts["test_log_likelihood"] == metrics["test_log_likelihood"]

    status, out, _ = _run(
        ["evaluate", str(run / "checkpoint.pt"), "--num-samples", "20", "--no-progress"], capsys
    )
    assert status == 0
    again = json.loads(out)
    assert again["num_test"] == metrics["num_test"]
    # one evaluation protocol: at the run's K and seed, evaluate gives metrics.json exactly,
    # although training left the random state elsewhere
    keys = ("test_log_likelihood", "test_elbo", "test_iwae", "test_ess", "kl_per_layer")
    assert {k: again[k] for k in keys} == {k: metrics[k] for k in keys}
    status, out, _ = _run(
        ["evaluate", str(run / "checkpoint.pt"), "--num-samples", "20", "--no-progress",
         "--seed", "1"], capsys,
    )  # fmt: skip
    other = json.loads(out)["test_log_likelihood"]
    assert other != metrics["test_log_likelihood"]
    assert abs(other - metrics["test_log_likelihood"]) < 0.5  # new draws, the same model


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
@pytest.mark.parametrize("inference, elbo", [("top-down", "elbo"), ("bottom-up", "iwae")])
def test_short_run_on_binarized_mnist(tmp_path, capsys, inference, elbo):
    argv = [
        "train",
        "--dataset",
        "binarized-mnist",
        "--data-dir",
        str(SHARED),
        "--preset",
        "small",
        "--epochs",
        "1",
        "--batch-size",
        "1000",
        "--particles",
        "2",
        "--eval-samples",
        "10",
        "--eval-limit",
        "50",
        "--inference",
        inference,
        "--elbo",
        elbo,
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    status, out, _ = _run(argv, capsys)
    assert status == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_test"] == 50 and metrics["config"]["x_dim"] == 784
    assert -784 * 0.7 < metrics["test_log_likelihood"] < 0  # better than coin flips


def test_refuses_an_output_folder_holding_a_run(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    status, _, err = _run(["train", *FAST, "--out", str(tmp_path)], capsys)
    _assert_clean_error(status, err, "already holds a run")
    assert (tmp_path / "metrics.json").read_text() == "{}"  # nothing overwritten


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--latent-dims", "4,0"], "sizes must be positive"),
        (["--latent-dims", "4,x"], "not a comma-separated list"),
        (["--latent-dims", "8,4,2"], "one hidden size per stochastic layer (--hidden-dims)"),
        (["--dataset", "cifar"], "invalid choice"),
        (["--elbo", "dreg"], "invalid choice"),
        (["--inference", "bottom-up", "--elbo", "meanfield"], "top-down"),
        (["--lr", "-1"], "positive number"),
        (["--epochs", "0"], "positive integer"),
        (["--batch-size", "5000"], "at most 1437 (--batch-size)"),
        (["--checkpoint-every", "-2"], "positive integer"),
        (["--elbo", "iwae-dreg", "--particles", "4"], "BatchNorm1d) is in training mode"),
    ],
)
def test_bad_options_exit_2_with_one_message(tmp_path, capsys, extra, fragment):
    status, _, err = _run(["train", *FAST, *extra, "--out", str(tmp_path / "r")], capsys)
    _assert_clean_error(status, err, fragment)
    assert not (tmp_path / "r").exists()  # refused before anything is written


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_continuous_data_with_bernoulli_likelihood_is_refused(tmp_path, capsys):
    argv = [
        "train",
        *FAST,
        "--dataset",
        "frey-faces",
        "--data-dir",
        str(SHARED),
        "--likelihood",
        "bernoulli",
        "--out",
        str(tmp_path / "r"),
    ]
    status, _, err = _run(argv, capsys)
    _assert_clean_error(status, err, "binary")


def test_missing_data_file_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    empty = tmp_path / "data"
    empty.mkdir()
    argv = [
        "train",
        *FAST,
        "--dataset",
        "binarized-mnist",
        "--data-dir",
        str(empty),
        "--out",
        str(tmp_path / "r"),
    ]
    status, _, err = _run(argv, capsys)
    _assert_clean_error(status, err, "binarized_mnist")
    assert list(empty.rglob("*.amat")) == []


def test_evaluate_refuses_a_missing_checkpoint(tmp_path, capsys):
    status, _, err = _run(["evaluate", str(tmp_path / "nope.pt")], capsys)
    _assert_clean_error(status, err, "no checkpoint")


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_ladder", "evaluate", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("pyro-ladder: error:") and "Traceback" not in proc.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "pyro_ladder", "train", "--help"], capture_output=True, text=True
    )
    assert help_.returncode == 0 and "nats" in help_.stdout


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--seed", "-1"], "seeds are integers in [0, 2**32 - 1]"),
        (["--seed", "4294967296"], "seeds are integers in [0, 2**32 - 1]"),
        (["--batch-size", "1"], "batch norm in training mode needs at least 2 rows per batch"),
        (["--device", "gpu"], "--device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
        pytest.param(["--device", "cuda"], "--device cuda: torch sees no CUDA GPU", marks=NO_GPU),
        pytest.param(["--device", "cuda:1"], "--device cuda:1: torch sees no", marks=NO_GPU),
    ],
)
def test_inputs_refused_before_anything_is_written(tmp_path, capsys, extra, fragment):
    out = tmp_path / "r"
    out.mkdir()  # an empty folder stays empty
    status, _, err = _run(["train", *FAST, *extra, "--out", str(out)], capsys)
    _assert_clean_error(status, err, fragment)
    assert list(out.iterdir()) == []


@NO_GPU
@pytest.mark.parametrize("command", ["evaluate", "report", "sample"])
def test_the_other_commands_refuse_a_gpu_this_machine_lacks(tmp_path, capsys, command):
    argv = [command, str(tmp_path / "checkpoint.pt"), "--device", "cuda"]
    argv += [] if command == "evaluate" else ["--out", str(tmp_path / "out")]
    status, _, err = _run(argv, capsys)
    _assert_clean_error(status, err, "--device cuda: torch sees no CUDA GPU")
    assert list(tmp_path.iterdir()) == []  # refused before the checkpoint is even looked for


def test_a_ragged_last_batch_of_one_row_is_dropped_not_fed_to_batch_norm(tmp_path, capsys):
    # digits: 1437 = 2 x 718 + 1, so each epoch ends with one row; fit drops it
    argv = ["train", *FAST, "--epochs", "1", "--batch-size", "718", "--out", str(tmp_path / "r")]
    status, _, err = _run(argv, capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["batch_size"] == 718


def test_a_warm_up_longer_than_training_is_warned_about_and_recorded(tmp_path, capsys):
    argv = ["train", *FAST, "--warmup-epochs", "5", "--out", str(tmp_path / "r")]
    status, _, err = _run(argv, capsys)
    assert status == 0
    assert err.startswith("pyro-ladder: warning: --warmup-epochs 5 is not shorter than --epochs 2")
    assert "trains only on a down-weighted objective" in err
    (note,) = json.loads((tmp_path / "r" / "metrics.json").read_text())["notes"]
    assert "KL weight ends at 0.20" in note
    rep = tmp_path / "rep"
    argv = ["report", str(tmp_path / "r" / "checkpoint.pt"), "--out", str(rep)]
    assert _run([*argv, "--num-samples", "5", "--no-progress"], capsys)[0] == 0
    assert json.loads((rep / "report.json").read_text())["notes"] == [note]
    assert f"**Warning:** {note}" in (rep / "report.md").read_text()


def test_compile_reaches_fit_and_is_refused_with_lightning(tmp_path, capsys, monkeypatch):
    import pyro_ladder.runs.training as training

    seen = {}

    class _Stop(Exception):
        pass

    def stop(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(training, "fit", stop)
    with pytest.raises(_Stop):
        main(["train", "--compile", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "a")])
    assert seen["compile"] == "step"
    with pytest.raises(_Stop):
        args = ["train", "--compile", "networks", "--epochs", "1", "--no-progress"]
        main([*args, "--out", str(tmp_path / "c")])
    assert seen["compile"] == "networks"
    with pytest.raises(_Stop):
        args = ["train", "--compile", "capture", "--epochs", "1", "--no-progress"]
        main([*args, "--out", str(tmp_path / "d")])
    assert seen["compile"] == "capture"
    status, _, err = _run(
        ["train", "--compile", "--devices", "2", "--out", str(tmp_path / "b")], capsys
    )
    _assert_clean_error(status, err, "--compile")
    assert not (tmp_path / "b").exists() or list((tmp_path / "b").iterdir()) == []
