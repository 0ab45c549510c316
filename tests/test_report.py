"""A whole run on a tiny saved model: HTML, a real PDF (read back with pypdf), manifest, atomic publishing."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from reportgen.runner import RunSummary, run

SPEC = """\
title: Tiny report
author: Test Engineer
output: ../out/tiny
seed: 0
introduction: |
  An *introduction* in Markdown.
models:
  tiny:
    path: ../models/tiny.keras
sections:
  - type: filters
    title: First conv layer
    model: tiny
    layers: [conv_a]
    filters: all
    params: {steps: 4, crop: 0}
    observations: |
      Edges are **bold** here. <script>alert(1)</script>

      - one point
      - another point
  - type: filters
    title: Second conv layer
    model: tiny
    layers: [conv_b]
    filters: "0:3"
    params: {steps: 4, crop: 0}
"""
TITLES = ["First conv layer", "Second conv layer"]
FILTERS = {"conv_a": [0, 1, 2, 3], "conv_b": [0, 1, 2]}  # `all` of 4 channels; "0:3" of 6


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_keras_model: Path) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / "models").mkdir()
    shutil.copyfile(tiny_keras_model, root / "models" / "tiny.keras")
    (root / "specs").mkdir()
    (root / "specs" / "tiny.yaml").write_text(SPEC, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def report(project: Path) -> tuple[Path, RunSummary]:
    summary = run(project / "specs" / "tiny.yaml", quiet=True)
    return project / "out" / "tiny", summary


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flat_outline(items: list[Any]) -> list[Any]:
    out = []
    for item in items:
        out.extend(flat_outline(item) if isinstance(item, list) else [item])
    return out


def test_run_writes_html_pdf_and_manifest(report: tuple[Path, RunSummary]) -> None:
    out, summary = report
    assert summary.output == out
    for name in ("report.html", "report.pdf", "manifest.json", "report.css"):
        assert (out / name).is_file(), name
    assert summary.computed == sum(map(len, FILTERS.values())) and summary.reused == 0
    assert not list(out.parent.glob(".tiny.staging-*")) and not list(out.parent.glob(".tiny.old-*"))


def test_pdf_pages_outline_and_page_numbers(report: tuple[Path, RunSummary]) -> None:
    out, summary = report
    pdf = PdfReader(out / "report.pdf")
    n = len(pdf.pages)
    assert n == summary.pages
    assert n >= 5  # title page, contents, one page per section, run metadata
    texts = [page.extract_text() for page in pdf.pages]
    assert "Tiny report" in texts[0] and "Test Engineer" in texts[0]
    # the title page has no running footer; every other page is numbered "Page i of n"
    assert "Page 1 of" not in texts[0]
    for i in range(1, n):
        assert f"Page {i + 1} of {n}" in texts[i], (i, texts[i])
    outline = {item.title: pdf.get_destination_page_number(item) for item in flat_outline(pdf.outline)}
    for title in [*TITLES, "Run metadata", "Contents"]:
        assert title in outline, (title, list(outline))
        assert title in texts[outline[title]]  # each bookmark lands on the page that shows its title
    for layer in FILTERS:  # layer headings (h2) nest under their section
        assert layer in outline
    assert outline[TITLES[0]] < outline[TITLES[1]] < outline["Run metadata"]
    contents = texts[outline["Contents"]]
    for title in TITLES:  # the table of contents gives each section's page number
        assert re.search(rf"{title}[ .]*{outline[title] + 1}\b", contents), contents
    for title in TITLES:  # the filter grids are embedded images, not alt text
        assert len(pdf.pages[outline[title]].images) >= 1
        assert "filter grid of" not in texts[outline[title]]


def test_pdf_run_metadata_page(report: tuple[Path, RunSummary], project: Path) -> None:
    out, _ = report
    pdf = PdfReader(out / "report.pdf")
    meta_page = {item.title: pdf.get_destination_page_number(item) for item in flat_outline(pdf.outline)}
    text = pdf.pages[meta_page["Run metadata"]].extract_text()
    sha = hashlib.sha256((project / "specs" / "tiny.yaml").read_bytes()).hexdigest()
    assert sha in re.sub(r"\s+", "", text)
    for word in ("seed", "device", "tensorflow", "keras", "7 computed, 0 reused"):
        assert word in text, word


def test_html_escapes_author_markup_and_renders_markdown(report: tuple[Path, RunSummary]) -> None:
    out, _ = report
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<strong>bold</strong>" in html and "<li>one point</li>" in html
    assert "<em>introduction</em>" in html
    for title in TITLES:
        assert f"<h1>{title}</h1>" in html


def test_html_references_only_existing_relative_files(report: tuple[Path, RunSummary]) -> None:
    out, _ = report
    html = (out / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert len([s for s in srcs if s.endswith(".png")]) >= 2
    for src in srcs:
        assert not src.startswith(("/", "file:", "http")), src  # the folder can be moved or served as is
        assert (out / src).is_file(), src


def test_manifest_structure(report: tuple[Path, RunSummary], project: Path) -> None:
    out, _ = report
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"sections", "spec_sha256", "started", "finished", "versions"} <= set(manifest)
    spec_bytes = (project / "specs" / "tiny.yaml").read_bytes()
    assert manifest["spec_sha256"] == hashlib.sha256(spec_bytes).hexdigest()
    started, finished = (datetime.fromisoformat(manifest[k]) for k in ("started", "finished"))
    assert started <= finished
    assert {"reportgen", "tensorflow", "keras", "python"} <= set(manifest["versions"])
    assert [s["title"] for s in manifest["sections"]] == TITLES
    for section, layer in zip(manifest["sections"], FILTERS, strict=True):
        assert section["type"] == "filters"
        for artifact in section["artifacts"]:
            assert {"kind", "model", "layer", "filter", "path"} <= set(artifact)
            assert (out / artifact["path"]).is_file(), artifact["path"]
            assert artifact["model"] == "tiny" and artifact["layer"] == layer
        filters = [a for a in section["artifacts"] if a["kind"] == "filter"]
        assert [a["filter"] for a in filters] == FILTERS[layer]
        assert all(isinstance(a["activation"], float) and isinstance(a["dead"], bool) for a in filters)
        assert [a["kind"] for a in section["artifacts"]].count("grid") == 1


def test_failed_run_leaves_previous_output_untouched(report: tuple[Path, RunSummary], project: Path,
                                                      cli_main) -> None:
    out, _ = report
    before = snapshot(out)
    bad = project / "specs" / "bad.yaml"
    text = SPEC.replace("layers: [conv_b]", "layers: [conv_bb]")
    bad.write_text(text, encoding="utf-8")
    code, stdout, stderr = cli_main("run", bad)
    assert code == 1 and stdout == ""
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "conv_bb" in ln)
    assert re.fullmatch(
        rf"reportgen: {re.escape(str(bad))}:{line}:\d+: model 'tiny' has no layer 'conv_bb'; "
        r"did you mean 'conv_b'.*\n", stderr
    ), stderr  # one line: where, what, and the likely fix
    assert snapshot(out) == before
    assert not list(out.parent.glob(".tiny.staging-*"))


def test_rerun_reuses_every_result(report: tuple[Path, RunSummary], project: Path) -> None:
    out, _ = report
    pngs = {k: v for k, v in snapshot(out).items() if k.endswith(".png")}
    again = run(project / "specs" / "tiny.yaml", quiet=True)
    assert again.computed == 0 and again.reused == sum(map(len, FILTERS.values()))
    assert {k: v for k, v in snapshot(out).items() if k.endswith(".png")} == pngs  # same seed, same pixels
    assert json.loads((out / "manifest.json").read_text())["reused"] == again.reused
