"""Hostile inputs (issue 7): every one is a clean refusal or a clean skip, never lost data or a traceback.

Each row builds a real user project in tmp (spec, notes, a saved Keras model, a folder of real PNG and
JPEG photos), snapshots the whole tree byte for byte, runs the real CLI in a fresh process and asserts
  * the exit code (2: a problem in the spec or a file it names, 1: the environment, 143: SIGTERM),
  * exactly one line on stderr, starting `spec:line:col: field` where a spec field is the cause,
  * no "Traceback" anywhere in stdout or stderr,
  * every file and folder that existed before is still there, unchanged (new files, such as a report or
    a lock file, are allowed).
Bomb cases also assert the run's peak resident memory (measured in a wrapper process with
RUSAGE_CHILDREN) stays under 1 GiB. Rows that start TensorFlow (`run`, `validate --models`) are marked
slow; the rest use plain `validate`, which must catch them without loading a model.
"""

from __future__ import annotations

import csv
import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_cases import (
    GIB,
    Outcome,
    alias_bomb,
    changed_entries,
    cli,
    field_line,
    png_bomb,
    snapshot,
)

VALIDATE_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
ADDRESS_CAP = 4 * GIB  # second guard for validate-only rows (no TensorFlow): a bomb fails, the host lives
MAX_LINE = 500  # a 10 MB bad value or key must not be echoed whole


# -- the project -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once: a tiny CNN (16x16 RGB -> conv_a 3 ch -> conv_b 4 ch -> 2 classes) saved as .keras, the
    same with a Lambda layer (safe mode refuses it), real photos as PNG / JPEG / TIFF, a PNG bomb."""
    import keras
    import numpy as np
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("hostile-assets")
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = keras.layers.Conv2D(3, 3, activation="relu", name="conv_a")(x)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head")(x), name="tiny").save(
        root / "tiny.keras"
    )
    y = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inp)
    y = keras.layers.Conv2D(3, 3, activation="relu", name="conv_a")(y)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head")(y)).save(root / "lambda.keras")

    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    small = {k: Image.fromarray(v).resize((40, 32), Image.BILINEAR) for k, v in photos.items()}
    small["astronaut"].save(root / "a.png")
    small["coffee"].save(root / "b.jpg", quality=90)
    small["chelsea"].save(root / "c.png")
    gray16 = (np.linspace(0, 65535, 24 * 24).reshape(24, 24)).astype(np.uint16)
    Image.fromarray(gray16).save(root / "deep16.tif")  # mode I;16
    small["chelsea"].save(root / "rgb8.tif")
    png_bomb(root / "bomb.png")
    return root


@dataclass
class Project:
    """tmp/proj holds the user's files; reportgen writes to tmp/out; HOME is tmp/home."""

    tmp: Path
    proj: Path
    assets: Path
    env: dict[str, str]

    @property
    def spec(self) -> Path:
        return self.proj / "spec.yaml"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def write_spec(self, content: str | bytes) -> None:
        if isinstance(content, bytes):
            self.spec.write_bytes(content)
        else:
            self.spec.write_text(content, encoding="utf-8")


