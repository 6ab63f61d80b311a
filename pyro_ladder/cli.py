"""``pyro-ladder train | evaluate | report | sample``: the command line turns options into a
config and calls the library. Bad input ends with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import pyro
import torch

from . import __version__
from ._util import atomic_write, eval_mode
from .checkpoint import load_checkpoint, load_training_checkpoint, save_checkpoint
from .condition import pack
from .config import INFERENCES, PRESETS, preset
from .data import DATASETS, binarize, load_dataset
from .diagnostics import active_units, kl_per_unit, mutual_information
from .elbo import ESTIMATORS, describe_estimators
from .errors import ConfigError, PyroLadderError, TrainingError
from .evaluate import evaluate
from .likelihoods import LIKELIHOODS
from .plots import (
    image_grid,
    kl_per_unit_figure,
    pca_figure,
    save_figure,
    training_curves,
)
from .train import check_fit_options, fit
from .vae import LadderVAE

RUN_FILES = ("checkpoint.pt", "metrics.json", "history.csv")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pyro-ladder`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PyroLadderError as err:
        print(f"pyro-ladder: error: {as_flags(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-ladder: interrupted", file=sys.stderr)
        return 130


def as_flags(message: str) -> str:
    """The library names arguments as ``argument `batch_size```; here they are flags."""
    return re.sub(r"argument `(\w+)`", lambda m: "--" + m[1].replace("_", "-"), message)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line, without the long usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-ladder",
        description="Ladder VAEs in Pyro. Log-likelihoods are log p(x) in nats per example "
        "(negative numbers; higher is better).",
    )
    parser.add_argument("--version", action="version", version=f"pyro_ladder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_report(sub)
    _add_sample(sub)
    return parser


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a model, evaluate it on the test set, write its outputs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a hierarchical VAE with SVI, then estimate the test log-likelihood "
        "log p(x) (nats per example, negative; higher is better) by importance sampling.\n\n"
        "estimators (--elbo):\n" + describe_estimators(),
    )
    p.add_argument(
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="data set (default: digits, embedded, no download)",
    )
    _add_data_dir(p)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named network (default: digits for digits, paper-mnist otherwise)",
    )
    p.add_argument("--latent-dims", type=_sizes, help="sizes of z1..zL, e.g. 64,32,16,8,4")
    p.add_argument("--hidden-dims", type=_sizes, help="MLP widths per layer, e.g. 512,256,128")
    p.add_argument("--inference", default="top-down", choices=INFERENCES)
    p.add_argument(
        "--condition",
        choices=("label",),
        default=None,
        help="train a class-conditional model p(x | c) on a labelled data set: the one-hot "
        "label enters the top prior and every network (default: unconditional)",
    )
    p.add_argument(
        "--likelihood",
        choices=sorted(LIKELIHOODS),
        help="default: gaussian for continuous data, bernoulli otherwise",
    )
    p.add_argument("--elbo", default="elbo", choices=sorted(ESTIMATORS), help="estimator")
    p.add_argument("--particles", type=_positive_int, default=1, help="samples per data point")
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help="default: 200 for digits, 10 otherwise"
    )
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--warmup-epochs",
        type=_nonnegative_int,
        default=None,
        help="KL warm-up length (default: a tenth of the epochs, as in the paper)",
    )
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=5000,
        help="importance samples K for the test log-likelihood (default 5000)",
    )
    p.add_argument(
        "--eval-limit",
        type=_positive_int,
        default=None,
        help="evaluate on the first N test images only (default: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: runs/<dataset>-<inference>-<time>)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --out to be a folder that holds an earlier run",
    )
    p.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        help="also log losses and per-layer KL for TensorBoard into this folder",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help="also save the run every N steps within an epoch (it is saved after every epoch)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="OUTDIR",
        help="continue the run in OUTDIR from its checkpoint, with its own options (add "
        "--epochs to train longer); the result equals an uninterrupted run's",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)


def _add_distributed(p):
    g = p.add_argument_group(
        "several processes, GPUs or machines (PyTorch Lightning: pip install "
        "'pyro_ladder[distributed]'; any of these options trains through Lightning)"
    )
    g.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        help="processes per machine, one per GPU or CPU process (default 1)",
    )
    g.add_argument(
        "--num-nodes",
        type=_positive_int,
        default=1,
        help="machines; set MASTER_ADDR, MASTER_PORT and NODE_RANK on each (default 1)",
    )
    g.add_argument(
        "--strategy",
        choices=("ddp", "ddp_find_unused_parameters_true"),
        default=None,
        help="data parallelism (default: ddp with more than one process)",
    )
    g.add_argument("--accelerator", choices=("cpu", "gpu", "auto"), default=None)
    g.add_argument(
        "--sync-batchnorm",
        action="store_true",
        help="batch-norm statistics over all processes' batches (GPUs only)",
    )


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="re-evaluate a saved model on its test set")
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `train`")
    p.add_argument(
        "--num-samples",
        type=_positive_int,
        default=5000,
        help="importance samples K (default 5000)",
    )
    p.add_argument(
        "--eval-limit",
        type=_positive_int,
        default=None,
        help="evaluate on the first N test images only (default: all)",
    )
    _add_data_dir(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_evaluate)


def _add_report(sub):
    p = sub.add_parser("report", help="write diagnostics, figures and a Markdown summary")
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `train`")
    p.add_argument("--out", type=Path, required=True, help="folder for the report")
    p.add_argument(
        "--num-samples",
        type=_positive_int,
        default=1000,
        help="importance samples K for log p(x) (default 1000)",
    )
    p.add_argument(
        "--eval-limit",
        type=_positive_int,
        default=1000,
        help="test images used (default: the first 1000)",
    )
    _add_data_dir(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_report)


def _add_sample(sub):
    p = sub.add_parser(
        "sample",
        help="draw images from a saved model (one row per class for a conditional model)",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `train`")
    p.add_argument("--out", type=Path, required=True, help="the picture to write (.png, .pdf)")
    p.add_argument(
        "--num", type=_positive_int, default=64, help="images of an unconditional model (64)"
    )
    p.add_argument(
        "--per-class",
        type=_positive_int,
        default=8,
        help="images per class (one row each) of a conditional model (default 8)",
    )
    p.add_argument(
        "--classes",
        type=_labels,
        default=None,
        help="the classes to draw, e.g. 0,3,7 (default: every class)",
    )
    _add_data_dir(p)  # only for runs saved before the image shape was recorded
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)


def _add_data_dir(p):
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the data files (default: $PYRO_LADDER_DATA, then ~/.cache/pyro_ladder)",
    )


def cmd_train(args) -> int:
    if _distributed(args):
        return _train_distributed(args)
    if args.resume is not None:
        return _resume(args)
    data = load_dataset(args.dataset, args.data_dir)
    vae = _model_for(args, data)
    test = _checked_test_set(args, vae, data)  # every check before anything is written
    out = _prepare_out(args)
    meta = {
        "dataset": args.dataset,
        "likelihood": args.likelihood,
        "epochs": args.epochs,
        "seed": args.seed,
        "elbo": args.elbo,
        "particles": args.particles,
        "condition": args.condition,
        "image_shape": list(data.image_shape),
        "options": {k: getattr(args, k) for k in RESUMABLE},
    }
    return _train_and_finish(args, vae, data, test, meta, out, None)


RESUMABLE = (
    "dataset", "preset", "latent_dims", "hidden_dims", "inference", "condition", "likelihood",
    "elbo", "particles", "epochs", "batch_size", "lr", "warmup_epochs", "batch_norm",
    "eval_samples", "eval_limit", "seed", "checkpoint_every",
)  # fmt: skip
"""The options of ``train`` stored in a run's checkpoint; ``--resume`` takes them from it."""


