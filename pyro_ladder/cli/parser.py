"""The argparse spec of ``pyro-ladder``: options, their help and their value parsers.

Defaults of ``train`` are :class:`~pyro_ladder.runs.RunSpec`'s, so the command line and
Python runs cannot drift apart. No command logic lives here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .. import __version__
from ..config import INFERENCES, PRESETS
from ..conv import CONV_PRESETS
from ..data import DATASETS
from ..elbo import ESTIMATORS, describe_estimators
from ..likelihoods import LIKELIHOODS
from ..runs import RunSpec
from ..runs.device import DEVICE_NAMES
from ..runs.spec import SEEDS

_DEFAULT = RunSpec()


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line, without the long usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """The parser; ``commands`` maps each subcommand to the function it calls."""
    parser = _Parser(
        prog="pyro-ladder",
        description="Ladder VAEs in Pyro. Log-likelihoods are log p(x) in nats per example "
        "(negative numbers; higher is better).",
    )
    parser.add_argument("--version", action="version", version=f"pyro_ladder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub).set_defaults(func=commands["train"])
    _add_evaluate(sub).set_defaults(func=commands["evaluate"])
    _add_report(sub).set_defaults(func=commands["report"])
    _add_sample(sub).set_defaults(func=commands["sample"])
    return parser


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a model, evaluate it on the test set, write its outputs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a hierarchical VAE with SVI, then estimate the test log-likelihood "
        "log p(x) (nats per example, negative; higher is better) by importance sampling.\n\n"
        "estimators (--elbo):\n" + describe_estimators(),
    )
    p.add_argument(
        "--dataset",
        default=_DEFAULT.dataset,
        choices=DATASETS,
        help="data set (default: digits, embedded, no download)",
    )
    _add_data_dir(p)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS) + sorted(CONV_PRESETS),
        help="named network (default: digits for digits, paper-mnist otherwise); conv-mnist "
        "and conv-small are convolutional ladders sized from the data's image shape",
    )
    p.add_argument(
        "--latent-dims",
        type=_sizes,
        help="sizes of z1..zL, e.g. 64,32,16,8,4 (conv presets: channels of z1..zL)",
    )
    p.add_argument(
        "--hidden-dims",
        type=_sizes,
        help="MLP widths per layer, e.g. 512,256,128 (conv presets: channels per layer)",
    )
    p.add_argument("--inference", default=_DEFAULT.inference, choices=INFERENCES)
    p.add_argument(
        "--condition",
        choices=("label",),
        default=None,
        help="train a class-conditional model p(x | c) on a labelled data set: the one-hot "
        "label enters the top prior and every network (default: unconditional)",
    )
    p.add_argument(
        "--likelihood",
        choices=sorted(LIKELIHOODS),
        help="default: gaussian for continuous data, bernoulli otherwise",
    )
    p.add_argument("--elbo", default=_DEFAULT.elbo, choices=sorted(ESTIMATORS), help="estimator")
    p.add_argument(
        "--particles", type=_positive_int, default=_DEFAULT.particles, help="samples per data point"
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help="default: 200 for digits, 10 otherwise"
    )
    p.add_argument("--batch-size", type=_positive_int, default=_DEFAULT.batch_size)
    p.add_argument("--lr", type=_positive_float, default=_DEFAULT.lr, help="Adam learning rate")
    p.add_argument(
        "--warmup-epochs",
        type=_nonnegative_int,
        default=None,
        help="KL warm-up length (default: a tenth of the epochs, as in the paper)",
    )
    p.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULT.batch_norm,
        help="batch norm in every network (default: on for MLP presets, off for conv ones)",
    )
    p.add_argument(
        "--free-bits",
        type=_nonnegative_float,
        default=_DEFAULT.free_bits,
        metavar="NATS",
        help="floor each latent layer's KL at NATS in training (Kingma et al. 2016; ELBO "
        "estimators only); the monitor and the evaluation score the plain ELBO (default 0: off)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="step",
        choices=("step", "capture", "networks"),
        default=_DEFAULT.compile,
        help="compile training with torch.compile: 'step' (the default when given alone) "
        "captures the whole step, forward and backward, into one compiled graph (the first "
        "step compiles, about half a minute on a CPU); 'capture' runs that graph uncompiled "
        "(a second to capture); 'networks' compiles only the networks, Pyro's tracing "
        "eager. Same values and gradients; one process",
    )
    p.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=_DEFAULT.eval_samples,
        help=f"importance samples K for the test log-likelihood (default {_DEFAULT.eval_samples})",
    )
    p.add_argument(
        "--eval-limit",
        type=_positive_int,
        default=None,
        help="evaluate on N test images only, a fixed random subset (default: all)",
    )
    p.add_argument(
        "--seed", type=_seed, default=_DEFAULT.seed, help="seeds the weights and training (0)"
    )
    _add_device(p)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: runs/<dataset>-<inference>-<time>)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --out to be a folder that holds an earlier run",
    )
    p.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        help="also log losses and per-layer KL for TensorBoard into this folder",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help="also save the run every N steps within an epoch (it is saved after every epoch)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="OUTDIR",
        help="continue the run in OUTDIR from its checkpoint, with its own options (add "
        "--epochs to train longer); the result equals an uninterrupted run's",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_distributed(p)
    return p


def _add_distributed(p):
    g = p.add_argument_group(
        "several processes, GPUs or machines (PyTorch Lightning: pip install "
        "'pyro_ladder[distributed]'; any of these options trains through Lightning)"
    )
    g.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        help="processes per machine, one per GPU or CPU process (default 1)",
    )
    g.add_argument(
        "--num-nodes",
        type=_positive_int,
        default=1,
        help="machines; set MASTER_ADDR, MASTER_PORT and NODE_RANK on each (default 1)",
    )
    g.add_argument(
        "--strategy",
        choices=("ddp", "ddp_find_unused_parameters_true"),
        default=None,
        help="data parallelism (default: ddp with more than one process)",
    )
    g.add_argument("--accelerator", choices=("cpu", "gpu", "auto"), default=None)
    g.add_argument(
        "--sync-batchnorm",
        action="store_true",
        help="batch-norm statistics over all processes' batches (GPUs only)",
    )


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="re-evaluate a saved model on its test set")
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `train`")
    p.add_argument(
        "--num-samples",
        type=_positive_int,
        default=5000,
        help="importance samples K (default 5000)",
    )
    p.add_argument(
        "--eval-limit",
        type=_positive_int,
        default=None,
        help="evaluate on N test images only, a fixed random subset (default: all)",
    )
    _add_data_dir(p)
    _add_evaluation_seed(p)
    _add_device(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _add_report(sub):
    p = sub.add_parser("report", help="write diagnostics, figures and a Markdown summary")
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `train`")
    p.add_argument("--out", type=Path, required=True, help="folder for the report")
    p.add_argument(
        "--num-samples",
        type=_positive_int,
        default=1000,
        help="importance samples K for log p(x) (default 1000)",
    )
    p.add_argument(
        "--eval-limit",
        type=_positive_int,
        default=1000,
        help="test images used (default: the first 1000)",
    )
    _add_data_dir(p)
    _add_evaluation_seed(p)
    _add_device(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _add_sample(sub):
    p = sub.add_parser(
        "sample",
        help="draw images from a saved model (one row per class for a conditional model)",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `train`")
    p.add_argument("--out", type=Path, required=True, help="the picture to write (.png, .pdf)")
    p.add_argument(
        "--num", type=_positive_int, default=64, help="images of an unconditional model (64)"
    )
    p.add_argument(
        "--per-class",
        type=_positive_int,
        default=8,
        help="images per class (one row each) of a conditional model (default 8)",
    )
    p.add_argument(
        "--classes",
        type=_labels,
        default=None,
        help="the classes to draw, e.g. 0,3,7 (default: every class)",
    )
    _add_data_dir(p)  # only for 0.1.0 runs saved without their image shape (until 0.2.0)
    p.add_argument("--seed", type=_seed, default=0, help="seeds the draws (default 0)")
    _add_device(p)
    return p


def _add_evaluation_seed(p):
    p.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="seeds the importance samples (default: the run's own seed, with which its "
        "metrics.json was computed: at the run's K this reproduces them)",
    )


def _add_device(p):
    p.add_argument(
        "--device",
        type=str,
        default=_DEFAULT.device,
        help=f"where to compute: {DEVICE_NAMES} (default auto: a GPU when torch sees one)",
    )


def _add_data_dir(p):
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the data files (default: $PYRO_LADDER_DATA, then ~/.cache/pyro_ladder)",
    )


def _int_list(text: str, what: str, example: str) -> tuple[int, ...]:
    """``"64,32,16"`` -> ``(64, 32, 16)`` (never empty: ``int("")`` fails)."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of {what}, e.g. {example}"
        ) from None


def _sizes(text: str) -> tuple[int, ...]:
    sizes = _int_list(text, "integers", "64,32,16")
    if min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not SEEDS[0] <= value <= SEEDS[1]:
        raise argparse.ArgumentTypeError(
            f"seeds are integers in [0, 2**32 - 1] (torch, numpy and Python share them), got {text}"
        )
    return value


def _labels(text: str) -> tuple[int, ...]:
    labels = _int_list(text, "class numbers", "0,3,7")
    if min(labels) < 0:
        raise argparse.ArgumentTypeError(f"classes are numbers >= 0, got {text!r}")
    return labels


def _nonnegative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
