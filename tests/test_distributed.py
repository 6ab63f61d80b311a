"""Data-parallel training through PyTorch Lightning: sharding, gradient equivalence across
processes (gloo on loopback), and a two-process run of the command line."""

import copy
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch import nn

from pyro_ladder import ConfigError, LadderVAE, fit, make_elbo
from pyro_ladder.cli import main

pytest.importorskip("lightning")

from lightning.pytorch import Callback  # noqa: E402

from pyro_ladder.distributed import (  # noqa: E402
    LightningSVI,
    ShardBatches,
    ShardedRows,
    fit_distributed,
    make_trainer,
    process_seed,
)

ROOT = Path(__file__).resolve().parents[1]


def test_importing_pyro_ladder_leaves_lightning_alone():
    code = "import sys, pyro_ladder, pyro_ladder.cli; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_lightning_the_error_says_what_to_install(monkeypatch, capsys, tmp_path):
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    monkeypatch.delitem(sys.modules, "pyro_ladder.distributed")
    with pytest.raises(ConfigError, match=r"pip install 'pyro_ladder\[distributed\]'"):
        importlib.import_module("pyro_ladder.distributed")
    assert main(["train", "--devices", "2", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "pip install" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("rows, batch, world", [(23, 3, 2), (30, 4, 3)])
def test_each_process_gets_its_own_shard_in_full_batches(rows, batch, world):
    def epoch(rank, number):
        sampler = ShardBatches(rows, batch, world, rank, seed=7)
        sampler.set_epoch(number)
        return [i for b in sampler for i in b], [len(b) for b in sampler]

    shards = [epoch(rank, 0) for rank in range(world)]
    seen = [i for shard, _ in shards for i in shard]
    assert len(seen) == len(set(seen))  # disjoint
    assert all(sizes == [batch] * (rows // world // batch) for _, sizes in shards)
    assert set(epoch(0, 1)[0]) != set(shards[0][0])  # a fresh permutation every epoch


def test_process_seeds_differ_by_rank_and_by_seed():
    seeds = {process_seed(s, r) for s in range(3) for r in range(4)}
    assert len(seeds) == 12


class RowNoise(Messenger):
    """Latent draws ``loc + scale * eps`` with ``eps`` a fixed pseudo-random function of the
    data row, the site and the particle: a row gets the same noise whichever process or
    batch holds it.

    :param x: binary rows ``(B, D)``; a row's key is the integer its bits spell.
    """

    def __init__(self, x):
        super().__init__()
        self.keys = (x * 2 ** torch.arange(x.shape[-1], dtype=x.dtype)).sum(-1).long().tolist()

    def _pyro_sample(self, msg):
        if msg["is_observed"] or not hasattr(msg["fn"], "base_dist"):  # plates send some
            return
        normal = msg["fn"].base_dist  # Normal(loc, scale).to_event(1): (B, k) each
        particles = _particle_plate()
        size = 1 if particles is None else particles.size
        site = zlib.crc32(msg["name"].encode())
        eps = torch.stack(
            [
                torch.randn(size, normal.loc.shape[-1], generator=_generator(key * 7919 + site))
                for key in self.keys
            ],
            dim=-2,
        ).to(normal.loc)  # (S, B, k)
        if particles is None:
            eps = eps[0]  # (B, k)
        else:  # the particle dimension where the estimator put its plate
            eps = eps.reshape(size, *(1,) * (-particles.dim - 2), *eps.shape[1:])
        # a value set here is kept by Pyro, and the particle plate still expands the site
        msg["value"] = normal.loc + normal.scale * eps


def _particle_plate():
    """The estimator's vectorized particle plate if the current sample site is inside one."""
    from pyro.poutine.runtime import _PYRO_STACK

    names = ("num_particles_vectorized", "_num_particles_vectorized")  # Pyro's, ours
    plates = (f for f in _PYRO_STACK if getattr(f, "name", None) in names)
    return next(plates, None)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


class NoisyGuide:
    """``vae.guide`` under :class:`RowNoise` (a picklable callable for spawned processes)."""

    def __init__(self, vae):
        self.vae = vae

    def __call__(self, x):
        with RowNoise(x):
            self.vae.guide(x)


class Recorder(Callback):
    """Saves each process's batch and its gradients after the backward pass (after DDP's
    all-reduce), for every step."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch.clone()

    def on_after_backward(self, trainer, pl_module):
        vae = pl_module.networks[0]
        grads = {n: p.grad.clone() for n, p in vae.named_parameters()}
        name = f"rank{trainer.global_rank}-step{trainer.global_step}.pt"
        torch.save({"batch": self.batch, "grads": grads}, os.path.join(self.folder, name))


class OneEstimatorPerStep(LightningSVI):
    """Step 0 trains with ``elbo``, step 1 with ``iwae`` (K = 3), step 2 with ``piwae``
    (whose surrogate takes autograd gradients inside DDP's forward): one start of two
    processes checks all three."""

    def training_step(self, batch, batch_idx):
        name, particles, options, _ = STEPS[batch_idx]
        self.elbo = make_elbo(name, particles, **options)
        return super().training_step(batch, batch_idx)


STEPS = [  # estimator, particles, options, the single-process reference estimator
    ("elbo", 1, {}, lambda: Trace_ELBO()),
    ("iwae", 3, {}, lambda: RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True)),
    ("piwae", 2, {"outer": 2}, lambda: make_elbo("piwae", 2, outer=2)),
]


def _reference_grads(vae, make, x):
    """Pyro's own ``loss_and_grads`` in one process, per example: ``{name: grad / B}``."""
    vae.zero_grad(set_to_none=True)
    make().loss_and_grads(vae.model, NoisyGuide(vae), x)
    return {n: p.grad / len(x) for n, p in vae.named_parameters()}


def test_two_processes_give_the_gradient_of_the_union_batch(tmp_path):
    torch.manual_seed(2)
    rows = torch.tensor([[(k >> b) & 1 for b in range(6)] for k in range(24)], dtype=torch.float64)
    vae = LadderVAE(6, (3, 2), (8, 4), batch_norm=False).double()
    initial = copy.deepcopy(vae.state_dict())
    svi = OneEstimatorPerStep(vae.model, NoisyGuide(vae), lr=0.0, module=vae)  # fixed weights
    trainer = make_trainer(
        devices=2, strategy="ddp_spawn", accelerator="cpu", max_steps=3, progress=False
    )
    trainer.callbacks.append(Recorder(str(tmp_path)))
    trainer.fit(svi, datamodule=ShardedRows(rows, batch_size=4, seed=3))
    vae.load_state_dict(initial)
    seen = []
    for step, (*_, make) in enumerate(STEPS):
        ranks = [torch.load(tmp_path / f"rank{r}-step{step}.pt") for r in range(2)]
        batches = [r["batch"] for r in ranks]
        seen += [tuple(row) for b in batches for row in b.tolist()]
        union = _reference_grads(vae, make, torch.cat(batches))
        for name, expected in union.items():
            for rank in ranks:
                torch.testing.assert_close(rank["grads"][name], expected, rtol=1e-10, atol=1e-12)
        # the all-reduce mattered: rank 0's batch alone gives another gradient
        alone = _reference_grads(vae, make, batches[0])
        assert not all(torch.allclose(alone[n], ranks[0]["grads"][n]) for n in union)
    assert len(seen) == len(set(seen)) == 24  # own shards: every row once in the epoch


def test_one_process_through_lightning_records_what_fit_records():
    torch.manual_seed(0)
    vae = LadderVAE(6, (3, 2), (8, 4))
    grey = torch.rand(40, 6)
    before = [p.detach().clone() for p in vae.parameters()]
    history = fit_distributed(
        vae.model, vae.guide, grey, elbo="iwae", num_particles=2, epochs=3, batch_size=10,
        warmup_epochs=2, binarize=True, monitor=grey[:8].round(), accelerator="cpu",
        progress=False,
    )  # fmt: skip
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.parameters(), strict=True))
    store = {id(t) for _, t in pyro.get_param_store().named_parameters()}
    assert store == {id(p) for p in vae.parameters()}  # Pyro and Lightning share tensors
    reference = fit(
        vae.model, vae.guide, grey, elbo="iwae", num_particles=2, epochs=3, batch_size=10,
        warmup_epochs=2, binarize=True, monitor=grey[:8].round(), progress=False,
    )  # fmt: skip
    assert [r["kl_weight"] for r in history] == [0.0, 0.5, 1.0]
    assert [list(r) for r in history] == [list(r) for r in reference]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)


class StrayParameter(nn.Module):
    """A pair whose guide keeps a parameter in Pyro's store only, outside any module."""

    def __init__(self):
        super().__init__()
        self.dec = nn.Linear(2, 3)

    def model(self, x):
        pyro.module("stray_dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        loc = pyro.param("stray_loc", x.new_zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def test_parameters_outside_the_modules_are_refused():
    pair = StrayParameter()
    with pytest.raises(ConfigError, match="stray_loc"):
        fit_distributed(
            pair.model, pair.guide, torch.randn(8, 3), epochs=1, batch_size=4,
            accelerator="cpu", devices=1, progress=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sync-batchnorm"], "--sync-batchnorm needs GPUs"),
        (["--batch-size", "719"], "2 processes x batch size 719 exceed the 1437 training rows"),
    ],
)
def test_setups_that_cannot_run_are_refused_before_anything_is_written(
    capsys, tmp_path, options, message
):
    args = ["train", "--devices", "2", "--accelerator", "cpu", "--epochs", "1", *options]
    assert main(args + ["--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _scalars(folder):
    """``{tag: [steps]}`` of the TensorBoard event files in ``folder``, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_two_process_run_of_the_command_line(tmp_path):
    common = ["--epochs", "2", "--eval-samples", "10", "--eval-limit", "40", "--no-progress"]
    one = ["--out", str(tmp_path / "one"), "--tensorboard", str(tmp_path / "tb-one")]
    assert main(["train", *common, *one]) == 0
    command = [sys.executable, "-m", "pyro_ladder", "train", *common, "--out", "two"]
    command += ["--tensorboard", "tb-two"]
    command += ["--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 processes" in done.stdout
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    two = [p for p in written if p.parts[0] not in ("one", "tb-one")]
    assert [p for p in two if p.suffix == ".pt"] == [Path("two/checkpoint.pt")]
    assert {p.parts[0] for p in two} == {"two", "tb-two"}  # no Lightning logs or checkpoints
    # both paths log the same numbers at the same steps: every tag at the 1-based epoch
    steps = _scalars(tmp_path / "tb-one")
    assert set(steps) >= {"loss", "kl_weight", "monitor_elbo", "kl_z1", "seconds"}
    assert all(s == [1, 2] for s in steps.values()), steps
    assert _scalars(tmp_path / "tb-two") == steps
    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert set(two_metrics) == set(one_metrics)
    assert two_metrics["epochs"] == 2 and two_metrics["test_log_likelihood"] < 0
    one_history = (tmp_path / "one" / "history.csv").read_text().splitlines()
    two_history = (tmp_path / "two" / "history.csv").read_text().splitlines()
    assert set(one_history[0].split(",")) == set(two_history[0].split(","))
    assert len(two_history) == 3  # the header and two epochs


def _lightning_run(folder, vae, resume=None, epochs=3):
    """fit_distributed on one process, a checkpoint file at every save; (history, saves)."""
    from pyro_ladder.checkpoint import save_checkpoint

    folder.mkdir(exist_ok=True)
    saves = []

    def save(state):
        path = folder / f"save{len(saves)}.pt"
        save_checkpoint(path, vae, {}, training=state)
        saves.append(path)

    torch.manual_seed(0)
    grey = torch.rand(90, 6)  # binarized anew for every batch
    history = fit_distributed(
        vae.model, vae.guide, grey, epochs=epochs, batch_size=20, lr=1e-2, warmup_epochs=2,
        binarize=True, seed=3, monitor=grey[:10].round(), accelerator="cpu", progress=False,
        checkpoint=save, checkpoint_every=2, resume=resume,
    )  # fmt: skip
    return history, saves


def test_a_lightning_run_resumed_from_every_save_point_ends_as_the_uninterrupted_one(tmp_path):
    from pyro_ladder.checkpoint import load_training_checkpoint

    torch.manual_seed(1)
    vae = LadderVAE(6, (3, 2), (8, 4))
    history, saves = _lightning_run(tmp_path / "ref", vae)
    states = [torch.load(p, weights_only=True)["training"] for p in saves]
    # before the first step, after steps 2 of each 4-step epoch, after each epoch
    assert [(s["position"]["epoch"], s["position"]["step"]) for s in states] == [
        (0, 0), (0, 2), (1, 0), (1, 2), (2, 0), (2, 2), (3, 0)]  # fmt: skip
    assert all(s["processes"] == 1 and s["rng"]["torch"].shape[0] == 1 for s in states)
    assert {"state", "param_groups"} <= set(states[-1]["optimizer"])
    assert len(states[-1]["history"]) == 3 and states[1]["position"]["sums"][0, 1] == 40
    without_time = [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    for path in (saves[1], saves[2], saves[5]):  # mid-epoch 1, after epoch 1, mid-epoch 3
        pyro.clear_param_store()
        resumed, _, training = load_training_checkpoint(path)
        again, _ = _lightning_run(tmp_path / path.stem, resumed, resume=training)
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == without_time
        b = vae.state_dict()
        assert all(torch.equal(t, b[k]) for k, t in resumed.state_dict().items()), path.name


def test_resuming_on_another_number_of_processes_is_refused(tmp_path, capsys):
    args = ["train", "--preset", "small", "--epochs", "1", "--batch-size", "200", "--no-progress",
            "--eval-samples", "5", "--eval-limit", "20", "--checkpoint-every", "3"]  # fmt: skip
    lightning = tmp_path / "lightning"
    assert main([*args, "--accelerator", "cpu", "--out", str(lightning)]) == 0
    stored = torch.load(lightning / "checkpoint.pt", weights_only=True)
    assert stored["meta"]["processes"] == stored["training"]["processes"] == 1
    position = stored["training"]["position"]
    assert (position["epoch"], position["step"]) == (1, 0)  # the last save: after epoch 1
    capsys.readouterr()
    more = ["train", "--resume", str(lightning), "--epochs", "2", "--no-progress"]
    assert main([*more, "--accelerator", "cpu", "--devices", "2"]) == 2
    assert "trained on 1 processes, not 2: resume it on 1 (--devices x --num-nodes)" in \
        capsys.readouterr().err  # fmt: skip
    assert main(more) == 2
    assert "trained on 1 process(es) through Lightning: resume it the same way, e.g. with " \
        "--devices 1" in capsys.readouterr().err  # fmt: skip
    one = tmp_path / "one"
    assert main([*args, "--out", str(one)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(one), "--epochs", "2", "--devices", "2"]) == 2
    assert "trained in one process: resume it without --devices" in capsys.readouterr().err
    assert main([*more, "--accelerator", "cpu"]) == 0  # the same setup resumes
    assert json.loads((lightning / "metrics.json").read_text())["epochs"] == 2


def _position(path):
    try:
        return torch.load(path, weights_only=True)["training"]["position"]
    except Exception:  # not written yet (the rename is atomic, the load may race it)
        return None


@pytest.mark.slow
def test_a_two_process_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    setup = ["--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--no-progress"]
    train = [sys.executable, "-m", "pyro_ladder", "train", "--preset", "small", "--epochs", "3",
             "--eval-samples", "10", "--eval-limit", "40", "--checkpoint-every", "2",
             "--seed", "4", *setup]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # same threads: bitwise
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True)
    done = subprocess.run([*train, "--out", "whole"], **run)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = tmp_path / "killed"
    # its own session: one SIGKILL to the group ends both processes, as a killed job ends
    proc = subprocess.Popen([*train, "--out", "killed"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill both once they are inside epoch 2
        position = _position(killed / "checkpoint.pt")
        if position is not None and (position["epoch"], position["step"]) >= (1, 2):
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    resumed = [sys.executable, "-m", "pyro_ladder", "train", "--resume", "killed", *setup]
    done = subprocess.run(resumed, **run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    metrics = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("killed", "whole")]
    assert [{k: v for k, v in m.items() if k != "train_seconds"} for m in metrics][0] == \
        {k: v for k, v in metrics[1].items() if k != "train_seconds"}  # fmt: skip
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["state_dict"]
            for n in ("killed", "whole"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SqrtPair(nn.Module):
    """``sqrt(s)`` at ``s = 0``: a finite loss, an infinite gradient, NaN after Adam."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.m = nn.Parameter(torch.full((), 0.3, dtype=torch.float64))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(self, x):
        pyro.module("sqrt_pair", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.m + self.s.sqrt(), 1.0))


def test_a_lightning_checkpoint_never_saves_non_finite_parameters():
    from pyro_ladder import TrainingError

    pair, saved = SqrtPair(), []
    x = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.raises(TrainingError, match="parameters.*epoch 1, step 1 "):
        fit_distributed(
            pair.model, pair.guide, x, epochs=1, batch_size=10, accelerator="cpu", devices=1,
            progress=False, checkpoint=lambda state: saved.append(state["position"]["step"]),
            checkpoint_every=1,
        )  # fmt: skip
    assert saved == [0] and pair.s.isnan()