def _resume(args) -> int:
    """Continue the run in ``args.resume`` from its checkpoint with its own options."""
    out = args.resume
    vae, meta, training = load_training_checkpoint(out / "checkpoint.pt")
    stored = meta.get("options")
    if isinstance(stored, dict):
        stored = {"condition": None, **stored}  # runs saved before --condition existed
    if not isinstance(stored, dict) or set(stored) != set(RESUMABLE):
        raise ConfigError(f"{out}/checkpoint.pt does not record the options of its run")
    defaults = build_parser().parse_args(["train"])
    for key, value in stored.items():
        given = getattr(args, key)
        if key != "epochs" and given != getattr(defaults, key) and given != _plain(value):
            raise ConfigError(
                f"--resume continues the run with its own options, but --{key.replace('_', '-')}"
                f" {given} differs from the run's {value}: drop the option (only --epochs may "
                "change, to train longer)"
            )
        if key != "epochs" or given is None:
            setattr(args, key, _plain(value))
    done = training["position"]["epoch"]
    if done >= args.epochs and (out / "metrics.json").exists():
        raise ConfigError(
            f"the run in {out} has finished its {done} epochs: pass --epochs with a larger "
            "number to train it further"
        )
    meta = {**meta, "epochs": args.epochs, "options": {k: getattr(args, k) for k in RESUMABLE}}
    args.out = out
    data = load_dataset(args.dataset, args.data_dir)
    test = _checked_test_set(args, vae, data)
    print(f"resuming {out} at epoch {done + 1}, step {training['position']['step'] + 1}")
    return _train_and_finish(args, vae, data, test, meta, out, training)


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def _model_for(args, data) -> LadderVAE:
    """Fill in the data-dependent defaults of ``args``, then build the model, seeded."""
    args.likelihood = args.likelihood or ("gaussian" if data.kind == "continuous" else "bernoulli")
    args.epochs = args.epochs or (200 if args.dataset == "digits" else 10)
    if args.warmup_epochs is None:
        args.warmup_epochs = args.epochs // 10
    config = _config(args, data.x_dim, args.likelihood)
    if args.condition == "label":
        config = config.replace(condition_dim=_num_classes(args.dataset, data))
    pyro.set_rng_seed(args.seed)
    return LadderVAE.from_config(config)


