"""``fit``: the SVI loop with warm-up, dynamic binarization, a progress bar and a history."""

from __future__ import annotations

import collections
import copy
import logging
import math
import time
import warnings

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import ELBO, SVI
from tqdm.auto import tqdm

from . import device as placement
from ._util import rng_state, set_rng_state, without_side_effects
from .allocator import keep_freed_memory
from .data import binarize as binarize_pixels
from .elbo import _compile_kind, make_elbo
from .errors import ConfigError, TrainingError
from .evaluate import evaluate
from .freebits import FreeBits
from .optim import Adam
from .warmup import kl_weight, with_kl_weight

log = logging.getLogger(__name__)

FREE_BITS_ESTIMATORS = ("elbo", "meanfield", "tracegraph")
"""Estimators whose objective free bits floor exactly (they score a model site by its
``log_prob`` outside any log-mean-exp); see :mod:`pyro_ladder.freebits`."""

ADDED_OPTIONS = {"free_bits": 0.0}
"""Options of :func:`fit` newer than some saved runs, with the value those runs used."""


def fit(
    model,
    guide,
    data: torch.Tensor,
    *args,
    elbo: str | ELBO = "elbo",
    num_particles: int = 1,
    compile: bool | dict = False,
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
    checkpoint=None,
    checkpoint_every: int | None = None,
    resume: dict | None = None,
    free_bits: float = 0.0,
    device: str | torch.device | None = None,
    sync_every: int = 10,
    **kwargs,
) -> list[dict]:
    """Train ``model``/``guide`` on ``data (N, ...)`` with ``pyro.infer.SVI``.

    Each epoch visits the rows in a fresh random order in batches of ``batch_size`` (the
    last, incomplete batch is dropped so batch norm always sees a full batch). Extra
    ``args``/``kwargs`` go to model and guide after the batch.

    On a CPU, ``fit`` lets glibc's ``malloc`` keep freed memory for the next step
    (:func:`~pyro_ladder.keep_freed_memory`, once per process: no page faults for memory a
    step frees and the next takes again; ``PYRO_LADDER_MALLOC=default`` opts out).

    :param elbo: an estimator name of :func:`~pyro_ladder.make_elbo` or a Pyro ELBO object.
    :param num_particles: samples per data point when ``elbo`` is a name.
    :param compile: ``True`` captures the whole training step (forward and backward) into
        one graph and runs it compiled with ``torch.compile``; ``"networks"`` compiles only
        the networks, Pyro's tracing eager; a dict gives ``torch.compile`` options (and
        ``"kind"``): ``make_elbo(elbo, num_particles, compile=compile)``
        (:mod:`pyro_ladder.elbo.captured`). The first step captures and compiles. For an
        ``elbo`` object, wrap it yourself with :class:`~pyro_ladder.elbo.CompiledStep`.
    :param warmup_epochs: KL warm-up length; the latent terms' weight is ``epoch / warmup_epochs``
        (see :mod:`pyro_ladder.warmup`). 0 disables warm-up.
    :param seed: seeds torch, Python and numpy through ``pyro.set_rng_seed``; None leaves them.
    :param binarize: draw binary pixels from grey data anew every epoch (dynamic binarization).
    :param optimizer: a ``pyro.optim`` optimizer; default :class:`pyro_ladder.optim.Adam`
        with ``lr`` (``pyro.optim.Adam``'s update in one step for all parameters).
    :param monitor: held-out rows scored after every epoch (one-sample ELBO and per-site KL).
    :param callback: called as ``callback(record)`` after every epoch.
    :param tensorboard: a folder: log every number of each epoch's record there with
        TensorBoard's ``SummaryWriter`` (needs the ``tensorboard`` package). Off by default.
    :param checkpoint: called as ``checkpoint(state)`` before the first step, after every
        epoch and every ``checkpoint_every`` steps, with the training state (a dict of plain
        data and tensors: position, history, optimizer state, RNG states). The caller saves
        it beside the weights, e.g. ``lambda s: save_checkpoint(path, vae, meta, training=s)``.
    :param checkpoint_every: also call ``checkpoint`` every this many steps within an epoch.
    :param device: where to train: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``;
        the modules behind ``model`` and ``guide`` (bound methods such as ``vae.model``) move
        there. ``None`` (default): the device of their parameters, i.e. call
        ``vae.to("cuda")`` first, or pass ``device="cuda"``. The training set (and
        ``monitor``) moves there once if it takes at most a quarter of the device's free
        memory (else each batch moves); batches are sliced and binarized there.
    :param sync_every: steps between reads of the loss on the host (the progress bar's
        number, the check for a non-finite loss). A loss returned as a tensor is read only
        then, so the device need not wait for the host every step; a non-finite one still
        stops training at that read, naming the step that produced it. Pyro's own
        estimators return the loss as a Python number (they read it every step), which is
        checked at once. Checkpoints read it first, and check that the parameters and the
        optimizer state are finite, so a saved state never follows a non-finite loss nor
        holds a NaN (a finite loss with an infinite gradient).
    :param resume: a training state saved by ``checkpoint`` (with the weights it was saved
        with already loaded): training continues from that point with the same random
        numbers, so the run ends bitwise equal to one that was never interrupted. The
        options must be those of the saved run; only ``epochs`` may grow.
    :param free_bits: ``lambda`` in nats: each training step floors every latent layer's
        batch-mean KL at ``lambda`` (:class:`~pyro_ladder.FreeBits`); the monitor still
        scores the plain ELBO. 0 (the default) is off. Needs an ELBO estimator
        (:data:`FREE_BITS_ESTIMATORS`), not an importance-weighted one.
    :returns: one dict per epoch: ``epoch``, ``loss`` (nats per example, the warmed-up
        and floored negative objective), ``kl_weight``, ``seconds``, and with ``monitor`` also
        ``monitor_elbo`` and ``kl_<site>``.
    :raises TrainingError: when the loss becomes NaN or infinite, or a checkpoint would save
        non-finite parameters or optimizer state (the message names the step;
        ``checkpoint`` is not called again, so the last good state stays on disk).
    """
    check_fit_options(data, epochs, batch_size, lr, warmup_epochs, checkpoint_every, seed)
    check_free_bits(free_bits, elbo)
    _check_positive("sync_every", sync_every)
    device = placement.resolve(device, model, guide, data)
    if device.type == "cpu":
        keep_freed_memory()  # glibc keeps freed memory for the next step (pyro_ladder.allocator)
    placement.check_dtype(model, guide, data)
    data = placement.place_rows(data, device)
    monitor = None if monitor is None else monitor.to(device)
    options = {
        "elbo": elbo if isinstance(elbo, str) else type(elbo).__name__,
        "num_particles": num_particles,
        "batch_size": batch_size,
        "lr": float(lr),
        "warmup_epochs": warmup_epochs,
        "binarize": bool(binarize),
        "num_rows": len(data),
        "free_bits": float(free_bits),
    }
    if resume is None and seed is not None:
        pyro.set_rng_seed(seed)
    if compile is not False and not isinstance(elbo, str):
        raise ConfigError(
            "compile applies to an estimator given by name; wrap an ELBO object yourself: "
            "pyro_ladder.elbo.CompiledStep(elbo)"
        )
    loss_fn = make_elbo(elbo, num_particles, compile=compile) if isinstance(elbo, str) else elbo
    optim = optimizer if optimizer is not None else Adam({"lr": lr})
    if warmup_epochs:
        model, guide = with_kl_weight(model), with_kl_weight(guide)
    svi = SVI(model, guide, optim, loss_fn)
    run = _Run(svi, data, options, args, kwargs, checkpoint, checkpoint_every)
    run.device, run.sync_every = device, sync_every
    run.compiling = _compiles(compile)
    if resume is not None:
        run.restore(resume, epochs)
    return run.train(epochs, monitor, progress, callback, tensorboard)


