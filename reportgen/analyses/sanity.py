"""`sanity`: which attribution maps deserve trust, by two checks from the literature.

Model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): the weights of the
model's layers are re-drawn one at a time from the output down, on a copy of the model, and each image's
map is compared with the trained model's (Spearman rank correlation of absolute values, SSIM). A method
whose maps stay similar once the model's learned weights are gone explains the input, not the model: it
fails the check. Deletion and insertion (Petsiuk et al. 2018, "RISE"): the pixels are removed from the
image (or put back into a blurred or gray one) in the order the map ranks them, and the class probability
after each step traces a curve; a faithful map makes deletion fall fast (low area) and insertion rise
fast (high area). The section ranks the methods by both areas, per image and on average.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

import numpy as np
from pydantic import Field

from reportgen.analyses.base import Analysis, Artifact, RunContext, SectionOutput, SectionResult, colour_bar
from reportgen.analyses.shared import (
    check_conv_layer,
    explained,
    for_print,
    resolve_target,
    result_key,
    select_images,
    skipped_note,
)
from reportgen.datasets import ImageItem
from reportgen.engine.methods import ATTRIBUTION_METHODS, CAM_METHODS, GRADIENT_CAMS, LABELS, NOISY
from reportgen.engine.randomize import cascade_layers
from reportgen.errors import SpecError
from reportgen.imaging import chart_png, chart_text, colormap, to_pil, upscale_for_print
from reportgen.models import LoadedModel
from reportgen.spec.fields import GradientSamplingMixin, ImagesMixin, Index, SectionBase
from reportgen.work import ImageRequest

SanityMethod = Literal[CAM_METHODS + ATTRIBUTION_METHODS]  # type: ignore[valid-type]
METHODS: tuple[str, ...] = get_args(SanityMethod)


class SanitySection(SectionBase, ImagesMixin, GradientSamplingMixin):
    type: Literal["sanity"]
    needs_top: ClassVar[bool] = True
    model: str
    methods: list[SanityMethod] = Field(
        default_factory=lambda: ["gradcam", "vanilla"],
        min_length=1,
        description="Attribution methods to check. CAMs need `layer`.",
    )
    layer: str | None = Field(None, description="Convolutional layer of the CAM methods.")
    target: Index | str | None = Field(None, description="Class index or name; default: the top prediction.")
    max_n: int = Field(
        10, ge=1, le=4096, description="Faster-ScoreCAM: channels of largest variance kept per image."
    )
    cascade: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Layers randomised, one more per step from the output down (default: every layer "
        "with weights). Each step recomputes every method's maps on the randomised copy.",
    )
    fail_above: float = Field(
        0.5,
        ge=-1,
        le=1,
        allow_inf_nan=False,
        description="A method fails the randomisation check when its maps' mean Spearman correlation with "
        "the trained model's maps is still above this once the whole cascade is randomised.",
    )
    steps: int = Field(
        16,
        ge=2,
        le=256,
        description="Deletion/insertion levels: each moves another 1/steps of the pixels (one forward "
        "pass per level, image, method and curve).",
    )
    baseline: Literal["blur", "gray"] = Field(
        "blur", description="What deleted pixels become and insertion starts from: a blurred copy or gray."
    )


TABLE_ROWS = 25  # per-image rows shown in the PDF; the CSV artifact has them all
SHOWN_IMAGES = 2  # images whose maps along the cascade are drawn
SHOWN_STEPS = 3  # cascade steps drawn beside the trained model's map (spread over the cascade; one row)
CMAP = "inferno"
CLIP_PERCENTILE = 99.0


def slug(method: str) -> str:
    return method.replace("++", "pp")


def render(values: np.ndarray) -> np.ndarray:
    """|map| -> print-sharp RGB scaled to its own 99th percentile (maps of a cascade differ in scale)."""
    a = np.abs(values)
    vmax = float(np.percentile(a, CLIP_PERCENTILE))
    return np.asarray(upscale_for_print(to_pil(colormap(a, CMAP, 0.0, vmax if vmax > 0 else None))))


def similarity_chart(
    label: str, layers: list[str], spearman: np.ndarray, ssim: np.ndarray, threshold: float
) -> bytes:
    """Spearman and SSIM of each image (thin) and their mean (thick) vs the layer the randomisation has
    reached; the threshold as a dotted line. A Figure without pyplot, so no global backend state changes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 2.7), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = np.arange(len(layers) + 1)
    for values, colour, name in ((spearman, "#3b78c2", "Spearman (|map|)"), (ssim, "#d9822b", "SSIM")):
        full = np.concatenate([np.ones((len(values), 1)), values], axis=1)  # step 0: the trained model
        for row in full:
            ax.plot(xs, row, color=colour, alpha=0.3, linewidth=0.7)
        with np.errstate(all="ignore"):
            mean = np.nanmean(np.where(np.isnan(full), 0.0, full), axis=0)
        ax.plot(xs, mean, color=colour, linewidth=2, marker="o", markersize=3, label=name)
    ax.axhline(threshold, color="#b22", linestyle=":", linewidth=1, label=f"fail above {threshold:g}")
    names = ["trained"] + [chart_text(n if len(n) <= 18 else n[:17] + "…") for n in layers]
    ax.set_xticks(xs, names, rotation=35 if len(xs) > 4 else 0, ha="right" if len(xs) > 4 else "center",
                  fontsize=7)  # fmt: skip
    values = np.concatenate([spearman.ravel(), ssim.ravel()])
    lowest = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    ax.set_ylim(min(-0.1, threshold - 0.1, lowest - 0.05), 1.05)
    ax.set_ylabel("similarity to trained", fontsize=8)
    ax.set_xlabel("randomised from the top down to this layer", fontsize=8)
    ax.set_title(chart_text(label), fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="upper right", frameon=False)
    return chart_png(fig, ax)


