"""The experiment scripts keep working: one tiny run of each (the real runs are on demand)."""

import importlib.util
import json
from pathlib import Path

import pyro
import pytest
import torch

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


# --------------------------------------------------------------- the sweeps over seeds


def test_sweep_mean_sd_and_summary_by_hand():
    """Sample standard deviation (n - 1), per group and per layer, against hand values."""
    sweep = _load("sweep")
    assert sweep.mean_sd([1.0, 2.0, 4.0]) == pytest.approx(
        {"mean": 7 / 3, "sd": (7 / 3) ** 0.5, "n": 3})
    assert sweep.mean_sd([5.0]) == {"mean": 5.0, "sd": None, "n": 1}
    rows = [
        {"depth": 2, "inference": "td", "seed": 1, "ll": -3.0, "kl": {"z1": 1.0, "z2": 0.0}},
        {"depth": 1, "inference": "td", "seed": 0, "ll": -9.0, "kl": {"z1": 4.0}},
        {"depth": 2, "inference": "td", "seed": 0, "ll": -1.0, "kl": {"z1": 3.0, "z2": 2.0}},
    ]
    summary = sweep.summarize(rows, ("depth", "inference"), ("ll",), ("kl",))
    assert [(r["depth"], r["seeds"]) for r in summary] == [(2, [0, 1]), (1, [0])]
    two = summary[0]
    assert two["ll"] == {"mean": -2.0, "sd": pytest.approx(2 ** 0.5), "n": 2}
    assert two["kl"]["z2"] == {"mean": 1.0, "sd": pytest.approx(2 ** 0.5), "n": 2}
    assert sweep.fmt(two["ll"]) == "-2.00 ± 1.41" and sweep.fmt(summary[1]["ll"]) == "-9.00"
    assert sweep.fmt_layers(two["kl"], 1) == "2.0 ± 1.4, 1.0 ± 1.4"


def test_sweep_budget_training_stops_where_it_says():
    """Without a budget, the sweep's training is one plain fit (bitwise); a spent budget
    stops it at the first check (every ``check_every`` steps) after at least one step,
    with the weights, step count and partial-epoch loss of that step."""
    from pyro_ladder import LadderVAE, fit

    sweep = _load("sweep")
    x = torch.rand(40, 6).round()  # (N, D): 5 steps of 8 rows an epoch
    spec = {"seed": 3, "epochs": 3, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 2,
            "device": "cpu"}

    def trained(epochs=3, **extra):
        pyro.clear_param_store()
        torch.manual_seed(1)
        vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=True)
        if extra.get("plain"):
            history = fit(vae.model, vae.guide, x, epochs=epochs, batch_size=8, lr=1e-2,
                          warmup_epochs=2, binarize=True, seed=3, progress=False)
            info = {"epochs": len(history), "final_train_loss": history[-1]["loss"]}
        else:
            info = sweep.train(vae, {"train": x, "binarize": True}, {**spec, **extra})
        return info, [p.detach().clone() for p in vae.parameters()]

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))

    (a, pa), (b, pb) = trained(budget_seconds=None), trained(plain=True)
    assert a["epochs"] == b["epochs"] == 3 and a["steps"] == 15
    assert a["final_train_loss"] == b["final_train_loss"] and same(pa, pb)
    # a spent budget, checked every 5 steps = at the first epoch's end: one epoch's fit
    (c, pc), (d, pd) = trained(budget_seconds=0.0, check_every=5), trained(1, plain=True)
    assert c["epochs"] == 1 and c["steps"] == 5 and same(pc, pd)
    assert c["final_train_loss"] == d["final_train_loss"]
    # checked every 2 steps: stops mid-epoch after 2 steps, weights moved from the start
    e, pe = trained(budget_seconds=0.0, check_every=2)
    torch.manual_seed(1)
    initial = [p.detach().clone() for p in LadderVAE(6, (3, 2), (8, 4)).parameters()]
    assert e["steps"] == 2 and e["epochs"] == 0.4 and e["final_train_loss"] > 0
    assert not same(pe, pd) and not same(pe, initial)


def test_sweep_training_saves_the_trained_weights(tmp_path):
    """A run's weights land in <out>/weights/<name>.pt, so it can be scored again."""
    from pyro_ladder import LadderVAE

    sweep = _load("sweep")
    x = torch.rand(16, 6).round()
    spec = {"seed": 3, "epochs": 1, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 0,
            "device": "cpu", "out": str(tmp_path), "name": "run-a"}
    torch.manual_seed(1)
    vae = LadderVAE(6, (3, 2), (8, 4))
    sweep.train(vae, {"train": x, "binarize": True}, spec)
    saved = torch.load(tmp_path / "weights" / "run-a.pt", weights_only=True)
    assert saved.keys() == vae.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in vae.state_dict().items())
    assert not list((tmp_path / "weights").glob("*.tmp"))


def test_seeds_ladder_gains_paired_by_seed():
    """Differences top-down minus bottom-up per seed; an unpaired seed is left out."""
    seeds = _load("seeds")
    ll = {("top-down", 0): -20.0, ("bottom-up", 0): -21.0, ("top-down", 1): -22.0,
          ("bottom-up", 1): -22.5, ("top-down", 2): -30.0}
    rows = [{"depth": 3, "inference": i, "seed": s, "test_log_likelihood": v,
             "test_elbo": 2 * v} for (i, s), v in ll.items()]
    (gain,) = seeds.ladder_gains(rows)
    assert gain["depth"] == 3 and gain["seeds"] == 2
    assert gain["test_log_likelihood"] == {"mean": 0.75, "sd": pytest.approx(0.125 ** 0.5),
                                           "n": 2}
    assert gain["test_elbo"]["mean"] == 1.5


