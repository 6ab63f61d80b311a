"""Adam for ``pyro.infer.SVI`` with one optimizer step per SVI step.

``pyro.optim.Adam`` builds one ``torch.optim.Adam`` per parameter and calls each in a Python
loop; on the paper's 5-layer network (118 parameter tensors) that loop costs about 10 ms
per step on a 2-core CPU, some 10% of an ELBO step at batch 256 (``benchmarks/``).
:class:`Adam` keeps the same per-parameter state and the same update, and steps every
parameter in one ``torch.optim.Adam.step`` call: torch's fused kernel (one pass over each
parameter's memory) on CPUs and CUDA GPUs, 4.8 against 1.9 ms on that network with one
thread; with ``{"fused": False}`` the multi-tensor loop, bit for bit ``pyro.optim.Adam``.
"""

from __future__ import annotations

import pyro
import torch
from pyro.optim import PyroOptim

from .errors import ConfigError


class Adam(PyroOptim):
    """Drop-in for ``pyro.optim.Adam``: ``SVI(model, guide, Adam({"lr": 1e-3}), elbo)``.

    The same arguments (a dict of ``torch.optim.Adam`` options, or a callable returning one
    per parameter name), the same update and the same ``get_state()`` / ``set_state()``
    format (a ``torch.optim.Adam`` state dict per parameter name), so a checkpoint moves
    between the two. The update runs in torch's fused Adam kernel where torch has one for
    the parameter's device (CPU, CUDA): the same arithmetic in one pass, equal to
    ``pyro.optim.Adam``'s to the last bit or two of each weight (float rounding of the
    fused expression). ``{"fused": False}`` (or ``{"foreach": True}``) steps with torch's
    multi-tensor loop instead, bit for bit ``pyro.optim.Adam``'s update. Parameters that
    share options share one ``torch.optim.Adam``; each call steps exactly the parameters
    it is given. The options come from the constructor: ``set_state`` restores each
    parameter's moments and step count, not saved learning rates. Gradient clipping
    (``clip_args``) is not supported: use ``pyro.optim.ClippedAdam``.

    After its step it sets the stepped parameters' gradients to ``None`` (as
    ``torch.optim.Optimizer.zero_grad`` does by default), where ``pyro.optim.Adam`` leaves
    them for ``SVI`` to overwrite with zeros: ``SVI`` then allocates nothing, and the next
    backward pass writes the gradients instead of adding them to zeros. A parameter it
    stepped before that the next loss does not reach is stepped with a zero gradient, as
    ``pyro.optim.Adam`` steps it (its momentum moves it on).
    """

    def __init__(self, optim_args, clip_args=None):
        if clip_args:
            raise ConfigError(
                "pyro_ladder.optim.Adam does not clip gradients: use pyro.optim.ClippedAdam"
            )
        super().__init__(torch.optim.Adam, optim_args)
        self._by_options = {}  # frozen options -> torch.optim.Adam
        self._owner = {}  # parameter -> its torch.optim.Adam

    def __call__(self, params, *args, **kwargs) -> None:
        """One Adam step for every parameter in ``params`` (new ones join an optimizer)."""
        present = {}
        for p in params:
            opt = self._owner.get(p) or self._adopt(p)
            present.setdefault(opt, set()).add(p)
            if p.grad is None and p in opt.state:
                # stepped before but not reached this step: pyro.optim.Adam would see the
                # zeros SVI left in its gradient and step it on its momentum; so do we
                p.grad = torch.zeros_like(p)
        for opt, group in present.items():
            _step_only(opt, group, *args, **kwargs)

    def _adopt(self, param) -> torch.optim.Adam:
        options = self._get_optim_args(param)
        key = (param.device.type, *sorted((k, _freeze(v)) for k, v in options.items()))
        opt = self._by_options.get(key)
        if opt is None:
            opt = self._by_options[key] = torch_adam([param], **options)
        else:
            opt.param_groups[0]["params"].append(param)
        self._owner[param] = opt
        name = pyro.get_param_store().param_name(param)
        saved = self._state_waiting_to_be_consumed.pop(name, None)
        if saved is not None and saved.get("state"):
            opt.state[param] = _cast_state(saved["state"][0], param)
        return opt

    def get_state(self) -> dict:
        """``{parameter name: torch.optim.Adam state dict of that parameter alone}``."""
        store = pyro.get_param_store()
        out = {}
        for param, opt in self._owner.items():
            group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            state = {0: opt.state[param]} if param in opt.state else {}
            out[store.param_name(param)] = {
                "state": state,
                "param_groups": [{**group, "params": [0]}],
            }
        return out


# devices whose fused Adam kernel torch has (since 2.4) and we have run: elsewhere (a device
# torch adds later, "meta") the multi-tensor loop, which runs wherever tensors do
FUSED_DEVICES = ("cpu", "cuda")


def torch_adam(params, **options) -> torch.optim.Adam:
    """``torch.optim.Adam(params, **options)`` with the update's kernel chosen: as given
    when ``options`` name one (``fused`` or ``foreach``; ``fused=False`` alone means the
    multi-tensor loop), else fused when every parameter is floating and on one of
    :data:`FUSED_DEVICES`, else the multi-tensor loop (the same arithmetic as torch's
    per-tensor default, in a few kernel calls for all parameters instead of about ten
    each). What ``fit``, :class:`Adam` and the Lightning module step with."""
    params = list(params)
    if options.get("fused") is False and "foreach" not in options:
        options = {**options, "foreach": True}
    elif "fused" not in options and "foreach" not in options:
        fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
        options = {**options, "fused" if fused else "foreach": True}
    return torch.optim.Adam(params, **options)


def _step_only(opt, params, *args, **kwargs) -> None:
    """``opt.step()`` for ``params`` only, whose gradients it then releases; others it holds
    keep their gradient, unused."""
    held = [p for p in opt.param_groups[0]["params"] if p not in params and p.grad is not None]
    grads = [p.grad for p in held]
    for p in held:
        p.grad = None
    try:
        opt.step(*args, **kwargs)
    finally:
        for p in params:
            p.grad = None
        for p, g in zip(held, grads, strict=True):
            p.grad = g


def _cast_state(state: dict, param) -> dict:
    """A saved per-parameter state on ``param``'s device and dtype (the step count kept),
    as ``torch.optim.Optimizer.load_state_dict`` does."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and key != "step" and value.is_floating_point():
            value = value.to(device=param.device, dtype=param.dtype)
        out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value
