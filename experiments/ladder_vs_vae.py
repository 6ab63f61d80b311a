"""Does top-down inference use more layers? Bottom-up VAE vs Ladder VAE, 1 to 5 layers.

Every model gets the same budget: the paper's layer sizes (the first L of 64-32-16-8-4
latent / 512-256-128-64-32 hidden), batch norm, KL warm-up over the first tenth of the
epochs, Adam, on statically binarized MNIST. Reports test log p(x) (importance sampling,
K stated), test ELBO, active units and KL per layer; writes results.json and figures.

    # our budget, 30 epochs (about 2 hours on 2 cores with one thread):
    python experiments/ladder_vs_vae.py --data-dir ../shared/data --threads 1 \
        --out docs/results/ladder_vs_vae
    # labelled data for the PCA picture coloured by class (sklearn's digits, embedded):
    python experiments/ladder_vs_vae.py --dataset digits --epochs 200 --batch-size 128 \
        --eval-limit 360 --threads 1 --out docs/results/ladder_vs_vae_digits
    # the paper's budget (2000 epochs, all 10,000 test images, K = 5000):
    python experiments/ladder_vs_vae.py --data-dir ../shared/data --full
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pyro
import torch

from pyro_ladder import LadderVAE, evaluate, fit, preset
from pyro_ladder.data import load_dataset
from pyro_ladder.diagnostics import active_units
from pyro_ladder.plots import pca_figure, save_figure
from pyro_ladder.runs import test_set

PAPER = preset("paper-mnist", 784)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="binarized-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--depths", default="1,2,3,4,5")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--eval-limit", type=int, default=1000)
    p.add_argument(
        "--train-limit", type=int, default=None, help="train on the first N images (default: all)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a minute-long check: 1 epoch on 2000 images, K=10 on 100 test images",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the paper's budget: 2000 epochs, K=5000 on the whole test set",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--out", type=Path, default=Path("docs/results/ladder_vs_vae"))
    args = p.parse_args(argv)
    if args.full:
        args.epochs, args.eval_samples, args.eval_limit = 2000, 5000, None
    if args.quick:
        args.epochs, args.train_limit, args.eval_samples, args.eval_limit = 1, 2000, 10, 100
    return args


def run(data, args, inference: str, depth: int) -> tuple[dict, LadderVAE]:
    pyro.set_rng_seed(args.seed)
    vae = LadderVAE(
        data.x_dim,
        PAPER.latent_dims[:depth],
        PAPER.hidden_dims[:depth],
        inference=inference,
        batch_norm=True,
    )
    start = time.perf_counter()
    train = data.train if args.train_limit is None else data.train[: args.train_limit]
    history = fit(
        vae.model,
        vae.guide,
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=max(1, args.epochs // 10),
        binarize=data.kind == "grey",
        seed=args.seed,
        progress=False,
    )
    train_seconds = time.perf_counter() - start
    test = test_set(data, "bernoulli", args.eval_limit)
    result = evaluate(vae.model, vae.guide, test, num_samples=args.eval_samples)
    units = active_units(vae.model, vae.guide, test)
    row = {
        "inference": inference,
        "depth": depth,
        "train_seconds": train_seconds,
        "final_train_loss": history[-1]["loss"],
        "test_log_likelihood": result["log_likelihood"].mean().item(),
        "test_elbo": result["elbo"].mean().item(),
        "kl_per_layer": {k: v.mean().item() for k, v in sorted(result["kl"].items())},
        "active_units": {k: v["active"] for k, v in sorted(units.items())},
        "units": {k: v["units"] for k, v in sorted(units.items())},
    }
    return row, vae


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, deepest = [], {}
    for depth in (int(d) for d in args.depths.split(",")):
        for inference in ("bottom-up", "top-down"):
            row, vae = run(data, args, inference, depth)
            rows.append(row)
            deepest[inference] = vae
            print(
                f"{inference:9s} L={depth}: log p(x) {row['test_log_likelihood']:.2f}  "
                f"ELBO {row['test_elbo']:.2f}  active {row['active_units']}  "
                f"({row['train_seconds']:.0f} s)",
                flush=True,
            )
            _write(args, rows)
    _figures(args, rows, data, deepest)
    return rows


def _write(args, rows):
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")


def _figures(args, rows, data, deepest):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for inference in ("bottom-up", "top-down"):
        mine = [r for r in rows if r["inference"] == inference]
        depths = [r["depth"] for r in mine]
        axes[0].plot(depths, [r["test_log_likelihood"] for r in mine], marker="o", label=inference)
        axes[1].plot(
            depths, [sum(r["active_units"].values()) for r in mine], marker="o", label=inference
        )
    axes[0].set(xlabel="stochastic layers", ylabel=f"test log p(x), K={args.eval_samples}")
    axes[1].set(xlabel="stochastic layers", ylabel="active units (all layers)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, args.out / "depth.png")
    test = test_set(data, "bernoulli", args.eval_limit)
    labels = None if data.test_labels is None else data.test_labels[: len(test)]
    rows = {}
    for inference, vae in deepest.items():
        vae.eval()
        with torch.no_grad():
            trace = pyro.poutine.trace(vae.guide).get_trace(test)
        name = {"bottom-up": "VAE (bottom-up)", "top-down": "LVAE (top-down)"}[inference]
        rows[name] = {f"z{i}": trace.nodes[f"z{i}"]["value"] for i in range(1, vae.depth + 1)}
    depth = max(vae.depth for vae in deepest.values())
    coloured = "coloured by class" if labels is not None else "no class labels in this data set"
    title = f"posterior samples of each layer, PCA, {depth} layers ({coloured})"
    save_figure(pca_figure(rows, labels, title), args.out / "pca.png")


if __name__ == "__main__":
    main()
