"""Small helpers shared by the modules (not part of the public API)."""

from __future__ import annotations

import contextlib
import numbers
import os
import random
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
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
def before_each_forward(visit: Callable[[nn.Module], None]):
    """``visit(module)`` just before the forward of every module called inside the block
    (``module(x)``, which runs forward hooks; any thread), through a global forward
    pre-hook removed when the block ends. For what must reach networks a pair of plain
    functions holds in closures, which nothing can name beforehand."""
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, _inputs: visit(m))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def eval_as_met():
    """Every module whose forward runs inside the block runs in evaluation mode (set just
    before its forward; each one's mode restored after the block): networks a pair of
    plain functions holds in closures included, which :func:`eval_mode` cannot name."""
    modes: dict = {}  # id -> (module, its mode)

    def met(module):
        if id(module) not in modes:
            modes[id(module)] = (module, module.training)
            module.training = False

    try:
        with before_each_forward(met):
            yield
    finally:
        for module, mode in modes.values():
            module.training = mode


@contextlib.contextmanager
def kept_buffers(*fns):
    """After the block, the buffers (batch-norm running statistics) of the modules behind
    ``fns`` (bound methods such as ``vae.model``, :func:`modules_of`) and of every module
    whose forward runs inside the block (networks a pair of plain functions holds in
    closures) are as they were before it: written back in place, and put back where the
    block replaced one (``self.avg = 0.9 * self.avg + ...``). No graph built inside the
    block may be used after it. Buffers a lazy module has not initialized yet are left
    alone. Yields the list of the modules that ran, in the order of their first call."""
    saved: dict = {}  # id -> (module, [(name, buffer, its copy)]); holding the module keeps its id
    ran: list[nn.Module] = []
    ran_ids: set[int] = set()  # the modules in ran are held there, so their ids stay theirs

    def keep(module):
        if id(module) in saved:
            return
        own = [
            (name, b, b.detach().clone())
            for name, b in module._buffers.items()
            if b is not None and not nn.parameter.is_lazy(b)
        ]
        saved[id(module)] = (module, own)

    def met(module):  # before a module's forward: its own buffers (each submodule that
        # runs is met in turn)
        keep(module)
        if id(module) not in ran_ids:
            ran_ids.add(id(module))
            ran.append(module)

    for module in modules_of(*fns):
        for sub in module.modules():
            keep(sub)
    try:
        with before_each_forward(met):
            yield ran
    finally:
        with torch.no_grad():
            for module, buffers in saved.values():
                for name, buffer, copy in buffers:
                    if not torch.equal(buffer, copy):  # untouched ones keep their version
                        buffer.copy_(copy)
                    if getattr(module, name, None) is not buffer:  # replaced in the block
                        setattr(module, name, buffer)  # (TorchScript modules take it too)