@pytest.fixture
def project(tmp_path: Path, assets: Path) -> Project:
    proj = tmp_path / "proj"
    (proj / "models").mkdir(parents=True)
    shutil.copyfile(assets / "tiny.keras", proj / "models" / "tiny.keras")
    (proj / "data" / "photos").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "c.png"):
        shutil.copyfile(assets / name, proj / "data" / "photos" / name)
    (proj / "notes.md").write_text("# My notes\nNever delete me.\n", encoding="utf-8")
    (tmp_path / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    return Project(tmp_path, proj, assets, env)


TINY = "    path: models/tiny.keras\n"
VGG = "    keras_app: VGG16\n    weights: none\n"  # accepts any ascent size: `size` really applies


def make_spec(
    *,
    output: str = "../out/report",
    cache: str | None = None,
    model: str = TINY,
    layer: str = "conv_b",
    ranked_layer: str = "conv_a",
    dataset: str = "data/photos",
    filters: str = "all",
    recipe: str = "keras-example",
    params: str = "{steps: 2, size: 16, crop: 0}",
    limit: str = "50",
    top: str = "2",
    seed: str = "0",
    formats: str = "[html]",
    first_type: str = "filters",
) -> str:
    """A small valid spec: filter ascent on the tiny model, predictions and a class ranking on a folder
    of photos. Keyword arguments replace one value each (as text, so hostile YAML goes in verbatim)."""
    return (
        "title: Hostile inputs\n"
        f"output: {output}\n"
        + (f"cache: {cache}\n" if cache is not None else "")
        + f"formats: {formats}\n"
        f"seed: {seed}\n"
        "models:\n"
        "  tiny:\n"
        f"{model}"
        "datasets:\n"
        "  photos:\n"
        f"    path: {dataset}\n"
        "sections:\n"
        f"  - type: {first_type}\n"
        "    model: tiny\n"
        f"    layers: [{layer}]\n"
        f"    filters: {filters}\n"
        f"    recipe: {recipe}\n"
        f"    params: {params}\n"
        "  - type: predictions\n"
        "    model: tiny\n"
        "    dataset: photos\n"
        f"    limit: {limit}\n"
        "  - type: class_ranking\n"
        "    model: tiny\n"
        "    dataset: photos\n"
        f"    layer: {ranked_layer}\n"
        "    filters: all\n"
        f"    top: {top}\n"
    )


# -- shared assertions --------------------------------------------------------------------------------


def assert_no_traceback(res: Outcome) -> None:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]


def assert_one_line(
    res: Outcome,
    project: Project,
    spec_text: str | None,
    fields: tuple[str, ...] | None,
    located: bool,
    count: int = 1,
) -> None:
    """Exactly `count` stderr lines (one per problem; one unless a row has several bad values). Each
    names the spec, with `:line:col: field` where `fields` is given (the line must be the field's own
    line) or `:line:col:` where `located` is asked."""
    assert_no_traceback(res)
    lines = res.err_lines
    assert len(lines) == count, f"expected {count} line(s), got {len(lines)}:\n" + res.stderr[-3000:]
    spec = str(project.spec)
    for line in lines:
        assert len(line) < MAX_LINE, f"line of {len(line)} characters: {line[:300]}..."
        assert line.startswith(f"{spec}:"), line
        pos, _, tail = line[len(spec) + 1 :].partition(" ")
        if fields or located:
            parts = pos.split(":")
            assert len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit() and parts[2] == "", (
                f"no line:col in {line!r}"
            )
        if fields:
            named = [f for f in fields if tail.startswith(f) and tail[len(f) : len(f) + 1] in (":", ".", "[")]
            assert named, f"{line!r} does not name {' or '.join(fields)}"
            assert spec_text is not None
            assert int(parts[0]) == field_line(spec_text, named[0]), f"{line!r}: wrong line for {named[0]}"


# -- rows: refused by the spec (plain validate, or run where the issue says run) ------------------------


@dataclass(frozen=True)
class Refusal:
    """A spec (or raw spec bytes) that must be refused with exit `rc` and one line."""

    spec: str | bytes | Callable[[Project], str | bytes]
    fields: tuple[str, ...] | None = None  # the line is `spec:line:col: FIELD...`
    located: bool = False  # without fields: at least `spec:line:col:`
    command: tuple[str, ...] = ("validate",)
    rc: int = 2
    setup: Callable[[Project], None] | None = None
    rss: bool = False  # assert peak RSS < 1 GiB
    check: Callable[[Project, Outcome], None] | None = None
    lines: int = 1  # one line per problem: more only where the row has several bad values


def _nested_file(p: Project) -> None:
    (p.tmp / "stuff").mkdir()
    (p.tmp / "stuff" / "keep.txt").write_text("mine\n")


