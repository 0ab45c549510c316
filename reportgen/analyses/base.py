"""What every section type implements, and the run context it works in.

A section runs in three phases so that the scheduler can batch work across the whole spec:
`prepare` registers engine work (e.g. ascent jobs) without computing; the runner executes all
registered work per model in batched passes; `build` reads results (from the store) and returns
the section's template context and artifacts.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from reportgen.errors import ReportgenError
from reportgen.history.series import Run, Series
from reportgen.imaging import colormap, png_bytes
from reportgen.store import Store, atomic_write
from reportgen.work import WorkBoard


@dataclass
class Artifact:
    kind: str  # e.g. "filter", "grid", "chart", "table", "heatmap"
    path: str  # relative to the output folder
    model: str | None = None
    layer: str | None = None
    filter: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        row = {
            "kind": self.kind,
            "path": self.path,
            "model": self.model,
            "layer": self.layer,
            "filter": self.filter,
        }
        row.update(self.metrics)
        return row


@dataclass
class HistoryItem:
    """One item of a section as the run history (`reportgen.history`) keeps it, to compare runs: `key`
    names the item within its section (e.g. "model/layer/filter" or an image name), `metrics` its figures
    (JSON), `image` an output-relative path whose bytes' sha256 becomes the item's image digest."""

    key: str
    metrics: dict[str, Any]
    image: str | None = None


@dataclass
class SectionResult:
    context: dict[str, Any]  # for templates/sections/<type>.html.j2
    artifacts: list[Artifact] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # automatic, computed from the data
    notes: list[str] = field(default_factory=list)  # caveats (caps, skipped files)
    # (height, width) inputs the section ran its model at, where that is not the model's input size (an
    # ascent at a recipe's `size`); the title page shows the sizes a run really used
    sizes: list[tuple[int, int]] = field(default_factory=list)


class SectionOutput:
    """Where one section writes its files inside the staging output folder."""

    def __init__(self, staging: Path, slug: str):
        self.staging = staging
        self.rel = Path("assets") / slug
        (staging / self.rel).mkdir(parents=True, exist_ok=True)

    def image(self, name: str, image: np.ndarray | Any) -> str:
        rel = self.rel / name
        atomic_write(self.staging / rel, png_bytes(image))
        return rel.as_posix()

    def bytes(self, name: str, data: bytes) -> str:
        rel = self.rel / name
        atomic_write(self.staging / rel, data)
        return rel.as_posix()

    def array(self, name: str, values: np.ndarray) -> str:
        """A raw array as .npy (numpy.load reads it): the numbers behind a figure, for checking or reuse."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(values), allow_pickle=False)
        return self.bytes(name, buf.getvalue())

    def csv(self, name: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
        """A table as CSV (the full table behind a capped one in the PDF); columns default to the first
        row's keys, and keys not in `columns` are left out."""
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, columns or list(rows[0] if rows else {}), extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
        return self.bytes(name, buf.getvalue().encode())

    def copy(self, name: str, source: Path) -> str:
        rel = self.rel / name
        shutil.copyfile(source, self.staging / rel)
        return rel.as_posix()


def map_array(
    out: SectionOutput,
    name: str,
    values: np.ndarray,
    resolution: str,
    model: str,
    layer: str | None,
    image: str,
    what: str,
    **extra: Any,
) -> Artifact:
    """The numbers behind a figure as a .npy manifest artifact: users check or reuse the map itself, not
    its colours. `resolution` says which grid the values are on: "layer" (as the layer computed the map),
    "patch" (one value per sliding-patch position) or "input" (the model's input pixels, the grid the
    figure is drawn on)."""
    rel = out.array(name, np.asarray(values, np.float32))
    metrics = {"image": image, "map": what, "resolution": resolution, "shape": list(values.shape), **extra}
    return Artifact("array", rel, model, layer, None, metrics)


def colour_bar(out: SectionOutput, name: str, cmap: str, model: str | None) -> tuple[str, Artifact]:
    """A strip of `cmap` from its low end (left) to its high end (right): the colour scale of a section's
    heatmaps, which the template labels with the values the ends stand for."""
    strip = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (16, 1))
    rel = out.image(name, colormap(strip, cmap, 0.0, 1.0))
    return rel, Artifact("colorbar", rel, model, None, None, {"colormap": cmap})


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "section"


