"""The "What changed" report: this run's items against a baseline's, per section, with figures.

Where the baseline comes from (`baseline:` in the spec, `reportgen.spec.changes`):
- `previous`: the last successful run of this spec in the run history; its pictures are read from the
  output folder that run published (still in place while this run builds: publishing comes last).
- `PATH` / `run: PATH`: an earlier output folder: its manifest.json (each section's `items`, written by
  every run) and its pictures.
- `model: KEY`: this run itself: every section of another model is paired with the section of model KEY
  of the same type whose fields are the same but `model` (and `title`/`observations`), e.g. two
  checkpoints run through the same sections. Item keys are compared without their model prefix.
- `reportgen diff OLD NEW` (`reportgen.diff`): two output folders' manifests, nothing recomputed.

Sections pair by id (position and title) except with `model:`; items pair by key, or, with `align:`, a
unit pairs with the old unit it was matched to (`reportgen.history.align`; the item gets `"matched"`).
Each section type decides what changed (`Analysis.change_metrics`, thresholds from the spec's
`changes:`); an item only in the baseline is "removed", one only in this run "new". The most-changed
items of each section are copied (old and new picture) into `assets/s0-what-changed/` of the report, so
the report keeps them after the baseline's folder is replaced; a picture that is gone is said to be.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reportgen.analyses import analysis_for
from reportgen.errors import SpecError
from reportgen.history.align import load_means, match_units, means_file, unit_layers
from reportgen.history.store import ItemRow, history_path, previous_run, run_items
from reportgen.spec.changes import BaselineSpec, ThresholdsBase

ASSETS = Path("assets") / "s0-what-changed"
SHOWN = 6  # most-changed items per section shown old | new
IDENTITY = ("model", "layer", "filter", "image")  # the metrics that name an item in the manifest
COUNTS = ("changed", "unchanged", "new", "removed")


@dataclass
class Entry:
    """One item on one side of a comparison; `root`: the output folder its relative paths resolve in."""

    key: str
    digest: str | None
    metrics: dict[str, Any]
    root: Path | None

    def side(self) -> dict[str, Any]:
        """What `Analysis.change_metrics` gets."""
        rel = self.metrics.get("picture")
        picture = self.root / rel if rel and self.root is not None else None
        return {"image_digest": self.digest, "metrics": self.metrics, "picture": picture, "root": self.root}

    def short_key(self) -> str:
        """The key without its model prefix: the same item of another model's twin section."""
        model = self.metrics.get("model")
        return self.key[len(model) + 1 :] if model and self.key.startswith(f"{model}/") else self.key


@dataclass
class Section:
    sid: str
    title: str
    type: str
    items: list[Entry] = field(default_factory=list)


@dataclass(frozen=True)
class Baseline:
    """The spec's `baseline:` in its mapping form (a plain string is `run:`)."""

    run: str | None
    model: str | None
    align: str | None

    @staticmethod
    def of(value: str | BaselineSpec) -> Baseline:
        if isinstance(value, str):
            return Baseline(value, None, None)
        return Baseline(value.run, value.model, value.align)


def manifest_items(rows: list[ItemRow], sid: str) -> list[dict[str, Any]]:
    """A section's history items as manifest.json keeps them: a later `baseline: PATH` or `reportgen diff`
    compares with them."""
    return [{"key": r.key, "image_digest": r.image_digest, "metrics": r.metrics} for r in rows
            if r.section_id == sid]  # fmt: skip


def from_rows(rows: list[ItemRow], titled: list[tuple[str, str, str]], root: Path) -> list[Section]:
    """This run's sections ((id, title, type) each) and items."""
    return [
        Section(
            sid,
            title,
            stype,
            [Entry(r.key, r.image_digest, r.metrics, root) for r in rows if r.section_id == sid],
        )  # fmt: skip
        for sid, title, stype in titled
    ]


def from_history(path: Path, run_id: str, root: Path) -> list[Section]:
    """A recorded run's sections (titled by their ids: the history keeps no titles) and items."""
    sections: dict[str, Section] = {}
    for i in run_items(path, run_id):
        s = sections.setdefault(i["section_id"], Section(i["section_id"], i["section_id"], i["section_type"]))
        s.items.append(Entry(i["item_key"], i["image_digest"], i["metrics"], root))
    return list(sections.values())


