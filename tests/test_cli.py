import json
import subprocess
import sys
from pathlib import Path

import pytest

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

    status, out, _ = _run(
        ["evaluate", str(run / "checkpoint.pt"), "--num-samples", "20", "--no-progress"], capsys
    )
    assert status == 0
    again = json.loads(out)
    assert again["num_test"] == metrics["num_test"]
    # same model, same test set, new draws: close to the stored estimate
    assert abs(again["test_log_likelihood"] - metrics["test_log_likelihood"]) < 0.5


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
