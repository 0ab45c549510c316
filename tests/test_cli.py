"""The command line end to end: run, validate, schema, layers; exit codes and one-line errors."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest

SPEC = """\
title: CLI report
output: ../out/cli
models:
  tiny:
    path: ../models/tiny.keras
sections:
  - type: filters
    model: tiny
    layers: [conv_b]
    filters: [1, 4, 5]
    params: {steps: 3, crop: 0}
"""

# conv_a: 3x3 valid conv on 32x32 -> 30x30x4; conv_b: again -> 28x28x6 (the oracle for the layer table)
LAYERS = [
    ("image", "InputLayer", "(?, 32, 32, 3)", "3"),
    ("rescale", "Rescaling", "(?, 32, 32, 3)", "3"),
    ("conv_a", "Conv2D", "(?, 30, 30, 4)", "4"),
    ("conv_b", "Conv2D", "(?, 28, 28, 6)", "6"),
    ("gap", "GlobalAveragePooling2D", "(?, 6)", "6"),
    ("head", "Dense", "(?, 3)", "3"),
]


@pytest.fixture
def project(tmp_path: Path, tiny_keras_model: Path) -> Path:
    (tmp_path / "models").mkdir()
    shutil.copyfile(tiny_keras_model, tmp_path / "models" / "tiny.keras")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "cli.yaml").write_text(SPEC, encoding="utf-8")
    return tmp_path


def test_run_end_to_end(project: Path, run_cli, cli_main) -> None:
    spec = project / "specs" / "cli.yaml"
    code, out, _ = cli_main("run", spec, "--dry-run")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "plan:" and len(lines) > 1 and "tiny" in out  # work to do, for the spec's model
    assert "nothing to compute" not in out
    assert not (project / "out" / "cli").exists()  # a dry run publishes nothing

    proc = run_cli("run", spec)
    assert proc.returncode == 0, proc.stderr
    report = project / "out" / "cli"
    assert proc.stdout.startswith(f"report: {report / 'report.html'} and report.pdf (")
    assert "3 results computed, 0 reused" in proc.stdout
    assert "Traceback" not in proc.stderr
    for name in ("report.html", "report.pdf", "manifest.json"):
        assert (report / name).is_file()
    manifest = json.loads((report / "manifest.json").read_text())
    assert [a["filter"] for a in manifest["sections"][0]["artifacts"] if a["kind"] == "filter"] == [1, 4, 5]

    code, out, _ = cli_main("run", spec, "--dry-run")  # everything is in the store now
    assert code == 0
    assert out.splitlines()[0] == "plan: nothing to compute, every planned result is in the store"


def test_run_refuses_while_another_run_holds_the_output(project: Path, cli_main) -> None:
    spec = project / "specs" / "cli.yaml"
    lock = project / "out" / ".cli.lock"
    lock.parent.mkdir()
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        code, out, err = cli_main("run", spec)
    assert code == 3
    assert err.startswith("reportgen: another reportgen run is writing") and "pid 4242" in err
    assert err.count("\n") == 1
    assert not (project / "out" / "cli").exists()


def test_validate_exit_codes(project: Path, run_cli) -> None:
    spec = project / "specs" / "cli.yaml"
    proc = run_cli("validate", spec)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{spec}: ok (1 sections, 1 models)\n"

    bad = project / "specs" / "bad.yaml"
    bad.write_text(SPEC.replace("model: tiny", "model: tinny").replace("steps: 3", "stepz: 3"))
    proc = run_cli("validate", bad)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{bad}:8:5: sections[0].model: unknown model 'tinny'; did you mean 'tiny'?",
        f"{bad}:11:14: sections[0].params.stepz: unknown recipe parameter 'stepz'; did you mean 'steps'?",
    ]
    proc = run_cli("validate", project / "specs" / "missing.yaml")
    assert proc.returncode == 2 and "missing.yaml: cannot read the spec" in proc.stderr


def test_usage_errors_exit_2(run_cli) -> None:
    assert run_cli().returncode == 2
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_schema_prints_json(tmp_path: Path, run_cli, cli_main) -> None:
    proc = run_cli("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert schema["title"] == "reportgen spec" and "sections" in schema["properties"]
    target = tmp_path / "spec.schema.json"
    code, out, _ = cli_main("schema", "-o", target)
    assert code == 0 and out == ""
    assert json.loads(target.read_text()) == schema


def layer_rows(text: str) -> list[tuple[str, ...]]:
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("layer "))
    assert lines[header].split() == ["layer", "type", "output", "shape", "channels"]
    rows = []
    for ln in lines[header + 1 :]:
        name, kind, rest = ln.split(None, 2)
        shape, channels = rest.rsplit(")", 1)
        rows.append((name, kind, shape.strip() + ")", channels.strip()))
    return rows


def test_layers_of_a_keras_file(tiny_keras_model: Path, cli_main) -> None:
    code, out, err = cli_main("layers", tiny_keras_model)
    assert code == 0, err
    assert out.splitlines()[0] == f"{tiny_keras_model}: saved model tiny.keras; input (None, 32, 32, 3)"
    assert layer_rows(out) == LAYERS
    code, out, _ = cli_main("layers", tiny_keras_model, "--json")
    rows = json.loads(out)
    assert [(r["name"], r["type"], r["channels"]) for r in rows] == [(n, t, int(c)) for n, t, _, c in LAYERS]
    assert rows[3]["output_shape"] == [None, 28, 28, 6]
    assert rows[3]["params"] == 3 * 3 * 4 * 6 + 6


def test_layers_of_a_spec_model(project: Path, cli_main) -> None:
    spec = project / "specs" / "cli.yaml"
    code, out, err = cli_main("layers", spec, "tiny")
    assert code == 0, err
    assert out.splitlines()[0].startswith("tiny: saved model tiny.keras")
    assert layer_rows(out) == LAYERS
    code, out, err = cli_main("layers", spec, "tiyn")
    assert code == 1 and out == ""
    assert err == f"reportgen: {spec}: no model 'tiyn'; did you mean 'tiny'?\n"


def test_layers_of_an_unknown_reference(cli_main) -> None:
    code, _, err = cli_main("layers", "VGG61")
    assert code == 1
    assert err.startswith("reportgen: 'VGG61' is not a builtin model") and "'VGG16'" in err
    assert err.count("\n") == 1
