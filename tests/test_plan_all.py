"""One plan for every kind of work: `run --dry-run` lists the ascent, dataset, activation-map and gradient
passes of a spec with every section type that makes them, with the sections each serves, the batch (sized
or `--batch-size`) and what the store holds before and after a real run; gradient sections halve their
batch on out-of-memory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import yaml
from projects import tinted_class_folders, tiny_classifier

from reportgen.runner import run

CLASSES = ("reds", "greens", "blues")
ROW_KEYS = {"kind", "model", "sections", "items", "cached", "batch", "flops", "bytes_per_sample", "shards"}
SECTIONS = [
    {"type": "filters", "title": "filt", "model": "tiny", "layers": ["conv"], "filters": "0:3",
     "params": {"steps": 3}},
    {"type": "class_ranking", "title": "ranking", "model": "tiny", "dataset": "folders", "layer": "conv",
     "filters": "0:4", "top": 2, "top_images": 2},
    {"type": "predictions", "title": "preds", "model": "tiny", "dataset": "folders", "limit": 4, "top_k": 2},
    {"type": "activations", "title": "acts", "model": "tiny", "dataset": "folders", "limit": 3,
     "layers": ["conv_a", "conv"]},
    {"type": "gradcam", "title": "cam", "model": "tiny", "dataset": "folders", "layer": "conv", "limit": 3},
    {"type": "occlusion", "title": "occ", "model": "tiny", "dataset": "folders", "layer": "conv", "limit": 2,
     "masks": [{"name": "corner", "box": [0, 0, 10, 10]}], "sliding": {"patch": 8, "stride": 4}},
    {"type": "saliency", "title": "sal", "model": "tiny", "dataset": "folders", "limit": 2, "samples": 3},
]
# section id -> the kind of pass that serves it
SERVED_BY = {"s1-filt": "ascent", "s2-ranking": "dataset", "s3-preds": "dataset", "s4-acts": "activations",
             "s5-cam": "gradient", "s6-occ": "gradient", "s7-sal": "gradient"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 16x16 classifier and 9 images (20x20) in 3 class folders."""
    root = tmp_path_factory.mktemp("planall")
    tinted_class_folders(root, CLASSES, per_class=3, seed=5, step=8)
    tiny_classifier(root / "tiny.keras", len(CLASSES), seed=2, convs=(("conv_a", 4), ("conv", 6)))
    return root


def write_spec(root: Path, name: str, sections: list[dict[str, Any]]) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "title": "every kind", "output": f"{name}/report", "cache": f"{name}-cache", "formats": ["html"],
        "models": {"tiny": {"path": "tiny.keras", "class_names": list(CLASSES)}},
        "datasets": {"folders": {"path": "data"}},
        "sections": sections,
    }, sort_keys=False))
    return path


def plan_rows(cli_main: Callable[..., tuple[int, str, str]], *args: object) -> list[dict[str, Any]]:
    code, out, err = cli_main("run", *args, "--dry-run", "--json")
    assert code == 0, err
    return json.loads(out)["passes"]


