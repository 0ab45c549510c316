"""An unchanged rerun (reportgen.unchanged) renders from the last run's memo without importing TensorFlow,
and publishes the same sections; a changed weights file, a changed image or a deleted result takes the
full path again and recomputes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import yaml
from PIL import Image

from reportgen.runner import run

CHILD = """
import json, sys
from reportgen.runner import run
summary = run(sys.argv[1], quiet=True)
print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
                  "computed": summary.computed, "reused": summary.reused, "plan": summary.plan}))
"""


def save_model(path: Path, kernel_scale: float) -> None:
    """conv (3 ch) -> GAP -> 2 classes; `kernel_scale` multiplies filter 0's kernel (a new checkpoint)."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((20, 20, 3))
    x = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    out = keras.layers.Dense(2, activation="softmax", name="head")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    kernel, bias = model.get_layer("conv").get_weights()
    kernel[..., 0] *= kernel_scale
    model.get_layer("conv").set_weights([kernel, bias])
    model.save(path)


def write_spec(root: Path) -> Path:
    save_model(root / "m.keras", 1.0)
    rng = np.random.default_rng(3)
    (root / "photos").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "fast rerun", "output": "out/report", "formats": ["html"],
        "models": {"m": {"path": "m.keras", "preprocess": "unit", "class_names": ["yes", "no"]}},
        "datasets": {"photos": {"path": "photos"}},
        "sections": [
            {"type": "filters", "title": "F", "model": "m", "layers": ["conv"], "filters": "0:3",
             "params": {"steps": 4, "size": 20, "crop": 0, "pre_relu": True}},
            {"type": "predictions", "title": "P", "model": "m", "dataset": "photos", "top_k": 2},
        ],
    }, sort_keys=False))
    return spec


def published(root: Path) -> dict[str, Any]:
    manifest = json.loads((root / "out" / "report" / "manifest.json").read_text())
    return {s["title"]: s["artifacts"] for s in manifest["sections"]}


def test_an_unchanged_rerun_imports_no_tensorflow_and_a_changed_input_recomputes(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    first = run(spec, quiet=True)
    assert first.computed > 0
    before = published(tmp_path)

    child = subprocess.run([sys.executable, "-c", CHILD, str(spec)], capture_output=True, text=True,
                           timeout=300, env={**os.environ})  # fmt: skip
    assert child.returncode == 0, child.stderr
    fast = json.loads(child.stdout.strip().splitlines()[-1])
    assert fast["plan"][0].startswith("nothing to compute"), fast["plan"]
    assert fast["tensorflow"] is False and fast["keras"] is False
    assert fast["computed"] == 0 and fast["reused"] == first.computed + first.reused
    assert published(tmp_path) == before  # the same sections, artifacts and figures
    for artifact in before["F"]:
        assert (tmp_path / "out" / "report" / artifact["path"]).is_file()

    save_model(tmp_path / "m.keras", 3.0)  # a new checkpoint: filter 0 responds 3x as strongly
    changed = run(spec, quiet=True)
    assert changed.computed > 0
    activation = {a["filter"]: a["activation"] for a in published(tmp_path)["F"] if a["kind"] == "filter"}
    old = {a["filter"]: a["activation"] for a in before["F"] if a["kind"] == "filter"}
    assert activation[0] != old[0]

    assert run(spec, quiet=True).computed == 0  # unchanged again (the fast path, in this process)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "photos" / "p1.png")  # a new image
    assert run(spec, quiet=True).computed > 0
    probability = {a["image"]: a["probability"] for a in published(tmp_path)["P"] if a["kind"] == "image"}
    assert set(probability) == {"p0.png", "p1.png"}

    results = tmp_path / "out" / ".reportgen-cache" / "results"
    (memo_file,) = (results / "reports").glob("*.pickle")
    stood_on = pickle.loads(memo_file.read_bytes()).results
    assert len(stood_on) >= 2 and all((results / r).is_file() for r in stood_on)
    (results / stood_on[0]).unlink()  # a result the report stands on is gone: the full path recomputes it
    assert run(spec, quiet=True).computed == 1
