"""The unit atlas (`exemplars` with `atlas: true`) and `exemplar_ratio`, on a tiny classifier over tinted
class folders.

Oracles: `exemplar_ratio` must equal the visualisation's activation over the largest channel mean of the
unit over the dataset's images, computed here with the model itself; every unit's row holds its
visualisation, its exemplar crops and its top classes (per-class means computed here); the rows are cut
into page groups of the layout estimate's size, and in the real PDF each group sits on one page of its
own (an estimate that is too generous would push rows onto the next page); the atlas, the filters
section and the class ranking share one dataset pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from projects import tinted_class_folders, tiny_classifier
from pypdf import PdfReader

from reportgen.analyses import analysis_for
from reportgen.analyses.base import RunContext
from reportgen.datasets import DatasetRegistry, load_pixels
from reportgen.engine.scheduler import AscentScheduler
from reportgen.models import ModelRegistry
from reportgen.plan import device_budget, plan_dataset
from reportgen.progress import Progress
from reportgen.report.layout import atlas_layout
from reportgen.runner import run
from reportgen.spec.load import load_spec
from reportgen.store import Store

CLASSES = ("red", "green", "blue")
NAMES = sorted(CLASSES)  # class folders are labelled in sorted order
UNITS = 40  # channels of layer `wide`: more than one page of atlas rows
TOP, BOTTOM, SHOWN_CLASSES = 3, 1, 2
PARAMS = {"steps": 3, "crop": 0}  # a few steps: the pictures only have to exist


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    tinted_class_folders(root, CLASSES, per_class=3, seed=4, step=30)
    tiny_classifier(root / "tiny.keras", len(CLASSES), seed=5, convs=(("conv1", 6), ("wide", UNITS)))
    return root


def write_spec(root: Path, name: str, formats: list[str]) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "title": "atlas", "output": f"{name}/report", "cache": f"{name}-cache", "formats": formats,
        "models": {"tiny": {"path": "tiny.keras"}},
        "datasets": {"data": {"path": "data"}},
        "sections": [
            {"type": "filters", "model": "tiny", "layers": ["wide"], "filters": "0:4",
             "recipe": "keras-example", "params": PARAMS},
            {"type": "exemplars", "title": "Unit atlas", "model": "tiny", "dataset": "data", "layer": "wide",
             "filters": "all", "top": TOP, "bottom": BOTTOM, "recipe": "keras-example", "params": PARAMS,
             "atlas": True, "classes": SHOWN_CLASSES},
            {"type": "class_ranking", "model": "tiny", "dataset": "data", "layer": "wide", "filters": [0]},
        ],
    }))  # fmt: skip
    return path


def channel_stats(root: Path, spec_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, UNITS) spatial means and peaks of layer `wide` over the dataset's images, by the model itself,
    and the images' class labels."""
    spec = load_spec(spec_path)
    ds = DatasetRegistry(spec).get("data")
    pixels, _ = load_pixels(ds.items, (16, 16), 3)
    model = keras.models.load_model(root / "tiny.keras")
    maps = keras.Model(model.inputs[0], model.get_layer("wide").output)(pixels).numpy()
    return maps.mean(axis=(1, 2)), maps.max(axis=(1, 2)), np.asarray([it.label for it in ds.items])


def test_one_dataset_pass_serves_atlas_filters_and_class_ranking(project: Path, tmp_path: Path) -> None:
    spec_path = write_spec(project, "plan", ["html"])
    spec = load_spec(spec_path)
    store, models = Store(tmp_path / "store"), ModelRegistry(spec)
    ctx = RunContext(spec=spec, spec_path=spec_path, store=store, staging=tmp_path / "staging",
                     models=models, datasets=DatasetRegistry(spec), ascent=AscentScheduler(store, models),
                     progress=Progress(quiet=True))  # fmt: skip
    for i, section in enumerate(spec.sections):
        with ctx.work.section(f"s{i}"), ctx.ascent.section(f"s{i}"):
            analysis_for(section.type).prepare(section, ctx, i)
    passes = plan_dataset(ctx.work, ctx.store, ctx.models, ctx.datasets, device_budget())
    assert len(passes) == 1
    assert sorted(passes[0].pending) == [f"bottomk:{BOTTOM}:wide", "means:wide", f"topk:{TOP}:wide"]
    assert sorted(set(passes[0].sections)) == ["s0", "s1", "s2"]


def atlas_tables(html: str) -> list[list[str]]:
    """The atlas's page groups as they are in the HTML: per table, its rows' markup."""
    tables = re.findall(r'<table class="atlas[^"]*">(.*?)</table>', html, re.S)
    return [re.findall(r"<tr id=[^>]*>.*?</tr>", t, re.S) for t in tables]


