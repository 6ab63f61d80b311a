"""Independent runs of an experiment as parallel processes, and their summary over seeds.

Shared by ``seeds.py`` and ``conv_vs_mlp.py``. The parent writes each run's settings to
``<out>/specs/<name>.json``, starts one process per run (``python <script> --worker
<spec>``, at most ``jobs`` at a time, one torch thread each) and waits; every process writes
its own ``<out>/runs/<name>.json``, its weights to ``<out>/weights/<name>.pt`` and its log
to ``<out>/logs/<name>.log``. A run that
fails, or is still running at the sweep's deadline, is listed with the reason and the end
of its log; the summary (mean and sample standard deviation over seeds) is built from the
runs that finished.

Training in a worker (:func:`train`) is one ``fit`` whose checkpoint hook reads the clock
every few steps and ends training once the wall-clock budget is spent, mid-epoch: a run
overshoots its budget by a few steps, and the steps and seconds it trained are recorded.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyro
import torch

import pyro_ladder
from pyro_ladder import evaluate, fit
from pyro_ladder.diagnostics import active_units
from pyro_ladder.runs import dynamic_binarization, test_set

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = Path(pyro_ladder.__file__).resolve().parents[1]  # the folder this pyro_ladder is in
# evaluate's max_rows: cache-sized blocks on a CPU, wide passes on a GPU
EVAL_ROWS = {"cpu": 2**12, "cuda": 2**16}


# ----------------------------------------------------------------------------- the parent


def check_device(device: str) -> None:
    """Refuse a device this machine lacks, before any process starts."""
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu")


def environment(device: str) -> dict:
    """Versions and hardware, stored beside the results."""
    env = {"torch": torch.__version__, "pyro": pyro.__version__, "cpus": os.cpu_count()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def cache_data(data, likelihood: str, eval_limit: int | None, train_limit, path: Path) -> Path:
    """Write the training rows and the scored test rows (the shared test-set policy,
    binarized on the CPU once) to ``path``, so workers load them in a blink."""
    train = data.train if train_limit is None else data.train[:train_limit]  # (N, D)
    payload = {  # clone: a saved slice would carry the whole data set's storage
        "train": train.clone(),
        "test": test_set(data, likelihood, eval_limit).clone(),  # (M, D)
        "binarize": dynamic_binarization(data.kind, likelihood),
        "image_shape": list(data.image_shape),
        "name": data.name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def run_processes(script: Path, specs: list[dict], out: Path, jobs: int, deadline=None):
    """Run ``script --worker`` once per spec, at most ``jobs`` at a time, until all end or
    ``deadline`` seconds pass (then running ones are stopped, waiting ones skipped).

    :returns: ``(rows, failures)``: each finished run's JSON, and ``{"name", "reason",
        "log_tail"}`` for every other run.
    """
    for sub in ("specs", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    start, waiting, running, failures = time.monotonic(), list(specs), {}, []
    while waiting or running:
        late = deadline is not None and time.monotonic() - start > deadline
        while waiting and len(running) < jobs and not late:
            spec = waiting.pop(0)
            running[spec["name"]] = _start(script, spec, out)
        for name, proc in list(running.items()):
            if late and proc.poll() is None:
                _stop(proc)
                failures.append(_failure(out, name, f"stopped at the {deadline} s deadline"))
            elif proc.poll() is not None and proc.returncode != 0:
                failures.append(_failure(out, name, f"exit status {proc.returncode}"))
            if proc.poll() is not None:
                del running[name]
        if late:
            failures += [_failure(out, s["name"], "not started: deadline") for s in waiting]
            waiting = []
        time.sleep(0.2)
    finished = {f["name"] for f in failures}
    rows = [_read(out / "runs" / f"{s['name']}.json") for s in specs if s["name"] not in finished]
    return rows, failures


def _start(script: Path, spec: dict, out: Path) -> subprocess.Popen:
    path = out / "specs" / f"{spec['name']}.json"
    path.write_text(json.dumps(spec, indent=1) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # the workers import the same pyro_ladder as this process, wherever it was found
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIBRARY), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(script), "--worker", str(path)]
    with open(out / "logs" / f"{spec['name']}.log", "w") as log:  # the child keeps its copy
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _failure(out: Path, name: str, reason: str) -> dict:
    log = out / "logs" / f"{name}.log"
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    return {"name": name, "reason": reason, "log_tail": tail}


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- a worker


def worker(argv: list[str], work) -> None:
    """The body of ``script --worker <spec>``: one thread, ``work(spec) -> row``, the row
    written atomically (a half-written JSON never passes for a finished run)."""
    spec = json.loads(Path(argv[1]).read_text())
    torch.set_num_threads(1)
    # the first torch optimizer imports torch._dynamo (seconds): pay that before any clock
    # starts, so it does not eat into a run's training budget
    importlib.import_module("torch._dynamo")
    start = time.perf_counter()
    row = {**spec, **work(spec)}
    row["process_seconds"] = time.perf_counter() - start
    target = Path(spec["out"]) / "runs" / f"{spec['name']}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(target)


def load_cached(spec: dict) -> dict:
    """The cached data of :func:`cache_data`, on the run's device."""
    data = torch.load(spec["data"], weights_only=True)
    for key in ("train", "test"):
        data[key] = data[key].to(spec["device"])
    return data


# what a training budget counts: "wall" seconds, or "cpu" seconds of the worker process
# (one torch thread, so the seconds one core spent on it): the fair budget when runs share
# a machine with other work, as a loaded core stretches wall-clock but not CPU time
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class BudgetSpent(Exception):
    """Raised by :func:`train`'s checkpoint hook to end ``fit`` when the budget is spent."""


