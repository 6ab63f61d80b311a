"""The experiment scripts keep working: one tiny run of each (the real runs are on demand)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gradient_snr_experiment_smoke(tmp_path):
    snr = _load("gradient_snr")
    result = snr.main(["--dataset", "digits", "--preset", "small", "--train-images", "200",
                       "--epochs", "1", "--batch", "4", "--draws", "3", "--ks", "1,4",
                       "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "snr.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) == 2 * len(snr.ESTIMATORS)
    assert (tmp_path / "snr.png").stat().st_size > 0
    assert all(r["guide"]["num_params"] > 0 for r in saved["rows"])


def test_compare_estimators_smoke(tmp_path):
    compare = _load("compare_estimators")
    rows = compare.main(["--preset", "small", "--epochs", "1", "--seeds", "0",
                         "--eval-samples", "5", "--out", str(tmp_path / "c.json")])
    assert [r["estimator"] for r in rows] == ["meanfield", "elbo-condkl-sg"]
    saved = json.loads((tmp_path / "c.json").read_text())
    assert all(r["test_elbo"] <= r["test_log_likelihood"] < 0 for r in saved["rows"])


def test_ladder_vs_vae_smoke(tmp_path):
    experiment = _load("ladder_vs_vae")
    rows = experiment.main(["--dataset", "digits", "--depths", "1,2", "--quick",
                            "--batch-size", "200", "--out", str(tmp_path)])
    assert [(r["inference"], r["depth"]) for r in rows] == [
        ("bottom-up", 1), ("top-down", 1), ("bottom-up", 2), ("top-down", 2)]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == 4 and saved["args"]["epochs"] == "1"
    for name in ("depth.png", "pca.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_discrete_layers_smoke(tmp_path):
    experiment = _load("discrete_layers")
    result = experiment.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    labels = [r["label"] for r in saved["rows"]]
    assert labels == list(experiment.RUNS) == [r["label"] for r in result["rows"]]
    for row in saved["rows"]:
        assert row["test_elbo"] <= row["test_log_likelihood"] + 1e-6
        assert 0.0 <= row["draws_on_support"] <= 1.0
        if row["pair"] == "discrete":
            assert set(row["gradient"]) == set(experiment.GROUPS)
    for name in ("data", "joint", "conditional_marginals", "marginals", "curves", "gradients"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_conditional_digits_smoke(tmp_path):
    experiment = _load("conditional_digits")
    result = experiment.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["models"]) == list(experiment.MODELS) == list(result["models"])
    for name, row in saved["models"].items():
        assert row["elbo"] <= row["log_likelihood"] + 1e-6 < 0
        assert 0.0 <= row["samples_read_as_asked"] <= 1.0
        assert ("classifier_accuracy" in row) == ("| c" in name)
    assert (tmp_path / "samples.png").stat().st_size > 0
