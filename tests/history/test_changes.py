"""The "What changed" report (reportgen.history.changes) on real runs of a hand-set model.

The model's three 1x1 units detect red, green and blue with different gains (1, 2, 1.5), so a unit's
picture and activation say which detector it is. A second checkpoint swaps kernels 0 and 1 (and the head's
rows with them, so it computes the same function): compared by index, units 0 and 1 changed and unit 2
did not; aligned over a dataset (Li et al. 2015), the swap is the permutation [[0, 1], [1, 0], [2, 2]] and
every unit is unchanged. The ascents start from plain gray (`init_scale: 0`): a unit's picture then
depends on the unit only, not on its index's seed, so a moved unit draws the same picture.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from reportgen.cli import main
from reportgen.errors import SpecError
from reportgen.runner import run

GAINS = (1.0, 2.0, 1.5)
CLASSES = ["red", "green", "blue"]


def colour_model(order: tuple[int, int, int] = (0, 1, 2), swap_classes: bool = False) -> keras.Model:
    """Unit i of the conv is the detector `order[i]` (red, green, blue: gain x (own channel - mean of the
    others) + 0.05); the head scores class c by 10 x the red/green/blue detector, wherever that sits, so
    reordering the units keeps the predictions. `swap_classes` swaps the head's class columns 0 and 1."""
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(3, 1, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    head = np.zeros((3, 3), np.float32)
    for unit, detector in enumerate(order):
        colour = np.full(3, -0.5, np.float32)
        colour[detector] = 1.0
        kernel[0, 0, :, unit] = GAINS[detector] * colour
        head[unit, detector] = 10.0
    if swap_classes:
        head = head[:, [1, 0, 2]]
    model.get_layer("conv").set_weights([kernel, np.full(3, 0.05, np.float32)])
    model.get_layer("head").set_weights([head, np.zeros(3, np.float32)])
    return model


def write_project(root: Path) -> None:
    """Eight 32x32 photos: pure red, green and blue, then random solid colours with noise (the alignment
    dataset: the units' channel means over them are far from collinear)."""
    colour_model().save(root / "m.keras")
    colour_model((1, 0, 2)).save(root / "swapped.keras")
    colour_model(swap_classes=True).save(root / "classes.keras")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(4)
    for i in range(8):
        colour = np.eye(3)[i] if i < 3 else rng.uniform(0, 1, 3)
        pixels = np.clip(colour * 255 + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i}.png")


def write_spec(root: Path, checkpoint: str, baseline: Any) -> Path:
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "title": "changes", "output": "out/report", "formats": ["html"],
        "models": {"m": {"path": checkpoint, "preprocess": "unit", "class_names": CLASSES}},
        "datasets": {"photos": {"path": "photos"}},
        "sections": [
            {"type": "filters", "title": "F", "model": "m", "layers": ["conv"], "filters": "0:3",
             "params": {"steps": 8, "size": 32, "crop": 0, "init_scale": 0}},
            {"type": "predictions", "title": "P", "model": "m", "dataset": "photos", "top_k": 2},
        ],
        "baseline": baseline,
    }, sort_keys=False))  # fmt: skip
    return path


def changes_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())["changes"]


def statuses(section: dict[str, Any]) -> dict[Any, str]:
    return {i.get("filter", i.get("image")): i["status"] for i in section["items"]}


