"""The change figures and the comparison itself, without TensorFlow: unit matching against a known
permutation, picture distances on drawn pictures, Kendall tau against its definition, and a comparison
whose old picture is gone."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reportgen.history.align import match_units
from reportgen.history.changes import Entry, Section, compare
from reportgen.history.figures import rank_tau, set_overlap
from reportgen.history.perceptual import feature_distance, load, ssim
from reportgen.spec.schema import ChangeThresholds


def test_units_are_matched_through_a_permutation_and_the_extra_ones_stay_unmatched() -> None:
    rng = np.random.default_rng(0)
    old = rng.normal(size=(200, 5))
    permutation = [3, 0, 4, 1, 2]  # new unit j is old unit permutation[j], with noise and another scale
    extra = rng.normal(size=(200, 1))
    new = np.concatenate([old[:, permutation] * 2.0 + 0.1 * rng.normal(size=(200, 5)), extra], axis=1)
    found = match_units(old, new)
    assert sorted(found["pairs"]) == sorted([[o, n] for n, o in enumerate(permutation)])
    assert found["unmatched_old"] == [] and found["unmatched_new"] == [5]
    assert min(found["correlations"]) > 0.95


def test_a_dead_unit_and_undecodable_images_do_not_break_the_matching() -> None:
    rng = np.random.default_rng(1)
    old = rng.normal(size=(50, 3))
    old[:, 2] = 0.0  # dead: correlates with nothing
    new = old[:, [1, 0, 2]].copy()
    new[7] = np.nan  # an image the new run could not decode
    assert match_units(old, new)["pairs"] == [[0, 1], [1, 0], [2, 2]]


def kendall_tau_reference(a: list[str], b: list[str]) -> float:
    """tau-a from its definition over the pairs of a common set of names (no ties)."""
    concordant = discordant = 0
    for x, y in itertools.combinations(a, 2):
        s = (a.index(x) - a.index(y)) * (b.index(x) - b.index(y))
        concordant += s > 0
        discordant += s < 0
    return (concordant - discordant) / (concordant + discordant)


@pytest.mark.parametrize("seed", range(4))
def test_rank_tau_is_kendall_tau(seed: int) -> None:
    names = [f"c{i}" for i in range(7)]
    shuffled = list(np.random.default_rng(seed).permutation(names))
    assert rank_tau(names, shuffled) == pytest.approx(kendall_tau_reference(names, shuffled))
    assert rank_tau(names, names[::-1]) == pytest.approx(-1.0)
    assert set_overlap(["a", "b", "c", "d"], ["b", "d", "e", "f"]) == 0.5


def stripes(vertical: bool, phase: int = 0) -> np.ndarray:
    img = np.zeros((64, 64, 3), np.float32)
    idx = (np.arange(64) + phase) // 4 % 2 == 0
    if vertical:
        img[:, idx] = 1.0
    else:
        img[idx, :] = 1.0
    return img


def test_picture_figures_order_a_slight_change_below_a_different_picture() -> None:
    base = stripes(True)
    slight = np.clip(base + np.random.default_rng(0).normal(0, 0.02, base.shape), 0, 1).astype(np.float32)
    rotated = stripes(False)
    assert ssim(base, base) == pytest.approx(1.0) and feature_distance(base, base) == 0.0
    assert ssim(base, slight) > 0.9 > ssim(base, rotated)
    assert feature_distance(base, slight) < 0.1 < feature_distance(base, rotated)


def test_a_filter_whose_old_picture_is_gone_counts_by_digest_and_says_so(tmp_path: Path) -> None:
    old_root, new_root, out = tmp_path / "old", tmp_path / "new", tmp_path / "out"
    (new_root / "assets").mkdir(parents=True)
    (old_root / "assets").mkdir(parents=True)
    Image.fromarray((stripes(True) * 255).astype(np.uint8)).save(new_root / "assets" / "f0.png")
    Image.fromarray((stripes(True) * 255).astype(np.uint8)).save(old_root / "assets" / "f1.png")
    Image.fromarray((stripes(False) * 255).astype(np.uint8)).save(new_root / "assets" / "f1.png")

    def entry(root: Path, f: int, digest: str, activation: float) -> Entry:
        metrics = {"model": "m", "layer": "conv", "filter": f, "activation": activation,
                   "picture": f"assets/f{f}.png"}  # fmt: skip
        return Entry(f"m/conv/{f}/keras-example", digest, metrics, root)

    old = Section("s1-f", "F", "filters", [entry(old_root, 0, "a", 1.0), entry(old_root, 1, "b", 1.0)])
    new = Section("s1-f", "F", "filters", [entry(new_root, 0, "c", 1.0), entry(new_root, 1, "d", 1.01)])
    changes = compare("run-1", "previous", [(old, new)], ChangeThresholds(), {}, out)
    (section,) = changes["sections"]
    gone, redrawn = section["items"]
    assert gone["status"] == "changed" and gone["metrics"]["ssim"] is None
    assert "old picture no longer on disk" in gone["metrics"]["change"]
    assert redrawn["status"] == "changed" and redrawn["metrics"]["ssim"] < 0.9
    assert redrawn["metrics"]["activation_change"] == pytest.approx(0.01 / 1.01, abs=1e-4)
    shown = {m["key"]: m for m in section["most_changed"]}
    assert shown["m/conv/0/keras-example"]["old"] == "gone"
    copied = shown["m/conv/1/keras-example"]
    assert np.array_equal(load(out / copied["old"]), load(old_root / "assets" / "f1.png"))
    assert np.array_equal(load(out / copied["new"]), load(new_root / "assets" / "f1.png"))
    mean = redrawn["metrics"]["activation_change"] / 2  # the section's figure: the mean over its items
    assert section["metrics"]["activation_change"] == pytest.approx(mean, abs=1e-4)
