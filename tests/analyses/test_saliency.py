"""The `saliency` section with every attribution method and a unit target, run in process on the oracle
classifier (tests/oracles.py: class "red" = redness in the top-left quadrant; layer `features` channel 0
= redness), checking the manifest's raw map artifacts against what the model makes certain."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from oracles import CLASSES, RED_BOX, SIDE, oracle_model, scene
from PIL import Image

from reportgen.errors import SpecError
from reportgen.runner import run

METHODS = ["vanilla", "smoothgrad", "integrated_gradients", "vargrad", "gradient_x_input", "guided_backprop",
           "deconvnet"]
SPEC = f"""
title: Attribution methods
output: out
formats: [html]
models:
  oracle: {{path: oracle.keras, preprocess: unit, class_names: {json.dumps(CLASSES)}}}
  smooth: {{path: smooth.keras, preprocess: unit}}
datasets:
  photos: {{path: photos}}
sections:
  - type: saliency
    model: oracle
    dataset: photos
    target: red
    methods: {json.dumps(METHODS)}
    samples: 3
    ig_steps: 16
    ig_baseline: blur
  - type: saliency
    model: oracle
    dataset: photos
    target: {{layer: features, filter: 0}}
    methods: [vanilla, guided_backprop]
  - type: saliency
    model: smooth
    dataset: photos
    limit: 1
    methods: [guided_backprop]
"""


def write_project(root: Path, spec: str = SPEC) -> Path:
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(scene(red=True).astype(np.uint8)).save(photos / "red.png")
    Image.fromarray(scene(red=True, green=True).astype(np.uint8)).save(photos / "both.png")
    oracle_model().save(root / "oracle.keras")
    inp = keras.Input((SIDE, SIDE, 3))  # tanh only: nothing for guided backprop to override
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3, activation="tanh")(inp))
    keras.Model(inp, keras.layers.Dense(2)(x)).save(root / "smooth.keras")
    (root / "spec.yaml").write_text(spec, encoding="utf-8")
    return root / "spec.yaml"


def test_every_method_saves_signed_input_maps_and_ig_adds_up(tmp_path: Path) -> None:
    spec = write_project(tmp_path)
    first = run(spec, quiet=True)
    assert first.computed == 3
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    by_class, by_unit, _ = manifest["sections"]
    maps = [a for a in by_class["artifacts"] if a["kind"] == "map"]
    images = ("red.png", "both.png")
    assert {(a["method"], a["image"]) for a in maps} == {(m, i) for m in METHODS for i in images}
    x0, y0, x1, y1 = RED_BOX
    for a in maps:
        values = np.load(out / a["path"], allow_pickle=False)
        assert values.shape == (SIDE, SIDE, 3) and a["shape"] == [SIDE, SIDE, 3]
        assert a["resolution"] == "input" and a["class"] == "red"
        if a["method"] == "vargrad":
            assert values.min() >= 0 and values.max() > 0
            continue
        # The red channel of the red square raises the "red" score: signed values, not magnitudes.
        assert values[y0:y1, x0:x1, 0].sum() > 0
        if a["method"] in ("vanilla", "gradient_x_input", "guided_backprop"):
            # Only the red square moves it: the ReLUs gate everything else off (without noise, a path
            # from a baseline or deconvnet's rule, which ignores the forward gate).
            outside = values.copy()
            outside[y0:y1, x0:x1] = 0
            assert np.abs(outside).max() == 0
        if a["method"] == "integrated_gradients":
            assert a["baseline"] == "blur" and a["steps"] == 16
            total = float(values.sum(dtype=np.float64))
            assert total == pytest.approx(a["score_difference"], rel=0.02)
            assert abs(total - a["score_difference"]) == pytest.approx(
                a["completeness_error"] * abs(a["score_difference"]), rel=1e-2, abs=1e-6)
        if a["method"] == "gradient_x_input":
            vanilla = next(b for b in maps if b["method"] == "vanilla" and b["image"] == a["image"])
            pixels = np.asarray(Image.open(tmp_path / "photos" / a["image"]), np.float32)
            np.testing.assert_allclose(values, np.load(out / vanilla["path"]) * pixels, rtol=1e-5, atol=1e-9)
    assert any("add up to the score difference" in f for f in by_class["findings"])
    unit_maps = [a for a in by_unit["artifacts"] if a["kind"] == "map"]
    assert {a["method"] for a in unit_maps} == {"vanilla", "guided_backprop"}
    for a in unit_maps:
        assert a["unit"] == {"layer": "features", "filter": 0} and a["layer"] == "features"
        values = np.load(out / a["path"])
        # The redness unit's mean activation: R raises it, G lowers it, only on the red square (guided
        # backprop gates the ReLUs' gradients, not the last conv's signed weights).
        assert values[y0:y1, x0:x1, 0].min() > 0 and values[y0:y1, x0:x1, 1].max() < 0
        outside = values.copy()
        outside[y0:y1, x0:x1] = 0
        assert np.abs(outside).max() == 0
    html = (out / "report.html").read_text()
    for label in ("integrated gradients", "VarGrad", "guided backprop", "deconvnet", "blur baseline",
                  "filter 0 of layer &#39;features&#39;"):
        assert label in html
    # the tanh model's guided maps are plain gradients, and the report says so (once: not for the oracle)
    assert html.count("no ReLU that guided backprop or deconvnet can override") == 1
    assert run(spec, quiet=True).computed == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [("{layer: nope, filter: 0}", "has no layer 'nope'"), ("{layer: features, filter: 5}", "has 2 filters")],
)
def test_unit_target_errors_name_the_field(tmp_path: Path, target: str, message: str) -> None:
    text = SPEC.replace("{layer: features, filter: 0}", target)
    line = text.splitlines().index(f"    target: {target}") + 1
    spec = write_project(tmp_path, text)
    with pytest.raises(SpecError) as err:
        run(spec, quiet=True)
    assert message in str(err.value) and f"spec.yaml:{line}:" in str(err.value)  # the unit's line


FAITHFUL_SPEC = SPEC[: SPEC.index("sections:")] + """sections:
  - type: saliency
    model: oracle
    dataset: photos
    images: [red.png]
    target: red
    methods: [vanilla, gradient_x_input]
    faithfulness: true
