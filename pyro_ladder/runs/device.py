"""Where a run computes: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against the
machine before anything is written."""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def check_device_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is one of :data:`DEVICE_NAMES` (the
    spelling only; :func:`resolve_device` checks the machine)."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"argument `device` {name!r} is not a device: use {DEVICE_NAMES}")


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means on this machine: ``auto`` is the first GPU when torch
    sees one, else the CPU.

    :raises ConfigError: for a GPU this machine does not have.
    """
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"argument `device` {name}: torch sees no CUDA GPU on this machine (a CPU-only "
                "build or no driver): use argument `device` cpu, or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"argument `device` {name}: this machine has {count} GPU(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    return device


def accelerator_of(name: str, accelerator: str | None) -> str:
    """Lightning's accelerator for a run on ``name`` that also names ``accelerator``."""
    implied = {"auto": None, "cpu": "cpu"}.get(name, "gpu")
    if name.startswith("cuda:"):
        raise ConfigError(
            f"argument `device` {name} picks one GPU; on several processes pick them with "
            "argument `devices` (and CUDA_VISIBLE_DEVICES), and pass argument `device` cuda"
        )
    if implied and accelerator not in (None, "auto", implied):
        raise ConfigError(
            f"argument `device` {name} and argument `accelerator` {accelerator} disagree: "
            "pass one of them"
        )
    return implied or accelerator or "auto"
