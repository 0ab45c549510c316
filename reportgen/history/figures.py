"""Change figures that several section types share (a section never imports another section): how far a
number moved, how a ranking reordered, how much two sets overlap."""

from __future__ import annotations

from typing import Any

import numpy as np


def relative_change(a: float, b: float) -> float:
    """|b - a| over the larger magnitude: 0 for the same value, 1 for a value that vanished (or appeared),
    2 for a sign flip of equal size."""
    return abs(b - a) / max(abs(a), abs(b), 1e-12)


def rank_tau(old: list[str], new: list[str]) -> float:
    """Kendall tau (scipy.stats.kendalltau, tau-b) of two rankings of names; a name one ranking lacks is
    ranked after all of its names. 1 for the same order."""
    from scipy.stats import kendalltau

    names = list(dict.fromkeys(old + new))
    if len(names) < 2:
        return 1.0
    rank_a = [old.index(n) if n in old else len(old) for n in names]
    rank_b = [new.index(n) if n in new else len(new) for n in names]
    tau = kendalltau(rank_a, rank_b).statistic
    return 1.0 if np.isnan(tau) else float(tau)


def set_overlap(old: list[Any], new: list[Any]) -> float:
    """The share of the larger set that both hold: 1 for the same items, 0 for none in common."""
    larger = max(len(set(old)), len(set(new)))
    return 1.0 if larger == 0 else round(len(set(old) & set(new)) / larger, 4)


def stored_map(entry: dict[str, Any]) -> np.ndarray | None:
    """A history entry's stored map (metrics["map"], e.g. a Grad-CAM at input resolution) from its output
    folder, or None where it is gone."""
    rel, root = entry["metrics"].get("map"), entry.get("root")
    if not rel or root is None or not (root / rel).is_file():
        return None
    return np.load(root / rel, allow_pickle=False).astype(np.float64)


def map_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps over their pixels; 1 for two constant (e.g. empty) maps that are
    equal, 0 where only one is constant."""
    da, db = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((da * da).sum() * (db * db).sum()))
    if norm == 0.0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float((da * db).sum() / norm)


def centre_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between the maps' centres of (positive) heat, in diagonals of the map; 0 when either is
    empty (no centre to move)."""
    centres = []
    for m in (a, b):
        w = np.clip(m, 0.0, None)
        if w.sum() <= 0:
            return 0.0
        ys, xs = np.indices(w.shape)
        centres.append(np.array([(ys * w).sum(), (xs * w).sum()]) / w.sum())
    return float(np.linalg.norm(centres[0] - centres[1]) / np.hypot(*a.shape[:2]))
