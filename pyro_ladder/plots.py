"""Figures: image grids of samples and reconstructions, training curves."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

from . import likelihoods
from ._util import atomic_write


def image_grid(
    images: torch.Tensor,
    image_shape: tuple[int, int],
    ncols: int | None = None,
    title: str | None = None,
    row_labels: list[str] | None = None,
    ink: bool | None = None,
):
    """A matplotlib figure showing ``images (N, H*W)`` as a grid of grey ``(H, W)`` tiles.

    Pixel values are read on ``[0, 1]``. Two ways to draw them:

    - as published (``ink=False``): 0 black, 1 white, how grey photographs and MNIST are
      stored, so a face keeps its dark eyes;
    - ink on paper (``ink=True``): 0 white, 1 black, the usual look of binary digits.

    :param row_labels: a label at the left of each row (e.g. the class drawn in that row).
    :param ink: ``None`` (default) chooses from ``images``: ink on paper when every value is
        0 or 1 (binary data), as published otherwise. Pixel means of a Bernoulli model are
        not binary, so a caller drawing samples or reconstructions of a binary data set
        passes ``ink=True`` to match the data's look (see :func:`is_binary`).
    """
    images = images.detach().cpu().reshape(-1, *image_shape)  # (N, H, W)
    if ink is None:
        ink = is_binary(images)
    n = images.shape[0]
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    h, w = image_shape
    canvas = torch.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1), float("nan"))  # gutters
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = images[i]
    fig, ax = plt.subplots(figsize=(ncols * w / 12 + 0.5, nrows * h / 12 + 0.5))
    cmap = matplotlib.colormaps["gray_r" if ink else "gray"]
    cmap = cmap.with_extremes(bad="#c8d3e0")  # NaN gutters: pale blue, unlike either end
    ax.imshow(canvas.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    _label_rows(ax, row_labels, h)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if title:
        _fit_title(fig, ax, title)
    return fig


def _fit_title(fig, ax, title: str) -> None:
    """Wrap ``ax``'s title onto as many lines as the figure's width needs: a grid a few
    tiles wide is narrower than a one-line title, which would be clipped at both edges.
    Each try measures the drawn title and lays the figure out again."""
    renderer = fig.canvas.get_renderer()
    chars = len(title)
    while chars > 1:
        box = ax.title.get_window_extent(renderer)  # pixels
        if box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height:
            return
        chars = min(chars - 1, int(chars * 0.95 * fig.bbox.width / box.width))
        ax.set_title(textwrap.fill(title, max(chars, 1)))
        fig.tight_layout()


def is_binary(images: torch.Tensor) -> bool:
    """Whether every value of ``images`` (any shape) is exactly 0 or 1: binary data, which
    :func:`image_grid` draws as ink on paper by default."""
    return likelihoods.is_binary(images)


def _label_rows(ax, row_labels: list[str] | None, h: int) -> None:
    """No axes at all, or only the row labels at the left (tiles are ``h`` pixels high)."""
    if row_labels is None:
        ax.set_axis_off()
        return
    ax.set_xticks([])
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(len(row_labels))], row_labels)
    ax.tick_params(left=False)
    for spine in ax.spines.values():
        spine.set_visible(False)


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` at ``path`` in the format its suffix names (PNG without one), close it.

    The file is written whole or not at all (a temporary file renamed into place).
    """
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format=fmt))
    finally:
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


def kl_per_unit_figure(kl_units: dict, active: dict | None = None, threshold: float = 0.01):
    """The paper's view: log KL per unit, units sorted, one panel per latent layer.

    :param kl_units: ``{site: (k,)}`` from :func:`pyro_ladder.diagnostics.kl_per_unit`.
    :param active: optional ``{site: {"active": n, ...}}`` from ``active_units``.
    """
    sites = sorted(kl_units, key=_layer_index)
    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=True):
        values = kl_units[site].detach().cpu().sort(descending=True).values.clamp_min(1e-6)
        ax.bar(range(len(values)), values.numpy(), color="tab:blue")
        ax.axhline(threshold, color="grey", lw=0.8, ls="--")
        ax.set(yscale="log", xlabel="unit (sorted)", ylim=(1e-5, None))
        title = f"{site}: {values.sum():.2f} nats"
        if active is not None:
            title += f", {active[site]['active']}/{active[site]['units']} active"
        ax.set_title(title, fontsize=9)
    axes[0, 0].set_ylabel("KL per unit (nats)")
    fig.tight_layout()
    return fig


def pca_figure(latents: dict, labels=None, title: str | None = None):
    """2-D PCA (scikit-learn) of posterior samples of each layer, coloured by class label.

    :param latents: ``{site: (N, k)}`` samples, one per data point; or, to show several
        models side by side (say the VAE above the LVAE), ``{model_name: {site: (N, k)}}``,
        one row per model.
    :param labels: ``(N,)`` integer labels, or None for one colour.
    """
    from sklearn.decomposition import PCA

    rows = latents if all(isinstance(v, dict) for v in latents.values()) else {"": latents}
    ncols = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(3.2 * ncols, 3.2 * len(rows)), squeeze=False
    )
    colours = None if labels is None else labels.detach().cpu().numpy()
    for ax_row, (name, layers) in zip(axes, rows.items(), strict=True):
        sites = sorted(layers, key=_layer_index)
        for ax in ax_row[len(sites) :]:
            ax.axis("off")
        for ax, site in zip(ax_row, sites, strict=False):
            z = layers[site].detach().cpu().numpy()
            if colours is not None and len(z) != len(colours):
                raise ValueError(f"{site}: {len(z)} samples but {len(colours)} labels")
            points = PCA(n_components=min(2, z.shape[1])).fit_transform(z)
            ys = points[:, 1] if points.shape[1] > 1 else points[:, 0] * 0
            colour = {} if colours is None else {"c": colours, "cmap": "tab10", "vmin": 0}
            if colours is not None:
                colour["vmax"] = max(9, int(colours.max()))
            ax.scatter(points[:, 0], ys, s=4, alpha=0.7, **colour)
            ax.set_title(f"{name}: {site}" if name else site, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _layer_index(site: str) -> int:
    digits = "".join(ch for ch in site if ch.isdigit())
    return int(digits) if digits else 0