def read_manifest(folder: Path, where: str, what: str) -> dict[str, Any]:
    """An output folder's manifest.json, or SpecError (one line at `where`) saying why it cannot serve."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError([f"{where}: {what}: {folder} is not a reportgen output folder (no manifest.json); "
                         "name the folder an earlier run published its report to"]) from None  # fmt: skip
    except (OSError, ValueError) as exc:
        raise SpecError([f"{where}: {what}: {folder}/manifest.json cannot be read ({exc}); name another "
                         "output folder"]) from None  # fmt: skip
    sections = manifest.get("sections") if isinstance(manifest, dict) else None
    if not isinstance(sections, list) or any("items" not in s or "id" not in s for s in sections):
        raise SpecError([f"{where}: {what}: {folder} was published by an older reportgen (its manifest has "
                         "no items to compare); run its spec again, or compare with `previous`"])  # fmt: skip
    return manifest


def from_manifest(folder: Path, manifest: dict[str, Any]) -> list[Section]:
    """An output folder's sections and items (manifest.json's `sections[].items`)."""
    return [
        Section(s["id"], s["title"], s["type"],
                [Entry(i["key"], i["image_digest"], i["metrics"], folder) for i in s["items"]])
        for s in manifest["sections"]
    ]  # fmt: skip


def prepare_baseline(spec: Any, ctx: Any) -> None:
    """Before any compute: check the baseline (a PATH must be an output folder with items; with `model:`,
    some section must have a twin of that model) and declare the dataset passes `align:` needs."""
    if spec.baseline is None:
        return
    base = Baseline.of(spec.baseline)
    if base.run not in (None, "previous"):
        read_manifest(baseline_folder(spec, base.run), baseline_where(spec, base), "baseline")
    if base.model is not None and not model_pairs(spec, base.model):
        raise SpecError([f"{baseline_where(spec, base)}: baseline: no section of another model has a twin "
                         f"of model {base.model!r} (same type and fields but `model`); add the same sections "
                         "for both models"])  # fmt: skip
    if base.align is not None:
        from reportgen.work import DatasetRequest

        with ctx.work.section("what-changed"):
            for model, layers in unit_layers(spec).items():
                ctx.work.add(DatasetRequest(model, base.align, tuple(layers)))


def baseline_where(spec: Any, base: Baseline) -> str:
    from reportgen.spec.load import locate

    path: tuple[Any, ...] = ("baseline",) if isinstance(spec.baseline, str) else ("baseline", "run")
    return locate(spec, path if base.model is None else ("baseline", "model"))


def baseline_folder(spec: Any, run: str) -> Path:
    """`baseline: PATH`, relative to the spec file's folder."""
    path = Path(run).expanduser()
    filename = getattr(spec, "_filename", None)
    base = Path(filename).resolve().parent if filename else Path.cwd()
    return path if path.is_absolute() else (base / path).resolve()


def model_pairs(spec: Any, old_model: str) -> dict[int, int]:
    """With `model: KEY`: new section index -> the index of its twin of model KEY (same type and fields
    but `model`, `title` and `observations`)."""

    def fields(s: Any) -> dict[str, Any]:
        return s.model_dump(exclude={"model", "title", "observations"})

    olds = [(i, fields(s)) for i, s in enumerate(spec.sections) if getattr(s, "model", None) == old_model]
    pairs = {}
    for i, s in enumerate(spec.sections):
        model = getattr(s, "model", None)
        if model is None or model == old_model:
            continue
        twin = next((j for j, f in olds if f == fields(s)), None)
        if twin is not None:
            pairs[i] = twin
    return pairs


