"""class_ranking and the batched forward engine, on real photos, real files and tiny hand-built models.

Oracles: a 1x1 conv whose filter k responds to colour k (kernel row [1, -.5, -.5] rotated) over class
folders of red / green / blue tinted photos must rank its own colour first; the streamed, batched pass
must equal a naive one-image-at-a-time loop; corrupt files are skipped and named in the notes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from reportgen.analyses import analysis_for
from reportgen.analyses.base import RunContext, SectionOutput
from reportgen.analyses.class_ranking import ANALYSIS
from reportgen.datasets import DatasetRegistry, ImageItem, load_pixels
from reportgen.engine.forward import forward, program_for
from reportgen.errors import ReportgenError
from reportgen.execute import execute_dataset
from reportgen.models import PRESETS, LoadedModel, ModelRegistry
from reportgen.plan import device_budget, plan_dataset
from reportgen.progress import Progress
from reportgen.runner import run
from reportgen.spec.load import load_spec
from reportgen.store import Store

TINTS = {"red": (1.0, 0.3, 0.3), "green": (0.3, 1.0, 0.3), "blue": (0.3, 0.3, 1.0)}
SIDE = 32


def photos(side: int = SIDE) -> dict[str, np.ndarray]:
    from skimage import data

    return {n: np.asarray(Image.fromarray(getattr(data, n)()).resize((side, side), Image.BILINEAR))
            for n in ("astronaut", "chelsea", "coffee")}


def write_color_folders(root: Path, folder_names: dict[str, str] | None = None) -> Path:
    """One folder per tint with the three photos tinted; JPEG and PNG mixed, as real folders are."""
    folder_names = folder_names or {c: c for c in TINTS}
    for color, tint in TINTS.items():
        folder = root / folder_names[color]
        folder.mkdir(parents=True, exist_ok=True)
        for j, (name, img) in enumerate(photos().items()):
            tinted = np.clip(img * np.asarray(tint), 0, 255).astype(np.uint8)
            ext = "jpg" if j % 2 else "png"
            Image.fromarray(tinted).save(folder / f"{color}_{name}.{ext}", quality=95)
    return root


def color_model() -> keras.Model:
    """Filter k of layer `color` = relu(channel k - half the other two); a linear head reads them out."""
    inp = keras.Input((SIDE, SIDE, 3))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, activation="relu", name="color")
    x = conv(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    head = keras.layers.Dense(3, activation="softmax", name="probs")
    out = head(x)
    model = keras.Model(inp, out)
    kernel = np.full((3, 3), -0.5, np.float32)
    np.fill_diagonal(kernel, 1.0)
    conv.set_weights([kernel.reshape(1, 1, 3, 3)])
    head.set_weights([np.eye(3, dtype=np.float32) * 0.05, np.zeros(3, np.float32)])
    return model


@pytest.fixture(scope="module")
def colors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colors")
    write_color_folders(root / "colors")
    (root / "colors" / "red" / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    good = (root / "colors" / "red" / "red_chelsea.jpg").read_bytes()
    (root / "colors" / "red" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    color_model().save(root / "colors.keras")
    return root


def make_ctx(root: Path, sections: list[dict[str, Any]], tmp_path: Path,
             folder: str = "colors", model: Path | None = None, prepare: bool = True) -> RunContext:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "title": "t", "output": str(tmp_path / "out"), "formats": ["html"],
        "models": {"rgb": {"path": str(model or root / "colors.keras")}},
        "datasets": {"colors": {"path": str(root / folder)}},
        "sections": sections,
    }))
    spec = load_spec(spec_path)
    ctx = RunContext(spec=spec, spec_path=spec_path, store=Store(tmp_path / "store"),
                     staging=tmp_path / "staging", models=ModelRegistry(spec),
                     datasets=DatasetRegistry(spec), ascent=None, progress=Progress(quiet=True))
    if prepare:
        run_dataset_requests(ctx)
    return ctx


def run_dataset_requests(ctx: RunContext) -> None:
    """What the runner does before any section builds: every section's prepare, then the planned passes."""
    for i, s in enumerate(ctx.spec.sections):
        with ctx.work.section(f"s{i}"):
            analysis_for(s.type).prepare(s, ctx, i)
    passes = plan_dataset(ctx.work, ctx.store, ctx.models, ctx.datasets, device_budget())
    execute_dataset(passes, ctx)


