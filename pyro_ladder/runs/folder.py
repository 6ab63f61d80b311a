"""The run folder's format: which files a run holds and how each is written and read.

A run folder holds ``checkpoint.pt`` (model, meta data and training state),
``history.csv`` (one row per epoch), ``metrics.json`` (the final evaluation) and the
pictures ``samples.png``, ``reconstructions.png`` and ``curves.png``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .._util import atomic_write
from ..errors import ConfigError
from ..plots import image_grid, save_figure, training_curves

RUN_FILES = ("checkpoint.pt", "metrics.json", "history.csv")
"""The files whose presence means a folder already holds a run."""

PICTURES = ("samples.png", "reconstructions.png", "curves.png")


def default_out(dataset: str, inference: str) -> Path:
    """``runs/<dataset>-<inference>-<time>``: where a run goes unless told."""
    return Path("runs") / f"{dataset}-{inference}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_out(out: Path, overwrite: bool = False) -> Path:
    """Create the folder ``out`` for a new run; refuse one that holds a run unless
    ``overwrite``, a file, or a folder that cannot be written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"argument `out` {out} is a file, not a folder: choose another path")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not overwrite:
        raise ConfigError(
            f"argument `out` {out} already holds a run ({', '.join(held)}): continue it with "
            f"argument `resume` {out}, choose another folder, or pass argument `overwrite` "
            "to replace it"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create argument `out` {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"argument `out` {out} is not writable: choose another folder")
    return out


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically: a reader sees the old file or the new one, never half."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_history(path: Path, history: list[dict]) -> None:
    """``history.csv``: a header of every key any record has, one row per epoch; a key a
    record lacks is an empty cell."""
    keys = list(dict.fromkeys(k for record in history for k in record))
    lines = [",".join(keys)]
    lines += [",".join(_csv_cell(r.get(k, "")) for k in keys) for r in history]
    write_text(path, "\n".join(lines) + "\n")


def read_history(path: Path) -> list[dict]:
    """The records :func:`write_history` wrote (numbers as floats, empty cells left out);
    ``[]`` when there is no such file."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    keys = lines[0].split(",")
    return [
        {k: float(v) for k, v in zip(keys, line.split(","), strict=True) if v != ""}
        for line in lines[1:]
        if line
    ]


def _csv_cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_pictures(out: Path, vae, test: torch.Tensor, image_shape, history: list) -> None:
    """samples.png, reconstructions.png of ``test (N, D)``, and curves.png when there is a
    history."""
    save_figure(samples_figure(vae, image_shape, 64, 8, None), out / "samples.png")
    originals = test[:32]
    pixels = vae.split(originals)[0]  # (32, x_dim): without a packed label
    pairs = torch.stack([pixels, vae.reconstruct(originals)], 1).reshape(64, -1)  # (64, x_dim)
    title = "test image (left) and its reconstruction (right)"
    save_figure(image_grid(pairs, image_shape, 8, title, ink=ink(vae)), out / "reconstructions.png")
    if history:
        save_figure(training_curves(history), out / "curves.png")


def ink(vae) -> bool:
    """Whether the pictures of ``vae`` are drawn ink on paper: a Bernoulli model's data are
    binary (binarized MNIST, digits, grey sets binarized anew), and its pixel means, which
    are not binary, are drawn to look like them; a Gaussian model's grey data as published."""
    return vae.config.likelihood == "bernoulli"


def samples_figure(vae, image_shape, num: int, per_class: int, classes):
    """``num`` draws of an unconditional model, or ``per_class`` draws of each class of a
    conditional one, a row per class (``classes``: which; default all)."""
    if vae.condition_dim == 0:
        title = "samples from the prior"
        return image_grid(vae.sample(num), image_shape, min(num, 8), title, ink=ink(vae))
    classes = list(range(vae.condition_dim)) if classes is None else list(classes)
    bad = [k for k in classes if not 0 <= k < vae.condition_dim]
    if bad:
        raise ConfigError(
            f"argument `classes` {bad} are not classes of this model: it knows "
            f"{vae.condition_dim} classes, 0 to {vae.condition_dim - 1}"
        )
    device = next(vae.parameters()).device
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)  # (C * per_class,)
    return image_grid(
        vae.sample(len(labels), labels),
        image_shape,
        per_class,
        "samples from p(x | c), one row per class c",
        row_labels=[str(k) for k in classes],
        ink=ink(vae),
    )