# a normalization layer's statistics, which its forward updates in training mode
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def held_statistics(*fns):
    """Normalization layers in training mode (batch norm, instance norm with running
    statistics; TorchScript-compiled ones and layers of a user's own that keep a
    ``running_mean`` or ``running_var`` too) that run inside the block normalize as usual
    but leave their running statistics as they were: for a pass that repeats, on the same
    inputs, one whose update already counted (the fixed-sample passes of
    :mod:`pyro_ladder.elbo.weighted`, the dependence pass of
    :func:`~pyro_ladder._traces.parameter_roles`). Held: every such layer of the modules
    behind ``fns`` (bound methods such as ``vae.model``, in whatever thread they run), and
    every other one called (``layer(x)``, which runs forward hooks) in the thread that
    opened the block (networks a pair holds in closures). Not held: a closure's layer run
    by another thread, or called as ``layer.forward(x)``; a layer another thread runs
    meanwhile for its own purposes is not the pass's.

    A layer's ``momentum`` is 0 while the block runs (the kernel's update then leaves the
    running mean and variance as they are, bit for bit, and a captured graph records just
    that), and its ``num_batches_tracked`` is put back afterwards. Writing the old values
    back into the statistics instead would change tensors the pass's graph saved for its
    backward. In a TorchScript module, where Python cannot set what the compiled code
    reads, and in a layer of the user's own, whose update torch does not know, a layer
    (known by its running statistics) has them replaced by copies for the block, and the
    original tensors put back."""
    thread = threading.get_ident()
    held: dict = {}  # id -> (module, momentum or None, count copy or None, swapped tensors)

    def hold(module):  # a Python norm layer
        if id(module) in held or not module.training or not module.track_running_stats:
            return
        count = getattr(module, "num_batches_tracked", None)
        count = count.clone() if isinstance(count, torch.Tensor) else None
        held[id(module)] = (module, module.momentum, count, None)
        module.momentum = 0.0

    def swap(module):  # a layer inside TorchScript, or a user's own: copies for the block
        if id(module) in held or not getattr(module, "training", False):
            return
        own = {n: v for n in _STATISTICS if _is_statistic(v := getattr(module, n, None))}
        if "running_mean" not in own and "running_var" not in own:
            return  # keeps no statistics
        held[id(module)] = (module, None, None, own)
        for name, value in own.items():  # a number (a count) is put back afterwards
            if isinstance(value, nn.Parameter):  # statistics kept as frozen parameters
                setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=False))
            elif isinstance(value, torch.Tensor):
                setattr(module, name, value.clone())

    def visit(module):
        if isinstance(module, nn.modules.batchnorm._NormBase):
            hold(module)
        elif isinstance(module, torch.jit.ScriptModule):  # its submodules run in TorchScript
            for sub in module.modules():
                swap(sub)
        elif _keeps_statistics(module):  # a layer of the user's own with running statistics
            swap(module)

    def met(module):
        if threading.get_ident() == thread:
            visit(module)

    try:
        with before_each_forward(met):
            for owner in modules_of(*fns):
                for module in owner.modules():
                    visit(module)
            yield
    finally:
        failed = None
        for module, momentum, count, own in held.values():
            try:  # every layer is put back, whatever one of them raises
                _put_back(module, momentum, count, own)
            except Exception as err:  # noqa: BLE001 (raised below, after the others)
                failed = failed or err
        if failed is not None:
            raise failed


def _keeps_statistics(module: nn.Module) -> bool:
    """Does ``module`` hold a running mean or variance (a buffer, a parameter that takes no
    gradient, or a tensor attribute)?"""
    own = module.__dict__
    places = (own, own.get("_buffers", {}), own.get("_parameters", {}))
    names = ("running_mean", "running_var")
    return any(_is_statistic(place.get(name)) for place in places for name in names)


def _is_statistic(value) -> bool:
    """A value a layer may keep as a running statistic: a tensor (a parameter only if it
    takes no gradient: one that does is trained, not kept) or a number (a count)."""
    if isinstance(value, nn.Parameter):
        return not value.requires_grad
    return isinstance(value, (torch.Tensor, numbers.Number)) and not isinstance(value, bool)


def _put_back(module, momentum, count, own) -> None:
    """Undo :func:`held_statistics` for one layer."""
    if own is not None:
        for name, tensor in own.items():
            setattr(module, name, tensor)
        return
    module.momentum = momentum
    now = getattr(module, "num_batches_tracked", None)
    if count is not None and now is not None:  # no graph saves the count
        with torch.no_grad():
            now.copy_(count)


@contextlib.contextmanager
def preserved_state(*fns):
    """:func:`kept_buffers`, and the random state (torch, Python, NumPy, CUDA once in use:
    :func:`rng_state`) as it was."""
    rng = rng_state()
    try:
        with kept_buffers(*fns):
            yield
    finally:
        set_rng_state(rng)


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


def rng_state() -> dict:
    """The states of torch's, Python's and numpy's generators, as tensors and plain data,
    and of the CUDA generators (key ``"cuda"``) once CUDA is in use."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_initialized():  # draws on a GPU (Pyro's samples, binarization)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from :func:`rng_state`'s result."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # else resumed on a CPU: new draws
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
