"""`saliency`: which pixels the class score is most sensitive to (vanilla gradients and SmoothGrad).

Vanilla maps are the largest |d score / d pixel| over the colour channels; they are noisy because the
gradient of a ReLU network jumps between nearby inputs. SmoothGrad averages the gradient over noisy
copies of the image, which keeps what is stable and suppresses that noise.
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
    explained,
    for_print,
    heat_stats,
    image_sizes,
    resolve_target,
    result_key,
    select_images,
    skipped_note,
)
from reportgen.datasets import ImageItem
from reportgen.imaging import colormap, to_pil, upscale_for_print
from reportgen.models import LoadedModel
from reportgen.spec.fields import ImagesMixin, Index, SectionBase
from reportgen.work import ImageRequest


class SaliencySection(SectionBase, ImagesMixin):
    type: Literal["saliency"]
    needs_top: ClassVar[bool] = True
    model: str
    methods: list[Literal["vanilla", "smoothgrad"]] = Field(default_factory=lambda: ["vanilla", "smoothgrad"])
    samples: int = Field(
        16, ge=1, le=256, description="SmoothGrad noisy samples (each a copy of the image in memory)."
    )
    noise: float = Field(
        0.15,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="SmoothGrad noise std as a share of the input range.",
    )
    target: Index | str | None = None

CMAP = "inferno"
CLIP_PERCENTILE = 99.0  # a handful of extreme gradients would otherwise turn the rest of the map black
LABELS = {"vanilla": "vanilla gradient", "smoothgrad": "SmoothGrad"}


def render_map(values: np.ndarray) -> np.ndarray:
    """Saliency values -> print-sharp RGB, scaled to the map's 99th percentile."""
    vmax = float(np.percentile(values, CLIP_PERCENTILE))
    rgb = colormap(values, CMAP, 0.0, vmax if vmax > 0 else None)
    return np.asarray(upscale_for_print(to_pil(rgb)))


