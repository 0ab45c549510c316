"""Trends (reportgen.history.trends): after three runs of a spec with a baseline, the report has a chart
per headline figure, and the plotted numbers are the history's, recomputed here from the raw SQL rows;
failed runs are recorded as "failed" and are neither a baseline nor a point of a trend."""

from __future__ import annotations

import errno
import json
import sqlite3
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from reportgen.errors import SpecError
from reportgen.history.trends import earlier_runs
from reportgen.runner import run


def classifier(head_scale: float) -> keras.Model:
    """conv (3 ch) -> GAP -> 3 classes; `head_scale` sharpens the softmax, so confidences move run to run."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", name="head",
                             kernel_initializer=keras.initializers.RandomNormal(stddev=3.0))(x)
    model = keras.Model(inp, out)
    kernel, bias = model.get_layer("head").get_weights()
    model.get_layer("head").set_weights([kernel * head_scale, bias])
    return model


def write_spec(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "photos").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "title": "trends", "output": "out/report", "formats": ["html"], "baseline": "previous",
        "models": {"m": {"path": "m.keras", "preprocess": "unit", "class_names": ["ant", "bee", "cat"]}},
        "datasets": {"photos": {"path": "photos"}},
        "sections": [
            {"type": "filters", "title": "F", "model": "m", "layers": ["conv"], "filters": "0:3",
             "params": {"steps": 4, "size": 24, "crop": 0}},
            {"type": "predictions", "title": "P", "model": "m", "dataset": "photos", "top_k": 2},
        ],
    }, sort_keys=False))
    return path


def sql_items(history: Path, section_type: str) -> list[list[dict[str, Any]]]:
    """Per successful run (oldest first), the metrics of its items of one section type: the oracle."""
    db = sqlite3.connect(history)
    ids = [r for (r,) in db.execute("SELECT run_id FROM runs WHERE status = 'ok' ORDER BY finished, run_id")]
    query = "SELECT metrics FROM items WHERE run_id = ? AND section_type = ? ORDER BY item_key"
    out = [[json.loads(m) for (m,) in db.execute(query, (r, section_type))] for r in ids]
    db.close()
    return out


def disk_full(*args: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", "report.html")


def test_three_runs_chart_the_history_and_a_failed_run_is_no_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path)
    history = tmp_path / "out" / ".reportgen-cache" / "history.sqlite"
    for night, scale in enumerate((1.0, 1.0, 0.2)):  # the last night is a new checkpoint, softer head
        classifier(scale).save(tmp_path / "m.keras")
        if night == 2:  # before it, a night whose disk filled up while the report was written failed
            with monkeypatch.context() as m:
                m.setattr("reportgen.runner.render_html", disk_full)
                with pytest.raises(OSError):
                    run(spec, quiet=True)
            (tmp_path / "m.keras").write_bytes(b"")  # and a broken checkpoint: refused (exit 2), no run
            with pytest.raises(SpecError):
                run(spec, quiet=True)
            classifier(scale).save(tmp_path / "m.keras")
        run(spec, quiet=True)
    statuses = [s for (s,) in sqlite3.connect(history).execute("SELECT status FROM runs ORDER BY finished")]
    assert statuses == ["ok", "ok", "failed", "ok"]
    assert len(earlier_runs(history, str(spec.resolve()))) == 3  # the failed run is not one of them

    manifest = json.loads((tmp_path / "out" / "report" / "manifest.json").read_text())
    charts = {(t["section"], t["figure"]): t for t in manifest["trends"]}
    assert set(charts) == {
        ("F", "mean activation per layer"), ("F", "number of dead filters"),
        ("P", "mean confidence"), ("P", "top-1 agreement with the previous run"),
    }  # fmt: skip
    html = (tmp_path / "out" / "report" / "report.html").read_text()
    for chart in charts.values():
        assert chart["kind"] == "trend" and len(chart["runs"]) == 3 and chart["runs"][-1] == "this run"
        png = tmp_path / "out" / "report" / chart["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart["path"] in html

    predictions = sql_items(history, "predictions")  # the third run is recorded after the report was built
    confidence = [float(np.mean([m["confidence"] for m in run_items])) for run_items in predictions]
    assert charts[("P", "mean confidence")]["series"]["mean top-1 confidence"] == pytest.approx(confidence)
    assert confidence[2] < confidence[1] == pytest.approx(confidence[0])
    agreement = [None] + [
        float(np.mean([a["top1"] == b["top1"] for a, b in zip(before, now, strict=True)]))
        for before, now in zip(predictions, predictions[1:], strict=False)
    ]
    assert charts[("P", "top-1 agreement with the previous run")]["series"]["share of images"] == agreement
    filters = sql_items(history, "filters")
    activation = [float(np.mean([m["activation"] for m in items])) for items in filters]
    assert charts[("F", "mean activation per layer")]["series"]["conv"] == pytest.approx(activation)
    dead = [float(sum(bool(m["dead"]) for m in items)) for items in filters]
    assert charts[("F", "number of dead filters")]["series"]["dead filters"] == dead
    assert manifest["changes"]["baseline"] == earlier_runs(history, str(spec.resolve()))[1].run_id
