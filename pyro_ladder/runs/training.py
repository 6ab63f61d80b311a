"""``train(spec, out)``: one training run, on one process or through Lightning, from the
spec to the run folder (checkpoint, history, pictures, metrics).

Five lines do what ``pyro-ladder train --epochs 5 --eval-samples 100 --out runs/demo``
does (the same files, the same numbers)::

    from pathlib import Path
    from pyro_ladder.runs import RunSpec, train

    metrics = train(RunSpec(dataset="digits", epochs=5, eval_samples=100), Path("runs/demo"))
    print(metrics["test_log_likelihood"])
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyro
import torch

from .. import __version__
from ..checkpoint import load_training_checkpoint, save_checkpoint
from ..conv import ConvLadderVAE
from ..data import load_dataset
from ..elbo import make_elbo
from ..errors import ConfigError, TrainingError
from ..evaluate import evaluate
from ..train import check_fit_options, check_free_bits, fit
from ..vae import LadderVAE
from . import folder
from .device import accelerator_of, resolve_device
from .spec import DATASETS_WITH_LABELS, RESUMABLE, RunSpec, from_options, is_conv
from .testset import dynamic_binarization, test_set, with_labels

MONITOR_ROWS = 500  # held-out rows of the per-epoch monitor
_LIGHTNING = ("devices", "num_nodes", "strategy", "accelerator", "sync_batchnorm")
"""Fields of a run's setup that a checkpoint does not store: a resumed run takes them anew."""


def _quiet(line: str) -> None:
    logging.getLogger(__name__).info(line)


def _warn(line: str) -> None:
    logging.getLogger(__name__).warning(line)


def train(spec: RunSpec, out: Path | None = None, *, overwrite=False, echo=_quiet, warn=_warn):
    """Train the run ``spec`` describes, evaluate it and write its folder ``out``.

    Every check runs before anything is written. ``echo`` receives progress lines (the
    CLI passes ``print``), ``warn`` the warnings of :meth:`RunSpec.notes` (which
    ``metrics.json`` also records). Returns the metrics (as ``metrics.json`` holds them),
    or None on a Lightning process other than global rank 0.
    """
    device = resolve_device(spec.device)
    data = load_dataset(spec.dataset, spec.data_dir)
    spec = spec.resolved(data.kind)
    vae = build_model(spec, data)
    test = checked_test_set(spec, vae, data)
    out = out if out is not None else folder.default_out(spec.dataset, spec.inference)
    if spec.distributed:
        return _train_distributed(spec, vae, data, test, out, overwrite, echo, warn)
    folder.prepare_out(out, overwrite)
    for note in spec.notes():
        warn(note)
    return _train_one(spec, vae.to(device), data, test, _meta(spec, data), out, None, echo)


def resume(out: Path, given: RunSpec | None = None, *, echo=_quiet, warn=_warn) -> dict:
    """Continue the run in folder ``out`` from its checkpoint with its own options.

    ``given`` may only change ``epochs`` (to train longer) and the fields a checkpoint
    does not store (``data_dir``, ``progress``, ``tensorboard``, ``device``); a stored
    field set to another value than its default and the run's own is refused. The run
    may continue on another device than it started on.
    """
    given = given or RunSpec()
    device = resolve_device(given.device)
    vae, meta, training = load_training_checkpoint(out / "checkpoint.pt")
    _check_processes(out, training.get("processes"), given)
    spec = _resumed_spec(out, meta.get("options"), given)
    done = training["position"]["epoch"]
    if done >= spec.epochs and (out / "metrics.json").exists():
        raise ConfigError(
            f"the run in {out} has finished its {done} epochs: pass argument `epochs` with a "
            "larger number to train it further"
        )
    data = load_dataset(spec.dataset, spec.data_dir)
    spec = spec.resolved(data.kind)  # 0.1.0 runs stored preset=None: resolve it here
    test = checked_test_set(spec, vae, data)
    meta = {**meta, "epochs": spec.epochs, "options": spec.options()}
    if spec.distributed:
        return _train_distributed(spec, vae, data, test, out, True, echo, warn, meta, training)
    echo(_resuming(out, training))
    for note in spec.notes():
        warn(note)
    return _train_one(spec, vae.to(device), data, test, meta, out, training, echo)


