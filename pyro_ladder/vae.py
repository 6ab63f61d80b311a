"""``LadderVAE``: the networks of a hierarchical VAE with its Pyro ``model`` and ``guide``."""

from __future__ import annotations

import functools
import itertools

import pyro
import torch
from torch import nn

from ._capture import defer_check
from ._params import register_module
from ._util import eval_mode
from .condition import as_condition, unpack
from .config import LadderConfig
from .errors import ConfigError, DataError
from .guide import INFERENCE
from .model import Generative

_instances = itertools.count()


class LadderVAE(nn.Module):
    """A Ladder VAE (``inference="top-down"``) or a bottom-up hierarchical VAE.

    ``vae.model(x)`` and ``vae.guide(x)`` are an ordinary Pyro model/guide pair: sites
    ``z{L}`` .. ``z1`` and ``x``, all inside ``pyro.plate("data", B)``, so any estimator of
    :func:`pyro_ladder.make_elbo` trains it and :func:`pyro_ladder.evaluate` scores it.

    Each instance registers its networks with Pyro under its own name, so two models in one
    session never share parameters through Pyro's global parameter store.

    :param x_dim: features of ``x``.
    :param latent_dims: sizes of ``z1 .. zL`` (``z1`` next to the data).
    :param hidden_dims: MLP widths, one per stochastic layer.
    :param likelihood: ``"bernoulli"`` or ``"gaussian"``.
    :param inference: ``"top-down"`` (the ladder) or ``"bottom-up"``.
    :param batch_norm: batch norm in every MLP.
    :param condition_dim: ``C > 0`` makes the model conditional, ``p(z | c) p(x | z, c)``
        with guide ``q(z | x, c)``: ``c`` (a one-hot class label of ``C`` classes, or any
        ``C``-vector) enters the top prior and every network. Give ``model``/``guide``
        ``x`` with ``c``, or ``x' = (x, c)`` packed by :func:`pyro_ladder.condition.pack`.
    :param options: further :class:`~pyro_ladder.config.LadderConfig` fields.
    """

    def __init__(
        self,
        x_dim: int,
        latent_dims=(64, 32, 16, 8, 4),
        hidden_dims=(512, 256, 128, 64, 32),
        likelihood: str = "bernoulli",
        inference: str = "top-down",
        batch_norm: bool = True,
        condition_dim: int = 0,
        **options,
    ):
        super().__init__()
        values = dict(
            x_dim=x_dim,
            latent_dims=latent_dims,
            hidden_dims=hidden_dims,
            likelihood=likelihood,
            inference=inference,
            batch_norm=batch_norm,
            condition_dim=condition_dim,
            **options,
        )
        self.config = LadderConfig.from_dict(values)
        self.generative = Generative(self.config)
        self.inference = INFERENCE[self.config.inference](self.config)
        self.pyro_name = f"ladder{next(_instances)}"

    @classmethod
    def from_config(cls, config: LadderConfig) -> LadderVAE:
        """Build the networks described by ``config``."""
        return cls(**config.to_dict())

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def condition_dim(self) -> int:
        """``C``, the size of the condition ``c``; 0 for an unconditional model."""
        return self.config.condition_dim

    def model(self, x: torch.Tensor, c=None) -> None:
        """Pyro model ``p(z_L) prod p(z_i | z_{i+1}) p(x | z_1)`` for ``x (B, x_dim)``.

        A conditional model scores ``p(z | c) p(x | z, c)``: pass ``c`` (integer labels
        ``(B,)`` or a float ``(B, C)``), or ``x' = (x, c)`` alone as one ``(B, x_dim + C)``
        tensor made by :func:`pyro_ladder.condition.pack` (what ``fit`` and ``evaluate`` batch).
        """
        x, c = self._checked(x, c)
        register_module(f"{self.pyro_name}.generative", self.generative)
        self.generative.model(x, c)

    def guide(self, x: torch.Tensor, c=None) -> None:
        """Pyro guide ``q(z | x[, c])`` matching :meth:`model`, with the same arguments."""
        x, c = self.split(x, c)
        register_module(f"{self.pyro_name}.inference", self.inference)
        if self.config.inference == "top-down":  # the merge uses the model's prior nets
            self._register_priors()
        self.inference.guide(x, self.generative, c)

    def _register_priors(self) -> None:
        """Register the prior networks under the names the model gives them, so the guide's
        trace lists exactly the parameters it shares (not the unused likelihood net) and
        each tensor keeps one name (Pyro's JIT needs that)."""
        register_module(f"{self.pyro_name}.generative", self.generative.priors, "priors.")

    def split(self, x: torch.Tensor, c=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x (B, x_dim), c (B, C) or None)`` from the arguments of :meth:`model`.

        Checks shapes only; :meth:`check_data` also checks the values.
        """
        D, C = self.config.x_dim, self.condition_dim
        if x.dim() != 2:
            raise DataError(f"data must be a (batch, features) tensor, got shape {tuple(x.shape)}")
        if C == 0:
            if c is not None:
                raise DataError(
                    "this model is unconditional but got a condition c: drop c, or build a "
                    "conditional model with condition_dim=C (e.g. the number of classes)"
                )
            if x.shape[-1] != D:
                raise DataError(
                    f"data of shape {tuple(x.shape)} do not fit a model of x_dim={D}: pass a "
                    f"(batch, {D}) tensor, or build the model with x_dim={x.shape[-1]}"
                )
            return x, None
        if c is None:
            if x.shape[-1] != D + C:
                raise DataError(
                    f"this conditional model (x_dim={D}, condition_dim={C}) takes x (batch, "
                    f"{D}) with c, or x' = (x, c) of shape (batch, {D + C}) from "
                    f"pyro_ladder.condition.pack; got shape {tuple(x.shape)} and no c"
                )
            return unpack(x, D)
        if x.shape[-1] != D:
            raise DataError(
                f"data of shape {tuple(x.shape)} do not fit a model of x_dim={D}: pass x of "
                f"shape (batch, {D}) with c"
            )
        return x, as_condition(c, x.shape[0], C, x)

    def check_data(self, x: torch.Tensor, c=None) -> None:
        """Raise :class:`DataError` if ``x`` (and ``c``) do not suit this model (shape,
        support, finite values); takes the arguments of :meth:`model`."""
        self._checked(x, c)

    def _checked(self, x, c):
        if torch.jit.is_tracing():  # the values were checked on the first, untraced call
            return self.split(x, c)
        # a captured step (compile=True) runs the value checks on each call's data, eagerly
        if c is None or isinstance(c, torch.Tensor):
            defer_check(self._check_values, *((x,) if c is None else (x, c)))
        else:  # a Python label: a captured step keys on its value
            defer_check(functools.partial(self._check_values, c=c), x)
        return self.split(x, c)

    def _check_values(self, x, c=None):
        x, c = self.split(x, c)
        self.generative.likelihood.check(x)
        if c is not None and not torch.isfinite(c).all():
            raise DataError("the condition c holds NaN or infinite values: clean those rows")

    @torch.no_grad()
    def sample(self, num: int, c=None) -> torch.Tensor:
        """Pixel means of ``p(x | z_1)`` for ``num`` draws from the prior: ``(num, x_dim)``.

        A conditional model needs ``c``: one integer label for every draw, labels
        ``(num,)``, or a float ``(num, C)``; e.g. ``vae.sample(10, torch.arange(10))`` draws
        one image of each of 10 classes. Runs the networks in evaluation mode (batch norm
        running statistics).
        """
        with eval_mode(self):
            like = next(self.parameters()).new_empty(0)
            if c is None and self.condition_dim:
                raise ConfigError(
                    f"this model is conditional (condition_dim={self.condition_dim}): pass the "
                    "classes to draw, e.g. vae.sample(8, c=3) or vae.sample(10, torch.arange(10))"
                )
            if c is not None and not self.condition_dim:
                raise ConfigError("this model is unconditional: call sample(num) without c")
            if c is None:
                z = self.generative.top_prior(like).sample((num,))
            else:
                c = as_condition(c, num, self.condition_dim, like)  # (num, C)
                z = self.generative.top_prior(like, c).sample()
            for i in range(self.depth - 1, 0, -1):
                loc, scale = self.generative.prior(i, z, c)
                z = torch.normal(loc, scale)  # (num, k_i)
            return self.generative.likelihood.mean(self.generative.observation(z, c))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, c=None) -> torch.Tensor:
        """Pixel means of ``p(x | z_1[, c])`` with ``z ~ q(z | x[, c])``: ``(B, x_dim)``;
        takes the arguments of :meth:`model`."""
        x, c = self.split(x, c)
        with eval_mode(self):
            trace = pyro.poutine.trace(self.guide).get_trace(x, c)
            z1 = trace.nodes["z1"]["value"]
            return self.generative.likelihood.mean(self.generative.observation(z1, c))
