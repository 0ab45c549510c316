"""`gradcam`: where in each image the evidence for a class lies, by Grad-CAM on a chosen conv layer.

Also holds the helpers the other gradient sections (`occlusion`, `saliency`) share: image selection,
target and layer checks, loading, cache keys, print-sharp display and heatmap statistics.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from reportgen.analyses.base import (
    Analysis,
    Artifact,
    RunContext,
    SectionOutput,
    SectionResult,
    colour_bar,
    map_array,
)
from reportgen.datasets import Dataset, ImageItem, load_pixels
from reportgen.errors import ReportgenError
from reportgen.imaging import overlay, to_pil, upscale_for_print
from reportgen.models import LoadedModel
from reportgen.spec.fields import ImagesMixin, Index, SectionBase
from reportgen.store import content_key


class GradcamSection(SectionBase, ImagesMixin):
    type: Literal["gradcam"]
    needs_top: ClassVar[bool] = True
    model: str
    layer: str
    target: Index | str | None = Field(None, description="Class index or name; default: the top prediction.")
    alpha: float = Field(0.45, ge=0, le=1)

DEFAULT_IMAGES = 12  # images shown when a section names neither `images` nor `limit`
TABLE_ROWS = 25  # rows shown in the PDF; the CSV artifact has them all
FINDING_IMAGES = 6  # images described one by one in the findings


# -- shared by gradcam, occlusion and saliency -------------------------------------------------------


def select_images(section: Any, ctx: RunContext, index: int) -> tuple[Dataset, list[ImageItem], list[str]]:
    """The section's images; without `images`/`limit` only the first DEFAULT_IMAGES, said in a note."""
    ds = ctx.datasets.get(section.dataset)
    items = ds.select(section.images, section.limit, ctx.where(index, "images"))
    notes = []
    if section.images is None and section.limit is None and len(items) > DEFAULT_IMAGES:
        notes.append(
            f"Showing the first {DEFAULT_IMAGES} of {len(items)} images of dataset {ds.key!r}; "
            "set `limit:` or `images:` to choose others."
        )
        items = items[:DEFAULT_IMAGES]
    return ds, items, notes


def resolve_target(lm: LoadedModel, target: int | str | None, where: str) -> int:
    """Class index to explain, or -1 for each image's top prediction."""
    if target is None:
        return -1
    idx = lm.class_index(target, where)
    n = int(lm.model.output_shape[-1])
    if not 0 <= idx < n:
        raise ReportgenError(
            f"{where}: class index {idx} is out of range; model {lm.key!r} has {n} classes (0..{n - 1})"
        )
    return idx


def check_conv_layer(lm: LoadedModel, layer: str, where: str) -> None:
    """Grad-CAM weighs a layer's feature maps, so the layer must have (H, W, channels) outputs."""
    shape = tuple(lm.layer(layer, where).output.shape)
    if len(shape) != 4:
        raise ReportgenError(
            f"{where}: layer {layer!r} of model {lm.key!r} outputs {shape}, not feature maps; choose a "
            "convolutional layer (usually the last one; `reportgen layers` lists them)"
        )


def image_sizes(items: list[ImageItem]) -> list[tuple[int, int]]:
    """(width, height) of each file from its header; (0, 0) where unreadable (decoding reports it)."""
    sizes = []
    for it in items:
        try:
            with Image.open(it.path) as im:
                sizes.append(im.size)
        except OSError:
            sizes.append((0, 0))
    return sizes