def _num_classes(name: str, data) -> int:
    """Classes of a labelled data set (labels 0 .. C-1), or a ConfigError without labels."""
    if data.train_labels is None or data.test_labels is None:
        labelled = ", ".join(DATASETS_WITH_LABELS)
        raise ConfigError(
            f"--condition label needs class labels, but {name} has none: choose a labelled "
            f"data set ({labelled}) or drop --condition"
        )
    return int(max(data.train_labels.max(), data.test_labels.max())) + 1


DATASETS_WITH_LABELS = ("digits", "mnist", "fashion-mnist")


def _conditioned(vae, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``x' = (x, one_hot(label))`` for a model conditioned on the label, else ``x``."""
    if vae.condition_dim == 0:
        return x
    return pack(x, labels[: len(x)], vae.condition_dim)


def _dynamic(data, likelihood: str) -> bool:
    """Grey images under a Bernoulli likelihood are binarized anew every epoch."""
    return data.kind == "grey" and likelihood == "bernoulli"


def _checked_test_set(args, vae, data) -> torch.Tensor:
    """The test rows, after checking them and the training options against model and data."""
    test = _test_set(data, vae, _dynamic(data, args.likelihood), args.eval_limit)
    vae.check_data(test)
    check_fit_options(
        data.train, args.epochs, args.batch_size, args.lr, args.warmup_epochs, args.checkpoint_every
    )
    return test


def _train_and_finish(args, vae, data, test, meta, out, resume) -> int:
    """Train (saving the run as it goes), then evaluate and write every output."""
    print(
        f"training a {vae.depth}-layer {args.inference} model on {args.dataset} "
        f"({len(data.train)} images) for {args.epochs} epochs -> {out}"
    )
    saver = _Saver(out / "checkpoint.pt", vae, meta)
    try:
        history = fit(
            vae.model,
            vae.guide,
            _conditioned(vae, data.train, data.train_labels),
            elbo=args.elbo,
            num_particles=args.particles,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_epochs=args.warmup_epochs,
            seed=args.seed,
            binarize=_dynamic(data, args.likelihood),
            monitor=test[:500],
            progress=args.progress,
            tensorboard=args.tensorboard,
            checkpoint=saver,
            checkpoint_every=args.checkpoint_every,
            resume=resume,
        )
    except TrainingError as err:
        raise TrainingError(f"{err}. {saver.where()}") from None
    print(
        f"estimating log p(x) on {len(test)} test images with K={args.eval_samples} "
        "importance samples (--eval-samples and --eval-limit trade accuracy for time)"
    )
    result = _evaluate(vae, test, args.eval_samples, args.progress)
    train_seconds = history[-1]["seconds"]
    metrics = _metrics(args, vae, result, args.epochs, args.warmup_epochs, train_seconds, len(test))
    _write_history(out / "history.csv", history)
    _write_pictures(out, vae, test, data.image_shape, history)
    _write_json(out / "metrics.json", metrics)
    _print_result(metrics, out)
    return 0


class _Saver:
    """``fit``'s checkpoint callback: writes the run's checkpoint, remembers where it was."""

    def __init__(self, path: Path, vae, meta: dict):
        self.path, self.vae, self.meta, self.position = path, vae, meta, None

    def __call__(self, training: dict) -> None:
        save_checkpoint(self.path, self.vae, self.meta, training=training)
        self.position = training["position"]

    def where(self) -> str:
        if self.position is None:
            return "No checkpoint was written"
        epoch, step = self.position["epoch"], self.position["step"]
        at = f"after {epoch} epochs" + (f" and {step} steps" if step else "")
        return (
            f"The last good checkpoint ({at}) is kept in {self.path}; start a new run with "
            "other options, as resuming replays the same steps"
        )


def _distributed(args) -> bool:
    """Whether an option asks for PyTorch Lightning (several processes, a GPU)."""
    return (
        args.devices > 1
        or args.num_nodes > 1
        or args.strategy is not None
        or args.accelerator is not None
        or args.sync_batchnorm
    )


def _train_distributed(args) -> int:
    """``train`` through PyTorch Lightning on ``--devices`` x ``--num-nodes`` processes.

    Lightning's ddp starts the other processes of a machine by running the same command
    again, so every process runs this: each loads the data and builds the same model (DDP
    then copies rank 0's weights to all); global rank 0 alone writes the run folder.
    """
    from .distributed import ShardedRows, fit_distributed, make_trainer  # or ConfigError

    for name in ("lightning.pytorch", "lightning.fabric"):  # their INFO lines are chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    if getattr(args, "resume", None) is not None or getattr(args, "checkpoint_every", None):
        raise ConfigError("--resume and --checkpoint-every run in one process: drop them")
    data = load_dataset(args.dataset, args.data_dir)
    vae = _model_for(args, data)
    epochs, warmup = args.epochs, args.warmup_epochs
    dynamic = _dynamic(data, args.likelihood)
    test = _test_set(data, vae, dynamic, args.eval_limit)
    vae.check_data(test)
    train = _conditioned(vae, data.train, data.train_labels)
    trainer = make_trainer(
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy or ("ddp" if args.devices * args.num_nodes > 1 else "auto"),
        accelerator=args.accelerator or "auto",
        sync_batchnorm=args.sync_batchnorm,
        epochs=epochs,
        progress=args.progress,
        tensorboard=args.tensorboard,
    )
    ShardedRows(train, args.batch_size).check(trainer.world_size)
    if trainer.is_global_zero:
        print(
            f"training a {vae.depth}-layer {args.inference} model on {args.dataset} for {epochs} "
            f"epochs on {trainer.world_size} processes, {args.batch_size} images each per step "
            f"-> {_prepare_out(args)}"
        )
    history = fit_distributed(
        vae.model, vae.guide, train, trainer=trainer, elbo=args.elbo,
        num_particles=args.particles, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
        warmup_epochs=warmup, seed=args.seed, binarize=dynamic, monitor=test[:500],
    )  # fmt: skip
    if not trainer.is_global_zero:
        return 0
    meta = {"dataset": args.dataset, "likelihood": args.likelihood, "epochs": epochs}
    meta.update(seed=args.seed, elbo=args.elbo, particles=args.particles)
    meta.update(condition=args.condition, image_shape=list(data.image_shape))
    meta["processes"] = trainer.world_size
    return _finish_distributed(args, vae.cpu(), data, test, history, meta, warmup)


def _finish_distributed(args, vae, data, test, history, meta, warmup) -> int:
    """Rank 0, after Lightning: one checkpoint, the evaluation and the run's files."""
    out = args.out
    save_checkpoint(out / "checkpoint.pt", vae, meta)
    print(
        f"estimating log p(x) on {len(test)} test images with K={args.eval_samples} "
        "importance samples (--eval-samples and --eval-limit trade accuracy for time)"
    )
    result = _evaluate(vae, test, args.eval_samples, args.progress)
    train_seconds = history[-1]["seconds"]
    metrics = _metrics(args, vae, result, meta["epochs"], warmup, train_seconds, len(test))
    _write_history(out / "history.csv", history)
    _write_pictures(out, vae, test, data.image_shape, history)
    _write_json(out / "metrics.json", metrics)
    _print_result(metrics, out)
    return 0


def _load_run(args):
    """The saved model, its meta data, its data set and the test rows ``train`` scored."""
    vae, meta = load_checkpoint(args.checkpoint)
    if "dataset" not in meta:
        raise ConfigError(f"{args.checkpoint} does not name its data set; it cannot be loaded")
    data = load_dataset(meta["dataset"], args.data_dir)
    test = _test_set(data, vae, _dynamic(data, vae.config.likelihood), args.eval_limit)
    return vae, meta, data, test


def cmd_evaluate(args) -> int:
    vae, meta, _, test = _load_run(args)
    pyro.set_rng_seed(args.seed)
    result = _evaluate(vae, test, args.num_samples, args.progress)
    summary = _summary(result)
    print(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "dataset": meta["dataset"],
                "num_test": len(test),
                **summary,
            },
            indent=2,
        )
    )
    return 0


