"""Speed and memory of pyro_ladder against the plain-PyTorch reference, side by side.

``python -m benchmarks`` (or ``python benchmarks/run.py``) measures, in one process and
interleaved (library, reference, reference, library, ... so that a change in machine load
hits both alike), the median over repeats of

1. ``train``: one training step (``SVI.step`` with ``pyro.optim.Adam``, as ``fit`` runs it,
   against ``torch.optim.Adam`` on the reference), and the gradient alone without the
   optimizer, for ``elbo``, ``iwae`` and ``iwae-dreg`` (K=5) and Pyro's ``jit-elbo``;
   the paper's 5-layer network, batch 256, binarized MNIST;
2. ``eval``: the importance-sampled log-likelihood with K=5000 on fixed test images: time,
   images per second, the projected time for the 10,000-image test set, and the peak
   resident memory of a fresh process that runs only that evaluation;
3. ``scaling``: step time against K and against depth, evaluation time against K, and peak
   memory against K and against the number of images;
4. ``compiled`` (not run by default: minutes of compilation): ``make_elbo(name,
   compile=True)`` against the eager reference and against the reference's training step
   compiled whole with ``torch.compile``, with the compile times and the number of steps
   after which compiling pays off.

It prints tables and writes JSON with the conditions (threads, device, versions, load
average at start and end). ``--tiny`` runs every default part once on a small network and
the digits data, in seconds (the test suite does this). ``python -m benchmarks.table``
turns the JSON into the tables of ``docs/performance.md``. Run from the repository root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/run.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import _report  # noqa: E402
from benchmarks.reference import BERNOULLI, ReferenceLadder  # noqa: E402
from pyro_ladder import LadderVAE, log_likelihood, make_elbo, preset  # noqa: E402
from pyro_ladder._compile import eager_draws  # noqa: E402
from pyro_ladder.allocator import keep_freed_memory, malloc_setting  # noqa: E402
from pyro_ladder.data import binarize, load_dataset  # noqa: E402
from pyro_ladder.optim import Adam  # noqa: E402

SECTIONS = ("train", "eval", "scaling", "compiled")
DEFAULT_SECTIONS = ("train", "eval", "scaling")
DEVICE = torch.device("cpu")  # --device: where the networks and the data live
REFERENCE_BERNOULLI = "torch"  # --reference-bernoulli: the reference's Bernoulli log-density
TARGETS = {"elbo": 1.05, "iwae": 1.05, "iwae-dreg": 1.05, "eval": 1.00}  # issue 16
COMPILED_TARGETS = {"ratio": 0.80, "ratio_compiled": 1.05}  # vs eager, vs compiled reference
MEMORY_TARGET_MB = 2048
TEST_SET = 10_000

FULL = dict(
    dataset="binarized-mnist",
    latent=(64, 32, 16, 8, 4),
    hidden=(512, 256, 128, 64, 32),
    batch=256,
    particles=5,
    train_steps=15,
    eval_images=20,
    eval_samples=5000,
    eval_repeats=3,
    scaling_k=(1, 5, 20, 50),
    scaling_depths=(1, 2, 3, 4, 5),
    scaling_repeats=5,
    eval_k=(500, 1000, 2000, 5000),
    eval_k_images=10,
    eval_rows=(1024, 4096, 16384, 32768),
    eval_rows_k=2000,
    memory_k=(50, 500, 5000),
    memory_k_images=20,
    memory_images=(100, 1000, 10_000),
    memory_images_k=20,
)
TINY = dict(
    dataset="digits",
    latent=(4, 2),
    hidden=(16, 8),
    batch=16,
    particles=2,
    train_steps=1,
    eval_images=4,
    eval_samples=20,
    eval_repeats=1,
    scaling_k=(1, 2),
    scaling_depths=(1, 2),
    scaling_repeats=1,
    eval_k=(5, 10),
    eval_k_images=2,
    eval_rows=(8, 32),
    eval_rows_k=10,
    memory_k=(5,),
    memory_k_images=2,
    memory_images=(2,),
    memory_images_k=5,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tiny", action="store_true", help="one small iteration of each part")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--eval-repeats", type=int, default=None, help="timed evaluations (default 3)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed training steps")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma list of parts out of {','.join(SECTIONS)} (default: all but compiled)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled part (default inductor; aot_eager and "
        "eager compile in seconds, for checking that the part runs)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the compiled part (default: torch's; on a GPU "
        "reduce-overhead replays the step as a CUDA graph)",
    )
    parser.add_argument(
        "--malloc",
        choices=("kept", "default"),
        default="kept",
        help="kept (default): glibc's malloc keeps freed memory for reuse, as fit and the "
        "command line set it (pyro_ladder.allocator; library and reference alike, one "
        "process); default: glibc's own thresholds, which return it and fault it in again",
    )
    parser.add_argument(
        "--reference-bernoulli",
        choices=sorted(BERNOULLI),
        default="torch",
        help="the reference's Bernoulli log-density: torch's (default, what a user writes) "
        "or the library's vectorized formula, to measure the library's machinery apart "
        "from it (benchmarks/reference.py)",
    )
    parser.add_argument("--data-dir", default=None, help="folder with binarized_mnist/")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda[:N]: networks and data there"
    )
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {list(SECTIONS)}")
    if args.threads < 1 or any(n is not None and n < 1 for n in (args.repeats, args.eval_repeats)):
        parser.error("--threads, --repeats and --eval-repeats must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.malloc == "kept":
        keep_freed_memory()
    elif malloc_setting() == "kept":
        raise SystemExit(
            "--malloc default: this process has kept freed memory already (fit or the "
            "command line ran in it); run the benchmark in a fresh process"
        )
    torch.set_num_threads(args.threads)
    global DEVICE, REFERENCE_BERNOULLI
    DEVICE = torch.device(args.device)
    REFERENCE_BERNOULLI = args.reference_bernoulli
    size = dict(TINY if args.tiny else FULL)
    if args.repeats is not None:
        size["train_steps"] = args.repeats
    if args.eval_repeats is not None:
        size["eval_repeats"] = args.eval_repeats
    data = _load(size["dataset"], args.data_dir)
    results = {"conditions": _conditions(args, size, start=True)}
    for part in args.only:
        results[part] = PARTS[part](data, size, args)
    results["conditions"].update(_conditions(args, size, start=False))
    results["targets"] = _targets(results)
    _print_targets(results["targets"])
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / _default_name(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}")
    return results


def _default_name(args) -> str:
    where = "" if args.device == "cpu" else f"-{args.device.replace(':', '')}"
    where += "" if args.reference_bernoulli == "torch" else "-reference-library-bernoulli"
    return f"{'tiny' if args.tiny else 'paper-mnist'}-threads{args.threads}{where}.json"


# ---------------------------------------------------------------- data, models, timing


def _load(name, data_dir):
    """``{"train": (N, D), "test": (M, D)}`` binary float32 tensors."""
    if name == "digits":
        ds = load_dataset("digits")
        gen = torch.Generator().manual_seed(0)
        return {
            "train": binarize(ds.train, generator=gen).to(DEVICE),
            "test": binarize(ds.test, generator=gen).to(DEVICE),
        }
    if data_dir is None and (ROOT.parent / "shared" / "data").is_dir():
        data_dir = ROOT.parent / "shared" / "data"
    ds = load_dataset(name, data_dir, download=False)
    return {"train": ds.train.float().to(DEVICE), "test": ds.test.float().to(DEVICE)}


def _pair(x_dim, latent, hidden, seed, batch_norm=True):
    """A library ``LadderVAE`` and a reference with the same weights."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    config = preset(
        "paper-mnist", x_dim, latent_dims=latent, hidden_dims=hidden, batch_norm=batch_norm
    )
    vae = LadderVAE.from_config(config)
    return vae.to(DEVICE), _reference(vae).to(DEVICE)


