"""predictions: top-k classes of a tiny real model on real image files, checked against direct model calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from reportgen.analyses.base import RunContext, SectionOutput, SectionResult
from reportgen.analyses.predictions import ANALYSIS
from reportgen.datasets import DatasetRegistry, load_pixels
from reportgen.errors import ReportgenError
from reportgen.execute import execute_dataset
from reportgen.labels import imagenet_name
from reportgen.models import ModelRegistry
from reportgen.plan import device_budget, plan_dataset
from reportgen.progress import Progress
from reportgen.spec.load import load_spec
from reportgen.store import Store

NAMES = ["ant", "bee", "cat", "dog", "eel"]
SIDE = 16


def tiny_classifier(classes: int, softmax: bool, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIDE, SIDE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(classes, activation="softmax" if softmax else None, name="head",
                             kernel_initializer=keras.initializers.RandomNormal(stddev=3.0))(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder of real photo crops (PNG and JPEG, different sizes) plus one corrupt JPEG."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for j, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        img = Image.fromarray(getattr(data, name)()).resize((20 + 8 * j, 24), Image.BILINEAR)
        img.save(root / f"{name}.{'png' if j % 2 else 'jpg'}")
    (root / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    return root


def run_section(folder: Path, tmp_path: Path, model: keras.Model, model_extra: dict[str, Any],
                **section: Any) -> tuple[SectionResult, RunContext]:
    model.save(tmp_path / "m.keras")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "title": "t", "output": "out", "formats": ["html"],
        "models": {"m": {"path": "m.keras", "preprocess": "unit", **model_extra}},
        "datasets": {"photos": {"path": str(folder)}},
        "sections": [{"type": "predictions", "model": "m", "dataset": "photos", **section}],
    }))
    spec = load_spec(spec_path)
    ctx = RunContext(spec=spec, spec_path=spec_path, store=Store(tmp_path / "store"),
                     staging=tmp_path / "staging", models=ModelRegistry(spec), datasets=DatasetRegistry(spec),
                     ascent=None, progress=Progress(quiet=True))
    ANALYSIS.prepare(spec.sections[0], ctx, 0)  # declares the dataset pass, which runs before build
    execute_dataset(plan_dataset(ctx.work, ctx.store, ctx.models, ctx.datasets, device_budget()), ctx)
    result = ANALYSIS.build(spec.sections[0], ctx, SectionOutput(ctx.staging, "s1"), 0)
    return result, ctx


def direct(model: keras.Model, ctx: RunContext) -> np.ndarray:
    """The model called on each decodable image alone, with the 'unit' preprocessing written out."""
    items = ctx.datasets.get("photos").items
    pixels, bad = load_pixels(items, (SIDE, SIDE), 3)
    assert bad == ["zz_corrupt.jpg"]
    return np.concatenate([model(px[None] / 255.0).numpy() for px in pixels])


def test_top1_is_argmax_of_direct_call_and_probabilities_sum_to_one(folder: Path, tmp_path: Path) -> None:
    model = tiny_classifier(5, softmax=True, seed=3)
    result, ctx = run_section(folder, tmp_path, model, {"class_names": NAMES}, top_k=7)
    want = direct(model, ctx)
    rows = result.context["images"]
    assert [r["file"] for r in rows] == ["astronaut.jpg", "chelsea.png", "coffee.jpg", "rocket.png"]
    assert len({r["preds"][0]["name"] for r in rows}) > 1  # the oracle is not trivially one class
    for row, probs in zip(rows, want, strict=True):
        assert row["preds"][0]["name"] == NAMES[int(np.argmax(probs))]
        assert [p["name"] for p in row["preds"]] == [NAMES[i] for i in np.argsort(-probs, kind="stable")]
        np.testing.assert_allclose([p["p"] for p in row["preds"]], np.sort(probs)[::-1], atol=1e-5)
        assert sum(p["p"] for p in row["preds"]) == pytest.approx(1.0, abs=1e-5)
    assert any("zz_corrupt.jpg" in n for n in result.notes)
    assert any("showing 5" in n for n in result.notes)
    assert not any("softmax was applied" in n for n in result.notes)
    best = max(rows, key=lambda r: r["preds"][0]["p"])
    assert result.findings[0].startswith(f"Most confident: {best['file']} is {best['preds'][0]['name']}")
    assert (ctx.staging / result.context["csv"]).read_text().count("\n") == 1 + 4 * 5


def test_logits_get_softmax_and_a_note(folder: Path, tmp_path: Path) -> None:
    model = tiny_classifier(5, softmax=False, seed=4)
    result, ctx = run_section(folder, tmp_path, model, {"class_names": NAMES}, top_k=2,
                              images=["coffee", "chelsea"])
    logits = direct(model, ctx)[[1, 2]]  # decodable order: astronaut, chelsea, coffee, rocket
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    rows = result.context["images"]
    assert [r["file"] for r in rows] == ["coffee.jpg", "chelsea.png"]
    for row, p in zip(rows, probs[::-1], strict=True):
        assert row["preds"][0]["name"] == NAMES[int(np.argmax(p))]
        assert row["preds"][0]["p"] == pytest.approx(float(p.max()), abs=1e-5)
    assert any("softmax was applied" in n for n in result.notes)


def test_thousand_outputs_get_imagenet_names_offline(folder: Path, tmp_path: Path) -> None:
    model = tiny_classifier(1000, softmax=True, seed=5)
    result, ctx = run_section(folder, tmp_path, model, {}, top_k=3, limit=2)
    want = direct(model, ctx)
    assert "ImageNet" in result.context["names_source"]
    for row, probs in zip(result.context["images"], want[:2], strict=True):
        assert row["preds"][0]["name"] == imagenet_name(int(np.argmax(probs)))


def test_wrong_number_of_class_names_is_a_located_error(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ReportgenError, match=r"spec.yaml:\d+:\d+: model 'm' has 5 outputs but 3 class names"):
        run_section(folder, tmp_path, tiny_classifier(5, softmax=True, seed=6), {"class_names": NAMES[:3]})
