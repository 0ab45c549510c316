"""The `sanity` section and `gradcam`'s `faithfulness: true`: Grad-CAM on a model trained here, and a real
run whose manifest carries the randomisation and faithfulness rows and whose findings flag the method
that ignores the model (gradient x input of a linear edge detector)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from oracles import ATTRIBUTION, edge_model, loaded, shapes
from PIL import Image

from reportgen.analyses.sanity import final_similarity
from reportgen.engine import sanity_batches as sb
from reportgen.errors import ReportgenError
from reportgen.models import PRESETS


def left_or_right(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32x32 gray noise with a white 6x6 square in the left (class 0) or right (class 1) third."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, (n, 32, 32, 1)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        cx, cy = rng.integers(0, 10) + (18 if y[i] else 0), rng.integers(0, 26)
        x[i, cy : cy + 6, cx : cx + 6] = 255
    return x, y


def test_gradcam_of_a_trained_cnn_loses_its_map_when_the_weights_are_randomised() -> None:
    """A small CNN trained here for 32 steps (test accuracy 1.0 on the square's side). Measured: Grad-CAM's
    maps go flat once the head is randomised (no ranking: NaN, counted 0) and correlate at about 0.02 on
    average with everything randomised, so the check passes it; gradient x input keeps about 0.56, guided
    backprop about 0.07 (0.31 with only the head randomised)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="feat")(h)
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head")(h))
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = left_or_right(512, 1)
    model.fit(x / 255, y, batch_size=32, epochs=2, verbose=0)
    xt, yt = left_or_right(64, 2)
    assert model.evaluate(xt / 255, yt, verbose=0)[1] > 0.9  # it learned the task
    params = {"methods": ["gradcam", "gradient_x_input", "guided_backprop"], "layer": "feat", "max_n": 1,
              "target": -1, "steps": 8, "baseline": "blur", "depth": None, "seed": 0,
              **ATTRIBUTION}  # fmt: skip
    a = sb.sanity(loaded(model, PRESETS["unit"]), xt[:4], np.arange(4), params, 16)
    cam, gxi = a["spearman_gradcam"], a["spearman_gradient_x_input"]
    assert cam.shape == gxi.shape == (4, 3)  # head, feat, c1
    assert final_similarity(cam) < 0.5  # passes at the section's default threshold
    assert final_similarity(cam) < final_similarity(gxi)
    assert np.nanmax(np.abs(cam[:, -1])) < 0.5
    # guided backprop (run on the engine's ReLU-overridden copy, kept in step with the cascade) passes on
    # this shallow net: about 0.07 at the end; its first step keeps more than Grad-CAM's flat maps
    assert final_similarity(a["spearman_guided_backprop"]) < 0.5
    gbp = a["spearman_guided_backprop"]
    assert not np.allclose(gbp[:, 0], gbp[:, -1])  # the overridden copy followed the cascade past step 1
    assert final_similarity(a["spearman_guided_backprop"][:, :1]) > final_similarity(cam[:, :1])


def write_project(root: Path, sections: str) -> Path:
    (root / "photos").mkdir()
    for i in range(2):
        Image.fromarray(shapes(i).astype(np.uint8)).save(root / "photos" / f"s{i}.png")
    edge_model().save(root / "edges.keras")
    spec = root / "spec.yaml"
    spec.write_text(f"""title: sanity
output: out
formats: [html]
models:
  edges: {{path: edges.keras, preprocess: unit}}
datasets:
  photos: {{path: photos}}
sections:
{sections}""")
    return spec


def test_sanity_section_end_to_end(tmp_path: Path) -> None:
    from reportgen.runner import run

    spec = write_project(tmp_path, """  - type: sanity
    model: edges
    dataset: photos
    methods: [gradcam, vanilla, gradient_x_input]
    layer: edges
    steps: 8
  - type: gradcam
    model: edges
    dataset: photos
    layer: edges
    methods: [gradcam, layercam]
    faithfulness: true
  - type: gradcam
    model: edges
    dataset: photos
    layer: edges
""")
    run(spec, quiet=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sanity, faithful_cam, plain_cam = manifest["sections"]
    rows = [a for a in sanity["artifacts"] if a["kind"] == "sanity"]
    assert len(rows) == 3 * 2 * 2  # methods x images x cascade steps (head, edges)
    assert {r["randomized_from"] for r in rows} == {"head", "edges"} and {r["step"] for r in rows} == {1, 2}
    assert set(rows[0]) >= {"method", "image", "randomized_from", "step", "spearman", "ssim"}
    last = {r["method"]: [] for r in rows}
    for r in rows:
        if r["step"] == 2:
            last[r["method"]].append(r["spearman"] if r["spearman"] is not None else 0.0)
    assert min(last["gradient_x_input"]) > 0.5 and max(last["vanilla"]) < 0.5
    # the findings' verdicts follow the computed means (a flat map counts 0)
    said = {m: re.search(rf"{m} (FAILS|passes) the randomisation check: .*? Spearman (-?[\d.]+)", " ".join(
        sanity["findings"])) for m in ("vanilla gradient", "gradient × input")}  # fmt: skip
    assert said["gradient × input"][1] == "FAILS" and float(said["gradient × input"][2]) > 0.9
    assert said["vanilla gradient"][1] == "passes" and float(said["vanilla gradient"][2]) < 0.5
    assert float(said["gradient × input"][2]) == pytest.approx(np.mean(last["gradient_x_input"]), abs=0.01)
    faith = [a for a in sanity["artifacts"] if a["kind"] == "faithfulness"]
    assert len(faith) == 3 * 2
    assert all(0 <= f["deletion_auc"] <= 1 and 0 <= f["insertion_auc"] <= 1 for f in faith)
    assert (tmp_path / "out" / faith[0]["path"]).is_file()
    cam_faith = [a for a in faithful_cam["artifacts"] if a["kind"] == "faithfulness"]
    pairs = {(m, f"s{i}.png") for m in ("gradcam", "layercam") for i in range(2)}
    assert {(f["method"], f["image"]) for f in cam_faith} == pairs
    # the same Grad-CAM maps with and without curves; none without
    assert not [a for a in plain_cam["artifacts"] if a["kind"] == "faithfulness"]
    heat = {a["image"]: a["top10_share"] for a in plain_cam["artifacts"] if a["kind"] == "heatmap"}
    assert heat == {a["image"]: a["top10_share"] for a in faithful_cam["artifacts"]
                    if a["kind"] == "heatmap" and a["method"] == "gradcam"}  # fmt: skip
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Deletion and insertion" in html and "insertion area" in html


def test_cam_methods_need_a_layer(tmp_path: Path) -> None:
    from reportgen.runner import run

    spec = write_project(tmp_path, """  - type: sanity
    model: edges
    dataset: photos
    methods: [vanilla, gradcam]
""")
    with pytest.raises(ReportgenError, match=r"spec\.yaml:\d+:\d+: methods: gradcam need a convolutional"):
        run(spec, quiet=True)