def _reference(vae) -> ReferenceLadder:
    return ReferenceLadder.from_library(vae, REFERENCE_BERNOULLI)


def _interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall-clock seconds of each function (``name``), median CPU seconds of this
    process (``name_cpu``: what the function cost, whatever else the machine ran), every
    wall-clock time (``name_all``) and the mean minor page faults per call
    (``name_faults``); the order alternates between repeats."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    faults = {name: 0 for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            before = _minor_faults()
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            if DEVICE.type == "cuda":  # the work queued on the GPU counts, not its launch
                torch.cuda.synchronize(DEVICE)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
            faults[name] += _minor_faults() - before
    out = {name: statistics.median(t) for name, t in wall.items()}
    out.update({f"{name}_cpu": statistics.median(t) for name, t in cpu.items()})
    out.update({f"{name}_all": t for name, t in wall.items()})
    out.update({f"{name}_faults": n / repeats for name, n in faults.items()})
    return out


def _minor_faults() -> int:
    """This process's minor page faults so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Batches:
    """Cycles through minibatches of the training set; each timed pair uses a fresh one."""

    def __init__(self, train, batch):
        self.train, self.batch, self.i = train, batch, 0

    def __call__(self):
        n = len(self.train) // self.batch
        x = self.train[(self.i % n) * self.batch : (self.i % n + 1) * self.batch]
        self.i += 1
        return x


# ---------------------------------------------------------------- 1. training step


def _train_fns(vae, ref, estimator, k, x_of, detail):
    """Timed functions: a library step (``SVI`` with ``pyro_ladder.optim.Adam``, fused on
    CPUs and CUDA) and a reference step (``torch.optim.Adam`` with its defaults); with
    ``detail`` also the library step with ``pyro.optim.Adam``, a reference step with
    torch's fused Adam (a hand-written loop that asks for it: the library's own speed-up
    made available to the reference) and the gradients alone, without the optimizer
    step."""
    lib_name = "elbo" if estimator == "jit-elbo" else estimator
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), make_elbo(estimator, k))
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    batch = {}

    def lib_step():
        batch["x"] = x_of()
        svi.step(batch["x"])

    def ref_step():
        ref.train_step(opt, batch["x"], lib_name, k)

    fns = {"library": lib_step, "reference": ref_step}
    if not detail:
        return fns
    pyro_svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_elbo(estimator, k))
    grad_elbo = make_elbo(lib_name, k)  # the JIT compiles per instance: time jit-elbo's steps only

    def lib_grad():
        vae.zero_grad(set_to_none=True)
        grad_elbo.loss_and_grads(vae.model, vae.guide, batch["x"])

    def ref_grad():
        ref.zero_grad(set_to_none=True)
        if lib_name == "iwae-dreg":
            ref.dreg_backward(batch["x"], k)
        elif lib_name == "elbo":
            ref.elbo_loss(batch["x"]).backward()
        else:
            ref.iwae_loss(batch["x"], k).backward()

    fns["library_pyro_adam"] = lambda: pyro_svi.step(batch["x"])
    ref_fused = _reference(vae).to(DEVICE)
    opt_fused = torch.optim.Adam(ref_fused.parameters(), lr=1e-3, fused=True)
    fns["reference_fused"] = lambda: ref_fused.train_step(opt_fused, batch["x"], lib_name, k)
    if estimator != "jit-elbo":
        fns.update(library_grad=lib_grad, reference_grad=ref_grad)
    return fns


def _train_row(data, size, args, estimator, k, latent, hidden, repeats, detail=False, batch=None):
    # iwae-dreg refuses batch norm in training mode (pyro_ladder/elbo/coupling.py)
    batch_norm = estimator != "iwae-dreg"
    vae, ref = _pair(data["train"].shape[1], latent, hidden, args.seed, batch_norm)
    batch = batch or size["batch"]
    fns = _train_fns(vae, ref, estimator, k, _Batches(data["train"], batch), detail)
    with _quiet_jit():
        t = _interleaved(fns, repeats, warmup=3)
    row = {
        "estimator": estimator,
        "particles": k,
        "depth": len(latent),
        "hidden_dims": list(hidden),
        "batch": batch,
        "library_ms": 1e3 * t["library"],
        "reference_ms": 1e3 * t["reference"],
        "ratio": t["library"] / t["reference"],
        "library_cpu_ms": 1e3 * t["library_cpu"],
        "reference_cpu_ms": 1e3 * t["reference_cpu"],
        "cpu_ratio": t["library_cpu"] / t["reference_cpu"],
        "library_ms_all": [1e3 * v for v in t["library_all"]],
        "reference_ms_all": [1e3 * v for v in t["reference_all"]],
    }
    if "library_pyro_adam" in t:
        row["library_pyro_adam_ms"] = 1e3 * t["library_pyro_adam"]
        row["ratio_pyro_adam"] = t["library_pyro_adam"] / t["reference"]
        row["reference_fused_ms"] = 1e3 * t["reference_fused"]
        row["ratio_fused_reference"] = t["library"] / t["reference_fused"]
    if "library_grad" in t:
        row["library_grad_ms"] = 1e3 * t["library_grad"]
        row["reference_grad_ms"] = 1e3 * t["reference_grad"]
        row["grad_ratio"] = t["library_grad"] / t["reference_grad"]
    return row


def run_train(data, size, args) -> list:
    rows = []
    k = size["particles"]
    for estimator, particles in [("elbo", 1), ("iwae", k), ("iwae-dreg", k), ("jit-elbo", 1)]:
        row = _train_row(
            data,
            size,
            args,
            estimator,
            particles,
            size["latent"],
            size["hidden"],
            size["train_steps"],
            detail=True,
        )
        row["target"] = TARGETS.get(estimator)
        rows.append(row)
    _print_table(
        "training step, median ms. library: SVI + pyro_ladder.optim.Adam (fit's default); "
        "pyro_adam: SVI + pyro.optim.Adam; reference_fused: the reference with torch's fused "
        "Adam; grad: the gradient alone, no optimizer step",
        rows,
        [
            "estimator",
            "particles",
            "library_ms",
            "reference_ms",
            "ratio",
            "cpu_ratio",
            "library_pyro_adam_ms",
            "ratio_pyro_adam",
            "reference_fused_ms",
            "ratio_fused_reference",
            "library_grad_ms",
            "reference_grad_ms",
            "grad_ratio",
            "target",
        ],
    )
    overhead = [
        _train_row(
            data,
            size,
            args,
            name,
            particles,
            size["latent"],
            (8,) * len(size["hidden"]),
            size["train_steps"],
            detail=True,
            batch=16,
        )
        for name, particles in [("elbo", 1), ("iwae", k), ("iwae-dreg", k)]
    ]
    _print_table(
        "fixed cost per step: the same depth with 8-unit layers, batch 16 (arithmetic negligible)",
        overhead,
        [
            "estimator",
            "particles",
            "library_ms",
            "reference_ms",
            "library_cpu_ms",
            "reference_cpu_ms",
            "library_pyro_adam_ms",
            "library_grad_ms",
            "reference_grad_ms",
        ],
    )
    for row in overhead:
        row["kind"] = "fixed cost"
    return rows + overhead


class _quiet_jit:
    """torch 2.14 warns on every torch.jit.trace (Pyro's jit-elbo); the timing is the point."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ---------------------------------------------------------------- 2. evaluation


def _eval_fns(vae, ref, x, k, max_rows=None):
    rows = {} if max_rows is None else {"max_rows": max_rows}  # None: each one's default

    def lib():
        log_likelihood(vae.model, vae.guide, x, num_samples=k, **rows)

    def reference():
        ref.log_likelihood(x, k, **rows)

    return {"library": lib, "reference": reference}


def _eval_row(vae, ref, x, k, repeats, max_rows=None) -> dict:
    # one untimed call each first: the library's first call also finds the plate nesting
    # and validates its first pass, once per evaluation in a real run but not per repeat
    t = _interleaved(_eval_fns(vae, ref, x, k, max_rows), repeats, warmup=1)
    n = len(x)
    return {
        "images": n,
        "samples": k,
        "max_rows": max_rows,
        "library_s": t["library"],
        "reference_s": t["reference"],
        "library_s_all": t["library_all"],
        "reference_s_all": t["reference_all"],
        "ratio": t["library"] / t["reference"],
        "cpu_ratio": t["library_cpu"] / t["reference_cpu"],
        "library_images_per_s": n / t["library"],
        "reference_images_per_s": n / t["reference"],
        "library_test_set_min": TEST_SET * t["library"] / n / 60,
        "reference_test_set_min": TEST_SET * t["reference"] / n / 60,
    }


def run_eval(data, size, args) -> dict:
    vae, ref = _pair(data["train"].shape[1], size["latent"], size["hidden"], args.seed)
    x = data["test"][: size["eval_images"]]
    row = _eval_row(vae, ref, x, size["eval_samples"], size["eval_repeats"])
    row["target"] = TARGETS["eval"]
    for which in ("library", "reference") if DEVICE.type == "cpu" else ():  # host memory
        mem = _memory_probe(which, vae, x, size["eval_samples"], args.threads)
        row[f"{which}_peak_rss_mb"] = mem["peak_rss_mb"]
        row[f"{which}_eval_rss_increase_mb"] = mem["increase_mb"]
    _print_table(
        f"evaluation, K={size['eval_samples']}, {len(x)} test images",
        [row],
        [
            "images",
            "samples",
            "library_s",
            "reference_s",
            "ratio",
            "cpu_ratio",
            "library_images_per_s",
            "reference_images_per_s",
            "library_test_set_min",
            "reference_test_set_min",
            "library_peak_rss_mb",
            "reference_peak_rss_mb",
        ],
    )
    return row


def _memory_probe(which, vae, x, k, threads) -> dict:
    """Peak resident memory of a fresh process that builds the network and evaluates
    ``x`` with ``k`` samples (``ru_maxrss``, which counts the whole process: Python, torch,
    the weights and the data)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    state = {k_: v.clone() for k_, v in vae.state_dict().items()}
    config = vae.config.to_dict()
    proc = ctx.Process(
        target=_probe,
        args=(
            queue,
            which,
            config,
            state,
            x.clone(),
            k,
            threads,
            malloc_setting(),
            REFERENCE_BERNOULLI,
        ),
    )
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _probe(queue, which, config, state, x, k, threads, malloc, bernoulli):
    if malloc == "kept":  # as the parent process
        keep_freed_memory()
    torch.set_num_threads(threads)
    vae = LadderVAE(**config)
    vae.load_state_dict(state)
    ref = ReferenceLadder.from_library(vae, bernoulli) if which == "reference" else None
    before = _maxrss_mb()
    start = time.perf_counter()
    if ref is None:
        log_likelihood(vae.model, vae.guide, x, num_samples=k)
    else:
        ref.log_likelihood(x, k)
    seconds = time.perf_counter() - start
    peak = _maxrss_mb()
    queue.put({"peak_rss_mb": peak, "increase_mb": peak - before, "seconds": seconds})


def _maxrss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` on Linux, which belongs to
    this program alone (``ru_maxrss`` would carry over the parent's peak across the
    fork and exec that start the probe), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # kB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


# ---------------------------------------------------------------- 3. scaling


def run_scaling(data, size, args) -> dict:
    x_dim = data["train"].shape[1]
    latent, hidden, reps = size["latent"], size["hidden"], size["scaling_repeats"]
    out = {
        "step_vs_k": [],
        "step_vs_depth": [],
        "eval_vs_k": [],
        "eval_vs_rows": [],
        "memory_vs_k": [],
        "memory_vs_images": [],
    }
    for estimator in ("iwae", "iwae-dreg"):
        for k in size["scaling_k"]:
            out["step_vs_k"].append(
                _train_row(data, size, args, estimator, k, latent, hidden, reps)
            )
    for depth in size["scaling_depths"]:
        row = _train_row(data, size, args, "elbo", 1, latent[:depth], hidden[:depth], reps)
        out["step_vs_depth"].append(row)
    vae, ref = _pair(x_dim, latent, hidden, args.seed)
    x = data["test"][: size["eval_k_images"]]
    for k in size["eval_k"]:
        out["eval_vs_k"].append(_eval_row(vae, ref, x, k, 1))
    for rows in size["eval_rows"]:
        out["eval_vs_rows"].append(_eval_row(vae, ref, x, size["eval_rows_k"], 1, rows))
    for k in size["memory_k"]:
        out["memory_vs_k"].append(
            _memory_row(vae, data["test"][: size["memory_k_images"]], k, args)
        )
    for n in size["memory_images"]:
        out["memory_vs_images"].append(
            _memory_row(vae, data["test"][:n], size["memory_images_k"], args)
        )
    _print_scaling(out)
    return out


def _memory_row(vae, x, k, args) -> dict:
    row = {"images": len(x), "samples": k}
    for which in ("library", "reference"):
        mem = _memory_probe(which, vae, x, k, args.threads)
        row[f"{which}_peak_rss_mb"] = mem["peak_rss_mb"]
        row[f"{which}_eval_rss_increase_mb"] = mem["increase_mb"]
        row[f"{which}_s"] = mem["seconds"]
    return row


def _print_scaling(out):
    step_cols = [
        "estimator",
        "particles",
        "depth",
        "library_ms",
        "reference_ms",
        "ratio",
        "cpu_ratio",
    ]
    _print_table("step time against K (batch as above)", out["step_vs_k"], step_cols)
    _print_table("elbo step time against depth", out["step_vs_depth"], step_cols)
    eval_cols = ["images", "samples", "max_rows", "library_s", "reference_s", "ratio", "cpu_ratio"]
    _print_table("evaluation time against K", out["eval_vs_k"], eval_cols)
    _print_table("evaluation time against rows per pass", out["eval_vs_rows"], eval_cols)
    mem_cols = [
        "images",
        "samples",
        "library_peak_rss_mb",
        "reference_peak_rss_mb",
        "library_eval_rss_increase_mb",
        "reference_eval_rss_increase_mb",
        "library_s",
    ]
    _print_table("peak resident memory against K", out["memory_vs_k"], mem_cols)
    _print_table(
        "peak resident memory against the number of images", out["memory_vs_images"], mem_cols
    )


# ---------------------------------------------------------------- 4. compiled


def run_compiled(data, size, args) -> list:
    """``make_elbo(name, compile=...)`` against the eager library, the eager reference and
    the reference's whole training step under ``torch.compile``."""
    rows = []
    for estimator, k in [
        ("elbo", 1),
        ("iwae", size["particles"]),
        ("iwae-dreg", size["particles"]),
    ]:
        rows.append(_compiled_row(data, size, args, estimator, k))
    _print_table(
        f"compiled ({args.compile_backend}), median ms after compilation; compile_s: the first "
        "step's extra seconds; pays_off_after: steps until the compile time is recovered",
        rows,
        [
            "estimator",
            "particles",
            "library_ms",
            "library_eager_ms",
            "reference_ms",
            "reference_compiled_ms",
            "reference_compiled_eager_draws_ms",
            "ratio",
            "ratio_compiled",
            "ratio_compiled_eager_draws",
            "library_compile_s",
            "reference_compile_s",
            "pays_off_after",
        ],
    )
    return rows


def _compiled_row(data, size, args, estimator, k) -> dict:
    batch_norm = estimator != "iwae-dreg"  # as in _train_row
    x_dim = data["train"].shape[1]
    vae, ref = _pair(x_dim, size["latent"], size["hidden"], args.seed, batch_norm)
    ref_c = _reference(vae)  # its own copy: compiled graphs key on modules
    options = {"backend": args.compile_backend}
    if args.compile_mode is not None:
        options["mode"] = args.compile_mode
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), make_elbo(estimator, k, compile=options))
    eager = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), make_elbo(estimator, k))
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(ref_c.parameters(), lr=1e-3)
    ref_step = torch.compile(ref_c.train_step, **options)
    x_of, batch = _Batches(data["train"], size["batch"]), {}
    # like for like: the reference compiled with the library's setting for random numbers
    # (torch's generator, eager_draws); the row above is the reference compiled as written
    like = eager_draws(options)
    if like != options:
        ref_d = _reference(vae)
        opt_d = torch.optim.Adam(ref_d.parameters(), lr=1e-3)
        ref_d_step = torch.compile(ref_d.train_step, **like)

    def lib():
        batch["x"] = x_of()
        svi.step(batch["x"])

    fns = {
        "library": lib,
        "library_eager": lambda: eager.step(batch["x"]),
        "reference": lambda: ref.train_step(opt, batch["x"], estimator, k),
        "reference_compiled": lambda: ref_step(opt_c, batch["x"], estimator, k),
    }
    if like != options:
        fns["reference_compiled_eager_draws"] = lambda: ref_d_step(opt_d, batch["x"], estimator, k)
    first = {}
    with _quiet_jit():
        for name in [n for n in fns if n not in ("library_eager", "reference")]:  # compile
            start = time.perf_counter()
            fns[name]()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)
            first[name] = time.perf_counter() - start
        t = _interleaved(fns, size["train_steps"], warmup=2)
    lib_compile = first["library"] - t["library"]
    saved = t["library_eager"] - t["library"]
    row = {
        "estimator": estimator,
        "particles": k,
        "backend": args.compile_backend,
        "mode": args.compile_mode,
        **{f"{name}_ms": 1e3 * t[name] for name in fns},
        "ratio": t["library"] / t["reference"],
        "ratio_compiled": t["library"] / t["reference_compiled"],
        "library_compile_s": lib_compile,
        "reference_compile_s": first["reference_compiled"] - t["reference_compiled"],
        "pays_off_after": math.ceil(lib_compile / saved) if saved > 0 else None,
    }
    if "reference_compiled_eager_draws" in fns:
        row["ratio_compiled_eager_draws"] = t["library"] / t["reference_compiled_eager_draws"]
    return row


