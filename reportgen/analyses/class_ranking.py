"""`class_ranking`: which classes, and which images, of a dataset drive a filter the most.

One streamed forward pass (requested in `prepare`, planned with the other class rankings and predictions
on the same model and dataset, run by `reportgen.execute` before any section builds) computes the spatial
mean of every channel of the layer for every image; it
is cached for the whole layer, so any other filter of that layer (in this section, another section or a
later run) is ranked from the same (N, C) array without touching the model again. A class's value is
the mean over its decodable images of the filter's per-image mean activation (per-class running sums);
an image's value is its own mean activation.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from reportgen.analyses import dataset_pass
from reportgen.analyses.base import (
    Analysis,
    Artifact,
    Change,
    HistoryItem,
    RunContext,
    SectionOutput,
    SectionResult,
    slugify,
)
from reportgen.analyses.shared import NAMES_IN_NOTE, class_means, missing_note, thumbnail
from reportgen.datasets import Dataset
from reportgen.errors import ReportgenError
from reportgen.history.figures import rank_tau, set_overlap
from reportgen.history.series import Run, Series, mean, with_previous
from reportgen.imaging import chart_png, chart_text
from reportgen.models import LoadedModel
from reportgen.spec.fields import FilterSelection, SectionBase, Strict, check_filter_selection, expand_filters
from reportgen.work import DatasetRequest


class ClassRankingSection(SectionBase):
    type: Literal["class_ranking"]
    model: str
    dataset: str
    layer: str
    filters: FilterSelection = Field(description="Filters to rank classes and images for.")
    top: int = Field(10, ge=1, description="Classes in the table and chart.")
    top_images: int = Field(8, ge=1, description="Thumbnails of the most activating images.")

    _f = field_validator("filters")(check_filter_selection)

TABLE_ROWS_SHOWN = 25  # rows printed in the report; the CSV artifact has every class
SILENT_MAX = 1e-6  # a filter whose largest per-image mean activation is at most this never fires


def bar_chart(names: list[str], values: list[float], title: str, xlabel: str) -> bytes:
    """Horizontal bars, highest at the top; a Figure without pyplot so no global backend state changes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 1.1 + 0.3 * len(names)), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = np.arange(len(names))[::-1]
    ax.barh(ys, values, color="#3b78c2")
    ax.set_yticks(ys, [chart_text(n if len(n) <= 32 else n[:31] + "…") for n in names], fontsize=8)
    ax.set_xlabel(chart_text(xlabel), fontsize=8)
    ax.set_title(chart_text(title), fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    for y, v in zip(ys, values, strict=True):
        ax.annotate(f"{v:.3g}", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.margins(x=0.12)
    return chart_png(fig, ax)


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None



class ClassRankingChanges(Strict):
    """When an item counts as changed (the spec\'s `changes: {class_ranking: ...}`)."""

    tau: float = Field(0.8, ge=-1, le=1, description="Changed below this Kendall tau of the class order.")
    overlap: float = Field(0.6, ge=0, le=1, description="Changed below this share of common top images.")


class ClassRankingAnalysis(Analysis):
    section = ClassRankingSection
    filter_selection = ("filters", "layer")
    thresholds = ClassRankingChanges
    unit_items = True
    version = "1"

    def default_title(self, section: ClassRankingSection) -> str:
        return f"Classes that drive {section.layer}"

    def _filters(
        self, section: ClassRankingSection, ctx: RunContext, lm: LoadedModel, index: int
    ) -> list[int]:
        lm.layer(section.layer, ctx.where(index, "layer"))
        channels = lm.layer_channels(section.layer)
        filters = expand_filters(section.filters, channels)
        bad = [f for f in filters if f >= channels]
        if bad or not filters:
            what = f"filter {bad[0]} does not exist" if bad else f"{section.filters!r} selects no filter"
            raise ReportgenError(
                f"{ctx.where(index, 'filters')}: {what}; layer {section.layer!r} of model "
                f"{section.model!r} has {channels} channels (0..{channels - 1})"
            )
        return list(dict.fromkeys(filters))

    def prepare(self, section: ClassRankingSection, ctx: RunContext, index: int) -> None:
        """Check the layer and filters, and ask for the layer's per-image channel means."""
        self._filters(section, ctx, ctx.models.get(section.model), index)
        dataset_pass.request(ctx, DatasetRequest(section.model, section.dataset, layers=(section.layer,)))

    def build(
        self, section: ClassRankingSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm = ctx.models.get(section.model)
        filters = self._filters(section, ctx, lm, index)
        ds = ctx.datasets.get(section.dataset)
        data = dataset_pass.layer_means(ctx, lm, ds, section.layer)
        means, missing = data["means"], [int(i) for i in data["missing"]]
        items, n_classes = ds.items, len(ds.class_names)
        labelled = n_classes > 0
        valid = ~np.isnan(means).any(axis=1)
        notes = [n for n in [missing_note(items, missing)] if n]
        if labelled:
            per_class, counts = class_means(means, np.asarray([it.label for it in items]), n_classes)
            empty = [ds.class_names[k] for k in range(n_classes) if counts[k] == 0]
            if empty:
                notes.append(
                    f"{len(empty)} class(es) without a readable image, not ranked: "
                    f"{', '.join(empty[:NAMES_IN_NOTE])}."
                )
            if min(section.top, n_classes) > TABLE_ROWS_SHOWN:
                notes.append(
                    f"Tables show the top {TABLE_ROWS_SHOWN} classes; the linked CSV files list "
                    f"all {n_classes}."
                )
        else:
            notes.append(
                f"Dataset {section.dataset!r} has no class subfolders: images are ranked, classes are not."
            )

        layer_slug = slugify(section.layer)
        thumbs_written: dict[int, str] = {}
        rows_out, artifacts, findings, peaks = [], [], [], {}
        for f in filters:
            values = means[:, f]
            order = [int(i) for i in np.argsort(-np.where(valid, values, -np.inf), kind="stable") if valid[i]]
            if order and float(values[order[0]]) <= SILENT_MAX:
                # a ranking of ties at 0 would name a "top class" and "top images" that mean nothing
                peak = float(values[order[0]]) + 0.0  # + 0.0 prints -0.0 as 0
                findings.append(
                    f"Filter {f} never fires on this dataset (max mean activation {peak:.3g} over "
                    f"{len(order)} images): it is not ranked."
                )
                rows_out.append(
                    {"filter": f, "thumbs": [], "rows": [], "chart": None, "csv": None, "silent": peak}
                )
                continue
            top_idx = order[: section.top_images]
            thumbs = []
            for rank, i in enumerate(top_idx, 1):
                if i not in thumbs_written:
                    thumbs_written[i] = out.image(f"image_{i:05d}.png", thumbnail(items[i].path))
                thumbs.append(
                    {
                        "rank": rank,
                        "path": thumbs_written[i],
                        "file": items[i].name,
                        "name": items[i].class_name or items[i].stem,
                        "value": float(values[i]),
                    }
                )
            entry: dict[str, Any] = {
                "filter": f,
                "thumbs": thumbs,
                "rows": [],
                "chart": None,
                "csv": None,
                "silent": None,
            }
            if not order:
                rows_out.append(entry)
                continue
            if labelled:
                entry.update(self._rank_classes(section, ds, f, per_class[:, f], counts, out, layer_slug))
                top = entry["rows"][0]
                peaks[f] = top["name"]
                ratio = (
                    f", {top['ratio']:.1f}x the median class ({entry['median']:.3g})"
                    if top["ratio"] is not None
                    else f" (median class: {entry['median']:.3g})"
                )
                findings.append(f"Filter {f} peaks on class {top['name']} at {top['mean']:.4g}{ratio}.")
                share = sum(1 for t in thumbs if t["name"] == top["name"])
                if len(thumbs) > 1 and share * 2 >= len(thumbs):
                    findings.append(
                        f"Filter {f}: {share} of its {len(thumbs)} most activating images are {top['name']}."
                    )
                metrics = {
                    "dataset": section.dataset,
                    "top_class": top["name"],
                    "value": top["mean"],
                    "ratio_to_median": top["ratio"],
                    "images": int(valid.sum()),
                }
                artifacts.append(Artifact("chart", entry["chart"], section.model, section.layer, f, metrics))
                artifacts.append(Artifact("table", entry["csv"], section.model, section.layer, f, metrics))
            else:
                best = thumbs[0]
                ratio = _ratio(best["value"], float(np.median(values[valid])))
                tail = f", {ratio:.1f}x the median image" if ratio is not None else ""
                findings.append(f"Filter {f} responds most to {best['file']} at {best['value']:.4g}{tail}.")
            for t in thumbs:
                metrics = {
                    "rank": t["rank"],
                    "image": t["file"],
                    "value": t["value"],
                    "class": t["name"] if labelled else None,
                }
                artifacts.append(Artifact("image", t["path"], section.model, section.layer, f, metrics))
            rows_out.append(entry)

        shared = Counter(peaks.values())
        for name, n in shared.items():
            if n > 1:
                which = ", ".join(str(f) for f, c in peaks.items() if c == name)
                findings.append(f"Filters {which} all peak on class {name}.")
        return SectionResult(
            context={
                "model": section.model,
                "layer": section.layer,
                "dataset": section.dataset,
                "channels": lm.layer_channels(section.layer),
                "images": int(valid.sum()),
                "total": len(items),
                "classes": n_classes,
                "filters": rows_out,
            },
            artifacts=artifacts,
            findings=findings,
            notes=notes,
        )

    def history_items(self, result: SectionResult) -> list[HistoryItem]:
        """Per filter: its most activating images in rank order and, with labels, the class it peaks on and
        the order of all ranked classes."""
        units: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
        for a in result.artifacts:
            unit = units.setdefault(
                (a.model, a.layer, a.filter),
                {"model": a.model, "layer": a.layer, "filter": a.filter, "top_class": None, "top_images": [],
                 "order": []},
            )  # fmt: skip
            if a.kind == "chart":
                unit["top_class"] = a.metrics["top_class"]
            elif a.kind == "image":
                unit["top_images"].append([a.metrics["rank"], a.metrics["image"], a.metrics["value"]])
        for entry in result.context["filters"]:
            for (_, _, f), unit in units.items():
                if f == entry["filter"]:
                    unit["order"] = entry.get("order", [])
        return [
            HistoryItem(f"{m}/{layer}/{f}", {**unit, "top_images": sorted(unit["top_images"])})
            for (m, layer, f), unit in units.items()
            if f is not None
        ]

    def trend_figures(self, runs: list[Run]) -> dict[str, Series]:
        """Top-k overlap with the previous run: mean over filters of |top images ∩ previous ones| / k."""

        def overlap(before: Run, now: Run) -> float | None:
            shares = []
            for key in (k for k in now if k in before):
                old = {t[1] for t in before[key].get("top_images", [])}
                new = {t[1] for t in now[key].get("top_images", [])}
                if old or new:
                    shares.append(len(old & new) / max(len(old), len(new)))
            return mean(shares)

        return {"top-k overlap with the previous run": {"mean overlap": with_previous(runs, overlap)}}

    def change_metrics(self, old: dict[str, Any], new: dict[str, Any], limits: dict[str, float]) -> Change:
        """Changed: the class order's Kendall tau (over the classes ranked in either run, a class missing
        from one ranked last there) below `tau`, or the share of most activating images both runs show
        below `overlap`."""
        a, b = old["metrics"], new["metrics"]
        figures: dict[str, Any] = {"tau": None, "top_overlap": set_overlap(
            [t[1] for t in a["top_images"]], [t[1] for t in b["top_images"]])}  # fmt: skip
        reasons = []
        if a.get("order") and b.get("order"):
            figures["tau"] = round(rank_tau(a["order"], b["order"]), 4)
            if figures["tau"] < limits["tau"]:
                peaks = f"peak {a['top_class']} → {b['top_class']}"
                reasons.append(f"class order tau {figures['tau']:.2f} ({peaks})")
        if figures["top_overlap"] < limits["overlap"]:
            reasons.append(f"top images overlap {figures['top_overlap']:.0%}")
        reorder = (1.0 - figures["tau"]) / 2 if figures["tau"] is not None else 0.0
        score = max(1.0 - figures["top_overlap"], reorder)
        return Change(bool(reasons), "; ".join(reasons), figures, score)

    def _rank_classes(
        self,
        section: ClassRankingSection,
        ds: Dataset,
        f: int,
        values: np.ndarray,
        counts: np.ndarray,
        out: SectionOutput,
        layer_slug: str,
    ) -> dict[str, Any]:
        """Class table (capped), full CSV and bar chart of one filter."""
        order = np.argsort(-np.where(counts > 0, values, -np.inf), kind="stable")
        ranked = [int(k) for k in order if counts[k] > 0]
        med = float(np.median(values[ranked]))
        rows = [
            {
                "rank": r,
                "name": ds.class_names[k],
                "label": k,
                "mean": float(values[k]),
                "images": int(counts[k]),
                "ratio": _ratio(float(values[k]), med),
            }
            for r, k in enumerate(ranked, 1)
        ]
        full = [
            {
                "rank": r["rank"],
                "class": r["name"],
                "label": r["label"],
                "mean_activation": f"{r['mean']:.6g}",
                "images": r["images"],
                "ratio_to_median": "" if r["ratio"] is None else f"{r['ratio']:.4f}",
            }
            for r in rows
        ]
        full += [
            {
                "rank": "",
                "class": ds.class_names[k],
                "label": k,
                "mean_activation": "",
                "images": 0,
                "ratio_to_median": "",
            }
            for k in range(len(ds.class_names))
            if counts[k] == 0
        ]
        stem = f"{layer_slug}_f{f:04d}_classes"
        csv_rel = out.csv(f"{stem}.csv", full)
        top = rows[: section.top]
        chart = bar_chart(
            [r["name"] for r in top],
            [r["mean"] for r in top],
            f"{section.layer} filter {f}: top {len(top)} of {len(rows)} classes",
            f"mean activation of filter {f} over the class's images",
        )
        chart_rel = out.bytes(f"{stem}.png", chart)
        return {
            "rows": top[:TABLE_ROWS_SHOWN],
            "order": [r["name"] for r in rows],  # every ranked class, for Kendall tau between runs
            "ranked": len(rows),
            "median": med,
            "chart": chart_rel,
            "csv": csv_rel,
            "csv_name": Path(csv_rel).name,
        }


ANALYSIS = ClassRankingAnalysis()
