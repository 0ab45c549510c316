"""Run history (reportgen.history): real runs of a tiny spec append their runs and items; the history
survives deleting the cached results; a writer killed with SIGKILL at random points leaves no partial run."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from reportgen.history import connect, run_items, runs
from reportgen.runner import run


def tiny_classifier() -> keras.Model:
    keras.utils.set_random_seed(3)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", name="head",
                             kernel_initializer=keras.initializers.RandomNormal(stddev=3.0))(x)
    return keras.Model(inp, out)


def write_spec(root: Path, **top: Any) -> Path:
    """A 32x32 classifier (conv 4 ch -> GAP -> 3 classes), four real PNGs, a filters and a predictions
    section."""
    tiny_classifier().save(root / "m.keras")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "title": "history", "output": "out/report", "formats": ["html"],
        "models": {"m": {"path": "m.keras", "preprocess": "unit", "class_names": ["ant", "bee", "cat"]}},
        "datasets": {"photos": {"path": "photos"}},
        "sections": [
            {"type": "filters", "title": "F", "model": "m", "layers": ["conv"], "filters": "0:3",
             "params": {"steps": 6, "size": 32, "crop": 0}},
            {"type": "predictions", "title": "P", "model": "m", "dataset": "photos", "top_k": 2},
            {"type": "occlusion", "title": "O", "model": "m", "layer": "conv", "dataset": "photos",
             "images": ["p0.png"], "masks": [{"name": "centre", "box": [8, 8, 24, 24]}]},
            {"type": "gradcam", "title": "G", "model": "m", "layer": "conv", "dataset": "photos",
             "images": ["p1.png"]},
        ],
        **top,
    }, sort_keys=False))
    return path


def history_file(root: Path) -> Path:
    return root / "out" / ".reportgen-cache" / "history.sqlite"


def manifest_artifacts(root: Path, title: str, kind: str) -> list[dict[str, Any]]:
    manifest = json.loads((root / "out" / "report" / "manifest.json").read_text())
    (section,) = [s for s in manifest["sections"] if s["title"] == title]
    return [a for a in section["artifacts"] if a["kind"] == kind]


def test_a_run_records_its_models_and_items(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    summary = run(spec, quiet=True)
    (row,) = runs(history_file(tmp_path))
    assert row["run_id"] == summary.run_id
    assert row["status"] == "ok" and row["spec_path"] == str(spec.resolve())
    assert row["spec_sha"] == hashlib.sha256(spec.read_bytes()).hexdigest()
    items = run_items(history_file(tmp_path), summary.run_id)
    assert row["items"] == len(items) == 3 + 4 + 1 + 1
    db = connect(history_file(tmp_path))
    ((key, digest),) = db.execute("SELECT key, digest FROM models WHERE run_id = ?", (summary.run_id,))
    db.close()
    assert key == "m" and len(digest) == 64

    filters = {i["metrics"]["filter"]: i for i in items if i["section_type"] == "filters"}
    published = {a["filter"]: a for a in manifest_artifacts(tmp_path, "F", "filter")}
    assert sorted(filters) == sorted(published) == [0, 1, 2]
    for f, item in filters.items():
        picture = (tmp_path / "out" / "report" / published[f]["path"]).read_bytes()
        assert item["image_digest"] == hashlib.sha256(picture).hexdigest()
        assert item["metrics"]["activation"] == published[f]["activation"]
        assert item["metrics"]["robustness"] == published[f]["robustness"]
        assert item["item_key"].startswith(f"m/conv/{f}/")
    predictions = {i["item_key"]: i["metrics"] for i in items if i["section_type"] == "predictions"}
    images = {a["image"]: a for a in manifest_artifacts(tmp_path, "P", "image")}
    assert sorted(predictions) == sorted(images) == [f"p{i}.png" for i in range(4)]
    for name, metrics in predictions.items():
        assert metrics["top1"] == images[name]["top_class"] in ("ant", "bee", "cat")
        assert metrics["confidence"] == images[name]["probability"]
        assert len(metrics["top_k"]) == 2
    (occluded,) = [i for i in items if i["section_type"] == "occlusion"]
    (heatmap,) = [a for a in manifest_artifacts(tmp_path, "O", "heatmap") if a.get("mask") == "centre"]
    assert occluded["item_key"] == "p0.png/centre"
    assert occluded["metrics"]["drop"] == pytest.approx(heatmap["before"] - heatmap["after"], abs=1e-4)
    assert occluded["metrics"]["top_after"] == heatmap["top_after"]
    (cam,) = [i for i in items if i["section_type"] == "gradcam"]
    (published_cam,) = manifest_artifacts(tmp_path, "G", "heatmap")
    assert cam["item_key"] == "p1.png/gradcam"
    assert cam["metrics"]["centre"] == [published_cam["centre_x"], published_cam["centre_y"]]
    assert cam["metrics"]["concentration"] == published_cam["top10_share"]
    assert cam["metrics"]["class"] == published_cam["class"]


def test_every_run_appends_and_deleting_the_results_keeps_the_history(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    first = run(spec, quiet=True)
    second = run(spec, quiet=True)
    assert [r["run_id"] for r in runs(history_file(tmp_path))] == [first.run_id, second.run_id]
    shutil.rmtree(tmp_path / "out" / ".reportgen-cache" / "results")
    assert len(runs(history_file(tmp_path))) == 2
    third = run(spec, quiet=True)  # recomputes everything: same seeds, so the same pictures
    assert third.computed > 0
    assert [r["run_id"] for r in runs(history_file(tmp_path))] == [first.run_id, second.run_id, third.run_id]

    def digests(run_id: str) -> dict[str, Any]:
        return {i["item_key"]: i["image_digest"] for i in run_items(history_file(tmp_path), run_id)}

    assert digests(first.run_id) == digests(third.run_id)
    assert any(d is not None for d in digests(third.run_id).values())


WRITER = """
import sys
from pathlib import Path
from reportgen.history import ItemRow, RunRecord, record_run

