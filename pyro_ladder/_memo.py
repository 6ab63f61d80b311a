"""Reuse of a network's output when it is asked again for the very same input tensor.

The ladder's guide evaluates the prior networks ``p(z_i | z_{i+1})`` at its own samples
and the model, replaying those samples, asks for the same values again; an estimator that
runs the guide twice asks for the same bottom-up pass twice. :class:`Memo` hands back the
first result when the second request comes with the *same tensor object*, and nothing the
result depends on has changed since; otherwise it computes afresh, so correctness never
rests on it. What "nothing changed" means:

* the input has not been modified in place (its version counter);
* the module's parameters and buffers are the same storages at the same versions (an
  optimizer step, ``load_state_dict`` or a batch-norm statistics update bumps them);
* the train/eval mode of the module and of its submodules, grad mode, inference mode
  and JIT tracing state are those of the first request (a trace must never take a tensor
  computed outside it).

An entry that carries an autograd graph is used at most once and then dropped, and it
expires as soon as a backward pass reaches its result (whose graph may then be freed), so
the memo never hands out a spent graph; an entry without one (inference, ``no_grad``)
serves every identical request. Each key holds one entry: the memo keeps at most the last
request per key alive. With batch norm in training mode the reuse also means the running
statistics are updated once per pass, not twice.
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

    def call(self, key, module: nn.Module, inp: torch.Tensor, fn):
        """``fn(inp)``, or the stored result of an identical earlier request under ``key``.

        A hit consumes an entry with a graph; a miss computes ``fn(inp)`` and stores it.
        """
        entry = self._entries.pop(key, None)
        if entry is not None and entry[0] is inp and entry[1] == _state(module, inp):
            if not any(t.grad_fn is not None for t in _leaves(entry[2])):
                self._entries[key] = entry  # no graph to spend: serve later requests too
            return entry[2]
        result = fn(inp)
        token = object()
        self._entries[key] = (inp, _state(module, inp), result, token)
        self._expire_on_backward(key, token, result)
        return result

    def _expire_on_backward(self, key, token, result) -> None:
        """Drop the entry when a backward pass reaches any tensor of ``result``."""
        memo = weakref.ref(self)  # the hook must not keep the memo or the result alive

        def expire(_grad_outputs):
            owner = memo()
            if owner is not None and owner._entries.get(key, (None,) * 4)[3] is token:
                del owner._entries[key]

        for t in _leaves(result):
            if t.grad_fn is not None:
                t.grad_fn.register_prehook(expire)

    def clear(self) -> None:
        self._entries.clear()

    def __deepcopy__(self, memo):  # stored tensors may be non-leaf: never copy them
        return Memo()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._entries = {}


def _leaves(value):
    """The tensors in nested tuples and lists."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _leaves(item)]


def _state(module: nn.Module, inp: torch.Tensor) -> tuple:
    """Everything a module's output at ``inp`` depends on besides the input's identity."""
    modes, tensors = [], []
    for m in module.modules():  # one walk: this runs twice per request
        modes.append(m.training)
        tensors.extend(t for t in m._parameters.values() if t is not None)
        tensors.extend(t for t in m._buffers.values() if t is not None)
    return (
        None if inp.is_inference() else inp._version,
        tuple(modes),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch._C._get_tracing_state(),  # a JIT trace must not take tensors from outside it
        tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors),
    )
