"""`saliency`: which input pixels a class score (or a unit's activation) is most sensitive to.

Methods (computed by `reportgen.engine.attribution`, where each is described and cited): vanilla
gradients, SmoothGrad, integrated gradients, VarGrad, gradient x input, guided backpropagation and
deconvnet. Vanilla maps are the largest |d score / d pixel| over the colour channels; they are noisy
because the gradient of a ReLU network jumps between nearby inputs. SmoothGrad averages the gradient over
noisy copies of the image, which keeps what is stable and suppresses that noise; VarGrad takes the
variance over the same copies. Integrated gradients and gradient x input are signed contributions to the
score; integrated gradients add up to score(image) - score(baseline), which the manifest records with
the error of the path sum. Guided backprop and deconvnet change the ReLUs' backward pass (on a clone).

A `target` that is a unit (`{layer, filter}` or `{layer}`) explains that unit's activation instead of a
class: the "back-propagation maps" of an intermediate layer.

Every map's signed, unreduced (H, W, C) values are saved as a `.npy` artifact of kind "map".
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
)
from reportgen.analyses.shared import (
    FAITHFULNESS_STEPS,
    FINDING_IMAGES,
    curve_params,
    explained,
    faithfulness_findings,
    for_print,
    heat_stats,
    image_sizes,
    map_areas,
    resolve_target,
    result_key,
    select_images,
    skipped_note,
)
from reportgen.datasets import ImageItem
from reportgen.engine.methods import ATTRIBUTION_METHODS, LABELS, NOISY
from reportgen.errors import SpecError
from reportgen.imaging import colormap, to_pil, upscale_for_print
from reportgen.models import LoadedModel
from reportgen.spec.fields import GradientSamplingMixin, ImagesMixin, Index, SectionBase, Strict
from reportgen.work import ImageRequest

Method = Literal[ATTRIBUTION_METHODS]  # type: ignore[valid-type]


class UnitTarget(Strict):
    """A unit instead of a class: the maps then show what the layer's (or filter's) activation is most
    sensitive to in the input."""

    layer: str = Field(description="Layer whose activation is explained (`reportgen layers` lists them).")
    filter: Index | None = Field(
        None,
        description="One filter (channel) of the layer: its mean activation over positions is explained. "
        "Omitted: the whole layer, as half the mean square of its activations (each unit weighted by its "
        "own activation, so units of opposite sign do not cancel).",
    )


class SaliencySection(SectionBase, ImagesMixin, GradientSamplingMixin):
    type: Literal["saliency"]
    needs_top: ClassVar[bool] = True
    model: str
    methods: list[Method] = Field(
        default_factory=lambda: ["vanilla", "smoothgrad"],
        description="Attribution methods, side by side: vanilla, smoothgrad, integrated_gradients, vargrad, "
        "gradient_x_input, guided_backprop, deconvnet.",
    )
    target: Index | str | UnitTarget | None = Field(
        None,
        description="Class (index or name) to explain, none for each image's top prediction, or a unit: "
        "{layer, filter} or {layer}.",
    )
    faithfulness: bool = Field(
        False,
        description="Also measure each map's deletion and insertion curves (Petsiuk et al. 2018): the class "
        f"probability as the pixels are blurred away, or put back, in the map's order, {FAITHFULNESS_STEPS} "
        "steps; 2 x (steps + 1) forward passes per image and method. Needs a class target, not a unit.",
    )


CMAP = "inferno"
CLIP_PERCENTILE = 99.0  # a handful of extreme gradients would otherwise turn the rest of the map black
# What each map shows, for the caption (the engine's module docstring has the details and papers).
DESCRIPTIONS = {
    "vanilla": "the largest |gradient| over the colour channels (Simonyan et al. 2014)",
    "smoothgrad": "the same for the mean gradient over noisy copies (Smilkov et al. 2017)",
    "vargrad": "the largest variance of the gradient over the same noisy copies (Adebayo et al. 2018)",
    "gradient_x_input": "|sum over channels of gradient × pixel| (Shrikumar et al. 2016)",
    "integrated_gradients": "|sum over channels| of the gradient averaged along the straight path from "
    "the baseline, times (image − baseline) (Sundararajan et al. 2017)",
    "guided_backprop": "the largest |gradient| when every ReLU passes back only positive gradients where "
    "its input was positive (Springenberg et al. 2015)",
    "deconvnet": "the largest |gradient| when every ReLU passes back only positive gradients "
    "(Zeiler & Fergus 2014)",
}


def render_map(values: np.ndarray) -> np.ndarray:
    """Saliency values -> print-sharp RGB, scaled to the map's 99th percentile."""
    vmax = float(np.percentile(values, CLIP_PERCENTILE))
    rgb = colormap(values, CMAP, 0.0, vmax if vmax > 0 else None)
    return np.asarray(upscale_for_print(to_pil(rgb)))


