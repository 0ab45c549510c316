"""Grid geometry, sharp print upscaling and deterministic PNGs, checked pixel by pixel."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from reportgen.imaging import (
    ELLIPSIS,
    LABEL_MIN_FONT,
    LABEL_PAD,
    PRINT_MIN_SIDE,
    colormap,
    compact_number,
    fit_labels,
    grid,
    overlay,
    png_bytes,
    upscale_for_print,
)

WHITE = (255, 255, 255)


def tiles(n: int, h: int = 10, w: int = 12) -> list[np.ndarray]:
    """n solid tiles, each a distinct colour, so every tile can be found in the canvas."""
    return [np.full((h, w, 3), (20 * i % 250, 100, 200 - 10 * i), np.uint8) for i in range(n)]


def label_strip(tile_width: int) -> int:
    """Caption strip height: a font of max(9, min(14, width // 7)) pt plus 4 px of padding."""
    return max(9, min(14, tile_width // 7)) + 4


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 10, 17])
def test_square_grid_geometry(n: int) -> None:
    h, w, margin = 10, 12, 4
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = grid(tiles(n, h, w), margin=margin)
    assert canvas.size == (cols * w + (cols + 1) * margin, rows * h + (rows + 1) * margin)
    arr = np.asarray(canvas)
    for i, tile in enumerate(tiles(n, h, w)):
        r, c = divmod(i, cols)
        x, y = margin + c * (w + margin), margin + r * (h + margin)
        np.testing.assert_array_equal(arr[y : y + h, x : x + w], tile)
        assert tuple(arr[y - 1, x]) == WHITE and tuple(arr[y, x - 1]) == WHITE  # margins are white
    assert (arr[:margin] == 255).all() and (arr[:, :margin] == 255).all()
    if n < cols * rows:  # empty cells stay white
        assert (arr[-margin - h :, -margin - w :] == 255).all()


def test_columns_are_honoured() -> None:
    canvas = grid(tiles(5), columns=2, margin=3)
    assert canvas.size == (2 * 12 + 3 * 3, 3 * 10 + 4 * 3)
    canvas = grid(tiles(5), columns=5, margin=0)
    assert canvas.size == (5 * 12, 10)
    np.testing.assert_array_equal(np.asarray(canvas)[:, 4 * 12 :], tiles(5)[4])


def test_label_strip_height_and_captions() -> None:
    n, h, w, margin = 5, 40, 70, 4
    labels = [f"#{i}" for i in range(n)]
    strip = label_strip(w)
    canvas = grid(tiles(n, h, w), labels, margin=margin)
    assert canvas.size == (3 * w + 4 * margin, 2 * (h + strip) + 3 * margin)
    arr = np.asarray(canvas)
    for i, tile in enumerate(tiles(n, h, w)):
        r, c = divmod(i, 3)
        x, y = margin + c * (w + margin), margin + r * (h + strip + margin)
        np.testing.assert_array_equal(arr[y : y + h, x : x + w], tile)
        caption = arr[y + h : y + h + strip, x : x + w]
        assert (caption.min(axis=2) < 128).any(), f"caption {i} not drawn"  # dark text on white
    # without labels there is no strip
    assert grid(tiles(n, h, w), margin=margin).size[1] == 2 * h + 3 * margin


def test_label_strip_grows_with_wide_tiles() -> None:
    assert grid(tiles(1, 20, 140), ["x"], margin=0).size[1] == 20 + label_strip(140) == 20 + 18
    assert grid(tiles(1, 20, 14), ["x"], margin=0).size[1] == 20 + label_strip(14) == 20 + 13


def test_tile_side_upscales_by_an_integer_factor_nearest_neighbour() -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    canvas = grid([tile], margin=2, tile_side=64)  # factor 64 // 10 = 6
    assert canvas.size == (60 + 4, 60 + 4)
    np.testing.assert_array_equal(np.asarray(canvas)[2:62, 2:62], tile.repeat(6, 0).repeat(6, 1))
    big = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    assert grid([big], margin=0, tile_side=64).size == (80, 80)  # never shrunk


def test_gray_tiles_and_dimming() -> None:
    gray = np.full((8, 8, 1), 50, np.uint8)
    arr = np.asarray(grid([gray, gray], margin=0, dim=[False, True]))
    assert arr.shape == (8, 16, 3)
    assert (arr[:, :8] == 50).all()
    dimmed = arr[:, 8:].astype(int)
    assert (np.abs(dimmed - (50 * 0.25 + 235 * 0.75)) <= 1).all()  # blended 75 % towards light gray


def test_upscale_for_print_integer_nearest_neighbour() -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = upscale_for_print(Image.fromarray(src))
    factor = math.ceil(PRINT_MIN_SIDE / 30)
    assert factor == 7 and out.size == (50 * factor, 30 * factor)
    np.testing.assert_array_equal(np.asarray(out), src.repeat(factor, 0).repeat(factor, 1))
    assert min(out.size) >= PRINT_MIN_SIDE


def test_upscale_for_print_leaves_large_images_alone() -> None:
    img = Image.new("RGB", (PRINT_MIN_SIDE, 400), (1, 2, 3))
    assert upscale_for_print(img).size == img.size
    assert upscale_for_print(Image.new("L", (96, 96)), min_side=100).size == (192, 192)  # ceil(100/96) = 2


def test_png_bytes_deterministic_and_lossless() -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    data = png_bytes(img)
    assert data == png_bytes(img.copy()) == png_bytes(Image.fromarray(img))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
    assert data != png_bytes(np.flipud(img))
    floats = np.array([[[-5.0, 100.4, 300.0]]])  # clipped to 0..255, not wrapped
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(floats)))), [[[0, 100, 255]]])


