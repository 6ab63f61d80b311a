"""MLP VAE, MLP Ladder VAE and the convolutional ladder (both inferences) at one wall-clock
budget per model, on statically binarized MNIST and dynamically binarized Fashion-MNIST.

Models: the paper's 5-layer MLP (64-32-16-8-4 latent / 512-256-128-64-32 hidden, batch
norm) with bottom-up (``mlp-vae``) and top-down (``mlp-lvae``) inference, and the
``conv-mnist`` convolutional ladder (spatial latents at 14x14, 7x7, 4x4, residual blocks,
skip path) with top-down (``conv-lvae``) and bottom-up (``conv-vae``) inference. Each run
trains for ``--budget-seconds`` of wall-clock time (stopping mid-epoch within 10 steps of
it, ``sweep.py``), with Adam, KL warm-up over the first epoch; then scores log p(x) with
K = 1000 on 2000 test images (a fixed random subset, grey test images binarized once, the shared
test-set policy), the test ELBO, per-layer KL and active units (a spatial latent's units
are its channels x positions). Every run is an independent process; ``results.json`` and
``results.md`` hold every run and the mean ± sd over seeds.

    # the 3-seed comparison on a GPU machine (see experiments/gpu_comparison.sh):
    python experiments/conv_vs_mlp.py --data-dir .gpu_data --device cuda --jobs 14 \
        --budget-seconds 40 --out /tmp/conv_vs_mlp
    # seconds: checks that it runs end to end (digits, no files needed)
    python experiments/conv_vs_mlp.py --quick --datasets digits --out /tmp/cvm-quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sweep.py, when run as a script

import pyro  # noqa: E402
import sweep  # noqa: E402
import torch  # noqa: E402

from pyro_ladder import ConvLadderVAE, LadderVAE, preset  # noqa: E402
from pyro_ladder.conv.config import conv_preset  # noqa: E402
from pyro_ladder.data import load_dataset  # noqa: E402

MODELS = {  # name: (family, inference)
    "conv-lvae": ("conv", "top-down"),
    "conv-vae": ("conv", "bottom-up"),
    "mlp-lvae": ("mlp", "top-down"),
    "mlp-vae": ("mlp", "bottom-up"),
}
CONV_EVAL_ROWS = {"cpu": 2**10, "cuda": 2**14}  # a conv pass holds (rows, 32, 14, 14) maps
SCALARS = (
    "test_log_likelihood", "test_elbo", "epochs", "steps", "train_seconds", "train_cpu_seconds",
)  # fmt: skip
LAYERED = ("kl", "active_units")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="binarized-mnist,fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=40.0,
        help="training seconds per run (stops within 10 steps after it, mid-epoch)",
    )
    p.add_argument(
        "--budget-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what the budget counts: wall-clock, or the worker's CPU seconds (one thread: "
        "the fair budget when runs share the machine with other work)",
    )
    p.add_argument(
        "--conv-channels",
        default=None,
        help="the conv ladder's channels per layer, e.g. 8,16,32 (default: conv-mnist's)",
    )
    p.add_argument("--epochs", type=int, default=10_000, help="an upper bound besides the budget")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument(
        "--free-bits", type=float, default=0.0, help="KL floor per layer, conv runs only (nats)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=1000, help="K of test log p(x)")
    p.add_argument("--eval-limit", type=int, default=2000, help="test images scored")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--jobs", type=int, default=1, help="processes at a time (at most 14)")
    p.add_argument(
        "--deadline-seconds",
        type=float,
        default=None,
        help="stop the sweep after this; runs not finished are listed as failed",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="seconds: a 2 s budget on 256 images, K=10 on 50 test images",
    )
    p.add_argument("--out", type=Path, default=Path("docs/results/conv_vs_mlp"))
    args = p.parse_args(argv)  # fmt: skip
    if args.quick:
        args.budget_seconds, args.train_limit = 2.0, 256
        args.eval_samples, args.eval_limit = 10, 50
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if not 1 <= args.jobs <= 14:
        p.error("--jobs must be between 1 and 14")
    return args


def specs(args, data_paths: dict) -> list[dict]:
    """One spec per (data set, model, seed). The conv runs first, as their scoring takes
    longest (the MLP runs then fill the slots they leave), each family seed by seed, so
    that a sweep cut short by its deadline loses the last seeds of the MLP runs rather
    than whole rows."""
    out = []
    for model in args.models.split(","):
        for dataset in args.datasets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                family, inference = MODELS[model]
                out.append({
                    "name": f"{dataset}-{model}-s{seed}", "dataset": dataset, "model": model,
                    "family": family, "inference": inference, "seed": seed,
                    "device": args.device, "epochs": args.epochs,
                    "budget_seconds": args.budget_seconds, "budget_clock": args.budget_clock,
                    "warmup_epochs": args.warmup_epochs,
                    "conv_channels": args.conv_channels if family == "conv" else None,
                    "batch_size": args.batch_size, "lr": args.lr,
                    "eval_samples": args.eval_samples,
                    "free_bits": args.free_bits if family == "conv" else 0.0,
                    "eval_max_rows": CONV_EVAL_ROWS[args.device] if family == "conv" else None,
                    "data": str(data_paths[dataset]), "out": str(args.out),
                })  # fmt: skip
    return sorted(out, key=lambda s: (s["family"] != "conv", s["seed"]))


def build(spec: dict, x_dim: int, image_shape) -> torch.nn.Module:
    """The run's model on its device (seeded, so a seed builds the same networks)."""
    pyro.set_rng_seed(spec["seed"])
    if spec["family"] == "conv":
        sizes = {}
        if spec.get("conv_channels"):
            sizes["channels"] = tuple(int(c) for c in spec["conv_channels"].split(","))
        config = conv_preset(
            "conv-mnist", image_shape=tuple(image_shape), inference=spec["inference"], **sizes
        )
        vae = ConvLadderVAE.from_config(config)
    else:
        paper = preset("paper-mnist", x_dim)
        vae = LadderVAE(
            x_dim, paper.latent_dims, paper.hidden_dims, inference=spec["inference"],
            batch_norm=True,
        )  # fmt: skip
    return vae.to(spec["device"])