PARTS = {"train": run_train, "eval": run_eval, "scaling": run_scaling, "compiled": run_compiled}


# ---------------------------------------------------------------- reporting


def _conditions(args, size, start: bool) -> dict:
    load = os.getloadavg()
    if not start:
        return {"load_average_end": load, "finished": _now()}
    return {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "started": _now(),
        "load_average_start": load,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        **_report.cpu(args.threads),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
        "network": {"latent_dims": size["latent"], "hidden_dims": size["hidden"]},
        "dataset": size["dataset"],
        "sizes": size,
        "timing": "median over repeats, library and reference interleaved in one process",
        "malloc": malloc_setting(),
        "reference_bernoulli": REFERENCE_BERNOULLI,
    }


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _targets(results) -> list:
    """Each target with the measured value and whether it is met."""
    checks = []
    for row in results.get("train", []):
        if row.get("target") is not None and row.get("kind") is None:
            label = f"{row['estimator']} step (K={row['particles']})"
            checks.append((label, row["ratio"], row["target"]))
            checks.append((label + " with pyro.optim.Adam", row["ratio_pyro_adam"], row["target"]))
    for row in results.get("compiled", []):
        label = f"{row['estimator']} compiled step (K={row['particles']})"
        checks.append((label + " / eager reference", row["ratio"], COMPILED_TARGETS["ratio"]))
        checks.append(
            (
                label + " / compiled reference",
                row["ratio_compiled"],
                COMPILED_TARGETS["ratio_compiled"],
            )
        )
        if "ratio_compiled_eager_draws" in row:
            checks.append(
                (
                    label + " / compiled reference, torch's generator",
                    row["ratio_compiled_eager_draws"],
                    COMPILED_TARGETS["ratio_compiled"],
                )
            )
    ev = results.get("eval")
    if ev:
        checks.append((f"eval K={ev['samples']} time", ev["ratio"], ev["target"]))
        if "library_peak_rss_mb" in ev:  # measured on the CPU only
            checks.append(("eval peak RSS (MB)", ev["library_peak_rss_mb"], MEMORY_TARGET_MB))
    scaling = results.get("scaling", {})
    for key in ("memory_vs_k", "memory_vs_images"):
        for row in scaling.get(key, []):
            label = f"eval peak RSS (MB), {row['images']} images, K={row['samples']}"
            checks.append((label, row["library_peak_rss_mb"], MEMORY_TARGET_MB))
    return [{"what": w, "value": v, "limit": lim, "met": v <= lim} for w, v, lim in checks]


def _print_targets(targets):
    if targets:
        _print_table(
            "targets (library / reference ratio, or MB)", targets, ["what", "value", "limit", "met"]
        )


def _print_table(title, rows, cols):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