def test_colormap_and_overlay() -> None:
    ramp = np.linspace(0, 1, 11)[None].repeat(3, 0)
    rgb = colormap(ramp, "gray")
    assert rgb.shape == (3, 11, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, -1].tolist() == [255, 255, 255]
    assert (np.diff(rgb[0, :, 0].astype(int)) >= 0).all()
    flat = colormap(np.full((2, 2), 7.0))  # flat input: no division by zero, the low end of the map
    assert (flat == colormap(np.zeros((2, 2)))).all()
    base = np.zeros((20, 20, 3), np.uint8)
    heat = np.zeros((5, 5))
    heat[:, 4] = 1.0
    out = overlay(base, heat, alpha=0.5, cmap="gray")
    assert out.shape == (20, 20, 3)
    assert out[:, -1].mean() > 100 and out[:, 0].mean() < 5  # the hot column lands on the right side


LONG_LABELS = ["#0 -0.00192 dead", "#1 2.21e+03", "#12345 123456789 very long caption", "#3", ""]


@pytest.mark.parametrize("width", [6, 20, 40, 54, 62, 110, 126])
def test_fitted_labels_never_exceed_the_tile_width(width: int) -> None:
    size = max(9, min(14, width // 7))
    font, texts = fit_labels(LONG_LABELS, width, size)
    assert LABEL_MIN_FONT <= font.size <= size
    for label, text in zip(LONG_LABELS, texts, strict=True):
        assert font.getlength(text) <= width, (label, text, font.size)
        if text != label:  # only cut when even the smallest font cannot hold it, and then visibly
            assert font.size == LABEL_MIN_FONT and font.getlength(label) > width
            assert text == "" or (text.endswith(ELLIPSIS) and label.startswith(text[:-1]))
    assert texts[3] == "#3" or width < 20  # a short label is never touched


def test_labels_shrink_before_they_are_cut() -> None:
    font, texts = fit_labels(["#0 -1.9e-3 \u2020", "#1 2.21k"], 104, 14)  # a 112-px tile minus padding
    assert texts == ["#0 -1.9e-3 \u2020", "#1 2.21k"] and font.size == 14
    font, texts = fit_labels(["#0 -0.00192 dead", "#1 2.21k"], 104, 14)
    assert texts[0] == "#0 -0.00192 dead" and LABEL_MIN_FONT <= font.size < 14  # whole, smaller
    assert font.getlength(texts[0]) <= 104


@pytest.mark.parametrize("side", [28, 56, 128])
def test_grid_labels_stay_inside_their_tile(side: int) -> None:
    """Pixel oracle: the label strip is white in every margin between and beside the tiles."""
    n, margin = 6, 4
    labels = [f"#{i} {-0.00192 * (i + 1):.3g} dead" for i in range(n)]
    canvas = np.asarray(grid(tiles(n, side, side), labels, columns=3, margin=margin))
    strip = label_strip(side)
    for r in range(2):
        top = margin + r * (side + strip + margin) + side
        band = canvas[top : top + strip]
        assert (band.min(axis=2) < 128).any(), "labels drawn"
        for c in range(4):  # the margin columns left of, between and right of the three tiles
            x = c * (side + margin)
            assert (band[:, x : x + margin] == 255).all(), (side, r, c)
        for c in range(3):  # the padding at both ends of each tile's strip
            x = margin + c * (side + margin)
            assert (band[:, x + side - LABEL_PAD : x + side] == 255).all(), (side, r, c)


def test_compact_number() -> None:
    cases = [
        (0.0, "0"), (-0.0, "0"), (1.5, "1.5"), (0.0435, "0.0435"), (0.01, "0.01"), (123.4, "123"),
        (999.4, "999"), (999.7, "1k"), (2210.0, "2.21k"), (-12345.0, "-12.3k"), (999999.0, "1e6"),
        (2.5e7, "2.5e7"), (-0.00192, "-1.9e-3"), (0.00999, "1e-2"), (1e-5, "1e-5"),
    ]
    for value, text in cases:
        assert compact_number(value) == text, value
        assert len(text) <= 7
        assert float(text.replace("k", "e3")) == pytest.approx(value, rel=0.03, abs=1e-12)
