"""Grad-CAM++, LayerCAM, Score-CAM and Faster-ScoreCAM against references written here from the papers.

The references work one image at a time in float64 numpy on the feature maps and gradients of plain
Keras calls: Grad-CAM++ keeps exp(score) in its derivatives (Chattopadhay et al. 2018, eq. 19), which
the engine drops because it cancels; Score-CAM runs one masked forward pass per channel (Wang et al.
2020), which the engine batches across channels and images. The oracle model (class decided by a red
square in the top-left quadrant) checks that every method's peak lies on the decisive square.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from reportgen.engine.gradients import CAM_METHODS, GradientEngine
from reportgen.models import PRESETS, LoadedModel
from reportgen.spec.fields import Preprocess

SIDE = 32
RED_BOX = (4, 4, 12, 12)  # x0, y0, x1, y1 in the top-left quadrant
GREEN_BOX = (20, 20, 28, 28)  # in the bottom-right quadrant
MAX_DIFF: dict[str, float] = {}  # largest |engine - reference| per method (read it to report the match)


def oracle_model() -> keras.Model:
    """Hand-set: class 0 = 20 x mean redness in the top-left quadrant, class 1 = greenness in the
    bottom-right one, class 2 = constant 1.5; inputs 0..1 (`unit`). A 2x2 average pool makes the CAM
    layer coarser than the input, so upsampling is part of what is checked."""
    inp = keras.Input((SIDE, SIDE, 3))
    x = keras.layers.Conv2D(2, 1, activation="relu", name="detect")(inp)
    x = keras.layers.AveragePooling2D(2, name="features")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    k = np.zeros((1, 1, 3, 2), np.float32)
    k[0, 0, :, 0] = (1.0, -0.5, -0.5)
    k[0, 0, :, 1] = (-0.5, 1.0, -0.5)
    model.get_layer("detect").set_weights([k, np.zeros(2, np.float32)])
    q = SIDE // 4  # the quadrant on the 16x16 pooled grid
    w = np.zeros((SIDE // 2, SIDE // 2, 2, 3), np.float32)
    w[:q, :q, 0, 0] = 20.0 / (q * q)
    w[q:, q:, 1, 1] = 20.0 / (q * q)
    model.get_layer("head").set_weights([w.reshape(-1, 3), np.array([0.0, 0.0, 1.5], np.float32)])
    return model


def random_model(seed: int = 3) -> keras.Model:
    """Random weights, pooling, a tanh layer after the CAM layer (so the head is not linear in it) and a
    separate softmax: the maps of the methods differ from each other."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Conv2D(4, 1, activation="tanh", name="c3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inp, keras.layers.Activation("softmax")(x))


def loaded(model: keras.Model, preprocess: Preprocess) -> LoadedModel:
    h, w = model.input_shape[1:3]
    return LoadedModel("m", model, preprocess, (h, w), None, "test-digest", "test model")


def scene(red: float = 255, green: float = 0) -> np.ndarray:
    """Dark-gray 0..255 pixels with a red square of brightness `red` and a green one of `green` (0: none)."""
    img = np.full((SIDE, SIDE, 3), 20.0, np.float32)
    for value, (x0, y0, x1, y1), channel in ((red, RED_BOX, 0), (green, GREEN_BOX, 1)):
        if value:
            img[y0:y1, x0:x1] = 0
            img[y0:y1, x0:x1, channel] = value
    return img


# -- references: one image at a time, from the papers' formulas -------------------------------------


def probe(model: keras.Model, layer: str, logits_layer: str | None) -> keras.Model:
    """(feature maps, logits); without a logits layer, the logits are the input of the Dense softmax head."""
    head = model.get_layer(logits_layer).output if logits_layer else model.layers[-1].input
    return keras.Model(model.inputs, [model.get_layer(layer).output, head])


def logits_of(model: keras.Model, logits_layer: str | None, fmaps_and_z: list[tf.Tensor]) -> tf.Tensor:
    z = fmaps_and_z[1]
    if logits_layer is None:
        z = z @ model.layers[-1].kernel + model.layers[-1].bias
    return z


