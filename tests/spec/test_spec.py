"""Spec validation: the design's example validates as written; every mistake is located and explained."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from spec_files import col_of, line_of, problems, write

from reportgen.spec.fields import expand_filters
from reportgen.spec.load import load_spec, spec_sha256
from reportgen.spec.schema import SECTION_TYPES, Section, json_schema

# The example spec of the design document, written in block style as a user would.
EXAMPLE = """\
title: What VGG16 learns
output: ../output/vgg16
formats: [html, pdf]
seed: 0
models:
  vgg:
    keras_app: VGG16
    weights: imagenet
    input_size: [180, 180]
  emotions:
    path: ../models/emotion.keras
    preprocess:
      scale: 0.0078431373
      offset: -1.0
datasets:
  photos:
    path: ../data/photos
  imagenet_val:
    path: /data/imagenet/val
    labels: imagenet
    per_class: 50
sections:
  - type: filters
    title: block4 filters
    model: vgg
    layers: [block1_conv2, block4_conv3]
    filters: "0:64"
    recipe: keras-example
    observations: "Markdown written by the spec's author."
  - type: class_ranking
    model: vgg
    layer: block3_conv1
    filters: [31]
    dataset: imagenet_val
    top: 10
"""

MINIMAL = """\
title: t
output: out
models:
  vgg:
    keras_app: VGG16
datasets:
  photos:
    path: photos
sections:
  - type: filters
    model: vgg
    layers: [block1_conv1]
"""


# -- the example ----------------------------------------------------------------------------------
def test_design_example_validates_as_written(tmp_path: Path) -> None:
    path = write(tmp_path / "specs", EXAMPLE)
    spec = load_spec(path)
    assert spec.title == "What VGG16 learns"
    assert spec.formats == ["html", "pdf"]
    assert spec.models["vgg"].keras_app == "VGG16"
    assert spec.models["vgg"].input_size == (180, 180)
    assert spec.models["emotions"].preprocess.scale == pytest.approx(0.0078431373)
    assert spec.models["emotions"].preprocess.offset == -1.0
    assert spec.datasets["imagenet_val"].per_class == 50
    assert [s.type for s in spec.sections] == ["filters", "class_ranking"]
    assert spec.sections[0].layers == ["block1_conv2", "block4_conv3"]
    assert spec.sections[1].filters == [31] and spec.sections[1].top == 10


def test_paths_resolve_relative_to_the_spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = EXAMPLE.replace("weights: imagenet", "weights: w/vgg.weights.h5")
    path = write(tmp_path / "project" / "specs", text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current directory must not matter
    spec = load_spec(path)
    project = (tmp_path / "project").resolve()
    assert Path(spec.output) == project / "output" / "vgg16"
    assert Path(spec.models["emotions"].path) == project / "models" / "emotion.keras"
    assert Path(spec.models["vgg"].weights) == project / "specs" / "w" / "vgg.weights.h5"
    assert Path(spec.datasets["photos"].path) == project / "data" / "photos"
    assert spec.datasets["imagenet_val"].path == "/data/imagenet/val"  # absolute stays as written


def test_imagenet_and_none_weights_are_keywords_not_paths(tmp_path: Path) -> None:
    text = MINIMAL.replace("keras_app: VGG16", "keras_app: VGG16\n    weights: none")
    spec = load_spec(write(tmp_path, text))
    assert spec.models["vgg"].weights == "none"
    assert load_spec(write(tmp_path, EXAMPLE)).models["vgg"].weights == "imagenet"


def test_spec_sha256_is_the_file_hash(tmp_path: Path) -> None:
    import hashlib

    path = write(tmp_path, EXAMPLE)
    assert spec_sha256(path) == hashlib.sha256(EXAMPLE.encode()).hexdigest()


# -- bad specs: each message says file:line:col, the field, and the fix ------------------------------
def test_unknown_key_did_you_mean_with_location(tmp_path: Path) -> None:
    text = MINIMAL.replace("    layers: [block1_conv1]\n", "    layers: [block1_conv1]\n    fliters: '0:8'\n")
    path = write(tmp_path, text)
    (msg,) = problems(path)
    at = f"{path}:{line_of(text, 'fliters')}:{col_of(text, 'fliters')}"
    assert msg.startswith(f"{at}: sections[0].fliters: unknown key 'fliters'")
    assert "did you mean 'filters'?" in msg


def test_unknown_key_in_a_filters_section_that_also_sets_filters(tmp_path: Path) -> None:
    """The section's type tag `filters` is also a field name: the typo must still be found at its own line."""
    text = MINIMAL + "    filters: '0:8'\n    titel: Early filters\n"
    path = write(tmp_path, text)
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:{line_of(text, 'titel')}:5: sections[0].titel: unknown key 'titel'")
    assert "did you mean 'title'?" in msg


