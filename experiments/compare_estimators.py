"""Train the same ladder with several estimators under one budget; compare test scores.

Used to answer whether the conditional-KL semi-gradient (``elbo-condkl-sg``) is
justified: it has the value of the analytic-KL ELBO (``meanfield``) and drops part of its
gradient, so the two differ only in the update they follow.

    python experiments/compare_estimators.py --out docs/results/condkl.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro

from pyro_ladder import LadderVAE, evaluate, fit, preset
from pyro_ladder.data import load_dataset
from pyro_ladder.runs import test_set


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--preset", default="digits")
    p.add_argument("--estimators", default="meanfield,elbo-condkl-sg")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("docs/results/condkl.json"))
    return p.parse_args(argv)


def run(data, args, estimator: str, seed: int) -> dict:
    pyro.set_rng_seed(seed)
    vae = LadderVAE.from_config(preset(args.preset, data.x_dim))
    grey = data.kind == "grey"
    start = time.perf_counter()
    fit(
        vae.model,
        vae.guide,
        data.train,
        elbo=estimator,
        epochs=args.epochs,
        warmup_epochs=args.epochs // 10,
        binarize=grey,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - start
    test = test_set(data, "bernoulli")
    result = evaluate(vae.model, vae.guide, test, num_samples=args.eval_samples)
    return {
        "estimator": estimator,
        "seed": seed,
        "train_seconds": seconds,
        "test_log_likelihood": result["log_likelihood"].mean().item(),
        "test_elbo": result["elbo"].mean().item(),
        "kl_per_layer": {k: v.mean().item() for k, v in sorted(result["kl"].items())},
    }


def main(argv=None) -> list[dict]:
    args = parse(argv)
    data = load_dataset(args.dataset, args.data_dir)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for estimator in args.estimators.split(","):
            row = run(data, args, estimator, seed)
            rows.append(row)
            print(
                f"{estimator:16s} seed {seed}: log p(x) {row['test_log_likelihood']:.3f}  "
                f"ELBO {row['test_elbo']:.3f}  ({row['train_seconds']:.0f} s)"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
