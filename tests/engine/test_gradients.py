"""Grad-CAM and saliency engines against oracles and naive references, and the three sections end to end.

The oracle model has hand-set weights: a 3x3 conv turns "redness" (R - (G+B)/2) and "greenness" into two
channels, a 1x1 identity conv passes them on, and a dense head scores red in the top-left quadrant
(class "red"), green in the bottom-right quadrant (class "green") against a constant ("background").
So the evidence for each class lies in a known region, and a gray or black box over it removes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import CLASSES, GREEN_BOX, RED_BOX, SIDE, in_box, loaded, oracle_model, random_model, scene
from PIL import Image

from reportgen.engine.gradients import GradientEngine, saliency_map, smoothgrad_noise
from reportgen.models import PRESETS
from reportgen.spec.fields import Preprocess


def reference_gradcam(model: keras.Model, preprocess: Preprocess, layer: str, logits_layer: str | None,
                      image: np.ndarray, target: int | None) -> tuple[np.ndarray, int]:
    """Textbook Grad-CAM for one image. Logits come from the named layer, or from the Dense head's kernel."""
    lm = loaded(model, preprocess)
    if logits_layer is not None:
        outputs = [model.get_layer(layer).output, model.get_layer(logits_layer).output]
        probe = keras.Model(model.inputs, outputs)
    else:
        head = model.layers[-1]
        probe = keras.Model(model.inputs, [model.get_layer(layer).output, head.input])
    x = lm.preprocess(tf.constant(image[None]))
    with tf.GradientTape() as tape:
        fmap, z = probe(x)
        if logits_layer is None:
            z = z @ model.layers[-1].kernel + model.layers[-1].bias
        cls = int(np.argmax(z.numpy()[0])) if target is None else target
        score = z[0, cls]
    grads = tape.gradient(score, fmap)[0].numpy()
    fmap = fmap[0].numpy()
    weights = grads.mean(axis=(0, 1))
    cam = np.maximum((fmap * weights).sum(-1), 0)
    if cam.max() > 0:
        cam = cam / cam.max()
    cam = tf.image.resize(cam[..., None], image.shape[:2], method="bilinear").numpy()[..., 0]
    return cam, cls


def reference_input_gradient(model: keras.Model, preprocess: Preprocess, logits_layer: str,
                             image: np.ndarray, target: int) -> np.ndarray:
    lm = loaded(model, preprocess)
    probe = keras.Model(model.inputs, model.get_layer(logits_layer).output)
    x = tf.constant(image[None])
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = probe(lm.preprocess(x))[0, target]
    return tape.gradient(score, x)[0].numpy()


# -- Grad-CAM -------------------------------------------------------------------------------------


def test_gradcam_peaks_where_the_class_evidence_is() -> None:
    eng = GradientEngine(loaded(oracle_model(), PRESETS["unit"], CLASSES), batch_size=4)
    both = scene(red=True, green=True)
    images = np.stack([scene(), both, both])
    r = eng.gradcam(images, "features", np.array([-1, 0, 1], np.int32))
    assert r.classes.tolist() == [0, 0, 1]  # top prediction of a red-only image is "red"
    assert r.probability[0] > 0.9 and r.top[0] == 0
    assert r.heatmaps.shape == (3, SIDE, SIDE)
    assert r.heatmaps.min() >= 0 and np.isclose(r.heatmaps.max(axis=(1, 2)), 1).all()
    peaks = [np.unravel_index(np.argmax(h), h.shape) for h in r.heatmaps]
    assert in_box(peaks[0], RED_BOX) and in_box(peaks[1], RED_BOX)
    assert in_box(peaks[2], GREEN_BOX)  # the same image, explained for "green": evidence moves
    # Class-discriminative: the "red" map has no heat on the green square and vice versa.
    gx0, gy0, gx1, gy1 = GREEN_BOX
    assert r.heatmaps[1][gy0 + 1:gy1 - 1, gx0 + 1:gx1 - 1].max() == 0
    np.testing.assert_allclose(r.probs.sum(-1), 1, atol=1e-6)