def run_changes(
    spec: Any,
    ctx: Any,
    spec_path: str,
    rows: list[ItemRow],
    titled: list[tuple[str, str, str]],
    staging: Path,
) -> dict[str, Any] | None:
    """The run's change report ("changes" of the manifest) against the spec's baseline, or None without
    one. `titled`: (id, title, type) of every section; `staging`: the report folder being built (this
    run's pictures are there; the most-changed pictures are copied there). Read before this run is
    recorded in the history, so `previous` is the run before it."""
    if spec.baseline is None:
        return None
    base = Baseline.of(spec.baseline)
    now = from_rows(rows, titled, staging)
    thresholds: ThresholdsBase = spec.changes
    means = _this_run_means(spec, ctx, base.align, staging) if base.align else {}
    if base.model is not None:
        paired = [(now[j], now[i]) for i, j in model_pairs(spec, base.model).items()]
        alignments = {}
        for (model, layer), new in means.items():
            old = means.get((base.model, layer))
            if model != base.model and old is not None:
                alignments[(model, layer)] = {"model": model, "baseline_model": base.model, "layer": layer,
                                              **match_units(old, new)}  # fmt: skip
        return compare(f"model {base.model}", "model", paired, thresholds, alignments, staging)
    if base.run == "previous":
        path = history_path(spec)
        found = previous_run(path, spec_path)
        label, root = (found["run_id"], Path(found["output"])) if found else (None, None)
        old = from_history(path, found["run_id"], Path(found["output"])) if found else []
    else:
        root = baseline_folder(spec, str(base.run))
        manifest = read_manifest(root, baseline_where(spec, base), "baseline")
        label, old = str(root), from_manifest(root, manifest)
    by_id = {s.sid: s for s in old}
    paired = [(by_id.get(s.sid), s) for s in now]
    alignments = align_folders(root, means) if means else {}
    kind = "previous" if base.run == "previous" else "folder"
    return compare(label, kind, paired, thresholds, alignments, staging)


def _this_run_means(spec: Any, ctx: Any, dataset: str, staging: Path) -> dict[tuple[str, str], np.ndarray]:
    """(model, layer) -> (N, C) channel means over the alignment dataset (the planned pass's results),
    also written to the report folder for the next run to align against."""
    from reportgen.work import means_key

    ds = ctx.datasets.get(dataset)
    out = {}
    for model, layers in unit_layers(spec).items():
        lm = ctx.models.get(model)
        for layer in layers:
            values = np.asarray(ctx.result(means_key(lm, ds, layer), "alignment")["means"], np.float32)
            target = staging / means_file(model, layer)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, values, allow_pickle=False)
            out[(model, layer)] = values
    return out