def _fake_script(tmp_path, body: str) -> Path:
    """A worker that writes a row unless ``body`` exits first (no torch: fast)."""
    script = tmp_path / "fake.py"
    script.write_text(
        "import json, sys, time\nfrom pathlib import Path\n"
        "spec = json.loads(Path(sys.argv[2]).read_text())\n" + body +
        "\n(Path(spec['out']) / 'runs' / (spec['name'] + '.json')).write_text("
        "json.dumps({**spec, 'value': spec['seed'] * 2}))\n")
    return script


def test_sweep_processes_rows_failures_and_deadline(tmp_path):
    sweep = _load("sweep")
    script = _fake_script(tmp_path, "if spec['seed'] == 1: sys.exit('broken on purpose')\n"
                                    "if spec['seed'] == 2: time.sleep(60)")
    specs = [{"name": f"run{s}", "seed": s, "out": str(tmp_path)} for s in (0, 1, 2, 3)]
    rows, failures = sweep.run_processes(script, specs, tmp_path, jobs=2, deadline=5)
    assert [r["value"] for r in rows] == [0, 6]
    reasons = {f["name"]: f["reason"] for f in failures}
    assert reasons == {"run1": "exit status 1", "run2": "stopped at the 5 s deadline"}
    assert "broken on purpose" in next(f for f in failures if f["name"] == "run1")["log_tail"]


def test_sweep_deadline_skips_runs_not_started(tmp_path):
    sweep = _load("sweep")
    script = _fake_script(tmp_path, "time.sleep(60)")
    specs = [{"name": f"run{s}", "seed": s, "out": str(tmp_path)} for s in (0, 1)]
    rows, failures = sweep.run_processes(script, specs, tmp_path, jobs=1, deadline=1)
    assert rows == [] and [f["reason"] for f in failures] == [
        "stopped at the 1 s deadline", "not started: deadline"]


def test_workers_in_process_on_digits(tmp_path):
    """What one process of each sweep does (build, train, score), without the processes:
    the cached test rows are the shared test-set policy's, the row holds every metric."""
    from pyro_ladder.data import load_dataset
    from pyro_ladder.runs import test_set

    seeds, cvm, sweep = _load("seeds"), _load("conv_vs_mlp"), _load("sweep")
    digits = load_dataset("digits")
    path = sweep.cache_data(digits, "bernoulli", 20, 64, tmp_path / "digits.pt")
    assert torch.equal(sweep.load_cached({"data": str(path), "device": "cpu"})["test"],
                       test_set(digits, "bernoulli", 20))
    common = {"seed": 0, "device": "cpu", "epochs": 1, "budget_seconds": None,
              "warmup_epochs": 1, "batch_size": 32, "lr": 1e-3, "eval_samples": 4,
              "data": str(path)}
    ladder = seeds.work({**common, "inference": "top-down", "depth": 2})
    conv = cvm.work({**common, "family": "conv", "inference": "top-down",
                     "eval_max_rows": 64, "free_bits": 0.5})
    for row, sites in ((ladder, ["z1", "z2"]), (conv, ["z1", "z2", "z3"])):
        assert row["epochs"] == 1 and row["steps"] == 2 and row["num_test"] == 20
        assert row["test_elbo"] <= row["test_log_likelihood"] < 0
        assert sorted(row["kl"]) == sorted(row["active_units"]) == sites
        assert all(row["kl"][s] >= 0 for s in sites)
    assert conv["units"] == {"z1": 8 * 16, "z2": 8 * 4, "z3": 8}  # channels x positions


@pytest.mark.slow
def test_seeds_experiment_smallest_mode(tmp_path):
    """End to end: two processes, their JSONs, the summary and the table."""
    experiment = _load("seeds")
    payload = experiment.main(["--quick", "--depths", "2", "--seeds", "0", "--jobs", "2",
                               "--out", str(tmp_path)])
    assert payload["failures"] == []
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["inference"], r["depth"]) for r in saved["runs"]] == [
        ("bottom-up", 2), ("top-down", 2)]
    for row in saved["runs"]:
        assert row["test_elbo"] <= row["test_log_likelihood"] < 0 and row["epochs"] == 2
        assert sorted(row["kl"]) == sorted(row["active_units"]) == ["z1", "z2"]
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| 2 | ") == 3 and f"{saved['runs'][0]['test_elbo']:.2f}" in table
    assert saved["ladder_gains"][0]["seeds"] == 1


@pytest.mark.slow
def test_conv_vs_mlp_smallest_mode(tmp_path):
    """End to end on digits (no files): a conv and an MLP run, one process each."""
    experiment = _load("conv_vs_mlp")
    payload = experiment.main(["--quick", "--datasets", "digits", "--models",
                               "conv-vae,mlp-lvae", "--seeds", "0", "--jobs", "2",
                               "--out", str(tmp_path)])
    assert payload["failures"] == []
    runs = {r["model"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert sorted(runs) == ["conv-vae", "mlp-lvae"]
    assert sorted(runs["conv-vae"]["kl"]) == ["z1", "z2", "z3"]
    for row in runs.values():
        assert row["test_elbo"] <= row["test_log_likelihood"] < 0
        assert row["epochs"] >= 1 and row["num_test"] == 50
    assert "| digits | conv-vae | 1 |" in (tmp_path / "results.md").read_text()
