"""Checkpoints as plain data: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds the config (a dict), the networks' ``state_dict`` (tensors) and a
``meta`` dict of plain values. Nothing in it is a pickled object, so loading one cannot
run code; a file that holds anything else is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._util import atomic_write
from .config import LadderConfig
from .errors import CheckpointError, ConfigError
from .vae import LadderVAE

FORMAT = "pyro_ladder.checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, vae: LadderVAE, meta: dict | None = None) -> Path:
    """Write ``vae`` (config and weights) and ``meta`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, then the
    file is renamed over ``path``: a crash leaves the old checkpoint or the new one, never
    half of one.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": vae.config.to_dict(),
        "state_dict": vae.state_dict(),
        "meta": dict(meta or {}),
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[LadderVAE, dict]:
    """Rebuild the model saved at ``path``; returns ``(vae, meta)``.

    :raises CheckpointError: if the file is missing, truncated, corrupted, holds pickled
        objects, or its config or weights do not describe a model of this library.
    """
    payload = _read(Path(path), map_location)
    try:
        config = LadderConfig.from_dict(payload["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: the stored config is invalid ({err})") from None
    vae = LadderVAE.from_config(config)
    try:
        vae.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: the weights do not fit the stored config ({first})"
        ) from None
    meta = payload.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: 'meta' is not a mapping; the file is not one of ours")
    return vae, meta


def _read(path: Path, map_location) -> dict:
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: pass the checkpoint.pt written by `pyro-ladder train`"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle opcode, forbidden global...
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, corrupted or holds objects "
            f"other than tensors and plain data ({reason})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyro_ladder checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')!r}; this release reads "
            f"version {VERSION}"
        )
    for key in ("config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks its {key!r} entry; the file is incomplete")
    return payload
