"""Units that moved: matching the units of two checkpoints before comparing them (`baseline: {align: D}`).

After retraining from scratch a network learns much the same features, but in another order: unit 3 of
last night may be unit 17 today. Comparing by index would call both changed. Following Li et al. 2015
("Convergent Learning: Do different neural networks learn the same representations?"), each layer's
units are matched one to one by the correlation of their activations over a dataset: here each unit's
per-image channel mean over the dataset `D` (an (N, C) matrix per checkpoint, from the planned dataset
pass: `reportgen.work.DatasetRequest`, statistic "means"), the Pearson correlation of every old unit with
every new one, and the assignment that maximizes the summed correlation (the Hungarian method,
`scipy.optimize.linear_sum_assignment`, as the paper's "bipartite semi-matching" made one to one). Where
the layers differ in width, the units left over are unmatched.

The means of this run's models are planned in `prepare_alignment` (so `--dry-run` lists the pass and the
store serves a rerun), read after the sections built, and written to the output folder
(`assets/s0-what-changed/means/<model>--<layer>.npy`): a later run with `run: previous` or `run: PATH`
finds the old checkpoint's means there, because the old checkpoint file itself may be gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reportgen.analyses import analysis_for
from reportgen.analyses.base import slugify

MEANS_DIR = Path("assets") / "s0-what-changed" / "means"


def means_file(model: str, layer: str) -> Path:
    """Output-relative path of a model's layer means over the alignment dataset."""
    return MEANS_DIR / f"{slugify(model)}--{slugify(layer)}.npy"


def unit_layers(spec: Any, models: set[str] | None = None) -> dict[str, list[str]]:
    """model key -> layers whose units sections show (filters, class ranking, exemplars), in spec order;
    only the models in `models` when given."""
    found: dict[str, list[str]] = {}
    for s in spec.sections:
        if not analysis_for(s.type).unit_items or (models is not None and s.model not in models):
            continue
        for layer in getattr(s, "layers", None) or [s.layer]:
            found.setdefault(s.model, [])
            if layer not in found[s.model]:
                found[s.model].append(layer)
    return found


def match_units(old: np.ndarray, new: np.ndarray) -> dict[str, Any]:
    """Match the units (columns) of two (N, C) activation matrices over the same N images.

    Returns {"pairs": [[old, new], …] (by old index), "unmatched_old", "unmatched_new", "correlations":
    the pair's Pearson correlation}. Images undecodable in either run (NaN rows) are left out; a unit
    constant over the images (dead) correlates 0 with every other."""
    keep = ~(np.isnan(old).any(axis=1) | np.isnan(new).any(axis=1))
    a, b = old[keep].astype(np.float64), new[keep].astype(np.float64)
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a.T @ b) / np.outer(na, nb)
    corr = np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(corr, maximize=True)
    return {
        "pairs": [[int(r), int(c)] for r, c in zip(rows, cols, strict=True)],
        "unmatched_old": sorted(set(range(corr.shape[0])) - {int(r) for r in rows}),
        "unmatched_new": sorted(set(range(corr.shape[1])) - {int(c) for c in cols}),
        "correlations": [round(float(corr[r, c]), 4) for r, c in zip(rows, cols, strict=True)],
    }


def load_means(root: Path | None, model: str, layer: str) -> np.ndarray | None:
    """An output folder's stored means of a model's layer, or None (no alignment in that run, or gone)."""
    if root is None or not (root / means_file(model, layer)).is_file():
        return None
    return np.load(root / means_file(model, layer), allow_pickle=False)

