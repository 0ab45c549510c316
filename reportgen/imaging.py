"""Pixels to pictures: PNG encoding, sharp upscaling, labelled grids, colormaps and overlays (Pillow)."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PRINT_MIN_SIDE = 192  # images smaller than this are upscaled (nearest neighbour) to stay sharp in print
LABEL_MIN_FONT = 8  # px; grid labels shrink to fit their tile down to this size, then are cut
LABEL_PAD = 1  # px of white between a tile's edge and its label text, on each side
ELLIPSIS = "\u2026"


def to_pil(image: np.ndarray) -> Image.Image:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """Deterministic PNG bytes (no timestamps), so identical pixels give identical files."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def upscale_for_print(image: Image.Image, min_side: int = PRINT_MIN_SIDE) -> Image.Image:
    """Nearest-neighbour upscale by an integer factor: PDF viewers disagree on pixelated rendering."""
    side = min(image.size)
    if side >= min_side:
        return image
    factor = math.ceil(min_side / side)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


@functools.lru_cache(maxsize=64)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for path in (name, f"/usr/share/fonts/truetype/dejavu/{name}"):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def text_lines(text: str, font_pt: float, width_pt: float, bold: bool = False) -> int:
    """Lines that `text` takes in a box `width_pt` wide, set in DejaVu Sans (the report's font) at
    `font_pt`, wrapped at spaces like a browser does; for estimating page layout before WeasyPrint runs."""
    ref = 100  # measure at a large size and scale: widths are linear in the size, pixels are not
    font = _font(ref, bold)
    scale = font_pt / ref
    space = font.getlength(" ") * scale
    lines, used = 1, 0.0
    for word in text.split():
        w = font.getlength(word) * scale
        if used and used + space + w > width_pt:
            lines, used = lines + 1, w
        else:
            used += (space if used else 0.0) + w
    return lines


def compact_number(value: float) -> str:
    """A number in as few characters as a tile label allows, 3 significant digits (2 below 0.01):
    2210 -> "2.21k", 0.0435 -> "0.0435", -0.00192 -> "-1.9e-3"; `.3g` gives "2.21e+03" and "-0.00192"."""
    v = float(f"{value:.3g}")  # round first, so 999.7 is formatted as the 1000 it prints as
    mag = abs(v)
    if mag == 0:
        return "0"
    if 0.01 <= mag < 1e3:
        return f"{v:.3g}"
    if 1e3 <= mag < 1e6:
        return f"{v / 1e3:.3g}k"
    mantissa, exponent = f"{v:.{1 if mag < 1 else 2}e}".split("e")  # 2 digits for tiny values, 3 for huge
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def fit_labels(
    labels: Sequence[str], width: float, size: int, min_size: int = LABEL_MIN_FONT
) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, list[str]]:
    """One font for all labels of a grid, as large as `size` but small enough that every label fits
    `width` pixels (never below `min_size`, where text stops being legible in print); a label that is
    still too wide is cut and ends in an ellipsis. So a caption never runs into the next tile."""
    font = _font(size)
    while size > min_size and any(font.getlength(t) > width for t in labels):
        size -= 1
        font = _font(size)
    fitted = []
    for text in labels:
        if font.getlength(text) > width:
            while text and font.getlength(text.rstrip() + ELLIPSIS) > width:
                text = text[:-1]
            text = text.rstrip() + ELLIPSIS if text else ""
        fitted.append(text)
    return font, fitted


def grid(
    tiles: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    margin: int = 4,
    tile_side: int | None = None,
    dim: Sequence[bool] | None = None,
) -> Image.Image:
    """n x n grid (or `columns` wide) with margins and an optional caption under each tile.

    Captions are fitted to the tile's width (`fit_labels`). `dim` greys out tiles (e.g. dead filters) so
    noise is never shown as if it meant something.
    """
    n = len(tiles)
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    pils = [to_pil(t).convert("RGB") for t in tiles]
    th, tw = (pils[0].height, pils[0].width) if pils else (1, 1)
    if tile_side:
        factor = max(1, tile_side // max(th, tw)) if max(th, tw) < tile_side else 1
        th, tw = th * factor, tw * factor
    label_h = 0
    font, texts = None, []
    if labels:
        size = max(9, min(14, tw // 7))
        label_h = size + 4  # the strip keeps its height when the font shrinks: one geometry per tile size
        font, texts = fit_labels(labels, tw - 2 * LABEL_PAD, size)
    width = cols * tw + (cols + 1) * margin
    height = rows * (th + label_h) + (rows + 1) * margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, pil in enumerate(pils):
        r, c = divmod(i, cols)
        x = margin + c * (tw + margin)
        y = margin + r * (th + label_h + margin)
        tile = pil.resize((tw, th), Image.NEAREST) if pil.size != (tw, th) else pil
        if dim is not None and dim[i]:
            tile = Image.blend(tile, Image.new("RGB", tile.size, (235, 235, 235)), 0.75)
        canvas.paste(tile, (x, y))
        if font is not None:
            draw.text((x + LABEL_PAD, y + th + 1), texts[i], fill=(40, 40, 40), font=font)
    return canvas


def chart_png(fig: Any, *axes: Any) -> bytes:
    """A matplotlib chart as PNG bytes in the report's style: no top and right frame lines on `axes`, a
    tight layout, 150 dpi, and no software tag in the file (the same chart gives the same bytes)."""
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    return buf.getvalue()


def chart_text(text: str) -> str:
    """A user's string (class, image or layer name) as matplotlib text shows it literally: a pair of `$`
    starts mathtext, so a class folder `$_$` made the chart raise and `a$b$c` showed an italic b. Every
    `$` is escaped; outside `$...$` no other character is special to matplotlib."""
    return text.replace("$", r"\$")


def colormap(
    values: np.ndarray, name: str = "viridis", vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """2-D float array -> uint8 RGB through a matplotlib colormap."""
    from matplotlib import colormaps

    v = np.asarray(values, np.float32)
    lo = float(np.min(v)) if vmin is None else vmin
    hi = float(np.max(v)) if vmax is None else vmax
    norm = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    rgba = colormaps[name](np.clip(norm, 0, 1))
    return (rgba[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a [0,1] heatmap (any size) over an RGB/gray uint8 image."""
    base = to_pil(image).convert("RGB")
    heat_img = Image.fromarray(colormap(heat, cmap, 0.0, 1.0)).resize(base.size, Image.BILINEAR)
    return np.asarray(Image.blend(base, heat_img, alpha))