class _Run:
    """The loop of :func:`fit` and its position, which a checkpoint saves and restores.

    ``epoch`` counts finished epochs, ``step`` the finished steps of the current one, whose
    loss so far is ``total`` over ``seen`` rows. ``epoch_rng`` holds the RNG states at the
    start of the current epoch: they redraw its binarization and order on resume.
    """

    def __init__(self, svi, data, options, args, kwargs, checkpoint, checkpoint_every):
        self.svi, self.data, self.options = svi, data, options
        self.args, self.kwargs = args, kwargs
        self.steps = max(1, len(data) // options["batch_size"])
        self.epoch, self.step, self.total, self.seen = 0, 0, 0.0, 0
        self.seconds, self.history, self.epoch_rng = 0.0, [], None
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.device, self.sync_every = data.device, 10
        self.pending = []  # (step, loss as a tensor or a float, rows) not yet read
        self.resumed = False
        self.compiling = False  # the next step compiles (compile=True): say so while it runs

    def train(self, epochs, monitor, progress, callback, tensorboard) -> list[dict]:
        bar = tqdm(total=epochs * self.steps, disable=not progress, unit="step")
        bar.update(self.epoch * self.steps + self.step)
        writer = _summary_writer(tensorboard)
        start, before = time.perf_counter(), self.seconds
        if self.epoch == 0 and self.step == 0:
            self._save()
        try:
            while self.epoch < epochs:
                record = self._epoch(epochs, bar)
                if monitor is not None:
                    record.update(_monitor(self.svi, monitor, self.args, self.kwargs, self.warm))
                self.seconds = before + time.perf_counter() - start
                record["seconds"] = self.seconds
                self._finish_epoch(record, bar, writer, callback)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return list(self.history)

    @property
    def warm(self) -> int:
        return self.options["warmup_epochs"]

    def _epoch(self, epochs, bar) -> dict:
        """Run the remaining steps of the current epoch; returns its record so far."""
        beta = kl_weight(self.epoch, self.warm)
        weight = (self.data.new_tensor(beta),) if self.warm else ()
        x, order = self._epoch_data()
        batch_size = self.options["batch_size"]
        while self.step < self.steps:
            rows = order[self.step * batch_size : (self.step + 1) * batch_size]
            batch = placement.to_device(x[rows], self.device)  # (B, ...)
            if self.compiling:
                log.info("compiling the training step: the first step takes a while, once")
                bar.set_postfix_str("compiling the step (the first step only)")
            self.pending.append((self.step + 1, self._step(weight, batch), len(rows)))
            self.step += 1
            bar.update(1)
            if self.compiling:
                self.compiling = False
                bar.set_postfix(epoch=self.epoch + 1)
            if self.step % self.sync_every == 0:
                self._sync()
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{self.total / self.seen:.2f}")
            every = self.checkpoint_every
            if every and self.step % every == 0 and self.step < self.steps:
                self._save()
        self._sync()
        return {"epoch": self.epoch + 1, "loss": self.total / self.seen, "kl_weight": beta}

    def _sync(self) -> None:
        """Read the pending losses on the host (one wait for the device for all of them),
        add them to the epoch's total, and stop at the first non-finite one."""
        if not self.pending:
            return
        losses = [loss for _, loss, _ in self.pending]
        if any(isinstance(v, torch.Tensor) for v in losses):
            losses = torch.stack([torch.as_tensor(v, device=self.device) for v in losses])
            losses = losses.double().tolist()  # the one host read
        for (step, _, rows), loss in zip(self.pending, losses, strict=True):
            if not math.isfinite(loss):
                self.pending = []
                raise diverged(f"epoch {self.epoch + 1}, step {step}", loss)
            self.total, self.seen = self.total + loss, self.seen + rows
        self.pending = []

    def _epoch_data(self):
        """This epoch's (binarized) rows and their order, drawn from ``epoch_rng``."""
        if self.step == 0:
            self.epoch_rng = rng_state()
            now = None
        else:  # resuming mid-epoch: redraw the epoch's data, then jump to the saved state
            now = rng_state()
            set_rng_state(self.epoch_rng)
        x = binarize_pixels(self.data) if self.options["binarize"] else self.data
        # drawn on the CPU whatever the device: the same order on every device
        order = torch.randperm(len(x), device="cpu").to(x.device)
        if now is not None:
            set_rng_state(now)
        return x, order

    def _step(self, weight, batch) -> float | torch.Tensor:
        """One step's loss: a Python number is checked at once (it was read already), a
        tensor at the next :meth:`_sync`."""
        if self.resumed:  # before the first resumed step: nothing moves if it is refused
            self.resumed = False
            _check_resumed_names(self.svi, (*weight, batch, *self.args), self.kwargs)
        loss = guarded_loss(
            lambda: self._floored(self.svi.step, *weight, batch, *self.args, **self.kwargs),
            lambda: pyro.get_param_store().values(),
        )
        if isinstance(loss, torch.Tensor):
            return loss.detach()  # held until read: without the step's graph
        if loss is None or not math.isfinite(loss):
            raise diverged(f"epoch {self.epoch + 1}, step {self.step + 1}", loss)
        return loss

    def _floored(self, step, *args, **kwargs) -> float:
        """``step``'s loss, under free bits when they are on (a fresh handler per step:
        it holds the step's guide distributions)."""
        lam = self.options["free_bits"]
        if not lam:
            return step(*args, **kwargs)
        with FreeBits(lam):
            return step(*args, **kwargs)

    def _finish_epoch(self, record, bar, writer, callback) -> None:
        self.history.append(record)
        self.epoch, self.step, self.total, self.seen = self.epoch + 1, 0, 0.0, 0
        self._save()
        bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.2f}")
        log.info("epoch %d loss %.3f nats/example", record["epoch"], record["loss"])
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key, value, record["epoch"])
        if callback is not None:
            callback(record)

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        self._sync()  # a state is saved only after its losses were seen to be finite
        optimizer = copy.deepcopy(self.svi.optim.get_state())
        # a finite loss does not make finite parameters: an infinite gradient (sqrt at 0)
        # lets the optimizer write NaN, seen only by the next step's loss
        if not all_finite([*pyro.get_param_store().named_parameters(), optimizer]):
            raise diverged(self._last_step(), what="the parameters or the optimizer state")
        self.checkpoint(
            {
                "options": dict(self.options),
                "position": {
                    "epoch": self.epoch,
                    "step": self.step,
                    "total": self.total,
                    "seen": self.seen,
                    "seconds": self.seconds,
                    "epoch_rng": self.epoch_rng if self.step else None,
                },
                "history": [dict(r) for r in self.history],
                "optimizer": optimizer,
                "rng": rng_state(),
            }
        )

    def _last_step(self) -> str:
        """Where the last step taken lies, for an error: "epoch E, step S"."""
        if self.step == 0 and self.epoch == 0:
            return "the start (before any step)"
        if self.step == 0:  # an epoch just ended
            return f"epoch {self.epoch}, step {self.steps} (or a step since the last checkpoint)"
        return f"epoch {self.epoch + 1}, step {self.step} (or a step since the last checkpoint)"

    def restore(self, state: dict, epochs: int) -> None:
        """Continue from ``state`` (see :meth:`_save`); refuse it if the options differ."""
        saved = {**ADDED_OPTIONS, **state.get("options", {})}
        changed = sorted(k for k in self.options if saved.get(k) != self.options[k])
        if changed:
            was = ", ".join(f"{k}={saved.get(k)!r} (now {self.options[k]!r})" for k in changed)
            raise ConfigError(
                f"cannot resume: the run was trained with {was}; resume with the options "
                "it was started with"
            )
        pos = state["position"]
        if pos["epoch"] > epochs:
            raise ConfigError(
                f"cannot resume: the run has already trained {pos['epoch']} epochs, more than "
                f"the {epochs} asked for; ask for at least {pos['epoch']}"
            )
        self.epoch, self.step = pos["epoch"], pos["step"]
        self.total, self.seen, self.seconds = pos["total"], pos["seen"], pos["seconds"]
        self.epoch_rng, self.history = pos["epoch_rng"], [dict(r) for r in state["history"]]
        self.svi.optim.set_state(state["optimizer"])
        self.resumed = True  # before the first step, the optimizer state's names are checked
        set_rng_state(state["rng"])


