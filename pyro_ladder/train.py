"""``fit``: the SVI loop with warm-up, dynamic binarization, a progress bar and a history."""

from __future__ import annotations

import logging
import math
import time

import pyro
import pyro.optim
import torch
from pyro.infer import ELBO, SVI
from tqdm.auto import tqdm

from .data import binarize as binarize_pixels
from .elbo import make_elbo
from .errors import ConfigError, TrainingError
from .evaluate import evaluate
from .warmup import kl_weight, with_kl_weight

log = logging.getLogger(__name__)


def fit(
    model,
    guide,
    data: torch.Tensor,
    *args,
    elbo: str | ELBO = "elbo",
    num_particles: int = 1,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    warmup_epochs: int = 0,
    seed: int | None = 0,
    binarize: bool = False,
    optimizer: pyro.optim.PyroOptim | None = None,
    monitor: torch.Tensor | None = None,
    progress: bool = True,
    callback=None,
    tensorboard: str | None = None,
    **kwargs,
) -> list[dict]:
    """Train ``model``/``guide`` on ``data (N, ...)`` with ``pyro.infer.SVI``.

    Each epoch visits the rows in a fresh random order in batches of ``batch_size`` (the
    last, incomplete batch is dropped so batch norm always sees a full batch). Extra
    ``args``/``kwargs`` go to model and guide after the batch.

    :param elbo: an estimator name of :func:`~pyro_ladder.make_elbo` or a Pyro ELBO object.
    :param num_particles: samples per data point when ``elbo`` is a name.
    :param warmup_epochs: KL warm-up length; the latent terms' weight is ``epoch / warmup_epochs``
        (see :mod:`pyro_ladder.warmup`). 0 disables warm-up.
    :param seed: seeds torch, Python and numpy through ``pyro.set_rng_seed``; None leaves them.
    :param binarize: draw binary pixels from grey data anew every epoch (dynamic binarization).
    :param optimizer: a ``pyro.optim`` optimizer; default ``Adam(lr)``.
    :param monitor: held-out rows scored after every epoch (one-sample ELBO and per-site KL).
    :param callback: called as ``callback(record)`` after every epoch.
    :param tensorboard: a folder: log every number of each epoch's record there with
        TensorBoard's ``SummaryWriter`` (needs the ``tensorboard`` package). Off by default.
    :returns: one dict per epoch: ``epoch``, ``loss`` (nats per example, the warmed-up
        negative objective), ``kl_weight``, ``seconds``, and with ``monitor`` also
        ``monitor_elbo`` and ``kl_<site>``.
    :raises TrainingError: when the loss becomes NaN or infinite (the message names the step).
    """
    _check_fit_options(data, epochs, batch_size, lr, warmup_epochs)
    if seed is not None:
        pyro.set_rng_seed(seed)
    loss_fn = make_elbo(elbo, num_particles) if isinstance(elbo, str) else elbo
    optim = optimizer if optimizer is not None else pyro.optim.Adam({"lr": lr})
    if warmup_epochs:
        model, guide = with_kl_weight(model), with_kl_weight(guide)
    svi = SVI(model, guide, optim, loss_fn)
    steps_per_epoch = max(1, len(data) // batch_size)
    history, start = [], time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step")
    writer = _summary_writer(tensorboard)
    try:
        for epoch in range(epochs):
            beta = kl_weight(epoch, warmup_epochs)
            weight = (data.new_tensor(beta),) if warmup_epochs else ()
            x_epoch = binarize_pixels(data) if binarize else data
            loss = _run_epoch(svi, x_epoch, batch_size, weight, args, kwargs, epoch, bar)
            record = {"epoch": epoch + 1, "loss": loss, "kl_weight": beta}
            record["seconds"] = time.perf_counter() - start
            if monitor is not None:
                record.update(_monitor(svi, monitor, args, kwargs, warmup_epochs))
            history.append(record)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.2f}", beta=f"{beta:.2f}")
            log.info("epoch %d loss %.3f nats/example", epoch + 1, loss)
            if writer is not None:
                for key, value in record.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch + 1)
            if callback is not None:
                callback(record)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return history


def _summary_writer(log_dir):
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


def _run_epoch(svi, x, batch_size, weight, args, kwargs, epoch, bar) -> float:
    """One pass over ``x`` in a random order; returns the mean loss per example."""
    order = torch.randperm(len(x))
    steps = max(1, len(x) // batch_size)
    total, seen = 0.0, 0
    for step in range(steps):
        batch = x[order[step * batch_size : (step + 1) * batch_size]]  # (B, ...)
        try:
            loss = svi.step(*weight, batch, *args, **kwargs)
        except ValueError as err:  # Pyro's validation: a distribution got NaN parameters
            if "invalid values" not in str(err):
                raise
            loss = math.nan
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}: lower the "
                "learning rate (--lr), add warm-up, or check the data for extreme values"
            )
        total += loss
        seen += len(batch)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / seen:.2f}")
    return total / seen


def _monitor(svi, data, args, kwargs, warmed) -> dict:
    """One-sample ELBO and per-site KL on held-out rows, in nats per example."""
    model, guide = svi.model, svi.guide
    if warmed:  # score the plain pair, not the warmed-up wrappers
        model, guide = model.__wrapped__, guide.__wrapped__
    result = evaluate(model, guide, data, *args, num_samples=1, **kwargs)
    record = {"monitor_elbo": result["elbo"].mean().item()}
    record.update({f"kl_{site}": v.mean().item() for site, v in result["kl"].items()})
    return record


def _check_fit_options(data, epochs, batch_size, lr, warmup_epochs):
    if len(data) == 0:
        raise ConfigError("the training data are empty: pass at least one row")
    for name, v in [("epochs", epochs), ("batch_size", batch_size)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if batch_size > len(data):
        raise ConfigError(
            f"batch size {batch_size} exceeds the {len(data)} training rows: "
            f"use a batch size of at most {len(data)} (--batch-size)"
        )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the learning rate must be a positive number, got {lr!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