def cmd_report(args) -> int:
    vae, meta, data, test = _load_run(args)
    labels = None if data.test_labels is None else data.test_labels[: len(test)]
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {args.out}: {err.strerror}") from None
    pyro.set_rng_seed(args.seed)
    summary = _summary(_evaluate(vae, test, args.num_samples, args.progress))
    units = active_units(vae.model, vae.guide, test)
    summary["active_units"] = {k: v["active"] for k, v in units.items()}
    summary["units"] = {k: v["units"] for k, v in units.items()}
    summary["mutual_information"] = mutual_information(vae.guide, test[:1000])
    kl_units = kl_per_unit(vae.model, vae.guide, test)
    history = _read_history(args.checkpoint.parent / "history.csv")
    figures = _report_figures(
        args.out, vae, test, labels, data.image_shape, units, kl_units, history
    )
    report = {
        "checkpoint": str(args.checkpoint),
        "dataset": meta["dataset"],
        "num_test": len(test),
        "condition": meta.get("condition"),
        **summary,
        "config": vae.config.to_dict(),
    }
    _write_json(args.out / "report.json", report)
    _atomic_write(args.out / "report.md", _report_markdown(report, figures))
    print(f"wrote {args.out}/report.md with {len(figures)} figures")
    return 0


def _report_figures(out, vae, test, labels, image_shape, units, kl_units, history) -> list:
    _write_pictures(out, vae, test, image_shape, history)
    save_figure(kl_per_unit_figure(kl_units, units), out / "kl_per_unit.png")
    with torch.no_grad(), eval_mode(vae):
        trace = pyro.poutine.trace(vae.guide).get_trace(test)
    latents = {f"z{i}": trace.nodes[f"z{i}"]["value"] for i in range(1, vae.depth + 1)}
    title = f"{vae.config.inference} posterior samples, PCA per layer"
    save_figure(pca_figure(latents, labels, title), out / "pca.png")
    names = ["samples.png", "reconstructions.png", "kl_per_unit.png", "pca.png"]
    return names + (["curves.png"] if history else [])


