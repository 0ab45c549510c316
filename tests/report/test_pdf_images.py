"""PNG pictures pass into the PDF unchanged (reportgen.report.pdf_images), with the same pixels.

Real PNG files of the kinds a report may hold (RGB and gray as reportgen writes them, palette, alpha)
go through a real WeasyPrint render; pypdf decodes the PDF's image streams back and
they must equal the source pixels. The RGB and gray streams must be the source files' own IDAT data (the
pass-through was taken), the others WeasyPrint's re-encoding (it was not).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader

from reportgen.report.pdf_images import png_idat
from reportgen.report.render import render_pdf


def write_pngs(folder: Path) -> dict[str, np.ndarray]:
    """name -> the pixels the PDF must show (alpha dropped: WeasyPrint puts it in a separate mask)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (17, 13), dtype=np.uint8)
    pictures = {"rgb.png": rgb, "gray.png": gray}
    # compression level 1: WeasyPrint's own re-encoding (Pillow's level 6) would give other bytes
    Image.fromarray(rgb).save(folder / "rgb.png", compress_level=1)
    Image.fromarray(gray).save(folder / "gray.png", compress_level=1)
    palette = Image.fromarray(rng.integers(0, 256, (19, 11, 3), dtype=np.uint8)).quantize(16)
    palette.save(folder / "palette.png")
    pictures["palette.png"] = np.asarray(palette.convert("RGB"))
    rgba = rng.integers(0, 256, (29, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    pictures["rgba.png"] = rgba[..., :3]
    return pictures


def interlaced(data: bytes) -> bytes:
    """The same PNG with its header saying Adam7 interlacing (Pillow writes no interlaced PNG)."""
    header = bytearray(data[8:33])  # length, "IHDR", 13 bytes, CRC
    header[20] = 1
    header[21:25] = zlib.crc32(bytes(header[4:21])).to_bytes(4, "big")
    return data[:8] + bytes(header) + data[33:]


def test_png_idat_accepts_only_8_bit_gray_or_rgb_without_interlace(tmp_path: Path) -> None:
    write_pngs(tmp_path)
    kinds = {p.name: png_idat(p.read_bytes()) is not None for p in tmp_path.glob("*.png")}
    assert kinds == {"rgb.png": True, "gray.png": True, "palette.png": False, "rgba.png": False}
    assert png_idat(interlaced((tmp_path / "rgb.png").read_bytes())) is None
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp_path / "deep.png")
    assert png_idat((tmp_path / "deep.png").read_bytes()) is None  # 16-bit
    data = (tmp_path / "rgb.png").read_bytes()
    assert png_idat(data[:-20]) is None and png_idat(b"GIF89a" + data[6:]) is None  # truncated, not PNG


def test_the_pdf_shows_the_same_pixels_and_keeps_suitable_pngs_as_they_are(tmp_path: Path) -> None:
    pictures = write_pngs(tmp_path)
    tags = "".join(f'<img src="{name}" style="width: 40mm">' for name in pictures)
    (tmp_path / "r.html").write_text(f"<html><body>{tags}</body></html>")
    render_pdf(tmp_path / "r.html", tmp_path / "r.pdf")
    xobjects = PdfReader(tmp_path / "r.pdf").pages[0]["/Resources"]["/XObject"]
    streams = [xobjects[k].get_object() for k in xobjects]
    assert len(streams) == len(pictures)
    shown = {}
    for stream in streams:  # match each stream to its picture by size and pixels
        mode = "L" if stream["/ColorSpace"] == "/DeviceGray" else "RGB"
        decoded = np.asarray(stream.decode_as_image().convert(mode))
        name = next(n for n, px in pictures.items() if np.array_equal(px, decoded))
        shown[name] = stream._data  # the stream as stored in the file (still deflated)
    assert set(shown) == set(pictures), "every picture's pixels are in the PDF"
    for name in pictures:
        own = png_idat((tmp_path / name).read_bytes())
        assert (shown[name] == own) == (name in ("rgb.png", "gray.png")), name


@pytest.mark.parametrize("broken", [b"", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"])
def test_broken_headers_are_not_passed_through(broken: bytes) -> None:
    assert png_idat(broken) is None