def _resuming(out: Path, training: dict) -> str:
    position = training["position"]
    return f"resuming {out} at epoch {position['epoch'] + 1}, step {position['step'] + 1}"


def _check_processes(out: Path, processes: int | None, given: RunSpec) -> None:
    """Refuse to resume a run on another number of processes than it trained on."""
    if processes is None and given.distributed:
        raise ConfigError(
            f"the run in {out} trained in one process: resume it without argument `devices`, "
            "argument `num_nodes`, argument `strategy` and argument `accelerator`"
        )
    if processes is not None and not given.distributed:
        raise ConfigError(
            f"the run in {out} trained on {processes} process(es) through Lightning: resume "
            f"it the same way, e.g. with argument `devices` {processes} and the argument "
            "`accelerator` it used"
        )
    if processes is not None and given.devices * given.num_nodes != processes:
        raise ConfigError(
            f"the run in {out} trained on {processes} processes, not "
            f"{given.devices * given.num_nodes}: resume it on {processes} (argument `devices` "
            "x argument `num_nodes`), as another number would deal the rows into other batches"
        )


def _resumed_spec(out: Path, stored, given: RunSpec) -> RunSpec:
    if isinstance(stored, dict):
        # 0.1.0 runs saved before `condition` and `free_bits` existed lack them; this shim
        # ends in 0.2.0
        stored = {"condition": None, "free_bits": 0.0, **stored}
    if not isinstance(stored, dict) or set(stored) != set(RESUMABLE):
        raise ConfigError(f"{out}/checkpoint.pt does not record the options of its run")
    defaults, run = RunSpec(), from_options(stored)
    for key in RESUMABLE:
        value, mine = getattr(given, key), getattr(run, key)
        if key != "epochs" and value != getattr(defaults, key) and value != mine:
            raise ConfigError(
                f"argument `resume` continues the run with its own options, but argument `{key}` "
                f"{value} differs from the run's {stored[key]}: drop the option (only "
                "argument `epochs` may change, to train longer)"
            )
    kept = ("data_dir", "progress", "tensorboard", "device", *_LIGHTNING)
    kept = {k: getattr(given, k) for k in kept}
    return run.replace(epochs=given.epochs or run.epochs, **kept)


def build_model(spec: RunSpec, data) -> LadderVAE | ConvLadderVAE:
    """The network of a resolved ``spec`` for ``data``, its weights drawn from the seed:
    a :class:`ConvLadderVAE` for a conv preset, else a :class:`LadderVAE`."""
    if is_conv(spec.preset):
        config = spec.conv_config(data.image_shape)
        pyro.set_rng_seed(spec.seed)
        return ConvLadderVAE.from_config(config)
    condition_dim = num_classes(spec.dataset, data) if spec.condition == "label" else 0
    config = spec.config(data.x_dim, condition_dim)
    pyro.set_rng_seed(spec.seed)
    return LadderVAE.from_config(config)


def num_classes(name: str, data) -> int:
    """Classes of a labelled data set (labels 0 .. C-1), or a ConfigError without labels."""
    if data.train_labels is None or data.test_labels is None:
        raise ConfigError(
            f"argument `condition` label needs class labels, but {name} has none: choose a "
            f"labelled data set ({', '.join(DATASETS_WITH_LABELS)}) or drop argument "
            "`condition`"
        )
    return int(max(data.train_labels.max(), data.test_labels.max())) + 1


