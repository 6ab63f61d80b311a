"""Reuse of a network's output within one estimator call, and nowhere else.

The ladder's guide evaluates the prior networks ``p(z_i | z_{i+1})`` at its own samples
and the model, replaying those samples, asks for the same values again; an estimator that
runs the guide twice on one batch asks for the same bottom-up pass twice. Reuse is only
sound while nothing the output depends on can change, and that is known for certain only
inside one computation: between the guide and the model of one estimator call no optimizer
step, ``load_state_dict``, ``.data`` edit or buffer refill can happen. So reuse is
**scoped**:

* :class:`ReuseOutputs` is a Pyro messenger that our estimators (every one
  :func:`~pyro_ladder.make_elbo` returns, and
  :func:`~pyro_ladder.elbo.surrogate.differentiable_loss`), :func:`~pyro_ladder.evaluate`
  (per pass) and the diagnostics push around the guide and the model of one computation.
  Its table of outputs is dropped when it closes.
* :meth:`Memo.call` asks the Pyro stack for the innermost open scope. Outside one (e.g.
  ``vae.reconstruct``, ``vae.sample``, or Pyro's own ``Trace_ELBO`` called on
  ``vae.model``/``vae.guide``) it always computes afresh.
* Inside a scope a request matches the stored one under its key (one entry per key) when
  its inputs view the same memory as the stored inputs (which the scope keeps alive, so the
  memory cannot be handed to another tensor) at the same version, and the grad mode,
  inference mode, JIT tracing state and the train/eval modes of the module are the same.
  A match is served the stored output when the inputs are the same objects (or carry no
  autograd history, like data sliced afresh from one packed tensor); an output carrying a
  graph is handed out once, and not after a backward pass has reached it (its buffers may
  be freed). Another tensor object over the same memory (``z.detach()`` of a stored ``z``)
  is served the stored values, detached, only when no gradient can flow (neither the
  inputs nor the module's parameters require one): the doubly reparameterized estimators
  score the guide's samples again at such copies with the model's parameters frozen, so
  the prior networks need not run a third time. Anything else is computed.

**Batch-norm statistics do not depend on reuse.** Within one scope a network's running
statistics move once per distinct input: a match that is computed again (reuse switched
off, or a spent graph) runs with the module's batch-norm buffers restored afterwards. In
training mode batch norm normalises with the batch's own statistics, so the output is the
same either way. :func:`reuse_outputs` switches reuse off (or on) for the scopes opened
inside it; losses, gradients and statistics are the same both ways (``tests/test_memo.py``).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class ReuseOutputs(Messenger):
    """The scope of one computation (the guide and the model of one estimator call) inside
    which :class:`Memo` may reuse network outputs. Use as a context manager."""

    def __init__(self, owner=None):
        super().__init__()
        self.owner, self.enabled = owner, True
        self._entries = {}
        self.saw_training = False  # did a module in training mode run through the scope?

    def __enter__(self):
        policy = _innermost(_ReusePolicy)
        self.enabled = policy.enabled if policy is not None else True
        self._entries, self.saw_training = {}, False
        return super().__enter__()

    def __exit__(self, *exc):
        self._entries = {}  # drop every stored input and output with the scope
        return super().__exit__(*exc)

    def clear(self) -> None:
        """Forget every stored output: what follows runs as in a new scope."""
        self._entries = {}

    # The scope handles no Pyro message; every site of the step passes through it, so skip
    # the base class's lookup of a ``_pyro_<type>`` method on each (fixed cost per step).
    def _process_message(self, msg) -> None:
        pass

    def _postprocess_message(self, msg) -> None:
        pass

    def call(self, key, module: nn.Module, inp, fn):
        """``fn(inp)``, or the stored output of a matching earlier request (module docs)."""
        inps = inp if isinstance(inp, tuple) else (inp,)
        state = _state(module)
        self.saw_training = self.saw_training or any(state[0])
        entry = self._entries.get(key)
        seen = entry is not None and entry.matches(inps, state)
        if seen and self.enabled:
            if entry.fresh and all(map(_identical, entry.inps, inps)):
                entry.fresh = not entry.has_graph  # a graph is handed out once
                return entry.result
            if not _needs_grad(module, inps):
                return _map(torch.Tensor.detach, entry.result)
        if seen:  # the statistics moved with the first computation at this input
            with _statistics_kept(module):
                result = fn(inp)
        else:
            result = fn(inp)
        entry = self._entries[key] = _Entry(inps, state, result)
        _spend_on_backward(entry)
        return result


class _ReusePolicy(Messenger):
    """Whether scopes opened inside this one reuse outputs (see :func:`reuse_outputs`)."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.enabled = bool(enabled)

    def _process_message(self, msg) -> None:
        pass

    def _postprocess_message(self, msg) -> None:
        pass


