"""Hostile files in a dataset folder: decompression bombs (skipped from the header, never decoded, listed),
TIFF (8- and 16-bit, decoded by Pillow), `$` in class names (matplotlib mathtext), symlinked folders
(`up -> ..`) and the report's own folders inside a dataset (never read back as images)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reportgen.datasets import (
    TooLargeError,
    check_size,
    load_image,
    load_pixels,
    missing_indices,
    pillow_pixels,
    scan_folder,
    stream,
)
from reportgen.errors import SpecError
from reportgen.spec.fields import DatasetSpec

GIB = 2**30


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit gray PNG of zeros, written row by row through zlib: a 20000x20000 one is ~50 KB on
    disk and costs the test no memory, yet decodes to 400 megapixels (1.2 GB as RGB, 4.8 GB as float)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def photo(path: Path, value: int = 120, side: int = 24) -> Path:
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- decompression bombs ----------------------------------------------------------------------------


RUN_SPEC = """\
title: bomb
output: out
formats: [html]
models:
  net: {path: tiny.keras}
datasets:
  photos: {path: data}
sections:
  - type: predictions
    model: net
    dataset: photos
"""

# Runs `reportgen run` as its only child, so RUSAGE_CHILDREN is that run's peak resident memory alone
# (the test process's own children, e.g. other CLI tests, would otherwise count).
MEASURE = """\
import resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "reportgen", "run", sys.argv[1]], capture_output=True, text=True)
sys.stdout.write(f"{proc.returncode}\\n{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n")
sys.stderr.write(proc.stderr)
"""


def test_run_with_a_bomb_png_skips_it_lists_it_and_stays_under_1_gib(
    tmp_path: Path, tiny_keras_model: Path
) -> None:
    shutil.copyfile(tiny_keras_model, tmp_path / "tiny.keras")
    (tmp_path / "data").mkdir()
    photo(tmp_path / "data" / "a.png")
    bomb = bomb_png(tmp_path / "data" / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 400_000
    spec = tmp_path / "spec.yaml"
    spec.write_text(RUN_SPEC)
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(spec)], capture_output=True, text=True, timeout=300
    )
    code, maxrss_kib = (int(v) for v in proc.stdout.split())
    assert code == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "DecompressionBomb" not in proc.stderr
    assert maxrss_kib * 1024 < GIB, f"peak RSS {maxrss_kib / 1024:.0f} MiB"
    warned = [line for line in proc.stderr.splitlines() if "bomb.png" in line]
    assert len(warned) == 1 and "too large" in warned[0] and "max_pixels" in warned[0]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "skipped: 1 file (too large: bomb.png" in html
    after = snapshot(tmp_path)
    assert all(after[name] == data for name, data in before.items())


def test_every_decode_path_refuses_a_bomb_before_decoding(tmp_path: Path) -> None:
    good = photo(tmp_path / "a.png")
    bomb = bomb_png(tmp_path / "bomb.png", 20000, 20000)
    from reportgen.datasets import ImageItem

    items = [ImageItem(good, "a.png", None, None), ImageItem(bomb, "bomb.png", None, None)]
    pixels, bad = load_pixels(items, (16, 16), 3)
    assert pixels.shape == (1, 16, 16, 3) and bad == ["bomb.png"]
    seen = [int(i) for _, index in stream(items, (16, 16), 3, batch_size=2) for i in index.numpy()]
    assert seen == [0] and missing_indices(2, seen) == [1]
    for decode in (
        lambda: load_image(bomb),
        lambda: load_image(bomb, (8, 8), 1),
        lambda: pillow_pixels(bomb, 3),
    ):
        with pytest.raises(TooLargeError):
            decode()
    with pytest.raises(TooLargeError):
        check_size(bomb)
    assert check_size(good) == "PNG"


def test_scan_leaves_out_images_over_max_pixels_and_says_which(tmp_path: Path) -> None:
    """8000x8000 is over the default 50 MP but under Pillow's own bomb error: reportgen's limit decides."""
    photo(tmp_path / "a.png")
    bomb_png(tmp_path / "big.png", 8000, 8000)
    ds = scan_folder("photos", tmp_path, DatasetSpec(path=str(tmp_path)))
    assert [it.name for it in ds.items] == ["a.png"]
    assert len(ds.notes) == 1
    assert "skipped: 1 file (too large: big.png 8000×8000 px)" in ds.notes[0] and "max_pixels" in ds.notes[0]
    with pytest.raises(SpecError, match="spec.yaml:9:7: image 'big' of dataset 'photos' is too large"):
        ds.select(["big"], where="spec.yaml:9:7")

    raised = scan_folder("photos", tmp_path, DatasetSpec(path=str(tmp_path), max_pixels=64_000_000))
    assert [it.name for it in raised.items] == ["a.png", "big.png"] and raised.notes == []


def test_limit_reads_headers_only_until_it_is_reached(tmp_path: Path) -> None:
    bomb_png(tmp_path / "a_big.png", 8000, 8000)
    for name in ("b.png", "c.png", "d.png"):
        photo(tmp_path / name)
    ds = scan_folder("photos", tmp_path, DatasetSpec(path=str(tmp_path), limit=2))
    assert [it.name for it in ds.items] == ["b.png", "c.png"]  # the big one does not use up the limit


# -- formats TensorFlow cannot decode ---------------------------------------------------------------


def test_tiff_8_bit_rgb_and_16_bit_gray_decode_with_exact_values(tmp_path: Path) -> None:
    from reportgen.datasets import ImageItem

    rgb = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) * 2
    Image.fromarray(rgb).save(tmp_path / "rgb8.tif")
    gray16 = np.zeros((8, 8), np.uint16)
    gray16[0, :4] = [65535, 32896, 257, 0]  # -> 255, 128, 1, 0: scaled, not clipped
    gray16[1:] = 51400  # -> 200
    Image.fromarray(gray16).save(tmp_path / "gray16.tif")
    assert Image.open(tmp_path / "gray16.tif").mode.startswith("I;16")

    items = [ImageItem(tmp_path / n, n, None, None) for n in ("rgb8.tif", "gray16.tif")]
    pixels, bad = load_pixels(items, (8, 8), 3)
    assert bad == []
    np.testing.assert_allclose(pixels[0], rgb, atol=1e-3)
    np.testing.assert_allclose(pixels[1][0, :4, 0], [255, 128, 1, 0], atol=1e-3)
    np.testing.assert_allclose(pixels[1][..., 1], pixels[1][..., 0])  # gray -> 3 equal channels
    np.testing.assert_allclose(pixels[1][3, 3], [200, 200, 200], atol=1e-3)

    batches = list(stream(items, (8, 8), 1, batch_size=2))
    ((batch, index),) = batches
    assert index.numpy().tolist() == [0, 1]
    np.testing.assert_allclose(batch.numpy()[1][0, :4, 0], [255, 128, 1, 0], atol=1e-3)

    shown = load_image(tmp_path / "gray16.tif")
    assert shown.dtype == np.uint8 and shown[0, :4, 0].tolist() == [255, 128, 1, 0]
    assert load_image(tmp_path / "rgb8.tif", channels=1).shape == (8, 8, 1)


def test_gif_and_bmp_decode_first_frame(tmp_path: Path) -> None:
    from reportgen.datasets import ImageItem

    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("L", (6, 6), 77).save(tmp_path / "gray.bmp")
    items = [ImageItem(tmp_path / n, n, None, None) for n in ("anim.gif", "gray.bmp")]
    pixels, bad = load_pixels(items, (6, 6), 3)
    assert bad == []
    np.testing.assert_allclose(pixels[0][2, 2], [255, 0, 0], atol=1e-3)
    np.testing.assert_allclose(pixels[1][2, 2], [77, 77, 77], atol=1e-3)


# -- `$` in names shown in charts -------------------------------------------------------------------


def test_dollar_signs_in_chart_labels_are_shown_literally() -> None:
    from matplotlib import cbook

    from reportgen.analyses.class_ranking import bar_chart
    from reportgen.imaging import chart_text

    names = ["$_$", "cost $^$", "a$b$c", r"already \$ escaped"]
    png = bar_chart(names, [3.0, 2.0, 1.0, 0.5], "layer $x$ filter 0", "mean of $_$")
    assert png.startswith(b"\x89PNG")
    assert not any(cbook.is_math_text(chart_text(n)) for n in names)


CLASS_SPEC = """\
title: dollars
output: out
formats: [html]
models:
  net: {path: tiny.keras}
