"""Occlusion engine on the hand-set oracle model of test_gradients: masks, boxes, fills, sliding patch."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from oracles import CLASSES, RED_BOX, SIDE, in_box, loaded, oracle_model, scene
from PIL import Image

from reportgen.engine.gradients import GradientEngine, fill_source, occlude, patch_boxes, scale_box
from reportgen.errors import ReportgenError
from reportgen.models import PRESETS


@pytest.fixture(scope="module")
def engine() -> GradientEngine:
    return GradientEngine(loaded(oracle_model(), PRESETS["unit"], CLASSES), batch_size=16)


def test_scale_box_maps_original_pixels_to_model_input() -> None:
    # A 128 x 64 (w x h) photo shown to a 32 x 32 model: x shrinks 4x, y 2x; rounding goes outwards.
    assert scale_box((16, 8, 48, 40), (128, 64), (32, 32)) == (4, 4, 12, 20)
    assert scale_box((1, 1, 2, 2), (128, 64), (32, 32)) == (0, 0, 1, 1)
    assert scale_box((-10, -10, 500, 500), (128, 64), (32, 32)) == (0, 0, 32, 32)
    x0, y0, x1, y1 = scale_box((200, 10, 300, 20), (128, 64), (32, 32))
    assert x1 <= x0  # outside the image: empty, for the caller to report


def test_fills() -> None:
    px = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    assert (fill_source(px, "gray") == 128).all() and (fill_source(px, "black") == 0).all()
    np.testing.assert_allclose(fill_source(px, "mean")[:, 3, 5], px.mean(axis=(1, 2)), rtol=1e-5)
    blur = fill_source(px, "blur")
    assert blur.shape == px.shape and blur.std() < px.std() / 2
    out = occlude(px[0], fill_source(px, "black")[0], (2, 3, 6, 9))
    assert (out[3:9, 2:6] == 0).all() and out[0, 0, 0] == px[0, 0, 0, 0] and (px[0] != 0).all()


@pytest.mark.parametrize("fill", ["gray", "black", "blur", "mean"])
def test_masking_the_decisive_region_lowers_the_target(engine: GradientEngine, fill: str) -> None:
    img = scene(red=True)
    src = fill_source(img[None], fill)[0]
    decisive = occlude(img, src, RED_BOX)
    irrelevant = occlude(img, src, (20, 20, 30, 30))
    r = engine.gradcam(np.stack([img, decisive, irrelevant]), "features", np.int32(0))
    before, after, control = r.probability
    assert before > 0.9
    assert control == pytest.approx(before, abs=1e-6)  # the bottom-right holds no red evidence
    if fill == "blur":  # blur keeps a faint smear of red: weaker, still a drop
        assert after < before - 0.2
    else:
        assert after < 0.2 and r.top[1] == CLASSES.index("background")


def test_patch_boxes_cover_the_image() -> None:
    b = patch_boxes((32, 30), 8, 5)
    assert b[0, 0].tolist() == [0, 0, 8, 8]
    assert b[-1, -1].tolist() == [22, 24, 30, 32]  # last positions touch the right and bottom edges
    cover = np.zeros((32, 30), bool)
    for x0, y0, x1, y1 in b.reshape(-1, 4):
        cover[y0:y1, x0:x1] = True
    assert cover.all()
    assert patch_boxes((16, 16), 64, 8).reshape(-1, 4).tolist() == [[0, 0, 16, 16]]


def test_sliding_map_peaks_over_the_decisive_region_and_matches_naive(engine: GradientEngine) -> None:
    images = np.stack([scene(red=True), scene(red=True, green=True)])
    targets = np.array([0, 1], np.int32)  # explain "red" on one, "green" on the other
    r = engine.sliding(images, targets, patch=8, stride=4, fill="gray")
    assert r.drops.shape == (2, 7, 7) and r.sensitivity.shape == (2, SIDE, SIDE)
    # Naive reference: occlude on the host, one position at a time.
    base = engine.gradcam(images, "features", targets).probability
    np.testing.assert_allclose(r.base, base, atol=1e-6)
    for n in range(2):
        for iy in range(7):
            for ix in range(7):
                box = tuple(r.boxes[iy, ix])
                p = engine.gradcam(occlude(images[n], np.full_like(images[n], 128), box)[None], "features",
                                   targets[n:n + 1]).probability[0]
                assert r.drops[n, iy, ix] == pytest.approx(base[n] - p, abs=1e-5)
    red_best = r.boxes[np.unravel_index(np.argmax(r.drops[0]), r.drops[0].shape)]
    cy, cx = (red_best[1] + red_best[3]) / 2, (red_best[0] + red_best[2]) / 2
    assert in_box((int(cy), int(cx)), RED_BOX)
    assert in_box(np.unravel_index(np.argmax(r.sensitivity[0]), (SIDE, SIDE)), RED_BOX)
    green_peak = np.unravel_index(np.argmax(r.sensitivity[1]), (SIDE, SIDE))
    assert green_peak[0] >= 16 and green_peak[1] >= 16
    assert engine.traces.get("occluded_probability") == 1


@pytest.mark.parametrize("fields, message", [
    ("type: gradcam\n    layer: head", "not feature maps"),
    ("type: occlusion\n    layer: features\n    masks: [{name: m, box: [0, 0, 4, 4], image: nope}]",
     "not among this section's images"),
    ("type: occlusion\n    layer: features\n    masks: [{name: m, box: [4, 4, 2, 8]}]", "is empty"),
    ("type: occlusion\n    layer: features\n    masks: [{name: m, box: [400, 400, 500, 500], image: a}]",
     "lies outside a.png"),
    ("type: occlusion\n    layer: features", "needs `masks:`"),
    ("type: saliency\n    target: 7", "out of range"),
    ("type: saliency\n    target: blue", "has no class 'blue'"),
])
def test_bad_input_is_a_located_error(tmp_path: Path, fields: str, message: str) -> None:
    from reportgen.runner import run

    (tmp_path / "photos").mkdir()
    Image.fromarray(scene().astype(np.uint8)).save(tmp_path / "photos" / "a.png")
    oracle_model().save(tmp_path / "oracle.keras")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""title: errors
output: out
formats: [html]
models:
  oracle: {{path: oracle.keras, preprocess: unit, class_names: [red, green, background]}}
datasets:
  photos: {{path: photos}}
sections:
  - model: oracle
    dataset: photos
    {fields}
""")
    with pytest.raises(ReportgenError, match=rf"spec\.yaml:\d+:\d+: .*{re.escape(message)}"):
        run(spec, quiet=True)
    assert not (tmp_path / "out").exists()