class SaliencyAnalysis(Analysis):
    section = SaliencySection

    def default_title(self, section: SaliencySection) -> str:
        return f"Saliency maps of {section.model}"

    def _work(
        self, section: SaliencySection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, int, Any, list[ImageItem], list[str], list[str], str]:
        """Model, target, dataset, images, notes, methods and the content key, with located field errors."""
        lm = ctx.models.get(section.model)
        target = resolve_target(lm, section.target, ctx.where(index, "target"))
        ds, items, notes = select_images(section, ctx, index)
        methods = list(dict.fromkeys(section.methods))
        params: dict[str, Any] = {"target": target, "methods": methods}
        if "smoothgrad" in methods:
            params.update(samples=section.samples, noise=section.noise, seed=ctx.spec.seed)
        key = result_key(self.type, self.version, lm, ds, items, params)
        return lm, target, ds, items, notes, methods, key

    def prepare(self, section: SaliencySection, ctx: RunContext, index: int) -> None:
        """Declare the gradient batch: one input gradient per image (the vanilla map and the class
        SmoothGrad explains), plus `samples` noisy copies per image for SmoothGrad. The executor computes
        it (`reportgen.engine.gradient_batches.saliency`) before any section builds."""
        lm, target, _, items, _, methods, key = self._work(section, ctx, index)
        n = len(items)
        samples = n + (n * section.samples if "smoothgrad" in methods else 0)
        params = {
            "target": target,
            "methods": tuple(methods),
            "samples": section.samples,
            "noise": section.noise,
            "seed": ctx.spec.seed,
            "where": ctx.where(index, "dataset"),
        }
        ctx.work.add(
            ImageRequest(
                "gradient", section.model, section.dataset, key, n, samples, (lm.model.layers[-1].name,),
                backward=True, engine="saliency", names=tuple(it.name for it in items),
                params=tuple(params.items()),
            )  # fmt: skip
        )

    def build(
        self, section: SaliencySection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm, target, _, items, notes, methods, key = self._work(section, ctx, index)
        res = ctx.result(key, "saliency")
        notes += skipped_note(items, res["kept"])
        sizes = image_sizes(items)
        figures, artifacts = [], []
        stats: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for k, i in enumerate(res["kept"].tolist()):
            item = items[i]
            cls, prob = lm.class_name(int(res["classes"][k])), float(res["probability"][k])
            stem = f"{k:03d}_{item.stem}"
            shown = out.image(f"{stem}_image.png", for_print(res["images"][k]))
            artifacts.append(Artifact("image", shown, section.model, None, None, {"image": item.name}))
            entry: dict[str, Any] = {
                "name": item.name,
                "cls": cls,
                "probability": prob,
                "image": shown,
                "maps": [],
            }
            for m in methods:
                rel = out.image(f"{stem}_{m}.png", render_map(res[m][k]))
                s = heat_stats(res[m][k], sizes[i])
                stats[m].append({**s, "image": item.name})
                entry["maps"].append({"method": m, "label": LABELS[m], "src": rel})
                artifacts.append(
                    Artifact(
                        "heatmap",
                        rel,
                        section.model,
                        None,
                        None,
                        {
                            "image": item.name,
                            "method": m,
                            "class": cls,
                            "probability": prob,
                            "top10_share": s["top10"],
                            "centre_x": s["com_x"],
                            "centre_y": s["com_y"],
                        },
                    )
                )
                # A gradient map's own resolution is the model's input: one array serves both.
                artifacts.append(
                    map_array(
                        out,
                        f"{stem}_{m}.npy",
                        res[m][k],
                        "input",
                        section.model,
                        None,
                        item.name,
                        m,
                        **{"class": cls},
                    )
                )
            figures.append(entry)
        bar, bar_artifact = colour_bar(out, "colorbar.png", CMAP, section.model)
        artifacts.append(bar_artifact)
        return SectionResult(
            context={
                "model": section.model,
                "explains": explained(lm, target),
                "figures": figures,
                "samples": section.samples,
                "noise": section.noise,
                "smoothgrad": "smoothgrad" in methods,
                "colorbar": bar,
            },
            artifacts=artifacts,
            findings=self.findings(methods, stats, res),
            notes=notes,
        )

    @staticmethod
    def findings(
        methods: list[str], stats: dict[str, list[dict[str, Any]]], res: dict[str, np.ndarray]
    ) -> list[str]:
        out = []
        main = "smoothgrad" if "smoothgrad" in methods else methods[0]
        for s in stats[main][:FINDING_IMAGES]:
            if s["empty"]:
                out.append(
                    f"{s['image']}: the {LABELS[main]} map is zero (the score does not depend on "
                    "the pixels here)."
                )
            else:
                out.append(
                    f"{s['image']}: {LABELS[main]} centres at x {s['com_x']}, y {s['com_y']} "
                    f"({s['region']}); the top 10% of pixels hold {s['top10']:.0%} of the gradient "
                    "magnitude."
                )
        shares = {m: [s["top10"] for s in stats[m] if not s["empty"]] for m in methods}
        if len(methods) == 2 and shares["vanilla"] and shares["smoothgrad"]:
            pairs = zip(res["vanilla"], res["smoothgrad"], strict=True)
            corr = [
                float(np.corrcoef(v.ravel(), g.ravel())[0, 1])
                for v, g in pairs
                if v.std() > 0 and g.std() > 0
            ]
            line = (
                f"The top 10% of pixels hold {np.mean(shares['vanilla']):.0%} of the magnitude with "
                f"vanilla gradients and {np.mean(shares['smoothgrad']):.0%} with SmoothGrad"
            )
            if corr:
                line += f"; the two maps correlate at r = {np.mean(corr):.2f} on average"
            out.append(line + ".")
        return out


ANALYSIS = SaliencyAnalysis()
