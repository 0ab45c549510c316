"""The data behind every figure: raw .npy maps beside the PNGs, and a manifest that lists every file.

A hand-set model makes the maps predictable: conv `detect` (4x4 kernel, stride 4: 32x32 input -> 8x8
map) measures redness, and the class "red" scores redness in the top-left quadrant only. So the
Grad-CAM, the saliency and the activation of a red square there peak on the square, at the layer's
8x8 resolution and at the 32x32 input resolution alike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from reportgen.runner import run

SIDE, STRIDE = 32, 4
RED_BOX = {"a": (4, 4, 12, 12), "b": (8, 0, 16, 8)}  # x0, y0, x1, y1: whole 4-px cells, top-left quadrant

SPEC = """\
title: Artifacts
output: out
formats: [html]
models:
  red: {path: red.keras, preprocess: unit, class_names: [red, plain]}
datasets:
  photos: {path: photos}
sections:
  - type: gradcam
    model: red
    dataset: photos
    layer: detect
  - type: saliency
    model: red
    dataset: photos
    methods: [vanilla]
  - type: occlusion
    model: red
    dataset: photos
    layer: detect
    masks: [{name: square, box: [4, 4, 12, 12]}]
    sliding: {patch: 8, stride: 8}
  - type: activations
    model: red
    dataset: photos
    layers: [detect]