def unit_target(lm: LoadedModel, unit: UnitTarget, ctx: RunContext, index: int) -> dict[str, Any]:
    """A unit target as plain data, with the layer and filter checked against the model."""
    layer = lm.layer(unit.layer, ctx.where(index, "target", "layer"))
    channels = int(layer.output.shape[-1])
    if unit.filter is not None and unit.filter >= channels:
        where = ctx.where(index, "target", "filter")
        raise SpecError(
            [f"{where}: layer {unit.layer!r} has {channels} filters (0..{channels - 1}); pick one of them"]
        )
    return {"layer": unit.layer, "filter": unit.filter}


def describe_target(lm: LoadedModel, target: int | dict[str, Any]) -> str:
    if isinstance(target, dict):
        if target["filter"] is None:
            return f"the activation of layer {target['layer']!r} (half its mean square)"
        return f"the mean activation of filter {target['filter']} of layer {target['layer']!r}"
    return explained(lm, target)


class SaliencyAnalysis(Analysis):
    section = SaliencySection
    version = "2"  # raw (H, W, C) values of every method are stored beside the display maps

    def default_title(self, section: SaliencySection) -> str:
        return f"Saliency maps of {section.model}"

    def _work(
        self, section: SaliencySection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, Any, list[ImageItem], list[str], list[str], dict[str, Any], str]:
        """Model, dataset, images, notes, methods, the engine's parameters and the content key, which
        covers every parameter the chosen methods use; field errors are located."""
        lm = ctx.models.get(section.model)
        where = ctx.where(index, "target")
        target: int | dict[str, Any] = (
            unit_target(lm, section.target, ctx, index)
            if isinstance(section.target, UnitTarget)
            else resolve_target(lm, section.target, where)
        )
        ds, items, notes = select_images(section, ctx, index)
        methods = list(dict.fromkeys(section.methods))
        params: dict[str, Any] = {"target": target, "methods": methods}
        if any(m in NOISY for m in methods):
            params.update(samples=section.samples, noise=section.noise, seed=ctx.spec.seed)
        if "integrated_gradients" in methods:
            params.update(ig_baseline=section.ig_baseline, ig_steps=section.ig_steps)
            if section.ig_baseline == "noise":
                params.update(seed=ctx.spec.seed)
        if section.faithfulness:
            if isinstance(target, dict):
                raise SpecError([
                    f"{ctx.where(index, 'faithfulness')}: faithfulness: deletion and insertion curves follow "
                    "a class's probability, and a unit target has none; explain a class, or drop faithfulness"
                ])  # fmt: skip
            params["faithfulness"] = curve_params(ctx)
        key = result_key(self.type, self.version, lm, ds, items, params)
        return lm, ds, items, notes, methods, params, key

    def prepare(self, section: SaliencySection, ctx: RunContext, index: int) -> None:
        """Declare the gradient batch: one input gradient per image (vanilla, gradient x input, and the
        class every other method explains), one per image for each of guided backprop and deconvnet,
        `samples` noisy copies per image shared by SmoothGrad and VarGrad, and `ig_steps` path points plus
        the baseline per image for integrated gradients. The executor computes it
        (`reportgen.engine.gradient_batches.saliency`) before any section builds."""
        lm, _, items, _, methods, params, key = self._work(section, ctx, index)
        n = len(items)
        per_image = 1 + sum(m in ("guided_backprop", "deconvnet") for m in methods)
        if any(m in NOISY for m in methods):
            per_image += section.samples
        if "integrated_gradients" in methods:
            per_image += section.ig_steps + 1
        target = params["target"]
        request = {
            **{k: v for k, v in params.items() if k != "faithfulness"},
            "target": tuple(target.items()) if isinstance(target, dict) else target,
            "methods": tuple(methods),
            "where": ctx.where(index, "dataset"),
        }
        engine, curves = "gradient_batches.saliency", 0
        if section.faithfulness:
            engine = "sanity_batches.saliency_faithfulness"
            request.update(curve_params(ctx))
            curves = n * len(methods) * 2 * (FAITHFULNESS_STEPS + 1)
        ctx.work.add(
            ImageRequest(
                "gradient", section.model, section.dataset, key, n, n * per_image,
                (lm.model.layers[-1].name,), backward=True, forward_samples=curves,
                engine=engine, names=tuple(it.name for it in items), params=tuple(request.items()),
            )  # fmt: skip
        )

    def build(
        self, section: SaliencySection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm, _, items, notes, methods, params, key = self._work(section, ctx, index)
        res = ctx.result(key, "saliency")
        notes += skipped_note(items, res["kept"])
        if "overridden_relus" in res and len(res["overridden_relus"]) and not res["overridden_relus"][0]:
            notes.append(
                f"Model {section.model!r} has no ReLU that guided backprop or deconvnet can override (they "
                "change ReLU layers and `activation: relu` only), so their maps are plain gradients."
            )
        sizes = image_sizes(items)
        unit = isinstance(params["target"], dict)
        figures, artifacts = [], []
        faithful: list[dict[str, Any]] = []  # deletion/insertion areas per (image, method), if asked for
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
            explains = {"unit": dict(params["target"])} if unit else {"class": cls, "probability": prob}
            for m in methods:
                rel = out.image(f"{stem}_{m}.png", render_map(res[m][k]))
                s = heat_stats(res[m][k], sizes[i])
                stats[m].append({**s, "image": item.name})
                entry["maps"].append({"method": m, "label": LABELS[m], "src": rel})
                row = {
                    "image": item.name,
                    "method": m,
                    **explains,
                    "top10_share": s["top10"],
                    "centre_x": s["com_x"],
                    "centre_y": s["com_y"],
                }
                if section.faithfulness:
                    auc = map_areas(res, m, k)
                    row.update(auc)
                    entry["maps"][-1].update(auc)
                    faithful.append({"method": m, "image": item.name, **auc})
                artifacts.append(Artifact("heatmap", rel, section.model, None, None, row))
                raw = res[f"raw_{m}"][k]
                extra: dict[str, Any] = {}
                if m == "integrated_gradients":
                    extra = {
                        "baseline": section.ig_baseline,
                        "steps": section.ig_steps,
                        "score_difference": float(res["ig_score_difference"][k]),
                        "completeness_error": float(res["ig_completeness_error"][k]),
                    }
                # A gradient map's own resolution is the model's input: signed, one value per channel.
                artifacts.append(
                    Artifact(
                        "map",
                        out.array(f"{stem}_{m}.npy", raw),
                        section.model,
                        params["target"]["layer"] if unit else None,
                        None,
                        {
                            "method": m,
                            "image": item.name,
                            "resolution": "input",
                            "shape": list(raw.shape),
                            **explains,
                            **extra,
                        },
                    )
                )
            figures.append(entry)
        bar, bar_artifact = colour_bar(out, "colorbar.png", CMAP, section.model)
        artifacts.append(bar_artifact)
        if faithful:
            csv_rel = out.csv("faithfulness.csv", faithful)
            artifacts += [Artifact("faithfulness", csv_rel, section.model, None, None, f) for f in faithful]
        return SectionResult(
            context={
                "model": section.model,
                "explains": describe_target(lm, params["target"]),
                "unit": unit,
                "figures": figures,
                "methods": [{"label": LABELS[m], "text": DESCRIPTIONS[m]} for m in methods],
                "samples": section.samples,
                "noise": section.noise,
                "smoothgrad": any(m in NOISY for m in methods),
                "ig": "integrated_gradients" in methods,
                "ig_baseline": section.ig_baseline,
                "ig_steps": section.ig_steps,
                "colorbar": bar,
                "faithfulness": {"steps": FAITHFULNESS_STEPS} if section.faithfulness else None,
            },
            artifacts=artifacts,
            findings=self.findings(methods, stats, res) + faithfulness_findings(faithful, LABELS),
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
                    f"({s['region']}); the top 10% of pixels hold {s['top10']:.0%} of the map's total."
                )
        shares = {m: [s["top10"] for s in stats[m] if not s["empty"]] for m in methods}
        if "vanilla" in methods and "smoothgrad" in methods and shares["vanilla"] and shares["smoothgrad"]:
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
        if "integrated_gradients" in methods and len(res["ig_completeness_error"]):
            err = res["ig_completeness_error"]
            out.append(
                f"Integrated gradients add up to the score difference from the baseline within "
                f"{float(np.mean(err)):.1%} on average (worst {float(np.max(err)):.1%}); more `ig_steps` "
                "make the path sum more exact."
            )
        return out


ANALYSIS = SaliencyAnalysis()