def checked_test_set(spec: RunSpec, vae, data) -> torch.Tensor:
    """The test rows, after checking them and the training options against model and data."""
    test = test_set(data, spec.likelihood, spec.eval_limit, vae.condition_dim)
    vae.check_data(test)
    check_fit_options(
        data.train, spec.epochs, spec.batch_size, spec.lr, spec.warmup_epochs,
        spec.checkpoint_every, spec.seed,
    )  # fmt: skip
    check_free_bits(spec.free_bits, spec.elbo)
    if spec.compile and spec.distributed:
        raise ConfigError(
            "argument `compile` runs in one process for now: drop it, or the options that "
            "start Lightning"
        )
    if spec.free_bits and spec.distributed:
        raise ConfigError(
            "argument `free_bits` runs in one process for now: drop it, or the options "
            "that start Lightning"
        )
    # the estimator's own refusals of this network (DReG with batch norm in training mode)
    check_pair = getattr(make_elbo(spec.elbo, spec.particles), "check_pair", None)
    if check_pair is not None:
        check_pair(vae.model, vae.guide)
    return test


def _meta(spec: RunSpec, data, processes: int | None = None) -> dict:
    """What a run's checkpoint records beside the weights."""
    meta = {
        "dataset": spec.dataset,
        "likelihood": spec.likelihood,
        "epochs": spec.epochs,
        "seed": spec.seed,
        "elbo": spec.elbo,
        "particles": spec.particles,
        "condition": spec.condition,
        "image_shape": list(data.image_shape),
        "options": spec.options(),
    }
    if processes is not None:
        meta["processes"] = processes
    return meta


def _train_one(spec, vae, data, test, meta, out, training, echo) -> dict:
    """One process: train (saving the run as it goes), then finish the run."""
    echo(
        f"training a {vae.depth}-layer {spec.inference} model on {spec.dataset} "
        f"({len(data.train)} images) for {spec.epochs} epochs -> {out}"
    )
    saver = _Saver(out / "checkpoint.pt", vae, meta)
    device = _device_of(vae)
    rows = with_labels(data.train, data.train_labels, vae.condition_dim).to(device)
    test = test.to(device)
    try:
        history = fit(
            vae.model, vae.guide, rows,
            elbo=spec.elbo, num_particles=spec.particles, epochs=spec.epochs,
            batch_size=spec.batch_size, lr=spec.lr, warmup_epochs=spec.warmup_epochs,
            seed=spec.seed, binarize=dynamic_binarization(data.kind, spec.likelihood),
            monitor=test[:MONITOR_ROWS], progress=spec.progress, tensorboard=spec.tensorboard,
            checkpoint=saver, checkpoint_every=spec.checkpoint_every, resume=training,
            free_bits=spec.free_bits, compile=spec.compile,
        )  # fmt: skip
    except TrainingError as err:
        raise TrainingError(f"{err}. {saver.where()}") from None
    return _finish(spec, vae, data, test, history, out, echo)


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


def _device_of(vae) -> torch.device:
    return next(vae.parameters()).device


