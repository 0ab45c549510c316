"""reportgen only ever replaces a folder it made (issue 7, data loss cases 1-4).

Each refused `output:` / `cache:` is set up among real files (spec, a model, a dataset folder with a real
PNG, the user's notes); `reportgen validate` and, for the key cases, `reportgen run` must answer exit 2
with one `file:line:col: field:` line, no traceback, and leave every file of the tree as it was (a run
refused before any compute leaves no lock file and no result store either).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from reportgen import __version__
from reportgen.errors import SpecError
from reportgen.publish import MARKER, publish

OUTPUT_LINE, CACHE_LINE = 2, 3  # where `spec()` writes the two fields


def spec(root: Path, output: str, cache: str | None = None) -> Path:
    """A valid spec in `root` (the project folder) with this output (and cache)."""
    path = root / "spec.yaml"
    path.write_text(
        f"title: Safety\noutput: {json.dumps(output)}\n"
        + (f"cache: {json.dumps(cache)}\n" if cache is not None else "")
        + "models:\n  tiny:\n    path: models/tiny.keras\n"
        + "datasets:\n  photos:\n    path: data\n"
        + "sections:\n  - type: filters\n    model: tiny\n    layers: [conv_b]\n    filters: [0, 1]\n"
        + "    params: {steps: 2, crop: 0}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def project(tmp_path: Path, tiny_keras_model: Path) -> Path:
    """tmp_path/project: models/tiny.keras, data/ with a real PNG, notes.txt; the spec is written per test."""
    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    shutil.copyfile(tiny_keras_model, root / "models" / "tiny.keras")
    (root / "data").mkdir()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(root / "data" / "photo.png")
    (root / "notes.txt").write_text("my notes, not a report\n", encoding="utf-8")
    return root


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` -> its content hash (files), link target (links) or "dir"."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_line(stderr: str, spec_path: Path, line: int, field: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert re.match(rf"{re.escape(str(spec_path))}:{line}:\d+: {field}: \S", lines[0]), lines[0]
    return lines[0]


def files(contents: dict[str, str]) -> Callable[[Path], None]:
    """A setup that writes these files (path in the project folder -> text)."""

    def setup(root: Path) -> None:
        for name, text in contents.items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    return setup


def legacy_plus_user_file(root: Path) -> None:
    legacy_report(root / "old")
    (root / "old" / "todo.txt").write_text("mine")


def dataset_link(root: Path) -> None:
    (root / "photos-link").symlink_to(root / "data")


# id -> (output, cache, setup of the project folder, the field refused, words its line must hold);
# `{root}` in a path is the project folder (an absolute path is not resolved before the check).
CASES: dict[str, tuple[str, str | None, Callable[[Path], None] | None, str, str]] = {
    "spec-folder": (".", None, None, "output", "the spec's own folder"),
    "empty": ("", None, None, "output", "is empty"),
    "dataset-folder": ("data", None, None, "output", "contains the folder of dataset 'photos'"),
    "inside-dataset": ("data/report", None, None, "output", "lies inside the folder of dataset 'photos'"),
    "existing-file": ("notes.txt", None, None, "output", "is an existing file"),
    "parent-is-file": ("notes.txt/report", None, None, "output", "is a file, not a folder"),
    "root": ("/", None, None, "output", "root folder"),
    "ancestor-of-spec": ("..", None, None, "output", "a folder above the spec"),
    "absolute-dot-dot": ("{root}/out/..", None, None, "output", "`..`"),
    "holds-model-file": ("models", None, None, "output", "contains the file of model 'tiny'"),
    "non-empty-unmarked": ("mine", None, files({"mine/thesis.tex": "x"}), "output", "did not write"),
    # manifest.json alone does not make a folder reportgen's
    "only-a-users-manifest": ("mine", None, files({"mine/manifest.json": "{}"}), "output", "did not write"),
    # looks like an old report, but holds a file reportgen never writes
    "legacy-report-plus-user-file": ("old", None, legacy_plus_user_file, "output", "did not write"),
    "symlink-into-dataset": ("{root}/photos-link/report", None, dataset_link, "output", "inside the folder"),
    "output-is-symlink": ("{root}/photos-link", None, dataset_link, "output", "symbolic link"),
    "cache-inside-output": ("out/report", "out/report/cache", None, "cache", "inside the output folder"),
    "cache-is-output": ("out/report", "out/report", None, "cache", "is the output folder"),
    "output-inside-cache": ("store/report", "store", None, "cache", "contains the output folder"),
    "cache-is-a-file": ("out/report", "notes.txt", None, "cache", "is an existing file"),
    "cache-under-a-file": ("out/report", "notes.txt/cache", None, "cache", "which is a file"),
    "default-cache-is-a-file": (
        "out/report", None, files({"out/.reportgen-cache": "x"}), "output", "default folder"
    ),
}


def legacy_report(folder: Path) -> None:
    """A report as reportgen published it before folders were marked: manifest, HTML, PDF, CSS, assets."""
    (folder / "assets" / "s1-filters").mkdir(parents=True)
    (folder / "assets" / "s1-filters" / "f0.png").write_bytes(b"\x89PNG old")
    manifest = {"title": "old", "sections": [], "versions": {"reportgen": "0.0.9", "python": "3.11"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for name in ("report.html", "report.pdf", "report.css"):
        (folder / name).write_text(f"old {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_validate_refuses_unsafe_output(case: str, project: Path, run_cli) -> None:
    output, cache, setup, field, words = CASES[case]
    if setup:
        setup(project)
    path = spec(project, output.format(root=project), cache)
    before = tree(project.parent)
    proc = run_cli("validate", path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = assert_one_line(proc.stderr, path, CACHE_LINE if field == "cache" else OUTPUT_LINE, field)
    assert words in line
    assert tree(project.parent) == before


def test_home_folder_is_refused(project: Path, tmp_path: Path, run_cli) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PS1='$ '\n")
    path = spec(project, "~")
    before = tree(tmp_path)
    proc = run_cli("validate", path, env={"HOME": str(home)})
    assert proc.returncode == 2
    assert "your home folder" in assert_one_line(proc.stderr, path, OUTPUT_LINE, "output")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["spec-folder", "dataset-folder", "existing-file"])
def test_run_refuses_before_any_compute(case: str, project: Path, run_cli) -> None:
    """No lock file, no result store, nothing swapped: the tree is exactly as before."""
    output, cache, _, field, words = CASES[case]
    path = spec(project, output, cache)
    before = tree(project.parent)
    proc = run_cli("run", path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert words in assert_one_line(proc.stderr, path, OUTPUT_LINE, field)
    assert proc.stdout == ""
    assert tree(project.parent) == before


def unwritable_folder() -> Path:
    """A folder no one may create entries in, not even root (the tests run as root in CI, where chmod
    does not stop anything): sysfs refuses mkdir with EPERM. Skips where that does not hold."""
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    probe = Path("/sys") / f"reportgen-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    pytest.skip("/sys accepts new folders here")


def test_unwritable_output_parent_is_one_line_exit_1(project: Path, run_cli) -> None:
    output = unwritable_folder() / "reportgen-out" / "report"
    path = spec(project, str(output))
    before = tree(project.parent)
    assert run_cli("validate", path).returncode == 0  # nothing wrong with the spec itself
    proc = run_cli("run", path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"reportgen: cannot create {output.parent}: ")
    assert f"make {output.parent.parent} writable" in lines[0] and "`output:`" in lines[0]
    assert tree(project.parent) == before


def test_unwritable_cache_is_one_line_exit_1(project: Path, run_cli) -> None:
    cache = unwritable_folder() / "reportgen-cache"
    path = spec(project, "out/report", str(cache))
    before = tree(project)
    proc = run_cli("run", path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"reportgen: cannot create the result store {cache}")
    assert "`cache:`" in lines[0]
    after = tree(project)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not (project / "out" / "report").exists()  # refused before any compute or staging


def test_marked_report_is_replaced_and_legacy_report_accepted(project: Path) -> None:
    from reportgen.runner import run

    path = spec(project, "out/report")
    report = project / "out" / "report"
    legacy_report(report)  # published by an older reportgen: accepted once, then marked
    run(path, quiet=True)
    assert json.loads((report / MARKER).read_text()) == {"reportgen": __version__}
    assert json.loads((report / "manifest.json").read_text())["title"] == "Safety"
    assert not (report / "report.css").read_text().startswith("old")
    first = (report / "report.html").stat().st_ino

    summary = run(path, quiet=True)  # a marked folder is reportgen's: replaced on the rerun
    assert summary.reused == 2 and summary.computed == 0
    assert (report / "report.html").stat().st_ino != first
    assert (report / MARKER).is_file()
    assert (project / "notes.txt").read_text() == "my notes, not a report\n"
    assert (project / "data" / "photo.png").is_file()


def test_publish_rechecks_the_output_right_before_the_swap(tmp_path: Path) -> None:
    """The output folder may change between validation and the end of the run: a folder that is not
    reportgen's by then is left alone, and the new report is not published."""
    staging, output = tmp_path / ".report.staging-1", tmp_path / "report"
    staging.mkdir()
    (staging / "report.html").write_text("new")
    output.mkdir()
    (output / "thesis.tex").write_text("the user's work")
    before = tree(tmp_path)
    with pytest.raises(SpecError) as err:
        publish(staging, output, where="spec.yaml:2:1")
    assert err.value.problems[0].startswith("spec.yaml:2:1: output: ")
    assert tree(tmp_path) == before

    (output / "thesis.tex").unlink()
    (output / MARKER).write_text("{}")  # the same folder, as reportgen left it
    publish(staging, output, where="spec.yaml:2:1")
    assert (output / "report.html").read_text() == "new"
    assert json.loads((output / MARKER).read_text()) == {"reportgen": __version__}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