def activations_and_gradients(
    model: keras.Model, pre: Preprocess, layer: str, logits_layer: str | None, image: np.ndarray, target: int
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """A (h, w, K), dS/dA, the explained class and its logit S, for one image."""
    sub = probe(model, layer, logits_layer)
    x = loaded(model, pre).preprocess(tf.constant(image[None]))
    with tf.GradientTape() as tape:
        out = sub(x)
        tape.watch(out[0])
        z = logits_of(model, logits_layer, out)
        cls = int(np.argmax(z.numpy()[0])) if target < 0 else target
        score = z[0, cls]
    g = tape.gradient(score, out[0])[0].numpy().astype(np.float64)
    return out[0][0].numpy().astype(np.float64), g, cls, float(score)


def finish(cam: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Positive part / peak at the layer's resolution, and that map bilinearly upsampled to the input."""
    cam = np.maximum(cam, 0)
    if cam.max() > 0:
        cam = cam / cam.max()
    up = tf.image.resize(cam[..., None].astype(np.float32), size, method="bilinear").numpy()[..., 0]
    return cam, up


def ref_gradcam_pp(a: np.ndarray, g: np.ndarray, score: float) -> np.ndarray:
    """Eq. 19 with Y = exp(S): dY/dA = Y g, d2Y = Y g^2, d3Y = Y g^3 (piecewise-linear in A). alpha is
    divided by its spatial sum (the authors' code and tf-keras-vis), weights = sum alpha relu(dY/dA)."""
    y = np.exp(score)
    first, second, third = y * g, y * g**2, y * g**3
    denom = 2 * second + third * a.sum(axis=(0, 1), keepdims=True)
    alpha = second / np.where(denom != 0, denom, 1.0)
    norm = alpha.sum(axis=(0, 1), keepdims=True)
    alpha = alpha / np.where(norm != 0, norm, 1.0)
    weights = (alpha * np.maximum(first, 0)).sum(axis=(0, 1))
    return (a * weights).sum(-1)


def ref_layercam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Jiang et al. 2021: every location weighted by its own positive gradient."""
    return (np.maximum(g, 0) * a).sum(-1)


def ref_gradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    return (a * g.mean(axis=(0, 1))).sum(-1)


def ref_scorecam(
    model: keras.Model,
    pre: Preprocess,
    logits_layer: str | None,
    image: np.ndarray,
    a: np.ndarray,
    cls: int,
    channels: list[int],
) -> np.ndarray:
    """Wang et al. 2020, one masked forward pass at a time: each channel's map upsampled, min-max scaled,
    times the preprocessed input; its weight is the class's softmax probability for that input."""
    size = image.shape[:2]
    x = loaded(model, pre).preprocess(tf.constant(image[None])).numpy()[0]
    sub = probe(model, model.layers[1].name, logits_layer)  # any layer: only the logits are used
    weights = np.zeros(a.shape[-1])
    for k in channels:
        up = tf.image.resize(a[..., k, None].astype(np.float32), size, method="bilinear").numpy()
        mask = (up - up.min()) / (up.max() - up.min() + 1e-7)
        z = logits_of(model, logits_layer, sub(tf.constant((x * mask)[None]))).numpy()[0].astype(np.float64)
        p = np.exp(z - z.max())
        weights[k] = p[cls] / p.sum()
    return (a * weights).sum(-1)


def compare(method: str, got: np.ndarray, want: np.ndarray) -> None:
    MAX_DIFF[method] = max(MAX_DIFF.get(method, 0.0), float(np.abs(got - want).max()))
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=method)


# -- the engine against the references ----------------------------------------------------------------


def test_gradient_cams_equal_the_paper_formulas() -> None:
    model = random_model()
    pre = PRESETS["tf"]
    eng = GradientEngine(loaded(model, pre), batch_size=2)
    images = np.random.default_rng(0).uniform(0, 255, (5, 24, 24, 3)).astype(np.float32)
    targets = np.array([-1, 2, -1, 4, 0], np.int32)
    r = eng.cams(images, "c2", targets, ["gradcam++", "layercam", "gradcam"])
    assert list(r.heatmaps) == ["gradcam++", "layercam", "gradcam"]  # the order asked for
    for i in range(len(images)):
        a, g, cls, score = activations_and_gradients(model, pre, "c2", "logits", images[i], int(targets[i]))
        assert r.classes[i] == cls
        for method, raw in (
            ("gradcam++", ref_gradcam_pp(a, g, score)),
            ("layercam", ref_layercam(a, g)),
            ("gradcam", ref_gradcam(a, g)),
        ):
            conv, up = finish(raw, (24, 24))
            compare(method, r.maps[method][i], conv)
            compare(method, r.heatmaps[method][i], up)
    # The methods really differ on this model: each reference check could tell them apart.
    assert np.abs(r.maps["gradcam++"] - r.maps["layercam"]).max() > 0.05
    assert np.abs(r.maps["gradcam++"] - r.maps["gradcam"]).max() > 0.05
    assert r.masked_passes == 0
    eng.cams(images[:1], "c2", 0, ["layercam"])
    assert eng.traces == {"gradcam:c2": 1}  # chunk sizes 2 and 1, another call: one trace


def test_scorecam_equals_one_pass_per_channel_for_any_batch() -> None:
    model = random_model(seed=5)
    pre = PRESETS["tf"]
    images = np.random.default_rng(1).uniform(0, 255, (3, 24, 24, 3)).astype(np.float32)
    targets = np.array([-1, 1, 3], np.int32)
    runs = {}
    for batch in (1, 5, 64):  # one row at a time; chunks that cross images; all 3 x 8 masks in one batch
        eng = GradientEngine(loaded(model, pre), batch_size=batch)
        runs[batch] = eng.cams(images, "c2", targets, ["scorecam", "faster-scorecam"], max_n=3)
        assert runs[batch].masked_passes == 3 * 8  # Faster-ScoreCAM reuses Score-CAM's probabilities
        assert eng.traces == {"gradcam:c2": 1, "scorecam": 1}
    for batch in (5, 64):
        for m in ("scorecam", "faster-scorecam"):
            np.testing.assert_allclose(runs[batch].maps[m], runs[1].maps[m], atol=1e-6)
    r = runs[5]
    for i in range(len(images)):
        a, _, cls, _ = activations_and_gradients(model, pre, "c2", "logits", images[i], int(targets[i]))
        std = a.std(axis=(0, 1))
        top3 = sorted(np.argsort(-std)[:3].tolist())
        for method, channels in (("scorecam", list(range(8))), ("faster-scorecam", top3)):
            conv, up = finish(ref_scorecam(model, pre, "logits", images[i], a, cls, channels), (24, 24))
            compare(method, r.maps[method][i], conv)
            compare(method, r.heatmaps[method][i], up)
    assert np.abs(r.maps["scorecam"] - r.maps["faster-scorecam"]).max() > 0.01  # 3 of 8 channels differ

    alone = GradientEngine(loaded(model, pre), batch_size=4)
    fast = alone.cams(images, "c2", targets, ["faster-scorecam"], max_n=3)
    assert fast.masked_passes == 3 * 3  # only the kept channels are run
    np.testing.assert_allclose(fast.maps["faster-scorecam"], r.maps["faster-scorecam"], atol=1e-6)
    alone.cams(images[:2], "c2", -1, ["faster-scorecam"], max_n=8)
    assert alone.traces == {"gradcam:c2": 1, "scorecam": 1}


def test_every_method_peaks_on_the_decisive_square() -> None:
    model = oracle_model()
    eng = GradientEngine(loaded(model, PRESETS["unit"]), batch_size=4)
    # The brighter square's channel varies most, so Faster-ScoreCAM with one channel keeps the explained
    # class's channel (its choice ignores the class: with equal squares it would keep channel 0, red).
    images = np.stack([scene(), scene(255, 128), scene(128, 255)])
    r = eng.cams(images, "features", np.array([-1, 0, 1], np.int32), CAM_METHODS, max_n=1)
    assert r.classes.tolist() == [0, 0, 1]
    for method in CAM_METHODS:
        for heat, box in zip(r.heatmaps[method], (RED_BOX, RED_BOX, GREEN_BOX), strict=True):
            y, x = np.unravel_index(np.argmax(heat), heat.shape)
            assert box[0] <= x < box[2] and box[1] <= y < box[3], method
            assert heat.max() == pytest.approx(1.0)
    # Through the Dense softmax head (logits = the head's input) the references agree as well.
    for i, t in enumerate((-1, 0, 1)):
        a, g, cls, score = activations_and_gradients(model, PRESETS["unit"], "features", None, images[i], t)
        compare("gradcam++", r.heatmaps["gradcam++"][i], finish(ref_gradcam_pp(a, g, score), (SIDE, SIDE))[1])
        compare("layercam", r.heatmaps["layercam"][i], finish(ref_layercam(a, g), (SIDE, SIDE))[1])
        raw = ref_scorecam(model, PRESETS["unit"], None, images[i], a, cls, [0, 1])
        compare("scorecam", r.heatmaps["scorecam"][i], finish(raw, (SIDE, SIDE))[1])


def test_tf_keras_vis_gives_the_same_maps() -> None:
    """An independent implementation (tf-keras-vis 0.8.7, a test dependency): its un-normalised CAMs at the
    layer's resolution on the logits (ReplaceToLinear; its Score-CAM applies the softmax to them),
    peak-normalised as reportgen does. Its Score-CAM upsamples the masks with scipy's corner-aligned zoom
    where reportgen (and the paper's PyTorch code) interpolate with half-pixel centres, so Score-CAM is
    compared at c1, a layer as large as the input (no upsampling)."""
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    model = random_model(seed=7)
    pre = PRESETS["tf"]
    images = np.random.default_rng(2).uniform(0, 255, (2, 24, 24, 3)).astype(np.float32)
    eng = GradientEngine(loaded(model, pre), batch_size=8)
    ours = {
        "c2": eng.cams(images, "c2", -1, ["gradcam++", "layercam"]),
        "c1": eng.cams(images, "c1", -1, ["scorecam"]),
    }
    x = loaded(model, pre).preprocess(tf.constant(images)).numpy()
    kw = {"expand_cam": False, "normalize_cam": False}
    score = CategoricalScore(ours["c2"].classes.tolist())
    theirs = {
        ("gradcam++", "c2"): GradcamPlusPlus(model, ReplaceToLinear(), clone=True)(
            score, x, penultimate_layer="c2", **kw
        ),
        ("layercam", "c2"): Layercam(model, ReplaceToLinear(), clone=True)(
            score, x, penultimate_layer="c2", **kw
        ),
        ("scorecam", "c1"): Scorecam(model, ReplaceToLinear(), clone=True)(
            CategoricalScore(ours["c1"].classes.tolist()), x, penultimate_layer="c1", **kw
        ),
    }
    for (method, layer), cams in theirs.items():
        for i, cam in enumerate(np.asarray(cams)):
            want = finish(np.asarray(cam, np.float64), (24, 24))[0]
            compare(f"{method} (tf-keras-vis)", ours[layer].maps[method][i], want)


# -- the section: side by side, every map saved raw -------------------------------------------------


def test_section_saves_every_method_as_a_map_artifact(tmp_path: Path) -> None:
    from reportgen.runner import run

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(scene().astype(np.uint8)).save(photos / "red.png")
    Image.fromarray(scene(255, 128).astype(np.uint8)).save(photos / "both.png")
    oracle_model().save(tmp_path / "oracle.keras")
    (tmp_path / "spec.yaml").write_text(
        f"""
title: CAM methods
output: out
formats: [html]
models:
  oracle: {{path: oracle.keras, preprocess: unit, class_names: {json.dumps(["red", "green", "background"])}}}
datasets:
  photos: {{path: photos}}
sections:
  - type: gradcam
    model: oracle
    dataset: photos
    layer: features
    target: red
    methods: [gradcam, gradcam++, layercam, scorecam, faster-scorecam]
    max_n: 1
"""
    )
    first = run(tmp_path / "spec.yaml", quiet=True)
    assert first.computed == 1
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    (section,) = manifest["sections"]
    maps = [a for a in section["artifacts"] if a["kind"] == "map"]
    assert {(a["method"], a["image"], a["resolution"]) for a in maps} == {
        (m, im, res) for m in CAM_METHODS for im in ("red.png", "both.png") for res in ("conv", "input")
    }
    for a in maps:
        values = np.load(out / a["path"], allow_pickle=False)
        assert values.shape == ((16, 16) if a["resolution"] == "conv" else (SIDE, SIDE))
        assert list(values.shape) == a["shape"] and a["layer"] == "features" and a["class"] == "red"
        y, x = np.unravel_index(np.argmax(values), values.shape)
        scale = 2 if a["resolution"] == "conv" else 1
        assert RED_BOX[0] <= (x + 0.5) * scale <= RED_BOX[2] and RED_BOX[1] <= (y + 0.5) * scale <= RED_BOX[3]
    html = (out / "report.html").read_text()
    for label in ("Grad-CAM++", "LayerCAM", "Score-CAM", "Faster-ScoreCAM"):
        assert label in html
    assert run(tmp_path / "spec.yaml", quiet=True).computed == 0
