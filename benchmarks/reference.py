r"""A hand-written PyTorch Ladder VAE: the limit the library's speed is measured against.

The same networks as :class:`pyro_ladder.LadderVAE` with ``inference="top-down"`` and the
Bernoulli likelihood, and the same estimators, written without Pyro:

* ``elbo``: one draw per data point, ``-(log p(x, z) - log q(z | x))`` summed over the batch
  (Pyro's ``Trace_ELBO`` for a fully reparameterized guide);
* ``iwae``: ``K`` vectorized draws, ``-sum_b [logsumexp_k log w_kb - log K]`` (Pyro's
  ``RenyiELBO(alpha=0)``);
* ``iwae-dreg``: the IWAE value; the doubly reparameterized gradient (Tucker et al. 2019)
  for the inference network's own parameters and the plain IWAE gradient for every
  generative parameter, prior networks included (the library's default ``shared="iwae"``);
* :meth:`ReferenceLadder.log_likelihood`: ``log (1/K) sum_k w_k`` per data point, the ``K``
  draws taken in chunks, in evaluation mode, under ``torch.inference_mode``.

Parameter names equal the library's ``state_dict`` keys, so
``ReferenceLadder.from_library(vae)`` computes the very function ``vae`` does; noise is
drawn in the library's order (``z_L`` first, one ``normal_`` call per layer), so the same
seed gives the same draws. ``tests/test_benchmarks.py`` checks losses and gradients agree.

The Bernoulli log-likelihood is torch's ``-binary_cross_entropy_with_logits``, what a user
writes. The library scores it with another formula, which vectorizes on a CPU
(:class:`pyro_ladder.likelihoods.Bernoulli`); ``bernoulli="library"`` gives the reference
that formula too, so that the library's own machinery can be measured apart from it
(``python -m benchmarks --reference-bernoulli library``).

DReG in one pass: write ``log w = log p(x, z) - log q(z | x)`` with the bottom-up heads
*detached inside the density* of ``q`` while the samples ``z`` stay live. The heads hold
every parameter of the inference network and none of the generative one, so for a
generative parameter this ``log w`` has the ordinary IWAE gradient, and for an inference
parameter its gradient is the path term alone,
``sum_l d log w / d z_l . d z_l / d phi`` (the conditional's dependence on ``z_{l+1}``
through the prior networks is kept, as the library's derivation requires). One forward
pass and two backward passes (weights ``w_bar`` for the generative parameters,
``w_bar^2`` for the inference ones) give the whole estimator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _MLP(nn.Module):
    """``(Linear -> [BatchNorm] -> LeakyReLU) x 2`` on ``(..., d_in) -> (..., hidden)``."""

    def __init__(self, d_in, hidden, batch_norm, slope):
        super().__init__()
        layers = []
        for width in (d_in, hidden):
            layers += [nn.Linear(width, hidden)]
            layers += [nn.BatchNorm1d(hidden)] if batch_norm else []
            layers += [nn.LeakyReLU(slope)]
        self.net = nn.Sequential(*layers)

    def forward(self, h):
        lead = h.shape[:-1]
        out = self.net(h.reshape(-1, h.shape[-1]))  # (prod(lead), hidden)
        return out.reshape(*lead, out.shape[-1])


class _Head(nn.Module):
    """``(loc, sqrt(softplus(var) + floor))`` from features ``(..., hidden)``."""

    def __init__(self, hidden, k, var_floor):
        super().__init__()
        self.loc = nn.Linear(hidden, k)
        self.var = nn.Linear(hidden, k)
        self.var_floor = var_floor

    def forward(self, d):
        return self.loc(d), (F.softplus(self.var(d)) + self.var_floor).sqrt()


class _Block(nn.Module):
    def __init__(self, d_in, hidden, k, batch_norm, slope, var_floor):
        super().__init__()
        self.mlp = _MLP(d_in, hidden, batch_norm, slope)
        self.head = _Head(hidden, k, var_floor)

    def forward(self, z):
        return self.head(self.mlp(z))


class _BernoulliOut(nn.Module):
    def __init__(self, k, hidden, x_dim, batch_norm, slope):
        super().__init__()
        self.mlp = _MLP(k, hidden, batch_norm, slope)
        self.logits = nn.Linear(hidden, x_dim)

    def forward(self, z1):
        return self.logits(self.mlp(z1))  # (..., x_dim)


class _Generative(nn.Module):
    def __init__(self, x_dim, latent, hidden, batch_norm, slope, var_floor):
        super().__init__()
        self.priors = nn.ModuleList(  # priors[i - 1]: p(z_i | z_{i+1})
            _Block(latent[i], hidden[i - 1], latent[i - 1], batch_norm, slope, var_floor)
            for i in range(1, len(latent))
        )
        self.likelihood = _BernoulliOut(latent[0], hidden[0], x_dim, batch_norm, slope)


class _Inference(nn.Module):
    def __init__(self, x_dim, latent, hidden, batch_norm, slope, var_floor):
        super().__init__()
        inputs = (x_dim, *hidden[:-1])
        self.blocks = nn.ModuleList(
            _MLP(d, h, batch_norm, slope) for d, h in zip(inputs, hidden, strict=True)
        )
        self.heads = nn.ModuleList(
            _Head(h, k, var_floor) for h, k in zip(hidden, latent, strict=True)
        )

    def upward(self, x):
        """``[(mu_hat_n, sigma_hat_n)]`` for n = 1..L, each ``(B, k_n)``."""
        out, d = [], x
        for block, head in zip(self.blocks, self.heads, strict=True):
            d = block(d)  # (B, h_n)
            out.append(head(d))
        return out


def _normal_log_prob(z, loc, scale):
    """``sum_j log N(z_j; loc_j, scale_j^2)`` over the last dimension: ``(..., k) -> (...)``."""
    return (-0.5 * ((z - loc) / scale).square() - scale.log() - _HALF_LOG_2PI).sum(-1)


def _merge(loc_p, scale_p, loc_q, scale_q):
    """Precision-weighted product of two Gaussians (Sonderby et al. 2016, eq. 19-20)."""
    var_p, var_q = scale_p.square(), scale_q.square()
    total = var_p + var_q
    return (loc_q * var_p + loc_p * var_q) / total, (var_p * var_q / total).sqrt()


def _noise(like, shape):
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_()


def _torch_bernoulli(logits, x):
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")


def _library_bernoulli(logits, x):
    from pyro_ladder.likelihoods import _BernoulliNLL

    return -_BernoulliNLL.apply(logits, x)


BERNOULLI = {"torch": _torch_bernoulli, "library": _library_bernoulli}  # log p(x | logits)


class ReferenceLadder(nn.Module):
    """Plain-PyTorch top-down Ladder VAE with a Bernoulli likelihood.

    :param x_dim: pixels.
    :param latent_dims: sizes of ``z1 .. zL``.
    :param hidden_dims: MLP widths, one per layer.
    :param bernoulli: ``"torch"`` (torch's log-density) or ``"library"`` (module docs).
    """

    def __init__(
        self, x_dim, latent_dims, hidden_dims, batch_norm=True, slope=0.1, var_floor=1e-4,
        bernoulli="torch",
    ):  # fmt: skip
        super().__init__()
        if bernoulli not in BERNOULLI:
            raise ValueError(f"bernoulli must be one of {sorted(BERNOULLI)}, got {bernoulli!r}")
        self.bernoulli = bernoulli
        args = (x_dim, tuple(latent_dims), tuple(hidden_dims), batch_norm, slope, var_floor)
        self.generative = _Generative(*args)
        self.inference = _Inference(*args)
        self.depth = len(latent_dims)

    @classmethod
    def from_library(cls, vae, bernoulli="torch") -> ReferenceLadder:
        """A reference with the sizes and current weights of a library ``LadderVAE``;
        ``bernoulli``: whose Bernoulli log-density (module docs)."""
        c = vae.config
        if c.inference != "top-down" or c.likelihood != "bernoulli":
            raise ValueError("the reference implements the top-down Bernoulli ladder only")
        ref = cls(
            c.x_dim, c.latent_dims, c.hidden_dims, c.batch_norm, c.leaky_slope, c.var_floor,
            bernoulli,
        )  # fmt: skip
        ref.load_state_dict(vae.state_dict())
        p = next(vae.parameters())
        return ref.to(dtype=p.dtype, device=p.device).train(vae.training)

    def log_joint(self, x, particles=None, detach_heads=False):
        """Draw ``z ~ q(z | x)`` top-down; return ``(log p(x, z), log q(z | x))``.

        :param x: ``(B, x_dim)`` binary data.
        :param particles: ``None`` for one draw (results ``(B,)``), else ``K`` draws
            (results ``(K, B)``).
        :param detach_heads: use detached bottom-up heads inside ``log q`` (for DReG).
        """
        heads = self.inference.upward(x)
        dens = [(m.detach(), s.detach()) for m, s in heads] if detach_heads else heads
        lead = (x.shape[0],) if particles is None else (particles, x.shape[0])
        loc, scale = heads[-1]
        z = loc + scale * _noise(x, (*lead, loc.shape[-1]))  # (..., B, k_L)
        log_q = _normal_log_prob(z, *dens[-1])
        log_p = (-0.5 * z.square() - _HALF_LOG_2PI).sum(-1)
        for i in range(self.depth - 1, 0, -1):
            loc_p, scale_p = self.generative.priors[i - 1](z)  # (..., B, k_i) each
            loc, scale = _merge(loc_p, scale_p, *heads[i - 1])
            z = loc + scale * _noise(x, loc.shape)
            log_q = log_q + _normal_log_prob(z, *_merge(loc_p, scale_p, *dens[i - 1]))
            log_p = log_p + _normal_log_prob(z, loc_p, scale_p)
        logits = self.generative.likelihood(z)  # (..., B, x_dim)
        log_px = BERNOULLI[self.bernoulli](logits, x)  # (..., B, x_dim)
        return log_p + log_px.sum(-1), log_q

    def elbo_loss(self, x):
        """``-sum_b (log p(x_b, z_b) - log q(z_b | x_b))``, one draw; differentiable."""
        log_p, log_q = self.log_joint(x)
        return -(log_p - log_q).sum()

    def iwae_loss(self, x, k):
        """``-sum_b [logsumexp_k log w_kb - log K]``; differentiable (IWAE gradient)."""
        log_p, log_q = self.log_joint(x, k)
        return -((log_p - log_q).logsumexp(0) - math.log(k)).sum()

    def dreg_backward(self, x, k) -> float:
        """Accumulate the ``iwae-dreg`` gradient into ``.grad``; return the IWAE loss."""
        log_p, log_q = self.log_joint(x, k, detach_heads=True)
        log_w = log_p - log_q  # (K, B)
        w_bar = log_w.detach().softmax(0)
        guide = [p for p in self.inference.parameters() if p.requires_grad]
        model = [p for p in self.generative.parameters() if p.requires_grad]
        dreg = torch.autograd.grad(-(w_bar.square() * log_w).sum(), guide, retain_graph=True)
        torch.autograd.backward(-(w_bar * log_w).sum(), inputs=model)
        for param, grad in zip(guide, dreg, strict=True):
            param.grad = grad if param.grad is None else param.grad + grad
        return -(log_w.detach().logsumexp(0) - math.log(k)).sum().item()

    def backward(self, x, estimator="elbo", k=1) -> float:
        """Gradients of ``estimator`` (``elbo``, ``iwae``, ``iwae-dreg``) into ``.grad``;
        returns the loss."""
        if estimator == "iwae-dreg":
            return self.dreg_backward(x, k)
        value = self.elbo_loss(x) if estimator == "elbo" else self.iwae_loss(x, k)
        value.backward()
        return value.item()

    def train_step(self, optimizer, x, estimator="elbo", k=1) -> float:
        """One optimizer step of ``estimator`` (``elbo``, ``iwae``, ``iwae-dreg``)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.backward(x, estimator, k)
        optimizer.step()
        return loss

    def log_likelihood(self, data, num_samples, batch_size=100, max_rows=2**12):
        """``log (1/K) sum_k w_k`` per row of ``data (N, x_dim)``: ``(N,)``, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return torch.cat(
                    [
                        self._batch_log_likelihood(data[i : i + batch_size], num_samples, max_rows)
                        for i in range(0, len(data), batch_size)
                    ]
                )
        finally:
            self.train(was_training)

    def _batch_log_likelihood(self, x, num_samples, max_rows):
        chunk = max(1, min(num_samples, max_rows // x.shape[0]))
        total = None
        for start in range(0, num_samples, chunk):
            log_p, log_q = self.log_joint(x, min(chunk, num_samples - start))
            lse = (log_p - log_q).logsumexp(0)  # (B,)
            total = lse if total is None else torch.logaddexp(total, lse)
        return total - math.log(num_samples)
