"""Image grids are drawn the right way round: grey data as published (0 black, 1 white),
binary data as ink on paper unless told otherwise. Checked on the saved PNG's pixels."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from pyro_ladder.plots import image_grid, is_binary, save_figure

matplotlib.use("Agg")

H, W = 12, 12
SAVE_DPI = 100  # what save_figure writes


def _half_and_half(left: float, right: float) -> torch.Tensor:
    """One (1, H*W) image: columns left of the middle at ``left``, the rest at ``right``."""
    image = torch.full((H, W), right)
    image[:, : W // 2] = left
    return image.reshape(1, H * W)


def _halves_brightness(tmp_path, images, **kwargs) -> tuple[float, float]:
    """Draw ``images`` (one tile), save the PNG, read it back: the mean brightness (0 black,
    1 white) of the tile's left and right halves."""
    fig = image_grid(images, (H, W), **kwargs)
    fig.canvas.draw()
    box = fig.axes[0].get_images()[0].get_window_extent()  # display pixels, origin bottom left
    scale = SAVE_DPI / fig.dpi  # save_figure writes at its own dpi
    path = save_figure(fig, tmp_path / "grid.png")
    rgb = matplotlib.image.imread(path)[..., :3]  # (rows, cols, 3) in [0, 1], top row first
    brightness = rgb.mean(axis=-1)
    height = brightness.shape[0]
    top, bottom = round(height - box.y1 * scale), round(height - box.y0 * scale)
    tile = brightness[top:bottom, round(box.x0 * scale) : round(box.x1 * scale)]
    assert tile.shape[0] > H and tile.shape[1] > W  # the tile was found, each pixel several wide
    middle, margin = tile.shape[1] // 2, tile.shape[1] // 8  # clear of resampled edges
    inner = tile[margin:-margin]
    return inner[:, margin : middle - margin].mean(), inner[:, middle + margin : -margin].mean()


def test_a_grey_image_with_a_dark_region_comes_out_dark(tmp_path):
    left, right = _halves_brightness(tmp_path, _half_and_half(0.1, 0.9))  # dark left half
    assert left < 0.2 < 0.8 < right  # as published: low values dark (gray_r gave the reverse)


def test_binary_data_is_ink_on_paper_by_default(tmp_path):
    left, right = _halves_brightness(tmp_path, _half_and_half(0.0, 1.0))  # ink (1) at right
    assert right < 0.1 and left > 0.9


@pytest.mark.parametrize(("ink", "dark_side"), [(True, "left"), (False, "right")])
def test_the_caller_chooses_against_the_data(tmp_path, ink, dark_side):
    left, right = _halves_brightness(tmp_path, _half_and_half(0.9, 0.1), ink=ink)
    dark, light = (left, right) if dark_side == "left" else (right, left)
    assert dark < 0.2 and light > 0.8


def test_is_binary():
    assert is_binary(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert not is_binary(torch.tensor([0.0, 0.5, 1.0]))
    assert not is_binary(torch.tensor([0.0, 2.0]))


def test_gutters_and_row_labels_still_drawn(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(6, H * W)
    fig = image_grid(images, (H, W), ncols=3, row_labels=["a", "b"], title="t")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["a", "b"]
    assert save_figure(fig, tmp_path / "g.png").stat().st_size > 0