def work(spec: dict) -> dict:
    """One run: build, train for the budget, score."""
    if spec["device"] == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest
    data = sweep.load_cached(spec)
    vae = build(spec, data["train"].shape[1], data["image_shape"])
    return {**sweep.train(vae, data, spec), **sweep.score(vae, data, spec)}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return sweep.worker(argv, work)
    args = parse(argv)
    sweep.check_device(args.device)
    paths = {}
    for name in args.datasets.split(","):
        data = load_dataset(name, args.data_dir, download=False)
        paths[name] = sweep.cache_data(
            data, "bernoulli", args.eval_limit, args.train_limit, args.out / f"{name}.pt"
        )
    rows, failures = sweep.run_processes(
        Path(__file__).resolve(), specs(args, paths), args.out, args.jobs, args.deadline_seconds
    )
    order = list(MODELS)[::-1]  # mlp-vae, mlp-lvae, conv-vae, conv-lvae
    rows.sort(key=lambda r: (r["dataset"], order.index(r["model"]), r["seed"]))
    summary = sweep.summarize(rows, ("dataset", "model"), SCALARS, LAYERED)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
               "failures": failures, "environment": sweep.environment(args.device),
               "runs": rows}  # fmt: skip
    sweep.write_results(args.out, payload, table(summary, failures, args))
    for failure in failures:
        print(f"run {failure['name']}: {failure['reason']}", file=sys.stderr)
    return payload


def table(summary: list[dict], failures: list[dict], args) -> str:
    """Markdown: one row per (data set, model), mean ± sd over seeds."""
    lines = [
        f"Mean ± sd over seeds {args.seeds} (n per row); {args.budget_seconds:g} "
        f"{'CPU ' if args.budget_clock == 'cpu' else ''}s of "
        f"training per run on {args.device} ({args.jobs} runs at a time"
        + (f"; conv channels {args.conv_channels}" if args.conv_channels else "")
        + "); log p(x) with "
        f"K = {args.eval_samples} on {args.eval_limit} test images.",
        "",
        "| data | model | n | test log p(x) | test ELBO | KL per layer (nats) "
        "| active units per layer | epochs | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['test_log_likelihood']['n']} "
            f"| {sweep.fmt(r['test_log_likelihood'])} | {sweep.fmt(r['test_elbo'])} "
            f"| {sweep.fmt_layers(r['kl'])} | {sweep.fmt_layers(r['active_units'], 0)} "
            f"| {sweep.fmt(r['epochs'], 1)} | {sweep.fmt(r['steps'], 0)} |"
        )
    if failures:
        lines += ["", "Failed: " + "; ".join(f"{f['name']} ({f['reason']})" for f in failures)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
