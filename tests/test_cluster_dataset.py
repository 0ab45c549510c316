"""Dataset passes leave the machine: with `--backend dask`, class ranking + predictions over a class-folder
dataset run as shards on the workers of a local 2-process Dask cluster and merge to the local run's values;
the workers build the decoded-image cache, one part per shard."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from projects import tinted_class_folders, tiny_classifier

from reportgen.runner import run

CLASSES = ("reds", "greens", "blues")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny classifier and 24 small images in 3 class folders (8 each, tinted by class)."""
    root = tmp_path_factory.mktemp("dsproject")
    tinted_class_folders(root, CLASSES, per_class=8, seed=3, step=4)
    tiny_classifier(root / "tiny.keras", len(CLASSES), seed=7, convs=(("conv", 6),))
    return root


def write_spec(root: Path, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "title": "dataset passes", "output": f"{name}/report", "cache": f"{name}-cache", "formats": ["html"],
        "models": {"tiny": {"path": "tiny.keras", "class_names": list(CLASSES)}},
        "datasets": {"folders": {"path": "data", "decoded_cache": True}},
        "sections": [
            {"type": "class_ranking", "title": "ranking", "model": "tiny", "dataset": "folders",
             "layer": "conv", "filters": "0:6", "top": 3, "top_images": 4},
            {"type": "predictions", "title": "predictions", "model": "tiny", "dataset": "folders",
             "limit": 10, "top_k": 2},
        ],
    }))
    return path


def tables(report: Path) -> tuple[dict[str, list[dict[str, str]]], list[Any]]:
    """Every CSV of the report by path, and the image artifacts (top images with rank and value)."""
    manifest = json.loads((report / "manifest.json").read_text())
    arts = [a for s in manifest["sections"] for a in s["artifacts"]]
    csvs = {a["path"]: list(csv.DictReader(open(report / a["path"]))) for a in arts if a["kind"] == "table"}
    images = [(a["path"], a.get("filter"), a.get("rank"), a.get("image"), a.get("top_class")) for a in arts
              if a["kind"] == "image"]
    return csvs, images


def close(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return abs(x - y) <= 1e-6 * max(abs(x), abs(y), 1e-30)


@pytest.mark.slow  # a local run, a cluster of two TensorFlow processes and two runs on it: ~60 s
def test_dask_workers_run_the_dataset_pass_and_match_a_local_run(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster

    local = run(write_spec(project, "local"), quiet=True)
    assert local.computed == 2  # the layer's means and the class outputs, from one pass

    import reportgen.engine.forward as engine_forward

    def host_must_not_compute(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the host ran a forward pass: the dataset pass did not leave the machine")

    monkeypatch.setattr(engine_forward, "forward", host_must_not_compute)  # this process only
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        spec = write_spec(project, "dask")
        summary = run(spec, quiet=True, backend="dask", scheduler=cluster.scheduler_address)
        assert (summary.computed, summary.reused) == (2, 0)
        assert "dataset passes on dask cluster" in summary.device
        with Client(cluster) as client:  # both workers scanned the dataset and computed a shard
            scanned = client.run(lambda: len(__import__("reportgen.execute").execute._WORKER_DATASETS))
        assert sorted(scanned.values()) == [1, 1]
        # each worker built the decoded-image cache's part of its file range (the local run: the whole)
        assert len(list((project / "dask-cache" / "decoded").glob("*.*-*.u8"))) == 2
        assert len(list((project / "local-cache" / "decoded").glob("*.u8"))) == 1
        again = run(spec, quiet=True, backend="dask", scheduler=cluster.scheduler_address)
        assert (again.computed, again.reused) == (0, 2)  # the merged pieces are in the shared store
    local_csvs, local_images = tables(local.output)
    dask_csvs, dask_images = tables(summary.output)
    assert dask_images == local_images  # same top images, ranks, classes
    assert sorted(dask_csvs) == sorted(local_csvs) and len(local_csvs) >= 3  # live filters + predictions
    for path, rows in local_csvs.items():
        assert len(dask_csvs[path]) == len(rows)
        for mine, theirs in zip(dask_csvs[path], rows, strict=True):
            assert mine.keys() == theirs.keys()
            assert all(close(mine[k], theirs[k]) for k in mine), (path, mine, theirs)