def test_atlas_rows_pages_and_exemplar_ratio(project: Path) -> None:
    spec_path = write_spec(project, "run", ["html", "pdf"])
    summary = run(spec_path, quiet=True)
    manifest = json.loads((summary.output / "manifest.json").read_text())
    filters, atlas, _ = manifest["sections"]
    means, peaks, labels = channel_stats(project, spec_path)
    best = means.max(axis=0)

    # exemplar_ratio: the visualisation's activation over the best natural channel mean, in both sections
    for section, units in ((filters, range(4)), (atlas, range(UNITS))):
        visuals = {a["filter"]: a for a in section["artifacts"] if a["kind"] == "filter"}
        assert sorted(visuals) == list(units)
        for f, a in visuals.items():
            if best[f] <= 1e-6:  # never fires on the photos: no ratio
                assert a["exemplar_ratio"] is None, f
            else:
                assert a["exemplar_ratio"] == pytest.approx(a["activation"] / best[f], rel=1e-3), f
    live = [a for a in atlas["artifacts"] if a["kind"] == "filter" and not a["dead"]]
    below = sorted(a["filter"] for a in live if a["exemplar_ratio"] is not None and a["exemplar_ratio"] < 0.5)
    called = [x for x in atlas["findings"] if "falls far below" in x]
    assert bool(called) == bool(below)
    if below:  # the finding names the units (up to eight of them)
        named = [int(n) for n in re.findall(r"\d+", called[0].split(":", 1)[1].split(" and ")[0])]
        assert named == below[: len(named)]

    # one row per unit, in order: its visualisation, its top crops, its bottom crop, its top classes
    html = (summary.output / "report.html").read_text()
    tables = atlas_tables(html)
    rows = [r for t in tables for r in t]
    assert [int(re.search(r'-f(\d+)"', r).group(1)) for r in rows] == list(range(UNITS))
    per_class = np.stack([means[labels == k].mean(axis=0) for k in range(len(NAMES))])
    crops = {(a["filter"], a["polarity"]): [] for a in atlas["artifacts"] if a["kind"] == "exemplar"}
    for a in atlas["artifacts"]:
        if a["kind"] == "exemplar":
            crops[(a["filter"], a["polarity"])].append(a["path"])
    for f, row in enumerate(rows):
        images = re.findall(r'<img src="([^"]+)"', row)
        visual = next(a["path"] for a in atlas["artifacts"] if a["kind"] == "filter" and a["filter"] == f)
        assert images == [visual, *crops.get((f, "top"), []), *crops.get((f, "bottom"), [])], f
        firing = int((peaks[:, f] > 1e-4 * peaks.max()).sum())  # a peak below that is no response
        assert len(crops.get((f, "top"), [])) == min(TOP, firing), f
        shown = re.findall(r'<span class="class">(\w+) ', row)
        order = np.argsort(-per_class[:, f], kind="stable")[:SHOWN_CLASSES]
        assert shown == [NAMES[k] for k in order if per_class[k, f] > 0], f  # none for a silent unit

    # pagination: later groups hold the layout's rows per page, and each group is one page of the PDF
    rows_per_page = atlas_layout(0.0, "", 1 + TOP + BOTTOM, 1 + 1 + SHOWN_CLASSES).per_page
    assert len(tables) > 2 and 1 < rows_per_page < UNITS
    assert all(len(t) == rows_per_page for t in tables[1:-1]) and 0 < len(tables[-1]) <= rows_per_page
    pdf = PdfReader(summary.output / "report.pdf")
    starts = {o.title: pdf.get_destination_page_number(o) for o in pdf.outline if not isinstance(o, list)}
    begin = starts["Unit atlas"]
    end = min([p for p in starts.values() if p > begin] + [len(pdf.pages)])
    where: dict[int, set[int]] = {}
    for i in range(begin, end):  # the atlas's pages only ("#1" may be a rank elsewhere)
        text = pdf.pages[i].extract_text()
        for unit in re.findall(r"#(\d+)\b", text):
            where.setdefault(int(unit), set()).add(i)
    group_pages: list[Any] = []
    for t in tables:
        units = [int(re.search(r'-f(\d+)"', r).group(1)) for r in t]
        on = set().union(*(where[u] for u in units))
        assert len(on) == 1, (units, on)  # no row pushed onto the next page
        group_pages.append(on.pop())
    assert group_pages == list(range(group_pages[0], group_pages[0] + len(tables))), group_pages
