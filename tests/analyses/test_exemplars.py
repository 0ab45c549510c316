"""exemplars: top-k images per unit with the peak's position, cropped to the unit's receptive field.

Oracles: a hand-set red detector over gray photos with red squares pasted at known places must crop
each of its top images around the square; the receptive field computed from the layer graph must equal
the nonzero region of d(unit at y, x)/d(input) on a small model with strides, "same" padding, zero
padding, dilation and pooling; a pass cut into many shards must keep exactly the top-k of one shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from reportgen.analyses import analysis_for
from reportgen.analyses.base import RunContext
from reportgen.datasets import DatasetRegistry, load_pixels
from reportgen.engine import topk
from reportgen.engine.receptive_field import receptive_field, source_box
from reportgen.execute import execute_dataset
from reportgen.models import ModelRegistry
from reportgen.plan import device_budget, plan_dataset
from reportgen.progress import Progress
from reportgen.runner import run
from reportgen.spec.load import load_spec
from reportgen.store import Store
from reportgen.work import peaks_key

SIDE = 32
# (width, height) of each photo and the [x0, y0, x1, y1) box of its red square, in the photo's pixels
PHOTOS = {
    "astronaut": ((80, 60), (50, 10, 62, 22)),
    "camera": ((48, 64), (6, 40, 18, 52)),
    "coffee": ((64, 64), (24, 24, 36, 36)),
    "chelsea": ((100, 50), (80, 30, 94, 44)),
    "rocket": ((40, 72), (20, 4, 32, 16)),
}


def red_detector() -> keras.Model:
    """Layer `red`: 3x3 stride-2 conv; filter 0 = relu(sum over the window of R - (G + B) / 2), filter 1
    the same for green. Layer `deep`: a 3x3 conv summing `red`'s filter 0 (and 1) over its window."""
    inp = keras.Input((SIDE, SIDE, 3))
    red = keras.layers.Conv2D(2, 3, strides=2, padding="same", activation="relu", use_bias=False, name="red")
    deep = keras.layers.Conv2D(2, 3, padding="valid", activation="relu", use_bias=False, name="deep")
    model = keras.Model(inp, deep(red(inp)))
    tap = np.full((3, 3), -0.5, np.float32)
    np.fill_diagonal(tap, 1.0)
    red.set_weights([np.broadcast_to(tap[:, :2] / 9.0, (3, 3, 3, 2)).copy()])
    deep.set_weights([np.broadcast_to(np.eye(2, dtype=np.float32) / 9.0, (3, 3, 2, 2)).copy()])
    return model


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gray photos of different sizes and aspects, each with a red square at a known place; the model."""
    from skimage import data

    root = tmp_path_factory.mktemp("exemplars")
    (root / "photos").mkdir()
    for name, ((w, h), (x0, y0, x1, y1)) in PHOTOS.items():
        image = getattr(data, name)()
        gray = np.asarray(Image.fromarray(image).convert("L").resize((w, h), Image.BILINEAR))
        pixels = np.repeat(gray[..., None], 3, axis=2)
        pixels[y0:y1, x0:x1] = (230, 20, 20)
        Image.fromarray(pixels).save(root / "photos" / f"{name}.png")
    red_detector().save(root / "red.keras")
    return root


def write_spec(root: Path, name: str, sections: list[dict[str, Any]]) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "title": "exemplars", "output": f"{name}/report", "cache": f"{name}-cache", "formats": ["html"],
        "models": {"red": {"path": "red.keras"}},
        "datasets": {"photos": {"path": "photos"}},
        "sections": sections,
    }))
    return path


def overlaps(a: list[int] | tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("layer", ["red", "deep"])
def test_exemplar_crops_of_a_red_detector_contain_the_red_square(project: Path, layer: str) -> None:
    spec = write_spec(project, f"red_{layer}", [
        {"type": "exemplars", "title": "red units", "model": "red", "dataset": "photos", "layer": layer,
         "filters": [0, 1], "top": 4, "bottom": 2},
    ])
    summary = run(spec, quiet=True)
    manifest = json.loads((summary.output / "manifest.json").read_text())
    arts = [a for s in manifest["sections"] for a in s["artifacts"] if a["kind"] == "exemplar"]
    # filter 1 (green) never fires on gray photos with red squares: no top exemplars, a finding; in `red`
    # its most negative pre-ReLU responses are on the red squares (`deep` sums `red` after its ReLU, so
    # nothing there goes below 0)
    assert not [a for a in arts if a["filter"] == 1 and a["polarity"] == "top"]
    assert "Filter 1 never fires" in " ".join(manifest["sections"][0]["findings"])
    green_bottom = [a for a in arts if a["filter"] == 1 and a["polarity"] == "bottom"]
    assert len(green_bottom) == (2 if layer == "red" else 0)
    for a in green_bottom:
        assert a["activation"] < 0 and overlaps(a["box"], PHOTOS[Path(a["source"]).stem][1]), a
    arts = [a for a in arts if a["filter"] == 0]
    top = [a for a in arts if a["polarity"] == "top"]
    assert [a["rank"] for a in top] == [1, 2, 3, 4]
    assert all(a["activation"] > 0 and a["filter"] == 0 and a["layer"] == layer for a in top)
    for a in top:  # the unit peaks on the square, so its receptive field, mapped back, overlaps it
        (w, h), square = PHOTOS[Path(a["source"]).stem]
        x0, y0, x1, y1 = a["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, a
        assert overlaps(a["box"], square), a
        crop = np.asarray(Image.open(summary.output / a["path"]).convert("RGB")).astype(int)
        assert ((crop[..., 0] > 200) & (crop[..., 1] < 60)).any(), a  # red pixels made it into the crop
    assert not [a for a in arts if a["polarity"] == "bottom"]  # nothing gray or red drives it below 0
    html = (summary.output / "report.html").read_text()
    assert "Filter 0" in html and top[0]["path"] in html


def gradient_box(model: keras.Model, y: int, x: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Bounding box [x0, y0, x1, y1) of the input pixels the unit at (y, x) of the output depends on,
    and the mask of those pixels (nonzero gradient)."""
    pixels = tf.constant(np.random.default_rng(0).uniform(0.5, 1.0, (1, *model.input_shape[1:])), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(pixels)
        unit = model(pixels)[0, y, x, 0]
    grad = np.abs(tape.gradient(unit, pixels).numpy()[0, ..., 0]) > 0
    ys, xs = np.nonzero(grad)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), grad


