"""Scale-out: passes run on a local Dask cluster (two worker processes on loopback) or on local loky
processes give the same report artifacts and the same pixels as a run in one process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import pytest
import yaml
from projects import tinted_class_folders, tiny_classifier

from reportgen.engine.recipes import resolve_recipe
from reportgen.errors import ReportgenError
from reportgen.parallel import AscentWork, Backend, run_ascent_work
from reportgen.runner import run
from reportgen.work import AscentRequest

SECTIONS = [
    {"type": "filters", "title": "classic", "model": "tiny", "layers": ["conv_a", "conv_b"], "filters": "0:6",
     "params": {"steps": 8, "size": 32, "crop": 2}},
    {"type": "filters", "title": "regularized", "model": "tiny", "layers": ["conv_b"], "filters": "0:5",
     "recipe": "regularized", "params": {"steps": 8, "size": 32, "crop": 2}},
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keras.utils.set_random_seed(5)
    inp = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv_b")(x)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    keras.Model(inp, x, name="tiny").save(path)
    return path


def write_spec(folder: Path, model_file: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "title": "cluster", "output": f"{name}/report", "cache": f"{name}-cache", "formats": ["html"],
        "models": {"tiny": {"path": str(model_file)}}, "sections": SECTIONS,
    }))
    return path


def assets(report: Path) -> tuple[list[list[dict[str, Any]]], dict[str, bytes]]:
    manifest = json.loads((report / "manifest.json").read_text())
    artifacts = [s["artifacts"] for s in manifest["sections"]]
    files = {a["path"]: (report / a["path"]).read_bytes() for arts in artifacts for a in arts}
    return artifacts, files


@pytest.fixture(scope="module")
def local_report(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Path:
    spec = write_spec(tmp_path_factory.mktemp("local"), model_file, "local")
    summary = run(spec, quiet=True)
    assert summary.computed == 17
    return summary.output


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One local Dask cluster (two worker processes, one thread each, on loopback) for this module."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        yield local


def loaded_models(cluster: Any, spec: Path) -> list[int]:
    """Per worker, how many models of `spec` it loaded (workers keep models across runs and tests)."""
    from distributed import Client

    def count(path: str = str(spec.resolve())) -> int:
        return sum(1 for key in __import__("reportgen.parallel").parallel._WORKER_MODELS if key[0] == path)

    with Client(cluster) as client:
        return sorted(client.run(count).values())


def test_dask_cluster_run_matches_a_local_run(tmp_path: Path, model_file: Path, local_report: Path,
                                              cluster: Any) -> None:
    spec = write_spec(tmp_path, model_file, "dask")
    summary = run(spec, quiet=True, backend="dask", scheduler=cluster.scheduler_address)
    assert (summary.computed, summary.reused) == (17, 0)
    assert f"dask cluster at {cluster.scheduler_address}" in summary.device
    assert loaded_models(cluster, spec) == [1, 1]  # both workers loaded the model from the spec, got pieces
    again = run(spec, quiet=True, backend="dask", scheduler=cluster.scheduler_address)
    assert (again.computed, again.reused) == (0, 17)  # the workers' results are in the shared store
    local_artifacts, local_files = assets(local_report)
    dask_artifacts, dask_files = assets(summary.output)
    assert dask_artifacts == local_artifacts  # same files, layers, filters, activations
    assert dask_files == local_files  # identical PNG bytes


def test_local_processes_match_a_local_run(tmp_path: Path, model_file: Path, local_report: Path,
                                           run_cli: Any) -> None:
    spec = write_spec(tmp_path, model_file, "loky")
    done = run_cli("run", "--jobs", "2", spec)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "17 results computed" in done.stdout
    report = tmp_path / "loky" / "report"
    assert json.loads((report / "manifest.json").read_text())["device"].count("2 local processes (loky)") == 1
    assert assets(report) == assets(local_report)


def test_worker_refuses_a_model_that_differs_from_the_plan(tmp_path: Path, model_file: Path) -> None:
    spec = write_spec(tmp_path, model_file, "w")
    recipe = resolve_recipe("keras-example", {"steps": 2, "size": 32})
    work = AscentWork(str(spec), "tiny", recipe.as_dict(), "float32", ("conv_a",),
                      ((AscentRequest("tiny", "conv_a", 0, recipe, 0), "0" * 64),), batch_size=1)
    with pytest.raises(ReportgenError, match="is not the model the run planned with"):
        run_ascent_work(work)


def test_backend_arguments_are_checked(run_cli: Any) -> None:
    with pytest.raises(ReportgenError, match="needs --scheduler"):
        Backend("dask")
    with pytest.raises(ReportgenError, match="unknown backend"):
        Backend("spark")
    result = run_cli("run", "--backend", "dask", "spec.yaml", env={"DASK_SCHEDULER_ADDRESS": ""})
    assert result.returncode == 2 and "--backend dask needs --scheduler" in result.stderr
    result = run_cli("run", "--jobs", "0", "spec.yaml")
    assert result.returncode == 2 and "--jobs must be at least 1" in result.stderr


# objectives beyond the channel mean, diversity groups and class models: the pieces carry the requests
UNIT_SECTIONS = [
    {"type": "filters", "title": "neurons", "model": "tiny", "layers": ["conv_b"], "filters": "0:3",
     "objective": "neuron", "position": [3, 4], "diversity": 2,
     "params": {"steps": 6, "size": 32, "crop": 2}},
    {"type": "class_model", "title": "classes", "model": "cls", "classes": [0, 2], "recipe": "fourier",
     "params": {"steps": 4}},
]


def write_unit_spec(folder: Path, model_file: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_classifier(folder / "cls.keras", 3, seed=2, convs=(("conv", 4),))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "title": "units", "output": f"{name}/report", "cache": f"{name}-cache", "formats": ["html"],
        "models": {"tiny": {"path": str(model_file)}, "cls": {"path": "cls.keras"}},
        "sections": UNIT_SECTIONS,
    }))
    return path


def test_dask_workers_run_neuron_objectives_diversity_and_class_models_like_a_local_run(
    tmp_path: Path, model_file: Path, cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = run(write_unit_spec(tmp_path / "local", model_file, "local"), quiet=True)
    assert local.computed == 3 * 2 + 2  # 3 neurons x 2 variants, 2 class models

    import reportgen.engine.scheduler as scheduler

    def host_must_not_compute(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the host ran an ascent chunk: the pass did not go to the workers")

    monkeypatch.setattr(scheduler, "run_chunks", host_must_not_compute)  # this process only
    spec = write_unit_spec(tmp_path / "dask", model_file, "dask")
    summary = run(spec, quiet=True, backend="dask", scheduler=cluster.scheduler_address)
    assert (summary.computed, summary.reused) == (8, 0)
    local_artifacts, local_files = assets(local.output)
    dask_artifacts, dask_files = assets(summary.output)
    assert dask_artifacts == local_artifacts  # variants, activations, class confidences
    assert sum(a.get("variant") == 1 for arts in dask_artifacts for a in arts) == 3
    assert dask_files == local_files  # identical PNG bytes


def test_dry_run_on_dask_counts_the_workers_shards(
    tmp_path: Path, model_file: Path, cluster: Any, cli_main: Any
) -> None:
    """The plan cuts passes for the cluster's two workers: a dataset pass into one file range per worker,
    an ascent pass into pieces for both; in this process they are one shard and one chunk."""
    tinted_class_folders(tmp_path, ("reds", "greens"), per_class=4, seed=1, step=8)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "title": "plan", "output": "plan/report", "formats": ["html"],
        "models": {"tiny": {"path": str(model_file)}}, "datasets": {"folders": {"path": "data"}},
        "sections": [
            {"type": "filters", "model": "tiny", "layers": ["conv_b"], "filters": "0:6",
             "params": {"steps": 2, "size": 32}},
            {"type": "class_ranking", "model": "tiny", "dataset": "folders", "layer": "conv_b",
             "filters": "0:4", "top": 2, "top_images": 2},
        ],
    }))

    def shards(*args: str) -> dict[str, int]:
        code, out, err = cli_main("run", path, "--dry-run", "--json", "--batch-size", "12", *args)
        assert code == 0, err
        return {row["kind"]: row["shards"] for row in json.loads(out)["passes"]}

    assert shards() == {"ascent": 1, "dataset": 1}
    on_dask = ("--backend", "dask", "--scheduler", cluster.scheduler_address)
    assert shards(*on_dask) == {"ascent": 2, "dataset": 2}
    code, out, err = cli_main("run", path, "--dry-run", *on_dask)
    assert code == 0 and "8 all images" in out and "in 2 shards" in out, out + err
    assert "(1 chunk in 2 pieces on 2 workers)" not in out and "pieces on 2 workers" in out, out
