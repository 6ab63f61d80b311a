"""``pyro.module`` with the same messages at a lower fixed cost per step.

Every step registers each parameter of the ladder with Pyro (118 on the paper's network:
the guide's networks, the prior networks it shares with the model, the model's networks). Pyro's
``pyro.param`` looks each one up in the parameter store and builds its constrained value
through ``transform_to(constraint)``; for a tensor the store already holds under that name,
unconstrained, the answer is the tensor itself. :func:`register_module` sends the same
``param`` message through the same handler stack (so ``poutine.trace``, ``block``,
``SVI``'s parameter capture and any user handler see what they would see) and skips only
that lookup. Anything else (a first registration, another tensor stored under the name, a
constrained parameter, no handler running) goes through ``pyro.param`` itself.

Within one estimator call (its :class:`~pyro_ladder._memo.ReuseOutputs` scope), a pass
that replays another's trace (the model of one particle, replaying its guide) does not
send again a registration that trace holds, as long as only recording handlers stand
between the scope and it (Pyro's traces and replay, plates, a KL warm-up:
:func:`_replayed_trace`). The ladder's guide registers the prior networks it shares with
the model, and the model would register them again: 48 of the 166 messages on the paper's
network, about 0.4 ms a step. Every handler outside the call (``SVI``'s parameter capture
included) sees each parameter once, and steps it, and each particle's pair of traces still
holds every registration (Pyro's ``Trace_ELBO`` differentiates a particle only if one of
its two traces holds a parameter); only the model's own trace lacks the repeated sites. A
handler a user puts around one side of the pair (``poutine.scale``, ``scope``, ``block``
...) may act on what it sees, so that side's registrations are then sent in full; a pass
of the model on its own (``poutine.trace(vae.model)``) registers every network.

Evaluation's passes run the pair inside :class:`RegisterOnce`: while it is the innermost
handler, each module's registration is sent once per scope (one batch of
:func:`~pyro_ladder.evaluate`), through every handler as usual; a second one would put
nothing new in the store, and ``register_module`` ignores the value a handler answers
(the module computes with its own parameters). ``pyro.param`` calls of a user's pair are
never held back, so a handler around the call (``poutine.substitute``) still sets them.
"""

from __future__ import annotations

import warnings
import weakref

import pyro
from pyro.distributions import constraints
from pyro.params import param_with_module_name
from pyro.poutine.messenger import Messenger
from pyro.poutine.plate_messenger import PlateMessenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK, Message, am_i_wrapped, apply_stack
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn

from ._memo import ReuseOutputs
from .warmup import LatentWeight


def register_module(name: str, module: nn.Module, prefix: str = "") -> None:
    """``pyro.module(name, module)``: register every parameter of ``module`` that requires
    a gradient as ``name.prefix<its name>`` (``prefix``: the path of a submodule, so that it
    is registered under the names its parent gives it), and warn, as Pyro does, about the
    others of a module in training mode."""
    scope = _PYRO_STACK[-1] if _PYRO_STACK else None
    if isinstance(scope, RegisterOnce) and scope.seen(name, module, prefix):
        return
    store = pyro.get_param_store()
    wrapped = am_i_wrapped()
    replayed = _replayed_trace() if wrapped else None
    for param_name, param in module.named_parameters(prefix.rstrip(".")):
        if not param.requires_grad:
            if module.training:
                warnings.warn(
                    f"{param_name} was not registered in the param store because "
                    "requires_grad=False. You can silence this warning by calling "
                    "my_module.train(False)",
                    stacklevel=3,
                )
            continue
        full = param_with_module_name(name, param_name)
        if wrapped and _stored_as_is(store, full, param):
            if replayed is not None:
                site = replayed.nodes.get(full)
                if site is not None and site["type"] == "param" and site["value"] is param:
                    continue  # the guide's pass that this one replays registered it
            apply_stack(_param_message(full, param))
        else:
            pyro.param(full, param)


class RegisterOnce(Messenger):
    """A registration (:func:`register_module`) of a module that this scope has seen
    already is not sent again while the scope is the innermost handler: the store holds
    what the first one put there, and every handler saw the first. For passes that read
    sample sites only: one scope per batch of :func:`~pyro_ladder.evaluate`. It handles no
    message itself; ``pyro.param`` is never held back."""

    def __init__(self):
        super().__init__()
        self._seen = {}  # (name, prefix, id(module)) -> module, kept so the id stays its own

    def _process_message(self, msg) -> None:
        pass

    def _postprocess_message(self, msg) -> None:
        pass

    def seen(self, name: str, module: nn.Module, prefix: str) -> bool:
        """Was ``module`` registered under ``name``/``prefix`` in this scope? Records it."""
        key = (name, prefix, id(module))
        if key in self._seen:
            return True
        self._seen[key] = module
        return False


class SentAlready(RegisterOnce):
    """Module registrations (:func:`register_module`) are not sent while this is the
    innermost handler: for a pass that repeats, within one estimator call, a pass that
    sent them all, and whose ``param`` messages no handler outside would see (the
    fixed-sample passes of :mod:`pyro_ladder.elbo.weighted`, run under
    ``poutine.block(hide_types=["param"])``). ``pyro.param`` is never held back."""

    def seen(self, name: str, module: nn.Module, prefix: str) -> bool:
        return True


# handlers that record or replay a pass and do nothing to a ``param`` message: between an
# estimator call's scope and a registration, only these may stand for it to be left out
_RECORDING = (TraceMessenger, ReplayMessenger, PlateMessenger, pyro.plate, LatentWeight)


def _replayed_trace():
    """The trace that the pass running replays, inside an estimator call (the model of one
    particle, replaying its guide's trace), where every handler between the call's
    :class:`~pyro_ladder._memo.ReuseOutputs` scope and here only records or replays
    (Pyro's traces and replay without parameters, plates, a KL warm-up). A registration
    that trace holds (the same tensor under the same name) went through every handler
    below the scope already, ``SVI``'s parameter capture included, and the particle's
    pair of traces holds it: it is not sent again. ``None`` otherwise."""
    replayed = None
    for messenger in reversed(_PYRO_STACK):
        kind = type(messenger)
        if kind is ReuseOutputs:
            return replayed
        if kind not in _RECORDING:
            return None
        if kind is ReplayMessenger:
            if messenger.params is not None or replayed is not None:
                return None
            replayed = messenger.trace
    return None


def _stored_as_is(store, name: str, param) -> bool:
    """The store holds ``param`` itself under ``name``, unconstrained: its constrained
    value is ``param``."""
    return store._params.get(name) is param and store._constraints.get(name) is constraints.real


def _param_message(name: str, param) -> Message:
    """The message ``pyro.param(name, param)`` sends, answering with ``param``."""
    return Message(
        type="param",
        name=name,
        fn=_as_stored,
        is_observed=False,
        args=(name, param),
        kwargs={"constraint": constraints.real, "event_dim": None},
        value=None,
        scale=1.0,
        mask=None,
        cond_indep_stack=(),
        done=False,
        stop=False,
        continuation=None,
        infer={},
    )


def _as_stored(name, param, constraint=constraints.real, event_dim=None):
    """The store's constrained value of an unconstrained ``param`` it holds: ``param``,
    with the back-reference the store's ``__getitem__`` sets."""
    param.unconstrained = weakref.ref(param)
    return param
