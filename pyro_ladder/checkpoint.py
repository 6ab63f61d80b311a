"""Checkpoints as plain data: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds the model's ``kind`` (``"conv"`` for a
:class:`~pyro_ladder.conv.ConvLadderVAE`; files without one hold a
:class:`~pyro_ladder.vae.LadderVAE`), its config (a dict), the networks' ``state_dict`` (tensors), a
``meta`` dict of plain values and, while a run trains, the training state of
:func:`~pyro_ladder.fit` (position, history, optimizer state, RNG states) so that
:func:`load_training_checkpoint` can resume it exactly. Nothing in it is a pickled object,
so loading one cannot run code; a file that holds anything else is refused with
:class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from pyro.params import param_with_module_name

from ._util import atomic_write
from .config import LadderConfig
from .conv import ConvLadderConfig, ConvLadderVAE
from .errors import CheckpointError, ConfigError
from .vae import LadderVAE

KINDS = {"mlp": (LadderConfig, LadderVAE), "conv": (ConvLadderConfig, ConvLadderVAE)}
"""Model kinds a checkpoint can hold: its config class and model class."""

FORMAT = "pyro_ladder.checkpoint"
VERSION = 2
READABLE = (1, 2)  # version 1 files carry no digest


def save_checkpoint(
    path: str | os.PathLike,
    vae: LadderVAE,
    meta: dict | None = None,
    training: dict | None = None,
) -> Path:
    """Write ``vae`` (config and weights), ``meta`` and ``training`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, then the
    file is renamed over ``path``: a crash leaves the old checkpoint or the new one, never
    half of one.

    :param training: the state :func:`~pyro_ladder.fit` hands its ``checkpoint`` callback.
        Its optimizer entries are stored under names relative to ``vae``, so the run can
        resume in another process, where the model's Pyro name differs. A state of
        :func:`~pyro_ladder.distributed.fit_distributed` (it names its ``processes``) holds
        a ``torch.optim`` state dict, stored as it is.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": _kind_of(vae),
        "config": vae.config.to_dict(),
        "state_dict": vae.state_dict(),
        "meta": dict(meta or {}),
    }
    if training is not None and "processes" in training:
        payload["training"] = training
    elif training is not None:
        prefix = f"{vae.pyro_name}."
        optimizer = {_strip(name, prefix): state for name, state in training["optimizer"].items()}
        payload["training"] = {**training, "optimizer": optimizer}
    payload["digest"] = digest(payload)
    return atomic_write(path, lambda f: torch.save(payload, f))


def _kind_of(vae) -> str:
    for kind, (_, cls) in KINDS.items():
        if isinstance(vae, cls):
            return kind
    known = ", ".join(cls.__name__ for _, cls in KINDS.values())
    raise CheckpointError(
        f"save_checkpoint saves this library's models ({known}), not a "
        f"{type(vae).__name__}: save its state_dict yourself"
    )


def digest(payload: dict) -> str:
    """SHA-256 of a payload's content but its ``digest`` entry: every key, plain value, and
    tensor's dtype, shape and bytes, in a fixed order. A flipped bit anywhere changes it."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())


def _strip(name: str, prefix: str) -> str:
    if not name.startswith(prefix):
        raise CheckpointError(
            f"the optimizer holds state for {name!r}, which is not a parameter of this model; "
            "train the model's own parameters only, or save the state yourself"
        )
    return name[len(prefix) :]


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[LadderVAE, dict]:
    """Rebuild the model saved at ``path``; returns ``(vae, meta)``.

    :raises CheckpointError: if the file is missing, truncated, corrupted, holds pickled
        objects, or its config or weights do not describe a model of this library.
    """
    payload = _read(Path(path), map_location)
    return _rebuild(path, payload)


def _rebuild(path, payload: dict) -> tuple[LadderVAE, dict]:
    kind = payload.get("kind", "mlp")  # files written before the conv ladder hold an MLP
    if kind not in KINDS:
        raise CheckpointError(
            f"{path} holds a model of kind {kind!r}; this release reads {', '.join(KINDS)}"
        )
    config_class, model_class = KINDS[kind]
    try:
        config = config_class.from_dict(payload["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: the stored config is invalid ({err})") from None
    vae = model_class.from_config(config)
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


def load_training_checkpoint(
    path: str | os.PathLike, map_location="cpu"
) -> tuple[LadderVAE, dict, dict]:
    """Rebuild the model at ``path`` and the training state to resume it with.

    :returns: ``(vae, meta, training)``; pass ``training`` to ``fit(..., resume=training)``
        with ``vae.model``/``vae.guide`` and the options of the saved run.
    :raises CheckpointError: as :func:`load_checkpoint`, and also if the file holds no
        training state or one that does not fit the model.
    """
    payload = _read(Path(path), map_location)
    vae, meta = _rebuild(path, payload)
    training = payload.get("training")
    if not isinstance(training, dict):
        raise CheckpointError(
            f"{path} holds a finished model without its training state, so it cannot be "
            "resumed; start a new run (it can still be evaluated)"
        )
    if "processes" in training:  # fit_distributed's: checked as data only
        try:
            _check_training(training, processes=training["processes"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{path}: the training state is damaged ({err})") from None
        return vae, meta, training
    try:
        _check_training(training)
        names = _parameter_names(vae)
        optimizer = {f"{vae.pyro_name}.{name}": s for name, s in training["optimizer"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: the training state is damaged ({err})") from None
    unknown = sorted(set(optimizer) - names)
    if unknown:
        raise CheckpointError(
            f"{path}: the optimizer state names parameters the model lacks ({unknown[0]}...); "
            "the file is damaged or from another model"
        )
    return vae, meta, {**training, "optimizer": optimizer}


def _check_training(training: dict, processes: int | None = None) -> None:
    """Raise if ``training`` lacks an entry :func:`fit` (or, with ``processes``,
    :func:`~pyro_ladder.distributed.fit_distributed` on that many) needs or holds one of a
    wrong type."""
    kinds = {"options": dict, "position": dict, "history": list, "optimizer": dict, "rng": dict}
    for key, kind in kinds.items():
        if not isinstance(training.get(key), kind):
            raise ValueError(f"{key!r} is missing or not a {kind.__name__}")
    position = training["position"]
    for key in ("epoch", "step", "seen"):
        if not isinstance(position[key], int) or position[key] < 0:
            raise ValueError(f"position {key!r} is {position[key]!r}")
    rng = training["rng"]["torch"]
    if not isinstance(rng, torch.Tensor):
        raise ValueError("the torch RNG state is not a tensor")
    if processes is None:
        return
    if not isinstance(processes, int) or processes < 1 or rng.shape[:1] != (processes,):
        raise ValueError(f"{processes!r} processes but RNG states of shape {tuple(rng.shape)}")
    if not {"state", "param_groups"} <= set(training["optimizer"]):
        raise ValueError("the optimizer entry is not a torch.optim state dict")


def _parameter_names(vae: LadderVAE) -> set:
    """The Pyro parameter-store names ``vae.model``/``vae.guide`` give their parameters."""
    return {
        param_with_module_name(f"{vae.pyro_name}.{part}", name)
        for part in ("generative", "inference")
        for name, _ in getattr(vae, part).named_parameters()
    }


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
    if payload.get("version") not in READABLE:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')!r}; this release reads "
            f"versions {', '.join(map(str, READABLE))}"
        )
    if payload["version"] >= 2 and payload.get("digest") != digest(payload):
        raise CheckpointError(
            f"{path} is corrupted or was altered: its content does not match the digest "
            "written with it; use another copy of the run"
        )
    for key in ("config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks its {key!r} entry; the file is incomplete")
    return payload