@pytest.mark.parametrize("channels", [3, 1])
def test_gradcam_matches_reference_and_never_retraces(channels: int) -> None:
    model = random_model(channels)
    pre = PRESETS["tf"]
    eng = GradientEngine(loaded(model, pre), batch_size=3)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (7, 24, 24, channels)).astype(np.float32)
    targets = np.array([-1, 2, -1, 4, 0, -1, 1], np.int32)
    r = eng.gradcam(images, "c2", targets)
    for i in range(len(images)):
        t = None if targets[i] < 0 else int(targets[i])
        ref, cls = reference_gradcam(model, pre, "c2", "logits", images[i], t)
        assert r.classes[i] == cls
        np.testing.assert_allclose(r.heatmaps[i], ref, atol=1e-5)
    eng.gradcam(images[:1], "c2", 0)
    eng.gradcam(images[:5], "c2", -1)
    assert eng.traces == {"gradcam:c2": 1}  # 3 chunk sizes, 3 calls, new targets: one trace


def test_gradcam_reference_through_dense_softmax_head() -> None:
    model = oracle_model()
    eng = GradientEngine(loaded(model, PRESETS["unit"]), batch_size=8)
    rng = np.random.default_rng(3)
    images = np.stack([scene(red=True, green=True) + rng.uniform(0, 30, (SIDE, SIDE, 3)) for _ in range(3)])
    r = eng.gradcam(images.astype(np.float32), "detect", np.array([0, 1, -1], np.int32))
    for i, t in enumerate([0, 1, None]):
        ref, cls = reference_gradcam(model, PRESETS["unit"], "detect", None, images[i].astype(np.float32), t)
        assert r.classes[i] == cls
        np.testing.assert_allclose(r.heatmaps[i], ref, atol=1e-5)


# -- saliency -------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 1])
def test_vanilla_saliency_matches_reference(channels: int) -> None:
    model = random_model(channels, seed=2)
    pre = PRESETS["tf"]
    eng = GradientEngine(loaded(model, pre), batch_size=2)
    images = np.random.default_rng(1).uniform(0, 255, (5, 24, 24, channels)).astype(np.float32)
    maps, g = eng.vanilla(images, -1)
    assert maps.shape == (5, 24, 24)
    for i in range(5):
        ref = reference_input_gradient(model, pre, "logits", images[i], int(g.classes[i]))
        np.testing.assert_allclose(g.gradients[i], ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(maps[i], np.abs(ref).max(-1), rtol=1e-5, atol=1e-7)
    assert eng.traces == {"input_gradients": 1}


def test_smoothgrad_zero_noise_is_vanilla_and_matches_reference() -> None:
    model = random_model(3, seed=4)
    pre = PRESETS["tf"]
    eng = GradientEngine(loaded(model, pre), batch_size=5)  # 3 images x 4 samples: chunks cross images
    images = np.random.default_rng(2).uniform(0, 255, (3, 24, 24, 3)).astype(np.float32)
    vanilla, g = eng.vanilla(images, -1)
    still = eng.smoothgrad(images, g.classes, 4, 0.0, seed=0)
    np.testing.assert_allclose(still, vanilla, rtol=1e-5, atol=1e-8)
    noisy = eng.smoothgrad(images, g.classes, 4, 0.2, seed=7)
    assert not np.allclose(noisy, vanilla, rtol=1e-3)
    for i in range(3):
        copies = images[i] + smoothgrad_noise(7, i, 4, images.shape[1:], 0.2 * 255)
        grads = [reference_input_gradient(model, pre, "logits", c, int(g.classes[i])) for c in copies]
        mean = np.mean(grads, axis=0)
        np.testing.assert_allclose(noisy[i], np.abs(mean).max(-1), rtol=1e-4, atol=1e-7)
    assert eng.traces == {"input_gradients": 1}


def test_saliency_of_the_oracle_lies_on_the_decisive_square() -> None:
    eng = GradientEngine(loaded(oracle_model(), PRESETS["unit"], CLASSES))
    maps, g = eng.vanilla(scene(red=True)[None], 0)
    m = maps[0]
    x0, y0, x1, y1 = RED_BOX
    assert m[y0:y1, x0:x1].min() > 0
    outside = m.copy()
    outside[y0:y1, x0:x1] = 0
    assert outside.max() == 0  # relu: nothing outside the red square moves the "red" score
    np.testing.assert_array_equal(saliency_map(g.gradients), maps)


# -- end to end -----------------------------------------------------------------------------------


def _write_spec(tmp_path: Path) -> Path:
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).resize((64, 48), Image.BILINEAR).save(photos / f"{name}.png")
    # A synthetic scene whose "red" evidence is known, at twice the model's size (boxes scale by 2).
    big = np.kron(scene(red=True), np.ones((2, 2, 1))).astype(np.uint8)
    Image.fromarray(big).save(photos / "red_square.png")
    oracle_model().save(tmp_path / "oracle.keras")
    gray = random_model(1, seed=5)
    gray.save(tmp_path / "gray.keras")
    (tmp_path / "spec.yaml").write_text(f"""
title: Gradient sections
output: out
formats: [html]
models:
  oracle: {{path: oracle.keras, preprocess: unit, class_names: {json.dumps(CLASSES)}}}
  gray: {{path: gray.keras, preprocess: tf}}
datasets:
  photos: {{path: photos}}
sections:
  - type: gradcam
    model: oracle
    dataset: photos
    layer: features
  - type: gradcam
    model: gray
    dataset: photos
    layer: c2
    limit: 2
  - type: occlusion
    model: oracle
    dataset: photos
    layer: features
    images: [red_square, astronaut]
    masks:
      - {{name: red square, box: [8, 8, 24, 24], image: red_square}}
      - {{name: corner, box: [44, 36, 60, 44], fill: black}}
    sliding: {{patch: 8, stride: 4}}
  - type: saliency
    model: gray
    dataset: photos
    samples: 3
    noise: 0.1
""")
    return tmp_path / "spec.yaml"


