"""What a trained run says: ``report.json``, ``report.md`` and its figures, and the
loading of a saved run with the test rows its training scored."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import torch

from .._util import eval_mode
from ..checkpoint import load_checkpoint
from ..data import load_dataset
from ..diagnostics import active_units, kl_per_unit, mutual_information
from ..errors import ConfigError
from ..plots import kl_per_unit_figure, pca_figure, save_figure
from . import folder
from .device import resolve_device
from .spec import RESUMABLE, from_options
from .testset import test_set
from .training import evaluate_run, summary

MI_ROWS = 1000  # images of the aggregate posterior behind I(x; z)


def load_run(checkpoint: Path, data_dir: Path | None = None, limit: int | None = None):
    """The saved model, its meta data, its data set and the test rows ``train`` scored."""
    vae, meta = load_checkpoint(checkpoint)
    if "dataset" not in meta:
        raise ConfigError(f"{checkpoint} does not name its data set; it cannot be loaded")
    data = load_dataset(meta["dataset"], data_dir)
    test = test_set(data, vae.config.likelihood, limit, vae.condition_dim)
    return vae, meta, data, test


def run_seed(meta: dict) -> int:
    """The seed a saved run trained and was evaluated with (0 for runs that lack one)."""
    seed = meta.get("seed")
    return seed if isinstance(seed, int) else 0


def run_notes(meta: dict) -> list[str]:
    """The warnings of the saved run's spec (:meth:`RunSpec.notes`); none when the
    checkpoint does not record the run's options."""
    options = meta.get("options")
    if not isinstance(options, dict) or set(options) != set(RESUMABLE):
        return []
    return from_options(options).notes()


def write_report(checkpoint: Path, out: Path, *, num_samples=1000, limit=1000, data_dir=None,
                 seed=None, progress=True, device="auto") -> dict:  # fmt: skip
    """Evaluate the run saved in ``checkpoint`` on ``limit`` test images on ``device``,
    write ``report.json``, ``report.md`` and its figures into ``out``; returns the report.
    ``seed`` None: the run's own, as :func:`~pyro_ladder.runs.evaluate_run` uses it."""
    where = resolve_device(device)
    vae, meta, data, test = load_run(checkpoint, data_dir, limit)
    vae, test = vae.to(where), test.to(where)
    labels = None if data.test_labels is None else data.test_labels[: len(test)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create argument `out` {out}: {err.strerror}") from None
    seed = run_seed(meta) if seed is None else seed
    report = summary(evaluate_run(vae, test, num_samples, seed, progress))
    units = active_units(vae.model, vae.guide, test)
    report["active_units"] = {k: v["active"] for k, v in units.items()}
    report["units"] = {k: v["units"] for k, v in units.items()}
    report["mutual_information"] = mutual_information(vae.guide, test[:MI_ROWS])
    kl_units = kl_per_unit(vae.model, vae.guide, test)
    history = folder.read_history(checkpoint.parent / "history.csv")
    figures = _figures(out, vae, test, labels, data.image_shape, units, kl_units, history)
    report = {
        "checkpoint": str(checkpoint),
        "dataset": meta["dataset"],
        "num_test": len(test),
        "condition": meta.get("condition"),
        "seed": seed,
        "notes": run_notes(meta),
        **report,
        "config": vae.config.to_dict(),
    }
    folder.write_json(out / "report.json", report)
    folder.write_text(out / "report.md", markdown(report, figures))
    report["figures"] = figures
    return report


def _figures(out, vae, test, labels, image_shape, units, kl_units, history) -> list:
    folder.write_pictures(out, vae, test, image_shape, history)
    save_figure(kl_per_unit_figure(kl_units, units), out / "kl_per_unit.png")
    with torch.no_grad(), eval_mode(vae):
        trace = pyro.poutine.trace(vae.guide).get_trace(test)
    # spatial latents (N, C, h, w) as (N, C * h * w): PCA sees every unit of a layer
    latents = {
        f"z{i}": trace.nodes[f"z{i}"]["value"].flatten(1).cpu() for i in range(1, vae.depth + 1)
    }
    title = f"{vae.config.inference} posterior samples, PCA per layer"
    save_figure(pca_figure(latents, labels, title), out / "pca.png")
    names = ["samples.png", "reconstructions.png", "kl_per_unit.png", "pca.png"]
    return names + (["curves.png"] if history else [])


def markdown(report: dict, figures: list) -> str:
    """``report.md``: the numbers of ``report`` in words and a table, then the figures."""
    rows = [
        f"| {site} | {report['kl_per_layer'][site]:.3f} | {report['active_units'][site]}"
        f"/{report['units'][site]} | {report['mutual_information'][site]:.3f} |"
        for site in sorted(report["kl_per_layer"], key=lambda s: int(s[1:]))
    ]
    given = " | c" if report.get("condition") else ""
    seen = min(report["num_test"], MI_ROWS)
    lines = [
        f"# Report: {report['checkpoint']}",
        "",
        f"{report['config']['inference']} model, {len(rows)} stochastic layers"
        + (", conditioned on the class label" if given else "")
        + f", data set {report['dataset']}, {report['num_test']} test images.",
        "",
        "- negative ELBO split per variable: "
        + ", ".join(f"cross-entropy of {k} {v:.3f}" for k, v in report["cross_entropy"].items())
        + " nats, plus the KL of each layer in the table below",
        f"- test log p(x{given}) (K={report['eval_samples']}): "
        f"**{report['test_log_likelihood']:.3f}** nats (higher is better)",
        f"- test ELBO: {report['test_elbo']:.3f} nats; mean effective sample size "
        f"{report['test_ess']:.1f} of {report['eval_samples']}",
        "",
        f"I(x; z) uses the aggregate posterior over {seen} images, so "
        f"it cannot exceed log N = {math.log(seen):.2f} nats.",
        "",
        *[f"**Warning:** {note}\n" for note in report.get("notes", [])],
        "| layer | KL (nats) | active units | I(x; z) (nats) |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    lines += [f"![{name[:-4]}]({name})\n" for name in figures]
    return "\n".join(lines)
