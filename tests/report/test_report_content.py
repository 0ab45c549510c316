"""What the report says matches what ran: dead-filter wording under `pre_relu`, the border-exclusion
fallback, the input size on the title page, and section times that include their ascent passes.

The model is hand-set: conv `early` filter 1 has a zero kernel and bias -10, so before its ReLU it
outputs -10 everywhere whatever the input (it can never turn positive); conv `small` has stride 8, so at
a 24-px ascent its maps are 3x3, too small to leave out the recipe's 2-px border. The model's input is
flexible (declared 32x32 in the spec) and the ascent runs at 24 px.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from reportgen.runner import ascent_shares, run

SPEC = """\
title: Content
output: out
formats: [html]
models:
  flex: {path: flex.keras, input_size: [32, 32]}
sections:
  - type: filters
    title: Pre-ReLU filters
    model: flex
    layers: [early, small]
    filters: all
    params: {size: 24, steps: 3, crop: 0, pre_relu: true}
  - type: filters
    title: Plain filters
    model: flex
    layers: [early]
    filters: all
    params: {size: 24, steps: 3, crop: 0}
"""


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("content")
    keras.utils.set_random_seed(3)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(2, 3, activation="relu", name="early")(inp)
    x = keras.layers.Conv2D(2, 3, strides=8, activation="relu", name="small")(x)
    model = keras.Model(inp, x)
    kernel, bias = model.get_layer("early").get_weights()
    kernel[..., 1], bias[1] = 0.0, -10.0
    model.get_layer("early").set_weights([kernel, bias])
    model.save(root / "flex.keras")
    (root / "spec.yaml").write_text(SPEC, encoding="utf-8")
    run(root / "spec.yaml", quiet=True)
    return (root / "out" / "report.html").read_text()


def section(html: str, title: str) -> str:
    return re.search(rf"<h1>{title}</h1>(.*?)</section>", html, re.S).group(1)


def test_pre_relu_filters_are_never_positive_not_dead(html: str) -> None:
    pre = section(html, "Pre-ReLU filters")
    assert "early: 1 of 2 filters never turn positive" in pre
    assert "output before the ReLU (the label) stays at or below 0" in pre
    assert "stays ~0" not in pre and " dead" not in pre
    plain = section(html, "Plain filters")
    assert "1 of 2 filters are dead (activation stays ~0)" in plain


def test_border_fallback_is_said(html: str) -> None:
    pre = section(html, "Pre-ReLU filters")
    notes = re.search(r'<ul class="notes">(.*?)</ul>', pre, re.S).group(1)
    assert "small: its maps are 3x3 at 24x24 px input, too small to leave out a 2-px border" in notes
    assert "early:" not in notes  # 22x22 maps keep the border out


def test_title_page_shows_the_input_size_that_ran(html: str) -> None:
    title_page = re.search(r'<table class="models">(.*?)</table>', html, re.S).group(1)
    assert "24&times;24&times;3" in title_page
    assert "32&times;32" not in title_page  # declared, but no section ran at it


def test_section_subtitle_includes_its_ascent_time(html: str) -> None:
    for title in ("Pre-ReLU filters", "Plain filters"):
        assert "gradient ascent" in section(html, title).split("</p>")[0]


def test_ascent_time_is_split_by_the_work_each_section_asked_for() -> None:
    recipe = SimpleNamespace(steps=10)
    passes = [
        SimpleNamespace(keys=["a", "b", "c"], cost=SimpleNamespace(flops=100), recipe=recipe),
        SimpleNamespace(keys=["d"], cost=SimpleNamespace(flops=300), recipe=SimpleNamespace(steps=20)),
    ]
    owners = {"s1": ["a", "b", "b"], "s2": ["b", "c", "d"], "s3": ["z"]}  # b shared; z already stored
    shares = ascent_shares(SimpleNamespace(passes=passes), owners, 90.0)
    # work: a 1000 + b/2 500 -> s1 1500; b/2 500 + c 1000 + d 6000 -> s2 7500; of 9000
    assert shares == pytest.approx({"s1": 15.0, "s2": 75.0})
    assert sum(shares.values()) == pytest.approx(90.0)
    assert ascent_shares(SimpleNamespace(passes=[]), owners, 5.0) == {}
    assert np.isfinite(list(shares.values())).all()


def test_readme_lists_every_bundled_image_and_the_real_crop_default() -> None:
    """A newcomer picks `images:` from the README: every name the builtin sets export must be there."""
    from reportgen.datasets import _faces, _sample_photos
    from reportgen.engine.recipes import Recipe

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| set | images |") :]
    table = table[: table.index("\n\n")]
    for name in [*_sample_photos(), *_faces()]:
        if not name.startswith("lfw_face_") or name in ("lfw_face_000", "lfw_face_090"):
            assert f"`{name}`" in table, name
    assert Recipe().size == 0 and Recipe().crop == 25  # what the sentence below describes
    assert "the default 25 is for\n180-px images" not in readme
    assert "default 224-px ascent" in readme


PLAN = [  # the demo's plan, as its run logged it
    "5 of 5 passes to run on CPU, 9.7 GiB for batches, precision float32: 0 of 80 results stored, 80 "
    "to compute, est. 31.55 TFLOP",
    "pass 1: ascent vgg (recipe size=112, crop=12, pre_relu=True): 16 filters over 1 layer "
    "(block1_conv2) at 112x112 px, 30 steps, batch 4 (4 chunks), est. 929.47 GFLOP, ~18.4 MiB a "
    "sample; 0 of 16 stored",
    "pass 2: ascent vgg (recipe size=112, crop=12, pre_relu=True): 16 filters over 1 layer "
    "(block3_conv1) at 112x112 px, 30 steps, batch 4 (4 chunks), est. 2.71 TFLOP, ~33.3 MiB a sample;"
    " 0 of 16 stored",
    "pass 3: ascent vgg (recipe size=112, crop=12, pre_relu=True): 16 filters over 1 layer "
    "(block5_conv1) at 112x112 px, 30 steps, batch 4 (4 chunks), est. 6.92 TFLOP, ~42.5 MiB a sample;"
    " 0 of 16 stored",
    "pass 4: ascent vgg (recipe size=112, crop=12): 16 filters over 1 layer (block4_conv3) at 112x112"
    " px, 30 steps, batch 4 (4 chunks), est. 6.70 TFLOP, ~41.9 MiB a sample; 0 of 16 stored",
    "pass 5: ascent vgg (recipe steps=64, size=112, crop=12, jitter=8, rotate=5.0, scale=0.05, "
    "blur_every=4, decay=0.0005, pre_relu=True): 16 filters over 1 layer (block4_conv3) at 112x112 "
    "px, 64 steps, batch 4 (4 chunks), est. 14.29 TFLOP, ~41.9 MiB a sample; 0 of 16 stored",
    "section s1-early-middle-and-deep-layers-classic-recipe: 0 of 48 ascent results stored",
    "section s2-block4-conv3-classic-vs-regularized-recipe: 0 of 32 ascent results stored",
]


def page_fill(page: object) -> float:
    """The share of the page's content height down to its lowest line, image or table row."""
    box = page._page_box  # type: ignore[attr-defined]
    root = next(c for c in box.children if getattr(c, "element_tag", None) == "html")
    bottom = box.content_box_y()
    for b in root.descendants():
        if type(b).__name__ in ("LineBox", "InlineReplacedBox", "BlockReplacedBox", "TableRowBox"):
            bottom = max(bottom, b.position_y + b.margin_height())
    return (bottom - box.content_box_y()) / box.height


