"""``LadderVAE``: the networks of a hierarchical VAE with its Pyro ``model`` and ``guide``."""

from __future__ import annotations

import itertools

import pyro
import torch
from pyro.params import param_with_module_name
from torch import nn

from ._util import eval_mode
from .config import LadderConfig
from .errors import DataError
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

    def model(self, x: torch.Tensor) -> None:
        """Pyro model ``p(z_L) prod p(z_i | z_{i+1}) p(x | z_1)`` for ``x (B, x_dim)``."""
        self.check_data(x)
        pyro.module(f"{self.pyro_name}.generative", self.generative)
        self.generative.model(x)

    def guide(self, x: torch.Tensor) -> None:
        """Pyro guide ``q(z | x)`` matching :meth:`model`, for ``x (B, x_dim)``."""
        pyro.module(f"{self.pyro_name}.inference", self.inference)
        if self.config.inference == "top-down":  # the merge uses the model's prior nets
            self._register_priors()
        self.inference.guide(x, self.generative)

    def _register_priors(self) -> None:
        """Register the prior networks under the names the model gives them, so the guide's
        trace lists exactly the parameters it shares (not the unused likelihood net) and
        each tensor keeps one name (Pyro's JIT needs that)."""
        prefix = f"{self.pyro_name}.generative"
        for name, param in self.generative.priors.named_parameters():
            pyro.param(param_with_module_name(prefix, f"priors.{name}"), param)

    def check_data(self, x: torch.Tensor) -> None:
        """Raise :class:`DataError` if ``x`` does not suit this model (shape, support)."""
        if torch.jit.is_tracing():  # data were checked on the first, untraced call
            return
        if x.dim() != 2 or x.shape[-1] != self.config.x_dim:
            raise DataError(
                f"data of shape {tuple(x.shape)} do not fit a model of x_dim="
                f"{self.config.x_dim}: pass a (batch, {self.config.x_dim}) tensor, or build "
                f"the model with x_dim={x.shape[-1]}"
            )
        self.generative.likelihood.check(x)

    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """Pixel means of ``p(x | z_1)`` for ``num`` draws from the prior: ``(num, x_dim)``.

        Runs the networks in evaluation mode (batch norm running statistics).
        """
        with eval_mode(self):
            device = next(self.parameters()).device
            z = self.generative.top_prior(torch.empty(0, device=device)).sample((num,))
            for i in range(self.depth - 1, 0, -1):
                loc, scale = self.generative.prior(i, z)
                z = torch.normal(loc, scale)  # (num, k_i)
            lik = self.generative.likelihood
            return lik.mean(lik(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel means of ``p(x | z_1)`` with ``z ~ q(z | x)``: ``(B, x_dim) -> (B, x_dim)``."""
        with eval_mode(self):
            trace = pyro.poutine.trace(self.guide).get_trace(x)
            lik = self.generative.likelihood
            return lik.mean(lik(trace.nodes["z1"]["value"]))
