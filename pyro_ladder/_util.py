"""Small helpers shared by the modules (not part of the public API)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pyro.util
import torch
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


@contextlib.contextmanager
def kept_buffers(*fns):
    """After the block, the buffers of the modules behind ``fns`` (batch-norm running
    statistics) are as they were before it, written back in place (no graph built inside
    the block may be used after it). Modules are found as :func:`modules_of` finds them
    (bound methods such as ``vae.model``); a pair of plain functions keeps its own."""
    buffers = [(b, b.detach().clone()) for m in modules_of(*fns) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


@contextlib.contextmanager
def preserved_state(*fns):
    """:func:`kept_buffers`, and the random state (torch, Python, NumPy) as it was."""
    rng = pyro.util.get_rng_state()
    try:
        with kept_buffers(*fns):
            yield
    finally:
        pyro.util.set_rng_state(rng)


@contextlib.contextmanager
def without_side_effects(*fns):
    """Run a probe (one trace of a pair, to learn its plate structure) and leave no trace
    of it: :func:`preserved_state`, no gradient graph, and a reuse scope of its own whose
    outputs serve nothing after it.

    Without this a probe run in training mode moves batch-norm statistics and uses random
    numbers, so a run resumed with a fresh estimator (which probes again) would part from
    the uninterrupted one.
    """
    from ._memo import ReuseOutputs

    with preserved_state(*fns), torch.no_grad(), ReuseOutputs():
        yield


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
