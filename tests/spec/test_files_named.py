"""Files a spec names (models, weights, class names, dataset folders) are checked at the start of `run`
and by `validate --models`, before any compute: each problem is one line at the `file:line:col` of the
field that names the file, exit 2, with the real cause; plain `validate` still needs no data."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SPEC = """\
title: files a spec names
output: out/report
models:
  net:
    path: models/tiny.keras
datasets:
  photos:
    path: data
sections:
  - type: predictions
    model: net
    dataset: photos
"""


def write_spec(root: Path, text: str) -> Path:
    spec = root / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    return spec


def line_of(spec: Path, needle: str) -> int:
    """1-based line of the spec that holds `needle`: where the error must point."""
    lines = spec.read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_intact(root: Path, before: dict[str, bytes]) -> None:
    after = snapshot(root)
    for name, data in before.items():
        assert after.get(name) == data, f"{name} changed or vanished"


def assert_one_line(err: str, spec: Path, needle: str, field: str, *words: str) -> str:
    """Exactly one line on stderr, at the spec's line of `needle`, naming the field and the cause."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"{spec}:{line_of(spec, needle)}:"), line
    assert f": {field}: " in line, line
    for word in words:
        assert word in line, line
    return line


@pytest.fixture
def project(tmp_path: Path, tiny_keras_model: Path) -> Path:
    (tmp_path / "models").mkdir()
    shutil.copyfile(tiny_keras_model, tmp_path / "models" / "tiny.keras")
    (tmp_path / "data").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "data" / "a.png")
    (tmp_path / "notes.txt").write_text("the user's own notes\n")
    return tmp_path


Cli = Callable[..., tuple[int, str, str]]


def test_missing_model_file(project: Path, cli_main: Cli) -> None:
    spec = write_spec(project, SPEC.replace("models/tiny.keras", "models/gone.keras"))
    before = snapshot(project)
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, "gone.keras", "models.net.path", "does not exist")
    code, _, err = cli_main("run", spec)
    assert code == 2
    assert_one_line(err, spec, "gone.keras", "models.net.path", "does not exist")
    assert_intact(project, before)
    assert not (project / "out" / "report").exists()


def test_truncated_keras_file_says_truncated_not_file_not_found(project: Path, cli_main: Cli) -> None:
    model = project / "models" / "tiny.keras"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    spec = write_spec(project, SPEC)
    before = snapshot(project)
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    line = assert_one_line(err, spec, "tiny.keras", "models.net.path", "truncated")
    assert "not found" not in line.lower()
    assert_intact(project, before)


def test_text_file_named_h5(project: Path, cli_main: Cli) -> None:
    (project / "models" / "net.h5").write_text("this is not a model\n")
    spec = write_spec(project, SPEC.replace("models/tiny.keras", "models/net.h5"))
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, "net.h5", "models.net.path", "text file", "not an HDF5")


def test_keras_file_that_is_hdf5_is_told_to_be_renamed(project: Path, cli_main: Cli) -> None:
    import keras

    keras.models.load_model(project / "models" / "tiny.keras").save(project / "models" / "h5.h5")
    (project / "models" / "h5.h5").rename(project / "models" / "wrong.keras")
    spec = write_spec(project, SPEC.replace("models/tiny.keras", "models/wrong.keras"))
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, "wrong.keras", "models.net.path", "HDF5", "rename it to .h5")


def test_missing_and_corrupt_weights_file(project: Path, cli_main: Cli) -> None:
    text = SPEC.replace(
        "    path: models/tiny.keras\n", "    keras_app: MobileNetV3Small\n    weights: w/m.weights.h5\n"
    )
    text = text.replace(
        "  - type: predictions\n    model: net\n    dataset: photos\n",
        "  - type: filters\n    model: net\n    layers: [conv]\n",
    )
    spec = write_spec(project, text)
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, "weights:", "models.net.weights", "does not exist")

    (project / "w").mkdir()
    (project / "w" / "m.weights.h5").write_text("<html>a download error page</html>\n")
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, "weights:", "models.net.weights", "text file", "not HDF5")


def test_missing_class_names_file(project: Path, cli_main: Cli) -> None:
    spec = write_spec(
        project,
        SPEC.replace(
            "    path: models/tiny.keras\n", "    path: models/tiny.keras\n    class_names: names.txt\n"
        ),
    )
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, "names.txt", "models.net.class_names", "No such file")