def align_folders(
    old_root: Path | None, new_means: dict[tuple[str, str], np.ndarray]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Alignments of this run's units with an earlier output folder's (its stored means); a layer whose
    old means are missing (that run had no `align:`) or cover other images stays unaligned."""
    out = {}
    for (model, layer), new in new_means.items():
        old = load_means(old_root, model, layer)
        if old is not None and old.shape[0] == new.shape[0]:
            out[(model, layer)] = {"model": model, "baseline_model": model, "layer": layer,
                                   **match_units(old, new)}  # fmt: skip
    return out


def folder_alignments(old_root: Path, new_root: Path, sections: list[Section]) -> dict[tuple[str, str], Any]:
    """`reportgen diff`: the alignments two output folders' stored means give, for the units their
    sections show (the same as the run that made NEW computed against OLD)."""
    units = {(e.metrics["model"], e.metrics["layer"]) for s in sections if analysis_for(s.type).unit_items
             for e in s.items if e.metrics.get("layer")}  # fmt: skip
    means = {u: m for u in sorted(units) if (m := load_means(new_root, *u)) is not None}
    return align_folders(old_root, means)


def _aligned_key(entry: Entry, alignment: dict[str, Any]) -> tuple[str | None, int | None]:
    """The short key of the old unit `entry`'s unit was matched to (None: unmatched), and its index."""
    f, layer = entry.metrics.get("filter"), alignment["layer"]
    short = entry.short_key()
    prefix = f"{layer}/{f}"
    if not isinstance(f, int) or not (short == prefix or short[len(prefix) : len(prefix) + 1] in ("/", ".")):
        return short, None
    old = {n: o for o, n in alignment["pairs"]}.get(f)
    return (None, None) if old is None else (f"{layer}/{old}{short[len(prefix) :]}", old)


def compare(
    baseline: str | None,
    kind: str,
    paired: list[tuple[Section | None, Section]],
    thresholds: ThresholdsBase,
    alignments: dict[tuple[str, str], dict[str, Any]],
    out_root: Path,
) -> dict[str, Any]:
    """The manifest's "changes" against `baseline` (a run id, a folder or "model KEY"; `kind`: "previous",
    "folder" or "model"): per paired (old, new) section its counts, figures (the mean of each change
    figure over the compared items), items and most-changed items (pictures copied under `out_root`)."""
    out = []
    for n, (old_section, new_section) in enumerate(paired, 1):
        analysis = analysis_for(new_section.type)
        limits = thresholds.limits(new_section.type)
        before = {e.short_key(): e for e in (old_section.items if old_section else [])}
        rows: list[tuple[str, dict[str, Any], Entry | None, Entry | None, float]] = []
        used: set[str] = set()
        mine = {(str(e.metrics.get("model")), str(e.metrics.get("layer"))) for e in new_section.items}
        aligned = [a for unit, a in alignments.items() if unit in mine]
        for entry in new_section.items:
            alignment = alignments.get((str(entry.metrics.get("model")), str(entry.metrics.get("layer"))))
            key, matched = _aligned_key(entry, alignment) if alignment else (entry.short_key(), None)
            old = before.get(key) if key is not None else None
            if old is not None:
                used.add(key)  # type: ignore[arg-type]
            item, score = _item(analysis, limits, old, entry)
            if alignment is not None:
                item["matched"] = matched
            rows.append((entry.short_key(), item, old, entry, score))
        for key, old in before.items():
            if key not in used:
                item, score = _item(analysis, limits, old, None)
                rows.append((key, item, old, None, score))
        rows.sort(key=lambda r: r[0])
        counts = {k: sum(1 for r in rows if r[1]["status"] == k) for k in COUNTS}
        if not rows:
            continue
        section: dict[str, Any] = {
            "title": new_section.title,
            "type": new_section.type,
            "baseline_title": old_section.title if old_section else None,
            "counts": counts,
            "metrics": _means([r[1] for r in rows if r[1]["status"] in ("changed", "unchanged")]),
            "items": [r[1] for r in rows],
        }
        if aligned:
            section["alignment"] = aligned
        moved = sorted((r for r in rows if r[1]["status"] == "changed"), key=lambda r: -r[4])[:SHOWN]
        section["most_changed"] = [_shown(out_root, n, k, r) for k, r in enumerate(moved, 1)]
        out.append(section)
    return {
        "baseline": baseline,
        "baseline_kind": kind,
        "thresholds": thresholds.model_dump(),
        "sections": out,
    }


def _item(
    analysis: Any, limits: dict[str, float], old: Entry | None, new: Entry | None
) -> tuple[dict[str, Any], float]:
    """One item of the manifest's change report, and its change score."""
    shown = (new or old).metrics  # type: ignore[union-attr]
    metrics: dict[str, Any] = {}
    score = 0.0
    if old is None:
        status = "new"
    elif new is None:
        status = "removed"
    else:
        change = analysis.change_metrics(old.side(), new.side(), limits)
        status, score = ("changed" if change.changed else "unchanged"), float(change.score)
        metrics.update(change.figures)
        if change.changed:
            metrics["change"] = change.what
    metrics.update(old=old.metrics if old else None, new=new.metrics if new else None)
    key = (new or old).key  # type: ignore[union-attr]
    item = {k: shown[k] for k in IDENTITY if k in shown} | {"key": key, "status": status, "metrics": metrics}
    return item, score


def _means(items: list[dict[str, Any]]) -> dict[str, float]:
    """A section's figures: the mean of each numeric change figure over its compared items (a 0/1 figure
    such as `flips` becomes the share of items)."""
    sums: dict[str, list[float]] = {}
    for item in items:
        for name, value in item["metrics"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                sums.setdefault(name, []).append(float(value))
    return {name: round(sum(v) / len(v), 4) for name, v in sums.items()}


def _shown(out_root: Path, section: int, rank: int, row: tuple[Any, ...]) -> dict[str, Any]:
    """One of a section's most-changed items for the report: its old and new pictures copied into the
    report (None where an item has no picture; "gone" where the old one is no longer on disk)."""
    _, item, old, new, score = row
    pictures: dict[str, Any] = {}
    for side, entry in (("old", old), ("new", new)):
        src = entry.side()["picture"] if entry else None
        if src is None:
            pictures[side] = None
        elif not src.is_file():
            pictures[side] = "gone"
        else:
            rel = ASSETS / f"s{section}-{rank:02d}-{side}{src.suffix}"
            (out_root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out_root / rel)
            pictures[side] = rel.as_posix()
    figures = {k: v for k, v in item["metrics"].items() if k not in ("old", "new", "change")}
    return {"key": item["key"], "change": item["metrics"].get("change", ""), "score": round(score, 4),
            "figures": figures, **pictures}  # fmt: skip
