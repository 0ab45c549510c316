"""Trends: the headline figures of each section over the recorded runs of a spec, as line charts.

A change report says what moved since one baseline; a slow drift (a layer's activations shrinking a
little every night, confidence eroding, dead filters accumulating) only shows over many nights. Once
the history (`reportgen.history`) holds at least MIN_EARLIER_RUNS successful runs of a spec that has a
`baseline:` (a spec run nightly to be compared), the report gets a "Trends" section after "What
changed": per section one chart per headline figure, over the last TREND_RUNS runs and this one.

Headline figures, per section type (from the items the run history keeps for it):
- filters: mean activation per layer (one line per layer); number of dead filters;
- predictions: mean top-1 confidence; top-1 agreement with the previous run (share of the images both
  runs predicted whose top-1 class is the same);
- class_ranking: top-k overlap with the previous run (mean over filters of |top images ∩ previous top
  images| / k);
- gradcam: mean concentration (share of the heat in the hottest 10 % of pixels);
- occlusion: mean probability drop.
A figure "with the previous run" has no value for the oldest run shown.

The history is read here with its own read-only SQL on the documented schema (tables `runs` and
`items`, `reportgen/history/__init__.py`), so the charts never write to it and never migrate it.
"""

from __future__ import annotations

import io
import json
import math
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TREND_RUNS = 30  # earlier runs shown: a month of nights stays readable on one chart
MIN_EARLIER_RUNS = 2  # with fewer, a "trend" is one step, which "What changed" already shows

Run = dict[str, dict[str, Any]]  # one run's items of one section: item key -> metrics
Series = dict[str, list[float | None]]  # line label -> one value per run (None: no value that run)


@dataclass
class HistoryRun:
    """One successful run of a spec as the trends read it: id, finish time, items per section id."""

    run_id: str
    finished: str
    sections: dict[tuple[str, str], Run]  # (section id, section type) -> items