"""


def test_faithfulness_areas_are_the_curves_of_the_shown_maps(tmp_path: Path) -> None:
    """`faithfulness: true` puts each map's deletion/insertion areas in the manifest: equal to the curves
    recomputed here from the saved signed maps reduced as the section shows them, and on the oracle (class
    "red" = the red square) deleting in the map's order kills the score long before inserting restores it."""
    from oracles import loaded

    from reportgen.engine.faithfulness import curve_program
    from reportgen.models import PRESETS

    spec = write_project(tmp_path, FAITHFUL_SPEC)
    assert run(spec, quiet=True).computed == 1
    out = tmp_path / "out"
    (section,) = json.loads((out / "manifest.json").read_text())["sections"]
    rows = {a["method"]: a for a in section["artifacts"] if a["kind"] == "faithfulness"}
    assert set(rows) == {"vanilla", "gradient_x_input"}
    assert all(a["image"] == "red.png" for a in rows.values())
    maps = {a["method"]: np.load(out / a["path"]) for a in section["artifacts"] if a["kind"] == "map"}
    shown = {"vanilla": np.abs(maps["vanilla"]).max(-1),
             "gradient_x_input": np.abs(maps["gradient_x_input"].sum(-1))}  # fmt: skip
    pixels = np.asarray(Image.open(tmp_path / "photos" / "red.png"), np.float32)[None]
    lm = loaded(keras.models.load_model(tmp_path / "oracle.keras"), PRESETS["unit"], CLASSES)
    program = curve_program(lm, 4)
    red = np.asarray([CLASSES.index("red")], np.int32)
    for method, values in shown.items():
        curves = program.curves(pixels, values[None], red, 16, "blur", 0, [0])
        assert rows[method]["deletion_auc"] == pytest.approx(float(curves.deletion_auc[0]), abs=2e-4)
        assert rows[method]["insertion_auc"] == pytest.approx(float(curves.insertion_auc[0]), abs=2e-4)
        assert rows[method]["deletion_auc"] < rows[method]["insertion_auc"]
    assert any("deletion area" in f for f in section["findings"])


def test_faithfulness_needs_a_class_target(tmp_path: Path) -> None:
    text = FAITHFUL_SPEC.replace("target: red", "target: {layer: features, filter: 0}")
    line = text.splitlines().index("    faithfulness: true") + 1
    spec = write_project(tmp_path, text)
    with pytest.raises(SpecError) as err:
        run(spec, quiet=True)
    assert "a unit target has none" in str(err.value) and f"spec.yaml:{line}:" in str(err.value)
