"""Seed 004's figures for the toy hierarchy: the data's joint, a learned model's joint,
conditional marginals ``p(x | c)`` and overall marginals ``p(x_1)``, ``p(x_2)``.

Every function takes plain tensors (draws of the true process, draws of a model) and
returns a matplotlib figure; models are compared side by side, one row or line each.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch

from .data import ToyHierarchy, ToySample

_CMAP = "tab10"


def _extent(x: torch.Tensor, margin: float = 0.5) -> tuple[float, float]:
    lo, hi = x.min().item() - margin, x.max().item() + margin
    return lo, hi


def _scatter(ax, points: torch.Tensor, c: torch.Tensor, title: str, lims) -> None:
    ax.scatter(points[:, 0], points[:, 1], c=c, cmap=_CMAP, vmin=0, vmax=9, s=3, alpha=0.5)
    ax.set(title=title, xlim=lims, ylim=lims, aspect="equal", xticks=[], yticks=[])


def data_figure(sample: ToySample):
    """The true joint ``(z2, z1, x)`` coloured by ``c``: one panel per level."""
    lims = _extent(sample.x)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6))
    levels = [("z2 (coarse)", sample.z2), ("z1 (fine)", sample.z1), ("x", sample.x)]
    for ax, (name, value) in zip(axes, levels, strict=True):
        _scatter(ax, value, sample.c, f"data: {name}", lims)
    fig.suptitle("the toy hierarchy c -> z2 -> z1 -> x (colour: c)")
    fig.tight_layout()
    return fig


def joint_figure(draws: dict, c: torch.Tensor, data: ToySample):
    """Each model's joint: learned ``z2``, ``z1`` and ``x`` draws coloured by ``c``.

    :param draws: ``{model_name: {"z2": (N, k), "z1": (N, k) or (N,) categories,
        "x": (N, 2)}}`` for classes ``c (N,)``, e.g. from ``pair.generate(c)``.
    :param data: draws of the true process, for the axes and the grey backdrop of ``x``.
    """
    lims = _extent(data.x)
    fig, axes = plt.subplots(len(draws), 3, figsize=(10.5, 3.4 * len(draws)), squeeze=False)
    for row, (name, d) in zip(axes, draws.items(), strict=True):
        z2 = d["z2"][:, :2]
        _scatter(row[0], z2, c, f"{name}: z2", _extent(z2))
        if d["z1"].dim() == 1:
            _category_bars(row[1], d["z1"], c, f"{name}: z1 draws by class")
        else:
            _scatter(row[1], d["z1"][:, :2], c, f"{name}: z1", _extent(d["z1"][:, :2]))
        row[2].scatter(data.x[:, 0], data.x[:, 1], s=2, color="0.85")
        _scatter(row[2], d["x"], c, f"{name}: x (data in grey)", lims)
    fig.tight_layout()
    return fig


def _category_bars(ax, z1: torch.Tensor, c: torch.Tensor, title: str) -> None:
    """Stacked bars: how often each category is drawn, split by class."""
    categories = int(z1.max()) + 1
    bottom = torch.zeros(categories)
    for k in c.unique().tolist():
        counts = torch.bincount(z1[c == k], minlength=categories).float()
        ax.bar(range(categories), counts, bottom=bottom, color=plt.get_cmap(_CMAP)(k))
        bottom += counts
    ax.set(title=title, xlabel="z1", ylabel="draws")


def conditional_marginals_figure(draws: dict, c: torch.Tensor, data: ToySample, bins=80):
    """``p(x | c)`` as 2-D histograms: one column per class, the data on the first row and
    each model's draws below."""
    classes = data.c.unique().tolist()
    rows = {"data": (data.x, data.c), **{name: (d["x"], c) for name, d in draws.items()}}
    lims = _extent(data.x)
    fig, axes = plt.subplots(
        len(rows), len(classes), figsize=(3 * len(classes), 3 * len(rows)), squeeze=False
    )
    for ax_row, (name, (x, cls)) in zip(axes, rows.items(), strict=True):
        for ax, k in zip(ax_row, classes, strict=True):
            xs = x[cls == k]
            ax.hist2d(
                xs[:, 0].numpy(), xs[:, 1].numpy(), bins=bins, range=[lims, lims], cmap="Greys"
            )
            ax.set(title=f"{name}: x | c = {k}", xticks=[], yticks=[], aspect="equal")
    fig.tight_layout()
    return fig


def marginals_figure(draws: dict, data: ToySample, truth: ToyHierarchy, bins=120):
    """Overall marginals of ``x_1`` and ``x_2``: the exact density of the true process,
    histograms of the data and of each model's draws."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    lims = _extent(data.x)
    grid = torch.linspace(*lims, 600)
    for dim, ax in enumerate(axes):
        ax.plot(grid, _true_marginal(truth, grid, dim), color="black", lw=1, label="truth")
        ax.hist(data.x[:, dim], bins=bins, range=lims, density=True, color="0.8", label="data")
        for name, d in draws.items():
            ax.hist(
                d["x"][:, dim],
                bins=bins,
                range=lims,
                density=True,
                histtype="step",
                lw=1.2,
                label=name,
            )
        ax.set(xlabel=f"x{dim + 1}", ylabel="density", title=f"marginal of x{dim + 1}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _true_marginal(truth: ToyHierarchy, grid: torch.Tensor, dim: int) -> torch.Tensor:
    """Exact density of ``x_dim``, a mixture of ``C J K`` equal 1-D Gaussians: ``(G,)``."""
    var = truth.coarse_noise**2 + truth.fine_noise**2 + truth.obs_noise**2
    means = truth.fine_centres()[..., dim].flatten()  # (C J K,)
    log_n = -0.5 * (grid[:, None] - means).square() / var - 0.5 * math.log(2 * math.pi * var)
    return (log_n.logsumexp(-1) - math.log(len(means))).exp()