path, n = Path(sys.argv[1]), 0
while True:
    items = [ItemRow(0, "s1-f", "filters", f"m/conv/{i}", {"activation": i * 0.5, "run": n}, "ab" * 32)
             for i in range(400)]
    record_run(path, RunRecord(f"2026-01-01T00:00:{n % 60:02d}+00:00", "2026-01-01T00:01:00+00:00",
                               "/spec.yaml", "0" * 64, "/out", {"m": "d" * 64}, items))
    n += 1
    print(n, flush=True)
"""


def test_a_writer_killed_at_random_points_leaves_only_whole_runs(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "history.sqlite"
    rng = np.random.default_rng(10)
    written = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one run is in: then kill it somewhere in a later one
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        counts = db.execute(
            "SELECT r.run_id, r.items, COUNT(i.item_key) FROM runs r "
            "LEFT JOIN items i ON i.run_id = r.run_id "
            "GROUP BY r.run_id"
        ).fetchall()
        orphans = db.execute("SELECT COUNT(*) FROM items WHERE run_id NOT IN (SELECT run_id FROM runs)")
        assert orphans.fetchone() == (0,)
        db.close()
        assert all(stored == actual == 400 for _, stored, actual in counts)
        assert len(counts) > written  # every kill came after a committed run
        written = len(counts)


def test_concurrent_writers_each_append_every_run(tmp_path: Path) -> None:
    """Two processes appending at the same time (WAL, busy timeout): no "database is locked", no lost run."""
    path = tmp_path / "history.sqlite"
    writer = WRITER.replace("while True:", "for _ in range(15):")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*), SUM(items) FROM runs").fetchone() == (30, 30 * 400)
    assert db.execute("SELECT COUNT(*) FROM items").fetchone() == (30 * 400,)
    db.close()


@pytest.mark.parametrize("version", [0, 1])
def test_opening_migrates_once_to_the_current_version(tmp_path: Path, version: int) -> None:
    path = tmp_path / "h.sqlite"
    if version:
        connect(path).close()
    db = connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (1,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {
        "runs", "models", "items"}
    db.close()


def test_baseline_previous_reports_changed_filters_and_flipped_predictions(tmp_path: Path) -> None:
    """A new checkpoint whose filter 1 kernel changed and whose class columns are rotated: filter 1 is
    changed, filters 0 and 2 keep their pictures (starts do not depend on the weights), every top-1 flips."""
    spec = write_spec(tmp_path, baseline="previous")
    first = run(spec, quiet=True)
    changes = json.loads((tmp_path / "out" / "report" / "manifest.json").read_text())["changes"]
    assert changes["baseline"] is None
    assert [(c["title"], c["counts"]) for c in changes["sections"]] == [
        ("F", {"changed": 0, "unchanged": 0, "new": 3, "removed": 0}),
        ("P", {"changed": 0, "unchanged": 0, "new": 4, "removed": 0}),
        ("O", {"changed": 0, "unchanged": 0, "new": 1, "removed": 0}),
        ("G", {"changed": 0, "unchanged": 0, "new": 1, "removed": 0}),
    ]

    model = tiny_classifier()
    kernel, bias = model.get_layer("conv").get_weights()
    kernel[..., 1] = -kernel[..., 1]
    model.get_layer("conv").set_weights([kernel, bias])
    head_kernel, head_bias = model.get_layer("head").get_weights()
    model.get_layer("head").set_weights([np.roll(head_kernel, 1, axis=1), np.roll(head_bias, 1)])
    model.save(tmp_path / "m.keras")
    run(spec, quiet=True)
    manifest = json.loads((tmp_path / "out" / "report" / "manifest.json").read_text())
    changes = manifest["changes"]
    assert changes["baseline"] == first.run_id
    filters, predictions, occlusion, gradcam = changes["sections"]
    assert filters["counts"] == {"changed": 1, "unchanged": 2, "new": 0, "removed": 0}
    statuses = {i["filter"]: i["status"] for i in filters["items"]}
    assert statuses == {0: "unchanged", 1: "changed", 2: "unchanged"}
    assert predictions["counts"] == {"changed": 4, "unchanged": 0, "new": 0, "removed": 0}
    for item in predictions["items"]:
        old, new = item["metrics"]["old"]["top1"], item["metrics"]["new"]["top1"]
        names = ["ant", "bee", "cat"]
        assert names.index(new) == (names.index(old) + 1) % 3
        assert item["metrics"]["change"].startswith(f"top-1 {old} ")
    (occluded,) = occlusion["items"]
    assert occluded["metrics"]["new"]["top_after"] != occluded["metrics"]["old"]["top_after"]  # rotated
    assert occlusion["counts"]["changed"] == 1
    (cam,) = gradcam["items"]  # the explained class (the top-1) rotated with the class columns
    assert cam["status"] == "changed" and cam["metrics"]["old"]["class"] != cam["metrics"]["new"]["class"]
    html = (tmp_path / "out" / "report" / "report.html").read_text()
    assert html.index('id="what-changed"') < html.index('class="report-section type-filters"')
    assert "m/conv/1/" in html
