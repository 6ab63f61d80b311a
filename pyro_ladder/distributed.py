r"""Data-parallel training with PyTorch Lightning: one model on several processes, GPUs and
machines (the optional ``distributed`` extra: ``pip install 'pyro_ladder[distributed]'``).

:class:`LightningSVI` is one SVI step per batch as a ``LightningModule``, for any
model/guide pair whose parameters live in ``nn.Module``\ s and any estimator of
:func:`~pyro_ladder.make_elbo`; :class:`ShardedRows` hands each process its own shard of
the rows; :func:`fit_distributed` is :func:`~pyro_ladder.fit` on top of both.

**Scaling.** Each of the ``P`` processes draws a batch of ``B`` rows from its shard and
returns the loss *per example*, ``l_p = L(x_p) / B``, where ``L`` is the estimator's loss
summed over the batch (Pyro's plates are not subsampled, so every site has scale 1).
``DistributedDataParallel`` averages the gradients, which gives
``(1/P) sum_p grad L(x_p) / B = grad L(x_1 u ... u x_P) / (P B)``: the per-example gradient
of the union batch, because every estimator here is a sum of per-data-point terms. The
effective batch is ``P B`` rows.

**What differs from one process.** Batch norm normalizes with each process's own batch
statistics unless ``sync_batchnorm=True`` (torch's ``SyncBatchNorm``, GPUs only); the
running statistics kept for evaluation are rank 0's (DDP broadcasts buffers). Each
process seeds Pyro with its own seed derived from ``seed`` and its rank, so the processes
draw independent noise; the permutation of the rows is shared (seeded by ``seed`` and the
epoch) and split into disjoint shards.

References
----------
[1] S. Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
    Training", VLDB 2020.
[2] P. Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro.infer import ELBO
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ._traces import parameter_roles
from ._util import eval_mode, modules_of
from .data import binarize as binarize_pixels
from .elbo import make_elbo
from .elbo.surrogate import differentiable_loss
from .errors import ConfigError
from .optim import torch_adam
from .train import all_finite, check_fit_options, diverged, guarded_loss, monitor_record
from .warmup import kl_weight, with_kl_weight

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import CPUAccelerator
except ImportError:
    raise ConfigError(
        "training on several processes needs PyTorch Lightning: "
        "pip install 'pyro_ladder[distributed]' (or pip install 'lightning>=2.6')"
    ) from None

__all__ = [
    "LightningSVI",
    "ShardedRows",
    "fit_distributed",
    "make_trainer",
    "process_seed",
    "release_process_group",
]

log = logging.getLogger(__name__)


def release_process_group(wait: bool = True) -> None:
    """End this process's part in the process group: wait for every process (``wait``),
    then destroy the group.

    Why: Lightning destroys the group only for NCCL (at exit). A gloo group left alive is
    torn down by the interpreter's exit, where the C++ destructor of a gloo thread that is
    still joinable calls ``std::terminate`` ("terminate called without an active
    exception", SIGABRT); how often depends on timing, hence on load. The barrier first
    makes sure no process closes its connections while a peer still talks to it.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def process_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for process ``rank`` of a run seeded with ``seed`` (independent
    streams per process: ``SeedSequence`` mixes both numbers)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class _Rows(Dataset):
    """A tensor's rows, a whole batch per read: ``rows[indices] -> (len(indices), ...)``."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices) -> torch.Tensor:
        return self.data[torch.as_tensor(indices)]  # (B, ...)


class ShardBatches(Sampler):
    """Batches of row indices from one process's shard.

    Every epoch the rows are permuted (the permutation seeded by ``seed`` and the epoch,
    hence the same on every process) and dealt out to ``num_replicas`` disjoint shards of
    equal size (``DistributedSampler``, the rows that do not divide evenly left out); the
    shard is cut into full batches of ``batch_size`` (a ragged last batch is dropped, as in
    :func:`~pyro_ladder.fit`, so batch norm always sees a full batch and every process
    runs the same number of steps).

    :param start: ``(epoch, step)`` of a resumed run: Lightning's epoch 0 is the run's
        ``epoch`` (0-based), whose first ``step`` batches are skipped.
    """

    def __init__(
        self, num_rows: int, batch_size: int, num_replicas: int, rank: int, seed: int,
        start: tuple[int, int] = (0, 0),
    ):  # fmt: skip
        self.shard = DistributedSampler(
            range(num_rows), num_replicas, rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size, (self.first_epoch, self.skip) = batch_size, start
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch: a fresh permutation."""
        self.lightning_epoch = epoch
        self.shard.set_epoch(self.first_epoch + epoch)

    def __len__(self) -> int:
        """Batches in a whole epoch (Lightning reads it once: a resumed first epoch just
        ends early)."""
        return len(self.shard) // self.batch_size

    def __iter__(self):
        indices = list(self.shard)
        for step in range(self.skip if self.lightning_epoch == 0 else 0, len(self)):
            yield indices[step * self.batch_size : (step + 1) * self.batch_size]


class ShardedRows(pl.LightningDataModule):
    """The training rows ``data (N, ...)``, each process reading its own shard
    (:class:`ShardBatches`) in batches of ``batch_size`` rows per process."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int = 0, start=(0, 0)):
        super().__init__()
        self.data, self.batch_size, self.seed, self.start = data, batch_size, seed, start

    def check(self, world: int) -> None:
        """Raise :class:`ConfigError` unless each of ``world`` processes gets a full batch."""
        if self.batch_size * world > len(self.data):
            raise ConfigError(
                f"{world} processes x batch size {self.batch_size} exceed the "
                f"{len(self.data)} training rows: lower the batch size (argument "
                f"`batch_size`) to at most {len(self.data) // world}"
            )

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        self.check(world)
        batches = ShardBatches(len(self.data), self.batch_size, world, rank, self.seed, self.start)
        # the rows are in memory: worker processes would only copy them; a generator of its
        # own keeps the loader from drawing its base seed from the training's random stream
        # (a resumed epoch would draw it again)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(_Rows(self.data), sampler=batches, batch_size=None, generator=generator)


class LightningSVI(pl.LightningModule):
    """One stochastic-variational-inference step per batch, as a ``LightningModule``.

    ``training_step`` returns the estimator's loss per example as a differentiable tensor
    (:func:`~pyro_ladder.elbo.surrogate.differentiable_loss`); Lightning runs the backward
    pass (where DDP averages the gradients across processes) and the Adam step.

    :param model: Pyro model ``model(x)``; with warm-up it is called as ``model(weight, x)``
        through :func:`~pyro_ladder.warmup.with_kl_weight`.
    :param guide: the matching guide.
    :param elbo: an estimator name of :func:`~pyro_ladder.make_elbo` or a Pyro ELBO.
    :param num_particles: samples per data point when ``elbo`` is a name.
    :param lr: Adam's learning rate.
    :param warmup_epochs: KL warm-up length (``beta = epoch / warmup_epochs``); 0: none.
    :param binarize: draw binary pixels afresh for every batch (dynamic binarization).
    :param seed: base of the per-process seeds (:func:`process_seed`).
    :param monitor: held-out rows scored on rank 0 after every epoch (one-sample ELBO and
        KL per site), as in :func:`~pyro_ladder.fit`.
    :param module: the ``nn.Module`` that owns every parameter of the pair; default: the
        module(s) whose methods ``model`` and ``guide`` are.
    :param checkpoint: called on global rank 0 as ``checkpoint(state)`` before the first
        step, after every epoch and every ``checkpoint_every`` steps, with the training
        state of every process (position, history, optimizer state, each process's RNG
        state), as :func:`~pyro_ladder.fit` calls its own.
    :param resume: such a state: training continues from it on as many processes, with
        the same random numbers, so the run ends as the uninterrupted one.
    :raises ConfigError: when no module owns the pair's parameters.
    """

    def __init__(
        self,
        model,
        guide,
        elbo: str | ELBO = "elbo",
        *,
        num_particles: int = 1,
        lr: float = 1e-3,
        warmup_epochs: int = 0,
        binarize: bool = False,
        seed: int = 0,
        monitor: torch.Tensor | None = None,
        module: nn.Module | None = None,
        checkpoint=None,
        checkpoint_every: int | None = None,
        resume: dict | None = None,
    ):
        super().__init__()
        owners = [module] if module is not None else modules_of(model, guide)
        if not owners:
            raise ConfigError(
                "Lightning trains the parameters of nn.Modules: make model and guide methods "
                "of an nn.Module (registered with pyro.module, or a PyroModule), or pass module="
            )
        self.networks = nn.ModuleList(owners)  # what the optimizer and DDP see
        self.pyro_model, self.pyro_guide = model, guide
        self.elbo = make_elbo(elbo, num_particles) if isinstance(elbo, str) else elbo
        self.lr, self.warmup_epochs, self.binarize, self.seed = lr, warmup_epochs, binarize, seed
        self.monitor = monitor  # a plain attribute: DDP would broadcast a buffer every step
        self.history: list[dict] = []
        self._pair = (model, guide)
        self._beta, self._checked = 1.0, False
        self.checkpoint, self.checkpoint_every, self.resume = checkpoint, checkpoint_every, resume
        self.first_epoch, self.first_step = start_of(resume)
        self.options = {
            "elbo": elbo if isinstance(elbo, str) else type(elbo).__name__,
            "num_particles": num_particles, "lr": float(lr), "warmup_epochs": warmup_epochs,
            "binarize": bool(binarize), "seed": seed,
        }  # fmt: skip

    def setup(self, stage: str) -> None:
        # wrappers are made here, in each process: closures do not pickle (ddp_spawn)
        model, guide = self.pyro_model, self.pyro_guide
        if self.warmup_epochs:
            model, guide = with_kl_weight(model), with_kl_weight(guide)
        self._pair = (model, guide)

    def teardown(self, stage: str) -> None:
        # every process, after training, under any launcher (ddp_spawn's workers too)
        release_process_group()

    def configure_optimizers(self):
        return torch_adam(self.parameters(), lr=self.lr)

    @property
    def epoch(self) -> int:
        """The run's epoch (0-based): Lightning counts from the resumed one."""
        return self.first_epoch + self.current_epoch

    def _skipped(self) -> int:
        """Steps of the current epoch done before the run was resumed."""
        return self.first_step if self.current_epoch == 0 else 0

    def on_train_start(self) -> None:
        self._start = time.perf_counter()
        if self.resume is None:
            pyro.set_rng_seed(process_seed(self.seed, self.global_rank))
            self._save(0, 0, torch.zeros(2, device=self.device))
        else:
            self._restore(self.resume)

    def on_train_epoch_start(self) -> None:
        self._beta = kl_weight(self.epoch, self.warmup_epochs)
        self._sums = torch.zeros(2, device=self.device)  # loss x rows, rows
        if self._skipped():
            self._sums = self.resume["position"]["sums"][self.global_rank].to(self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step, every = self._skipped() + batch_idx + 1, self.checkpoint_every
        if every and step % every == 0 and step < self.trainer.num_training_batches:
            self._save(self.epoch, step, self._sums)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if not self._checked:
            self._check_parameters(batch)
            self._checked = True

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Loss per example of ``batch (B, ...)``, differentiable (a 0-dim tensor)."""
        x = self._inputs(batch)  # (B, ...)
        loss = self._loss(x)
        self._stop_if_not_finite(loss, batch_idx)
        self._sums += torch.stack([loss.detach() * len(x), loss.new_tensor(len(x))])
        return loss

    def on_train_epoch_end(self) -> None:
        # one collective at a fixed point of every process; Lightning's own metric
        # reductions run lazily (the progress bar reads them on rank 0 alone), so a
        # collective of ours could interleave with theirs in a different order per process
        sums = self.trainer.strategy.reduce(self._sums.clone(), reduce_op="sum")  # (2,)
        loss = (sums[0] / sums[1]).item()
        record = {"epoch": self.epoch + 1, "loss": loss, "kl_weight": self._beta}
        # for the progress bar only: through the logger Lightning would write it at the
        # optimizer step and add a 0-based `epoch` scalar; the same number on every
        # process, sync_dist only satisfies Lightning's check
        self.log("loss", loss, sync_dist=True, prog_bar=True, logger=False)
        if self.trainer.is_global_zero:
            self._record(record)
        self._save(self.epoch + 1, 0, torch.zeros_like(self._sums))  # every process

    def _record(self, record: dict) -> None:
        """Rank 0: the epoch's record, with the monitor, into the history and the logger."""
        if self.monitor is not None:
            record.update(self._monitor())
        record["seconds"] = time.perf_counter() - self._start
        self.history.append(record)
        log.info("epoch %d loss %.3f nats/example", record["epoch"], record["loss"])
        if self.logger is not None:  # as fit logs: every number at the 1-based epoch
            numbers = {k: v for k, v in record.items() if k != "epoch"}
            self.logger.log_metrics(numbers, step=record["epoch"])

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` of every process, ``(world, ...)``, on the CPU (a collective)."""
        gathered = self.all_gather(tensor.to(self.device))
        return (gathered if self.trainer.world_size > 1 else gathered[None]).cpu()

    def _save(self, epoch: int, step: int, sums: torch.Tensor) -> None:
        """Every process: gather the RNG states and loss sums; rank 0 hands the state to
        ``checkpoint``."""
        if self.checkpoint is None:
            return
        rng = {"torch": self._gather(torch.get_rng_state())}
        if self.device.type == "cuda":
            rng["cuda"] = self._gather(torch.cuda.get_rng_state(self.device))
        position = {"epoch": epoch, "step": step, "seen": 0, "sums": self._gather(sums)}
        optimizer = self.trainer.optimizers[0].state_dict()
        # every process decides together (a lone raise would leave the others waiting)
        bad = not all_finite([list(self.parameters()), optimizer])
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
            where = f"{where} (or a step since the last checkpoint)"
            raise diverged(where, what="the parameters or the optimizer state")
        if not self.trainer.is_global_zero:
            return
        self.checkpoint(
            {
                "processes": self.trainer.world_size,
                "options": dict(self.options),
                "position": {**position, "seconds": time.perf_counter() - self._start},
                "history": [dict(r) for r in self.history],
                "optimizer": copy.deepcopy(optimizer),
                "rng": rng,
            }
        )

    def _restore(self, state: dict) -> None:
        """Continue from ``state`` (see :meth:`_save`) on as many processes."""
        if state["processes"] != self.trainer.world_size:
            raise ConfigError(_other_world(state["processes"], self.trainer.world_size))
        changed = sorted(k for k in self.options if state["options"].get(k) != self.options[k])
        if changed:
            raise ConfigError(
                f"cannot resume: the run was trained with other options ({', '.join(changed)}); "
                "resume with the options it was started with"
            )
        self.trainer.optimizers[0].load_state_dict(state["optimizer"])
        self.history = [dict(r) for r in state["history"]]
        self._start -= state["position"]["seconds"]
        # a row of its own: set_rng_state reads a view's storage from its start
        torch.set_rng_state(state["rng"]["torch"][self.global_rank].clone())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"][self.global_rank].clone(), self.device)

    def _inputs(self, batch: torch.Tensor) -> torch.Tensor:
        return binarize_pixels(batch) if self.binarize else batch

    def _args(self, x: torch.Tensor) -> tuple:
        return (x.new_tensor(self._beta), x) if self.warmup_epochs else (x,)

    def _loss(self, x: torch.Tensor) -> torch.Tensor | None:
        """The estimator's loss divided by the batch size; None if the run diverged."""
        model, guide = self._pair
        total = guarded_loss(
            lambda: differentiable_loss(self.elbo, model, guide, *self._args(x)), self.parameters
        )
        return None if total is None else total / len(x)

    def _stop_if_not_finite(self, loss: torch.Tensor | None, batch_idx: int) -> None:
        """Every process stops together (a lone failure would leave the others waiting in
        the gradient all-reduce)."""
        bad = loss is None or not bool(torch.isfinite(loss))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            step = self._skipped() + batch_idx + 1
            where = f"epoch {self.epoch + 1}, step {step} (on at least one process)"
            raise diverged(where)

    def _check_parameters(self, batch: torch.Tensor) -> None:
        """Every parameter the pair feeds (by dependence) must be one of the tensors Lightning
        optimizes and DDP all-reduces, and registering must not swap any of them."""
        before = [id(p) for p in self.parameters()]
        model, guide = self._pair
        devices = [self.device] if self.device.type == "cuda" else []
        # its draws come from a forked stream: a resumed run repeats this check
        with torch.random.fork_rng(devices), torch.no_grad(), eval_mode(*self.networks):
            args = self._args(self._inputs(batch))
            guide_only, in_model, _ = parameter_roles(model, guide, args, {})
        stray = sorted(n for n, t in {**guide_only, **in_model}.items() if id(t) not in before)
        if stray or [id(p) for p in self.parameters()] != before:
            raise ConfigError(
                f"Pyro parameters {stray[:3]} are not the tensors of the networks Lightning "
                "trains: keep every parameter in the nn.Module(s) of the model and guide, and "
                "clear stale entries first (pyro.clear_param_store())"
            )

    def _monitor(self) -> dict:
        return monitor_record(self.pyro_model, self.pyro_guide, self.monitor.to(self.device))


def start_of(resume: dict | None) -> tuple[int, int]:
    """``(epoch, step)`` where a run resumed from the state ``resume`` starts."""
    if resume is None:
        return 0, 0
    return resume["position"]["epoch"], resume["position"]["step"]


def _other_world(saved: int, now: int) -> str:
    return (
        f"cannot resume: the run trained on {saved} processes, not {now}; resume it on "
        f"{saved} (argument `devices` x argument `num_nodes`): another number of processes "
        "would deal the rows into other batches"
    )


def make_trainer(
    *,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    accelerator: str = "auto",
    sync_batchnorm: bool = False,
    epochs: int = 1,
    max_steps: int = -1,
    progress: bool = True,
    tensorboard: str | None = None,
) -> pl.Trainer:
    """A Lightning ``Trainer`` for :class:`LightningSVI`: no validation loop, no Lightning
    checkpoints (the caller writes one, on rank 0), our own distributed sampler.

    Lightning picks the process-group backend: gloo on CPUs, NCCL on GPUs. On several
    machines it reads ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` (or the variables
    of SLURM and ``torchrun``).

    :param max_steps: stop after this many steps even within an epoch (-1: no limit).
    :param tensorboard: a folder for TensorBoard logs (rank 0 writes them); None: none.
    :raises ConfigError: for settings Lightning refuses (more GPUs than the machine has,
        an unknown strategy) and for ``sync_batchnorm`` on CPUs.
    """
    logger = False if tensorboard is None else _tensorboard_logger(tensorboard)
    try:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            sync_batchnorm=sync_batchnorm,
            max_epochs=epochs,
            max_steps=max_steps,
            logger=logger,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
    except (MisconfigurationException, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"Lightning cannot run this setup: {first}") from None
    if sync_batchnorm and isinstance(trainer.accelerator, CPUAccelerator):
        raise ConfigError(
            "argument `sync_batchnorm` needs GPUs (torch's SyncBatchNorm does not run on "
            "CPUs): drop it, or pass argument `accelerator` gpu"
        )
    return trainer


def _tensorboard_logger(folder):
    from lightning.pytorch.loggers import TensorBoardLogger

    try:
        return TensorBoardLogger(save_dir=str(folder), name="", version="")
    except ModuleNotFoundError:
        raise ConfigError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard"
        ) from None


def fit_distributed(
    model,
    guide,
    data: torch.Tensor,
    *,
    trainer: pl.Trainer | None = None,
    elbo: str | ELBO = "elbo",
    num_particles: int = 1,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    warmup_epochs: int = 0,
    seed: int = 0,
    binarize: bool = False,
    monitor: torch.Tensor | None = None,
    checkpoint=None,
    checkpoint_every: int | None = None,
    resume: dict | None = None,
    **trainer_options,
) -> list[dict] | None:
    """:func:`~pyro_ladder.fit` through PyTorch Lightning, on one or many processes.

    ``batch_size`` is per process: with ``P`` processes a step uses ``P * batch_size`` rows
    and an epoch has ``len(data) // (P * batch_size)`` steps. With the ``"ddp"`` strategy
    Lightning starts the other processes by running the calling script again, so call
    this from a script (``"ddp_spawn"`` pickles the module into fresh processes instead,
    and brings back only the weights: the history stays in the spawned rank 0).

    :param trainer: a Trainer from :func:`make_trainer`; else one is made from
        ``trainer_options`` (``devices``, ``num_nodes``, ``strategy``, ``accelerator``,
        ``sync_batchnorm``, ``progress``, ``tensorboard``) and ``epochs``.
    :param checkpoint: ``checkpoint(state)`` on global rank 0 before the first step, after
        every epoch and every ``checkpoint_every`` steps (see :class:`LightningSVI`).
    :param resume: a state ``checkpoint`` received: training continues from it (on as
        many processes: another number is refused) and ends as the uninterrupted run.
    :returns: the per-epoch records of :func:`~pyro_ladder.fit` on global rank 0 (loss
        averaged over every process's rows), None on the other processes.
    :raises ConfigError: for bad options; :class:`~pyro_ladder.TrainingError` when the
        loss becomes NaN or infinite on any process.
    """
    if seed is None:  # every process must draw the same shuffles
        raise ConfigError("seed must be an integer on several processes, got None")
    check_fit_options(data, epochs, batch_size, lr, warmup_epochs, checkpoint_every, seed)
    if trainer is None:
        trainer = make_trainer(epochs=epochs, **trainer_options)
    start = start_of(resume)
    if resume is not None and resume["processes"] != trainer.world_size:
        raise ConfigError(_other_world(resume["processes"], trainer.world_size))
    if start[0] > epochs:
        raise ConfigError(
            f"cannot resume: the run has already trained {start[0]} epochs, more than the "
            f"{epochs} asked for; ask for at least {start[0]}"
        )
    trainer.fit_loop.max_epochs = epochs - start[0]  # Lightning counts from the resumed epoch
    rows = ShardedRows(data, batch_size, seed, start)
    rows.check(trainer.world_size)  # before Lightning starts the other processes
    svi = LightningSVI(
        model,
        guide,
        elbo,
        num_particles=num_particles,
        lr=lr,
        warmup_epochs=warmup_epochs,
        binarize=binarize,
        seed=seed,
        monitor=monitor,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    with warnings.catch_warnings():
        # rows are read from memory; worker processes would only copy them
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # torch 2.14 deprecates a pytree type check that Lightning 2.6 makes on every batch
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        try:
            trainer.fit(svi, datamodule=rows)
        finally:  # on an error Lightning skips the teardown hook; no barrier: peers may be gone
            release_process_group(wait=False)
    return svi.history if trainer.is_global_zero else None