def test_sections_end_to_end_and_rerun_computes_nothing(tmp_path: Path) -> None:
    from reportgen.runner import run

    spec = _write_spec(tmp_path)
    first = run(spec, quiet=True)
    assert first.computed == 4
    out = tmp_path / "out"
    html = (out / "report.html").read_text()
    for text in ("type-gradcam", "type-occlusion", "type-saliency", "SmoothGrad", "red square", "sliding"):
        assert text in html
    manifest = json.loads((out / "manifest.json").read_text())
    by_type = {}
    for s in manifest["sections"]:
        by_type.setdefault(s["type"], []).append(s)
    cam = by_type["gradcam"][0]
    heat = [a for a in cam["artifacts"] if a["kind"] == "heatmap"]
    assert len(heat) == 3 and all((out / a["path"]).is_file() for a in cam["artifacts"])
    red = next(a for a in heat if a["image"] == "red_square.png")
    assert red["class"] == "red" and red["region"] == "upper left"
    assert any("red_square.png" in f for f in cam["findings"])
    occ = by_type["occlusion"][0]
    rows = {(a["image"], a["mask"]): a for a in occ["artifacts"] if a["kind"] == "heatmap" and "mask" in a}
    hidden = rows[("red_square.png", "red square")]
    assert hidden["after"] < 0.2 < hidden["before"] and hidden["top_after"] == "background"
    assert abs(rows[("red_square.png", "corner")]["change"]) < 1e-3
    assert ("astronaut.png", "red square") not in rows  # an image-specific mask
    assert "red square" in occ["findings"][0] and "new top class: background" in occ["findings"][0]
    sal = by_type["saliency"][0]
    assert {a["method"] for a in sal["artifacts"] if a["kind"] == "heatmap"} == {"vanilla", "smoothgrad"}
    for s in manifest["sections"]:
        for a in s["artifacts"]:
            assert (out / a["path"]).is_file()
    # Images are upscaled for print: 32-px model inputs become >= 192 px.
    assert min(Image.open(out / heat[0]["path"]).size) >= 192

    again = run(spec, quiet=True)
    assert again.computed == 0 and again.reused == 4
