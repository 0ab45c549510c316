"""The shipped specs: every classic study and offline twin validates, and every twin runs end to end.

The classic studies (specs/*.yaml) need ImageNet weights and data that CI does not have, so they are only
validated (no `--models`: that would load the weights). The offline twins (specs/twins/*.yaml) use only
bundled models and photos, so each one is run for real, on a copy whose `output:` and `cache:` point into
the test's tmp_path: the tests never touch output/ and never reuse results of an earlier run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

SPECS = Path(__file__).resolve().parent.parent / "specs"
CLASSIC = sorted(p for p in SPECS.glob("*.yaml"))
TWINS = sorted(SPECS.glob("twins/*.yaml"))
EXPECTED_CLASSIC = {
    "demo", "resnet50v2_layers", "keras_example", "vgg19_filter31", "vgg16_gradcam_faces", "small_cnn_mnist",
}
EXPECTED_TWINS = {"hed_layers", "hed_keras_example", "hed_filter31", "fer_gradcam_faces", "fashion_cnn",
                 "fashion_nightly"}
MIN_PAGES = 3


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(SPECS).as_posix() for p in paths]


def test_the_expected_specs_are_shipped() -> None:
    """The parametrised tests below cover every study: a missing or renamed spec fails here, not silently."""
    assert EXPECTED_CLASSIC <= {p.stem for p in CLASSIC}
    assert EXPECTED_TWINS <= {p.stem for p in TWINS}


@pytest.mark.parametrize("spec", CLASSIC + TWINS, ids=_ids(CLASSIC + TWINS))
def test_spec_validates(spec: Path, cli_main: Callable[..., tuple[int, str, str]]) -> None:
    code, out, err = cli_main("validate", spec)
    assert code == 0, err
    assert f"{spec}: ok" in out


@pytest.mark.parametrize("spec", TWINS, ids=_ids(TWINS))
def test_twin_is_offline_and_publishes_both_formats(spec: Path) -> None:
    """A twin must run on a machine without internet, ImageNet weights or data folders."""
    data = yaml.safe_load(spec.read_text(encoding="utf-8"))
    assert data["output"] == f"../../output/twins/{spec.stem}"
    assert set(data["formats"]) == {"html", "pdf"}
    for key, model in data["models"].items():
        assert set(model) <= {"builtin", "input_size", "class_names"}, f"model {key!r} is not a builtin"
    for key, dataset in data.get("datasets", {}).items():
        assert "builtin" in dataset and "path" not in dataset, f"dataset {key!r} is not a builtin"


@pytest.mark.parametrize("spec", [p for p in CLASSIC if p.stem != "demo"],
                         ids=_ids([p for p in CLASSIC if p.stem != "demo"]))
def test_classic_study_reads_data_beside_the_repository(spec: Path) -> None:
    """Users put ImageNet-style folders and their own models under ../data and ../models."""
    data = yaml.safe_load(spec.read_text(encoding="utf-8"))
    for dataset in data.get("datasets", {}).values():
        assert dataset["path"].startswith("../data/")
    for model in data["models"].values():
        assert "keras_app" in model or model["path"].startswith("../models/")


def redirected_copy(spec: Path, tmp_path: Path) -> Path:
    """The spec rewritten with `output:` and `cache:` inside tmp_path (twins have no other relative paths)."""
    data = yaml.safe_load(spec.read_text(encoding="utf-8"))
    data["output"] = str(tmp_path / "out" / spec.stem)
    data["cache"] = str(tmp_path / "cache")
    copy = tmp_path / spec.name
    copy.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("spec", TWINS, ids=_ids(TWINS))
def test_twin_runs_end_to_end(spec: Path, tmp_path: Path,
                              cli_main: Callable[..., tuple[int, str, str]]) -> None:
    from pypdf import PdfReader

    copy = redirected_copy(spec, tmp_path)
    code, _, err = cli_main("run", copy, "-q")
    assert code == 0, err

    out = tmp_path / "out" / spec.stem
    pdf = out / "report.pdf"
    assert pdf.is_file() and (out / "report.html").is_file()
    assert len(PdfReader(pdf).pages) >= MIN_PAGES

    sections = yaml.safe_load(spec.read_text(encoding="utf-8"))["sections"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [s["type"] for s in manifest["sections"]] == [s["type"] for s in sections]
    for section in manifest["sections"]:
        assert section["artifacts"], f"section {section['title']!r} has no artifacts"
        missing = [a["path"] for a in section["artifacts"] if not (out / a["path"]).is_file()]
        assert not missing, f"section {section['title']!r}: artifacts not written: {missing[:3]}"