def reuse_outputs(enabled: bool = True) -> _ReusePolicy:
    """A context manager switching the reuse of network outputs on or off for the
    estimator calls, evaluations and diagnostics run inside it.

    Losses, gradients and batch-norm statistics are the same either way; reuse only saves
    work (the prior networks' second pass). ``with pyro_ladder.reuse_outputs(False): ...``
    """
    if not isinstance(enabled, bool):
        from .errors import ConfigError

        raise ConfigError(f"reuse_outputs takes True or False, got {enabled!r}")
    return _ReusePolicy(enabled)


def scoped(method):
    """``method`` (an estimator's ``loss``, ``loss_and_grads`` ...) run in a scope of its
    own; a call from inside another method of the same estimator keeps the caller's."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        scope = _innermost(ReuseOutputs)
        if scope is not None and scope.owner is self:
            return method(self, *args, **kwargs)
        with ReuseOutputs(owner=self):
            return method(self, *args, **kwargs)

    run._scoped = True
    return run


class Memo:
    """A network's handle on the innermost :class:`ReuseOutputs` scope; holds no state."""

    def call(self, key, module: nn.Module, inp, fn):
        """``fn(inp)`` outside a scope; inside one, :meth:`ReuseOutputs.call` under
        ``(self, key)``. ``inp`` is a tensor or a tuple of tensors (a sample and ``c``)."""
        scope = _innermost(ReuseOutputs)
        if scope is None:
            return fn(inp)
        return scope.call((id(self), key), module, inp, fn)


def _innermost(kind):
    for messenger in reversed(_PYRO_STACK):
        if isinstance(messenger, kind):
            return messenger
    return None


class _Entry:
    __slots__ = ("inps", "versions", "state", "result", "has_graph", "fresh", "__weakref__")

    def __init__(self, inps, state, result):
        self.inps, self.state, self.result = inps, state, result
        self.versions = tuple(map(_version, inps))  # views share the counter: copy it now
        self.has_graph = any(t.grad_fn is not None for t in _leaves(result))
        self.fresh = True

    def matches(self, inps, state) -> bool:
        return (
            state == self.state
            and len(inps) == len(self.inps)
            and all(map(_same_memory, self.inps, inps))
            and tuple(map(_version, inps)) == self.versions
        )


def _spend_on_backward(entry: _Entry) -> None:
    """Mark the entry spent when a backward pass reaches any tensor of its output."""
    ref = weakref.ref(entry)  # the hook must not keep the entry (and its output) alive

    def spend(_grad_outputs):
        alive = ref()
        if alive is not None:
            alive.fresh = False

    for t in _leaves(entry.result):
        if t.grad_fn is not None:
            t.grad_fn.register_prehook(spend)


@contextlib.contextmanager
def _statistics_kept(module: nn.Module):
    """Batch-norm running statistics of ``module`` as they were before the block: the
    block updates copies, and the buffers themselves are put back (not written back in
    place: the first computation's graph may hold them)."""
    saved = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training]
    originals = [dict(m._buffers) for m in saved]
    try:
        for m, buffers in zip(saved, originals, strict=True):
            for name, b in buffers.items():
                if b is not None:
                    m._buffers[name] = b.clone()
        yield
    finally:
        for m, buffers in zip(saved, originals, strict=True):
            m._buffers.update(buffers)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` views exactly ``a``'s elements (the versions are compared by the entry)."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same object, or the same memory (checked before) with no autograd history."""
    return a is b or not (a.requires_grad or b.requires_grad)


def _needs_grad(module: nn.Module, inps: tuple) -> bool:
    return any(t.requires_grad for t in inps) or any(p.requires_grad for p in module.parameters())


def _state(module: nn.Module) -> tuple:
    """What an output depends on besides the inputs and parameters, which cannot change
    within one scope: modes and tracing."""
    return (
        tuple(m.training for m in module.modules()),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch._C._get_tracing_state(),  # a JIT trace must not take tensors from outside it
    )


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