def _check_resumed_names(svi, args, kwargs) -> None:
    """Refuse, before the first resumed step, a training state whose optimizer state names
    none of the parameters the pair registers. Pyro's optimizers keep the state of a name
    they never meet waiting, silently, so the run would go on with fresh Adam moments: a
    LadderVAE made in the same session registers under the next name. (Some names unmet
    is normal: a network frozen during the run is not registered any more.)"""
    waiting = set(getattr(svi.optim, "_state_waiting_to_be_consumed", {}))
    if not waiting:
        return
    with without_side_effects(svi.model, svi.guide), poutine.trace(param_only=True) as seen:
        svi.guide(*args, **kwargs)
        svi.model(*args, **kwargs)
    registered = sorted(n for n, site in seen.trace.nodes.items() if site["type"] == "param")
    if registered and not waiting & set(registered):
        raise ConfigError(
            f"cannot resume: the optimizer state is for {len(waiting)} parameters this model "
            f"does not register (e.g. {sorted(waiting)[0]!r}; it registers "
            f"{registered[0]!r} ...). A LadderVAE registers under its own name "
            "(vae.pyro_name): load the model with "
            "pyro_ladder.checkpoint.load_training_checkpoint, which keeps the saved name, or "
            "set vae.pyro_name to the saved one before fit. Nothing was trained"
        )


