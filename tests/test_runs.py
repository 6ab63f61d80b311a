"""The run layer: a spec resolved once, ``train(spec, out)`` equal to ``pyro-ladder train``,
the run folder's format and the test-set policy."""

import dataclasses
import json
import re
import textwrap

import pytest
import torch
import torch.nn.functional as F

from pyro_ladder import ConfigError, LadderVAE
from pyro_ladder.checkpoint import load_checkpoint
from pyro_ladder.cli import build_parser, main
from pyro_ladder.cli.commands import as_flags, spec_of
from pyro_ladder.data import load_dataset
from pyro_ladder.runs import RunSpec, folder, test_set, training
from pyro_ladder.runs.testset import test_rows


def _metrics(out):
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("train_seconds")  # wall time differs between two runs
    return metrics


def test_the_five_line_script_does_what_the_cli_does(tmp_path, capsys):
    block = re.search(r"::\n\n((?:    .*\n|\n)+)", training.__doc__).group(1)
    code = textwrap.dedent(block).replace('"runs/demo"', repr(str(tmp_path / "script")))
    assert len([line for line in code.splitlines() if line.strip()]) <= 5
    exec(code, {})
    argv = ["train", "--epochs", "5", "--eval-samples", "100", "--out", str(tmp_path / "cli")]
    assert main([*argv, "--no-progress"]) == 0
    assert _metrics(tmp_path / "script") == _metrics(tmp_path / "cli")
    runs = (tmp_path / "script", tmp_path / "cli")
    (a, meta_a), (b, meta_b) = (load_checkpoint(out / "checkpoint.pt") for out in runs)
    assert meta_a == meta_b
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    names = {p.name for p in (tmp_path / "cli").iterdir()}
    assert names == {p.name for p in (tmp_path / "script").iterdir()}
    assert names == set(folder.RUN_FILES) | set(folder.PICTURES)


def test_the_cli_defaults_are_the_spec_defaults():
    assert spec_of(build_parser().parse_args(["train"])) == RunSpec()


def test_a_spec_resolves_the_data_set_defaults_once():
    digits = RunSpec().resolved("grey")
    assert (digits.preset, digits.epochs, digits.warmup_epochs) == ("digits", 200, 20)
    assert digits.likelihood == "bernoulli" and digits.resolved("grey") == digits
    frey = RunSpec(dataset="frey-faces").resolved("continuous")
    assert (frey.preset, frey.epochs, frey.warmup_epochs) == ("paper-mnist", 10, 1)
    assert frey.likelihood == "gaussian"
    given = RunSpec(dataset="mnist", preset="small", epochs=7, warmup_epochs=0).resolved("grey")
    assert (given.preset, given.epochs, given.warmup_epochs) == ("small", 7, 0)


def test_a_spec_is_frozen_and_refuses_unknown_fields_and_devices():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunSpec().epochs = 3
    with pytest.raises(TypeError, match="epoch"):
        RunSpec(epoch=3)
    with pytest.raises(ConfigError, match="'gpu' is not a device: use auto, cpu, cuda or cuda:N"):
        RunSpec(device="gpu")
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=rf"argument `seed` {seed} is outside \[0, 2\*\*32"):
            RunSpec(seed=seed)
    assert RunSpec(seed=2**32 - 1, device="cuda:3").seed == 2**32 - 1  # spelling only
    needs_two = "batch norm in training mode needs at least 2 rows"
    with pytest.raises(ConfigError, match=needs_two):
        RunSpec(batch_size=1, batch_norm=True)
    with pytest.raises(ConfigError, match=needs_two):
        RunSpec(batch_size=1).resolved("grey")  # an MLP: batch norm on by default
    assert RunSpec(batch_size=1, batch_norm=False).resolved("grey").batch_size == 1


def test_a_spec_takes_the_compile_kinds_and_refuses_others():
    for kind in (False, True, "step", "capture", "networks"):
        assert RunSpec(compile=kind).compile == kind
    for bad in ("yes", 1, "graph"):
        with pytest.raises(ConfigError, match="argument `compile` must be false, true, 'step'"):
            RunSpec(compile=bad)


def test_a_warm_up_that_never_ends_is_noted():
    assert RunSpec(epochs=3, warmup_epochs=2).resolved("grey").notes() == []
    assert RunSpec(epochs=3, warmup_epochs=0).resolved("grey").notes() == []
    (note,) = RunSpec(epochs=2, warmup_epochs=2).resolved("grey").notes()
    assert "KL weight ends at 0.50, not 1" in note  # epochs 0 and 1: beta 0 and 1/2
    (note,) = RunSpec(epochs=2, warmup_epochs=5).resolved("grey").notes()
    assert "ends at 0.20" in note and "down-weighted objective" in note


