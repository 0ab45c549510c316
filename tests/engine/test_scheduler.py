"""Whole-spec planning and scheduling of the ascent: merged passes, estimates, batch sizing, back-off,
dry runs and progress reporting, on tiny real Keras models."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from reportgen.engine.ascent import AscentJob, AscentProgram, program_for
from reportgen.engine.recipes import resolve_recipe
from reportgen.engine.scheduler import AscentScheduler
from reportgen.models import ModelRegistry
from reportgen.plan import (
    MAX_BATCH,
    MEMORY_FACTOR,
    DeviceBudget,
    SampleCost,
    batch_size_for,
    device_budget,
    sample_cost,
)
from reportgen.progress import Progress
from reportgen.publish import run_lock
from reportgen.runner import run
from reportgen.spec.load import load_spec
from reportgen.store import Store
from reportgen.work import AscentRequest

PARAMS = {"steps": 6, "size": 32, "crop": 2}


def save_tiny(path: Path, seed: int = 1) -> Path:
    """Free-size input: conv_a (8) -> pool -> conv_b (12) -> conv_c (16)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv_b")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_c")(x)
    keras.Model(inp, x, name="tiny").save(path)
    return path


def filters_section(layers: list[str], filters: str, **extra: Any) -> dict[str, Any]:
    return {"type": "filters", "model": "tiny", "layers": layers, "filters": filters,
            "params": dict(PARAMS), **extra}


def write_spec(tmp_path: Path, sections: list[dict[str, Any]], name: str = "spec.yaml", **top: Any) -> Path:
    if not (tmp_path / "tiny.keras").exists():
        save_tiny(tmp_path / "tiny.keras")
    path = tmp_path / name
    path.write_text(yaml.safe_dump({
        "title": "t", "output": "out/report", "formats": ["html"],
        "models": {"tiny": {"path": "tiny.keras"}}, "sections": sections, **top,
    }))
    return path


def scheduler_for(spec_path: Path, store_dir: Path, batch_size: int | None = None) -> AscentScheduler:
    spec = load_spec(spec_path)
    return AscentScheduler(Store(store_dir), ModelRegistry(spec), spec.precision, batch_size)


def request_all(sched: AscentScheduler, spec_path: Path) -> None:
    """What the filters sections' prepare does, section by section (the runner's path)."""
    from reportgen.analyses.filters import ANALYSIS

    spec = load_spec(spec_path)
    for i, section in enumerate(spec.sections):
        with sched.section(f"s{i + 1}"):
            ANALYSIS.prepare(section, _Ctx(spec, sched), i)


@dataclasses.dataclass
class _Ctx:
    """The part of RunContext that `FiltersAnalysis.prepare` uses."""

    spec: Any
    ascent: AscentScheduler

    @property
    def models(self) -> Any:
        return self.ascent.models

    def where(self, index: int, *field: Any) -> str:
        return f"sections[{index}]"


def test_sections_with_same_model_and_recipe_share_one_pass(tmp_path: Path) -> None:
    # few samples per layer (a batch's worth in all), so even layers of different depth share the pass
    spec_path = write_spec(tmp_path, [filters_section(["conv_a"], "0:3"),
                                      filters_section(["conv_c", "conv_b"], "2:5")])
    sched = scheduler_for(spec_path, tmp_path / "store", batch_size=5)
    request_all(sched, spec_path)
    plan = sched.plan()
    assert len(plan.passes) == 1
    (p,) = plan.passes
    assert p.layers == ("conv_a", "conv_b", "conv_c")  # model order: one extractor, an output at each
    assert p.pending == p.total == 9 and p.stored == 0
    assert [p.batch_size, p.chunks] == [5, 2]
    assert plan.sections == {"s1": (3, 0), "s2": (6, 0)}

    sched.execute(Progress(quiet=True))
    assert sched.computed == 9 and sched.reused == 0
    lm = sched.models.get("tiny")
    recipe = resolve_recipe("keras-example", PARAMS)
    program = program_for(lm, p.layers, recipe)
    assert program.trace_count == 1  # two chunks, three layers mixed in them: traced once

    # each sample's objective picked its own layer and channel: the same as a program for that layer alone
    for layer, filt in [("conv_a", 1), ("conv_b", 4), ("conv_c", 3)]:
        alone = AscentProgram(lm, [layer], recipe).run([AscentJob(layer, filt, 0)], 1)[0]
        stored = sched.store.get_npy(sched.requests[AscentRequest("tiny", layer, filt, recipe, 0)])
        np.testing.assert_array_equal(stored, alone.raw.astype(np.float16))
    assert sched.section_counts() == {"s1": (3, 0), "s2": (6, 0)}