def section(**kw: Any) -> dict[str, Any]:
    return {"type": "class_ranking", "model": "rgb", "dataset": "colors", "layer": "color", **kw}


def build(ctx: RunContext, i: int) -> Any:
    return ANALYSIS.build(ctx.spec.sections[i], ctx, SectionOutput(ctx.staging, f"s{i}"), i)


def test_colour_filters_rank_their_colour_first_and_share_one_pass(colors: Path, tmp_path: Path) -> None:
    sections = [section(filters=[0], top=3, top_images=3), section(filters="1:3", top_images=3)]
    ctx = make_ctx(colors, sections, tmp_path)
    red = build(ctx, 0)
    assert (ctx.computed, ctx.reused) == (1, 0)
    f0 = red.context["filters"][0]
    assert f0["rows"][0]["name"] == "red" and f0["rows"][0]["images"] == 3
    assert f0["rows"][0]["mean"] > 5 * max(r["mean"] for r in f0["rows"][1:])
    assert [t["name"] for t in f0["thumbs"]] == ["red"] * 3
    assert any(f.startswith("Filter 0 peaks on class red at") for f in red.findings)
    with open(ctx.staging / f0["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert [r["class"] for r in table][0] == "red" and len(table) == 3
    assert (ctx.staging / f0["chart"]).read_bytes()[:4] == b"\x89PNG"
    chart = next(a for a in red.artifacts if a.kind == "chart")
    assert chart.metrics["top_class"] == "red" and chart.filter == 0

    others = build(ctx, 1)  # another filter range of the same layer: the stored (N, C) pass serves it
    assert (ctx.computed, ctx.reused) == (1, 0)  # computed once; "reused" counts earlier runs' results only
    tops = {f["filter"]: f["rows"][0]["name"] for f in others.context["filters"]}
    assert tops == {1: "green", 2: "blue"}


def test_sections_on_two_layers_share_one_pass(colors: Path, tmp_path: Path) -> None:
    """`gap` (a rank-2 output) averages the colour maps: its filter k is the same signal as `color`'s."""
    ctx = make_ctx(colors, [section(filters=0), {**section(filters=[0, 2]), "layer": "gap"}], tmp_path)
    conv = build(ctx, 0)
    assert (ctx.computed, ctx.reused) == (1, 0)  # each section counts the piece it reads
    pooled = build(ctx, 1)
    assert (ctx.computed, ctx.reused) == (2, 0)  # both pieces from the one pass that ran before any build
    lm = ctx.models.get("rgb")
    assert list(lm.extractors) == [("forward", ("color", "gap"), False, (), (32, 32))]
    assert lm.extractors[("forward", ("color", "gap"), False, (), (32, 32))].trace_count == 1
    assert [f["rows"][0]["name"] for f in pooled.context["filters"]] == ["red", "blue"]
    for a, b in zip(conv.context["filters"][0]["rows"], pooled.context["filters"][0]["rows"], strict=True):
        assert a["name"] == b["name"] and a["mean"] == pytest.approx(b["mean"], rel=1e-4)


def test_corrupt_jpegs_are_skipped_and_named_in_notes(colors: Path, tmp_path: Path) -> None:
    ctx = make_ctx(colors, [section(filters=0, top=2)], tmp_path)
    result = build(ctx, 0)
    skipped = [n for n in result.notes if "unreadable" in n]
    assert len(skipped) == 1
    assert skipped[0].startswith("2 ")
    assert "red/broken.jpg" in skipped[0] and "red/truncated.jpg" in skipped[0]
    assert result.context["images"] == 9 and result.context["total"] == 11


def test_flat_folder_ranks_images_only_and_renders(colors: Path, tmp_path: Path) -> None:
    from reportgen.report.render import environment

    ctx = make_ctx(colors, [section(filters=[1, 0], top_images=2)], tmp_path, folder="colors/red")
    result = build(ctx, 0)
    green, red = result.context["filters"]
    assert green["rows"] == [] and [t["file"] for t in red["thumbs"]] == ["red_coffee.png", "red_chelsea.jpg"]
    assert red["thumbs"][0]["value"] >= red["thumbs"][1]["value"] > 0
    assert any(f.startswith("Filter 0 responds most to red_coffee.png") for f in result.findings)
    assert any("no class subfolders" in n for n in result.notes)
    html = environment().get_template("sections/class_ranking.html.j2").render(c=result.context, sid="s1")
    assert "Filter 0" in html and red["thumbs"][0]["path"] in html and "<table" not in html


def silent_model() -> keras.Model:
    """`color_model` plus filters 3 and 4 with all-zero kernels: relu(0) = 0 on every pixel of every image."""
    inp = keras.Input((SIDE, SIDE, 3))
    conv = keras.layers.Conv2D(5, 1, use_bias=False, activation="relu", name="color")
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(conv(inp)))
    model = keras.Model(inp, out)
    kernel = np.zeros((3, 5), np.float32)
    kernel[:, :3] = -0.5
    np.fill_diagonal(kernel, 1.0)
    conv.set_weights([kernel.reshape(1, 1, 3, 5)])
    return model


def test_filter_that_never_fires_is_not_ranked(colors: Path, tmp_path: Path) -> None:
    """Ties at 0 would otherwise make a chart of zeros, "top images" and a peak class out of nothing,
    and the two silent filters would join filter 2 in "Filters 2, 3, 4 all peak on class blue"."""
    from reportgen.report.render import environment

    silent_model().save(tmp_path / "silent.keras")
    ctx = make_ctx(colors, [section(filters=[2, 3, 4], top_images=3)], tmp_path,
                   model=tmp_path / "silent.keras")
    result = build(ctx, 0)
    blue, *silent = result.context["filters"]
    assert blue["rows"][0]["name"] == "blue" and blue["silent"] is None and len(blue["thumbs"]) == 3
    for entry in silent:
        assert entry["silent"] == 0.0
        assert entry["rows"] == [] and entry["thumbs"] == []
        assert entry["chart"] is None and entry["csv"] is None
    for f in (3, 4):
        expected = f"Filter {f} never fires on this dataset (max mean activation 0 over 9 images)"
        assert f"{expected}: it is not ranked." in result.findings
        assert not [x for x in result.findings if x.startswith((f"Filter {f} peaks", f"Filter {f}:"))]
    assert any(x.startswith("Filter 2 peaks on class blue") for x in result.findings)
    assert not [x for x in result.findings if x.startswith("Filters ")]  # no shared peak with silent filters
    assert {a.filter for a in result.artifacts} == {2}  # no chart, table or thumbnails for 3 and 4
    html = environment().get_template("sections/class_ranking.html.j2").render(c=result.context, sid="s1")
    assert html.count("never fires on this dataset") == 2
    assert html.count("Most activating images") == 1 and html.count("<img") == 1 + 3  # filter 2 only
    assert "could be decoded" not in html


def test_out_of_range_filter_and_unknown_layer_are_clear_errors(colors: Path, tmp_path: Path) -> None:
    sections = [section(filters=[7]), {**section(filters=0), "layer": "colour"}]
    ctx = make_ctx(colors, sections, tmp_path, prepare=False)
    with pytest.raises(ReportgenError, match=r"spec.yaml:\d+:\d+: filter 7 does not exist.*3 channels"):
        ANALYSIS.prepare(ctx.spec.sections[0], ctx, 0)  # before any pass runs
    with pytest.raises(ReportgenError, match="did you mean 'color'"):
        ANALYSIS.prepare(ctx.spec.sections[1], ctx, 1)


def test_forward_pass_equals_naive_per_image_loop(colors: Path, tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    inp = keras.Input((24, 24, 3))
    a = keras.layers.Conv2D(5, 3, activation="relu", name="a")(inp)
    b = keras.layers.Conv2D(7, 3, strides=2, name="b")(a)
    out = keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(b))
    model = keras.Model(inp, out)
    lm = LoadedModel("m", model, PRESETS["tf"], (24, 24), None, "digest", "test model")
    files = sorted((colors / "colors").rglob("*.*"))  # 9 photos of 32 px + 2 corrupt files
    items = [ImageItem(p, p.name, None, None) for p in files]

    got = forward(lm, items, ["a", "b"], outputs=True, batch_size=4)
    bad = sorted(i for i, p in enumerate(files) if p.name in ("broken.jpg", "truncated.jpg"))
    assert got.missing == bad
    good = [it for i, it in enumerate(items) if i not in bad]
    pixels, undecodable = load_pixels(good, (24, 24), 3)
    assert not undecodable
    naive = keras.Model(inp, [model.get_layer("a").output, model.get_layer("b").output, out])
    rows = [i for i in range(len(items)) if i not in bad]
    for row, px in zip(rows, pixels, strict=True):
        ma, mb, p = (t.numpy() for t in naive(px[None] / 127.5 - 1.0))
        np.testing.assert_allclose(got.means["a"][row], ma.mean(axis=(1, 2))[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.means["b"][row], mb.mean(axis=(1, 2))[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.outputs[row], p[0], rtol=1e-4, atol=1e-4)
    assert np.isnan(got.means["a"][bad]).all()
    forward(lm, items[:3], ["a", "b"], outputs=True, batch_size=2)  # other sizes and lists: no retrace
    assert program_for(lm, ["a", "b"], True).trace_count == 1


@pytest.mark.slow
def test_end_to_end_run_then_everything_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import reportgen.engine.forward as engine_forward

    passes: list[tuple[tuple[str, ...], bool]] = []
    real_forward = engine_forward.forward

    def counted(lm: Any, items: Any, layers: Any, outputs: bool = False, **kw: Any) -> Any:
        passes.append((tuple(layers), outputs))
        return real_forward(lm, items, layers, outputs=outputs, **kw)

    monkeypatch.setattr(engine_forward, "forward", counted)  # the executor's only way to the model
    data = tmp_path / "data"
    write_color_folders(data, {"red": "n01440764", "green": "green_tint", "blue": "blue_tint"})
    (data / "blue_tint" / "empty.jpg").write_bytes(b"")
    color_model().save(tmp_path / "rgb.keras")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "title": "Colours", "output": "report", "formats": ["html"],
        "models": {"rgb": {"path": "rgb.keras", "class_names": ["red", "green", "blue"]}},
        "datasets": {"colors": {"path": "data", "labels": "imagenet"}},
        "sections": [
            {"type": "class_ranking", "title": "Colour classes", "model": "rgb", "dataset": "colors",
             "layer": "color", "filters": [0, 2], "top": 3, "top_images": 2},
            {"type": "predictions", "title": "Colour predictions", "model": "rgb", "dataset": "colors",
             "limit": 5, "top_k": 2},
        ],
    }))
    first = run(spec_path, quiet=True)
    assert first.computed == 2 and first.reused == 0
    # one streamed pass over the dataset served the ranking's layer and the predictions' class outputs
    assert passes == [(("color",), True)]
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Colour classes" in html and "Colour predictions" in html and "blue_tint/empty.jpg" in html
    manifest = json.loads((tmp_path / "report" / "manifest.json").read_text())
    ranking, preds = manifest["sections"]
    charts = {a["filter"]: a for a in ranking["artifacts"] if a["kind"] == "chart"}
    assert charts[0]["top_class"] == "tench" and charts[2]["top_class"] == "blue tint"
    assert {a["kind"] for a in ranking["artifacts"]} == {"chart", "table", "image"}
    assert [a["top_class"] for a in preds["artifacts"] if a["kind"] == "image"] == ["blue"] * 3 + ["green"]
    for a in ranking["artifacts"] + preds["artifacts"]:
        assert (tmp_path / "report" / a["path"]).is_file()
        assert a["path"] in html
    second = run(spec_path, quiet=True)
    assert second.computed == 0 and second.reused == 2
    assert len(passes) == 1