def _report_markdown(report: dict, figures: list) -> str:
    rows = [
        f"| {site} | {report['kl_per_layer'][site]:.3f} | {report['active_units'][site]}"
        f"/{report['units'][site]} | {report['mutual_information'][site]:.3f} |"
        for site in sorted(report["kl_per_layer"], key=lambda s: int(s[1:]))
    ]
    given = " | c" if report.get("condition") else ""
    lines = [
        f"# Report: {report['checkpoint']}",
        "",
        f"{report['config']['inference']} model, {len(rows)} stochastic layers"
        + (", conditioned on the class label" if given else "")
        + f", data set {report['dataset']}, {report['num_test']} test images.",
        "",
        "- negative ELBO per variable (seed 004's decomposition): "
        + ", ".join(f"cross-entropy of {k} {v:.3f}" for k, v in report["cross_entropy"].items())
        + " nats, plus the KL column below",
        f"- test log p(x{given}) (K={report['eval_samples']}): "
        f"**{report['test_log_likelihood']:.3f}**"
        " nats (higher is better)",
        f"- test ELBO: {report['test_elbo']:.3f} nats; mean effective sample size "
        f"{report['test_ess']:.1f} of {report['eval_samples']}",
        "",
        f"I(x; z) uses the aggregate posterior over {min(report['num_test'], 1000)} images, so "
        f"it cannot exceed log N = {math.log(min(report['num_test'], 1000)):.2f} nats.",
        "",
        "| layer | KL (nats) | active units | I(x; z) (nats) |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    lines += [f"![{name[:-4]}]({name})\n" for name in figures]
    return "\n".join(lines)


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    keys = lines[0].split(",")
    return [
        {k: float(v) for k, v in zip(keys, line.split(","), strict=True) if v != ""}
        for line in lines[1:]
        if line
    ]


def _config(args, x_dim, likelihood):
    name = args.preset or ("digits" if args.dataset == "digits" else "paper-mnist")
    overrides = {
        "likelihood": likelihood,
        "inference": args.inference,
        "batch_norm": args.batch_norm,
    }
    if args.latent_dims:
        overrides["latent_dims"] = args.latent_dims
    if args.hidden_dims:
        overrides["hidden_dims"] = args.hidden_dims
    if args.inference == "bottom-up" and "meanfield" in args.elbo:
        raise ConfigError(
            "--elbo meanfield needs the guide to sample in the model's (top-down) order; "
            "use it with --inference top-down, or pick --elbo elbo for bottom-up"
        )
    return preset(name, x_dim, **overrides)


def _test_set(data, vae, dynamic: bool, limit: int | None) -> torch.Tensor:
    """Test rows; grey images are binarized once with a fixed seed so runs compare (the
    label is packed beside them afterwards, so a conditional run scores the same images)."""
    test = data.test if limit is None else data.test[:limit]
    if dynamic:
        test = binarize(test, generator=torch.Generator().manual_seed(0))
    return _conditioned(vae, test, data.test_labels)


def _evaluate(vae, test, num_samples, progress) -> dict:
    return evaluate(
        vae.model,
        vae.guide,
        test,
        num_samples=num_samples,
        iwae_k=tuple(k for k in (5, 50) if k <= num_samples),
        progress=progress,
    )


def _summary(result) -> dict:
    return {
        "eval_samples": result["num_samples"],
        "test_log_likelihood": _mean(result["log_likelihood"]),
        "test_elbo": _mean(result["elbo"]),
        "test_iwae": {str(k): _mean(v) for k, v in result["iwae"].items()},
        "test_ess": _mean(result["ess"]),
        "kl_per_layer": {site: _mean(v) for site, v in sorted(result["kl"].items())},
        "cross_entropy": {site: _mean(v) for site, v in result["cross_entropy"].items()},
    }


def _mean(values: torch.Tensor) -> float:
    """Mean in float64; ``evaluate`` has refused non-finite values (NumericalError)."""
    return values.double().mean().item()


def _metrics(args, vae, result, epochs, warmup, train_seconds, num_test) -> dict:
    return {
        "dataset": args.dataset,
        "inference": args.inference,
        "condition": args.condition,
        "likelihood": vae.config.likelihood,
        "elbo": args.elbo,
        "particles": args.particles,
        "epochs": epochs,
        "warmup_epochs": warmup,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": train_seconds,
        "num_test": num_test,
        **_summary(result),
        "config": vae.config.to_dict(),
        "versions": {
            "pyro_ladder": __version__,
            "pyro": pyro.__version__,
            "torch": torch.__version__,
        },
    }


def _prepare_out(args) -> Path:
    out = args.out
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{args.dataset}-{args.inference}-{stamp}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose another path")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not args.overwrite:
        raise ConfigError(
            f"--out {out} already holds a run ({', '.join(held)}): continue it with "
            f"--resume {out}, choose another folder, or pass --overwrite to replace it"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {out} is not writable: choose another folder")
    args.out = out
    return out


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, json.dumps(obj, indent=2) + "\n")


def _write_history(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for record in history for k in record))
    lines = [",".join(keys)]
    lines += [",".join(_csv_cell(r.get(k, "")) for k in keys) for r in history]
    _atomic_write(path, "\n".join(lines) + "\n")