def test_receptive_field_equals_the_gradient_support() -> None:
    keras.utils.set_random_seed(3)
    positive = keras.initializers.RandomUniform(0.1, 1.0)
    conv = {"kernel_initializer": positive, "use_bias": False}
    inp = keras.Input((22, 19, 1))  # even: "same" pads 0 before, 1 after
    x = keras.layers.Conv2D(2, 3, strides=2, padding="same", **conv)(inp)
    x = keras.layers.ZeroPadding2D(((1, 0), (2, 1)))(x)
    x = keras.layers.AveragePooling2D(2, strides=1)(x)
    branch = keras.layers.Conv2D(2, 1, **conv)(x)
    x = keras.layers.Conv2D(2, 3, dilation_rate=2, padding="same", **conv)(x)
    x = keras.layers.Add()([x, branch])
    x = keras.layers.Conv2D(1, 3, strides=2, padding="valid", name="unit", **conv)(x)
    model = keras.Model(inp, x)
    field = receptive_field(model, "unit")
    h, w = model.output_shape[1:3]
    assert h >= 2 and w >= 2
    for y in range(h):
        for xx in range(w):
            expected, support = gradient_box(model, y, xx)
            box = field.box(y, xx, 22, 19)
            assert box == expected, (y, xx)
            assert support[box[1] : box[3], box[0] : box[2]].all()  # no holes: the box is the support


def test_boxes_map_back_to_the_source_pixels() -> None:
    assert source_box((8, 0, 16, 32), (32, 32), (64, 48)) == (16, 0, 32, 48)
    assert source_box((0, 0, 3, 3), (32, 32), (10, 10)) == (0, 0, 1, 1)  # grows outward to whole pixels