def test_no_near_empty_page_and_the_plan_stays_on_the_metadata_page(tmp_path: Path) -> None:
    """The demo's layout: four face predictions under their findings used to leave the last one alone on
    a page, and the run metadata pushed the plan's last lines onto a page of their own."""
    from PIL import Image
    from weasyprint import HTML

    from reportgen.report.render import environment, template_dir

    Image.new("RGB", (256, 256), (120, 90, 60)).save(tmp_path / "face.png")
    predictions = {
        "model": "fer", "dataset": "faces", "k": 3, "classes": 7, "names_source": "class names of the model",
        "csv": "predictions.csv",
        "images": [
            {"thumb": "face.png", "file": f"face_{i}.png", "label": None,
             "preds": [{"rank": r, "name": f"class {r}", "p": 0.5 / r} for r in (1, 2, 3)]}
            for i in range(4)
        ],
    }
    section = {
        "id": "s1", "type": "predictions", "title": "An emotion classifier on faces", "model": "fer",
        "seconds": 1.0, "ascent_seconds": 0.0, "notes": [], "observations": "", "context": predictions,
        "findings": ["Most confident: astronaut_face.png is happy (99.9%).",
                     "Least confident: lfw_face_000.png is fear (35.2%); runner-up angry (30.5%)."],
    }
    meta = {
        "versions": {k: "1.2.3" for k in ("reportgen", "python", "tensorflow", "keras", "numpy", "weasyprint",
                                          "pydantic", "jinja2")},
        "spec_sha256": "0" * 64, "finished_human": "", "spec_name": "demo.yaml", "seed": 0,
        "spec_path": "/home/user/project/specs/demo.yaml", "precision": "float32",
        "device": "CPU: Intel(R) Xeon(R) Platinum 8480+, 2 cores", "started": "", "finished": "",
        "computed": 84, "reused": 0, "plan": PLAN, "passes": [],
        "steps": [{"name": f"step {i}", "seconds": 1.0, "computed": 1, "reused": 0} for i in range(8)],
    }
    models = [{"key": k, "description": "a model", "input_size": (224, 224), "sizes": [(112, 112)],
               "channels": 3, "digest": "0" * 64} for k in ("vgg", "fer")]
    html = environment().get_template("base.html.j2").render(
        title="T", author=None, introduction="", sections=[section, {**section, "id": "s2"}], meta=meta,
        models=models,
    )
    (tmp_path / "report.html").write_text(html, encoding="utf-8")
    (tmp_path / "report.css").write_bytes((template_dir() / "report.css").read_bytes())
    pages = HTML(filename=str(tmp_path / "report.html"), base_url=str(tmp_path)).render().pages
    fills = [page_fill(p) for p in pages[2:-1]]  # after the title and contents pages, before the last
    assert min(fills) >= 0.3, [round(f, 2) for f in fills]
    metadata_page = next(i for i, p in enumerate(pages)
                         if any(getattr(b, "element_tag", None) == "h1"
                                and "Run metadata" in "".join(b.element.itertext())
                                for b in p._page_box.descendants()))
    assert metadata_page == len(pages) - 1, "the plan spilled onto a page of its own"
