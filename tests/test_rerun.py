"""Incremental reruns: content keys decide what is recomputed; killed runs resume; concurrent runs are
refused. Real runs of the CLI and the runner on a tiny saved Keras model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import keras
import yaml

from reportgen.runner import run, run_lock

PARAMS = {"steps": 8, "size": 32, "crop": 2}


def save_tiny(path: Path, seed: int) -> None:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_b")(x)
    keras.Model(inp, x, name="tiny").save(path)


def write_spec(root: Path, sections: list[dict[str, Any]], **top: Any) -> Path:
    if not (root / "tiny.keras").exists():
        save_tiny(root / "tiny.keras", seed=1)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "title": "rerun", "output": "out/report", "formats": ["html"],
        "models": {"tiny": {"path": "tiny.keras"}}, "sections": sections, **top,
    }, sort_keys=False))
    return path


def section(title: str, layer: str, filters: str, **params: Any) -> dict[str, Any]:
    return {"type": "filters", "title": title, "model": "tiny", "layers": [layer], "filters": filters,
            "params": {**PARAMS, **params}}


def manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "out" / "report" / "manifest.json").read_text())


def results_by_title(root: Path) -> dict[str, dict[str, int]]:
    return {s["title"]: s["results"] for s in manifest(root)["sections"]}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stored_results(root: Path) -> set[str]:
    return {p.stem for p in (root / "out" / ".reportgen-cache" / "results").rglob("*.json")}


def test_unchanged_rerun_recomputes_nothing_and_rerenders(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, [section("A", "conv_a", "0:4"), section("B", "conv_b", "0:3")])
    first = run(spec, quiet=True)
    assert (first.computed, first.reused) == (7, 0)
    html = tmp_path / "out" / "report" / "report.html"
    before = (html.stat().st_ino, manifest(tmp_path)["finished"], snapshot(tmp_path / "out" / "report"))
    time.sleep(1.1)  # the manifest's timestamps have one-second resolution

    second = run(spec, quiet=True)
    assert (second.computed, second.reused) == (0, 7)
    assert second.sections == {"A": {"computed": 0, "reused": 4}, "B": {"computed": 0, "reused": 3}}
    assert html.stat().st_ino != before[0]  # a new report was rendered and published
    assert manifest(tmp_path)["finished"] != before[1]
    after = snapshot(tmp_path / "out" / "report")
    assert {k: v for k, v in after.items() if k.startswith("assets/")} == \
        {k: v for k, v in before[2].items() if k.startswith("assets/")}
    page = html.read_text()
    assert "0 computed, 7 reused from the store" in page
    assert '<td>A</td><td class="num">' in page and '<td class="num">0</td><td class="num">4</td>' in page


def test_adding_filters_computes_only_the_new_ones(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, [section("A", "conv_a", "0:3"), section("B", "conv_b", "0:2")])
    run(spec, quiet=True)
    old = stored_results(tmp_path)
    spec = write_spec(tmp_path, [section("A", "conv_a", "0:5"), section("B", "conv_b", "0:2")])
    summary = run(spec, quiet=True)
    assert (summary.computed, summary.reused) == (2, 5)
    assert results_by_title(tmp_path) == {"A": {"computed": 2, "reused": 3},
                                          "B": {"computed": 0, "reused": 2}}
    assert len(stored_results(tmp_path) - old) == 2

    # changing one section's recipe recomputes that section only
    spec = write_spec(tmp_path, [section("A", "conv_a", "0:5"), section("B", "conv_b", "0:2", steps=9)])
    summary = run(spec, quiet=True)
    assert results_by_title(tmp_path) == {"A": {"computed": 0, "reused": 5},
                                          "B": {"computed": 2, "reused": 0}}


def test_new_checkpoint_file_recomputes(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, [section("A", "conv_a", "0:3")])
    assert run(spec, quiet=True).computed == 3
    png = tmp_path / "out" / "report" / "assets"
    first_pixels = snapshot(png)
    save_tiny(tmp_path / "tiny.keras", seed=2)  # same path and architecture, new weights
    summary = run(spec, quiet=True)
    assert (summary.computed, summary.reused) == (3, 0)
    assert snapshot(png) != first_pixels
    assert run(spec, quiet=True).computed == 0  # the new checkpoint's results are stored now


def test_killed_run_resumes_and_never_half_writes_the_output(tmp_path: Path) -> None:
    small = write_spec(tmp_path, [section("A", "conv_b", "0:2", steps=40)])
    run(small, quiet=True)  # an earlier successful report in the output folder
    output = tmp_path / "out" / "report"
    published = snapshot(output)
    baseline = stored_results(tmp_path)

    big = [section("A", "conv_b", "0:16", steps=40), section("B", "conv_a", "0:8", steps=40)]
    spec = write_spec(tmp_path, big)
    cmd = [sys.executable, "-m", "reportgen", "run", "--quiet", "--batch-size", "2", str(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(stored_results(tmp_path) - baseline) == 0:  # the first chunk's results are stored
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no chunk was stored in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stored = stored_results(tmp_path) - baseline
    total = 14 + 8  # 16 + 8 filters, of which conv_b 0:2 were stored by the earlier run
    print(f"killed after {len(stored)} of {total} results were stored")
    assert 0 < len(stored) < total
    assert snapshot(output) == published  # the killed run never touched the published report
    cache = tmp_path / "out" / ".reportgen-cache" / "results"
    for meta in cache.rglob("*.json"):  # each result that counts as stored is complete
        assert meta.with_suffix(".png").exists() and meta.with_suffix(".npy").exists()
    assert list(tmp_path.joinpath("out").glob(".report.staging-*"))  # its staging folder was left behind

    summary = run(spec, quiet=True)
    assert summary.computed == total - len(stored) and summary.reused == 2 + len(stored)
    assert not list(tmp_path.joinpath("out").glob(".report.staging-*"))  # cleaned by the next run
    assert [len(s["artifacts"]) for s in manifest(tmp_path)["sections"]] == [17, 9]

    # resumed results are the pixels an uninterrupted run computes
    fresh = write_spec(tmp_path, big, cache="fresh-cache", output="fresh/report")
    run(fresh, quiet=True)
    resumed_assets = snapshot(output / "assets")
    assert resumed_assets == snapshot(tmp_path / "fresh" / "report" / "assets")


def test_concurrent_run_is_refused_with_exit_code_3(tmp_path: Path, run_cli: Any) -> None:
    spec = write_spec(tmp_path, [section("A", "conv_a", "0:2")])
    output = tmp_path / "out" / "report"
    with run_lock(output):
        result = run_cli("run", spec)
    assert result.returncode == 3, result.stderr
    lock_file = tmp_path / "out" / ".report.lock"
    assert f"another reportgen run is writing {output}" in result.stderr
    assert str(lock_file) in result.stderr and f"pid {os.getpid()}" in result.stderr
    assert not output.exists()
    done = run_cli("run", "--quiet", spec)  # the lock is released with its holder
    assert done.returncode == 0, done.stderr