def test_topk_merge_of_shards_equals_one_shard() -> None:
    rng = np.random.default_rng(5)
    values = rng.integers(0, 6, (40, 7)).astype(np.float32)  # many ties
    values[[3, 17], 2] = np.nan  # undecodable images
    y, x = rng.integers(0, 9, (2, 40, 7))
    whole = topk.select(values, np.arange(40), y, x, 6)
    for cuts in ([0, 13, 14, 40], [0, 5, 10, 20, 30, 40]):
        parts = [topk.select(values[s:e], np.arange(s, e), y[s:e], x[s:e], 6)
                 for s, e in zip(cuts, cuts[1:], strict=False)]
        merged = topk.merge(parts, 6)
        assert all(np.array_equal(whole[f], merged[f], equal_nan=True) for f in topk.FIELDS)
    best = np.sort(np.nan_to_num(values, nan=-1), axis=0)[::-1][:6]
    assert np.array_equal(whole["value"], best)


def stored_peaks(root: Path, tmp: Path, name: str) -> dict[str, dict[str, np.ndarray]]:
    """Run the section's dataset pass through the planner and the executor; the merged pieces."""
    spec_path = write_spec(root, name, [
        {"type": "exemplars", "model": "red", "dataset": "photos", "layer": "deep", "filters": "0:2",
         "top": 3, "bottom": 2},
        {"type": "class_ranking", "model": "red", "dataset": "photos", "layer": "red", "filters": [0]},
    ])
    spec = load_spec(spec_path)
    ctx = RunContext(spec=spec, spec_path=spec_path, store=Store(tmp / name), staging=tmp / f"{name}-staging",
                     models=ModelRegistry(spec), datasets=DatasetRegistry(spec), ascent=None,
                     progress=Progress(quiet=True))
    for i, section in enumerate(spec.sections):
        with ctx.work.section(f"s{i}"):
            analysis_for(section.type).prepare(section, ctx, i)
    passes = plan_dataset(ctx.work, ctx.store, ctx.models, ctx.datasets, device_budget(), batch_size=2)
    assert len(passes) == 1  # top-k, bottom-k and the class ranking's means ride on one pass
    assert sorted(passes[0].pending) == ["bottomk:2:deep", "means:red", "topk:3:deep"]
    execute_dataset(passes, ctx)
    lm, ds = ctx.models.get("red"), ctx.datasets.get("photos")
    pieces = {stat: ctx.store.get_arrays(peaks_key(lm, ds, "deep", stat, k))
              for stat, k in (("topk", 3), ("bottomk", 2))}
    return pieces | {"shards": {"count": np.asarray(len(passes[0].shards))}}


def test_a_pass_in_many_shards_keeps_the_top_k_of_one(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = stored_peaks(project, tmp_path, "one")
    monkeypatch.setattr("reportgen.plan.SHARD_IMAGES", 2)
    many = stored_peaks(project, tmp_path, "many")
    assert int(one["shards"]["count"]) == 1 and int(many["shards"]["count"]) == 3
    for stat in ("topk", "bottomk"):
        for f in topk.FIELDS:
            assert np.array_equal(one[stat][f], many[stat][f], equal_nan=True), (stat, f)
    assert (one["topk"]["index"] >= 0).all() and one["topk"]["value"].shape == (3, 2)


def test_neuron_visualisation_ratio_is_over_the_top_exemplar_peak(project: Path) -> None:
    """A `neuron` objective (one position) is compared with the top exemplar's peak (one position too):
    exemplar_ratio = its activation / the largest peak of the unit over the photos, here by the model."""
    spec = write_spec(project, "neuron", [
        {"type": "filters", "model": "red", "layers": ["red"], "filters": [0], "recipe": "keras-example",
         "objective": "neuron", "params": {"steps": 3, "crop": 0}},
        {"type": "exemplars", "model": "red", "dataset": "photos", "layer": "red", "filters": [0], "top": 2},
    ])
    summary = run(spec, quiet=True)
    manifest = json.loads((summary.output / "manifest.json").read_text())
    [visual] = [a for a in manifest["sections"][0]["artifacts"] if a["kind"] == "filter"]
    ds = DatasetRegistry(load_spec(spec)).get("photos")
    pixels, _ = load_pixels(ds.items, (SIDE, SIDE), 3)
    model = keras.models.load_model(project / "red.keras")
    peak = keras.Model(model.inputs[0], model.get_layer("red").output)(pixels).numpy()[..., 0].max()
    assert peak > 0 and visual["exemplar_ratio"] == pytest.approx(visual["activation"] / peak, rel=1e-4)