def _csv_cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _write_pictures(out, vae, test, image_shape, history) -> None:
    """samples.png, reconstructions.png, and curves.png when there is a history."""
    save_figure(_samples_figure(vae, image_shape, 64, 8, None), out / "samples.png")
    originals = test[:32]
    pixels = vae.split(originals)[0]
    pairs = torch.stack([pixels, vae.reconstruct(originals)], 1).reshape(64, -1)
    save_figure(
        image_grid(pairs, image_shape, 8, "test image (left) and its reconstruction (right)"),
        out / "reconstructions.png",
    )
    if history:
        save_figure(training_curves(history), out / "curves.png")


def _samples_figure(vae, image_shape, num: int, per_class: int, classes):
    """``num`` draws of an unconditional model, or ``per_class`` draws of each class of a
    conditional one, a row per class (``classes``: which; default all)."""
    if vae.condition_dim == 0:
        return image_grid(vae.sample(num), image_shape, min(num, 8), "samples from the prior")
    classes = list(range(vae.condition_dim)) if classes is None else list(classes)
    bad = [k for k in classes if not 0 <= k < vae.condition_dim]
    if bad:
        raise ConfigError(
            f"--classes {bad} are not classes of this model: it knows {vae.condition_dim} "
            f"classes, 0 to {vae.condition_dim - 1}"
        )
    labels = torch.tensor(classes).repeat_interleave(per_class)  # (rows * per_class,)
    return image_grid(
        vae.sample(len(labels), labels),
        image_shape,
        per_class,
        "samples from p(x | c), one row per class c",
        row_labels=[str(k) for k in classes],
    )