def _symlink_to_spec_folder(p: Project) -> None:
    (p.tmp / "link").symlink_to(p.proj, target_is_directory=True)


def _no_cache_results(p: Project, res: Outcome) -> None:
    """Refused before any compute: nothing in the result store, no report."""
    store = p.out / ".reportgen-cache"
    files = [q for q in store.rglob("*") if q.is_file()] if store.exists() else []
    assert not files, f"results were computed before the refusal: {files[:5]}"
    assert not (p.out / "report").exists()


def _no_pwned(p: Project, res: Outcome) -> None:
    assert not (p.tmp / "pwned").exists(), "a YAML python tag ran a command"


def _big_value(p: Project) -> str:
    return make_spec().replace("seed: 0", "seed: " + "9" * 10_000_000)


def _big_string_value(p: Project) -> str:
    return make_spec().replace("formats: [html]", 'precision: "' + "x" * 10_000_000 + '"\nformats: [html]')


def _big_key(p: Project) -> str:
    return make_spec() + "k" * 10_000_000 + ": 1\n"


def _oversize(p: Project) -> str:
    return make_spec() + ("# " + "padding " * 120 + "\n") * 17_000  # ~16 MiB of comments


def _deep(p: Project) -> str:
    return "title: deep\noutput: ../out/report\nsections: " + "[" * 10_000 + "]" * 10_000 + "\n"


def _binary(p: Project) -> bytes:
    return random.Random(7).randbytes(4096)


def _png_as_yaml(p: Project) -> bytes:
    return (p.assets / "a.png").read_bytes()


def _python_tag(p: Project) -> str:
    return make_spec().replace(
        "title: Hostile inputs", f'title: !!python/object/apply:os.system ["touch {p.tmp}/pwned"]'
    )


OUTPUT = ("output",)
CACHE = ("cache", "output")  # either field may be named: the two collide

