"""Hostile specs: bounded reading (size, nesting, alias bombs), text that is no YAML, every numeric range,
capped echoes of huge values, and a sample too large for the device; each is one located line, exit 2."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from spec_files import line_of, problems, write

from reportgen.spec.load import load_spec
from reportgen.spec.schema import json_schema

GIB = 1 << 30
CLI_TIMEOUT_S = 180

BASE = """\
title: t
output: out
models:
  m:
    builtin: vgg16-hed
sections:
  - type: filters
    model: m
    layers: [block1_conv1]
"""

# Runs `reportgen ARGS` as its only child and prints the child's exit code, stderr and peak resident
# memory: ru_maxrss of RUSAGE_CHILDREN after it exits. The address-space cap is only a safety net so that
# a regression fails fast instead of swapping the machine; the assertion is on the measured RSS.
_MEASURE = """
import json, resource, subprocess, sys
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
r = subprocess.run([sys.executable, "-m", "reportgen", *sys.argv[1:]], capture_output=True, text=True,
                   timeout=120, preexec_fn=cap)
print(json.dumps({"rc": r.returncode, "err": r.stderr,
                  "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measured_validate(path: Path) -> dict[str, object]:
    """`reportgen validate PATH` in a fresh process: exit code, stderr, peak RSS in bytes."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env={**os.environ, "PYTHONFAULTHANDLER": ""},
    )
    return json.loads(done.stdout)


def assert_one_line(result: dict[str, object]) -> str:
    err = str(result["err"])
    assert result["rc"] == 2, err[-2000:]
    assert "Traceback" not in err and err.count("\n") == 1, err[-2000:]
    return err.strip()


# -- bounded reading --------------------------------------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """ "Billion laughs": each anchor is a list of `width` aliases of the previous one (~1 KB, 9^9 values)."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return BASE + "\n".join(lines) + f"\nbomb: *a{levels - 1}\n"


def test_alias_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    path = write(tmp_path, alias_bomb())
    assert path.stat().st_size < 2048
    result = measured_validate(path)
    line = assert_one_line(result)
    assert line.startswith(f"{path}:") and "more than 50000 values" in line and "alias" in line
    assert int(result["maxrss"]) < GIB, f"peak RSS {int(result['maxrss']) / 2**20:.0f} MiB"


def test_a_huge_sparse_spec_is_refused_without_reading_it(tmp_path: Path) -> None:
    """10 GiB by its size, no disk used: refused from the file's size, so memory stays small."""
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.write(BASE.encode())
        f.truncate(10 * GIB)
    result = measured_validate(path)
    line = assert_one_line(result)
    assert line.startswith(f"{path}: the spec is over 2 MiB;"), line
    assert int(result["maxrss"]) < GIB


def test_a_spec_just_over_the_limit_is_refused_and_one_under_is_read(tmp_path: Path) -> None:
    observations = "x" * (2 * 2**20)
    (msg,) = problems(write(tmp_path, BASE + f"    observations: {observations}\n"))
    assert "the spec is over 2 MiB" in msg
    assert load_spec(write(tmp_path, BASE + f"    observations: {observations[: 2**20]}\n", "ok.yaml"))


@pytest.mark.parametrize(
    "body",
    [
        "deep: " + "[" * 5000 + "]" * 5000,  # PyYAML's composer recurses: RecursionError before the limit
        "".join("  " * i + "k:\n" for i in range(100)) + "  " * 100 + "k: 1",
    ],
    ids=["flow", "block"],
)
def test_deep_nesting_is_refused(tmp_path: Path, body: str) -> None:
    (msg,) = problems(write(tmp_path, BASE + body + "\n"))
    assert msg.startswith(f"{tmp_path / 'spec.yaml'}:") and "nested more than 64 levels deep" in msg, msg


def test_values_are_counted_but_a_few_aliases_still_work(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, BASE + "many: [" + "1, " * 60_000 + "1]\n"))
    assert "more than 50000 values" in msg
    text = BASE.replace("layers: [block1_conv1]", "layers: &l [block1_conv1]") + (
        "  - type: filters\n    model: m\n    layers: *l\n"
    )
    spec = load_spec(write(tmp_path, text, "aliases.yaml"))
    assert [s.layers for s in spec.sections] == [["block1_conv1"], ["block1_conv1"]]


# -- text that is not a YAML mapping ------------------------------------------------------------------------

LATIN1 = "title: café\n".encode("latin-1") + BASE.split("\n", 1)[1].encode()
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"


@pytest.mark.parametrize(
    "data, expected",
    [
        (LATIN1, ":1:11: the spec is not UTF-8 text (byte 0xe9); save it as UTF-8"),
        (PNG, ":1:1: the spec is not UTF-8 text (byte 0x89)"),
        (random.Random(7).randbytes(4096), ": the spec is not UTF-8 text"),
        (BASE.encode("utf-16"), ":1:1: the spec is UTF-16 text; save it as UTF-8"),
        (b"title: a\x00b\n", ":1:9: the spec contains the control character U+0000"),
        (b"\x00" * 64, ":1:1: the spec contains the control character U+0000"),
        (b"", ":1:1: the spec is empty; it must be a mapping"),
        (b"# only a comment\n", ":1:1: the spec is empty; it must be a mapping"),
        (b"- a\n- b\n", ":1:1: the spec is a list; it must be a mapping"),
        (b"hello\n", ":1:1: the spec is the single value 'hello'; it must be a mapping"),
        (b"title: 2020-13-45\n", ":1:8: cannot read '2020-13-45' as a YAML timestamp; quote it"),
        (b"title: !!int abc\n", ":1:8: cannot read 'abc' as a YAML int; quote it"),
        (b"seed: " + b"9" * 5000 + b"\n", ":1:7: cannot read '99999"),
        (b"? [a, b]\n: 1\n", ":1:3: a key must be a plain name or number"),
        (b"b: &b {x: 1}\nc:\n  <<: *b\n", ":3:3: merge keys (`<<`) are not supported"),
    ],
    ids=[
        "latin1",
        "png",
        "random",
        "utf16",
        "nul",
        "only-nul",
        "empty",
        "comments-only",
        "list",
        "scalar",
        "bad-date",
        "bad-int-tag",
        "5000-digits",
        "list-key",
        "merge-key",
    ],
)
def test_text_that_is_no_yaml_mapping_is_one_located_line(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(data)
    (msg,) = problems(path)
    assert msg.startswith(str(path)) and expected in msg, msg
    assert "\n" not in msg and len(msg) < 300


def test_a_binary_spec_through_the_cli_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "photo.yaml"
    path.write_bytes(PNG + random.Random(3).randbytes(2000))
    done = subprocess.run(
        [sys.executable, "-m", "reportgen", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr == f"{path}:1:1: the spec is not UTF-8 text (byte 0x89); save it as UTF-8 (a spec is a "
        "YAML text file, is this the right file?)\n"
    )


# -- numeric ranges -----------------------------------------------------------------------------------------

RECIPE_PARAMS = [
    # (parameter, refused value, what the line says, an accepted value at the edge)
    ("steps", "0", "must be from 1 to 10000 (got 0); the keras-example recipe uses 30", "1"),
    ("steps", "10001", "must be from 1 to 10000 (got 10001)", "10000"),
    ("steps", "2.5", "must be a whole number (got 2.5)", "64.0"),
    ("steps", "true", "must be a number (got True)", "2"),
    ("size", "-5", "must be from 8 to 2048 (got -5)", "8"),
    ("size", "0", "must be from 8 to 2048 (got 0)", "8"),
    ("size", "7", "must be from 8 to 2048 (got 7)", "8"),
    ("size", "100000", "must be from 8 to 2048 (got 100000)", "2048"),
    ("lr", ".nan", "must be a finite number (got nan); the keras-example recipe uses 10.0", "0.001"),
    ("lr", ".inf", "must be a finite number (got inf)", "1000"),
    ("lr", "0", "must be > 0 (got 0)", "1e-9"),
    ("crop", "-1", "must be from 0 to 1024 (got -1)", "0"),
    ("border", "-1", "must be from 0 to 1024 (got -1)", "0"),
    ("jitter", "-2", "must be from 0 to 1024 (got -2)", "0"),
    ("rotate", "-1.0", "must be from 0 to 180 (got -1.0)", "180"),
    ("scale", "1.0", "must be >= 0 and < 1 (got 1.0)", "0.99"),
    ("blur_every", "-1", "must be from 0 to 10000 (got -1)", "0"),
    ("blur_sigma", "0", "must be > 0 and <= 50 (got 0)", "50"),
    ("decay", "1", "must be >= 0 and < 1 (got 1)", "0"),
    ("tv", "-0.1", "must be >= 0 (got -0.1)", "0"),
    ("clip_weak", "100.5", "must be from 0 to 100 (got 100.5)", "100"),
    ("init_scale", "-1", "must be from 0 to 2 (got -1)", "2"),
    ("display_std", "0", "must be > 0 and <= 1 (got 0)", "1"),
    ("dead_threshold", ".nan", "must be a finite number (got nan)", "-5"),
    ("pre_relu", "1", "must be true or false (got 1)", "false"),
]


@pytest.mark.parametrize(
    "name, bad, message, good", RECIPE_PARAMS, ids=[f"{p[0]}={p[1]}" for p in RECIPE_PARAMS]
)
def test_recipe_parameter_ranges(tmp_path: Path, name: str, bad: str, message: str, good: str) -> None:
    text = BASE + f"    params: {{{name}: {bad}}}\n"
    path = write(tmp_path, text)
    col = text.splitlines()[-1].index(name) + 1
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:{line_of(text, 'params')}:{col}: sections[0].params.{name}: {message}"), (
        msg
    )
    assert "; the keras-example recipe uses " in msg
    assert load_spec(write(tmp_path, BASE + f"    params: {{{name}: {good}}}\n", "good.yaml"))


def test_every_bad_parameter_of_a_section_is_reported_at_once(tmp_path: Path) -> None:
    text = BASE.replace("type: filters", "type: filters\n    recipe: regularized") + (
        "    params: {steps: 0, lr: .nan, size: 100000}\n"
    )
    found = problems(write(tmp_path, text))
    assert [p.split(": ")[1] for p in found] == [
        "sections[0].params.steps",
        "sections[0].params.lr",
        "sections[0].params.size",
    ]
    assert "the regularized recipe uses 64" in found[0]


@pytest.mark.parametrize(
    "old, new, field, message",
    [
        (
            "builtin: vgg16-hed",
            "builtin: vgg16-hed\n    input_size: [-3, 32]",
            "models.m.input_size[0]",
            "greater than or equal to 8",
        ),
        (
            "builtin: vgg16-hed",
            "builtin: vgg16-hed\n    input_size: [32, 100000]",
            "models.m.input_size[1]",
            "less than or equal to 8192",
        ),
        ("output: out", "output: out\nseed: -1", "seed", "greater than or equal to 0"),
        (
            "builtin: vgg16-hed",
            "builtin: vgg16-hed\n    preprocess: {scale: .nan}",
            "models.m.preprocess.scale",
            "finite number",
        ),
        (
            "layers: [block1_conv1]",
            "layers: [block1_conv1]\n    columns: 100000",
            "sections[0].columns",
            "less than or equal to 256",
        ),
    ],
    ids=["input_size-negative", "input_size-huge", "seed-negative", "preprocess-nan", "columns-huge"],
)
def test_schema_ranges(tmp_path: Path, old: str, new: str, field: str, message: str) -> None:
    text = BASE.replace(old, new)
    found = problems(write(tmp_path, text))
    assert any(f": {field}: " in p and message in p for p in found), found


OCCLUSION = "type: occlusion\n    model: m\n    dataset: d\n    layer: x\n    "


@pytest.mark.parametrize(
    "section, field, message",
    [
        (
            "type: saliency\n    model: m\n    dataset: d\n    noise: .inf",
            "sections[0].noise",
            "finite number",
        ),
        (
            "type: saliency\n    model: m\n    dataset: d\n    samples: 100000",
            "sections[0].samples",
            "less than or equal to 256",
        ),
        (
            "type: gradcam\n    model: m\n    dataset: d\n    layer: x\n    target: -1",
            "sections[0].target",
            "greater than or equal to 0",
        ),
        (
            "type: class_model\n    model: m\n    classes: [-2]",
            "sections[0].classes[0]",
            "greater than or equal",
        ),
        (
            OCCLUSION + "masks: [{name: a, box: [10, 10, 5, 20]}]",
            "sections[0].masks[0].box",
            "is empty; [x0, y0, x1, y1] needs x1 > x0",
        ),
        (
            OCCLUSION + "masks: [{name: a, box: [-1, 0, 5, 5]}]",
            "sections[0].masks[0].box[0]",
            "greater than or equal to 0",
        ),
    ],
    ids=["noise-inf", "samples-huge", "target-negative", "class-negative", "box-empty", "box-negative"],
)
def test_section_ranges(tmp_path: Path, section: str, field: str, message: str) -> None:
    text = (
        "title: t\noutput: out\nmodels:\n  m: {builtin: vgg16-hed}\ndatasets:\n  d: {builtin: faces}\n"
        f"sections:\n  - {section}\n"
    )
    found = problems(write(tmp_path, text))
    assert any(f": {field}: " in p and message in p for p in found), found


def test_json_schema_shows_the_ranges() -> None:
    defs = json_schema()["$defs"]
    params = defs["FiltersSection"]["properties"]["params"]
    assert params["additionalProperties"] is False
    props = params["properties"]
    assert (props["steps"]["minimum"], props["steps"]["maximum"], props["steps"]["type"]) == (
        1,
        10000,
        "integer",
    )
    assert props["lr"]["exclusiveMinimum"] == 0
    assert props["size"]["minimum"] == 8 and props["size"]["maximum"] == 2048  # 0 is refused: leave it out
    assert props["scale"]["exclusiveMaximum"] == 1 and props["pre_relu"]["type"] == "boolean"
    assert defs["ClassModelSection"]["properties"]["params"]["properties"] == props
    side = defs["ModelSpec"]["properties"]["input_size"]["anyOf"][0]["prefixItems"][0]
    assert (side["minimum"], side["maximum"]) == (8, 8192)
    assert json_schema()["properties"]["seed"]["minimum"] == 0
    assert defs["SaliencySection"]["properties"]["samples"]["maximum"] == 256


# -- huge values are not echoed whole -----------------------------------------------------------------------

BIG = "x" * 1_500_000  # under the 2 MiB file limit


@pytest.mark.parametrize(
    "old, new",
    [
        ("layers: [block1_conv1]", f"layers: [block1_conv1]\n    columns: {BIG}"),
        ("layers: [block1_conv1]", f"layers: [block1_conv1]\n    filters: '{BIG}'"),
        ("builtin: vgg16-hed", f"keras_app: {BIG}"),
        ("model: m", f"model: {BIG}"),
        ("type: filters", f"type: filters\n    recipe: {BIG}"),
        ("type: filters", f"type: {BIG}"),
        ("layers: [block1_conv1]", f"layers: [block1_conv1]\n    ? {BIG}\n    : 1"),
        ("layers: [block1_conv1]", f"layers: [block1_conv1]\n    params: {{? {BIG} : 1}}"),
        ("  m:\n", f"  {'k' * 1000}:\n"),
    ],
    ids=[
        "int-field",
        "filters",
        "keras_app",
        "model-ref",
        "recipe",
        "section-type",
        "key",
        "param-key",
        "model-keys",
    ],
)
def test_a_huge_value_is_not_echoed_whole(tmp_path: Path, old: str, new: str) -> None:
    found = problems(write(tmp_path, BASE.replace(old, new, 1)))
    # the line may list the known names (40 keras.applications models); the value itself is cut
    assert found and all(len(p) < 1000 for p in found), [p[:1000] for p in found]
    assert any("characters)" in p for p in found), [p[:500] for p in found]


def test_a_10_mb_value_through_the_cli_is_one_short_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "    columns: " + "9" * 10_000_000 + "x\n")
    done = subprocess.run(
        [sys.executable, "-m", "reportgen", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and len(done.stderr) < 300, done.stderr[:500]


# -- one sample that cannot fit the device ------------------------------------------------------------------


@pytest.fixture(scope="module")
def amplifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A free-size model whose activations are 16x16 x 64/3 the input's: at 2048 px one sample of its conv
    needs ~800 GiB by the planner's estimate, more than any device, while the file holds 256 weights."""
    import keras

    inp = keras.Input((None, None, 3))
    x = keras.layers.UpSampling2D(16, name="up")(inp)
    x = keras.layers.Conv2D(64, 1, name="wide")(x)
    path = tmp_path_factory.mktemp("amp") / "amp.keras"
    keras.Model(inp, x).save(path)
    return path


def amp_spec(model: Path, params: str = "{size: 2048, steps: 2}", input_size: str = "[32, 32]") -> str:
    return (
        f"title: t\noutput: out\nmodels:\n  m: {{path: {model}, input_size: {input_size}}}\n"
        "sections:\n  - type: filters\n    model: m\n    layers: [wide]\n    filters: '0:2'\n"
        f"    params: {params}\n"
    )


def test_validate_models_refuses_a_sample_larger_than_the_device(
    tmp_path: Path, amplifier: Path, cli_main
) -> None:
    text = amp_spec(amplifier)
    path = write(tmp_path, text)
    code, out, err = cli_main("validate", path, "--models")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    where = f"{path}:{line_of(text, 'params')}:{text.splitlines()[-1].index('size') + 1}"
    assert err.startswith(f"{where}: sections[0].params.size: one sample needs "), err
    assert "(2048x2048 px, recipe keras-example), the device has " in err and err.endswith("; lower size\n")
    code, out, err = cli_main(
        "validate", write(tmp_path, amp_spec(amplifier, "{steps: 2}"), "ok.yaml"), "--models"
    )
    assert code == 0, err


def test_a_large_model_input_size_is_named_when_it_sets_the_size(
    tmp_path: Path, amplifier: Path, cli_main
) -> None:
    text = amp_spec(amplifier, "{steps: 2}", "[4096, 4096]")
    path = write(tmp_path, text)
    code, _, err = cli_main("validate", path, "--models")
    assert (
        code == 2 and ": models.m.input_size: one sample needs " in err and err.endswith("lower input_size\n")
    )
    assert err.startswith(f"{path}:{line_of(text, 'input_size')}:"), err


def test_run_refuses_a_sample_larger_than_the_device_before_any_compute(
    tmp_path: Path, amplifier: Path
) -> None:
    path = write(tmp_path, amp_spec(amplifier))
    done = subprocess.run(
        [sys.executable, "-m", "reportgen", "run", "-q", str(path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith(str(path))]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and "sections[0].params.size: one sample needs" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".reportgen-cache" / "results").exists() or not any(
        (tmp_path / ".reportgen-cache" / "results").rglob("*.json")
    )
