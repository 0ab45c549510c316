"""Pixels to pictures: PNG encoding, sharp upscaling, labelled grids, colormaps and overlays (Pillow)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PRINT_MIN_SIDE = 192  # images smaller than this are upscaled (nearest neighbour) to stay sharp in print


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


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def grid(
    tiles: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    margin: int = 4,
    tile_side: int | None = None,
    dim: Sequence[bool] | None = None,
) -> Image.Image:
    """n x n grid (or `columns` wide) with margins and an optional caption under each tile.

    `dim` greys out tiles (e.g. dead filters) so noise is never shown as if it meant something.
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
    font = None
    if labels:
        font = _font(max(9, min(14, tw // 7)))
        label_h = font.size + 4
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
        if labels and font is not None:
            draw.text((x + 1, y + th + 1), labels[i], fill=(40, 40, 40), font=font)
    return canvas


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
