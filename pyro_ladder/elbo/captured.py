r"""The whole training step as one compiled graph: ``make_elbo(name, compile=True)``.

``torch.compile`` cannot take a Pyro step whole: dynamo meets ``pyro.param`` for every
parameter name and gives up (GUIDE.md). It need not. For a fixed pair, estimator and
argument structure, a step's *tensor arithmetic* (forward, the estimator's surrogate,
backward) is the same at every step; only Pyro's Python (handlers, traces, messages,
registrations) stands around it. :class:`CompiledStep` therefore runs the step once under
``torch.fx``'s ``make_fx``, which executes the Python as written with real tensors and
records every tensor operation it dispatches, backward included
(``torch.autograd.grad`` inside the recorded function), into one graph. The graph's inputs
are every parameter the step registers with Pyro, every parameter and buffer of the
modules that ran, and the tensors among the arguments; its outputs are the loss and the
gradients, and it updates batch-norm statistics in place as the eager step does.
``torch.compile`` compiles that graph, and each later step runs it alone: none of Pyro's
Python runs any more, only the compiled arithmetic, then the parameter registrations that
``SVI`` collects to know what to step.

**What a capture fixes, and how it is kept honest.** A graph repeats the tensor
arithmetic of one call; whatever Python decided during that call is fixed in it. So:

* **Captured anew** when it changes: the pair, the arguments' structure, shapes, dtypes
  and devices, their non-tensor values by type and value (numbers, strings, None, dtypes,
  devices: pass a KL weight as a 0-dim tensor, as :func:`~pyro_ladder.fit` does, and one
  graph serves every weight), the Pyro handlers around the call with their public
  settings (``poutine.scale``'s factor, free bits), autocast, the estimator's plain
  settings (``num_particles`` ...), the plain settings (numbers, strings, lists of them)
  of the object behind a bound method (``vae.model``'s ``vae``) and of each module that
  ran (train/eval mode, batch norm's momentum), and which parameters take a gradient;
  likewise a parameter store that no longer holds the graph's parameters, or holds other
  tensors under their names. Settings kept elsewhere (a module-level variable, a
  closure's Python value) are not seen: keep them in arguments or attributes. After
  ``WARN_CAPTURES`` (8) captures a warning names what keeps changing; at most
  ``MAX_CAPTURES`` (32) are kept.
* **Refused, with the cause named**: a host read of a tensor's value (``.item()``, ``if
  tensor:``; ``make_fx`` cannot record it; the message gives the line), a tensor the step
  reads from outside its inputs (an attribute or a closure, whose replacement the graph
  would not see), a draw from Python's or NumPy's generator (the graph would repeat the
  first draw), an argument that requires grad (the eager step would backpropagate into
  it), a non-tensor argument that cannot be compared by value. ``compile="networks"``
  (:class:`~pyro_ladder.elbo.compiled.CompiledNetworks`) serves such pairs. The ladder's
  own reads take a path without them (:mod:`pyro_ladder._capture`); Pyro's
  ``Trace_ELBO`` and ``TraceMeanField_ELBO`` read each site's value (``torch_item``) and
  test the loss for NaN, which during the capture read as ``detach`` and nothing.
* **Checked at each capture**: the recorded graph (uncompiled) is run against the eager
  estimator on the same random numbers, parameters and statistics; the loss, every
  gradient and every buffer must agree to a relative 1e-5 (float rounding: ``torch_item``
  sums in double), or the capture is refused naming what differs.
* **Checks that read data run on every call, eagerly**: the ladder's (binary and finite
  values, class labels in range) and Pyro's support check of observed values that are
  arguments (when validation is on; one computed inside the step, a reshape or a subset,
  cannot be checked on later calls, and a warning says so). Pyro's other argument
  validation is off inside the graph, as for the ``jit-*`` estimators; torch's stays on
  for the rest of the process (dynamo's first use would switch it off).
* Every parameter the loss reaches gets its gradient, registered with Pyro or not, as
  ``loss_and_grads`` gives it; under ``torch.no_grad`` the estimator runs as it is.

**Random numbers.** The compiled step draws what the eager step draws for Gaussian
latents (the ladders'): the graph's random operations run as torch's own, on torch's
generator in the eager order (inductor's ``fallback_random``, set by
:func:`~pyro_ladder._compile.eager_draws`), so a seeded run with ``compile=True`` follows
the eager run's trajectory to float rounding, and ``pyro.set_rng_seed`` makes it repeat
(a resumed run included). Discrete sites of a user's pair are the exception: inductor
rewrites a Bernoulli draw as a uniform compared with ``p``, other draws in float64 (exact
Bernoulli draws all the same). It is also the faster
choice on a CPU, where inductor's own counter-based generator draws one value at a time
(profiled, an ``iwae`` K = 5 step of the paper network at one thread: the fused kernels
holding its draws took 6.1 ms, the same kernels without them 1.8 ms, torch's draws 0.4 ms).
``options={"fallback_random": False}`` gives inductor's generator back.

The first step of each key traces (about one eager step) and compiles (about a minute for
the paper network on one CPU thread; docs/performance.md gives the figures and from which
step it pays off).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import random
import traceback
import warnings

import numpy as np
import pyro
import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, am_i_wrapped, apply_stack
from pyro.poutine.trace_messenger import TraceMessenger
from torch.distributions import constraints
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten

from .._capture import capture_scope, defer_check
from .._compile import eager_draws, validation_kept
from .._params import _param_message, _stored_as_is
from .._traces import roles_held
from .._util import kept_buffers, rng_state, set_rng_state
from ..errors import ConfigError
from .surrogate import differentiable_loss
from .weighted import _GivenGradients

__all__ = ["CompiledStep"]

# Pyro's functions that read a tensor on the host inside Trace_ELBO and TraceMeanField_ELBO
# (a site's value as a Python number; a NaN test that warns): during a capture they read
# as ``detach`` (the same value, a float32 sum where Pyro's sums in double) and as nothing
_HOST_READS = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo)

TOLERANCE = 1e-5  # relative agreement of the captured graph and the eager step
WARN_CAPTURES = 8  # captures by one estimator past which it says what keeps changing
MAX_CAPTURES = 32  # captures kept by one estimator (the least recently used go first)
KEY_PARTS = (
    "the model", "the guide", "the arguments' structure", "non-tensor arguments",
    "argument shapes, dtypes or devices", "autocast", "Pyro handlers around the call",
    "the estimator's settings",
)  # fmt: skip


class CompiledStep(pyro.infer.ELBO):
    """``estimator``'s training step captured once per key and run as one compiled graph.

    :param estimator: an estimator of :func:`~pyro_ladder.make_elbo` (or Pyro's) whose step
        reads no tensor value on the host.
    :param options: keyword arguments of ``torch.compile`` for the graph (``backend``,
        ``mode``, ``options``); none: inductor, the default mode. ``backend="eager"`` runs
        the captured graph uncompiled (no compile time; Pyro's Python still skipped).

    ``loss`` (no gradient) runs the eager estimator. ``loss_and_grads`` and
    ``differentiable_loss`` run the captured step; the latter returns a tensor whose
    backward hands each parameter its captured gradient (for loops that call ``backward``
    themselves). Attributes it does not have itself are the estimator's.
    """

    _OWN = ("estimator", "options", "_captures", "_warned")

    def __init__(self, estimator, **options):
        # no ELBO.__init__: every setting is the wrapped estimator's
        object.__setattr__(self, "estimator", estimator)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "_captures", {})  # key -> [_Capture], most recently used last
        object.__setattr__(self, "_warned", False)

    def __getattr__(self, name):
        if name in self._OWN:  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.estimator, name)

    def __setattr__(self, name, value):  # a setting (num_particles ...) is the estimator's
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.estimator, name, value)

    def __getstate__(self):  # captured graphs are not pickled: a copy captures anew
        return {"estimator": self.estimator, "options": self.options}

    def __setstate__(self, state):
        self.__init__(state["estimator"], **state["options"])

    @property
    def captures(self) -> int:
        """How many graphs were captured (one per key; each compiled once)."""
        return sum(len(c) for c in self._captures.values())

    def loss(self, model, guide, *args, **kwargs) -> float:
        return self.estimator.loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        if not torch.is_grad_enabled():  # no gradient to capture: as the estimator does
            return self.estimator.loss_and_grads(model, guide, *args, **kwargs)
        loss, params, grads = self._step(model, guide, args, kwargs)
        given = set()  # storages already handed to a parameter in this call
        for p, g in zip(params, grads, strict=True):
            g = g if g.dtype == p.dtype else g.to(p.dtype)
            if p.grad is not None:
                p.grad.add_(g)
                continue
            # a graph output may be shared by two parameters (``a + b``) or be a broadcast
            # view (``c.sum()``'s gradient has stride 0): a .grad of its own, laid out like
            # the parameter, as autograd gives it, so in-place updates touch one parameter
            storage = g.untyped_storage().data_ptr()
            if storage in given or g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)
            given.add(g.untyped_storage().data_ptr())
            p.grad = g
        return loss.item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():  # every estimator's form (surrogate.py), eagerly
            return differentiable_loss(self.estimator, model, guide, *args, **kwargs)
        loss, params, grads = self._step(model, guide, args, kwargs)
        if not params:
            return loss
        return loss + _GivenGradients.apply(tuple(grads), False, *params)

    def _get_trace(self, model, guide, args, kwargs):
        return self.estimator._get_trace(model, guide, args, kwargs)

    def _step(self, model, guide, args, kwargs):
        flat, spec = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        # by type and value: 1, 1.0 and True are equal in Python, not to a pair
        statics = tuple(None if isinstance(a, torch.Tensor) else (type(a), a) for a in flat)
        _check_arguments(tensors, statics)

        def key():
            return (
                _ident(model), _ident(guide), str(spec), statics,
                tuple((t.shape, t.dtype, t.device) for t in tensors),
                _autocast(), _handlers(), _settings(self.estimator),
            )  # fmt: skip

        inputs, now = None, key()
        for capture in self._captures.get(now, ()):
            inputs = capture.inputs(tensors)
            if inputs is not None:
                self._captures[now] = self._captures.pop(now)  # the most recently used last
                break
        if inputs is None:
            capture = _Capture(self.estimator, self.options, model, guide, args, kwargs)
            # keyed after the capture: an estimator's first call settles some settings
            # (Pyro's guess of max_plate_nesting)
            self._keep(key(), capture)
            inputs = capture.inputs(tensors)
        return capture.run(inputs)

    def _keep(self, key, capture) -> None:
        """Store a new capture; past ``MAX_CAPTURES`` the least recently used goes, and a warning
        says what keeps changing (each capture traces again, and compiles again)."""
        if self._captures and not self._warned and self.captures + 1 >= WARN_CAPTURES:
            last = next(reversed(self._captures))
            changed = [n for n, a, b in zip(KEY_PARTS, last, key, strict=True) if a != b]
            warnings.warn(
                f"compile=True has captured {self.captures + 1} graphs: "
                f"{', '.join(changed) or 'the parameters or modules'} changed since the "
                "last call; each capture traces and compiles again. Pass values that change "
                "as tensor arguments, or use compile='networks'",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned = True
        self._captures.setdefault(key, []).append(capture)
        while self.captures > MAX_CAPTURES:  # the least recently used key's oldest capture
            oldest = next(iter(self._captures))
            self._captures[oldest].pop(0)
            if not self._captures[oldest]:
                del self._captures[oldest]


def _check_arguments(tensors, statics) -> None:
    """Refuse arguments a captured step cannot serve: a tensor that requires a gradient
    (the eager step would backpropagate into it and into what computed it) and a
    non-tensor value the key cannot compare by value."""
    if any(t.requires_grad for t in tensors):
        raise ConfigError(
            "compile=True: an argument tensor requires grad, so the eager step would send "
            "gradients into it (and into the networks that computed it), which the captured "
            "graph does not: pass it detached, or use compile='networks'"
        )
    bad = [v[1] for v in statics if v is not None and not _by_value(v[1])]
    if bad:
        raise ConfigError(
            f"compile=True fixes non-tensor arguments in its graph and tells them apart by "
            f"value, which it cannot do for {bad[0]!r} ({type(bad[0]).__name__}): pass "
            "tensors, numbers, strings or None, or use compile='networks'"
        )


def _by_value(value) -> bool:
    """Is ``value`` compared by value in a key (numbers, NumPy's scalars included)?"""
    return value is None or isinstance(value, (numbers.Number, str, torch.dtype, torch.device))


def _autocast() -> tuple:
    """Autocast's state on the CPU and CUDA: a graph recorded under it computes in its
    dtypes."""
    return tuple(
        (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
    )


def _settings(estimator) -> tuple:
    """The estimator's plain settings (``num_particles``, ``alpha`` ...), fixed in the
    graph: a change captures anew."""
    return tuple((k, v) for k, v in vars(estimator).items() if _by_value(v))


def _handlers() -> tuple:
    """The Pyro handlers around the call, which the graph fixes too (``poutine.scale``'s
    factor, ``fit``'s free bits): each one's type and public settings (numbers, strings
    and containers of them by value, anything else by identity; attributes named with a
    leading underscore are the handler's own state, such as what free bits record during
    a step). Trace handlers, which only record (``SVI``'s parameter capture among them),
    are left out."""
    return tuple(
        (type(h), _fingerprint({k: v for k, v in vars(h).items() if not k.startswith("_")}))
        for h in _PYRO_STACK
        if not isinstance(h, TraceMessenger)
    )


def _fingerprint(value):
    if _by_value(value):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_fingerprint(v) for v in value)
    if isinstance(value, dict):
        return tuple((repr(k), _fingerprint(v)) for k, v in value.items())
    return _Same(value)


class _Same:
    """A key part that compares by identity and keeps its object alive, so that no other
    object can take its ``id`` while a key holds it."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _owners(fn) -> tuple:
    """What identifies a callable: the object and function behind a bound method (a new
    bound method object is made at each ``vae.model``), or the callable itself."""
    return getattr(fn, "__self__", fn), getattr(fn, "__func__", fn)


def _ident(fn) -> tuple:
    return tuple(_Same(x) for x in _owners(fn))


class _Capture:
    """One captured step: its inputs' sources, the graph, and its compiled form."""

    def __init__(self, estimator, options, model, guide, args, kwargs):
        self.estimator, self.options = estimator, options
        call = (model, guide, args, kwargs)
        # the roles the exploration finds serve the recording and the check: the graph
        # must not record the dependence pass of a pair whose roles are found at every
        # call (its draws would be drawn again at each replay)
        with roles_held():
            self._capture(call)

    def _capture(self, call) -> None:
        model, guide, args, kwargs = call
        self.names, self.modules = self._explore(call)
        # the plain settings of each module that ran and of the objects behind the pair
        # (a bound method's instance: vae.model's vae), by name: read again at every call
        self.owners = _unique([o for fn in (model, guide) for o in _owners(fn)])
        self.plain = [
            [k for k, v in _attributes(o).items() if _plain(v)]
            for o in (*self.owners, *self.modules)
        ]
        self.state = self._module_state()
        flat_args = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        sources = self._sources(flat_args)
        self.pattern = _pattern(sources)
        leaves = _unique(sources)
        # every leaf that takes a gradient gets it, as in the eager step: the registered
        # parameters and those of modules that ran without being registered
        self.grad_at = [i for i, t in enumerate(leaves) if t.requires_grad]
        self.requires = tuple(t.requires_grad for t in leaves)
        self.graph, self.used, checks = self._trace(call, leaves)
        self.reached_at = [i for i, u in zip(self.grad_at, self.used, strict=True) if u]
        placed = [(fn, _positions(leaves, tensors, required)) for fn, tensors, required in checks]
        self.checks = [(fn, positions) for fn, positions in placed if positions is not None]
        if len(self.checks) < len(placed) and not any(required for *_, required in checks):
            warnings.warn(
                "compile=True: Pyro's support check of an observed value computed inside the "
                "step (a reshape or a subset of an argument) cannot run on later calls: a "
                "batch of values outside the support will not be refused. Observe the "
                "argument itself, check the data yourself, or use compile='networks'",
                RuntimeWarning,
                stacklevel=5,
            )
        _check_constants(self.graph)
        self._verify(call, leaves)
        self.compiled = self.graph if self.options.get("backend") == "eager" else None

    # -- what the step touches
    def _explore(self, call):
        """Run the eager step once, leaving no trace (random state and statistics put
        back, no gradient kept): the names of the parameters it registers and the modules
        that ran. The estimator's one-time probes and caches happen here, outside the
        graph."""
        model, guide, args, kwargs = call
        state = rng_state()
        try:
            with kept_buffers() as ran, poutine.block(hide_types=["param"]):
                with poutine.trace(param_only=True) as params:
                    differentiable_loss(self.estimator, model, guide, *args, **kwargs)
            host_random = random.getstate() != state["python"] or not _same_numpy(state)
        finally:
            set_rng_state(state)
        if host_random:
            raise ConfigError(
                "compile=True: the step draws from Python's or NumPy's random generator, "
                "whose draws a graph would fix at their first values; draw with torch "
                "(torch.randperm, torch.multinomial ...), or use compile='networks'"
            )
        modules = list(ran)
        names = [n for n, s in params.trace.nodes.items() if s["type"] == "param"]
        return names, modules

    def _sources(self, tensors) -> list[torch.Tensor]:
        """The tensors the graph reads, in input order: the store's parameters by name,
        the modules' parameters and buffers, the arguments (with repeats)."""
        store = pyro.get_param_store()._params
        found = [store.get(n) for n in self.names]
        if any(t is None for t in found):
            return None
        for m in self.modules:
            found += [p for p in m._parameters.values() if p is not None]
            found += [b for b in m._buffers.values() if b is not None]
        return found + list(tensors)

    def _module_state(self) -> tuple:
        """The plain settings of the pair's objects and of each module that ran (train/eval
        mode, batch norm's momentum ...; those they had at the capture, and whether they
        still have them): what the graph fixed about them. (Which parameters take a
        gradient is compared on the inputs, :meth:`inputs`.)"""
        objects = (*self.owners, *self.modules)
        return tuple(
            tuple(_frozen(_attributes(o).get(k, _MISSING)) for k in keys)
            for o, keys in zip(objects, self.plain, strict=True)
        )

    def inputs(self, tensors):
        """This call's input tensors, or None when the store or the modules changed in a
        way the graph cannot follow (a fresh capture is then made)."""
        if self._module_state() != self.state:
            return None
        sources = self._sources(tensors)
        if sources is None or _pattern(sources) != self.pattern:
            return None
        leaves = _unique(sources)
        if tuple(t.requires_grad for t in leaves) != self.requires:  # frozen or unfrozen
            return None
        return leaves

    # -- capture and check
    def _trace(self, call, leaves):
        model, guide, args, kwargs = call
        grad_leaves = [leaves[i] for i in self.grad_at]

        used = []  # which of grad_leaves the loss reaches

        def recorded(*inputs):  # inputs are ``leaves`` themselves: make_fx keeps their identity
            loss = differentiable_loss(self.estimator, model, guide, *args, **kwargs)
            grads = torch.autograd.grad(loss, grad_leaves, allow_unused=True)
            used[:] = [g is not None for g in grads]
            return (loss.detach(), *[g for g in grads if g is not None])

        saved, buffers = rng_state(), _saved_buffers(self.modules)
        try:
            validate = is_validation_enabled()
            with capture_scope() as checks, _host_reads_as_tensors(), _DeferSupport(validate):
                with pyro.validation_enabled(False), poutine.block(hide_types=["param"]):
                    graph = make_fx(recorded)(*leaves)
        except RuntimeError as e:
            if "_local_scalar_dense" not in str(e) and "data-dependent" not in str(e):
                raise
            raise ConfigError(
                f"compile=True cannot capture this step: {_where(e)} reads a tensor's value "
                "on the host (.item(), bool(tensor), if tensor: ...), which a captured graph "
                "cannot repeat; use compile='networks' (the networks compiled, Pyro eager) "
                "or no compile"
            ) from e
        finally:
            set_rng_state(saved)
            _restore(self.modules, buffers)
        return graph, used, list(checks)

    def _verify(self, call, leaves) -> None:
        """The uncompiled graph against the eager step on the same draws: loss, gradients
        and buffers must agree."""
        model, guide, args, kwargs = call
        saved, buffers = rng_state(), _saved_buffers(self.modules)
        try:
            with poutine.block(hide_types=["param"]):
                loss = differentiable_loss(self.estimator, model, guide, *args, **kwargs)
            grads = torch.autograd.grad(loss, [leaves[i] for i in self.grad_at], allow_unused=True)
            eager = [loss.detach(), *[g for g in grads if g is not None]]
            eager_buffers = _saved_buffers(self.modules)
            set_rng_state(saved)
            _restore(self.modules, buffers)
            with torch.no_grad():
                captured = list(self.graph(*leaves))
            captured_buffers = _saved_buffers(self.modules)
        finally:
            set_rng_state(saved)
            _restore(self.modules, buffers)
        reached = [g is not None for g in grads]
        if reached != self.used:
            raise ConfigError(
                "compile=True: the captured step reaches other parameters than the eager "
                "step; the pair's structure changes from call to call. Use "
                "compile='networks' or no compile"
            )
        names = ["the loss"] + [f"the gradient of input {i}" for i in self.reached_at]
        pairs = [
            *zip(names, eager, captured, strict=True),
            *(("a buffer", a, b) for a, b in zip(eager_buffers, captured_buffers, strict=True)),
        ]
        for what, a, b in pairs:
            if a.shape != b.shape or not _close(a, b):
                raise ConfigError(
                    f"compile=True: the captured step differs from the eager step on the "
                    f"same draws ({what}): the pair or estimator depends on Python state the "
                    "graph fixed at capture. Use compile='networks' or no compile"
                )

    # -- a step
    def run(self, inputs):
        for check, positions in self.checks:
            check(*(inputs[i] for i in positions))  # the data checks, eagerly
        with validation_kept():
            if self.compiled is None:
                self.compiled = torch.compile(self.graph, **eager_draws(self.options))
            with torch.no_grad():
                outputs = self.compiled(*inputs)
        _announce(self.names)
        return outputs[0], [inputs[i] for i in self.reached_at], list(outputs[1:])


def _announce(names) -> None:
    """Send the ``param`` messages of the step's registrations, so that ``SVI``'s
    parameter capture (and any handler around the call) sees what the eager step shows."""
    if not am_i_wrapped():
        return
    store = pyro.get_param_store()
    for name in names:
        param = store._params[name]
        if _stored_as_is(store, name, param):
            apply_stack(_param_message(name, param))
        else:
            pyro.param(name)


class _DeferSupport(Messenger):
    """Pyro's validation of an observed value against its distribution's support, which
    the graph cannot do, deferred to each call (when validation is on): for values that
    are arguments and supports that do not depend on the distribution's parameters."""

    def __init__(self, validate: bool):
        super().__init__()
        self.validate = validate

    def _postprocess_message(self, msg) -> None:
        if not self.validate or msg["type"] != "sample" or not msg["is_observed"]:
            return
        support = msg["fn"].support
        base = getattr(support, "base_constraint", support)
        if not isinstance(msg["value"], torch.Tensor) or constraints.is_dependent(base):
            return
        check = functools.partial(_check_support, msg["name"], support)
        defer_check(check, msg["value"], required=False)


def _check_support(name, support, value) -> None:
    if not bool(support.check(value).all()):
        raise ValueError(
            f"observed site {name!r}: a value lies outside the support of its distribution "
            f"({support}); Pyro's validation refuses it in the eager step"
        )


@contextlib.contextmanager
def _host_reads_as_tensors():
    saved = [(m, m.torch_item, m.warn_if_nan) for m in _HOST_READS]
    try:
        for m in _HOST_READS:
            m.torch_item = _detached
            m.warn_if_nan = _unchanged
        yield
    finally:
        for m, item, warn in saved:
            m.torch_item, m.warn_if_nan = item, warn


def _detached(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _unchanged(value, *args, **kwargs):
    return value


def _where(error: BaseException) -> str:
    """The innermost frame of the failing read outside torch: ``file:line (function)``."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "the step"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({f.name})"


def _unique(items) -> list:
    seen, out = set(), []
    for t in items:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _pattern(sources) -> tuple | None:
    """Which sources are the same tensor: the first position of each one's identity."""
    if sources is None:
        return None
    first: dict[int, int] = {}
    return tuple(first.setdefault(id(t), i) for i, t in enumerate(sources))


_MISSING = object()  # a module setting deleted since the capture


def _attributes(obj) -> dict:
    """An object's instance attributes (none for one without ``__dict__``)."""
    return getattr(obj, "__dict__", {})


def _plain(value) -> bool:
    """A setting the graph may have read: a number, string ... or a list or tuple of them."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return _by_value(value)


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _positions(leaves, tensors, required: bool) -> list[int] | None:
    """Where ``tensors`` are among the graph's inputs; None for an optional check on a
    tensor computed inside the step (a required one is refused)."""
    where = {id(t): i for i, t in enumerate(leaves)}
    if all(id(t) in where for t in tensors):
        return [where[id(t)] for t in tensors]
    if not required:
        return None
    raise ConfigError(
        "compile=True: a data check of the pair ran on a tensor computed inside the step, "
        "not on an argument; pass the data as an argument of the model and guide"
    )


def _check_constants(graph) -> None:
    """Refuse a graph that reads a tensor from outside its inputs (an attribute or a
    closure of the pair): the graph would keep that tensor object, so replacing it (a new
    value each step) would go unseen. Tensors the step builds from Python numbers
    (``torch.tensor(0.5)``) are copied into the graph, and are fine."""
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(graph, node.target)
        fresh = all(user.target is torch.ops.aten.lift_fresh_copy.default for user in node.users)
        if isinstance(value, torch.Tensor) and not fresh:
            raise ConfigError(
                "compile=True: the step reads a tensor of shape "
                f"{tuple(value.shape)} that is neither an argument, a parameter Pyro "
                "registers, nor a parameter or buffer of a module that ran (an attribute or "
                "a closure of the pair, or a handler around the call such as a "
                "LatentWeight or poutine.mask holding a tensor); a captured graph would keep "
                "that very tensor. Pass it as an argument (with_kl_weight passes the KL "
                "weight so), register it as a module buffer, or use compile='networks'"
            )


def _same_numpy(state) -> bool:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    saved = state["numpy"]
    return bool(np.array_equal(keys, saved[1].numpy().astype(np.uint32))) and pos == saved[2]


def _buffers(modules):
    return [b for m in modules for b in m._buffers.values() if b is not None]


def _saved_buffers(modules) -> list[torch.Tensor]:
    return [b.detach().clone() for b in _buffers(modules)]


def _restore(modules, saved) -> None:
    with torch.no_grad():
        for b, old in zip(_buffers(modules), saved, strict=True):
            b.copy_(old)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return bool((a == b).all())
    return bool(((a - b).abs() <= TOLERANCE * (1 + a.abs().max())).all())