def test_duplicate_requests_across_sections_are_computed_once(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, [filters_section(["conv_b"], "0:4"), filters_section(["conv_b"], "2:6")])
    sched = scheduler_for(spec_path, tmp_path / "store")
    request_all(sched, spec_path)
    assert sched.plan().pending == 6
    sched.execute(Progress(quiet=True))
    assert sched.computed == 6
    assert sched.section_counts() == {"s1": (4, 0), "s2": (4, 0)}


def test_estimates_from_layer_shapes(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, [filters_section(["conv_b"], "0:3")])
    lm = ModelRegistry(load_spec(spec_path)).get("tiny")
    cost = sample_cost(lm, ["conv_b"], (32, 32))
    conv_a = 2 * 32 * 32 * (3 * 3 * 3 * 8)
    conv_b = 2 * 16 * 16 * (3 * 3 * 8 * 12)
    assert cost.flops == conv_a + conv_b  # conv_c is deeper than the requested layer: not counted
    elements = 32 * 32 * 3 + 32 * 32 * 8 + 16 * 16 * 8 + 16 * 16 * 12  # rescale, conv_a, pool, conv_b
    assert cost.activation_bytes == 4 * elements
    assert sample_cost(lm, ["conv_b"], (32, 32), "bfloat16").activation_bytes == 2 * elements

    sched = scheduler_for(spec_path, tmp_path / "store")
    request_all(sched, spec_path)
    (p,) = sched.plan().passes
    assert p.flops == cost.flops * 2 * PARAMS["steps"] * 3  # (fwd + bwd to the input) x steps x filters


def test_batch_size_fits_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from reportgen.plan import MAX_BATCH_CPU_NO_ONEDNN

    per_sample = 1000
    c = SampleCost(flops=1, activation_bytes=per_sample)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # Eigen kernels: small CPU chunks are faster
    assert batch_size_for(c, DeviceBudget("CPU", 10**15)) == MAX_BATCH_CPU_NO_ONEDNN
    assert batch_size_for(c, DeviceBudget("GPU", 10**15)) == MAX_BATCH["GPU"]
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    assert batch_size_for(c, DeviceBudget("CPU", int(per_sample * MEMORY_FACTOR * 5.5))) == 5
    assert batch_size_for(c, DeviceBudget("CPU", 10)) == 1  # never 0
    assert batch_size_for(c, DeviceBudget("CPU", 10**15)) == MAX_BATCH["CPU"]
    assert batch_size_for(c, DeviceBudget("GPU", 10**15)) == MAX_BATCH["GPU"]
    assert batch_size_for(c, DeviceBudget("CPU", 10), override=7) == 7
    here = device_budget()
    assert here.kind == ("GPU" if tf.config.list_physical_devices("GPU") else "CPU")
    assert here.free_bytes > 0
    assert device_budget(0.25).free_bytes < here.free_bytes


def test_out_of_memory_halves_the_chunk_and_gives_identical_results(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, [filters_section(["conv_a", "conv_c"], "0:5")])
    normal = scheduler_for(spec_path, tmp_path / "normal", batch_size=8)
    request_all(normal, spec_path)
    normal.execute(Progress(quiet=True))

    injected = scheduler_for(spec_path, tmp_path / "injected", batch_size=8)
    request_all(injected, spec_path)
    (p,) = injected.plan().passes
    program = program_for(injected.models.get("tiny"), p.layers, p.recipe)
    real, sizes = program._run, []

    def once_out_of_memory(x0, *rest):  # noqa: ANN001, ANN002, ANN202
        sizes.append(int(x0.shape[0]))
        if len(sizes) == 1:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (injected)")
        return real(x0, *rest)

    program._run = once_out_of_memory
    injected.execute(Progress(quiet=True))
    assert sizes == [8, 4, 4, 2]  # 8 failed -> 4 + 4; the next chunk (2) starts at the learned limit
    assert program.batch_limit == 4
    assert injected.computed == normal.computed == 10
    for req, key in normal.requests.items():
        assert injected.requests[req] == key
        np.testing.assert_array_equal(injected.store.get_npy(key), normal.store.get_npy(key))
        assert injected.store.path(key, "png").read_bytes() == normal.store.path(key, "png").read_bytes()
        assert injected.store.get_json(key) == normal.store.get_json(key)


