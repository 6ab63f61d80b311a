"""Observation models ``p(x | z_1)``: a network head that returns a Pyro distribution."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from ._compile import network_call
from .errors import ConfigError, DataError
from .layers import MLP, GaussianBlock


class Bernoulli(dist.Bernoulli):
    """``pyro.distributions.Bernoulli`` whose ``log_prob``, given logits, is computed as
    ``-(relu(l) - x l + log(1 + exp(-|l|)))``, which vectorizes on a CPU.

    torch's own (``-binary_cross_entropy_with_logits``) goes through ``log_sigmoid``, whose
    ``log1p`` runs one value at a time on a CPU: on the (204, 20, 784) chunks of an
    evaluation at K = 5000, 34 against 9 ms forward, 36 against 15 ms forward and backward
    (one thread, ``python -m benchmarks.bernoulli``; ``docs/performance.md``). The formula
    is the same function: for 0/1 data ``relu(l) - x l`` is exact, and ``log`` of
    ``1 + exp(-|l|)`` in place of ``log1p`` adds at most the rounding of ``1 + exp(-|l|)``,
    6e-8 in float32 and 1e-16 in float64, to each value (against float64 truth over logits
    in [-40, 40], the largest float32 error is 5.4e-7, torch's own 4.8e-7). The gradient is
    ``sigmoid(l) - x`` per value, as torch's. Everything else (sampling, ``probs``,
    ``expand``, enumeration, the name in a rendered model) is Pyro's; a distribution built
    from ``probs`` is scored as Pyro scores it. Logits and values are scored in their
    common dtype, at least float32 (half-precision logits under ``torch.autocast`` are
    scored as torch's own scores them there, in float32). The tests compare density and
    gradients with Pyro's in float64, and under autocast with torch's in bfloat16.
    """

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        logits = self.__dict__.get("logits")
        if logits is None or logits is not self._param:  # built from probs: torch's own
            return super().log_prob(value)
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=logits.dtype, device=logits.device)
        # at least float32, as torch's own under autocast: in half precision 1 + exp(-|l|)
        # rounds to 1 for every confident pixel (2**-9 in bfloat16), which would raise the
        # log-likelihood by tenths of a nat per image
        dtype = torch.promote_types(torch.result_type(logits, value), torch.float32)
        return -_BernoulliNLL.apply(logits.to(dtype), value.to(dtype))


class _BernoulliNLL(torch.autograd.Function):
    """``softplus(l) - x l`` elementwise, broadcast, as ``relu(l) - x l + log(1 + exp(-|l|))``;
    backward ``sigmoid(l) - x`` (and ``-l`` for ``x``), with differentiable operations, so
    a second derivative works too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, value):
        out = logits.clamp(min=0) - logits * value  # exact for 0/1 values
        return out.add_(logits.abs().neg_().exp_().add_(1).log_())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        logits, value = ctx.saved_tensors
        grad_logits = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_logits = (grad * (logits.sigmoid() - value)).sum_to_size(logits.shape)
        if ctx.needs_input_grad[1]:
            grad_value = (-grad * logits).sum_to_size(value.shape)
        return grad_logits, grad_value


