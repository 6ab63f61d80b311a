"""Bottom-up VAE vs Ladder VAE on digits, 1 to 5 layers, over seeds: mean and sd per cell.

The digits comparison of ``ladder_vs_vae.py`` (the paper's layer sizes, the first L of
64-32-16-8-4 latent / 512-256-128-64-32 hidden, batch norm, Adam 2e-3, batch 128, 200
epochs with warm-up over the first tenth, test log p(x) with K = 1000 on all 360 test
images) repeated for several seeds, each run an independent process (``sweep.py``).
Writes ``results.json`` (every run, failures, the summary) and ``results.md`` (a table
of mean ± sd over seeds).

    # the 3-seed sweep, 14 processes on one GPU (see experiments/gpu_comparison.sh):
    python experiments/seeds.py --seeds 0,1,2 --device cuda --jobs 14 --out /tmp/seeds
    # the same on a CPU machine, one process per core:
    python experiments/seeds.py --seeds 0,1,2 --jobs 2 --out docs/results/seeds
    # seconds: checks that it runs end to end
    python experiments/seeds.py --quick --out /tmp/seeds-quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sweep.py, when run as a script

import pyro  # noqa: E402
import sweep  # noqa: E402

from pyro_ladder import LadderVAE, preset  # noqa: E402
from pyro_ladder.data import load_dataset  # noqa: E402

PAPER = preset("paper-mnist", 784)
INFERENCES = ("bottom-up", "top-down")
SCALARS = ("test_log_likelihood", "test_elbo", "epochs", "train_seconds")
LAYERED = ("kl", "active_units")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="1,2,3,4,5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="also stop a run's training after this (within 10 steps, mid-epoch)",
    )
    p.add_argument("--warmup-epochs", type=int, default=None, help="default: epochs // 10")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-samples", type=int, default=1000, help="K of test log p(x)")
    p.add_argument("--eval-limit", type=int, default=None, help="test images (default: all)")
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
        help="seconds: 2 epochs on 200 images, K=10 on 50 test images",
    )
    p.add_argument("--out", type=Path, default=Path("docs/results/seeds"))
    args = p.parse_args(argv)  # fmt: skip
    if args.quick:
        args.epochs, args.train_limit, args.eval_samples, args.eval_limit = 2, 200, 10, 50
    if args.warmup_epochs is None:
        args.warmup_epochs = max(1, args.epochs // 10)
    if not 1 <= args.jobs <= 14:
        p.error("--jobs must be between 1 and 14")
    return args


def specs(args, data_path: Path) -> list[dict]:
    """One spec per (seed, depth, inference): seed by seed, so that a sweep cut short by its
    deadline loses the last seeds rather than whole rows; deepest (longest) runs first."""
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for depth in sorted((int(d) for d in args.depths.split(",")), reverse=True):
            for inference in INFERENCES:
                out.append({
                    "name": f"{inference}-L{depth}-s{seed}", "inference": inference,
                    "depth": depth, "seed": seed, "device": args.device, "epochs": args.epochs,
                    "budget_seconds": args.budget_seconds, "warmup_epochs": args.warmup_epochs,
                    "batch_size": args.batch_size, "lr": args.lr,
                    "eval_samples": args.eval_samples, "data": str(data_path),
                    "out": str(args.out),
                })  # fmt: skip
    return out


def work(spec: dict) -> dict:
    """One run: build the ladder, train it, score it."""
    data = sweep.load_cached(spec)
    pyro.set_rng_seed(spec["seed"])
    depth = spec["depth"]
    vae = LadderVAE(
        data["train"].shape[1],
        PAPER.latent_dims[:depth],
        PAPER.hidden_dims[:depth],
        inference=spec["inference"],
        batch_norm=True,
    ).to(spec["device"])
    return {**sweep.train(vae, data, spec), **sweep.score(vae, data, spec)}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return sweep.worker(argv, work)
    args = parse(argv)
    sweep.check_device(args.device)
    data = load_dataset("digits")
    path = sweep.cache_data(
        data, "bernoulli", args.eval_limit, args.train_limit, args.out / "data.pt"
    )
    rows, failures = sweep.run_processes(
        Path(__file__).resolve(), specs(args, path), args.out, args.jobs, args.deadline_seconds
    )
    rows.sort(key=lambda r: (r["depth"], INFERENCES.index(r["inference"]), r["seed"]))
    summary = sweep.summarize(rows, ("depth", "inference"), SCALARS, LAYERED)
    gains = ladder_gains(rows)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
               "ladder_gains": gains, "failures": failures,
               "environment": sweep.environment(args.device), "runs": rows}  # fmt: skip
    sweep.write_results(args.out, payload, table(summary, failures, args, gains))
    for failure in failures:
        print(f"run {failure['name']}: {failure['reason']}", file=sys.stderr)
    return payload


def ladder_gains(rows: list[dict]) -> list[dict]:
    """Per depth, the ladder's gain over the VAE seed by seed (top-down minus bottom-up,
    paired by seed), as :func:`sweep.mean_sd` of ``test_log_likelihood`` and ``test_elbo``:
    the spread of the differences, not of each model, says whether a gap is noise."""
    by_key = {(r["depth"], r["inference"], r["seed"]): r for r in rows}
    out = []
    for depth in sorted({r["depth"] for r in rows}):
        pairs = [
            (by_key[(depth, "top-down", seed)], by_key[(depth, "bottom-up", seed)])
            for seed in sorted({r["seed"] for r in rows})
            if (depth, "top-down", seed) in by_key and (depth, "bottom-up", seed) in by_key
        ]
        if pairs:
            out.append({"depth": depth, "seeds": len(pairs)})
            for name in ("test_log_likelihood", "test_elbo"):
                out[-1][name] = sweep.mean_sd([td[name] - bu[name] for td, bu in pairs])
    return out


def table(summary: list[dict], failures: list[dict], args, gains=()) -> str:
    """Markdown: one row per (depth, inference), mean ± sd over seeds."""
    lines = [
        f"Digits, mean ± sd over seeds {args.seeds} (n per row), K = {args.eval_samples}, "
        f"{args.epochs} epochs"
        + (f" or {args.budget_seconds:g} s of training" if args.budget_seconds else "")
        + f", device {args.device}.",
        "",
        "| layers | inference | n | test log p(x) | test ELBO | active units (z1, z2, ...) "
        "| KL per layer (nats) | epochs | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['depth']} | {r['inference']} | {r['test_log_likelihood']['n']} "
            f"| {sweep.fmt(r['test_log_likelihood'])} | {sweep.fmt(r['test_elbo'])} "
            f"| {sweep.fmt_layers(r['active_units'], 1)} | {sweep.fmt_layers(r['kl'])} "
            f"| {sweep.fmt(r['epochs'], 1)} | {sweep.fmt(r['train_seconds'], 0)} |"
        )
    lines += [
        "",
        "Ladder minus VAE, paired by seed (mean ± sd of the differences):",
        "",
        "| layers | seeds | log p(x) gain | ELBO gain |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {g['depth']} | {g['seeds']} | {sweep.fmt(g['test_log_likelihood'])} "
        f"| {sweep.fmt(g['test_elbo'])} |"
        for g in gains
    ]
    if failures:
        lines += ["", "Failed: " + "; ".join(f"{f['name']} ({f['reason']})" for f in failures)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