def test_swapped_kernels_change_by_index_and_align_as_a_permutation(tmp_path: Path) -> None:
    write_project(tmp_path)
    report = tmp_path / "out" / "report"
    run(write_spec(tmp_path, "m.keras", {"run": "previous", "align": "photos"}), quiet=True)
    first = changes_of(report)
    assert first["baseline"] is None and first["sections"][0]["counts"]["new"] == 3
    assert (report / "assets" / "s0-what-changed" / "means" / "m--conv.npy").is_file()  # for a later align
    shutil.copytree(report, tmp_path / "night1")

    # by index, against the history's previous run: the swapped units changed, unit 2 did not
    run(write_spec(tmp_path, "swapped.keras", "previous"), quiet=True)
    shutil.copytree(report, tmp_path / "night2")
    filters, predictions = changes_of(report)["sections"]
    assert statuses(filters) == {0: "changed", 1: "changed", 2: "unchanged"}
    by_filter = {i["filter"]: i for i in filters["items"]}
    assert by_filter[0]["metrics"]["activation_change"] == pytest.approx(0.5, abs=0.1)  # gain 1 -> 2
    assert by_filter[2]["metrics"]["ssim"] == 1.0 and by_filter[2]["metrics"]["feature"] == 0.0
    assert predictions["counts"] == {"changed": 0, "unchanged": 8, "new": 0, "removed": 0}
    html = (report / "report.html").read_text()
    shown = filters["most_changed"]
    assert {m["key"].split("/")[2] for m in shown} == {"0", "1"}
    for m in shown:  # old | new copied into the report: the old folder is replaced when this run publishes
        assert (report / m["old"]).is_file() and (report / m["new"]).is_file()
        assert f'src="{m["old"]}"' in html and f'src="{m["new"]}"' in html

    # aligned against the first night's folder (baseline: {run: PATH, align}): a permutation, no change
    run(write_spec(tmp_path, "swapped.keras", {"run": "night1", "align": "photos"}), quiet=True)
    changes = changes_of(report)
    assert changes["baseline"] == str((tmp_path / "night1").resolve())
    filters, predictions = changes["sections"]
    (alignment,) = filters["alignment"]
    assert alignment["model"] == "m" and alignment["layer"] == "conv"
    assert alignment["pairs"] == [[0, 1], [1, 0], [2, 2]]
    assert alignment["unmatched_old"] == [] and alignment["unmatched_new"] == []
    assert statuses(filters) == {0: "unchanged", 1: "unchanged", 2: "unchanged"}
    assert {i["filter"]: i["matched"] for i in filters["items"]} == {0: 1, 1: 0, 2: 2}

    # reportgen diff on the two folders reproduces the in-run change report, without TensorFlow
    script = (
        "import sys; from pathlib import Path; from reportgen.cli import main\n"
        f"code = main(['diff', {str(tmp_path / 'night1')!r}, {str(report)!r}, '-o', "
        f"{str(tmp_path / 'diff')!r}, '-q'])\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'diff imported TensorFlow'\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    diffed = changes_of(tmp_path / "diff")
    assert diffed["sections"] == changes["sections"]
    assert (tmp_path / "diff" / "report.pdf").stat().st_size > 0
    assert 'id="what-changed"' in (tmp_path / "diff" / "report.html").read_text()

    # diff of the first two nights (by index): thresholds from the command line decide, a rule gates
    night2 = tmp_path / "night2"
    assert statuses(changes_of(night2)["sections"][0]) == {0: "changed", 1: "changed", 2: "unchanged"}
    loose = ["--threshold", "filters.activation=1", "--threshold", "filters.ssim=0", "--threshold",
             "filters.feature=1"]  # fmt: skip
    assert main(["diff", str(tmp_path / "night1"), str(night2), "-o", str(tmp_path / "d2"), "-q",
                 "--no-pdf", *loose, "--fail-on-change", "F.changed>=1"]) == 0  # fmt: skip
    assert changes_of(tmp_path / "d2")["sections"][0]["counts"]["changed"] == 0
    assert changes_of(tmp_path / "d2")["thresholds"]["filters"] == {"ssim": 0, "feature": 1, "activation": 1}
    assert main(["diff", str(tmp_path / "night1"), str(night2), "-o", str(tmp_path / "d2"), "-q",
                 "--no-pdf", "--fail-on-change", "filters.changed>=2"]) == 4  # fmt: skip
    assert changes_of(tmp_path / "d2")["sections"][0]["counts"]["changed"] == 2  # published, then exit 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "filter.ssim=0.5"], "no section type 'filter' has thresholds; did you mean"),
        (["--threshold", "filters.sim=0.5"], "filters has no threshold 'sim'; did you mean 'ssim'?"),
        (["--threshold", "filters.ssim=2"], "filters.ssim: Input should be less than or equal to 1"),
        (["--threshold", "filters.ssim=nan"], "the value must be a finite number"),
        (["--threshold", "filters"], "write TYPE.FIELD=NUMBER"),
        (["--fail-on-change", "nosuch.changed>0"], "the NEW report has no section 'nosuch'"),
    ],
)
def test_diff_command_line_mistakes_are_one_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    for name in ("old", "new"):  # two minimal published folders: a manifest with one filters section
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(
            {"title": name, "sections": [{"id": "s0", "title": "F", "type": "filters", "items": []}]}
        ))  # fmt: skip
    code = main(["diff", str(tmp_path / "old"), str(tmp_path / "new"), "-o", str(tmp_path / "d"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "d").exists()


def test_model_baseline_compares_twin_sections_of_two_checkpoints_in_one_run(tmp_path: Path) -> None:
    """`baseline: {model: KEY, align}`: the swapped checkpoint's sections against the same sections of the
    first checkpoint, in one run; sections without a twin (the predictions of one model) are not compared."""
    write_project(tmp_path)
    spec = write_spec(tmp_path, "m.keras", {"model": "night1", "align": "photos"})
    data = yaml.safe_load(spec.read_text())
    model = data["models"]["m"]
    data["models"] = {"night1": model, "night2": {**model, "path": "swapped.keras"}}
    filters, predictions = data["sections"]
    data["sections"] = [
        {**filters, "model": "night1", "title": "F1"},
        {**filters, "model": "night2", "title": "F2"},
        {**predictions, "model": "night2"},
    ]
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    run(spec, quiet=True)
    changes = changes_of(tmp_path / "out" / "report")
    assert changes["baseline"] == "model night1" and changes["baseline_kind"] == "model"
    (section,) = changes["sections"]
    assert (section["title"], section["baseline_title"]) == ("F2", "F1")
    (alignment,) = section["alignment"]
    assert (alignment["model"], alignment["baseline_model"]) == ("night2", "night1")
    assert alignment["pairs"] == [[0, 1], [1, 0], [2, 2]]
    assert statuses(section) == {0: "unchanged", 1: "unchanged", 2: "unchanged"}


def test_swapped_class_weights_flip_predictions(tmp_path: Path) -> None:
    write_project(tmp_path)
    run(write_spec(tmp_path, "m.keras", "previous"), quiet=True)
    run(write_spec(tmp_path, "classes.keras", "previous"), quiet=True)
    filters, predictions = changes_of(tmp_path / "out" / "report")["sections"]
    assert filters["counts"]["unchanged"] == 3  # the conv did not change
    items = {i["image"]: i for i in predictions["items"]}
    flipped = {name for name, i in items.items() if i["metrics"]["flips"]}
    old_top = {name: i["metrics"]["old"]["top1"] for name, i in items.items()}
    assert flipped == {name for name, top in old_top.items() if top in ("red", "green")}
    assert {"p0.png", "p1.png"} <= flipped and "p2.png" not in flipped  # pure red, green flip; blue stays
    for name in flipped:
        new_top = items[name]["metrics"]["new"]["top1"]
        assert {old_top[name], new_top} == {"red", "green"} and items[name]["status"] == "changed"
    assert predictions["metrics"]["flips"] == pytest.approx(len(flipped) / 8)


@pytest.mark.parametrize(
    ("baseline", "expected"),
    [
        ({"model": "mm"}, "baseline.model: unknown model 'mm'; did you mean 'm'?"),
        ({"run": "previous", "align": "photo"}, "baseline.align: unknown dataset 'photo'; did you mean"),
        ({"align": "photos"}, "baseline: needs run: (previous or an output folder) or model: (a model key)"),
        ({"run": "previous", "colour": 1}, "baseline.colour"),
    ],
)
def test_a_bad_baseline_is_one_located_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], baseline: Any, expected: str
) -> None:
    (tmp_path / "photos").mkdir()
    spec = write_spec(tmp_path, "m.keras", baseline)
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{spec}:") and expected in err[0], err


def test_a_baseline_folder_without_a_report_stops_before_any_compute(tmp_path: Path) -> None:
    write_project(tmp_path)
    (tmp_path / "nothing").mkdir()
    spec = write_spec(tmp_path, "m.keras", "nothing")
    with pytest.raises(SpecError) as caught:
        run(spec, quiet=True)
    (line,) = caught.value.problems
    assert line.startswith(f"{spec}:") and "is not a reportgen output folder (no manifest.json)" in line
    assert not (tmp_path / "out" / "report").exists()
    results = tmp_path / "out" / ".reportgen-cache" / "results"
    assert not results.exists() or not any(p.is_file() for p in results.rglob("*"))  # nothing computed