def _train_distributed(
    spec, vae, data, test, out, overwrite, echo, warn, meta=None, training=None
) -> dict | None:
    """Lightning on ``devices`` x ``num_nodes`` processes. Lightning's ddp starts the other
    processes of a machine by running the same command again, so every process runs this:
    each builds the same model (DDP then copies rank 0's weights to all), or loads the
    same checkpoint when resuming (``training``); global rank 0 alone writes the run
    folder."""
    from ..distributed import ShardedRows, fit_distributed, make_trainer  # or ConfigError

    for name in ("lightning.pytorch", "lightning.fabric"):  # their INFO lines are chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    train_rows = with_labels(data.train, data.train_labels, vae.condition_dim)
    trainer = make_trainer(
        devices=spec.devices, num_nodes=spec.num_nodes,
        strategy=spec.strategy or ("ddp" if spec.devices * spec.num_nodes > 1 else "auto"),
        accelerator=accelerator_of(spec.device, spec.accelerator),
        sync_batchnorm=spec.sync_batchnorm,
        epochs=spec.epochs, progress=spec.progress, tensorboard=spec.tensorboard,
    )  # fmt: skip
    ShardedRows(train_rows, spec.batch_size).check(trainer.world_size)
    if trainer.is_global_zero:
        echo(
            _resuming(out, training) if training is not None else
            f"training a {vae.depth}-layer {spec.inference} model on {spec.dataset} for "
            f"{spec.epochs} epochs on {trainer.world_size} processes, {spec.batch_size} images "
            f"each per step -> {folder.prepare_out(out, overwrite)}"
        )  # fmt: skip
        for note in spec.notes():
            warn(note)
    meta = meta if meta is not None else _meta(spec, data, trainer.world_size)
    saver = _Saver(out / "checkpoint.pt", vae, meta)  # called on global rank 0 only
    history = fit_distributed(
        vae.model, vae.guide, train_rows, trainer=trainer, elbo=spec.elbo,
        num_particles=spec.particles, epochs=spec.epochs, batch_size=spec.batch_size,
        lr=spec.lr, warmup_epochs=spec.warmup_epochs, seed=spec.seed,
        binarize=dynamic_binarization(data.kind, spec.likelihood), monitor=test[:MONITOR_ROWS],
        checkpoint=saver, checkpoint_every=spec.checkpoint_every, resume=training,
    )  # fmt: skip
    if not trainer.is_global_zero:
        return None
    return _finish(spec, vae.cpu(), data, test, history, out, echo)  # the last save is kept


def _finish(spec, vae, data, test, history, out, echo) -> dict:
    """Evaluate the trained model and write the rest of the run folder."""
    echo(
        f"estimating log p(x) on {len(test)} test images with K={spec.eval_samples} "
        "importance samples (argument `eval_samples` and argument `eval_limit` trade "
        "accuracy for time)"
    )
    result = evaluate_run(vae, test, spec.eval_samples, spec.seed, spec.progress)
    metrics = _metrics(spec, vae, result, history[-1]["seconds"], len(test))
    folder.write_history(out / "history.csv", history)
    folder.write_pictures(out, vae, test, data.image_shape, history)
    folder.write_json(out / "metrics.json", metrics)
    return metrics


def evaluate_run(vae, test, num_samples: int, seed: int, progress: bool = False) -> dict:
    """The evaluation of a run: log p(x) with K = ``num_samples``, and IWAE at 5 and 50.

    The one evaluation protocol of ``train``, ``evaluate`` and ``report``: the random
    numbers are seeded with ``seed`` first (a run uses its own seed), so re-evaluating a
    saved run at its K, seed and test rows, on the same device, gives its ``metrics.json``
    numbers exactly, whatever random state training left behind.
    """
    pyro.set_rng_seed(seed)
    return evaluate(
        vae.model,
        vae.guide,
        test,
        num_samples=num_samples,
        iwae_k=tuple(k for k in (5, 50) if k <= num_samples),
        progress=progress,
    )


def summary(result: dict) -> dict:
    """:func:`evaluate_run`'s result as per-example means (plain floats)."""
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


def _metrics(spec, vae, result, train_seconds, num_test) -> dict:
    return {
        "dataset": spec.dataset,
        "inference": spec.inference,
        "condition": spec.condition,
        "likelihood": vae.config.likelihood,
        "elbo": spec.elbo,
        "particles": spec.particles,
        "epochs": spec.epochs,
        "warmup_epochs": spec.warmup_epochs,
        "free_bits": spec.free_bits,
        "compile": spec.compile,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "seed": spec.seed,
        "notes": spec.notes(),
        "train_seconds": train_seconds,
        "num_test": num_test,
        **summary(result),
        "config": vae.config.to_dict(),
        "versions": {
            "pyro_ladder": __version__,
            "pyro": pyro.__version__,
            "torch": torch.__version__,
        },
    }