class Analysis:
    """Base class of a section type. A subclass sets `section` (its pydantic model, whose `type` literal is
    the type's name) and implements `build` (and `prepare` where it requests batched work); its module
    sets `ANALYSIS = TheSubclass()`, which is how `reportgen.analyses` finds it."""

    section: ClassVar[type[Any]]
    type: ClassVar[str]  # derived from `section`
    version: ClassVar[str] = "1"  # bump when results change, so cached results are recomputed
    # its pydantic model of the spec's `changes: {<type>: ...}` thresholds (`change_metrics` gets them)
    thresholds: ClassVar[type[Any] | None] = None
    # whether its history items are units (filters) of a layer: `baseline: {align: ...}` matches them
    unit_items: ClassVar[bool] = False
    # (selection field, layer field) when its filters/channels are picked per layer: checked against the
    # layers' channels at the start of `run` (`reportgen.spec.files`); None: no such selection
    filter_selection: ClassVar[tuple[str, str] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type = typing.get_args(cls.section.model_fields["type"].annotation)[0]

    def default_title(self, section: Any) -> str:
        return self.type.replace("_", " ").capitalize()

    def ascent_layers(self, section: Any, model: Any) -> list[str]:
        """Layers whose subgraph one ascent sample of `section` computes, for the planner's check that a
        sample fits the device (`reportgen.plan.check_samples_fit`); default: the whole model (a class
        model's score is the last layer's)."""
        return [model.model.layers[-1].name]

    def prepare(self, section: Any, ctx: RunContext, index: int) -> None:
        """Register batched engine work with ctx; default: nothing to batch across sections."""

    def build(self, section: Any, ctx: RunContext, out: SectionOutput, index: int) -> SectionResult:
        raise NotImplementedError

    def history_items(self, result: SectionResult) -> list[HistoryItem]:
        """The items of a built section that the run history keeps (read from `result` only, so it costs
        nothing); default: none. A type that has per-item figures worth comparing between runs overrides it,
        which keeps everything about a type in its own module."""
        return []

    def trend_figures(self, runs: list[Run]) -> dict[str, Series]:
        """Headline figures of this type over recorded runs, oldest first (each run: its `history_items`
        as {item key: metrics}), charted by the report's Trends section: figure title -> series. Default:
        none."""
        return {}

    def change_metrics(self, old: dict[str, Any], new: dict[str, Any], limits: dict[str, float]) -> Change:
        """How one history item changed between a baseline and this run (`reportgen.history.changes`).
        `old`/`new`: {"image_digest", "metrics", "picture": absolute path of the item's picture or None,
        "root": the output folder its relative paths (e.g. a stored map) resolve against}; `limits`: the
        type's thresholds from the spec's `changes:`. Default, for types without figures to compare: any
        difference of picture or figures."""
        if old["image_digest"] != new["image_digest"]:
            return Change(True, "picture changed", {}, 1.0)
        plain_old, plain_new = ({k: v for k, v in e["metrics"].items() if k != "picture"} for e in (old, new))
        if plain_old != plain_new:
            return Change(True, "figures changed", {}, 1.0)
        return Change(False, "", {}, 0.0)


@dataclass
class Change:
    """One item's change: whether it counts as changed (a figure beyond its threshold), what changed in a
    few words (the report), the change figures (manifest, `--fail-on-change`) and a score (0 = nothing,
    about 1 = completely different) that orders the most-changed items first."""

    changed: bool
    what: str
    figures: dict[str, Any]
    score: float


@dataclass
class RunContext:
    """Shared state of one run: spec, loaded models, datasets, the store and the batched engines."""

    spec: Any
    spec_path: Path
    store: Store
    staging: Path
    models: Any  # reportgen.models.ModelRegistry
    datasets: Any  # reportgen.datasets.DatasetRegistry
    ascent: Any  # reportgen.engine.scheduler.AscentScheduler
    progress: Any  # reportgen.progress.Progress
    batch_size: int = 16  # samples per batch of work that the planner did not size (--batch-size sets it)
    timings: dict[str, float] = field(default_factory=dict)
    # requests of every kind but ascent (reportgen.work): sections declare them in prepare, read in build
    work: WorkBoard = field(default_factory=WorkBoard)
    computed: int = 0  # results computed by analyses outside the ascent scheduler
    reused: int = 0
    fresh: set[str] = field(default_factory=set)  # keys computed in this run (not "reused" when read)

    def cached(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Arrays stored under a content key: computed once, reused by every later run with that key.

        Build the key with `reportgen.store.content_key(analysis type, version, model digest,
        dataset digest, every parameter that changes the result)`. The key is claimed while it is computed,
        so two runs sharing a store compute it once.
        """
        found = self.store.get_arrays(key)
        if found is None:
            with self.store.claim(key):  # another run sharing the store may be computing it right now
                found = self.store.get_arrays(key)
                if found is None:
                    arrays = compute()
                    self.store.put_arrays(key, arrays)
                    self.computed += 1
                    return arrays
        self.reused += 1
        return found

    def result(self, key: str, what: str) -> dict[str, np.ndarray]:
        """Arrays the executor stored under `key` before the sections build (counted once as computed when
        it stored them in this run, as reused otherwise); `what` names the work in the error a key that
        was never requested in `prepare` gets."""
        arrays = self.store.get_arrays(key)
        if arrays is None:
            raise ReportgenError(f"{what} result {key[:12]} is not in the store: not requested in prepare")
        if key in self.work.fresh:
            if key not in self.work.counted:
                self.work.counted.add(key)
                self.computed += 1
        else:
            self.reused += 1
        return arrays

    def where(self, index: int, *field_path: Any) -> str:
        from reportgen.spec.load import locate

        return locate(self.spec, ("sections", index, *field_path))

    def timed(self, label: str) -> _Timer:
        return _Timer(self.timings, label)


class _Timer:
    def __init__(self, sink: dict[str, float], label: str):
        self.sink, self.label = sink, label

    def __enter__(self) -> _Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink[self.label] = self.sink.get(self.label, 0.0) + time.perf_counter() - self.t0