def final_similarity(spearman: np.ndarray) -> float:
    """Mean Spearman over the images once the whole cascade is randomised; a flat map (NaN: nothing left to
    rank) counts as 0, no shared ranking."""
    if spearman.shape[1] == 0:
        return float("nan")
    return float(np.mean(np.nan_to_num(spearman[:, -1], nan=0.0)))


def ranks(values: list[float], higher_better: bool) -> list[int]:
    """1 = best; ties share the better rank."""
    v = np.asarray(values, np.float64) * (-1 if higher_better else 1)
    return [int((v < x).sum()) + 1 for x in v]


def _none(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 4)


class SanityAnalysis(Analysis):
    section = SanitySection

    def default_title(self, section: SanitySection) -> str:
        return f"Sanity checks of attribution maps of {section.model}"

    @staticmethod
    def _methods(section: SanitySection) -> list[str]:
        return [m for m in METHODS if m in section.methods]  # canonical order: keys and arrays

    def _work(
        self, section: SanitySection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, int, list[ImageItem], list[str], list[str], dict[str, Any], str]:
        """Model, target, images, notes, cascade layers, the engine's parameters and the content key."""
        lm = ctx.models.get(section.model)
        methods = self._methods(section)
        if any(m in CAM_METHODS for m in methods):
            if section.layer is None:
                cams = ", ".join(m for m in methods if m in CAM_METHODS)
                raise SpecError([
                    f"{ctx.where(index, 'methods')}: methods: {cams} "
                    "need a convolutional layer; add `layer:` (`reportgen layers` lists them)"
                ])  # fmt: skip
            check_conv_layer(lm, section.layer, ctx.where(index, "layer"))
        target = resolve_target(lm, section.target, ctx.where(index, "target"))
        ds, items, notes = select_images(section, ctx, index)
        layers = cascade_layers(lm.model)[: section.cascade]
        params: dict[str, Any] = {
            "methods": tuple(methods),
            "layer": section.layer,
            "max_n": section.max_n,
            "target": target,
            "steps": section.steps,
            "baseline": section.baseline,
            "depth": len(layers),
            "seed": ctx.spec.seed,
        }
        noisy = {"samples": section.samples, "noise": section.noise}
        path = {"ig_baseline": section.ig_baseline, "ig_steps": section.ig_steps}
        # the key holds the settings of the methods asked for only; the engine gets them all
        keyed = {**params, **(noisy if set(NOISY) & set(methods) else {}),
                 **(path if "integrated_gradients" in methods else {})}  # fmt: skip
        key = result_key(self.type, self.version, lm, ds, items, keyed)
        return lm, target, items, notes, layers, {**params, **noisy, **path, "model_key": lm.key}, key

    def prepare(self, section: SanitySection, ctx: RunContext, index: int) -> None:
        """Declare the check's batch: every method's maps on the trained model and on each step of the
        randomised copy (forward + backward per image), and the deletion/insertion passes (forward only,
        2 x (steps + 1) per image and method). The executor computes it
        (`reportgen.engine.sanity_batches.sanity`) before any section builds."""
        lm, _, items, _, layers, params, key = self._work(section, ctx, index)
        n, methods = len(items), params["methods"]
        models = 1 + len(layers)
        per_model = (
            int(any(m in GRADIENT_CAMS for m in methods))  # Grad-CAM, Grad-CAM++, LayerCAM: one pass
            + 1  # the clean input gradient (also resolves the classes)
            + (section.samples if set(NOISY) & set(methods) else 0)
            + (section.ig_steps if "integrated_gradients" in methods else 0)
            + sum(m in ("guided_backprop", "deconvnet") for m in methods)
        )
        gradient_passes = n * models * per_model
        masked = 0
        if "scorecam" in methods or "faster-scorecam" in methods:
            channels = lm.layer_channels(section.layer)
            masked = n * models * (channels if "scorecam" in methods else min(section.max_n, channels))
        curves = n * len(methods) * 2 * (section.steps + 1)
        ctx.work.add(
            ImageRequest(
                "gradient", section.model, section.dataset, key, n, gradient_passes,
                (lm.model.layers[-1].name,), backward=True, forward_samples=masked + curves,
                engine="sanity_batches.sanity", names=tuple(it.name for it in items),
                params=tuple({**params, "where": ctx.where(index, "dataset")}.items()),
            )  # fmt: skip
        )

    def build(
        self, section: SanitySection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm, target, items, notes, layers, params, key = self._work(section, ctx, index)
        methods = list(params["methods"])
        res = ctx.result(key, "sanity")
        notes += skipped_note(items, res["kept"])
        kept = res["kept"].tolist()
        names = [items[i].name for i in kept]
        artifacts: list[Artifact] = []
        checks, figures = [], []
        for m in methods:
            s = slug(m)
            sp, ss = res[f"spearman_{s}"], res[f"ssim_{s}"]
            png = similarity_chart(LABELS[m], layers, sp, ss, section.fail_above)
            chart = out.bytes(f"similarity_{s}.png", png)
            layer = section.layer if m in CAM_METHODS else None
            artifacts.append(Artifact("chart", chart, section.model, layer, None, {"method": m}))
            for k, name in enumerate(names):
                for step, frm in enumerate(layers, start=1):
                    artifacts.append(Artifact(
                        "sanity", chart, section.model, layer, None,
                        {"method": m, "image": name, "randomized_from": frm, "step": step,
                         "spearman": _none(sp[k, step - 1]), "ssim": _none(ss[k, step - 1])},
                    ))  # fmt: skip
                stack = np.concatenate([res[f"map_{s}"][k][None], res[f"cascade_{s}"][k]])
                artifacts.append(Artifact(
                    "map", out.array(f"{k:03d}_{items[kept[k]].stem}_{s}_cascade.npy", stack), section.model,
                    layer, None,
                    {"method": m, "image": name, "resolution": "input", "shape": list(stack.shape),
                     "cascade": ["trained", *layers]},
                ))  # fmt: skip
            final = final_similarity(sp)
            checks.append({
                "method": m, "label": LABELS[m], "chart": chart, "final": None if np.isnan(final) else final,
                "final_ssim": float(np.nanmean(ss[:, -1])) if ss.shape[1] else None,
                "fails": bool(final > section.fail_above),
            })  # fmt: skip
        shown = np.unique(np.linspace(0, len(layers), SHOWN_STEPS + 1).round().astype(int)).tolist()
        for k, name in enumerate(names[:SHOWN_IMAGES]):
            stem = f"{k:03d}_{items[kept[k]].stem}"
            image = out.image(f"{stem}_image.png", for_print(res["images"][k]))
            rows = []
            for m in methods:
                s = slug(m)
                cells = []
                for step in shown:
                    values = res[f"map_{s}"][k] if step == 0 else res[f"cascade_{s}"][k, step - 1]
                    cells.append({
                        "src": out.image(f"{stem}_{s}_step{step:03d}.png", render(values)),
                        "caption": "trained" if step == 0 else f"to {layers[step - 1]}",
                    })  # fmt: skip
                rows.append({"label": LABELS[m], "cells": cells})
            figures.append({"name": name, "image": image, "cls": lm.class_name(int(res["classes"][k])),
                            "probability": float(res["probability"][k]), "rows": rows})  # fmt: skip
        table, average = self._faithfulness(res, methods, names)
        csv_rel = out.csv("faithfulness.csv", table)
        for r in table:
            artifacts.append(Artifact(
                "faithfulness", csv_rel, section.model,
                section.layer if r["method"] in CAM_METHODS else None, None,
                {"method": r["method"], "image": r["image"], "deletion_auc": r["deletion_auc"],
                 "insertion_auc": r["insertion_auc"]},
            ))  # fmt: skip
        artifacts.append(Artifact("table", csv_rel, section.model, None, None, {"rows": len(table)}))
        bar, bar_artifact = colour_bar(out, "colorbar.png", CMAP, section.model)
        artifacts.append(bar_artifact)
        return SectionResult(
            context={
                "model": section.model,
                "layer": section.layer,
                "explains": explained(lm, target),
                "layers": layers,
                "checks": checks,
                "figures": figures,
                "colorbar": bar,
                "fail_above": section.fail_above,
                "steps": section.steps,
                "baseline": section.baseline,
                "average": average,
                "rows": table[:TABLE_ROWS],
                "total_rows": len(table),
                "csv": csv_rel,
                "images": len(names),
            },
            artifacts=artifacts,
            findings=self.findings(checks, average, layers, section.fail_above),
            notes=notes,
        )

    @staticmethod
    def _faithfulness(
        res: dict[str, np.ndarray], methods: list[str], names: list[str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Per (image, method) rows with the method's rank among the methods on that image, and the
        methods' averages ranked the same way (deletion: lower is better, insertion: higher)."""
        dele = {m: res[f"deletion_auc_{slug(m)}"] for m in methods}
        ins = {m: res[f"insertion_auc_{slug(m)}"] for m in methods}
        table = []
        for k, name in enumerate(names):
            rd = ranks([float(dele[m][k]) for m in methods], higher_better=False)
            ri = ranks([float(ins[m][k]) for m in methods], higher_better=True)
            for j, m in enumerate(methods):
                table.append({
                    "image": name, "method": m, "label": LABELS[m],
                    "deletion_auc": round(float(dele[m][k]), 4), "insertion_auc": round(float(ins[m][k]), 4),
                    "deletion_rank": rd[j], "insertion_rank": ri[j],
                })  # fmt: skip
        means_d = [float(np.mean(dele[m])) for m in methods]
        means_i = [float(np.mean(ins[m])) for m in methods]
        rd, ri = ranks(means_d, higher_better=False), ranks(means_i, higher_better=True)
        average = sorted(
            (
                {"method": m, "label": LABELS[m], "deletion_auc": means_d[j], "insertion_auc": means_i[j],
                 "deletion_rank": rd[j], "insertion_rank": ri[j]}
                for j, m in enumerate(methods)
            ),
            key=lambda r: (r["deletion_rank"] + r["insertion_rank"], r["deletion_rank"]),
        )  # fmt: skip
        return table, average

    @staticmethod
    def findings(
        checks: list[dict[str, Any]], average: list[dict[str, Any]], layers: list[str], threshold: float
    ) -> list[str]:
        """Which methods pass and which fail the randomisation check, and which maps are most faithful."""
        out = []
        reach = f"the top {len(layers)} layers ({layers[0]} down to {layers[-1]})" if layers else "no layer"
        for c in checks:
            if c["final"] is None:
                out.append(f"{c['label']}: not checked (the model has no layer with weights to randomise).")
            elif c["fails"]:
                out.append(
                    f"{c['label']} FAILS the randomisation check: with {reach} randomised its maps still "
                    f"correlate with the trained model's at Spearman {c['final']:.2f} on average (above "
                    f"{threshold:g}), so they show the input more than what the model learned."
                )
            else:
                out.append(
                    f"{c['label']} passes the randomisation check: with {reach} randomised its maps "
                    f"correlate with the trained model's at Spearman {c['final']:.2f} on average "
                    f"(at most {threshold:g}): they depend on the learned weights."
                )
        if len(average) > 1:
            best_d = min(average, key=lambda r: r["deletion_auc"])
            best_i = max(average, key=lambda r: r["insertion_auc"])
            out.append(
                f"Most faithful by deletion: {best_d['label']} (area {best_d['deletion_auc']:.3f} on "
                f"average, lower is better); by insertion: {best_i['label']} (area "
                f"{best_i['insertion_auc']:.3f}, higher is better)."
            )
        elif average:
            r = average[0]
            out.append(
                f"{r['label']}: deletion area {r['deletion_auc']:.3f}, insertion area "
                f"{r['insertion_auc']:.3f} on average."
            )
        return out


ANALYSIS = SanityAnalysis()
