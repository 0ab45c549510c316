"""`gradcam`: where in each image the evidence for a class lies, by Grad-CAM on a chosen conv layer.

Also holds the helpers the other gradient sections (`occlusion`, `saliency`) share: image selection,
target and layer checks, loading, cache keys, print-sharp display and heatmap statistics.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
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
from reportgen.analyses.shared import (
    FINDING_IMAGES,
    as_uint8,
    check_conv_layer,
    explained,
    for_print,
    heat_stats,
    image_sizes,
    load_inputs,
    resolve_target,
    result_key,
    select_images,
    skipped_note,
)
from reportgen.datasets import ImageItem
from reportgen.execute import with_backoff
from reportgen.models import LoadedModel
from reportgen.spec.fields import ImagesMixin, Index, SectionBase
from reportgen.work import ImageRequest


class GradcamSection(SectionBase, ImagesMixin):
    type: Literal["gradcam"]
    needs_top: ClassVar[bool] = True
    model: str
    layer: str
    target: Index | str | None = Field(None, description="Class index or name; default: the top prediction.")
    alpha: float = Field(0.45, ge=0, le=1)

TABLE_ROWS = 25  # rows shown in the PDF; the CSV artifact has them all


class GradcamAnalysis(Analysis):
    section = GradcamSection
    version = "2"  # 2: the maps at the layer's own resolution are stored too

    def default_title(self, section: GradcamSection) -> str:
        return f"Grad-CAM of {section.model} at {section.layer}"

    def _work(
        self, section: GradcamSection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, int, Any, list[ImageItem], list[str], str]:
        """Model, target class, dataset, images, notes and the content key, with located field errors."""
        lm = ctx.models.get(section.model)
        check_conv_layer(lm, section.layer, ctx.where(index, "layer"))
        target = resolve_target(lm, section.target, ctx.where(index, "target"))
        ds, items, notes = select_images(section, ctx, index)
        # alpha only changes the picture, not the computed maps, so it is not part of the key.
        key = result_key(self.type, self.version, lm, ds, items, {"layer": section.layer, "target": target})
        return lm, target, ds, items, notes, key

    def prepare(self, section: GradcamSection, ctx: RunContext, index: int) -> None:
        """Declare the batch of maps (one forward + backward pass per image) for the planner."""
        lm, _, _, items, _, key = self._work(section, ctx, index)
        last = (lm.model.layers[-1].name,)
        n = len(items)
        ctx.work.add(ImageRequest("gradient", section.model, section.dataset, key, n, n, last, backward=True))

    def build(
        self, section: GradcamSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        from reportgen.engine.gradients import engine_for  # imports TensorFlow

        lm, target, ds, items, notes, key = self._work(section, ctx, index)

        def compute() -> dict[str, np.ndarray]:
            pixels, kept = load_inputs(lm, ds, items, ctx.where(index, "dataset"))
            with ctx.timed("engine: gradients"):
                r = with_backoff(
                    lambda b: engine_for(lm, b).gradcam(pixels, section.layer, target),
                    ctx.work.batch_for(key, ctx.batch_size),
                    f"gradcam {section.model}",
                )
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