def earlier_runs(path: Path, spec_path: str, limit: int = TREND_RUNS) -> list[HistoryRun]:
    """The last `limit` successful runs of the spec at `spec_path` (absolute), oldest first, with their
    items; [] without a history. Read-only: a missing file is not created and an old one not upgraded."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60.0)
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] < 1:
            return []
        rows = db.execute(
            "SELECT run_id, finished FROM runs WHERE spec_path = ? AND status = 'ok' "
            "ORDER BY finished DESC, run_id DESC LIMIT ?",
            (spec_path, limit),
        ).fetchall()
        out = [HistoryRun(run_id, finished, {}) for run_id, finished in reversed(rows)]
        by_id = {r.run_id: r for r in out}
        if by_id:
            marks = ", ".join("?" * len(by_id))
            items = db.execute(
                "SELECT run_id, section_id, section_type, item_key, metrics FROM items "
                f"WHERE run_id IN ({marks})",
                list(by_id),
            ).fetchall()
            for run_id, sid, stype, key, metrics in items:
                by_id[run_id].sections.setdefault((sid, stype), {})[key] = json.loads(metrics)
        return out
    finally:
        db.close()


def _means(runs: list[Run], metric: str, layer: str | None = None) -> list[float | None]:
    """Per run, the mean of a numeric item metric over its items (those of `layer` only, when given)."""
    mine = [[m for m in run.values() if layer in (None, str(m.get("layer")))] for run in runs]
    return [_mean([m.get(metric) for m in items]) for items in mine]


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _with_previous(runs: list[Run], pair: Callable[[Run, Run], float | None]) -> list[float | None]:
    """A figure of each run against the run before it (None for the first)."""
    return [None] + [pair(before, now) for before, now in zip(runs, runs[1:], strict=False)]


def _filters(runs: list[Run]) -> dict[str, Series]:
    layers = sorted({str(m.get("layer")) for run in runs for m in run.values()})
    activation = {layer: _means(runs, "activation", layer) for layer in layers}
    dead = {"dead filters": [float(sum(bool(m.get("dead")) for m in run.values())) for run in runs]}
    return {"mean activation per layer": activation, "number of dead filters": dead}


def _agreement(before: Run, now: Run) -> float | None:
    both = [k for k in now if k in before]
    return sum(before[k].get("top1") == now[k].get("top1") for k in both) / len(both) if both else None


def _predictions(runs: list[Run]) -> dict[str, Series]:
    return {
        "mean confidence": {"mean top-1 confidence": _means(runs, "confidence")},
        "top-1 agreement with the previous run": {"share of images": _with_previous(runs, _agreement)},
    }


def _overlap(before: Run, now: Run) -> float | None:
    shares = []
    for key in (k for k in now if k in before):
        old = {t[1] for t in before[key].get("top_images", [])}
        new = {t[1] for t in now[key].get("top_images", [])}
        if old or new:
            shares.append(len(old & new) / max(len(old), len(new)))
    return _mean(shares)


def _class_ranking(runs: list[Run]) -> dict[str, Series]:
    return {"top-k overlap with the previous run": {"mean overlap": _with_previous(runs, _overlap)}}


def _gradcam(runs: list[Run]) -> dict[str, Series]:
    return {"mean concentration": {"top-10 % heat share": _means(runs, "concentration")}}


def _occlusion(runs: list[Run]) -> dict[str, Series]:
    return {"mean probability drop": {"drop": _means(runs, "drop")}}


HEADLINES: dict[str, Callable[[list[Run]], dict[str, Series]]] = {
    "filters": _filters,
    "predictions": _predictions,
    "class_ranking": _class_ranking,
    "gradcam": _gradcam,
    "occlusion": _occlusion,
}


def line_chart(labels: list[str], series: Series, title: str) -> bytes:
    """One line per series over the runs (x: run finish times), gaps where a run has no value; a Figure
    without pyplot, so no global backend state changes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from reportgen.imaging import chart_text

    fig = Figure(figsize=(6.5, 2.4), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(labels)))
    for name, values in series.items():
        ys = [math.nan if v is None else v for v in values]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=chart_text(name))
    step = max(1, len(labels) // 8)
    ax.set_xticks(xs[::step], [chart_text(t) for t in labels[::step]], fontsize=6, rotation=20, ha="right")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(chart_text(title), fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=6, frameon=False, loc="best")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def trend_charts(
    path: Path,
    spec_path: str,
    current: list[Any],
    sections: list[tuple[str, str, str]],
    staging: Path,
    finished: str,
) -> list[dict[str, Any]]:
    """The Trends section: for every section (id, title, type) with headline figures and items in at
    least MIN_EARLIER_RUNS earlier runs, one chart per figure over those runs and this one (`current`:
    this run's history rows, `reportgen.history.ItemRow`, not yet recorded), written as PNG under
    `staging`/assets/trends/. Each entry is what the template and the manifest show: kind "trend",
    section, type, figure, path, and the plotted data (runs, finished, series)."""
    history = earlier_runs(path, spec_path)
    if len(history) < MIN_EARLIER_RUNS:
        return []
    charts = []
    for sid, title, stype in sections:
        headline = HEADLINES.get(stype)
        now = {r.key: r.metrics for r in current if r.section_id == sid}
        shown = [h for h in history if (sid, stype) in h.sections]
        if headline is None or not now or len(shown) < MIN_EARLIER_RUNS:
            continue
        runs = [h.sections[(sid, stype)] for h in shown] + [now]
        ids = [h.run_id for h in shown] + ["this run"]
        times = [h.finished for h in shown] + [finished]
        labels = [t[5:16].replace("T", " ") for t in times]  # MM-DD hh:mm
        for figure, series in headline(runs).items():
            rel = f"assets/trends/{sid}-{_slug(figure)}.png"
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(line_chart(labels, series, f"{title}: {figure}"))
            charts.append({"kind": "trend", "section": title, "type": stype, "figure": figure, "path": rel,
                           "runs": ids, "finished": times, "series": series})  # fmt: skip
    return charts


def add_to_manifest(manifest: Path, charts: list[dict[str, Any]]) -> None:
    """Add the trend charts to manifest.json as `"trends": [{"kind": "trend", "section", "type", "figure",
    "path", "runs", "finished", "series"}]` (nothing when there are none)."""
    if not charts:
        return
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["trends"] = charts
    manifest.write_text(json.dumps(data, indent=1), encoding="utf-8")
