"""Reuse of a network's output when it is asked again for the very same input tensor.

The ladder's guide evaluates the prior networks ``p(z_i | z_{i+1})`` at its own samples
and the model, replaying those samples, asks for the same values again; an estimator that
runs the guide twice asks for the same bottom-up pass twice. :class:`Memo` hands back the
first result when the second request comes with the *same tensor object* (or, for a
tensor with no autograd history such as data, a view of the same memory), and nothing the
result depends on has changed since; otherwise it computes afresh, so correctness never
rests on it. An input may be a tuple of tensors (a sample and the condition ``c``).
What "nothing changed" means:

* the input has not been modified in place (its version counter);
* the module's parameters and buffers are the same storages at the same versions (an
  optimizer step, ``load_state_dict`` or a batch-norm statistics update bumps them);
* the train/eval mode of the module and of its submodules, grad mode, inference mode
  and JIT tracing state are those of the first request (a trace must never take a tensor
  computed outside it).

An entry that carries an autograd graph hands that graph out once, and no longer once a
backward pass has reached it (its buffers may be freed); an entry without one (inference,
``no_grad``) serves every identical request. A request with a *different* tensor that
views the same memory at the same version (``z.detach()`` of a stored ``z``) gets the
stored values, detached, when no gradient could flow anyway (neither the input nor the
module's parameters require one): the doubly reparameterized estimators score the
guide's samples again at such copies, and for the guide's own parameters they freeze the
model's, so the prior networks need not run a third time. Each key holds one entry: the
memo keeps at most the last request per key alive. With batch norm in training mode the
reuse also means the running statistics are updated once per pass, not twice.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class Memo:
    """Results of ``module(input)`` kept for an identical request, one per key (e.g. a layer
    index)."""

    def __init__(self):
        self._entries = {}

    def call(self, key, module: nn.Module, inp, fn):
        """``fn(inp)``, or the stored result of an identical earlier request under ``key``.

        ``inp`` is a tensor or a tuple of tensors (e.g. a sample and the condition ``c``).
        A tensor counts as identical when it is the same object, or, when neither copy
        requires a gradient, a view of the same memory at the same version (a condition
        sliced afresh from the same packed data on every call).
        """
        inps = inp if isinstance(inp, tuple) else (inp,)
        entry = self._entries.get(key)
        if (
            entry is not None
            and len(entry.inp) == len(inps)
            and all(_same_memory(a, b) for a, b in zip(entry.inp, inps, strict=True))
            and entry.state == _state(module, inps)
        ):
            if entry.fresh and all(map(_identical, entry.inp, inps)):
                entry.fresh = not entry.has_graph  # a graph is handed out once
                return entry.result
            if not _needs_grad(module, inps):
                return _map(torch.Tensor.detach, entry.result)
        result = fn(inp)
        entry = self._entries[key] = _Entry(inps, _state(module, inps), result)
        _spend_on_backward(entry)
        return result

    def clear(self) -> None:
        self._entries.clear()

    def __deepcopy__(self, memo):  # stored tensors may be non-leaf: never copy them
        return Memo()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._entries = {}


class _Entry:
    __slots__ = ("inp", "state", "result", "has_graph", "fresh", "__weakref__")

    def __init__(self, inp, state, result):
        self.inp, self.state, self.result = inp, state, result
        self.has_graph = any(t.grad_fn is not None for t in _leaves(result))
        self.fresh = True


def _spend_on_backward(entry: _Entry) -> None:
    """Mark the entry's graph spent when a backward pass reaches any tensor of its result."""
    ref = weakref.ref(entry)  # the hook must not keep the entry (and its result) alive

    def spend(_grad_outputs):
        alive = ref()
        if alive is not None:
            alive.fresh = False

    for t in _leaves(entry.result):
        if t.grad_fn is not None:
            t.grad_fn.register_prehook(spend)


def _submodules(module: nn.Module, out: list) -> list:
    """``module`` and everything below it (``modules()`` without building names)."""
    out.append(module)
    for child in module._modules.values():
        if child is not None:
            _submodules(child, out)
    return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` views exactly ``a``'s elements (the version is compared with the state)."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same object, or the same memory (checked before) with no autograd history."""
    return a is b or not (a.requires_grad or b.requires_grad)


def _needs_grad(module: nn.Module, inps: tuple) -> bool:
    return any(t.requires_grad for t in inps) or any(p.requires_grad for p in module.parameters())


def _map(fn, value):
    """``fn`` applied to every tensor in nested tuples and lists, the nesting kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    return type(value)(_map(fn, item) for item in value)


def _leaves(value):
    """The tensors in nested tuples and lists."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _leaves(item)]


def _state(module: nn.Module, inps: tuple) -> tuple:
    """Everything a module's output at ``inps`` depends on besides the inputs' identity."""
    modes, tensors = [], []
    for m in _submodules(module, []):
        modes.append(m.training)
        tensors.extend(t for t in m._parameters.values() if t is not None)
        tensors.extend(t for t in m._buffers.values() if t is not None)
    return (
        tuple(None if t.is_inference() else t._version for t in inps),
        tuple(modes),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch._C._get_tracing_state(),  # a JIT trace must not take tensors from outside it
        tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors),
    )
