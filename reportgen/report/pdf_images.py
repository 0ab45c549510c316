"""PNG pictures go into the PDF as they are, instead of being compressed a second time.

A PDF image stream with `/FlateDecode` and PNG predictors (`/Predictor 15`, what WeasyPrint writes) is
byte for byte the concatenated IDAT data of a PNG with the same width, colour type and bit depth. Yet
WeasyPrint (62-70 at least) decodes every PNG with Pillow, saves it as a new PNG and keeps that file's
IDAT data: a zlib compression of every picture on every render, 0.4 s of the demo's 2.3-s unchanged night
(56 pictures). For the PNGs reportgen writes (8-bit gray or RGB, not interlaced) the original IDAT
data is already what the PDF needs, so `passthrough_png` hands it over; any other PNG (palette, alpha,
16-bit, interlaced) and anything that is not a PNG take WeasyPrint's own path. The PDF's pixels are the
same either way (tests/report/test_pdf_images.py decodes them back).

The hook replaces `weasyprint.images.RasterImage._get_png_data` only while one render runs, and only if
that function is where it is expected: on a WeasyPrint that moved it, rendering just takes its usual
time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY, _RGB = 0, 2  # PNG colour types whose IDAT data a PDF reads with /DeviceGray or /DeviceRGB


def png_idat(data: bytes) -> bytes | None:
    """The IDAT data of an 8-bit, non-interlaced gray or RGB PNG (its filtered, deflated scanlines), or
    None for any other file, including a truncated or malformed one."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, idat, header_ok = len(PNG_SIGNATURE), [], False
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            return None
        if kind == b"IHDR":
            if length != 13:
                return None
            depth, colour, _, _, interlace = struct.unpack(">BBBBB", body[8:13])
            header_ok = depth == 8 and colour in (_GRAY, _RGB) and interlace == 0
            if not header_ok:
                return None
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            return b"".join(idat) if header_ok and idat else None
        pos += 12 + length  # length, type, data, CRC
    return None


def _original_bytes(pillow_image: Any) -> bytes | None:
    """The encoded file a Pillow image was opened from, when it is still at hand (WeasyPrint opens its
    images from in-memory bytes); None for converted or generated images."""
    if getattr(pillow_image, "format", None) != "PNG":
        return None
    fp = getattr(pillow_image, "fp", None)
    getvalue = getattr(fp, "getvalue", None)
    return getvalue() if callable(getvalue) else None


@contextmanager
def passthrough_png() -> Iterator[None]:
    """While active, WeasyPrint embeds the IDAT data of suitable PNGs unchanged (module docstring)."""
    try:
        from weasyprint.images import RasterImage
    except ImportError:  # pragma: no cover - WeasyPrint is a dependency; a broken install fails later
        yield
        return
    original = RasterImage.__dict__.get("_get_png_data")
    encode: Callable[[Any], bytes] | None = getattr(original, "__func__", None)
    if encode is None:  # not the staticmethod this hook knows: leave WeasyPrint as it is
        yield
        return

    def get_png_data(pillow_image: Any) -> bytes:
        source = _original_bytes(pillow_image)
        idat = png_idat(source) if source is not None else None
        return idat if idat is not None else encode(pillow_image)

    RasterImage._get_png_data = staticmethod(get_png_data)
    try:
        yield
    finally:
        RasterImage._get_png_data = original