def test_unknown_top_level_and_model_keys(tmp_path: Path) -> None:
    text = MINIMAL.replace("title: t", "titel: t")
    text = text.replace("keras_app: VGG16", "keras_app: VGG16\n    wieghts: none")
    path = write(tmp_path, text)
    found = problems(path)
    at = f"{path}:{line_of(text, 'wieghts')}:5"
    assert f"{at}: models.vgg.wieghts: unknown key 'wieghts'; did you mean 'weights'?" in found
    assert any(p.startswith(f"{path}:1:1: titel: unknown key 'titel'; did you mean 'title'?") for p in found)
    assert any("title: required field is missing" in p for p in found)


def test_unknown_model_key_in_a_section(tmp_path: Path) -> None:
    text = MINIMAL.replace("    model: vgg", "    model: vgq")
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:{line_of(text, 'model: vgq')}:5: sections[0].model: unknown model 'vgq'; did you mean 'vgg'?"
    ]


def test_unknown_dataset_key(tmp_path: Path) -> None:
    text = MINIMAL + "  - type: class_ranking\n    model: vgg\n    layer: block3_conv1\n    filters: [31]\n" \
        "    dataset: photo\n"
    path = write(tmp_path, text)
    (msg,) = problems(path)
    at = f"{path}:{line_of(text, 'dataset: photo')}:5"
    assert msg == f"{at}: sections[1].dataset: unknown dataset 'photo'; did you mean 'photos'?"


def test_dataset_reference_without_any_datasets_says_where_to_declare(tmp_path: Path) -> None:
    text = MINIMAL.replace("datasets:\n  photos:\n    path: photos\n", "") + (
        "  - type: predictions\n    model: vgg\n    dataset: photos\n")
    (msg,) = problems(write(tmp_path, text))
    assert "unknown dataset 'photos'" in msg and "declare it under `datasets:`" in msg


def test_unknown_section_type(tmp_path: Path) -> None:
    text = MINIMAL.replace("type: filters", "type: filterz")
    path = write(tmp_path, text)
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:{line_of(text, 'filterz')}:")
    assert "unknown section type 'filterz'; did you mean 'filters'?" in msg


def test_section_without_type(tmp_path: Path) -> None:
    text = MINIMAL.replace("  - type: filters\n    model: vgg", "  - model: vgg")
    (msg,) = problems(write(tmp_path, text))
    assert "a section needs `type:`" in msg and "class_ranking" in msg


def test_unknown_keras_app_name(tmp_path: Path) -> None:
    text = MINIMAL.replace("keras_app: VGG16", "keras_app: ResNet05")
    path = write(tmp_path, text)
    (msg,) = problems(path)
    assert msg == (f"{path}:{line_of(text, 'ResNet05')}:5: models.vgg.keras_app: 'ResNet05' is not a "
                   "keras.applications model; did you mean 'ResNet50'?")


def test_model_needs_exactly_one_source(tmp_path: Path) -> None:
    text = MINIMAL.replace("keras_app: VGG16", "keras_app: VGG16\n    path: m.keras")
    (msg,) = problems(write(tmp_path, text))
    assert "exactly one of `builtin`, `keras_app` or `path`" in msg and "keras_app, path" in msg


def test_unknown_recipe(tmp_path: Path) -> None:
    text = MINIMAL + "    recipe: keras-exampel\n"
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:{line_of(text, 'recipe:')}:5: sections[0].recipe: unknown recipe 'keras-exampel'; "
        "did you mean 'keras-example'?"
    ]


def test_unknown_recipe_parameter_points_at_the_parameter(tmp_path: Path) -> None:
    text = MINIMAL + "    params:\n      steps: 4\n      lrr: 3\n"
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:{line_of(text, 'lrr')}:7: sections[0].params.lrr: unknown recipe parameter 'lrr'; "
        "did you mean 'lr'?"
    ]