def test_dry_run_prints_the_plan_and_what_is_stored(tmp_path: Path, run_cli: Any) -> None:
    spec_path = write_spec(tmp_path, [filters_section(["conv_a", "conv_b"], "0:3"),
                                      filters_section(["conv_b"], "0:3", recipe="regularized")])
    first = run_cli("run", "--dry-run", "--batch-size", "2", spec_path)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert out.startswith("plan:\n")
    assert "2 of 2 passes to run on CPU" in out or "2 of 2 passes to run on GPU" in out
    assert "0 of 9 results stored, 9 to compute" in out
    assert "6 filters over 2 layers (conv_a, conv_b) at 32x32 px, 6 steps, batch 2 (3 chunks)" in out
    assert "FLOP" in out and "section s2-" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    run(spec_path, quiet=True)
    with run_lock(tmp_path / "out" / "report"):  # a dry run takes no lock: it works during a run
        second = run_cli("run", "--dry-run", spec_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("plan: nothing to compute")
    assert "9 of 9 results stored, 0 to compute" in second.stdout
    assert "all 6 results stored" in second.stdout


def test_progress_log_lines_when_not_a_tty(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="reportgen"):
        with Progress(tty=False).task("ascent m", 20) as advance:
            for _ in range(20):
                advance(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == 'start task="ascent m" total=20'
    progress = [ln for ln in lines if ln.startswith("progress ")]
    assert len(progress) == 10  # about every 10 %
    assert progress[-1].startswith('progress task="ascent m" done=20 total=20 pct=100 rate=')
    assert all(" eta=" in ln for ln in progress)
    assert lines[-1].startswith('done task="ascent m" items=20 seconds=')

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reportgen"):
        with Progress(quiet=True, tty=False).task("x", 5) as advance:
            advance(5)
        with Progress(tty=False).board() as board:  # concurrent passes: one log stream each
            a, b = board.add("a", 2), board.add("b", 1)
            a(1), b(1), a(1)
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" ")[0] for m in messages] == ["start", "start", "progress", "progress", "done",
                                                   "progress", "done"]


def test_progress_bars_on_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(tty=True).board() as board:
        a = board.add("ascent one", 4)
        b = board.add("ascent two", 2)
        a(4)
        b(2)
    err = capsys.readouterr().err
    assert "ascent one" in err and "ascent two" in err and "4/4" in err and "2/2" in err


def test_layers_of_very_different_depth_get_their_own_pass(tmp_path: Path) -> None:
    """Shallow samples must not pay for a deep layer once they fill a batch of their own; similar depths,
    or too few samples to fill a batch, still share one pass (and one trace)."""
    from reportgen.plan import split_by_depth

    spec_path = write_spec(tmp_path, [filters_section(["conv_a"], "0:3")])
    lm = ModelRegistry(load_spec(spec_path)).get("tiny")
    # conv_a: 1x cost, conv_b: 2x, conv_c: 4x (at 32 px)
    few = ["conv_a"] * 3 + ["conv_c"] * 3
    assert split_by_depth(lm, ["conv_a", "conv_c"], few, (32, 32), "float32") == [("conv_a", "conv_c")]
    many = ["conv_a"] * 8 + ["conv_b"] * 8 + ["conv_c"] * 8
    groups = split_by_depth(lm, ["conv_a", "conv_b", "conv_c"], many, (32, 32), "float32")
    assert groups == [("conv_a", "conv_b"), ("conv_c",)]  # conv_b is 2x conv_a: shares; conv_c is 4x: not
    costs = {g: sample_cost(lm, list(g), (32, 32)).flops for g in groups}
    merged = sample_cost(lm, ["conv_a", "conv_b", "conv_c"], (32, 32)).flops * 24
    assert sum(costs[g] * 8 * len(g) for g in groups) < merged
