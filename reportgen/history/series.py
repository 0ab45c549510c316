"""Figures of a section over recorded runs, as its type's `Analysis.trend_figures` computes them.

A run's items of one section arrive as {item key: metrics} (what `history_items` recorded); a figure is a
`Series`: line label -> one value per run (None where a run has no value). These helpers are the few
reductions the types share (a mean of an item metric, a figure of each run against the one before), kept
in this leaf module so that analysis modules and `reportgen.history.trends` can both import them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Run = dict[str, dict[str, Any]]  # one run's items of one section: item key -> metrics
Series = dict[str, list[float | None]]  # line label -> one value per run (None: no value that run)


def mean(values: list[Any]) -> float | None:
    """Mean of the finite numbers among `values` (None when there are none)."""
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def means(runs: list[Run], metric: str, layer: str | None = None) -> list[float | None]:
    """Per run, the mean of a numeric item metric over its items (those of `layer` only, when given)."""
    mine = [[m for m in run.values() if layer in (None, str(m.get("layer")))] for run in runs]
    return [mean([m.get(metric) for m in items]) for items in mine]


def with_previous(runs: list[Run], pair: Callable[[Run, Run], float | None]) -> list[float | None]:
    """A figure of each run against the run before it (None for the first)."""
    return [None] + [pair(before, now) for before, now in zip(runs, runs[1:], strict=False)]