class BernoulliLikelihood(nn.Module):
    """``p(x | z_1) = Bernoulli(logits = Linear(MLP(z_1)))`` for binary pixels.

    Shape contract: ``z1 (..., z_dim) -> Bernoulli`` with batch shape ``(...)`` and event
    shape ``(x_dim,)``; use it as ``pyro.sample("x", likelihood(z1), obs=x)``.

    :param z_dim: size of ``z_1``.
    :param hidden_dim: units of the MLP.
    :param x_dim: pixels of ``x``.
    :param batch_norm: batch norm in the MLP.
    :param slope: negative slope of the leaky ReLU.
    :param var_floor: unused; accepted so that every likelihood takes the same arguments.
    """

    def __init__(self, z_dim, hidden_dim, x_dim, batch_norm=True, slope=0.1, var_floor=1e-4):
        super().__init__()
        self.mlp = MLP(z_dim, hidden_dim, batch_norm, slope)
        self.logits = nn.Linear(hidden_dim, x_dim)

    def forward(self, z1: torch.Tensor, validate_args: bool | None = None) -> dist.Distribution:
        """``validate_args=False`` skips Pyro's checks of the logits and of the observed
        values, for callers that checked the data with :meth:`check` already."""
        logits = network_call(self, self._logits, z1)  # (..., x_dim); compiled in a scope
        return Bernoulli(logits=logits, validate_args=validate_args).to_event(1)

    def _logits(self, z1: torch.Tensor) -> torch.Tensor:
        return self.logits(self.mlp(z1))

    @staticmethod
    def mean(d: dist.Distribution) -> torch.Tensor:
        """Pixel means ``(..., x_dim)`` of a distribution returned by :meth:`forward`."""
        return d.base_dist.probs

    @staticmethod
    def check(x: torch.Tensor) -> None:
        """Raise :class:`DataError` unless every value is 0 or 1."""
        if not is_binary(x):
            _check_finite(x)  # NaN and infinity get their own message
            raise DataError(
                "the Bernoulli likelihood needs binary data (0/1) but got other values: "
                "binarize grey images (fit(..., binarize=True), the CLI does it for grey data "
                "sets) or use the Gaussian likelihood (argument `likelihood` gaussian)"
            )


class GaussianLikelihood(nn.Module):
    """``p(x | z_1) = Normal(Linear(d), sqrt(Softplus(Linear(d)) + floor))``, ``d = MLP(z_1)``.

    For continuous data; the log-likelihood is then a density in nats. Shape contract and
    arguments as :class:`BernoulliLikelihood`; ``var_floor`` is the smallest variance.
    """

    def __init__(self, z_dim, hidden_dim, x_dim, batch_norm=True, slope=0.1, var_floor=1e-4):
        super().__init__()
        self.net = GaussianBlock(z_dim, hidden_dim, x_dim, batch_norm, slope, var_floor)

    def forward(self, z1: torch.Tensor, validate_args: bool | None = None) -> dist.Distribution:
        """``validate_args`` as in :meth:`BernoulliLikelihood.forward`."""
        loc, scale = self.net(z1)  # (..., x_dim) each
        return dist.Normal(loc, scale, validate_args=validate_args).to_event(1)

    @staticmethod
    def mean(d: dist.Distribution) -> torch.Tensor:
        return d.base_dist.loc

    @staticmethod
    def check(x: torch.Tensor) -> None:
        """Raise :class:`DataError` if a value is NaN or infinite."""
        _check_finite(x)


def is_binary(x: torch.Tensor) -> bool:
    """Is every value of ``x`` 0 or 1? For floating point ``x - x * x`` (one fused pass,
    ``addcmul``, then ``any``): it is 0 exactly at 0 and 1, and nonzero or NaN at every
    other value, NaN and infinities included (``x * x`` rounds to ``x`` only at 0 and 1;
    where it underflows the difference is ``x``). Half the time of ``(x == 0) | (x == 1)``
    on a training batch, which every step checks."""
    if x.is_floating_point():
        return not bool(torch.addcmul(x, x, x, value=-1).any())
    return bool(((x == 0) | (x == 1)).all())


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(-1).nonzero().flatten()[:5].tolist()
        raise DataError(
            f"the data hold NaN or infinite values (rows {bad}...): clean or drop those rows"
        )


LIKELIHOODS = {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}


def make_likelihood(name: str, z_dim, hidden_dim, x_dim, **kwargs) -> nn.Module:
    """The observation model called ``name`` (``"bernoulli"`` or ``"gaussian"``)."""
    if name not in LIKELIHOODS:
        raise ConfigError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name](z_dim, hidden_dim, x_dim, **kwargs)
