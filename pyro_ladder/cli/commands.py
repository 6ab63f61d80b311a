"""The commands of ``pyro-ladder``: each turns its parsed arguments into a call of the
library and prints what the user should see."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pyro

from ..checkpoint import load_checkpoint
from ..data import load_dataset
from ..errors import ConfigError
from ..plots import save_figure
from ..runs import RunSpec, evaluate_run, folder, resume, summary, train
from ..runs.device import resolve_device
from ..runs.report import load_run, run_seed, write_report


def as_flags(message: str) -> str:
    """The library names arguments as ``argument `batch_size```; here they are flags
    (``argument `batch_norm` False`` is ``--no-batch-norm``)."""
    message = re.sub(r"argument `(\w+)` False", lambda m: "--no-" + _dashed(m[1]), message)
    return re.sub(r"argument `(\w+)`", lambda m: "--" + _dashed(m[1]), message)


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def say(line: str) -> None:
    print(as_flags(line))


def warn(line: str) -> None:
    print(f"pyro-ladder: warning: {as_flags(line)}", file=sys.stderr)


def spec_of(args) -> RunSpec:
    """The run ``train``'s arguments describe (the defaults still unresolved)."""
    names = [f.name for f in dataclasses.fields(RunSpec)]
    return RunSpec(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def cmd_train(args) -> int:
    spec = spec_of(args)
    if args.resume is not None:
        out = args.resume
        metrics = resume(out, spec, echo=say, warn=warn)
    else:
        out = args.out or folder.default_out(spec.dataset, spec.inference)
        metrics = train(spec, out, overwrite=args.overwrite, echo=say, warn=warn)
    if metrics is not None:  # None: a Lightning process other than global rank 0
        _print_result(metrics, out)
    return 0


def _print_result(metrics: dict, out: Path) -> None:
    given = " | c" if metrics.get("condition") else ""
    print(
        f"test log-likelihood (K={metrics['eval_samples']}): "
        f"{metrics['test_log_likelihood']:.2f} nats  [log p(x{given}), higher is better]"
    )
    print(
        f"test ELBO: {metrics['test_elbo']:.2f} nats   train time: {metrics['train_seconds']:.0f} s"
    )
    kl = ", ".join(f"{k} {v:.2f}" for k, v in metrics["kl_per_layer"].items())
    print(f"KL per layer (nats): {kl}")
    print(f"wrote {out}/: {' '.join(folder.RUN_FILES)} {' '.join(folder.PICTURES)}")


def cmd_evaluate(args) -> int:
    device = resolve_device(args.device)
    vae, meta, _, test = load_run(args.checkpoint, args.data_dir, args.eval_limit)
    seed = run_seed(meta) if args.seed is None else args.seed
    vae, test = vae.to(device), test.to(device)
    result = summary(evaluate_run(vae, test, args.num_samples, seed, args.progress))
    head = {"checkpoint": str(args.checkpoint), "dataset": meta["dataset"], "num_test": len(test)}
    print(json.dumps({**head, **result}, indent=2))
    return 0


def cmd_report(args) -> int:
    report = write_report(
        args.checkpoint, args.out, num_samples=args.num_samples, limit=args.eval_limit,
        data_dir=args.data_dir, seed=args.seed, progress=args.progress, device=args.device,
    )  # fmt: skip
    print(f"wrote {args.out}/report.md with {len(report['figures'])} figures")
    return 0


def cmd_sample(args) -> int:
    device = resolve_device(args.device)
    vae, meta = load_checkpoint(args.checkpoint)
    vae = vae.to(device)
    shape = meta.get("image_shape")
    if shape is None:  # 0.1.0 runs saved before the shape was recorded; shim ends in 0.2.0
        if "dataset" not in meta:
            raise ConfigError(f"{args.checkpoint} records neither its data set nor image shape")
        shape = load_dataset(meta["dataset"], args.data_dir).image_shape
    if vae.condition_dim == 0 and args.classes is not None:
        raise ConfigError("--classes needs a conditional model (trained with --condition label)")
    pyro.set_rng_seed(args.seed)
    figure = folder.samples_figure(vae, tuple(shape), args.num, args.per_class, args.classes)
    try:
        save_figure(figure, args.out)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot write --out {args.out}: {err}") from None
    rows = "one row per class" if vae.condition_dim else f"{args.num} images"
    print(f"wrote {args.out} ({rows})")
    return 0
