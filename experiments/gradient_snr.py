"""Gradient signal-to-noise ratio against the number of importance samples K.

Trains a ladder briefly with the ELBO, then, at those fixed parameters, measures the guide's
and the model's gradient SNR (pyro_ladder.diagnostics.gradient_snr) for iwae, iwae-dreg,
iwae-dreg with DReG on the shared prior networks too, miwae (M = 4 outer bounds of K),
ciwae (beta = 0.5), miwae-dreg (M = 4), rws, rws-dreg and rws-dreg with wake-theta alone
for the shared prior networks at K in {1, 4, 16, 64}, and the
effective sample size of K draws. Writes snr.json and snr.png into --out.

    python experiments/gradient_snr.py --data-dir ../shared/data --out docs/results/snr
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pyro

from pyro_ladder import LadderVAE, fit, make_elbo, preset
from pyro_ladder.data import load_dataset
from pyro_ladder.diagnostics import effective_sample_size, gradient_snr
from pyro_ladder.runs import test_set

ESTIMATORS = {  # label: (make_elbo name, options)
    "iwae": ("iwae", {}),
    "iwae-dreg": ("iwae-dreg", {}),
    "iwae-dreg shared=dreg": ("iwae-dreg", {"shared": "dreg"}),
    "miwae M=4": ("miwae", {"outer": 4}),
    "ciwae beta=0.5": ("ciwae", {"beta": 0.5}),
    "miwae-dreg M=4": ("miwae-dreg", {"outer": 4}),
    "rws": ("rws", {}),
    "rws-dreg": ("rws-dreg", {}),
    "rws-dreg shared=theta": ("rws-dreg", {"shared": "theta"}),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="binarized-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--preset", default="paper-mnist")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="images in the SNR batch")
    p.add_argument("--draws", type=int, default=24, help="gradient draws per SNR estimate")
    p.add_argument("--ks", default="1,4,16,64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results/snr"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    pyro.set_rng_seed(args.seed)
    data = load_dataset(args.dataset, args.data_dir)
    grey = data.kind == "grey"
    vae = LadderVAE.from_config(preset(args.preset, data.x_dim))
    start = time.perf_counter()
    fit(
        vae.model,
        vae.guide,
        data.train[: args.train_images],
        epochs=args.epochs,
        warmup_epochs=0,
        binarize=grey,
        seed=args.seed,
        progress=False,
    )
    train_seconds = time.perf_counter() - start
    x = test_set(data, "bernoulli", args.batch)  # a fixed random subset of the test rows
    vae.eval()  # fixed batch-norm statistics: the gradient noise is the estimator's alone
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for k in ks:
        ess = effective_sample_size(vae.model, vae.guide, x, num_samples=k).mean().item()
        for label, (name, options) in ESTIMATORS.items():
            snr = gradient_snr(
                vae.model, vae.guide, make_elbo(name, k, **options), x, num_draws=args.draws
            )
            rows.append({"estimator": label, "K": k, "ess": ess, **{g: snr[g] for g in GROUPS}})
            print(
                f"K={k:3d} {label:22s} "
                + "  ".join(f"{g} SNR {snr[g]['aggregate']:.3g}" for g in GROUPS)
                + f"  ESS {ess:.2f}"
            )
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": train_seconds,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snr.json").write_text(json.dumps(result, indent=2) + "\n")
    _figure(rows, ks).savefig(args.out / "snr.png", dpi=100)
    plt.close("all")
    return result


GROUPS = ("guide", "model", "shared")


def _figure(rows, ks):
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    titles = {
        "guide": "guide's own parameters",
        "model": "model parameters (all)",
        "shared": "shared prior networks",
    }
    for group, ax in zip(GROUPS, axes[:3], strict=True):
        for name in ESTIMATORS:
            values = [r[group]["aggregate"] for r in rows if r["estimator"] == name]
            ax.plot(ks, values, marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="K (importance samples)",
            ylabel="SNR (mean^2 / variance)",
            title=titles[group],
        )
        ax.legend(fontsize=7)
    ess = [next(r["ess"] for r in rows if r["K"] == k) for k in ks]
    axes[3].plot(ks, [e / k for e, k in zip(ess, ks, strict=True)], marker="o")
    axes[3].set(xscale="log", xlabel="K", ylabel="ESS / K", title="effective sample size")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