REFUSALS = [
    # -- output: only ever replace a folder reportgen made (data loss on today's main) --
    pytest.param(Refusal(make_spec(output="."), OUTPUT, command=("run", "-q")), id="output-spec-folder-run",
                 marks=pytest.mark.slow),
    pytest.param(Refusal(make_spec(output="data/photos"), OUTPUT, command=("run", "-q")),
                 id="output-dataset-folder-run", marks=pytest.mark.slow),
    pytest.param(Refusal(make_spec(output="notes.md"), OUTPUT, command=("run", "-q")),
                 id="output-existing-file-run", marks=pytest.mark.slow),
    pytest.param(Refusal(make_spec(output="data/photos/report"), OUTPUT, command=("run", "-q")),
                 id="output-inside-dataset-run", marks=pytest.mark.slow),
    pytest.param(Refusal(make_spec(output="."), OUTPUT), id="output-spec-folder"),
    pytest.param(Refusal(make_spec(output="/"), OUTPUT), id="output-root"),
    pytest.param(Refusal(make_spec(output="''"), OUTPUT), id="output-empty-string"),
    pytest.param(Refusal(make_spec(output='"~"'), OUTPUT), id="output-home-folder"),
    pytest.param(Refusal(make_spec(output=".."), OUTPUT), id="output-spec-folder-ancestor"),
    pytest.param(Refusal(make_spec(output="../stuff"), OUTPUT, setup=_nested_file),
                 id="output-non-empty-foreign-folder"),
    pytest.param(Refusal(make_spec(output="models"), OUTPUT), id="output-contains-model-file"),
    pytest.param(Refusal(make_spec(output="data"), OUTPUT), id="output-contains-dataset"),
    pytest.param(Refusal(make_spec(output="../link"), OUTPUT, setup=_symlink_to_spec_folder),
                 id="output-symlink-to-spec-folder"),
    pytest.param(Refusal(make_spec(output="notes.md/report"), OUTPUT), id="output-parent-is-file"),
    pytest.param(Refusal(make_spec(output="../out/report", cache="../out/report/cache"), CACHE),
                 id="cache-inside-output"),
    pytest.param(Refusal(make_spec(output="../cache/report", cache="../cache"), CACHE),
                 id="output-inside-cache"),
    pytest.param(Refusal(make_spec(cache="notes.md"), ("cache",)), id="cache-is-a-file"),
    # -- YAML: bounded, decoded, one line --
    pytest.param(Refusal(alias_bomb(), rss=True), id="yaml-alias-bomb"),
    pytest.param(Refusal(_deep, rss=True), id="yaml-deep-nesting"),
    pytest.param(Refusal(_oversize, rss=True), id="yaml-oversize-spec"),
    pytest.param(Refusal(make_spec().replace("Hostile inputs", "Caf\u00e9").encode("latin-1")),
                 id="yaml-latin-1"),
    pytest.param(Refusal(make_spec().encode("utf-16")), id="yaml-utf-16"),
    pytest.param(Refusal(_binary), id="yaml-binary"),
    pytest.param(Refusal(make_spec().replace("Hostile inputs", "Hostile\x00inputs")), id="yaml-nul-byte"),
    pytest.param(Refusal(_png_as_yaml), id="yaml-png-renamed"),
    pytest.param(Refusal(""), id="yaml-empty-file"),
    pytest.param(Refusal("- title: a\n- output: b\n", located=True), id="yaml-top-level-list"),
    pytest.param(Refusal("just a sentence\n", located=True), id="yaml-top-level-scalar"),
    pytest.param(Refusal(make_spec() + "title: Again\n", located=True), id="yaml-duplicate-key"),
    pytest.param(Refusal(make_spec().replace("  tiny:\n    path", "  tiny:\n\tpath"), located=True),
                 id="yaml-tab-indentation"),
    pytest.param(Refusal(make_spec(output='"../out/report'), located=True), id="yaml-unterminated-quote"),
    pytest.param(Refusal(_python_tag, located=True, check=_no_pwned), id="yaml-python-tag"),
    # -- numbers and values: every parameter has its range --
    pytest.param(Refusal(make_spec(params="{steps: 0, size: 16, crop: 0}"), ("sections[0].params.steps",)),
                 id="steps-zero"),
    pytest.param(Refusal(make_spec(params="{steps: -3, size: 16, crop: 0}"), ("sections[0].params.steps",)),
                 id="steps-negative"),
    pytest.param(Refusal(make_spec(params="{steps: 2, lr: .nan, crop: 0}"), ("sections[0].params.lr",)),
                 id="lr-nan"),
    pytest.param(Refusal(make_spec(params="{steps: 2, lr: .inf, crop: 0}"), ("sections[0].params.lr",)),
                 id="lr-inf"),
    pytest.param(Refusal(make_spec(model=VGG, layer="block1_conv1", ranked_layer="block1_conv2",
                                   params="{steps: 2, size: -5, crop: 0}"), ("sections[0].params.size",)),
                 id="size-negative"),
    pytest.param(Refusal(make_spec(model=VGG, layer="block1_conv1", ranked_layer="block1_conv2",
                                   params="{steps: 2, size: 0, crop: 0}"), ("sections[0].params.size",)),
                 id="size-zero"),
    pytest.param(Refusal(make_spec(model=VGG, layer="block1_conv1", ranked_layer="block1_conv2",
                                   params="{steps: 2, size: 100000, crop: 0}"), ("sections[0].params.size",),
                         rss=True),
                 id="size-100000"),
    pytest.param(Refusal(make_spec(model=TINY + "    input_size: [-1, 10]\n"), ("models.tiny.input_size",)),
                 id="input-size-negative"),
    pytest.param(Refusal(make_spec(model=TINY + "    input_size: [0, 0]\n"), ("models.tiny.input_size",),
                         lines=2), id="input-size-zero"),  # two bad values: a line each
    pytest.param(Refusal(make_spec(seed="-1"), ("seed",)), id="seed-negative"),
    pytest.param(Refusal(_big_string_value), id="value-10mb-string"),
    pytest.param(Refusal(_big_value), id="value-10mb-number"),
    pytest.param(Refusal(_big_key), id="key-10mb"),
    pytest.param(Refusal(make_spec(filters='"5:2"'), ("sections[0].filters",)), id="filters-empty-range"),
    pytest.param(Refusal(make_spec(limit="0"), ("sections[1].limit",)), id="limit-zero"),
    pytest.param(Refusal(make_spec(top="-1"), ("sections[2].top",)), id="top-negative"),
    pytest.param(Refusal(make_spec(first_type="filterz"), ("sections[0]",)), id="unknown-section-type"),
    pytest.param(Refusal(make_spec(recipe="keras-exampel"), ("sections[0].recipe",)), id="unknown-recipe"),
    pytest.param(Refusal(make_spec(params="{stepz: 2, size: 16, crop: 0}"), ("sections[0].params.stepz",)),
                 id="unknown-param"),
    # explicit range past the layer's 3 channels: refused at the start of `run`, before any compute
    pytest.param(Refusal(make_spec(layer="conv_a", filters='"0:999"'), ("sections[0].filters",),
                         command=("run", "-q"), check=_no_cache_results),
                 id="filters-range-past-channels-run", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_with_one_line(case: Refusal, project: Project) -> None:
    """The spec is refused: exit code, one line (naming the field), no traceback, nothing lost."""
    if case.setup:
        case.setup(project)
    text = case.spec(project) if callable(case.spec) else case.spec
    project.write_spec(text)
    before = snapshot(project.tmp)
    tf_run = case.command[0] == "run"
    res = cli(
        *case.command, project.spec, cwd=project.proj, env=project.env,
        timeout=RUN_TIMEOUT_S if tf_run else VALIDATE_TIMEOUT_S,
        as_cap=0 if tf_run else ADDRESS_CAP,
    )
    assert res.rc == case.rc, f"exit {res.rc}, expected {case.rc}; stderr:\n{res.stderr[-3000:]}"
    spec_text = text if isinstance(text, str) else None
    assert_one_line(res, project, spec_text, case.fields, case.located, case.lines)
    assert changed_entries(before, snapshot(project.tmp)) == []
    if case.rss:
        assert res.maxrss < GIB, f"peak RSS {res.maxrss / GIB:.2f} GiB"
    if case.check:
        case.check(project, res)


# -- rows: files the spec names are checked at the start of run and by validate --models --------------


@dataclass(frozen=True)
class NamedFile:
    spec: str
    field: str
    setup: Callable[[Project], None] | None = None
    must_say: tuple[str, ...] = ()  # words the line must contain (the real cause)
    must_not_say: tuple[str, ...] = ()


def _truncated_keras(p: Project) -> None:
    whole = (p.assets / "tiny.keras").read_bytes()
    (p.proj / "models" / "half.keras").write_bytes(whole[: len(whole) // 2])


def _text_h5(p: Project) -> None:
    (p.proj / "models" / "model.h5").write_text("this is not an HDF5 file\n")


def _lambda_model(p: Project) -> None:
    shutil.copyfile(p.assets / "lambda.keras", p.proj / "models" / "lambda.keras")


def _empty_dataset(p: Project) -> None:
    (p.proj / "data" / "empty").mkdir()


def _dataset_without_images(p: Project) -> None:
    docs = p.proj / "data" / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "readme.txt").write_text("no pictures here\n")
    (docs / "sub" / "table.csv").write_text("a,b\n1,2\n")


MOBILENET = "    keras_app: MobileNetV2\n    weights: models/missing.weights.h5\n    input_size: [32, 32]\n"

NAMED_FILES = [
    pytest.param(NamedFile(make_spec(model="    path: models/missing.keras\n"), "models.tiny.path"),
                 id="model-file-missing"),
    pytest.param(NamedFile(make_spec(model=MOBILENET, layer="Conv1", ranked_layer="Conv1"),
                           "models.tiny.weights"), id="weights-file-missing"),
    pytest.param(NamedFile(make_spec(model="    path: models/half.keras\n"), "models.tiny.path",
                           _truncated_keras, must_not_say=("not found", "does not exist")),
                 id="model-keras-truncated"),
    pytest.param(NamedFile(make_spec(model="    path: models/model.h5\n"), "models.tiny.path", _text_h5),
                 id="model-text-file-named-h5"),
    pytest.param(NamedFile(make_spec(model="    path: models/lambda.keras\n", layer="conv_a"),
                           "models.tiny.path", _lambda_model, must_say=("Lambda", "safe")),
                 id="model-lambda-refused-by-safe-mode"),
    pytest.param(NamedFile(make_spec(dataset="data/nothere"), "datasets.photos.path"), id="dataset-missing"),
    pytest.param(NamedFile(make_spec(dataset="data/empty"), "datasets.photos.path", _empty_dataset),
                 id="dataset-empty-folder"),
    pytest.param(NamedFile(make_spec(dataset="data/docs"), "datasets.photos.path", _dataset_without_images),
                 id="dataset-without-images"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", NAMED_FILES)
def test_named_file_refused_before_compute(case: NamedFile, project: Project) -> None:
    """`validate --models` and `run` both exit 2 at the field's position; run computes nothing first."""
    if case.setup:
        case.setup(project)
    project.write_spec(case.spec)
    before = snapshot(project.tmp)
    for command in (("validate", "--models"), ("run", "-q")):
        res = cli(*command, project.spec, cwd=project.proj, env=project.env, timeout=RUN_TIMEOUT_S)
        assert res.rc == 2, f"{command[0]}: exit {res.rc}; stderr:\n{res.stderr[-3000:]}"
        assert_one_line(res, project, case.spec, (case.field,), True)
        line = res.err_lines[0]
        for word in case.must_say:
            assert word.lower() in line.lower(), f"{command[0]}: {line!r} does not say {word!r}"
        for word in case.must_not_say:
            assert word.lower() not in line.lower(), f"{command[0]}: {line!r} says {word!r}"
    _no_cache_results(project, res)
    assert changed_entries(before, snapshot(project.tmp)) == []


# -- rows: hostile dataset contents are skipped and listed (or decoded), the run succeeds ---------------


@dataclass(frozen=True)
class Contents:
    setup: Callable[[Path, Path], None]  # (dataset folder, assets)
    decoded: frozenset[str]  # image names the report shows (predictions.csv)
    skipped: frozenset[str] = frozenset()  # names the report lists as skipped
    shown: frozenset[str] = frozenset()  # other text the report must show literally
    rss: bool = False


def _add(name: str, maker: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def setup(folder: Path, assets: Path) -> None:
        maker(folder / name, assets)

    return setup


def _truncated_jpeg(path: Path, assets: Path) -> None:
    whole = (assets / "b.jpg").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def _class_folders(folder: Path, assets: Path) -> None:
    """Class names that matplotlib reads as mathtext: `a$b$c` parses (and must show literally),
    `x$^$y` is invalid TeX (its chart label raised ValueError)."""
    for name in ("a.png", "b.jpg", "c.png"):
        (folder / name).unlink()
    for cls, name in (("a$b$c", "a.png"), ("x$^$y", "b.jpg"), ("plain", "c.png")):
        (folder / cls).mkdir(exist_ok=True)
        shutil.copyfile(assets / name, folder / cls / name)


def _up_link(folder: Path, assets: Path) -> None:
    (folder / "up").symlink_to("..", target_is_directory=True)
    # the parent holds images of its own: a scan that follows `up` would list them
    shutil.copyfile(assets / "a.png", folder.parent / "outside.png")


def _up_link_and_linked_image(folder: Path, assets: Path) -> None:
    """`up -> ..` must not be followed; a symlinked image *file* is an image like any other."""
    _up_link(folder, assets)
    shutil.copyfile(assets / "c.png", folder.parent / "elsewhere.png")
    (folder / "linked.png").symlink_to(folder.parent / "elsewhere.png")


def _tiffs(folder: Path, assets: Path) -> None:
    for name in ("deep16.tif", "rgb8.tif"):
        shutil.copyfile(assets / name, folder / name)


FLAT = frozenset({"a.png", "b.jpg", "c.png"})

CONTENTS = [
    pytest.param(Contents(_add("broken.jpg", _truncated_jpeg), FLAT, frozenset({"broken.jpg"})),
                 id="corrupt-jpeg"),
    pytest.param(Contents(_add("zero.png", lambda p, a: p.write_bytes(b"")), FLAT, frozenset({"zero.png"})),
                 id="zero-byte-png"),
    pytest.param(Contents(_add("notes.jpg", lambda p, a: p.write_text("not a photo\n")), FLAT,
                          frozenset({"notes.jpg"})), id="text-file-named-jpg"),
    pytest.param(Contents(_add("bomb.png", lambda p, a: shutil.copyfile(a / "bomb.png", p)), FLAT,
                          frozenset({"bomb.png"}), rss=True), id="decompression-bomb-png"),
    pytest.param(Contents(_up_link_and_linked_image, FLAT | {"linked.png"}), id="symlink-up-to-parent"),
    pytest.param(Contents(_class_folders, frozenset({"a$b$c/a.png", "x$^$y/b.jpg", "plain/c.png"}),
                          shown=frozenset({"a$b$c", "x$^$y"})), id="class-folder-with-dollars"),
    pytest.param(Contents(_tiffs, FLAT | {"deep16.tif", "rgb8.tif"}), id="tiff-16-and-8-bit"),
]


def _csv_images(report: Path) -> set[str]:
    files = list(report.rglob("predictions.csv"))
    assert len(files) == 1, f"predictions.csv: {files}"
    with open(files[0], newline="", encoding="utf-8") as f:
        return {row["image"] for row in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CONTENTS)
def test_dataset_contents_skipped_or_decoded(case: Contents, project: Project) -> None:
    """The run succeeds; undecodable files are skipped and named in the report, decodable ones shown,
    and nothing outside the dataset folder is read as an image."""
    case.setup(project.proj / "data" / "photos", project.assets)
    project.write_spec(make_spec())
    before = snapshot(project.tmp)
    res = cli("run", "-q", project.spec, cwd=project.proj, env=project.env, timeout=RUN_TIMEOUT_S)
    assert res.rc == 0, f"exit {res.rc}; stderr:\n{res.stderr[-3000:]}"
    assert_no_traceback(res)
    report = project.out / "report"
    assert _csv_images(report) == set(case.decoded)
    html = (report / "report.html").read_text(encoding="utf-8")
    for name in case.skipped:
        assert name in html, f"{name} is not listed as skipped in the report"
    for text in case.shown:
        assert text in html, f"{text} is not shown in the report"
    if case.rss:
        assert res.maxrss < GIB, f"peak RSS {res.maxrss / GIB:.2f} GiB"
    assert changed_entries(before, snapshot(project.tmp)) == []


# -- positive control: a report folder reportgen made is replaced on the next run ----------------------


@pytest.mark.slow
def test_rerun_replaces_its_own_report(project: Project) -> None:
    """The refusals above must not refuse reportgen's own output: two runs into the same folder succeed,
    the second replaces the first's report and the user's files stay."""
    project.write_spec(make_spec())
    before = snapshot(project.tmp)
    for attempt in (1, 2):
        res = cli("run", "-q", project.spec, cwd=project.proj, env=project.env, timeout=RUN_TIMEOUT_S)
        assert res.rc == 0, f"run {attempt}: exit {res.rc}; stderr:\n{res.stderr[-3000:]}"
        assert_no_traceback(res)
        assert (project.out / "report" / "report.html").is_file()
    assert changed_entries(before, snapshot(project.tmp)) == []


# -- rows: the environment fails (exit 1, one line), or the run is stopped ----------------------------


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A fresh tmpfs at path (root with CAP_SYS_ADMIN only; the row is skipped elsewhere)."""
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                           capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command: cannot make a small or read-only file system here")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def _read_only_parent(p: Project) -> Iterator[str]:
    with tmpfs(p.tmp / "ro", "ro,size=1m"):
        yield "../ro/report"


@contextmanager
def _system_folder_parent(p: Project) -> Iterator[str]:
    yield "/sys/kernel/reportgen-hostile-test/report"  # EPERM even for root


@contextmanager
def _disk_full(p: Project) -> Iterator[str]:
    with tmpfs(p.tmp / "small", "size=1m") as disk:
        st = os.statvfs(disk)
        free = st.f_bavail * st.f_frsize
        with open(disk / "filler.bin", "wb") as f:  # a user's file on the full disk: it must survive
            f.write(b"\xab" * (free - 16 * 1024))
        yield "../small/report"


ENVIRONMENT = [
    pytest.param(_read_only_parent, id="output-parent-read-only"),
    pytest.param(_system_folder_parent, id="output-parent-sysfs-eperm"),
    pytest.param(_disk_full, id="disk-full"),
]


@pytest.mark.slow
@pytest.mark.parametrize("where", ENVIRONMENT)
def test_environment_failure_is_one_line(
    where: Callable[[Project], AbstractContextManager[str]], project: Project
) -> None:
    """Permissions and a full disk are the environment's fault: exit 1 (2 if validation already sees
    that the output cannot be written), one line, no traceback, nothing lost."""
    with where(project) as output:
        project.write_spec(make_spec(output=output))
        before = snapshot(project.tmp)
        res = cli("run", "-q", project.spec, cwd=project.proj, env=project.env, timeout=RUN_TIMEOUT_S)
        assert res.rc in (1, 2), f"exit {res.rc}; stderr:\n{res.stderr[-3000:]}"
        assert_no_traceback(res)
        assert len(res.err_lines) == 1, res.stderr[-3000:]
        assert len(res.err_lines[0]) < MAX_LINE
        assert changed_entries(before, snapshot(project.tmp)) == []


def _tensorflow_loaded(pid: int) -> bool:
    try:
        return "tensorflow" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, id="sigterm-during-run")])
def test_sigterm_during_run(signum: int, project: Project) -> None:
    """SIGTERM behaves like Ctrl-C: exit 143, one line, staging folder removed, lock released."""
    project.write_spec(make_spec(layer="conv_b", params="{steps: 5000, size: 16, crop: 0}"))
    before = snapshot(project.tmp)
    err_path = project.tmp / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reportgen", "run", "-q", str(project.spec)],
            cwd=project.proj, env=project.env, stdout=subprocess.PIPE, stderr=err,
        )
        try:
            # in the locked region (a staging folder exists) with TensorFlow loaded: work is under way
            for _ in range(1200):
                staging = list(project.out.glob(".report.staging-*")) if project.out.exists() else []
                if (staging and _tensorflow_loaded(proc.pid)) or proc.poll() is not None:
                    break
                time.sleep(0.1)
            assert proc.poll() is None, f"the run ended before the signal: exit {proc.returncode}"
            time.sleep(1.0)  # into model loading / the ascent
            assert proc.poll() is None, "the run finished before the signal: give it more work"
            proc.send_signal(signum)
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    res = Outcome(proc.returncode, stdout.decode("utf-8", "replace"),
                  err_path.read_text(encoding="utf-8", errors="replace"), 0)
    err_path.unlink()
    assert res.rc == 128 + signum, f"exit {res.rc}; stderr:\n{res.stderr[-3000:]}"
    assert_no_traceback(res)
    assert len(res.err_lines) == 1, res.stderr[-3000:]
    assert not list(project.out.glob(".report.staging-*")), "staging folder left behind"
    assert not (project.out / "report").exists()
    for lock in project.out.glob("*.lock"):
        with open(lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
    assert changed_entries(before, snapshot(project.tmp)) == []