def test_grey_test_images_are_binarized_once_with_seed_0():
    data = load_dataset("digits")
    rows = test_set(data, "bernoulli", limit=50)
    picked = test_rows(len(data.test), 50)
    truth = torch.bernoulli(data.test, generator=torch.Generator().manual_seed(0))[picked]
    assert torch.equal(rows, truth) and set(rows.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(test_set(data, "bernoulli")[picked], rows)  # same pixels, any limit
    assert torch.equal(test_set(data, "gaussian", limit=50), data.test[picked])  # grey, kept


def test_a_conditional_test_set_packs_the_one_hot_label_beside_the_same_pixels():
    data = load_dataset("digits")
    rows = test_set(data, "bernoulli", limit=20, condition_dim=10)  # (20, 64 + 10)
    assert torch.equal(rows[:, :64], test_set(data, "bernoulli", limit=20))
    labels = data.test_labels[test_rows(len(data.test), 20)]
    assert torch.equal(rows[:, 64:], F.one_hot(labels, 10).float())


def test_a_limited_test_set_is_a_fixed_random_subset_not_the_first_rows():
    """A test file sorted by class (as the statically binarized MNIST file is: its first
    images are zeros) must not be scored on its head: a limit picks a seeded random
    subset, the same in every run, nested across limits, in file order; its rows keep
    their own labels. Truth: the subset's class counts against the binomial spread."""
    import dataclasses

    data = load_dataset("digits")
    order = data.test_labels.argsort(stable=True)
    ids = torch.arange(len(order), dtype=torch.float32)  # a row's pixel 0 names the row
    test = torch.cat([ids[:, None] / 1000, data.test[order][:, 1:]], 1)
    sorted_data = dataclasses.replace(data, test=test, test_labels=data.test_labels[order])
    picked = test_set(sorted_data, "gaussian", limit=100, condition_dim=10)  # (100, 64 + 10)
    rows = (picked[:, 0] * 1000).round().long()
    assert torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == 100
    assert torch.equal(picked[:, 64:].argmax(1), sorted_data.test_labels[rows])
    counts = torch.bincount(sorted_data.test_labels[rows], minlength=10).float()
    expected = 100 * torch.bincount(sorted_data.test_labels, minlength=10) / len(test)
    assert (counts - expected).abs().max() < 4 * (expected * 0.9).sqrt().max()  # ~3 each way
    assert rows.max() > len(test) * 0.9 and rows.min() < len(test) * 0.1  # the whole file
    assert torch.equal(test_set(sorted_data, "gaussian", limit=100), picked[:, :64])  # fixed
    fewer = (test_set(sorted_data, "gaussian", limit=30)[:, 0] * 1000).round().long()
    assert set(fewer.tolist()) <= set(rows.tolist())  # nested
    assert test_rows(len(test), len(test)) is None and test_rows(len(test), None) is None


def test_history_round_trip_with_a_key_some_epochs_lack(tmp_path):
    history = [{"epoch": 1, "loss": 2.5}, {"epoch": 2, "loss": 1.25, "monitor_elbo": -3.0}]
    folder.write_history(tmp_path / "history.csv", history)
    assert (tmp_path / "history.csv").read_text().splitlines()[0] == "epoch,loss,monitor_elbo"
    assert folder.read_history(tmp_path / "history.csv") == history
    assert folder.read_history(tmp_path / "missing.csv") == []


def test_library_arguments_become_flags_on_the_command_line():
    message = "use argument `batch_size` or argument `lr`; keep `lr` as is"
    assert as_flags(message) == "use --batch-size or --lr; keep `lr` as is"
    assert as_flags("or argument `batch_norm` False") == "or --no-batch-norm"


def test_python_runs_refuse_a_folder_that_holds_a_run(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="argument `out`.*already holds a run"):
        folder.prepare_out(tmp_path)


def _title_inside(fig) -> bool:
    fig.canvas.draw()
    box = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())  # pixels
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


@pytest.mark.parametrize("per_class, num", [(1, 1), (2, 2), (3, 3), (8, 64)])
def test_picture_titles_lie_inside_the_figure_on_narrow_grids(per_class, num):
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    conditional = LadderVAE(64, (4, 2), (16, 8), condition_dim=10)
    plain = LadderVAE(64, (4, 2), (16, 8))
    with torch.no_grad():
        figures = [
            folder.samples_figure(conditional, (8, 8), num, per_class, (3, 0, 7)),  # --classes
            folder.samples_figure(plain, (8, 8), num, per_class, None),
        ]
    for fig in figures:
        assert _title_inside(fig), fig.axes[0].get_title()
        assert fig.axes[0].get_title().replace("\n", " ").startswith("samples from")
        plt.close(fig)


def test_pictures_of_binary_data_are_ink_on_paper_and_grey_data_as_published():
    import matplotlib.pyplot as plt

    for likelihood, cmap in [("bernoulli", "gray_r"), ("gaussian", "gray")]:
        vae = LadderVAE(64, (4,), (16,), likelihood=likelihood)
        with torch.no_grad():
            fig = folder.samples_figure(vae, (8, 8), 4, 1, None)
        assert fig.axes[0].images[0].get_cmap().name == cmap
        plt.close(fig)
