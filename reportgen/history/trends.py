"""Trends: the headline figures of each section over the recorded runs of a spec, as line charts.

A change report says what moved since one baseline; a slow drift (a layer's activations shrinking a
little every night, confidence eroding, dead filters accumulating) only shows over many nights. Once
the history (`reportgen.history`) holds at least MIN_EARLIER_RUNS successful runs of a spec that has a
`baseline:` (a spec run nightly to be compared), the report gets a "Trends" section after "What
changed": per section one chart per headline figure, over the last TREND_RUNS runs and this one.

Headline figures are declared by each section type, from the items the run history keeps for it
(`Analysis.trend_figures` in the type's module, helpers in `reportgen.history.series`): filters, mean
activation per layer and dead filters; predictions, mean confidence and top-1 agreement with the previous
run; class_ranking, top-k overlap with the previous run; gradcam, mean concentration; occlusion, mean
probability drop. A figure "with the previous run" has no value for the oldest run shown.

The history is read here with its own read-only SQL on the documented schema (tables `runs` and
`items`, `reportgen/history/__init__.py`), so the charts never write to it and never migrate it.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reportgen.history.series import Run, Series

TREND_RUNS = 30  # earlier runs shown: a month of nights stays readable on one chart
MIN_EARLIER_RUNS = 2  # with fewer, a "trend" is one step, which "What changed" already shows



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


def line_chart(labels: list[str], series: Series, title: str) -> bytes:
    """One line per series over the runs (x: run finish times), gaps where a run has no value; a Figure
    without pyplot, so no global backend state changes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from reportgen.imaging import chart_png, chart_text

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
    return chart_png(fig, ax)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def trend_charts(
    path: Path,
    spec_path: str,
    current: list[Any],
    sections: list[tuple[str, str, str]],
    staging: Path,
    finished: str,
    figures: Callable[[str, list[Run]], dict[str, Series]],
) -> list[dict[str, Any]]:
    """The Trends section: for every section (id, title, type) with headline figures and items in at
    least MIN_EARLIER_RUNS earlier runs, one chart per figure over those runs and this one (`current`:
    this run's history rows, `reportgen.history.ItemRow`, not yet recorded; `figures(type, runs)`: the
    type's headline figures, `Analysis.trend_figures`), written as PNG under
    `staging`/assets/trends/. Each entry is what the template and the manifest show: kind "trend",
    section, type, figure, path, and the plotted data (runs, finished, series)."""
    history = earlier_runs(path, spec_path)
    if len(history) < MIN_EARLIER_RUNS:
        return []
    charts = []
    for sid, title, stype in sections:
        now = {r.key: r.metrics for r in current if r.section_id == sid}
        shown = [h for h in history if (sid, stype) in h.sections]
        if not now or len(shown) < MIN_EARLIER_RUNS:
            continue
        runs = [h.sections[(sid, stype)] for h in shown] + [now]
        ids = [h.run_id for h in shown] + ["this run"]
        times = [h.finished for h in shown] + [finished]
        labels = [t[5:16].replace("T", " ") for t in times]  # MM-DD hh:mm
        for figure, series in figures(stype, runs).items():
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