def test_dry_run_lists_every_kind_and_what_the_store_holds(
    project: Path, cli_main: Callable[..., tuple[int, str, str]]
) -> None:
    spec = write_spec(project, "all", SECTIONS)
    rows = plan_rows(cli_main, spec)
    assert [r["kind"] for r in rows] == ["ascent", "dataset", "activations", "gradient"]
    for row in rows:
        assert ROW_KEYS <= set(row), row
        assert row["model"] == "tiny"
        assert row["sections"] == [sid for sid, kind in SERVED_BY.items() if kind == row["kind"]]
        assert row["cached"] == 0
        assert row["batch"] >= 1 and row["flops"] > 0 and row["bytes_per_sample"] > 0 and row["shards"] >= 1
    ascent, dataset, activations, gradient = rows
    assert ascent["items"] == 3  # filters
    assert dataset["items"] == 9  # every image of the folder: the ranking needs them all
    assert activations["items"] == 3
    assert gradient["items"] == 3 + 2 + 2  # gradcam, occlusion, saliency images
    # occlusion adds a Grad-CAM per occluded copy and a forward sample per patch position: the gradient
    # pass costs more than gradcam's share alone
    assert gradient["flops"] > 3 * 2 * activations["flops"] / 3

    assert {r["kind"]: r["batch"] for r in plan_rows(cli_main, spec, "--batch-size", "3")} == {
        "ascent": 3, "dataset": 3, "activations": 3, "gradient": 3
    }

    code, out, err = cli_main("run", spec, "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "plan:"
    assert lines[1].strip().startswith("4 of 4 passes (1 ascent, 1 dataset, 1 activations, 1 gradient) to ")
    assert "serves s5-cam, s6-occ, s7-sal" in out and "serves s2-ranking, s3-preds" in out
    assert not (project / "all").exists()  # a dry run writes nothing

    run(spec, quiet=True, batch_size=3)
    after = plan_rows(cli_main, spec)
    assert [r["kind"] for r in after] == ["ascent", "dataset", "activations", "gradient"]
    for before, row in zip(rows, after, strict=True):
        assert row["items"] == before["items"] and row["cached"] == row["items"], row
        assert row["flops"] == 0 and row["shards"] == 0
    code, out, err = cli_main("run", spec, "--dry-run")
    assert out.startswith("plan: nothing to compute")
    assert "0 of 4 passes (1 ascent, 1 dataset, 1 activations, 1 gradient)" in out


def test_dry_run_without_ascent_has_a_headline(
    project: Path, cli_main: Callable[..., tuple[int, str, str]]
) -> None:
    spec = write_spec(project, "noascent", SECTIONS[1:3])
    code, out, err = cli_main("run", spec, "--dry-run")
    assert code == 0, err
    head = out.splitlines()[1].strip()
    assert head.startswith("1 of 1 pass (1 dataset) to run on ") and "precision float32" in head, out
    assert "pass 1: dataset tiny over folders (9 all images" in out


def test_occlusion_and_saliency_halve_the_batch_on_out_of_memory(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reportgen.engine.attribution import Attributor
    from reportgen.engine.gradients import GradientEngine

    sections = [SECTIONS[5], SECTIONS[6]]
    normal = write_spec(project, "oom-normal", sections)
    run(normal, quiet=True, batch_size=4)

    tried: list[tuple[str, int]] = []
    real_cam = GradientEngine.gradcam

    def failing(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: GradientEngine, *args: Any, **kwargs: Any) -> Any:
            tried.append((name, self.batch_size))
            if self.batch_size > 2:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (injected)")
            return real(self, *args, **kwargs)

        return call

    monkeypatch.setattr(GradientEngine, "gradcam", failing("gradcam", real_cam))
    real_rows = Attributor.rows  # saliency's gradients (reportgen.engine.attribution)

    def failing_rows(self: Attributor, *args: Any, **kwargs: Any) -> Any:
        tried.append(("gradients", self.engine.batch_size))
        if self.engine.batch_size > 2:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (injected)")
        return real_rows(self, *args, **kwargs)

    monkeypatch.setattr(Attributor, "rows", failing_rows)
    injected = write_spec(project, "oom-injected", sections)
    run(injected, quiet=True, batch_size=4)
    assert ("gradcam", 4) in tried and ("gradcam", 2) in tried  # occlusion: 4 failed, 2 ran
    assert ("gradients", 4) in tried and ("gradients", 2) in tried  # saliency: the same
    for table in ("assets/s1-occ/occlusion.csv",):
        assert (project / "oom-injected/report" / table).read_text() == (
            project / "oom-normal/report" / table
        ).read_text()


def test_the_executor_computes_image_work_and_build_only_reads_it(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Activation maps, occlusion and saliency are stored by the executor before any section builds; with
    every engine broken afterwards, the sections still build from the store."""
    from reportgen.analyses.base import SectionOutput
    from reportgen.engine.activation_maps import ActivationProgram, activation_program
    from reportgen.engine.gradients import GradientEngine
    from reportgen.execute import execute_images
    from reportgen.plan import plan_work
    from reportgen.progress import Progress
    from reportgen.runner import _prepare
    from reportgen.spec.load import load_spec

    spec = write_spec(project, "executed", [SECTIONS[3], SECTIONS[5], SECTIONS[6]])
    ctx, titled = _prepare(load_spec(spec), spec, tmp_path, Progress(quiet=True), 2)
    passes = plan_work(ctx, batch_size=2).images
    assert [(p.kind, p.sections, p.batch_size) for p in passes] == [
        ("activations", ["s1-acts"], 2), ("gradient", ["s2-occ", "s3-sal"], 2)
    ]
    requests = [req for p in passes for _, req in p.requests]
    assert [r.engine for r in requests] == [
        "activation_maps", "gradient_batches.occlusion", "gradient_batches.saliency"
    ]
    assert not any(ctx.store.has(r.key, "npz") for r in requests)
    execute_images(passes, ctx)
    assert all(ctx.store.has(r.key, "npz") for r in requests)
    acts = ctx.store.get_arrays(requests[0].key)
    assert acts is not None and acts["mean_0"].shape == (3, 4) and acts["full_1"].shape[0] == 3
    lm = ctx.models.get("tiny")
    direct = activation_program(lm, ["conv_a", "conv"], dict(requests[0].params)["shown"], 64).run(
        ctx.datasets.get("folders").items[:3], 3
    )
    for name, values in direct.items():
        np.testing.assert_array_equal(acts[name], values)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("build must only read results")

    for name in ("gradcam", "input_gradients", "sliding", "probability"):
        monkeypatch.setattr(GradientEngine, name, broken)
    monkeypatch.setattr(ActivationProgram, "run", broken)
    for index, (section, analysis, _, sid, _) in enumerate(titled):
        result = analysis.build(section, ctx, SectionOutput(tmp_path, sid), index)
        assert result.findings
    assert (ctx.computed, ctx.reused) == (3, 0)  # the executor's work, counted once for its section


CLASS_SECTIONS = [
    {**SECTIONS[0], "recipe": "fourier"},  # lucid's padded canvas on a model that takes only 16x16 px
    {"type": "class_model", "title": "classes", "model": "tiny", "classes": ["reds", 2], "recipe": "fourier",
     "params": {"steps": 4}},
]


def test_class_models_are_an_ascent_pass_batched_with_back_off_and_read_in_build(
    project: Path, cli_main: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from reportgen.engine.class_model import ClassModelProgram

    spec = write_spec(project, "classes", CLASS_SECTIONS)
    rows = plan_rows(cli_main, spec, "--batch-size", "2")
    assert [(r["kind"], r["sections"], r["items"], r["cached"], r["batch"], r["shards"]) for r in rows] == [
        ("ascent", ["s1-filt"], 3, 0, 2, 2), ("ascent", ["s2-classes"], 2, 0, 2, 1)
    ]
    assert rows[1]["flops"] > 0 and rows[1]["bytes_per_sample"] > 0
    code, out, err = cli_main("run", spec, "--dry-run")
    assert code == 0, err
    assert "pass 2: ascent tiny (recipe " in out and "2 class models at 16x16 px" in out, out

    tried: list[int] = []
    real_init = ClassModelProgram.__init__

    def flaky_init(self: ClassModelProgram, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        loop = self._run

        def run(*tensors: Any) -> Any:
            tried.append(int(tensors[0].shape[0]))
            if tried[-1] > 1:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (injected)")
            return loop(*tensors)

        self._run = run

    with monkeypatch.context() as patch:
        patch.setattr(ClassModelProgram, "__init__", flaky_init)
        first = run(spec, quiet=True, batch_size=2)
    assert tried == [2, 1, 1]  # --batch-size reached the class models; the chunk halved on out-of-memory
    assert first.computed == 5  # 3 filters + 2 class models
    reference = run(write_spec(project, "classes-b1", CLASS_SECTIONS), quiet=True, batch_size=1)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("build must only read class models")

    monkeypatch.setattr(ClassModelProgram, "run_classes", broken)
    again = run(spec, quiet=True)
    assert (again.computed, again.reused) == (0, 5)
    after = plan_rows(cli_main, spec)
    assert [(r["cached"], r["shards"]) for r in after] == [(3, 0), (2, 0)]
    images = ("assets/s2-classes/class_0000.png", "assets/s2-classes/class_0002.png")
    for name in images:  # the same pixels from the cache, and whatever the batch
        assert (again.output / name).read_bytes() == (first.output / name).read_bytes()
        assert (reference.output / name).read_bytes() == (first.output / name).read_bytes()
