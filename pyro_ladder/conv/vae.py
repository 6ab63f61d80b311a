"""``ConvLadderVAE``: a convolutional hierarchical VAE with its Pyro ``model`` and ``guide``."""

from __future__ import annotations

import itertools

import pyro
import torch
from pyro.params import param_with_module_name
from torch import nn

from .._capture import defer_check
from .._util import eval_mode
from ..errors import DataError
from .config import ConvLadderConfig
from .guide import CONV_INFERENCE
from .model import ConvGenerative

_instances = itertools.count()


class ConvLadderVAE(nn.Module):
    """A convolutional Ladder VAE (``inference="top-down"``) or bottom-up hierarchical VAE.

    ``vae.model(x)`` and ``vae.guide(x)`` take flat images ``x (B, H * W)``, as
    :class:`~pyro_ladder.vae.LadderVAE` does, and keep its site contract: ``z{L}`` ..
    ``z1`` sampled top-down in the model, then ``x``, all inside ``pyro.plate("data", B)``;
    the latents are spatial, ``z_i`` of event shape ``(k_i, h_i, w_i)``
    (``dist.Normal(loc, scale).to_event(3)``). So every estimator of
    :func:`pyro_ladder.make_elbo` trains it and :func:`pyro_ladder.evaluate` scores it.

    Each instance registers its networks with Pyro under its own name.

    :param options: :class:`~pyro_ladder.conv.config.ConvLadderConfig` fields, e.g.
        ``image_shape=(28, 28), channels=(32, 64, 64), latent_channels=(8, 8, 8)``.
    """

    def __init__(self, **options):
        super().__init__()
        self.config = ConvLadderConfig.from_dict(options)
        self.generative = ConvGenerative(self.config)
        self.inference = CONV_INFERENCE[self.config.inference](self.config)
        self.pyro_name = f"convladder{next(_instances)}"

    @classmethod
    def from_config(cls, config: ConvLadderConfig) -> ConvLadderVAE:
        """Build the networks described by ``config``."""
        return cls(**config.to_dict())

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def condition_dim(self) -> int:
        """0: this model is unconditional (the run layer asks every model)."""
        return 0

    def split(self, x: torch.Tensor, c=None) -> tuple[torch.Tensor, None]:
        """``(x, None)`` after the shape check, as :meth:`LadderVAE.split` for
        unconditional data; a condition ``c`` is refused."""
        if c is not None:
            raise DataError("the convolutional ladder is unconditional: call it without c")
        self._check_shape(x)
        return x, None

    def model(self, x: torch.Tensor) -> None:
        """Pyro model ``p(z_L) prod p(z_i | z_{>i}) p(x | z)`` for flat ``x (B, H * W)``."""
        self.check_data(x)
        pyro.module(f"{self.pyro_name}.generative", self.generative)
        self.generative.model(x)

    def guide(self, x: torch.Tensor) -> None:
        """Pyro guide ``q(z | x)`` matching :meth:`model`."""
        self._check_shape(x)
        pyro.module(f"{self.pyro_name}.inference", self.inference)
        if self.config.inference == "top-down":  # the merge uses the model's prior nets
            self._register_priors()
        self.inference.guide(x, self.generative)

    def _register_priors(self) -> None:
        """Register the prior networks under the model's names, so the guide's trace lists
        exactly the parameters it shares (not the likelihood net) and each tensor keeps
        one name (Pyro's JIT needs that)."""
        prefix = f"{self.pyro_name}.generative"
        for name, param in self.generative.priors.named_parameters():
            pyro.param(param_with_module_name(prefix, f"priors.{name}"), param)

    def _check_shape(self, x: torch.Tensor) -> None:
        D, (H, W) = self.config.x_dim, self.config.image_shape
        if x.dim() != 2 or x.shape[-1] != D:
            raise DataError(
                f"data of shape {tuple(x.shape)} do not fit a convolutional model of "
                f"{H}x{W} images: pass flat images of shape (batch, {D}), or build the "
                f"model with the image_shape of your data"
            )

    def check_data(self, x: torch.Tensor, c=None) -> None:
        """Raise :class:`DataError` if ``x`` does not suit this model (shape, support,
        finite values) or a condition ``c`` is given."""
        self.split(x, c)
        if not torch.jit.is_tracing():  # the values were checked on the first, untraced call
            # a captured step (compile=True) runs the check on each call's data, eagerly
            defer_check(self.generative.likelihood.check, x)

    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """Pixel means of ``p(x | z)`` for ``num`` draws from the prior: ``(num, H * W)``.

        Runs the networks in evaluation mode (batch norm running statistics).
        """
        with eval_mode(self):
            like = next(self.parameters()).new_empty(0)
            z, h = self.generative.top_prior(like).sample((num,)), None  # (num, k_L, r_L)
            for i in range(self.depth - 1, 0, -1):
                loc, scale, h = self.generative.prior(i, z, h)
                z = torch.normal(loc, scale)  # (num, k_i, r_i)
            likelihood = self.generative.likelihood
            return likelihood.mean(likelihood(z, h))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel means of ``p(x | z)`` with ``z ~ q(z | x)``: ``(B, H * W)``.

        The model's deterministic skip state is recomputed from the guide's ``z`` by
        replaying the model on them.
        """
        self._check_shape(x)
        with eval_mode(self):
            guide_trace = pyro.poutine.trace(self.guide).get_trace(x)
            model = pyro.poutine.replay(self.generative.model, trace=guide_trace)
            model_trace = pyro.poutine.trace(model).get_trace(x)
            return self.generative.likelihood.mean(model_trace.nodes["x"]["fn"])