def test_lambda_layer_refused_by_safe_mode_says_how_to_proceed(project: Path, cli_main: Cli) -> None:
    import keras

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(2, 3, name="conv")(inp)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inp, out).save(project / "models" / "lambda.keras")
    spec = write_spec(project, SPEC.replace("models/tiny.keras", "models/lambda.keras"))
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(
        err, spec, "lambda.keras", "models.net.path", "Lambda", "safe mode refused", "safe_mode: false"
    )

    trusted = SPEC.replace(
        "    path: models/tiny.keras\n", "    path: models/lambda.keras\n    safe_mode: false\n"
    )
    spec = write_spec(project, trusted)
    code, out, err = cli_main("validate", spec, "--models")
    assert code == 0, err
    assert "ok" in out


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda data: shutil.rmtree(data), ("does not exist",)),
        (lambda data: [p.unlink() for p in data.iterdir()], ("no images",)),
        (lambda data: (data / "a.png").rename(data / "a.txt"), ("no images",)),
        (lambda data: (shutil.rmtree(data), data.write_text("a file")), ("is not a folder",)),
    ],
    ids=["missing", "empty", "no-images", "a-file"],
)
def test_dataset_folder_problems(
    project: Path, cli_main: Cli, make: Callable[[Path], object], words: tuple[str, ...]
) -> None:
    make(project / "data")
    spec = write_spec(project, SPEC)
    before = snapshot(project)
    code, out, err = cli_main("validate", spec)  # plain validate needs no data (README)
    assert code == 0, err
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, "path: data", "datasets.photos.path", *words)
    code, _, err = cli_main("run", spec)
    assert code == 2
    assert_one_line(err, spec, "path: data", "datasets.photos.path", *words)
    assert_intact(project, before)


def test_missing_dataset_is_found_before_any_compute(project: Path, cli_main: Cli) -> None:
    """An ascent section first, then a section on a missing folder: before, the ascent ran to the end
    and the run then failed (exit 1, an absolute path); now nothing is computed."""
    shutil.rmtree(project / "data")
    text = SPEC.replace(
        "sections:\n",
        "sections:\n  - type: filters\n    model: net\n    layers: [conv_a]\n"
        "    params: {steps: 2, crop: 0}\n",
    )
    spec = write_spec(project, text)
    code, _, err = cli_main("run", spec)
    assert code == 2
    assert_one_line(err, spec, "path: data", "datasets.photos.path", "does not exist")
    stored = [p for p in (project / "out").rglob("*") if p.is_file() and "results" in p.parts]
    assert stored == []


FILTERS = """\
title: filter ranges
output: out/report
models:
  net:
    path: models/tiny.keras
sections:
  - type: filters
    model: net
    layers: [conv_a]
{selection}    params: {{steps: 2, crop: 0}}
"""


def test_filter_range_past_the_layer_is_an_error_at_its_field(project: Path, cli_main: Cli) -> None:
    spec = write_spec(project, FILTERS.format(selection='    filters: "0:999"\n'))
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, '"0:999"', "sections[0].filters", "'0:999'", "4 filters", "'0:4'")
    code, _, err = cli_main("run", spec)
    assert code == 2
    assert_one_line(err, spec, '"0:999"', "sections[0].filters", "'0:999'")


def test_one_range_over_layers_of_different_widths_fits_each_and_is_an_error_only_if_it_fits_none(
    project: Path, cli_main: Cli
) -> None:
    """conv_a has 4 filters, conv_b 6: "0:6" is the first six of each (conv_a shows its 4, said in the
    log); "0:7" fits neither layer."""
    text = FILTERS.replace("layers: [conv_a]", "layers: [conv_a, conv_b]")
    spec = write_spec(project, text.format(selection='    filters: "0:6"\n'))
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 0, err
    assert "sections[0].filters: range '0:6' ends past the last filter: layer 'conv_a' has 4" in err
    spec = write_spec(project, text.format(selection='    filters: "0:7"\n'))
    code, _, err = cli_main("validate", spec, "--models")
    assert code == 2
    assert_one_line(err, spec, '"0:7"', "sections[0].filters", "'0:7'", "'conv_a' has 4 filters")


@pytest.mark.parametrize(
    "selection", ["", "    filters: all\n", '    filters: "0:4"\n', '    filters: "1:"\n']
)
def test_default_and_fitting_filter_selections_still_validate(
    project: Path, cli_main: Cli, selection: str
) -> None:
    spec = write_spec(project, FILTERS.format(selection=selection))  # "" : the default 0:64 on 4 filters
    code, out, err = cli_main("validate", spec, "--models")
    assert code == 0, err


def test_selection_problem_cases() -> None:
    from reportgen.spec.files import selection_problem

    assert selection_problem("all", 3, "c", "filters") is None
    assert selection_problem("0:3", 3, "c", "filters") is None
    assert selection_problem(":", 3, "c", "filters") is None
    assert "ends past" in selection_problem("0:999", 3, "c", "filters")
    assert "starts past" in selection_problem("5:", 3, "c", "filters")
    assert "filter 3 does not exist" in selection_problem([0, 3], 3, "c", "filters")
    assert "channel 7 does not exist" in selection_problem(7, 3, "c", "channels")
