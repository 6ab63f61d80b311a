"""Keep freed memory for the next step: glibc's ``malloc`` thresholds for training on a CPU.

PyTorch allocates CPU tensors with the C library's ``malloc``. With glibc's default
(dynamic) thresholds, a training step that frees its activations at the end hands much of
that memory back to the operating system (``trim``), or took it with ``mmap`` in the first
place, so the next step touches fresh pages again: a minor page fault, and the kernel
zeroing the page, for every 4 KiB of it. On the paper network (batch 256, one thread) a
library ``elbo`` step took about 1,400 such faults and the hand-written reference about
700, an ``iwae`` K = 5 step about 3,500 against 1,000 (``resource.getrusage``'s
``ru_minflt`` around each step); each costs a few microseconds, so they made up most of
the difference between the two that was not Pyro's fixed cost per step.

:func:`keep_freed_memory` sets glibc's two thresholds once for the process: allocations
below 32 MiB (the ceiling glibc's own dynamic threshold reaches on 64-bit machines) come
from the heap, and up to 256 MiB of freed memory at its top is kept for reuse instead of
being returned. A step then reuses the pages of the step before (a few dozen faults per
step, from Python's own objects). The cost: the process may hold up to 256 MiB more than
it uses between steps; its peak is unchanged. ``fit`` on a CPU, the command line and the
benchmarks call it; ``PYRO_LADDER_MALLOC=default`` in the environment leaves glibc's
defaults (any other value than ``default`` or ``kept`` is refused by name). Unset, it
also leaves them to any ``MALLOC_*`` variable of the user's own (or ``GLIBC_TUNABLES``,
or a preloaded allocator such as jemalloc); ``kept`` sets them anyway. Elsewhere than
Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

from .errors import ConfigError

__all__ = ["keep_freed_memory", "malloc_setting"]

ENV = "PYRO_LADDER_MALLOC"
MMAP_THRESHOLD = 32 * 2**20  # bytes: larger allocations are mapped (and unmapped) alone
TRIM_THRESHOLD = 256 * 2**20  # bytes: freed memory at the heap's top kept for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
CHOICES = ("kept", "default")  # the values of PYRO_LADDER_MALLOC (unset: kept)

_state: dict = {}


def keep_freed_memory() -> bool:
    """Set glibc's ``malloc`` thresholds so that freed memory is reused by the next step
    rather than returned to the system and faulted in again (the module's text gives the
    figures); once per process. Returns whether the thresholds are ours: False where the
    C library is not glibc, where ``PYRO_LADDER_MALLOC=default`` is set, where the user's
    own ``malloc`` settings are in the environment and ``PYRO_LADDER_MALLOC`` is unset,
    or where ``mallopt`` refused them.

    :raises ConfigError: for a ``PYRO_LADDER_MALLOC`` other than ``default`` or ``kept``."""
    if "kept" not in _state:
        _state["kept"] = _set_thresholds()
    return _state["kept"]


def malloc_setting() -> str:
    """How this process's ``malloc`` is set, for the benchmarks' records: ``"kept"``
    (:func:`keep_freed_memory` set it), ``"user"`` (the environment's own settings),
    or ``"default"``."""
    if _state.get("kept"):
        return "kept"
    return "user" if _users_own() else "default"


def _users_own() -> bool:
    """Has the user set ``malloc`` up in the environment: any ``MALLOC_*`` variable of
    glibc's, its tunables, or another allocator preloaded?"""
    return any(k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD") for k in os.environ)


def _set_thresholds() -> bool:
    explicit = os.environ.get(ENV, "").strip().lower()
    if explicit not in ("", *CHOICES):
        raise ConfigError(
            f"environment variable {ENV}={os.environ[ENV]!r}: expected 'default' (glibc's "
            "own malloc thresholds) or 'kept' (freed memory kept for reuse, the default); "
            "set one of them or unset it"
        )
    if explicit == "default" or (explicit == "" and _users_own()):
        return False  # an explicit 'kept' sets the thresholds beside the user's others
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # both, in this order: setting either turns glibc's dynamic thresholds off
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and (
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
