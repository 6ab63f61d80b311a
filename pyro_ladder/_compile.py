"""Compiled networks inside a scope, eager everywhere else.

``torch.compile`` of a whole Pyro step gains nothing: dynamo meets ``pyro.param`` for every
parameter name, recompiles on each, and gives up at its recompile limit (GUIDE.md). The
split that works keeps Pyro's tracing eager and compiles the pure tensor functions it
calls: the ladder's networks. Each network marks its pure function with
:func:`network_call`; inside :func:`compiled_networks` (opened by the estimators of
``make_elbo(..., compile=True)``, :mod:`pyro_ladder.elbo.compiled`) that function runs
compiled, once per module and set of options, and outside it runs as written. So the
modules, their parameters and ``state_dict`` are untouched, and sampling, reconstruction and
evaluation stay eager unless they too run inside a scope.

The compiled function is the same arithmetic (``torch.compile`` may fuse and reorder
floating-point operations, so results agree to rounding: ``tests/test_compiled.py``).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import torch._functorch.config
from torch import nn
from torch.distributions import Distribution

_SCOPES: list[tuple] = []  # torch.compile options of the open scopes, innermost last
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {key: fn}


@contextlib.contextmanager
def compiled_networks(**options):
    """Run the networks' pure functions compiled with ``torch.compile(**options)`` inside
    the block (e.g. ``backend="aot_eager"``, ``mode="max-autotune-no-cudagraphs"``)."""
    _SCOPES.append(tuple(sorted(options.items())))
    try:
        # graphs compile inside the scope (forward at the first call of a shape, backward
        # at its first backward pass); the doubly reparameterized estimators run two
        # backward passes through one graph (retain_graph), which AOT autograd's donated
        # buffers would refuse. Dynamo reads ``.grad`` of every input it guards, samples
        # (non-leaf tensors) included, and torch warns about that read: nothing is wrong.
        with torch._functorch.config.patch(donated_buffer=False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The .grad attribute of a Tensor that is not a leaf")
            yield
    finally:
        _SCOPES.pop()


def network_call(module: nn.Module, fn, *inputs):
    """``fn(*inputs)`` (``fn``: a pure tensor function of ``module``, e.g. a bound method),
    compiled when a :func:`compiled_networks` scope is open and no compilation is tracing
    already (a compiled network calling another inlines it)."""
    if not _SCOPES or torch.compiler.is_compiling():
        return fn(*inputs)
    key = (fn.__name__, _SCOPES[-1])
    table = _COMPILED.setdefault(module, {})
    with validation_kept():
        compiled = table.get(key)
        if compiled is None:
            compiled = table[key] = torch.compile(fn, **dict(_SCOPES[-1]))
        return compiled(*inputs)


def eager_draws(options: dict) -> dict:
    """``torch.compile`` keywords ``options`` with inductor's ``fallback_random`` on unless
    they set it: the graph's random operations then run as torch's own, on its generator,
    in the order the graph holds them (the eager order), instead of inductor's
    counter-based generator. A ``mode`` becomes the inductor settings it stands for
    (``torch.compile`` takes a mode or settings, not both); other backends draw with
    torch's generator anyway and get ``options`` as they are."""
    if options.get("backend", "inductor") != "inductor":
        return dict(options)
    out = {k: v for k, v in options.items() if k != "mode"}
    mode = options.get("mode")
    settings = {}
    if mode and mode != "default":  # as torch.compile applies a mode
        from torch._inductor import list_mode_options  # a heavy import, needed only here

        settings.update(list_mode_options(mode, options.get("dynamic")))
    settings.update(options.get("options") or {})
    settings.setdefault("fallback_random", True)
    out["options"] = settings
    return out


@contextlib.contextmanager
def validation_kept():
    """torch.distributions' argument validation as it was after the block: dynamo's first
    use switches it off for the whole process (TorchPatcher), and Pyro's validation rests
    on it. Around every compile and compiled call."""
    validate = Distribution._validate_args
    try:
        yield
    finally:
        Distribution._validate_args = validate
