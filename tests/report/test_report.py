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
    # the metadata page's plan: one row per pass, linking the sections it served by number
    html = (out / "report.html").read_text(encoding="utf-8")
    start = html.index('<table class="plan">')
    plan = html[start : html.index("</table>", start)]
    assert plan.count("<tr>") == 1 + len(summary.passes) and summary.passes
    served = {sid for p in summary.passes for sid in p["sections"]}
    assert served and all(f'<a href="#{sid}">{sid[1:].split("-")[0]}</a>' in plan for sid in served)
    for p in summary.passes:  # the items and stored counts of each pass, as numbers
        assert f'<td class="num">{p["items"]}</td><td class="num">{p["cached"]}</td>' in plan


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
    assert code == 2 and stdout == ""  # a layer the spec names: a spec problem
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "conv_bb" in ln)
    assert re.fullmatch(
        rf"{re.escape(str(bad))}:{line}:\d+: model 'tiny' has no layer 'conv_bb'; "
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


# -- page layout: real templates and report.css laid out by WeasyPrint ---------------------------------

PNG_SIDES = {"square": (64, 64), "heat": (96, 96), "wide": (160, 120)}


def pngs(folder: Path) -> dict[str, str]:
    """Small real PNG files the synthetic contexts point at (WeasyPrint fails on a missing image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    names = {}
    for key, (w, h) in PNG_SIDES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{key}.png")
        names[key] = f"{key}.png"
    return names


def laid_out(body: str, folder: Path) -> list[Any]:
    """WeasyPrint pages of `body` in the report's stylesheet, as the report's PDF would lay it out."""
    from weasyprint import HTML

    from reportgen.report.render import template_dir

    shutil.copyfile(template_dir() / "report.css", folder / "report.css")
    head = '<!DOCTYPE html><html><head><link rel="stylesheet" href="report.css"></head>'
    page = f"{head}<body>{body}</body></html>"
    (folder / "page.html").write_text(page, encoding="utf-8")
    return HTML(filename=str(folder / "page.html")).render().pages


def pages_of(pages: list[Any], match: Any) -> list[set[int]]:
    """For each element that `match(element)` accepts, in document order: the pages it has boxes on."""
    found: dict[int, tuple[int, set[int]]] = {}
    for number, page in enumerate(pages):
        for box in page._page_box.descendants():
            element = getattr(box, "element", None)
            if element is not None and match(element):
                found.setdefault(id(element), (len(found), set()))[1].add(number)
    return [found_pages for _, found_pages in sorted(found.values(), key=lambda item: item[0])]


def has_class(name: str) -> Any:
    return lambda element: name in (element.get("class") or "").split()


def partial(section_type: str, context: dict[str, Any], sid: str = "s1") -> str:
    from reportgen.report.render import environment

    return environment().get_template(f"sections/{section_type}.html.j2").render(c=context, sid=sid)


def filler(mm: float) -> str:
    """Something `mm` tall before the part under test, to move it over the page."""
    return f'<div style="height: {mm}mm; background: #eee"></div>'


def test_circuit_rows_never_split_across_pages(tmp_path: Path) -> None:
    img = pngs(tmp_path)
    rows = [
        {"rank": r, "channel": 100 + r, "norm": 0.3 / r, "sum": (-1) ** r * 0.1, "sign": "+",
         "effect": "excites", "share": 0.01, "heatmap": img["heat"],
         "vis": {"path": img["square"], "activation": 12.5, "dead": r % 3 == 0}}
        for r in range(1, 31)
    ]
    context = {
        "filter": 31, "layer": "block3_conv1", "kernel": [3, 3], "inputs": 128, "bias": 0.1, "rows": rows,
        "chart": img["wide"], "csv": "inputs.csv", "limit": 0.3, "prev": "block2_conv2", "visualize": True,
        "own": None, "recipe": "keras-example", "recipe_description": "d", "params": {}, "size": [112, 112],
        "dead_label": "dead",
    }
    for lead in (0, 7, 15):  # shift the row boundaries against the page boundaries
        pages = laid_out(filler(lead) + partial("circuit", context), tmp_path)
        assert len(pages) >= 3
        rows_pages = pages_of(pages, lambda e: e.tag == "tr" and e.find("td") is not None)  # not thead's
        assert len(rows_pages) == 30
        assert all(len(p) == 1 for p in rows_pages), (lead, rows_pages)


def occlusion_context(img: dict[str, str], images: int) -> dict[str, Any]:
    mask = {"mask": "eyes", "fill": "gray", "occluded": img["square"], "gradcam": img["square"], "after": 0.5,
            "empty": False, "box": [1, 2, 3, 4], "class": "happy", "before": 0.9, "change": -0.4,
            "new_top": False, "top_after": "happy", "top_after_probability": 0.5}
    return {
        "explains": "each image's top prediction", "layer": "add_4", "sliding": None, "csv": None,
        "total_rows": 0,
        "images": [
            {"name": f"face_{i}.png", "cls": "happy", "probability": 0.9, "original": img["square"],
             "gradcam": img["square"], "empty": False, "masks": [mask, {**mask, "mask": "mouth"}],
             "sliding": {"src": img["square"], "max_drop": 0.6}}
            for i in range(images)
        ],
    }


def test_occlusion_heading_stays_with_its_caption_and_first_figures(tmp_path: Path) -> None:
    context = occlusion_context(pngs(tmp_path), 3)
    for lead in range(150, 250, 12):  # slide the image headings over the foot of the first page
        pages = laid_out(filler(lead) + partial("occlusion", context), tmp_path)
        headings = pages_of(pages, lambda e: e.tag == "h2")
        captions = pages_of(pages, lambda e: e.tag == "p" and "on the original" in "".join(e.itertext()))
        first_figures = pages_of(pages, lambda e: e.tag == "figure")[::7]  # 7 figures per image
        assert len(headings) == len(captions) == len(first_figures) == 3
        assert all(len(h) == 1 for h in headings)
        assert headings == captions == first_figures, lead


def report_page(introduction: str, plan_lines: int, folder: Path) -> list[Any]:
    """The whole base template (title page, contents, run metadata) with no sections."""
    from reportgen.report.render import environment

    meta = {
        "versions": {"reportgen": "0", "python": "3", "tensorflow": "2", "keras": "3"},
        "spec_sha256": "ab" * 32, "finished_human": "now", "spec_name": "t.yaml", "seed": 0,
        "spec_path": "t.yaml", "precision": "float32",
        "device": "CPU", "started": "then", "finished": "now", "computed": 1, "reused": 2,
        "steps": [{"name": f"step {i}", "seconds": 1.0, "computed": 1, "reused": 0} for i in range(5)],
        "plan": [f"pass {i}: ascent of 64 filters, all results stored" for i in range(plan_lines)],
        "passes": [],  # the plan as sentences, as an unchanged rerun shows it
    }
    models = [{"key": "m", "description": "a model", "input_size": (32, 32), "sizes": [(32, 32)],
               "channels": 3, "digest": "0" * 64}]
    body = environment().get_template("base.html.j2").render(
        title="T", author=None, introduction=introduction, sections=[], meta=meta, models=models
    )
    return laid_out(body[body.index("<body>") + 6 : body.index("</body>")], folder)


def test_models_table_stays_with_its_heading_on_the_metadata_page(tmp_path: Path) -> None:
    """With 18-20 plan lines the Models heading and table used to fill a last page of their own."""
    for lines in range(0, 60, 2):  # the plan grows until the metadata spills onto a second page
        pages = report_page("", lines, tmp_path)
        metadata = pages_of(pages, lambda e: e.tag == "h1" and "".join(e.itertext()) == "Run metadata")
        heading = pages_of(pages, lambda e: e.tag == "h2" and "".join(e.itertext()) == "Models")
        table = pages_of(pages, lambda e: e.tag == "td" and "weights digest" in "".join(e.itertext()))
        assert len(heading) == len(table) == 1 and heading == table == metadata, (lines, heading, table)


def test_introduction_shares_the_contents_page(tmp_path: Path) -> None:
    pages = report_page("<p>A short introduction.</p>", 3, tmp_path)
    contents = pages_of(pages, has_class("toc"))
    intro = pages_of(pages, has_class("introduction"))
    assert contents == intro == [{1}]
    assert pages_of(pages, has_class("metadata")) == [{2}] and len(pages) == 3


def test_recipe_line_gives_the_parameters_that_ran(report: tuple[Path, RunSummary]) -> None:
    out, _ = report
    html = (out / "report.html").read_text(encoding="utf-8")
    line = re.search(r'<p class="recipe">Recipe <b>keras-example</b>:(.*?)</p>', html, re.S)
    assert line is not None
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", line.group(1)))
    # params {steps: 4, crop: 0} on a 32x32 model; the rest are the recipe's defaults
    for part in ("4 steps of learning rate 10,", "32&times;32 px input", "start gray &plusmn;0.125",
                 "border 2 px", "display std 0.15", "no crop", "regularizers: none."):
        assert part in text, (part, text)
    assert "30 steps" not in text and "25 px" not in text and "crop 25" not in text


LAYOUT_SPEC = """\
title: Layout
output: ../out/layout
seed: 0
models:
  tiny:
    path: ../models/tiny.keras
sections:
  - type: filters
    title: A tall grid after findings and observations
    model: tiny
    layers: [conv_b]
    filters: all
    columns: 1
    params: {steps: 2, crop: 0, jitter: 2, decay: 0.001}
    observations: |
      Six filters in one column: a grid too tall for the rest of this page, so it shrinks to stay here.
  - type: filters
    title: Two filters
    model: tiny
    layers: [conv_b]
    filters: "0:2"
    params: {steps: 2, crop: 0}
"""


@pytest.fixture(scope="module")
def layout_report(project: Path) -> tuple[Path, RunSummary]:
    (project / "specs" / "layout.yaml").write_text(LAYOUT_SPEC, encoding="utf-8")
    summary = run(project / "specs" / "layout.yaml", quiet=True)
    return project / "out" / "layout", summary


def test_tall_grid_shrinks_to_stay_with_its_findings(layout_report: tuple[Path, RunSummary]) -> None:
    out, _ = layout_report
    pdf = PdfReader(out / "report.pdf")
    outline = {item.title: pdf.get_destination_page_number(item) for item in flat_outline(pdf.outline)}
    first, second = outline["A tall grid after findings and observations"], outline["Two filters"]
    assert second == first + 1  # the whole section, grid included, on one page: no page of findings alone
    assert len(pdf.pages[first].images) >= 1 and "AUTOMATIC FINDINGS" in pdf.pages[first].extract_text()
    html = (out / "report.html").read_text(encoding="utf-8")
    cap = re.search(r'alt="filter grid of conv_b" style="max-height: ([\d.]+)pt"', html)
    assert cap is not None and 0.5 * 609 <= float(cap.group(1)) < 609  # shrunk, by at most half
    assert 'alt="filter grid of conv_b">' in html  # a grid that fits keeps its size (section 2)


def test_regularizers_in_recipe_line_and_median_ratio_only_from_three_live_filters(
    report: tuple[Path, RunSummary], layout_report: tuple[Path, RunSummary]
) -> None:
    out, _ = layout_report
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "regularizers: jitter up to 2 px, L2 decay 0.001 a step." in html
    findings = [s["findings"] for s in json.loads((out / "manifest.json").read_text())["sections"]]
    findings += [s["findings"] for s in json.loads((report[0] / "manifest.json").read_text())["sections"]]
    six, two, one_live, three = findings  # conv_b 6 live; conv_b 2 live; conv_a 1 of 4 live; conv_b 3 live
    assert any("dead" in f for f in one_live) and not any("dead" in f for f in six + two + three)
    for live, found in ((6, six), (2, two), (1, one_live), (3, three)):
        best = [f for f in found if "reaches the highest activation" in f]
        assert len(best) == 1, found
        assert ("x the median" in best[0]) == (live >= 3), (live, best)  # "1.0x the median" of one filter


@pytest.mark.parametrize("findings, paragraphs, items", [(0, 0, 0), (1, 1, 0), (6, 2, 3), (12, 1, 5)])
def test_filters_lead_height_estimate_matches_weasyprint(
    tmp_path: Path, findings: int, paragraphs: int, items: int
) -> None:
    """The page planner of `filters` predicts where the first layer starts; WeasyPrint is the oracle."""
    from reportgen.engine.recipes import RECIPES, resolve_recipe
    from reportgen.report.layout import PT_PER_MM, SLACK, lead_height
    from reportgen.report.markdown import render_markdown
    from reportgen.report.render import environment

    words = "the filter responds to oriented edges and small rings at several scales".split()
    finding_texts = [" ".join(words[: 3 + (5 * i) % 11] * (1 + i % 3)) + "." for i in range(findings)]
    markdown = "\n\n".join(" ".join(words * (2 + p)) for p in range(paragraphs))
    markdown += "\n\n" + "\n".join(f"- {' '.join(words[: 4 + 2 * i])}" for i in range(items)) if items else ""
    recipes = [
        {"name": n, "description": RECIPES[n].description, "params": resolve_recipe(n, {"crop": 4}).as_dict(),
         "size": (64, 64)}
        for n in ("keras-example", "regularized")
    ]
    title = "Filters of conv1, conv2 and conv3 (keras-example vs regularized)"
    section = {
        "id": "s1", "type": "filters", "title": title, "model": "m", "seconds": 1.0, "ascent_seconds": 0.0,
        "findings": finding_texts, "observations": render_markdown(markdown), "notes": [],
        "context": {"layers": [], "recipes": recipes, "overrides": {"crop": 4}, "model": "m",
                    "side_by_side": True},
    }
    body = environment().get_template("base.html.j2").render(
        title="T", author=None, introduction="", sections=[section], models=[],
        meta={"versions": {"reportgen": "0"}, "spec_sha256": "0" * 64, "finished_human": "", "spec_name": "",
              "seed": 0, "spec_path": "", "precision": "", "device": "", "started": "", "finished": "",
              "computed": 0, "reused": 0, "steps": [], "plan": [], "passes": []},
    )
    pages = laid_out(body[body.index("<body>") + 6 : body.index("</body>")], tmp_path)
    page = next(p for p in pages if any(getattr(b, "element_tag", None) == "h1"
                                        and b.element.get("id") is None
                                        and title in "".join(b.element.itertext())
                                        for b in p._page_box.descendants()))
    recipe_boxes = [b for b in page._page_box.descendants()  # the paragraphs' block boxes, not their lines
                    if type(b).__name__ == "BlockBox" and b.element_tag == "p"
                    and "recipe" in (b.element.get("class") or "")]
    assert len(recipe_boxes) == 3  # two recipes and the overrides
    last = recipe_boxes[-1]
    bottom_px = last.content_box_y() + last.height - page._page_box.content_box_y()
    measured = bottom_px * 0.75  # CSS px -> pt
    estimated = lead_height(title, finding_texts, section["observations"],
                            [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", "".join(b.element.itertext())))
                             for b in recipe_boxes[:2]], True)
    assert abs(estimated - measured) <= SLACK / 2, (estimated / PT_PER_MM, measured / PT_PER_MM)


def test_side_by_side_grids_stay_inside_the_page(tmp_path: Path) -> None:
    """Two 50 % cells with padding used to make the table 4 mm wider than the page's text area."""
    from PIL import Image

    Image.new("RGB", (900, 600), (90, 90, 90)).save(tmp_path / "grid.png")  # wider than a cell
    grids = [{"recipe": r, "dead": 0, "grid": "grid.png"} for r in ("keras-example", "regularized")]
    layer = {"name": "conv1", "count": 16, "channels": 16, "grids": grids, "max_height": None, "caption": "",
             "quality": ""}
    context = {"recipes": [], "overrides": {}, "layers": [layer], "side_by_side": True}
    pages = laid_out(partial("filters", context), tmp_path)
    page = pages[0]._page_box
    right = page.content_box_x() + page.width
    boxes = [b for b in page.descendants() if getattr(b, "element_tag", None) in ("img", "table", "td")]
    assert len([b for b in boxes if b.element_tag == "img"]) >= 2
    for box in boxes:
        assert box.position_x + box.margin_width() <= right + 0.01, box.element_tag
