"""`--fail-on-change` (reportgen.gate): the rule grammar, figures read generically from a change report,
and the real CLI: exit 4 naming the rule after publishing, 0 when no rule fires, 2 for a bad rule before
any compute."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from reportgen.errors import SpecError
from reportgen.gate import evaluate, figures, parse_rule


def _item(status: str, flip: bool, delta: float, **more: Any) -> dict[str, Any]:
    return {"status": status, "metrics": {"flip": flip, "confidence_delta": delta, **more}}


CHANGES: dict[str, Any] = {
    "baseline": "20260101000000-abcd",
    "sections": [
        {"title": "Faces", "type": "predictions",
         "counts": {"changed": 1, "unchanged": 3, "new": 0, "removed": 0},
         "items": [_item("changed", True, 0.4), _item("unchanged", False, 0.0),
                   _item("unchanged", False, 0.2), _item("unchanged", False, -0.2, note="x")]},
        {"title": "Ranking", "type": "class_ranking",
         "counts": {"changed": 2, "unchanged": 0, "new": 0, "removed": 0},
         "metrics": {"tau": 0.5}, "items": []},
    ],
}  # fmt: skip


def test_figures_are_counts_shares_item_means_and_section_numbers() -> None:
    faces, ranking = (figures(s) for s in CHANGES["sections"])
    assert faces["changed"] == 1 and faces["unchanged"] == 3 and faces["changed_share"] == 0.25
    assert faces["flip"] == 0.25  # a true/false metric's mean is the share of items where it holds
    assert faces["confidence_delta"] == pytest.approx((0.4 + 0.0 + 0.2 - 0.2) / 4)
    assert "note" not in faces
    assert ranking["tau"] == 0.5 and ranking["changed_share"] == 1.0


@pytest.mark.parametrize(("rule", "fires"), [
    ("predictions.flip>0.2", True), ("predictions.flip>0.25", False), ("predictions.flip>=25%", True),
    ("Faces.changed>=1", True), ("faces.changed>1", False), ("class_ranking.tau<0.8", True),
    ("Ranking.tau<0.5", False), ("predictions.unchanged==3", True), ("predictions.removed!=0", False),
])  # fmt: skip
def test_a_rule_fires_exactly_when_its_comparison_holds(rule: str, fires: bool) -> None:
    fired = evaluate([parse_rule(rule)], CHANGES)
    assert bool(fired) == fires
    if fires:
        assert rule in fired[0] and CHANGES["baseline"] in fired[0]


@pytest.mark.parametrize("rule", ["predictions", "predictions.flip", "predictions.flip>", ">0.5",
                                  "predictions.flip=>0.1", "predictions.flip>abc", "predictions.flip>1e999"])
def test_a_malformed_rule_is_one_line_naming_the_grammar(rule: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_rule(rule)
    (line,) = err.value.problems
    assert "--fail-on-change" in line and "SECTION.FIGURE OP NUMBER" in line


def test_a_figure_the_section_does_not_report_lists_those_it_does() -> None:
    with pytest.raises(SpecError) as err:
        evaluate([parse_rule("predictions.tau<0.5")], CHANGES)
    (line,) = err.value.problems
    assert "reports no figure 'tau'" in line and "flip" in line and "changed_share" in line


def write_project(root: Path) -> Path:
    """A 16x16 two-class classifier whose head can be swapped, two images, a predictions section."""
    import keras
    import numpy as np
    from PIL import Image

    keras.utils.set_random_seed(2)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3, name="conv")(inp))
    keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head")(x)).save(root / "m.keras")
    (root / "photos").mkdir()
    for i, colour in enumerate(([250, 10, 10], [10, 10, 250])):
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(root / "photos" / f"p{i}.png")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "gate", "output": "out/report", "formats": ["html"], "baseline": "previous",
        "models": {"m": {"path": "m.keras", "preprocess": "unit", "class_names": ["red", "blue"]}},
        "datasets": {"photos": {"path": "photos"}},
        "sections": [{"type": "predictions", "title": "Colours", "model": "m", "dataset": "photos"}],
    }, sort_keys=False))
    return spec


def swap_classes(path: Path) -> None:
    """A new checkpoint whose two classes are swapped: every top-1 flips."""
    import keras

    model = keras.saving.load_model(path)
    kernel, bias = model.get_layer("head").get_weights()
    model.get_layer("head").set_weights([kernel[:, ::-1], bias[::-1]])
    model.save(path)


def test_the_cli_exits_4_after_publishing_when_a_rule_fires(
    tmp_path: Path, cli_main: Callable[..., tuple[int, str, str]]
) -> None:
    spec = write_project(tmp_path)
    code, _, err = cli_main("run", str(spec), "--fail-on-change", "predictions.changed>0", "-q")
    assert code == 0, err  # the first night: every item is new, none changed
    swap_classes(tmp_path / "m.keras")
    code, _, err = cli_main("run", str(spec), "--fail-on-change", "predictions.changed_share>=0.5",
                            "--fail-on-change", "predictions.unchanged>5", "-q")
    (line,) = err.strip().splitlines()
    assert code == 4 and "'predictions.changed_share>=0.5'" in line and "changed_share = 1" in line
    assert "Colours" in line
    manifest = json.loads((tmp_path / "out" / "report" / "manifest.json").read_text())
    assert manifest["changes"]["sections"][0]["counts"]["changed"] == 2  # the report was published


def test_a_bad_rule_is_exit_2_before_any_compute(
    tmp_path: Path, cli_main: Callable[..., tuple[int, str, str]]
) -> None:
    spec = write_project(tmp_path)
    for rule, says in (("predictions.flips>>1", "not a rule"), ("gradcam.changed>0", "no section 'gradcam'")):
        code, _, err = cli_main("run", str(spec), "--fail-on-change", rule)
        (line,) = err.strip().splitlines()
        assert code == 2 and says in line
    assert not (tmp_path / "out").exists()
