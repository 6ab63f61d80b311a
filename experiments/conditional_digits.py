"""Class-conditional ladders on the labelled digits: p(x | c) against p(x).

Trains, with the settings of ``pyro-ladder train`` on digits (3 layers 16-8-4, MLPs
128-64-32, Bernoulli likelihood with dynamic binarization, warm-up over a tenth of the
epochs), an unconditional ladder and a class-conditional one (top-down and bottom-up).
Reports per model:

* the test log-likelihood, ``log p(x)`` or ``log p(x | c)`` (importance sampling), and the
  per-layer KL: how much of the class information moves from the latents into ``c``;
* the read-out of samples: 20 draws per class, read by a logistic regression trained on the
  real digits; the fraction read as the class asked for (unconditional draws are matched
  against a class "asked for" to show the chance level);
* the model as a classifier: ``argmax_c log p(x | c) + log p(c)`` on the test images.

Writes results.json and samples.png (one row per class) into --out.

    python experiments/conditional_digits.py --out docs/results/conditional   # 3 x ~45 s training
    python experiments/conditional_digits.py --quick --out /tmp/conditional   # seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch
from sklearn.linear_model import LogisticRegression

from pyro_ladder import LadderVAE, evaluate, fit
from pyro_ladder.condition import pack
from pyro_ladder.data import load_dataset
from pyro_ladder.plots import image_grid, save_figure
from pyro_ladder.runs import test_set

MODELS = {  # name: (inference, conditional)
    "top-down": ("top-down", False),
    "top-down | c": ("top-down", True),
    "bottom-up | c": ("bottom-up", True),
}
QUICK = {"epochs": 2, "eval_samples": 10, "classify_samples": 5, "limit": 40}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=1000, help="K for log p(x | c)")
    p.add_argument("--classify-samples", type=int, default=100, help="K per class to classify")
    p.add_argument("--limit", type=int, default=None, help="N test images (default all)")
    p.add_argument("--per-class", type=int, default=20, help="draws per class to read out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny budget: checks that it runs")
    p.add_argument("--out", type=Path, default=Path("docs/results/conditional"))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("digits")
    classes = int(data.train_labels.max()) + 1
    test = test_set(data, "bernoulli", args.limit or None)  # the rows the CLI scores
    labels = data.test_labels[: len(test)]
    reader = LogisticRegression(max_iter=2000).fit(data.train.numpy(), data.train_labels)
    log_prior = torch.bincount(data.train_labels, minlength=classes).double().log()
    log_prior -= log_prior.logsumexp(0)
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    results["reader_test_accuracy"] = reader.score(data.test.numpy(), data.test_labels)
    rows = {}
    for name, (inference, conditional) in MODELS.items():
        pyro.set_rng_seed(args.seed)
        vae = LadderVAE(
            data.x_dim, (16, 8, 4), (128, 64, 32), inference=inference,
            condition_dim=classes if conditional else 0,
        )  # fmt: skip
        train = pack(data.train, data.train_labels, classes) if conditional else data.train
        start = time.perf_counter()
        fit(
            vae.model, vae.guide, train, epochs=args.epochs, warmup_epochs=args.epochs // 10,
            binarize=True, seed=args.seed, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        scored = pack(test, labels, classes) if conditional else test
        result = evaluate(vae.model, vae.guide, scored, num_samples=args.eval_samples)
        asked = torch.arange(classes).repeat_interleave(args.per_class)
        drawn = vae.sample(len(asked), asked) if conditional else vae.sample(len(asked))
        read = torch.as_tensor(reader.predict(drawn.numpy()))
        record = {
            "log_likelihood": result["log_likelihood"].double().mean().item(),
            "elbo": result["elbo"].double().mean().item(),
            "kl": {k: v.double().mean().item() for k, v in sorted(result["kl"].items())},
            "samples_read_as_asked": (read == asked).double().mean().item(),
            "train_seconds": seconds,
        }
        if conditional:
            record["classifier_accuracy"] = _classify(vae, test, labels, log_prior, args)
            rows[name] = drawn
        results["models"][name] = record
        print(name, json.dumps(record))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    grid = rows["top-down | c"]
    save_figure(
        image_grid(
            grid.reshape(classes, args.per_class, -1)[:, :10].reshape(-1, grid.shape[-1]),
            data.image_shape,
            min(10, args.per_class),
            "conditional ladder: samples of p(x | c), one row per class",
            row_labels=[str(k) for k in range(classes)],
            ink=True,  # binarized digits: their pixel means drawn as the data look
        ),
        args.out / "samples.png",
    )
    return results


def _classify(vae, test, labels, log_prior, args) -> float:
    """Accuracy of ``argmax_c log p(x | c) + log p(c)`` on the test images."""
    classes = len(log_prior)
    scores = torch.stack(
        [
            evaluate(
                vae.model, vae.guide, pack(test, torch.full_like(labels, c), classes),
                num_samples=args.classify_samples,
            )["log_likelihood"].double()
            for c in range(classes)
        ],
        -1,
    )  # fmt: skip  (N, C)
    return ((scores + log_prior).argmax(-1) == labels).double().mean().item()


if __name__ == "__main__":
    main()