def _compiles(compile) -> bool:
    """Does ``fit``'s ``compile`` compile at the first step (not: off, or the captured
    graph run uncompiled)? As ``make_elbo`` reads it."""
    kind = _compile_kind("elbo", compile)
    return kind is not None and kind[1].get("backend") != "eager"


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


def _monitor(svi, data, args, kwargs, warmed) -> dict:
    model, guide = svi.model, svi.guide
    if warmed:  # score the plain pair, not the warmed-up wrappers
        model, guide = model.__wrapped__, guide.__wrapped__
    return monitor_record(model, guide, data, *args, **kwargs)


def monitor_record(model, guide, rows, *args, **kwargs) -> dict:
    """The monitor of :func:`fit` and of the Lightning module: one-sample ELBO
    (``monitor_elbo``) and per-site KL (``kl_z1`` ...) on held-out ``rows``, in nats per
    example."""
    result = evaluate(model, guide, rows, *args, num_samples=1, **kwargs)
    record = {"monitor_elbo": result["elbo"].mean().item()}
    record.update({f"kl_{site}": v.mean().item() for site, v in result["kl"].items()})
    return record


def guarded_loss(step, parameters):
    """``step()``'s loss, or None when it raised a ``ValueError`` (Pyro's validation of a
    distribution's parameters) while some tensor of ``parameters()`` is NaN or infinite: a
    diverged run, which the caller reports with :func:`diverged`, as it reports a
    non-finite loss. The decision rests on the values, not on the text of the error or of
    Pyro's NaN warning (silenced here: the caller checks the loss itself). A ``ValueError``
    with finite parameters is not a divergence and propagates."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")
            return step()
    except ValueError:
        with torch.no_grad():
            if all(bool(torch.isfinite(p).all()) for p in parameters()):
                raise
        return None


def diverged(where: str, loss: float | None = None, what: str = "the loss") -> TrainingError:
    """The error of a loss (or of ``what`` else) that became NaN or infinite (``loss``, if
    known) at ``where`` (e.g. "epoch 3, step 7"), naming the arguments that fix it."""
    became = "non-finite" if loss is None else loss
    return TrainingError(
        f"{what} became {became} at {where}: lower the learning rate (argument `lr`), "
        "add warm-up (argument `warmup_epochs`), or check the data for extreme values"
    )


def all_finite(state) -> bool:
    """Whether every floating tensor in ``state`` (nested tuples, lists and dicts) is
    finite, read with one host read per device (a checkpoint's cost, not a step's)."""
    flags = collections.defaultdict(list)  # device -> per-tensor flags, on that device
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() or item.is_complex():
                flags[item.device].append(torch.isfinite(item).all())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return all(bool(torch.stack(f).all()) for f in flags.values())


def check_free_bits(free_bits, elbo) -> None:
    """Raise :class:`ConfigError` unless ``free_bits`` is a number >= 0 (nats) usable with
    the estimator ``elbo`` (a name or an ELBO object, which the caller answers for)."""
    if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)):
        raise ConfigError(f"free_bits must be a number of nats >= 0, got {free_bits!r}")
    if not (math.isfinite(free_bits) and free_bits >= 0):
        raise ConfigError(f"free_bits must be a finite number of nats >= 0, got {free_bits!r}")
    if free_bits and isinstance(elbo, str) and elbo not in FREE_BITS_ESTIMATORS:
        raise ConfigError(
            f"argument `free_bits` floors the KL terms of an ELBO, and argument `elbo` {elbo} "
            "is not one it floors exactly (an importance-weighted bound folds them inside "
            f"its log-mean-exp): use argument `elbo` {' / '.join(FREE_BITS_ESTIMATORS)} with "
            "free bits, or drop argument `free_bits`"
        )


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_fit_options(
    data, epochs, batch_size, lr, warmup_epochs, checkpoint_every=None, seed=0
) -> None:
    """Raise :class:`ConfigError` unless the options of :func:`fit` (and of
    :func:`~pyro_ladder.distributed.fit_distributed`) suit ``data``."""
    if len(data) == 0:
        raise ConfigError("the training data are empty: pass at least one row")
    for name, v in [("epochs", epochs), ("batch_size", batch_size)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if batch_size > len(data):
        raise ConfigError(
            f"batch size {batch_size} exceeds the {len(data)} training rows: "
            f"use a batch size of at most {len(data)} (argument `batch_size`)"
        )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the learning rate must be a positive number, got {lr!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise ConfigError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be an integer or None, got {seed!r}")
    if seed is not None and not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32 - 1] (numpy's range), got {seed}")