def cmd_sample(args) -> int:
    vae, meta = load_checkpoint(args.checkpoint)
    shape = meta.get("image_shape")
    if shape is None:  # runs saved before the shape was recorded: ask the data set
        if "dataset" not in meta:
            raise ConfigError(f"{args.checkpoint} records neither its data set nor image shape")
        shape = load_dataset(meta["dataset"], args.data_dir).image_shape
    if vae.condition_dim == 0 and args.classes is not None:
        raise ConfigError("--classes needs a conditional model (trained with --condition label)")
    pyro.set_rng_seed(args.seed)
    figure = _samples_figure(vae, tuple(shape), args.num, args.per_class, args.classes)
    try:
        save_figure(figure, args.out)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot write --out {args.out}: {err}") from None
    rows = "one row per class" if vae.condition_dim else f"{args.num} images"
    print(f"wrote {args.out} ({rows})")
    return 0


def _print_result(metrics: dict, out: Path) -> None:
    given = " | c" if metrics.get("condition") else ""
    print(
        f"test log-likelihood (K={metrics['eval_samples']}): "
        f"{metrics['test_log_likelihood']:.2f} nats  [log p(x{given}), higher is better]"
    )
    print(
        f"test ELBO: {metrics['test_elbo']:.2f} nats   train time: {metrics['train_seconds']:.0f} s"
    )
    kl = ", ".join(f"{k} {v:.2f}" for k, v in metrics["kl_per_layer"].items())
    print(f"KL per layer (nats): {kl}")
    print(
        f"wrote {out}/: checkpoint.pt metrics.json history.csv samples.png "
        "reconstructions.png curves.png"
    )


def _int_list(text: str, what: str, example: str) -> tuple[int, ...]:
    """``"64,32,16"`` -> ``(64, 32, 16)`` (never empty: ``int("")`` fails)."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of {what}, e.g. {example}"
        ) from None


def _sizes(text: str) -> tuple[int, ...]:
    sizes = _int_list(text, "integers", "64,32,16")
    if min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _labels(text: str) -> tuple[int, ...]:
    labels = _int_list(text, "class numbers", "0,3,7")
    if min(labels) < 0:
        raise argparse.ArgumentTypeError(f"classes are numbers >= 0, got {text!r}")
    return labels


def _nonnegative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
