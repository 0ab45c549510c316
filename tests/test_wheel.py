"""The built wheel, installed into a fresh virtual environment, renders a report without the source tree.

Why it is set up this way: the test must show that everything reportgen needs at run time (templates,
data files, every module) is inside the wheel, and it must stay fast and offline.
- The wheel is built from a copy of the project's files (pyproject.toml, README.md, reportgen/,
  templates/) without build isolation: no network, a few seconds, and no build/ or egg-info folder in
  the working tree that concurrent test runs would share.
- The fresh venv (`--without-pip`) gets only the wheel (`pip --python ... install --no-deps`). Its
  third-party dependencies (TensorFlow alone is ~600 MB) come from this test's environment through a
  .pth line naming that environment's site-packages. A folder added that way is searched after the
  venv's own site-packages, and the .pth files inside it are not run, so the editable install of the
  source tree (an import hook installed by a .pth file) cannot supply reportgen or its templates.
- The report is rendered from a working directory outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300

SPEC = """\
title: Wheel report
output: out/wheel
models:
  tiny:
    path: {model}
sections:
  - type: filters
    model: tiny
    layers: [conv_b]
    filters: [0, 1]
    params: {{steps: 3, crop: 0}}
"""


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("reportgen", "templates"):
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, src / name)
    dist = tmp_path / "dist"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-q", "-w", str(dist), str(src)])
    # the deprecated `license` table printed four setuptools warnings at every install
    assert "Warning" not in build.stdout + build.stderr, build.stderr
    (wheel,) = dist.glob("reportgen-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv holding only the wheel's reportgen; dependencies resolve to this environment's packages."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(own.strip(), "reportgen-test-deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "-q", str(wheel)])
    return venv


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_renders_a_report(tmp_path: Path, tiny_keras_model: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "reportgen").rglob("*.py")}
    shipped |= {p.relative_to(REPO).as_posix() for p in (REPO / "reportgen" / "data").glob("*.json")}
    shipped |= {
        "reportgen/" + p.relative_to(REPO).as_posix()
        for p in (REPO / "templates").rglob("*")
        if p.is_file() and p.suffix in (".j2", ".css", ".py")
    }
    assert shipped - names == set()  # every module, data file and template is in the wheel

    venv = _fresh_venv(tmp_path, wheel)
    work = tmp_path / "elsewhere"  # not the repository: nothing may come from the working directory
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run(
        [str(venv / "bin" / "python"), "-c",
         "import reportgen; from reportgen.report.render import template_dir; "
         "print(reportgen.__file__); print(template_dir())"],
        cwd=work, env=env,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's code and templates

    (work / "spec.yaml").write_text(SPEC.format(model=tiny_keras_model), encoding="utf-8")
    proc = _run([str(venv / "bin" / "reportgen"), "run", "spec.yaml"], cwd=work, env=env)
    assert "2 results computed" in proc.stdout
    report = work / "out" / "wheel"
    assert (report / "report.pdf").read_bytes().startswith(b"%PDF")
    html = (report / "report.html").read_text(encoding="utf-8")
    assert 'href="report.css"' in html and (report / "report.css").is_file()