@pytest.mark.parametrize("selection", ["'zero'", "'1:2:3'", "-1", "[0, -2]", "'a:b'", "'0-8'"])
def test_bad_filter_selection(tmp_path: Path, selection: str) -> None:
    text = MINIMAL + f"    filters: {selection}\n"
    path = write(tmp_path, text)
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:{line_of(text, 'filters:')}:5: sections[0].filters: ")
    assert "filter" in msg


def test_empty_filter_range_is_an_error(tmp_path: Path) -> None:
    """`8:4` selects nothing: a section that silently shows no filter is never what the author meant."""
    (msg,) = problems(write(tmp_path, MINIMAL + "    filters: '8:4'\n"))
    assert "sections[0].filters" in msg and "empty" in msg


def test_missing_required_fields_are_named(tmp_path: Path) -> None:
    text = MINIMAL + "  - type: gradcam\n    model: vgg\n"
    path = write(tmp_path, text)
    found = problems(path)
    at = f"{path}:{line_of(text, 'type: gradcam')}:5"
    assert f"{at}: sections[1].dataset: required field is missing; add it" in found
    assert f"{at}: sections[1].layer: required field is missing; add it" in found
    assert len(found) == 2


def test_missing_top_level_fields(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "title: only a title\n"))
    for name in ("output", "models", "sections"):
        assert any(f": {name}: required field is missing" in p for p in found), (name, found)


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    text = MINIMAL.replace("output: out", "output: out: again")
    path = write(tmp_path, text)
    (msg,) = problems(path)
    assert re.match(rf"{re.escape(str(path))}:{line_of(text, 'out: again')}:\d+: invalid YAML: ", msg), msg


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    """YAML parsers keep the last of two equal keys; the spec's author would lose an edit silently."""
    text = MINIMAL + "    filters: all\n    filters: '0:4'\n"
    path = write(tmp_path, text)
    first = line_of(text, "filters: all")
    assert problems(path) == [
        f"{path}:{first + 1}:5: invalid YAML: duplicate key 'filters' (first at line {first}); keep one"
    ]


def test_spec_that_is_not_a_mapping(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, "- just\n- a list\n"))
    assert "must be a mapping" in msg


def test_missing_spec_file(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "cannot read" in msg


def test_several_schema_problems_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace("keras_app: VGG16", "keras_app: VGG61").replace(
        "    layers: [block1_conv1]\n", "    layers: [block1_conv1]\n    fliters: all\n"
    )
    text += "  - type: filterz\n    model: vgg\n"
    text += "  - type: filters\n    model: vgg\n    layers: [a]\n    filters: x\n"
    path = write(tmp_path, text)
    found = problems(path)
    lines = sorted(int(p.split(":")[1]) for p in found)
    assert lines == sorted([line_of(text, "VGG61"), line_of(text, "fliters"), line_of(text, "filterz"),
                            line_of(text, "filters: x")]), found


def test_several_reference_problems_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace("    model: vgg", "    model: vgq") + "    recipe: regularised\n" + (
        "  - type: class_ranking\n    model: vgg\n    layer: l\n    filters: 1\n    dataset: foto\n")
    found = problems(write(tmp_path, text))
    assert len(found) == 3
    assert "unknown model 'vgq'" in found[0]
    assert "unknown recipe 'regularised'; did you mean 'regularized'?" in found[1]
    assert "unknown dataset 'foto'" in found[2]


def test_schema_and_reference_problems_together_in_file_order(tmp_path: Path) -> None:
    """A typo must not hide a wrong reference until the next attempt."""
    text = MINIMAL.replace("    layers: [block1_conv1]\n", "    layers: [block1_conv1]\n    titel: x\n")
    text += "  - type: filters\n    model: vgq\n    layers: [a]\n    params: {steps: 2, stepz: 3}\n"
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:{line_of(text, 'titel')}:5: sections[0].titel: unknown key 'titel'; did you mean 'title'?",
        f"{path}:{line_of(text, 'vgq')}:5: sections[1].model: unknown model 'vgq'; did you mean 'vgg'?",
        f"{path}:{line_of(text, 'stepz')}:{col_of(text, 'stepz')}: sections[1].params.stepz: "
        "unknown recipe parameter 'stepz'; did you mean 'steps'?",
    ]


