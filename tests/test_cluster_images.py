"""Image work leaves the machine: with `--backend dask`, Grad-CAM, saliency, occlusion and activation maps
over 8 images run as image-range shards on the workers of a local 2-process Dask cluster and merge to the
arrays of a local run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from projects import tinted_class_folders, tiny_classifier

from reportgen.runner import run

CLASSES = ("reds", "greens", "blues")
SECTIONS = [
    {"type": "gradcam", "title": "cam", "model": "tiny", "dataset": "folders", "layer": "conv", "limit": 8,
     "methods": ["gradcam", "gradcam++", "scorecam"]},
    {"type": "saliency", "title": "sal", "model": "tiny", "dataset": "folders", "limit": 8, "samples": 3,
     "methods": ["vanilla", "smoothgrad"]},
    # the second mask is for one image of the second shard: its pair must keep pointing at that image
    {"type": "occlusion", "title": "occ", "model": "tiny", "dataset": "folders", "layer": "conv", "limit": 8,
     "masks": [{"name": "corner", "box": [0, 0, 10, 10]}, {"name": "late", "box": [5, 5, 15, 15],
                                                          "image": "reds_1"}],
     "sliding": {"patch": 8, "stride": 4}},
    {"type": "activations", "title": "acts", "model": "tiny", "dataset": "folders", "limit": 8,
     "layers": ["conv_a", "conv"]},
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 16x16 classifier and 9 images (20x20) in 3 class folders; the sections take 8 of them."""
    root = tmp_path_factory.mktemp("imgproject")
    tinted_class_folders(root, CLASSES, per_class=3, seed=11, step=8)
    tiny_classifier(root / "tiny.keras", len(CLASSES), seed=4, convs=(("conv_a", 4), ("conv", 6)))
    return root


def write_spec(root: Path, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "title": "image work", "output": f"{name}/report", "cache": f"{name}-cache", "formats": ["html"],
        "models": {"tiny": {"path": "tiny.keras", "class_names": list(CLASSES)}},
        "datasets": {"folders": {"path": "data"}},
        "sections": SECTIONS,
    }, sort_keys=False))
    return path


def stored(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every array file of a store by name (content keys: the same work has the same name in both)."""
    found = {}
    for path in cache.rglob("*.npz"):
        with np.load(path) as data:
            found[path.name] = {k: data[k] for k in data.files}
    return found


@pytest.mark.slow  # a local run, a cluster of two TensorFlow processes and two runs on it: ~60 s
def test_dask_workers_run_image_work_in_shards_and_match_a_local_run(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster

    import reportgen.execute as execute

    local = run(write_spec(project, "local"), quiet=True)
    assert local.computed == len(SECTIONS)

    def host_must_not_compute(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the host ran image work: it did not leave the machine")

    # this process only; the workers import their own
    monkeypatch.setattr(execute, "image_engine", lambda request: host_must_not_compute)
    shard_pids: list[int] = []  # the process that computed each shard, as stored with its arrays
    merge = execute.merge_image_shards

    def recording_merge(shards: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
        shard_pids.extend(int(arrays["pid"]) for _, arrays in shards)
        return merge(shards)

    monkeypatch.setattr(execute, "merge_image_shards", recording_merge)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        spec = write_spec(project, "dask")
        summary = run(spec, quiet=True, backend="dask", scheduler=cluster.scheduler_address)
        assert (summary.computed, summary.reused) == (len(SECTIONS), 0)
        assert "image work and dataset passes on dask cluster" in summary.device
        with Client(cluster) as client:
            worker_pids = set(client.run(os.getpid).values())
            scanned = client.run(lambda: len(__import__("reportgen.execute").execute._WORKER_DATASETS))
        assert sorted(scanned.values()) == [1, 1]  # both workers loaded the dataset themselves
        # every request ran as 2 shards (one per worker), each on a worker, and both workers took some
        assert len(shard_pids) == 2 * len(SECTIONS)
        assert set(shard_pids) == worker_pids and os.getpid() not in worker_pids
        again = run(spec, quiet=True, backend="dask", scheduler=cluster.scheduler_address)
        assert (again.computed, again.reused) == (0, len(SECTIONS))  # merged results in the shared store
    mine, theirs = stored(project / "dask-cache"), stored(project / "local-cache")
    assert sorted(mine) == sorted(theirs) and len(theirs) == len(SECTIONS)  # no shard files left behind
    for name, arrays in theirs.items():
        assert sorted(mine[name]) == sorted(arrays)
        for k, value in arrays.items():
            assert mine[name][k].shape == value.shape, (name, k)
            assert np.allclose(mine[name][k], value, rtol=1e-6, atol=1e-6), (name, k)
    occ = next(a for a in theirs.values() if "pair_image" in a)
    assert occ["pair_image"].tolist().count(occ["pair_image"][-1]) == 2  # reds_1: both masks


def test_dry_run_lists_the_image_shards_of_local_worker_processes(
    project: Path, cli_main: Callable[..., tuple[int, str, str]]
) -> None:
    """With --jobs 2, every pending image request is planned as 2 image-range shards (one per worker);
    in process, as one unit each."""
    spec = write_spec(project, "planned")

    def shards(*args: object) -> dict[str, int]:
        code, out, err = cli_main("run", str(spec), "--dry-run", "--json", *args)
        assert code == 0, err
        return {r["kind"]: r["shards"] for r in json.loads(out)["passes"]}

    assert shards() == {"gradient": 3, "activations": 1}
    assert shards("--jobs", "2") == {"gradient": 6, "activations": 2}
    code, out, _ = cli_main("run", str(spec), "--dry-run", "--jobs", "2")
    assert code == 0 and "in 6 shards on 2 workers" in out and "in 2 shards on 2 workers" in out


@pytest.mark.slow  # two runs, one on 2 local TensorFlow processes: ~40 s
def test_local_processes_skip_a_shard_whose_images_do_not_decode(project: Path) -> None:
    """--jobs 2 over 4 good images and 4 broken files (the second shard): that shard holds nothing, the
    merge keeps the first shard's images, and the arrays equal an in-process run's (which skips them too)."""
    mixed = project / "mixed"
    mixed.mkdir(exist_ok=True)
    for i, src in enumerate(sorted((project / "data").rglob("*.png"))[:4]):
        (mixed / f"a_{i}.png").write_bytes(src.read_bytes())
        (mixed / f"b_{i}.png").write_bytes(b"not an image")
    sections = [s for s in SECTIONS if s["type"] in ("gradcam", "activations")]

    def spec(name: str) -> Path:
        path = write_spec(project, name)
        doc = yaml.safe_load(path.read_text())
        doc["datasets"]["folders"]["path"] = "mixed"
        doc["sections"] = sections
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    local = run(spec("mixed-local"), quiet=True)
    jobs = run(spec("mixed-jobs"), quiet=True, jobs=2)
    assert local.computed == jobs.computed == len(sections)
    assert "2 local processes" in jobs.device
    mine, theirs = stored(project / "mixed-jobs-cache"), stored(project / "mixed-local-cache")
    assert sorted(mine) == sorted(theirs) and len(theirs) == len(sections)
    for name, arrays in theirs.items():
        kept = arrays.get("kept", arrays.get("index"))
        assert kept is not None and kept.tolist() == [0, 1, 2, 3]
        for k, value in arrays.items():
            assert mine[name][k].shape == value.shape, (name, k)
            assert np.allclose(mine[name][k], value, rtol=1e-6, atol=1e-6), (name, k)
