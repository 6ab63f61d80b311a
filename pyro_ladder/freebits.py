r"""Free bits (Kingma et al. 2016): a KL floor per latent layer, as a Pyro handler.

With the floor ``lambda_l`` of layer ``l`` the objective is

.. math::

    \tilde{\mathcal{L}} = \sum_b \mathbb{E}_q[\log p(x_b | z)]
        - B \sum_l \max(\lambda_l, \mathrm{KL}_l), \qquad
    \mathrm{KL}_l = \frac{1}{B} \sum_{b=1}^{B}
        \left[\log q(z_{l,b} | \cdot) - \log p(z_{l,b} | \cdot)\right],

where ``KL_l`` is the Monte Carlo KL of site ``z_l`` at the drawn sample, averaged over
the ``B`` data points of the minibatch (the ``plate("data")`` at ``dim=-1``), in nats
for the whole layer; with vectorized particles each particle has its own ``KL_l`` and
its own max. While ``KL_l < lambda_l`` the layer's term is the constant
``-B lambda_l``: its gradient is zero and nothing pushes the layer towards the prior.

With ``groups = G`` (Kingma et al.'s groups of latent units) the units of every floored
site are split, along its first event dimension (the channels of a ``(C, H, W)`` latent,
the units of a ``(k,)`` one), into ``G`` contiguous groups ``g`` of equal size, each with
its own Monte Carlo ``KL_{l,g}`` and floor: the layer's term is
``-B sum_g max(lambda_l, KL_{l,g})``.

:class:`FreeBits` implements this as ``max(lambda, KL) = KL + relu(lambda - KL)``: it adds
``-relu(lambda_l - KL_l)`` to the model's ``log p(z_{l,b})`` of every data point, so the
usual term ``-B KL_l`` becomes ``-B max(lambda_l, KL_l)`` exactly, for any estimator that
scores the model site by its ``log_prob`` (``Trace_ELBO``; ``TraceMeanField_ELBO`` then
falls back to the Monte Carlo KL for a floored site). The importance-weighted estimators
would fold the shift inside their log-mean-exp, which is not free bits: use it with the
ELBO estimators.

References
----------
[1] D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever, M. Welling,
    "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016,
    appendix C ("free bits").
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent

from .errors import ConfigError


class FreeBits(Messenger):
    """Floor each latent layer's batch-mean KL at ``lambda_l`` nats (see the module).

    Enter it *around* the estimator call, so that it sees the guide's distribution of a
    site and, in the model, the value the estimator replays there::

        with FreeBits(0.5):
            svi.step(x)

    The guide runs first (as in every Pyro estimator) and the handler records
    ``q(z_l | .)``; at the model's site it computes ``KL_l`` and shifts ``log p``.

    :param floor: ``lambda`` in nats for every latent site, or ``{site: lambda}`` for
        some sites (the others are left alone); per group when ``groups > 1``.
    :param groups: ``G``, groups of channels (units) per site, each floored on its own.
    """

    def __init__(self, floor: float | dict[str, float], groups: int = 1):
        super().__init__()
        if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
            raise ConfigError(f"free-bits groups must be an integer >= 1, got {groups!r}")
        self.groups = int(groups)
        floors = floor if isinstance(floor, dict) else None
        for value in floors.values() if floors is not None else (floor,):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"a free-bits floor must be a number >= 0 (nats), got {value!r}")
        self.floor = floor
        self._guide_fns: dict = {}

    def _floor_of(self, name: str) -> float | None:
        if isinstance(self.floor, dict):
            return self.floor.get(name)
        return self.floor

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
            return
        lam = self._floor_of(msg["name"])
        if lam is None:
            return
        if msg["value"] is None:  # the guide draws this site: remember q
            self._guide_fns[msg["name"]] = msg["fn"]
        elif msg["name"] in self._guide_fns:  # the model, replaying the guide's value
            msg["fn"] = _floored(msg, self._guide_fns[msg["name"]], lam, self.groups)


def _floored(msg, q, lam: float, groups: int) -> TorchDistribution:
    """The model's ``p`` with ``-sum_g relu(lambda - KL_g)`` added to every ``log p(z_b)``."""
    if not any(frame.dim == -1 for frame in msg["cond_indep_stack"]):
        raise ConfigError(
            f"free bits average the KL of site {msg['name']!r} over the data plate at "
            "dim=-1; sample it inside pyro.plate('data', B, dim=-1)"
        )
    p, z = msg["fn"], msg["value"]
    kl = _group_kl(q, p, z, groups, msg["name"])  # (..., B, G): per data point and group
    batch_kl = kl.mean(-2, keepdim=True)  # (..., 1, G): KL_{l,g} per particle
    return _Shifted(p, -F.relu(lam - batch_kl).sum(-1))  # shift (..., 1)


def _group_kl(q, p, z: torch.Tensor, groups: int, name: str) -> torch.Tensor:
    """``log q(z) - log p(z)`` per data point and group of units: ``(..., B, G)``."""
    if groups == 1:
        return (q.log_prob(z) - p.log_prob(z)).unsqueeze(-1)
    event = p.event_shape
    per_unit = all(isinstance(d, Independent) and d.base_dist.event_shape == () for d in (q, p))
    if not per_unit or len(event) == 0 or event[0] % groups:
        raise ConfigError(
            f"free bits with groups={groups} split the first event dimension of site "
            f"{name!r} into equal groups of units: it needs a per-unit Normal(...).to_event(n) "
            f"whose first event size divides by {groups}, got event shape {tuple(event)}"
        )
    kl = q.base_dist.log_prob(z) - p.base_dist.log_prob(z)  # (..., B, *event)
    kl = kl.flatten(-len(event))  # (..., B, units), channel-major
    return kl.reshape(*kl.shape[:-1], groups, -1).sum(-1)  # (..., B, G)


class _Shifted(TorchDistribution):
    """``base`` with ``shift`` added to its ``log_prob``; samples are ``base``'s."""

    arg_constraints: dict = {}

    def __init__(self, base: TorchDistribution, shift: torch.Tensor):
        self.base, self.shift = base, shift
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    @property
    def has_rsample(self) -> bool:
        return self.base.has_rsample

    def sample(self, sample_shape=()):
        return self.base.sample(sample_shape)

    def rsample(self, sample_shape=()):
        return self.base.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value) + self.shift
