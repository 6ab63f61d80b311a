"""Small helpers shared by the modules (not part of the public API)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from torch import nn


def modules_of(*fns) -> list[nn.Module]:
    """The ``nn.Module`` instances behind bound methods such as ``vae.model``."""
    owners = [getattr(fn, "__self__", fn) for fn in fns]
    unique = []
    for m in owners:
        if isinstance(m, nn.Module) and all(m is not u for u in unique):
            unique.append(m)
    return unique


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """``module.eval()`` inside the block; each module's previous mode restored after."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, rename it.

    A crash leaves the old file or the new one, never half of one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
