"""Discrete latent layers on the toy hierarchy of seed 004 (c -> z2 -> z1 -> x in 2-D).

Trains a pair with Gaussian layers and a pair with a categorical z1, the latter with every
way the library has to train a discrete layer: ``tracegraph`` without a baseline, with
Pyro's decaying-average baseline and with a baseline network, ``enum`` (z1 summed out
exactly in the guide), plain ``elbo`` (score function on the whole log-weight), ``vimco``
(the IWAE bound of K = 4 draws with leave-one-out baselines) and ``rws`` (reweighted
wake-sleep, K = 4; its guide follows KL(p || q), not the bound). Reports
the test ELBO and importance-sampled log p(x | c) against the exact value of the true
process, the true log-density of the models' own draws (how far samples fall from the
data: errors compound down the hierarchy), and the variance and SNR of the gradient of
every estimator at one common parameter point. Writes results.json and figures into --out.

    python experiments/discrete_layers.py --out docs/results/discrete     # about 8 min
    python experiments/discrete_layers.py --quick --out /tmp/discrete     # seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pyro
import torch

from pyro_ladder import evaluate, fit, make_elbo
from pyro_ladder.toy import DiscreteToyPair, GaussianToyPair, ToyHierarchy, figures

RUNS = {  # label: (pair, estimator, baseline at z1)
    "gaussian, elbo": ("gaussian", "elbo", None),
    "discrete, elbo": ("discrete", "elbo", None),
    "discrete, tracegraph": ("discrete", "tracegraph", None),
    "discrete, tracegraph + average": ("discrete", "tracegraph", "average"),
    "discrete, tracegraph + net": ("discrete", "tracegraph", "net"),
    "discrete, enum": ("discrete", "enum", None),
    "discrete, vimco K=4": ("discrete", "vimco", None),
    "discrete, rws K=4": ("discrete", "rws", None),
}
PARTICLES = {"vimco": 4, "rws": 4}  # multi-sample estimators: K draws per data point
GROUPS = {  # parameter group: networks of the pair
    "guide q(z1)": ("q1",),
    "guide q(z2)": ("q2",),
    "model": ("top", "prior1", "likelihood"),
}
QUICK = {"epochs": 2, "train": 600, "test": 200, "eval_samples": 20, "draws": 4}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--train", type=int, default=5000, help="training draws of the process")
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--categories", type=int, default=24, help="values of the discrete z1")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--draws", type=int, default=64, help="gradient draws per estimator")
    p.add_argument("--grad-batch", type=int, default=256, help="rows in the gradient batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny budget: checks that it runs")
    p.add_argument("--out", type=Path, default=Path("docs/results/discrete"))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def make_pair(kind, baseline, args, data):
    if kind == "gaussian":
        return GaussianToyPair(num_classes=data.truth.num_classes)
    pair = DiscreteToyPair(data.truth.num_classes, categories=args.categories, baseline=baseline)
    pair.init_emission(data.train.x, generator=torch.Generator().manual_seed(args.seed))
    return pair


def _clear_average_baselines():
    """Pyro keeps the decaying average in the parameter store, shaped like one batch."""
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith("__baseline_avg")]:
        del store[name]


def train(label, args, data) -> tuple[dict, torch.nn.Module]:
    kind, estimator, baseline = RUNS[label]
    pyro.set_rng_seed(args.seed)
    _clear_average_baselines()
    pair = make_pair(kind, baseline, args, data)
    elbo = make_elbo(estimator, PARTICLES.get(estimator, 1), max_plate_nesting=1)
    start = time.perf_counter()
    history = fit(pair.model, pair.guide, data.train_inputs, elbo=elbo, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  monitor=data.test_inputs[:500], progress=False)
    seconds = time.perf_counter() - start
    row = {"label": label, "pair": kind, "estimator": estimator, "baseline": baseline,
           "train_seconds": seconds, **score(pair, args, data)}
    row["history"] = [{k: r[k] for k in ("epoch", "loss", "monitor_elbo", "seconds")}
                      for r in history]
    return row, pair


def score(pair, args, data) -> dict:
    """Test ELBO and log p(x | c) (nats per point), and where the model's own draws fall
    under the true process: their mean true log-density and the fraction of them on the
    data's support (true log-density above the 1% quantile of the test data's)."""
    result = evaluate(pair.model, pair.guide, data.test_inputs, num_samples=args.eval_samples)
    truth, c = data.truth, data.test.c
    draws = truth.log_prob(pair.generate(c)["x"], c)  # (N,)
    floor = truth.log_prob(data.test.x, c).quantile(0.01)
    return {
        "test_elbo": result["elbo"].mean().item(),
        "test_log_likelihood": result["log_likelihood"].mean().item(),
        "kl": {k: v.mean().item() for k, v in sorted(result["kl"].items())},
        "draws_true_log_density": draws.mean().item(),
        "draws_on_support": (draws > floor).float().mean().item(),
    }


def gradient_statistics(pair, estimator, args, batch) -> dict:
    """Variance (summed over the group's elements) and SNR ``mean(E[g]^2) / mean(Var g)`` of
    ``args.draws`` gradients of the loss on ``batch``, per parameter group.

    The rows are shuffled for every draw, as in training: Pyro's decaying average baseline
    is kept per batch position, and on a fixed order it would become a per-row baseline it
    never is in training. Before the draws each baseline is fitted at these parameters."""
    elbo = make_elbo(estimator, PARTICLES.get(estimator, 1), max_plate_nesting=1)
    _fit_baseline(pair, elbo, batch)
    draws = torch.stack([_grads(elbo, pair, _shuffled(batch)) for _ in range(args.draws)])
    out, start = {}, 0
    for group, nets in GROUPS.items():
        size = sum(p.numel() for n in nets for p in getattr(pair, n).parameters())
        g = draws[:, start : start + size] / len(batch)  # per data point
        start += size
        mean, var = g.mean(0), g.var(0)
        out[group] = {"variance": var.sum().item(), "snr": (mean.square().mean() / var.mean())
                      .item(), "num_params": size}
    return out


def _shuffled(batch):
    return batch[torch.randperm(len(batch))]


def _fit_baseline(pair, elbo, batch, steps=300):
    """Let the average settle (30 draws) or train the baseline network alone (Adam)."""
    _clear_average_baselines()
    if getattr(pair, "baseline", None) is None:
        return
    if pair.baseline == "average":
        for _ in range(30):
            _grads(elbo, pair, _shuffled(batch))
        return
    optim = torch.optim.Adam(pair.baseline_net.parameters(), lr=3e-3)
    for _ in range(steps):
        optim.zero_grad()
        _grads(elbo, pair, _shuffled(batch))  # fills the baseline net's grads too
        optim.step()


def _grads(elbo, pair, batch) -> torch.Tensor:
    """One gradient of the loss, flattened in the order of ``GROUPS``: ``(P,)``."""
    params = [p for nets in GROUPS.values() for n in nets for p in getattr(pair, n).parameters()]
    for p in pair.parameters():
        p.grad = None
    elbo.loss_and_grads(pair.model, pair.guide, batch)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])


def common_point_gradients(rows, pairs, args, data) -> None:
    """Every discrete estimator's gradient at the enum-trained parameters (the baseline
    network, which only its own run trains, is taken from that run)."""
    reference = pairs["discrete, enum"].state_dict()
    batch = data.test_inputs[: args.grad_batch]
    for row in rows:
        if row["pair"] != "discrete":
            continue
        pair = make_pair("discrete", row["baseline"], args, data)
        pair.load_state_dict(reference, strict=False)
        if row["baseline"] == "net":
            pair.baseline_net.load_state_dict(pairs[row["label"]].baseline_net.state_dict())
        pyro.set_rng_seed(args.seed + 1)
        row["gradient"] = gradient_statistics(pair, row["estimator"], args, batch)


def save_figures(rows, pairs, args, data) -> None:
    c = data.test.c
    draws = {"gaussian layers": pairs["gaussian, elbo"].generate(c),
             "categorical z1 (enum)": pairs["discrete, enum"].generate(c)}
    made = {
        "data": figures.data_figure(data.test),
        "joint": figures.joint_figure(draws, c, data.test),
        "conditional_marginals": figures.conditional_marginals_figure(draws, c, data.test),
        "marginals": figures.marginals_figure(draws, data.test, data.truth),
        "curves": _curves(rows, data),
        "gradients": _gradient_bars(rows),
    }
    for name, fig in made.items():
        fig.savefig(args.out / f"{name}.png", dpi=90)
        plt.close(fig)


def _curves(rows, data):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    exact = data.truth.log_prob(data.test.x[:500], data.test.c[:500]).mean().item()
    for row in rows:
        h = row["history"]
        for ax, key in zip(axes, ("epoch", "seconds"), strict=True):
            ax.plot([r[key] for r in h], [r["monitor_elbo"] for r in h], label=row["label"])
    for ax, key in zip(axes, ("epoch", "seconds of training"), strict=True):
        ax.axhline(exact, color="black", lw=0.8, ls="--", label="exact log p(x | c)")
        ax.set(xlabel=key, ylabel="held-out ELBO (nats per point)", ylim=(exact - 3, exact + 0.3))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _gradient_bars(rows):
    rows = [r for r in rows if "gradient" in r]
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4.2 * len(GROUPS), 3.8), sharex=True)
    values = {g: [r["gradient"][g]["variance"] for r in rows] for g in GROUPS}
    low = min(min(v) for v in values.values()) / 10  # bars start a decade below the least
    for ax, group in zip(axes, GROUPS, strict=True):
        ax.barh([r["label"].removeprefix("discrete, ") for r in rows], values[group], left=low)
        ax.set(xscale="log", xlabel="gradient variance (sum over elements)", title=group)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    args = parse(argv)
    data = ToyHierarchy().dataset(args.train, args.test, seed=args.seed)
    rows, pairs = [], {}
    for label in RUNS:
        row, pairs[label] = train(label, args, data)
        rows.append(row)
        print(f"{label:32s} ELBO {row['test_elbo']:7.3f}  log p(x|c) "
              f"{row['test_log_likelihood']:7.3f}  draws' true log-density "
              f"{row['draws_true_log_density']:8.2f}, on support {row['draws_on_support']:.2f}"
              f"  ({row['train_seconds']:.0f} s)", flush=True)
    common_point_gradients(rows, pairs, args, data)
    truth = data.truth
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "exact_test_log_likelihood": truth.log_prob(data.test.x, data.test.c).mean().item(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    save_figures(rows, pairs, args, data)
    return result


if __name__ == "__main__":
    main()