"""


def red_model() -> keras.Model:
    inp = keras.Input((SIDE, SIDE, 3))
    x = keras.layers.Conv2D(2, STRIDE, strides=STRIDE, activation="relu", name="detect")(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    k = np.zeros((STRIDE, STRIDE, 3, 2), np.float32)
    k[:, :, :, 0] = np.array([1.0, -0.5, -0.5]) / STRIDE**2  # channel 0: mean redness of the cell
    k[:, :, :, 1] = np.array([0.2, 0.2, 0.2]) / STRIDE**2  # channel 1: brightness
    model.get_layer("detect").set_weights([k, np.zeros(2, np.float32)])
    cells = SIDE // STRIDE
    w = np.zeros((cells, cells, 2, 2), np.float32)
    w[: cells // 2, : cells // 2, 0, 0] = 20.0 / (cells // 2) ** 2
    model.get_layer("head").set_weights([w.reshape(-1, 2), np.array([0.0, 1.5], np.float32)])
    return model


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], keras.Model]:
    root = tmp_path_factory.mktemp("artifacts")
    model = red_model()
    model.save(root / "red.keras")
    (root / "photos").mkdir()
    for name, (x0, y0, x1, y1) in RED_BOX.items():
        img = np.full((SIDE, SIDE, 3), 40, np.uint8)
        img[y0:y1, x0:x1] = (255, 0, 0)
        Image.fromarray(img).save(root / "photos" / f"{name}.png")
    (root / "spec.yaml").write_text(SPEC, encoding="utf-8")
    run(root / "spec.yaml", quiet=True)
    out = root / "out"
    return out, json.loads((out / "manifest.json").read_text()), model


def arrays(manifest: dict[str, Any], section: str, what: str) -> list[dict[str, Any]]:
    found = [
        a
        for s in manifest["sections"]
        if s["type"] == section
        for a in s["artifacts"]
        # gradcam saves its maps as kind "map" (method, resolution conv | input), the others as "array"
        if (a["kind"] == "array" and a["map"] == what) or (a["kind"] == "map" and a["method"] == what)
    ]
    assert found, f"no {what} arrays in the {section} section"
    return found


def pairs(found: list[dict[str, Any]], out: Path) -> dict[tuple[Any, ...], dict[str, np.ndarray]]:
    """(image, mask) -> {resolution: array}, each array loaded from its .npy and checked against its row."""
    by: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
    for a in found:
        assert a["path"].endswith(".npy") and a["model"] == "red"
        values = np.load(out / a["path"], allow_pickle=False)
        assert list(values.shape) == a["shape"]
        resolution = "layer" if a["resolution"] == "conv" else a["resolution"]
        by.setdefault((a["image"], a.get("mask")), {})[resolution] = values
    return by


def in_box(flat_index: int, shape: tuple[int, ...], box: tuple[int, int, int, int], scale: int = 1) -> bool:
    y, x = np.unravel_index(flat_index, shape[:2])
    x0, y0, x1, y1 = box
    return x0 <= (x + 0.5) * scale <= x1 and y0 <= (y + 0.5) * scale <= y1


def test_gradcam_arrays_at_layer_and_input_resolution(published: tuple[Path, dict[str, Any], Any]) -> None:
    out, manifest, _ = published
    for section in ("gradcam", "occlusion"):
        found = arrays(manifest, section, "gradcam")
        assert all(a["layer"] == "detect" for a in found)
        by = pairs(found, out)
        assert {image for image, _ in by} == {"a.png", "b.png"}
        for (image, mask), maps in by.items():
            layer, at_input = maps["layer"], maps["input"]
            assert layer.shape == (SIDE // STRIDE,) * 2 and at_input.shape == (SIDE, SIDE)
            # The input-resolution map is the layer's map, bilinearly upsampled (as the figure shows it).
            resized = tf.image.resize(layer[None, ..., None], (SIDE, SIDE), method="bilinear")[0, ..., 0]
            np.testing.assert_allclose(at_input, resized.numpy(), atol=1e-5)
            if mask is None:  # the original: the evidence is the red square, at both resolutions
                box = RED_BOX[image[0]]
                assert in_box(int(np.argmax(layer)), layer.shape, box, STRIDE)
                assert in_box(int(np.argmax(at_input)), at_input.shape, box)
                assert layer.max() == pytest.approx(1.0)


def test_saliency_and_sliding_arrays(published: tuple[Path, dict[str, Any], Any]) -> None:
    out, manifest, _ = published
    for (image, _), maps in pairs(arrays(manifest, "saliency", "vanilla"), out).items():
        assert set(maps) == {"input"}  # a gradient map's own resolution is the input's
        values = np.abs(maps["input"]).max(-1)  # signed (H, W, C) gradients
        assert maps["input"].shape == (SIDE, SIDE, 3)
        assert in_box(int(np.argmax(values)), values.shape, RED_BOX[image[0]])
    for _, maps in pairs(arrays(manifest, "occlusion", "sliding"), out).items():
        assert maps["patch"].shape == (SIDE // 8, SIDE // 8) and maps["input"].shape == (SIDE, SIDE)
        # patches of 8 at stride 8 tile the image: each input pixel's value is its patch's drop
        np.testing.assert_allclose(maps["input"], np.kron(maps["patch"], np.ones((8, 8))), atol=1e-6)


def test_activation_arrays_are_the_layer_output(published: tuple[Path, dict[str, Any], keras.Model]) -> None:
    out, manifest, model = published
    extractor = keras.Model(model.inputs, model.get_layer("detect").output)
    found = arrays(manifest, "activations", "activations")
    for a in found:
        assert a["channels"] == [0, 1]
    for (image, _), maps in pairs(found, out).items():
        pixels = np.asarray(Image.open(out.parent / "photos" / image), np.float32)[None] / 255.0
        expected = extractor(pixels).numpy()[0]
        np.testing.assert_allclose(maps["layer"], expected, rtol=1e-5, atol=1e-6)
        assert maps["input"].shape == (SIDE, SIDE, 2)


def test_manifest_lists_every_file_the_report_uses(published: tuple[Path, dict[str, Any], Any]) -> None:
    out, manifest, _ = published
    listed = {a["path"] for s in manifest["sections"] for a in s["artifacts"]}
    written = {p.relative_to(out).as_posix() for p in (out / "assets").rglob("*") if p.is_file()}
    assert written - listed == set(), "files the manifest does not list"
    assert listed - written == set(), "manifest rows without a file"
    html = (out / "report.html").read_text()
    used = set(re.findall(r'(?:src|href)="(assets/[^"#]+)"', html))
    assert used and used <= listed
    kinds = {(s["type"], a["kind"]) for s in manifest["sections"] for a in s["artifacts"]}
    assert ("occlusion", "image") in kinds and ("saliency", "image") in kinds  # the originals shown
    # Grad-CAM and saliency maps come with their colour scale
    assert ("gradcam", "colorbar") in kinds and ("saliency", "colorbar") in kinds
    assert html.count('class="colorbar"') == 2
