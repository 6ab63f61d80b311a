r"""Model/guide pairs for the toy hierarchy, written with the library's public blocks.

Both pairs take ``x' = (x, one_hot(c)) (B, 2 + C)`` (see :mod:`pyro_ladder.toy.data`),
sample ``z2`` then ``z1`` inside ``pyro.plate("data")`` and observe ``x``: the site
contract every estimator and diagnostic of the library relies on. The class ``c`` is an
observed input upstream of the latents (seed 004): it enters ``p(z2 | c)``,
``p(z1 | z2, c)`` and every guide network, and no term of the ELBO scores it.

* :class:`GaussianToyPair`: Gaussian ``p(z2 | c)``, ``p(z1 | z2, c)`` and ``p(x | z1)``;
  the guide is a two-level ladder: ``q(z2 | x, c)`` and ``q(z1 | z2, x, c)``, the
  precision-weighted merge of the prior ``p(z1 | z2, c)`` with a bottom-up Gaussian.
* :class:`DiscreteToyPair`: ``z1`` is categorical, ``p(z1 | z2, c) = Cat(softmax(f(z2, c)))``
  and ``p(x | z1 = k) = N(m_k, diag s_k^2)``. The guide's ``q(z1 | z2, x)`` is the
  categorical form of the ladder's merge: the prior's logits plus a bottom-up "approximate
  likelihood" ``g_k(x) = log N(x; u_k, diag v_k^2)`` per category, with its own
  parameters ``u, v`` (a product of experts adds log-probabilities). With ``u = m`` and
  ``v = s`` it is the exact conditional posterior ``p(z1 | z2, x)`` (seed 004: "use
  Bayes' rule"). Train it with ``tracegraph`` (score function, with the baseline chosen by
  ``baseline``) or ``enum`` (``z1`` summed out exactly in the guide).
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..errors import ConfigError
from ..layers import MLP, GaussianBlock, GaussianHead, broadcast_cat
from ..likelihoods import GaussianLikelihood
from ..merge import precision_weighted
from .data import unpack

_instances = itertools.count()
BASELINES = ("average", "net", None)


class _ToyPair(nn.Module):
    """Shared parts: the class-conditional top prior ``p(z2 | c)``, the guide's
    ``q(z2 | x, c)``, and registration of networks with Pyro under instance names."""

    def __init__(self, num_classes: int, latent_dim: int, hidden: int):
        super().__init__()
        C = num_classes
        self.num_classes, self.latent_dim = C, latent_dim
        self.top = GaussianHead(C, latent_dim)  # p(z2 | c): a (loc, scale) per class
        self.q2 = GaussianBlock(2 + C, hidden, latent_dim, batch_norm=False)  # q(z2 | x, c)
        self.pyro_name = f"toy{next(_instances)}"

    def _register(self, *names: str) -> None:
        """``pyro.module`` each named network; a network the guide shares with the model
        gets the model's name, so both traces hold the same parameters under one name."""
        for name in names:
            pyro.module(f"{self.pyro_name}.{name}", getattr(self, name))

    @staticmethod
    def _sample_z2(loc_scale: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        loc, scale = loc_scale  # (B, k) each
        return pyro.sample("z2", dist.Normal(loc, scale).to_event(1))  # (..., B, k)

    def _one_hot(self, c: torch.Tensor) -> torch.Tensor:
        """Classes ``c (N,)`` -> one-hot ``(N, C)`` on the device and dtype of the networks."""
        like = self.top.loc.weight
        return nn.functional.one_hot(c.to(like.device), self.num_classes).to(like.dtype)

    def _check(self, inputs: torch.Tensor) -> None:
        if inputs.dim() != 2 or inputs.shape[-1] != 2 + self.num_classes:
            raise ConfigError(
                f"toy pairs take x' = (x, one_hot(c)) of shape (B, {2 + self.num_classes}), "
                f"got {tuple(inputs.shape)}: build the data with ToyData.train_inputs"
            )


class GaussianToyPair(_ToyPair):
    """Gaussian layers throughout (see the module docstring).

    :param num_classes: ``C``.
    :param latent_dim: size of ``z2`` and ``z1``.
    :param hidden: MLP width.
    """

    def __init__(self, num_classes: int = 3, latent_dim: int = 2, hidden: int = 64):
        super().__init__(num_classes, latent_dim, hidden)
        C, k = num_classes, latent_dim
        self.prior1 = GaussianBlock(k + C, hidden, k, batch_norm=False)  # p(z1 | z2, c)
        self.likelihood = GaussianLikelihood(k, hidden, 2, batch_norm=False)  # p(x | z1)
        self.q1 = GaussianBlock(2 + C, hidden, k, batch_norm=False)  # bottom-up head for z1

    def model(self, inputs: torch.Tensor) -> None:
        """``p(z2 | c) p(z1 | z2, c) p(x | z1)`` for ``x' (B, 2 + C)``."""
        self._check(inputs)
        self._register("top", "prior1", "likelihood")
        x, c = unpack(inputs)
        with pyro.plate("data", inputs.shape[0]):
            z2 = self._sample_z2(self.top(c))
            z1 = pyro.sample("z1", dist.Normal(*self.prior1(broadcast_cat(z2, c))).to_event(1))
            pyro.sample("x", self.likelihood(z1), obs=x)

    def guide(self, inputs: torch.Tensor) -> None:
        """``q(z2 | x, c)``, then ``q(z1 | z2, x, c)`` by the ladder's merge."""
        self._check(inputs)
        self._register("q2", "q1", "prior1")
        c = unpack(inputs)[1]
        with pyro.plate("data", inputs.shape[0]):
            z2 = self._sample_z2(self.q2(inputs))
            prior = self.prior1(broadcast_cat(z2, c))  # (loc, scale), (..., B, k) each
            loc, scale = precision_weighted(*prior, *self.q1(inputs))
            pyro.sample("z1", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def generate(self, c: torch.Tensor) -> dict:
        """Ancestral draws of the model for classes ``c (N,)``: ``{"z2", "z1", "x"}``,
        each ``(N, 2)`` (``x`` drawn from ``p(x | z1)``, not its mean)."""
        onehot = self._one_hot(c)  # (N, C)
        z2 = torch.normal(*self.top(onehot))
        z1 = torch.normal(*self.prior1(torch.cat([z2, onehot], -1)))
        return {"z2": z2, "z1": z1, "x": self.likelihood(z1).sample()}


class DiscreteToyPair(_ToyPair):
    """A categorical ``z1`` layer (see the module docstring).

    :param num_classes: ``C``.
    :param latent_dim: size of ``z2``.
    :param categories: values of ``z1``.
    :param hidden: MLP width.
    :param baseline: the score-function baseline ``tracegraph`` uses at ``z1``, set
        through the site's ``infer`` dict: ``"average"`` (Pyro's decaying average of the
        downstream cost), ``"net"`` (a small network of ``(x, c, z2)``, trained by
        ``tracegraph`` to predict that cost) or None. Other estimators ignore it.
    :param baseline_beta: decay of the average baseline.
    """

    def __init__(
        self,
        num_classes: int = 3,
        latent_dim: int = 2,
        categories: int = 24,
        hidden: int = 64,
        baseline: str | None = "average",
        baseline_beta: float = 0.9,
    ):
        if baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        super().__init__(num_classes, latent_dim, hidden)
        C, k, K = num_classes, latent_dim, categories
        self.categories, self.baseline, self.baseline_beta = K, baseline, baseline_beta
        self.prior1 = nn.Sequential(MLP(k + C, hidden, False), nn.Linear(hidden, K))
        self.likelihood = GaussianHead(K, 2)  # p(x | z1 = k): row k of a table
        self.q1 = GaussianHead(K, 2)  # g_k(x): the guide's Gaussian for category k
        if baseline == "net":
            net = nn.Sequential(MLP(2 + C + k, hidden, False), nn.Linear(hidden, 1))
            self.baseline_net = _Squeeze(net)  # (..., B, 2 + C + k) -> (..., B)

    def model(self, inputs: torch.Tensor) -> None:
        """``p(z2 | c) p(z1 | z2, c) p(x | z1)`` for ``x' (B, 2 + C)``."""
        self._check(inputs)
        self._register("top", "prior1", "likelihood")
        x, c = unpack(inputs)
        with pyro.plate("data", inputs.shape[0]):
            z2 = self._sample_z2(self.top(c))
            logits = self.prior1(broadcast_cat(z2, c))  # (..., B, K)
            z1 = pyro.sample("z1", dist.Categorical(logits=logits))  # (..., B)
            pyro.sample("x", self._emission(z1), obs=x)

    def guide(self, inputs: torch.Tensor) -> None:
        """``q(z2 | x, c)``, then ``q(z1 | z2, x)`` with logits ``f(z2, c) + g(x)``."""
        self._check(inputs)
        names = ("q2", "q1", "prior1") + (("baseline_net",) if self.baseline == "net" else ())
        self._register(*names)
        x, c = unpack(inputs)
        with pyro.plate("data", inputs.shape[0]):
            z2 = self._sample_z2(self.q2(inputs))
            logits = self.prior1(broadcast_cat(z2, c)) + self._bottom_up(x)  # (..., B, K)
            infer = {"baseline": self._baseline_options(inputs, z2)}
            pyro.sample("z1", dist.Categorical(logits=logits), infer=infer)

    def _bottom_up(self, x: torch.Tensor) -> torch.Tensor:
        """``g_k(x) = log N(x; u_k, diag v_k^2)`` for every category: ``(B, 2) -> (B, K)``."""
        eye = torch.eye(self.categories, dtype=x.dtype, device=x.device)  # (K, K)
        loc, scale = self.q1(eye)  # (K, 2) each
        return dist.Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)

    @torch.no_grad()
    def init_emission(self, x: torch.Tensor, scale: float = 0.3, generator=None) -> None:
        """Start ``p(x | z1 = k)`` and the guide's ``g_k`` at ``N(x_k, scale^2 I)`` for ``K``
        random rows ``x_k`` of ``x (N, 2)``, the usual start of a mixture model: with every
        component at one place, no gradient tells the categories apart."""
        rows = torch.randperm(len(x), generator=generator)[: self.categories]
        if len(rows) < self.categories:
            raise ConfigError(f"init_emission needs at least {self.categories} rows of x")
        for head in (self.likelihood, self.q1):
            head.loc.weight.copy_(x[rows].T)  # (2, K): column k is the mean of category k
            head.loc.bias.zero_()
            var = scale**2 - head.var_floor  # softplus(v) + floor = scale^2
            head.var.weight.fill_(math.log(math.expm1(var)))
            head.var.bias.zero_()

    def _emission(self, z1: torch.Tensor) -> dist.Distribution:
        """``p(x | z1)`` for integer ``z1 (...)``, enumerated values included."""
        onehot = nn.functional.one_hot(z1, self.categories).to(self.likelihood.loc.weight.dtype)
        loc, scale = self.likelihood(onehot)  # (..., 2) each
        return dist.Normal(loc, scale).to_event(1)

    def _baseline_options(self, inputs: torch.Tensor, z2: torch.Tensor) -> dict:
        if self.baseline == "average":
            return {"use_decaying_avg_baseline": True, "baseline_beta": self.baseline_beta}
        if self.baseline == "net":
            features = broadcast_cat(inputs, z2)  # (..., B, 2 + C + k)
            return {"nn_baseline": self.baseline_net, "nn_baseline_input": features}
        return {}

    @torch.no_grad()
    def generate(self, c: torch.Tensor) -> dict:
        """Ancestral draws for classes ``c (N,)``: ``{"z2" (N, 2), "z1" (N,), "x" (N, 2)}``."""
        onehot = self._one_hot(c)  # (N, C)
        z2 = torch.normal(*self.top(onehot))
        z1 = dist.Categorical(logits=self.prior1(torch.cat([z2, onehot], -1))).sample()
        return {"z2": z2, "z1": z1, "x": self._emission(z1).sample()}


class _Squeeze(nn.Module):
    """``net(input)[..., 0]``: the baseline must have the shape of the downstream cost."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)  # (..., B)