def train(vae, data: dict, spec: dict) -> dict:
    """Train ``vae`` on ``data["train"]`` for ``spec["epochs"]`` epochs or until
    ``spec["budget_seconds"]`` of training have passed (on ``spec["budget_clock"]``, one
    of :data:`CLOCKS`, wall-clock by default), whichever comes first.

    The budget is checked at ``fit``'s checkpoints, every ``spec["check_every"]`` steps
    (10 by default) and at every epoch's end, so training stops mid-epoch at most that
    many steps after the budget; the weights are those of the last step taken.

    :returns: ``epochs`` (fractional when stopped mid-epoch), ``steps``,
        ``train_seconds``, ``train_cpu_seconds`` and ``final_train_loss`` (the loss of the
        last epoch, or of the part of the epoch trained).
    """
    budget, last = spec.get("budget_seconds"), {}
    clock = CLOCKS[spec.get("budget_clock", "wall")]
    start, start_clock, start_cpu = time.perf_counter(), clock(), time.process_time()

    def hook(state):
        last["state"] = state
        moved = state["position"]["epoch"] or state["position"]["step"]
        if budget is not None and moved and clock() - start_clock >= budget:
            raise BudgetSpent

    try:
        fit(
            vae.model, vae.guide, data["train"], epochs=spec["epochs"],
            batch_size=spec["batch_size"], lr=spec["lr"], warmup_epochs=spec["warmup_epochs"],
            binarize=data["binarize"], seed=spec["seed"], progress=False, checkpoint=hook,
            free_bits=spec.get("free_bits", 0.0),
            checkpoint_every=None if budget is None else spec.get("check_every", 10),
        )  # fmt: skip
    except BudgetSpent:
        pass
    _synchronize(spec["device"])
    _save_weights(vae, spec)
    return {**_position(last["state"], len(data["train"]) // spec["batch_size"]),
            "train_seconds": time.perf_counter() - start,
            "train_cpu_seconds": time.process_time() - start_cpu}  # fmt: skip


def _save_weights(vae, spec: dict) -> None:
    """The trained weights as ``<out>/weights/<name>.pt`` (written whole or not at all),
    so that a run can be scored again without training it again."""
    if "out" not in spec:
        return
    target = Path(spec["out"]) / "weights" / f"{spec['name']}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    torch.save({k: v.cpu() for k, v in vae.state_dict().items()}, tmp)
    tmp.replace(target)


def _position(state: dict, steps_per_epoch: int) -> dict:
    """Epochs, steps and last loss of a training state saved by ``fit``."""
    pos, per_epoch = state["position"], max(1, steps_per_epoch)
    loss = pos["total"] / pos["seen"] if pos["seen"] else state["history"][-1]["loss"]
    return {
        "epochs": pos["epoch"] + pos["step"] / per_epoch,
        "steps": pos["epoch"] * per_epoch + pos["step"],
        "final_train_loss": loss,
    }


def score(vae, data: dict, spec: dict) -> dict:
    """Test ``log p(x)`` (K = ``spec["eval_samples"]``), ELBO, per-layer KL and active
    units (a spatial latent counts each channel and position as a unit)."""
    start = time.perf_counter()
    test = data["test"]  # (M, D), on the device
    rows = spec.get("eval_max_rows") or EVAL_ROWS[spec["device"]]
    result = evaluate(
        vae.model, vae.guide, test, num_samples=spec["eval_samples"],
        batch_size=spec.get("eval_batch_size", 100), max_rows=rows,
    )  # fmt: skip
    units = active_units(vae.model, vae.guide, test)
    _synchronize(spec["device"])
    return {
        "num_test": len(test),
        "test_log_likelihood": result["log_likelihood"].mean().item(),
        "test_elbo": result["elbo"].mean().item(),
        "kl": {k: v.mean().item() for k, v in sorted(result["kl"].items())},
        "active_units": {k: v["active"] for k, v in sorted(units.items())},
        "units": {k: v["units"] for k, v in sorted(units.items())},
        "eval_seconds": time.perf_counter() - start,
    }


def _synchronize(device: str) -> None:
    if device == "cuda":  # finish queued kernels before a clock is read
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the summary


def mean_sd(values: list[float]) -> dict:
    """``{"mean", "sd", "n"}``: ``sd`` is the sample standard deviation (``n - 1`` in the
    denominator), None for a single value."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}


def summarize(rows: list[dict], keys: tuple[str, ...], scalars, layered) -> list[dict]:
    """One record per group of ``rows`` sharing the values of ``keys`` (in first-seen order):
    :func:`mean_sd` of each scalar metric, and of each layer of each per-layer metric
    (``{site: value}`` dicts)."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for values, members in groups.items():
        record = dict(zip(keys, values, strict=True))
        record["seeds"] = sorted(r["seed"] for r in members)
        for name in scalars:
            record[name] = mean_sd([r[name] for r in members])
        for name in layered:
            sites = sorted(members[0][name], key=_layer_order)
            record[name] = {s: mean_sd([r[name][s] for r in members]) for s in sites}
        out.append(record)
    return out


def _layer_order(site: str) -> int:
    return int(site[1:]) if site[1:].isdigit() else 0


def fmt(stat: dict, digits: int = 2) -> str:
    """``mean ± sd`` (``mean`` alone for one seed)."""
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def fmt_layers(stats: dict, digits: int = 2) -> str:
    """Per-layer ``mean ± sd``, ``z1`` first, separated by commas."""
    return ", ".join(fmt(stats[s], digits) for s in sorted(stats, key=_layer_order))


def write_results(out: Path, payload: dict, table: str) -> None:
    """``results.json`` (settings, every run, failures, summary) and ``results.md``."""
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "results.md").write_text(table)
