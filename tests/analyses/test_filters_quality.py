"""A `filters` section with the new recipes, objectives and diversity, run for real: the manifest carries
the quality figures, the variants and MaCo's mask (.npy and PNG); the report shows them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from reportgen.runner import run

SPEC = """\
title: Quality
output: out
formats: [html]
models:
  tiny: {path: MODEL}
sections:
  - type: filters
    model: tiny
    layers: [conv_b]
    filters: "0:2"
    recipe: maco
    compare: [keras-example]
    objective: neuron
    diversity: 2
    params: {steps: 6, crops: 2}
"""


def test_manifest_has_quality_figures_variants_and_mask(tmp_path: Path, tiny_keras_model: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC.replace("MODEL", str(tiny_keras_model)), encoding="utf-8")
    run(tmp_path / "spec.yaml", quiet=True)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    arts = [a for s in manifest["sections"] if s["type"] == "filters" for a in s["artifacts"]]
    tiles = [a for a in arts if a["kind"] == "filter"]
    assert {(a["recipe"], a["filter"], a["variant"]) for a in tiles} == {
        (r, f, v) for r in ("maco", "keras-example") for f in (0, 1) for v in (0, 1)
    }
    for a in tiles:
        assert a["objective"] == "neuron" and 0.0 <= a["hf_energy"] <= 1.0
        assert a["robustness"] is None or np.isfinite(a["robustness"])
    masks = [a for a in arts if a["kind"] == "mask"]
    assert {(a["model"], a["layer"], a["filter"], a["variant"]) for a in masks} == {
        ("tiny", "conv_b", f, v) for f in (0, 1) for v in (0, 1)
    }
    for a in masks:
        assert a["recipe"] == "maco"
        values = np.load(out / a["array"], allow_pickle=False)
        assert values.shape == (32, 32) and values.min() >= 0 and values.max() > 0
        assert Image.open(out / a["path"]).size == (32, 32)
    html = (out / "report.html").read_text()
    assert "robustness" in html and "transparency mask" in html


def test_a_neuron_position_outside_the_map_is_a_located_error(tmp_path: Path, tiny_keras_model: Path,
                                                             cli_main) -> None:
    """conv_b's map is 28x28 at the model's 32 px (3x3 valid twice): x 28 is refused at the field, exit 2,
    one line, before anything is computed (the engine would clip it to the edge unit silently)."""
    text = SPEC.replace("MODEL", str(tiny_keras_model)).replace(
        "    diversity: 2\n", "    diversity: 2\n    position: [5, 28]\n"
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    line = text.splitlines().index("    position: [5, 28]") + 1
    code, _, err = cli_main("run", spec)
    assert code == 2, err
    assert err == (
        f"{spec}:{line}:5: position: [5, 28] is outside the 28x28 map of layer 'conv_b' at 32x32 px input; "
        "give y in 0..27 and x in 0..27\n"
    )
    assert not (tmp_path / "out").exists()
