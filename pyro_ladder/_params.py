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

Within one estimator call (its :class:`~pyro_ladder._memo.ReuseOutputs` scope), a
parameter that an earlier pass of the call sent under the same name is not sent again,
as long as only recording handlers stand between the scope and the registration (Pyro's
traces and replay, plates, a KL warm-up: :func:`_call_scope`). The ladder's guide
registers the prior networks it shares with the model, and the model, replaying the
guide's samples, would register them again: 48 of the 166 messages on the paper's
network, about 0.4 ms a step. Every handler outside the call (``SVI``'s parameter capture
included) sees each parameter once, and it steps them all; the model's own trace of that
call lacks the repeated sites, which no Pyro estimator reads. A handler a user puts
around one side of the pair (``poutine.scale``, ``scope``, ``block`` ...) may act on what
it sees, so that side's registrations are then sent in full; a pass of the model on its
own (``poutine.trace(vae.model)``) registers every network.

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
    call = _call_scope() if wrapped else None
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
            if call is not None:
                if call.registered.get(full) is param:
                    continue  # sent earlier in this call, through the same handlers
                call.registered[full] = param
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
# estimator call's scope and a registration, only these may stand for it to be sent once
_RECORDING = (TraceMessenger, ReplayMessenger, PlateMessenger, pyro.plate, LatentWeight)


def _call_scope():
    """The :class:`~pyro_ladder._memo.ReuseOutputs` scope of the estimator call running
    (one loss: its guide and model passes), where every handler above it only records or
    replays (Pyro's traces and replay, plates, a KL warm-up's weight): then a registration
    sent in an earlier pass of the call reached every handler that this one would reach,
    and is not sent again. ``None`` otherwise (each pass sends its own)."""
    for messenger in reversed(_PYRO_STACK):
        if type(messenger) is ReuseOutputs:
            return messenger
        if type(messenger) not in _RECORDING:
            return None
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
