"""Figures: image grids of samples and reconstructions, training curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch


def image_grid(
    images: torch.Tensor,
    image_shape: tuple[int, int],
    ncols: int | None = None,
    title: str | None = None,
):
    """A matplotlib figure showing ``images (N, H*W)`` as a grid of grey ``(H, W)`` tiles."""
    images = images.detach().cpu().reshape(-1, *image_shape)  # (N, H, W)
    n = images.shape[0]
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    h, w = image_shape
    canvas = torch.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1), float("nan"))  # gutters
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = images[i]
    fig, ax = plt.subplots(figsize=(ncols * w / 12 + 0.5, nrows * h / 12 + 0.5))
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="#c8d3e0")  # NaN gutters: pale blue
    ax.imshow(canvas.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` and close it."""
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curves(history: list[dict]):
    """Loss per epoch (and monitored ELBO and per-site KL when present) from ``fit``'s history."""
    epochs = [r["epoch"] for r in history]
    kl_keys = sorted({k for r in history for k in r if k.startswith("kl_") and k != "kl_weight"})
    fig, axes = plt.subplots(
        1, 2 if kl_keys else 1, figsize=(10 if kl_keys else 5, 3.5), squeeze=False
    )
    ax = axes[0, 0]
    ax.plot(epochs, [r["loss"] for r in history], label="training loss")
    if "monitor_elbo" in history[0]:
        ax.plot(epochs, [-r["monitor_elbo"] for r in history], label="held-out -ELBO")
    ax.set(xlabel="epoch", ylabel="nats per example")
    ax.legend()
    if kl_keys:
        ax = axes[0, 1]
        for key in kl_keys:
            ax.plot(epochs, [r[key] for r in history], label=key[3:])
        ax.set(xlabel="epoch", ylabel="KL (nats per example)", yscale="log")
        ax.legend()
    fig.tight_layout()
    return fig