# -- filter selections -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("selection", "channels", "expected"),
    [
        ([3, 1, 7], 8, [3, 1, 7]),
        ("0:4", 8, [0, 1, 2, 3]),
        ("2:5", 8, [2, 3, 4]),
        ("5:", 8, [5, 6, 7]),
        (":3", 8, [0, 1, 2]),
        ("0:64", 8, list(range(8))),  # clipped to the layer
        ("all", 5, [0, 1, 2, 3, 4]),
        (6, 8, [6]),
        (" 1 : 3 ", 8, [1, 2]),
    ],
)
def test_expand_filters(selection: object, channels: int, expected: list[int]) -> None:
    assert expand_filters(selection, channels) == expected


@pytest.mark.parametrize("selection", ["all", "0:4", "3:", 5, [0, 2]])
def test_valid_selections_load(tmp_path: Path, selection: object) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + f"    filters: {json.dumps(selection)}\n"))
    assert spec.sections[0].filters == selection


# -- JSON Schema ---------------------------------------------------------------------------------------
def test_json_schema_is_json_with_every_section_type() -> None:
    schema = json.loads(json.dumps(json_schema()))
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["required"]) >= {"title", "output", "models", "sections"}
    items = schema["properties"]["sections"]["items"]
    assert items["discriminator"]["propertyName"] == "type"
    assert set(items["discriminator"]["mapping"]) == set(SECTION_TYPES)
    # SECTION_TYPES (used in messages) must match the union the validator actually accepts
    union = typing.get_args(typing.get_args(Section)[0])
    assert {typing.get_args(m.model_fields["type"].annotation)[0] for m in union} == set(SECTION_TYPES)
    defs = schema["$defs"]
    assert defs["FiltersSection"]["additionalProperties"] is False  # typos are errors in editors too


def test_schema_and_validate_never_import_tensorflow(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    code = (
        "import sys, io, contextlib\nfrom reportgen.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['validate', {str(path)!r}]) == 0\n    assert main(['schema']) == 0\n"
        "assert 'tensorflow' not in sys.modules, 'validate/schema imported TensorFlow'\n"
        # the section types' own modules declare the schema, so they were imported, without TensorFlow
        "assert all(f'reportgen.analyses.{t}' in sys.modules for t in ['filters', 'gradcam', 'occlusion'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_section_type_is_one_module_and_one_template() -> None:
    """The registry, the `sections` union and the messages' type list all come from the modules of
    reportgen.analyses that define ANALYSIS; each type's module owns its section model."""
    from reportgen.analyses import analyses

    found = analyses()
    assert sorted(found) == sorted(SECTION_TYPES) and len(found) >= 9
    templates = Path(__file__).resolve().parents[2] / "templates" / "sections"
    for name, analysis in found.items():
        assert analysis.type == name == typing.get_args(analysis.section.model_fields["type"].annotation)[0]
        assert analysis.section.__module__ == type(analysis).__module__ == f"reportgen.analyses.{name}"
        assert (templates / f"{name}.html.j2").is_file(), name
    assert {name for name, a in found.items() if a.section.needs_top} == {
        "predictions", "gradcam", "occlusion", "saliency", "class_model", "sanity"
    }


# -- layer names are checked against the real model -------------------------------------------------
def test_validate_models_flags_unknown_layer_with_location(tmp_path: Path, tiny_keras_model: Path,
                                                           cli_main) -> None:
    text = (
        "title: t\noutput: out\nmodels:\n  tiny:\n"
        f"    path: {tiny_keras_model}\n"
        "sections:\n  - type: filters\n    model: tiny\n    layers: [conv_a, conv_bb]\n"
    )
    path = write(tmp_path, text)
    code, out, err = cli_main("validate", path, "--models")
    assert code == 2 and out == ""  # a layer the spec names: a spec problem
    assert err == (
        f"{path}:{line_of(text, 'conv_bb')}:{col_of(text, 'conv_bb')}: model 'tiny' has no layer "
        "'conv_bb'; did you mean 'conv_b', 'conv_a'?\n"
    )
    good = write(tmp_path, text.replace("conv_bb", "conv_b"), "good.yaml")
    code, out, err = cli_main("validate", good, "--models")
    assert code == 0, err
    assert out == f"{good}: ok (1 sections, 1 models)\n"


def test_committed_json_schema_is_current() -> None:
    """Editors read reportgen-spec.schema.json (see the specs' yaml-language-server line): regenerate it
    with `make schema` whenever the spec models change."""
    committed = json.loads((Path(__file__).resolve().parents[2] / "reportgen-spec.schema.json").read_text())
    assert committed == json.loads(json.dumps(json_schema()))