def load_inputs(
    lm: LoadedModel, ds: Dataset, items: list[ImageItem], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Model-input pixels of the decodable items and their indices into `items`."""
    pixels, bad = load_pixels(items, lm.input_size, lm.channels)
    unreadable = set(bad)
    kept = np.asarray([i for i, it in enumerate(items) if it.name not in unreadable], np.int32)
    if not len(kept):
        raise ReportgenError(
            f"{where}: none of the {len(items)} selected images of dataset {ds.key!r} could be decoded "
            f"(e.g. {bad[0]}); check the files or pick others with `images:`"
        )
    return pixels, kept


def skipped_note(items: list[ImageItem], kept: np.ndarray) -> list[str]:
    """A note naming the files that could not be decoded (left out of the section)."""
    bad = [it.name for i, it in enumerate(items) if i not in set(kept.tolist())]
    if not bad:
        return []
    return [f"Skipped {len(bad)} unreadable file(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}."]


def result_key(
    kind: str, version: str, lm: LoadedModel, ds: Dataset, items: list[ImageItem], params: dict[str, Any]
) -> str:
    """Everything a result depends on: weights, preprocessing, input size, files and parameters."""
    return content_key(
        kind,
        version,
        lm.digest,
        lm.preprocessing.model_dump(),
        list(lm.input_size),
        lm.channels,
        ds.digest,
        [it.name for it in items],
        params,
    )


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def for_print(image: np.ndarray, heat: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """Nearest-upscaled image (sharp in print), with the heatmap blended over it smoothly if given."""
    big = upscale_for_print(to_pil(image).convert("RGB"))
    if heat is None:
        return np.asarray(big)
    return overlay(np.asarray(big), heat, alpha)


def region_word(fx: float, fy: float) -> str:
    """A position as a share of width/height -> words (e.g. 'upper left', 'centre')."""
    row = "upper" if fy < 1 / 3 else "lower" if fy > 2 / 3 else ""
    col = "left" if fx < 1 / 3 else "right" if fx > 2 / 3 else ""
    return " ".join(w for w in (row, col) if w) or "centre"


def heat_stats(heat: np.ndarray, original: tuple[int, int]) -> dict[str, Any]:
    """Centre of mass (in the original image's pixels and as a share of its sides) and the share of all
    heat held by the hottest 10% of pixels (0.1 = spread evenly, 1 = a few pixels)."""
    h, w = heat.shape
    total = float(heat.sum())
    if total <= 0:
        return {
            "empty": True,
            "com_x": None,
            "com_y": None,
            "fx": None,
            "fy": None,
            "top10": None,
            "region": "none",
        }
    ys, xs = np.mgrid[0:h, 0:w]
    fx = float((heat * (xs + 0.5)).sum() / total / w)
    fy = float((heat * (ys + 0.5)).sum() / total / h)
    flat = np.sort(heat.ravel())[::-1]
    top10 = float(flat[: max(1, flat.size // 10)].sum() / total)
    ow, oh = original if original[0] else (w, h)
    return {
        "empty": False,
        "com_x": round(fx * ow),
        "com_y": round(fy * oh),
        "fx": fx,
        "fy": fy,
        "top10": top10,
        "region": region_word(fx, fy),
    }


def explained(lm: LoadedModel, target: int) -> str:
    return "each image's top prediction" if target < 0 else f"class {lm.class_name(target)!r}"


# -- the section ----------------------------------------------------------------------------------


class GradcamAnalysis(Analysis):
    section = GradcamSection
    version = "2"  # 2: the maps at the layer's own resolution are stored too

    def default_title(self, section: GradcamSection) -> str:
        return f"Grad-CAM of {section.model} at {section.layer}"

    def build(
        self, section: GradcamSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        from reportgen.engine.gradients import engine_for  # imports TensorFlow

        lm = ctx.models.get(section.model)
        check_conv_layer(lm, section.layer, ctx.where(index, "layer"))
        target = resolve_target(lm, section.target, ctx.where(index, "target"))
        ds, items, notes = select_images(section, ctx, index)
        # alpha only changes the picture, not the computed maps, so it is not part of the key.
        key = result_key(self.type, self.version, lm, ds, items, {"layer": section.layer, "target": target})

        def compute() -> dict[str, np.ndarray]:
            pixels, kept = load_inputs(lm, ds, items, ctx.where(index, "dataset"))
            with ctx.timed("engine: gradients"):
                r = engine_for(lm, ctx.batch_size).gradcam(pixels, section.layer, target)
            return {
                "images": as_uint8(pixels),
                "kept": kept,
                "heatmaps": r.heatmaps,
                "maps": r.maps,
                "classes": r.classes,
                "probability": r.probability,
                "top": r.top,
                "top_probability": r.probs[np.arange(len(r.top)), r.top],
            }

        res = ctx.cached(key, compute)
        notes += skipped_note(items, res["kept"])
        sizes = image_sizes(items)
        figures, rows, artifacts = [], [], []
        for k, i in enumerate(res["kept"].tolist()):
            item = items[i]
            cls, prob = int(res["classes"][k]), float(res["probability"][k])
            top, top_p = int(res["top"][k]), float(res["top_probability"][k])
            stats = heat_stats(res["heatmaps"][k], sizes[i])
            rel = out.image(
                f"{k:03d}_{item.stem}_gradcam.png",
                for_print(res["images"][k], res["heatmaps"][k], section.alpha),
            )
            figures.append(
                {
                    "src": rel,
                    "name": item.name,
                    "cls": lm.class_name(cls),
                    "probability": prob,
                    "top": lm.class_name(top) if top != cls else None,
                    "top_probability": top_p,
                    "label": item.class_name,
                    "empty": stats["empty"],
                }
            )
            row = {
                "image": item.name,
                "class": lm.class_name(cls),
                "probability": round(prob, 4),
                "top_class": lm.class_name(top),
                "top_probability": round(top_p, 4),
                "centre_x": stats["com_x"],
                "centre_y": stats["com_y"],
                "region": stats["region"],
                "top10_share": None if stats["empty"] else round(stats["top10"], 3),
            }
            rows.append(row)
            artifacts.append(Artifact("heatmap", rel, section.model, section.layer, None, dict(row)))
            stem = f"{k:03d}_{item.stem}_gradcam"
            for resolution, values in (("layer", res["maps"][k]), ("input", res["heatmaps"][k])):
                artifacts.append(
                    map_array(
                        out,
                        f"{stem}_{resolution}.npy",
                        values,
                        resolution,
                        section.model,
                        section.layer,
                        item.name,
                        "gradcam",
                        **{"class": row["class"]},
                    )
                )
        csv_rel = out.csv("gradcam.csv", rows)
        bar, bar_artifact = colour_bar(out, "colorbar.png", "jet", section.model)
        artifacts.append(bar_artifact)
        artifacts.append(Artifact("table", csv_rel, section.model, section.layer, None, {"rows": len(rows)}))
        return SectionResult(
            context={
                "layer": section.layer,
                "model": section.model,
                "explains": explained(lm, target),
                "figures": figures,
                "rows": rows[:TABLE_ROWS],
                "total_rows": len(rows),
                "csv": csv_rel,
                "alpha": section.alpha,
                "colorbar": bar,
            },
            artifacts=artifacts,
            findings=self.findings(rows, sizes, res, items),
            notes=notes,
        )

    @staticmethod
    def findings(
        rows: list[dict[str, Any]],
        sizes: list[tuple[int, int]],
        res: dict[str, np.ndarray],
        items: list[ImageItem],
    ) -> list[str]:
        out = []
        for row, i in list(zip(rows, res["kept"].tolist(), strict=True))[:FINDING_IMAGES]:
            w, h = sizes[i]
            if row["top10_share"] is None:
                out.append(
                    f"{row['image']}: no positive evidence for {row['class']!r} at this layer "
                    "(the map is empty)."
                )
                continue
            out.append(
                f"{row['image']}: heat for {row['class']!r} ({row['probability']:.2f}) centres at "
                f"x {row['centre_x']}, y {row['centre_y']} of {w}x{h} px ({row['region']}); "
                f"the hottest 10% of pixels hold {row['top10_share']:.0%} of it."
            )
        shares = [r["top10_share"] for r in rows if r["top10_share"] is not None]
        if len(shares) > 1:
            best = max((r for r in rows if r["top10_share"] is not None), key=lambda r: r["top10_share"])
            out.append(
                f"Across {len(shares)} images the hottest 10% of pixels hold {np.mean(shares):.0%} "
                f"of the heat on average (most focused: {best['image']}, {best['top10_share']:.0%})."
            )
        return out


ANALYSIS = GradcamAnalysis()