datasets:
  money: {path: data}
sections:
  - type: class_ranking
    model: net
    dataset: money
    layer: conv_a
    filters: [0]
"""


def test_run_with_dollar_class_folders(tmp_path: Path, tiny_keras_model: Path, cli_main: Callable) -> None:
    shutil.copyfile(tiny_keras_model, tmp_path / "tiny.keras")
    for i, name in enumerate(("$_$", "cost $^$")):
        (tmp_path / "data" / name).mkdir(parents=True)
        photo(tmp_path / "data" / name / "x.png", value=i)
    (tmp_path / "spec.yaml").write_text(CLASS_SPEC)
    code, _, err = cli_main("run", tmp_path / "spec.yaml")
    assert code == 0, err
    assert "Traceback" not in err
    assert "cost $^$" in (tmp_path / "out" / "report.html").read_text()


# -- what a dataset folder never reads --------------------------------------------------------------


def test_symlinked_folders_are_not_followed_symlinked_files_are(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    photo(outside / "private.png")
    photo(outside / "linked.png")
    data = tmp_path / "data"
    data.mkdir()
    photo(data / "a.png")
    (data / "up").symlink_to("..")
    (data / "photos").symlink_to(outside)
    (data / "b.png").symlink_to(outside / "linked.png")
    with caplog.at_level("WARNING", logger="reportgen"):
        ds = scan_folder("d", data, DatasetSpec(path=str(data)))
    assert ds.class_names == []  # symlinked folders are not classes either
    assert [it.name for it in ds.items] == ["a.png", "b.png"]
    assert "symlinked folders are not followed" in caplog.text and "up -> .." in caplog.text


def test_class_folder_symlink_loop_and_nested_up_link(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    photo(data / "cat" / "1.png")
    (data / "cat" / "loop").symlink_to("..")
    photo(tmp_path / "parent.png")
    ds = scan_folder("d", data, DatasetSpec(path=str(data)))
    assert ds.class_names == ["cat"] and [it.name for it in ds.items] == ["cat/1.png"]


def test_report_output_cache_and_hidden_folders_inside_a_dataset_are_never_read(tmp_path: Path) -> None:
    """A flat folder that holds the report: before, its PNGs were fed back as images and the folder
    turned into class mode with a class called `report`."""
    from reportgen.datasets import DatasetRegistry
    from reportgen.publish import MARKER
    from reportgen.spec.schema import Spec

    data = tmp_path / "data"
    data.mkdir()
    photo(data / "a.png")
    photo(data / "b.jpg")
    for folder in ("report/assets/s1", "old-report", "results", ".reportgen-cache/x", ".out.staging-42"):
        (data / folder).mkdir(parents=True)
        photo(data / folder / "figure.png")
    (data / "old-report" / MARKER).write_text("")
    spec = Spec.model_validate(
        {
            "title": "t",
            "output": str(data / "report"),  # not yet marked: a run in progress, or a first run
            "cache": str(data / "results"),
            "models": {"m": {"keras_app": "VGG16", "weights": "none"}},
            "datasets": {"d": {"path": str(data)}},
            "sections": [{"type": "predictions", "model": "m", "dataset": "d"}],
        }
    )
    ds = DatasetRegistry(spec).get("d")
    assert ds.class_names == []
    assert [it.name for it in ds.items] == ["a.png", "b.jpg"]


def test_unreadable_permissions_are_not_a_traceback(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    photo(tmp_path / "a.png")
    locked = photo(tmp_path / "b.png")
    locked.chmod(0)
    ds = scan_folder("d", tmp_path, DatasetSpec(path=str(tmp_path)))
    assert [it.name for it in ds.items] == ["a.png", "b.png"]  # kept: decoding reports it as unreadable
