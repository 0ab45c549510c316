"""`gradcam`: where in each image the evidence for a class lies, by class activation maps of a conv layer.

`methods` puts several CAMs side by side: Grad-CAM (mean gradient per channel), Grad-CAM++ (gradients
weighted by higher-order terms, better for several instances of a class), LayerCAM (each location by its
own positive gradient, finer in early layers), Score-CAM (each channel weighted by the class probability
of the input masked with it; no gradients, one forward pass per channel) and Faster-ScoreCAM (only the
`max_n` channels of largest variance).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

import numpy as np
from pydantic import Field

from reportgen.analyses.base import (
    Analysis,
    Artifact,
    Change,
    HistoryItem,
    RunContext,
    SectionOutput,
    SectionResult,
    colour_bar,
)
from reportgen.analyses.shared import (
    FAITHFULNESS_STEPS,
    FINDING_IMAGES,
    check_conv_layer,
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
from reportgen.engine.methods import CAM_METHODS, LABELS
from reportgen.history.figures import centre_shift, map_correlation, stored_map
from reportgen.history.series import Run, Series, means
from reportgen.models import LoadedModel
from reportgen.spec.fields import ImagesMixin, Index, SectionBase, Strict
from reportgen.work import ImageRequest

CamMethod = Literal[CAM_METHODS]  # type: ignore[valid-type]
METHODS: tuple[str, ...] = get_args(CamMethod)  # the canonical order (cache keys, engine)
# Stored array names; Grad-CAM keeps the names it had before `methods`, so earlier results stay reusable.
STORED = {m: ("heatmaps", "maps") if m == "gradcam" else (f"heatmaps_{m}", f"maps_{m}") for m in METHODS}


class GradcamSection(SectionBase, ImagesMixin):
    type: Literal["gradcam"]
    needs_top: ClassVar[bool] = True
    model: str
    layer: str
    target: Index | str | None = Field(None, description="Class index or name; default: the top prediction.")
    alpha: float = Field(0.45, ge=0, le=1)
    methods: list[CamMethod] = Field(
        default_factory=lambda: ["gradcam"],
        min_length=1,
        description="CAM methods shown side by side. scorecam runs one forward pass per channel of the "
        "layer per image; faster-scorecam only max_n.",
    )
    max_n: int = Field(
        10, ge=1, le=4096, description="Faster-ScoreCAM: channels of largest variance kept per image."
    )
    faithfulness: bool = Field(
        False,
        description="Also measure each map's deletion and insertion curves (Petsiuk et al. 2018): the class "
        f"probability as the pixels are blurred away, or put back, in the map's order, {FAITHFULNESS_STEPS} "
        "steps; 2 x (steps + 1) forward passes per image and method.",
    )


TABLE_ROWS = 25  # rows shown in the PDF; the CSV artifact has them all



class GradcamChanges(Strict):
    """When an item counts as changed (the spec\'s `changes: {gradcam: ...}`)."""

    correlation: float = Field(0.8, ge=-1, le=1, description="Changed below this correlation of the maps.")
    shift: float = Field(
        0.1, ge=0, le=1, description="Changed above this shift of the map's centre, in image diagonals."
    )


class GradcamAnalysis(Analysis):
    section = GradcamSection
    thresholds = GradcamChanges
    version = "2"  # 2: the maps at the layer's own resolution are stored too

    def default_title(self, section: GradcamSection) -> str:
        if section.methods == ["gradcam"]:
            return f"Grad-CAM of {section.model} at {section.layer}"
        return f"Class activation maps of {section.model} at {section.layer}"

    @staticmethod
    def _methods(section: GradcamSection) -> list[str]:
        return list(dict.fromkeys(section.methods))

    def _work(
        self, section: GradcamSection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, int, Any, list[ImageItem], list[str], str]:
        """Model, target class, dataset, images, notes and the content key, with located field errors."""
        lm = ctx.models.get(section.model)
        check_conv_layer(lm, section.layer, ctx.where(index, "layer"))
        target = resolve_target(lm, section.target, ctx.where(index, "target"))
        ds, items, notes = select_images(section, ctx, index)
        # alpha only changes the picture, not the computed maps, so it is not part of the key; Grad-CAM
        # alone keeps the key it had before `methods` existed.
        params: dict[str, Any] = {"layer": section.layer, "target": target}
        methods = self._methods(section)
        if methods != ["gradcam"]:
            params["methods"] = [m for m in METHODS if m in methods]
            if "faster-scorecam" in methods:
                params["max_n"] = section.max_n
        if section.faithfulness:
            params["faithfulness"] = curve_params(ctx)
        key = result_key(self.type, self.version, lm, ds, items, params)
        return lm, target, ds, items, notes, key

    def prepare(self, section: GradcamSection, ctx: RunContext, index: int) -> None:
        """Declare the batch of maps: one forward + backward pass per image, and Score-CAM's forward-only
        masked passes (one per channel, or per kept channel, per image). The executor computes it
        (`reportgen.engine.gradient_batches.gradcam`) before any section builds."""
        lm, target, _, items, _, key = self._work(section, ctx, index)
        last = (lm.model.layers[-1].name,)
        n = len(items)
        channels = int(lm.layer(section.layer, ctx.where(index, "layer")).output.shape[-1])
        methods = self._methods(section)
        masks = channels if "scorecam" in methods else min(section.max_n, channels)
        masked = n * masks if {"scorecam", "faster-scorecam"} & set(methods) else 0
        params: dict[str, Any] = {
            "layer": section.layer,
            "target": target,
            "methods": tuple(m for m in METHODS if m in methods),
            "max_n": section.max_n,
            "where": ctx.where(index, "dataset"),
        }
        engine = "gradient_batches.gradcam"
        if section.faithfulness:
            engine = "sanity_batches.gradcam_faithfulness"
            params.update(curve_params(ctx))
            masked += n * len(methods) * 2 * (FAITHFULNESS_STEPS + 1)
        ctx.work.add(
            ImageRequest(
                "gradient", section.model, section.dataset, key, n, n, last, backward=True,
                forward_samples=masked, engine=engine, names=tuple(it.name for it in items),
                params=tuple(params.items()),
            )  # fmt: skip
        )

    def build(
        self, section: GradcamSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm, target, _, items, notes, key = self._work(section, ctx, index)
        methods = self._methods(section)
        res = ctx.result(key, "gradcam")
        notes += skipped_note(items, res["kept"])
        sizes = image_sizes(items)
        figures, rows, artifacts = [], [], []
        faithful: list[dict[str, Any]] = []  # deletion/insertion areas per (image, method), if asked for
        for k, i in enumerate(res["kept"].tolist()):
            item = items[i]
            cls, prob = int(res["classes"][k]), float(res["probability"][k])
            top, top_p = int(res["top"][k]), float(res["top_probability"][k])
            figure: dict[str, Any] = {
                "name": item.name,
                "cls": lm.class_name(cls),
                "probability": prob,
                "top": lm.class_name(top) if top != cls else None,
                "top_probability": top_p,
                "label": item.class_name,
                "maps": [],
            }
            for m in methods:
                heat, conv = res[STORED[m][0]][k], res[STORED[m][1]][k]
                stats = heat_stats(heat, sizes[i])
                slug = m.replace("++", "pp")
                stem = f"{k:03d}_{item.stem}_{slug}"
                rel = out.image(f"{stem}.png", for_print(res["images"][k], heat, section.alpha))
                figure["maps"].append({"src": rel, "method": m, "label": LABELS[m], "empty": stats["empty"]})
                row = {
                    "image": item.name,
                    "method": m,
                    "class": lm.class_name(cls),
                    "probability": round(prob, 4),
                    "top_class": lm.class_name(top),
                    "top_probability": round(top_p, 4),
                    "centre_x": stats["com_x"],
                    "centre_y": stats["com_y"],
                    "region": stats["region"],
                    "top10_share": None if stats["empty"] else round(stats["top10"], 3),
                }
                if section.faithfulness:
                    auc = map_areas(res, m, k)
                    row.update(auc)
                    figure["maps"][-1].update(auc)
                    faithful.append({"method": m, "image": item.name, **auc})
                rows.append(row)
                artifacts.append(Artifact("heatmap", rel, section.model, section.layer, None, dict(row)))
                for resolution, values in (("conv", conv), ("input", heat)):
                    artifacts.append(
                        Artifact(
                            "map",
                            out.array(f"{stem}_{resolution}.npy", values),
                            section.model,
                            section.layer,
                            None,
                            {
                                "method": m,
                                "image": item.name,
                                "resolution": resolution,
                                "shape": list(values.shape),
                                "class": row["class"],
                            },
                        )
                    )
            figures.append(figure)
        csv_rel = out.csv("gradcam.csv", rows)
        bar, bar_artifact = colour_bar(out, "colorbar.png", "jet", section.model)
        artifacts.append(bar_artifact)
        artifacts.append(Artifact("table", csv_rel, section.model, section.layer, None, {"rows": len(rows)}))
        artifacts += [
            Artifact("faithfulness", csv_rel, section.model, section.layer, None, f) for f in faithful
        ]
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
                "methods": [LABELS[m] for m in methods],
                "max_n": section.max_n if "faster-scorecam" in methods else None,
                "faithfulness": {"steps": FAITHFULNESS_STEPS} if section.faithfulness else None,
            },
            artifacts=artifacts,
            findings=self.findings(rows, sizes, res, methods) + faithfulness_findings(faithful, LABELS),
            notes=notes,
        )

    def history_items(self, result: SectionResult) -> list[HistoryItem]:
        """Per (image, method): the explained class, the map's centre (pixels, and its region word), its
        concentration (share of the heat in the hottest 10% of pixels), the picture and the map at input
        resolution (.npy, for the correlation of old and new maps)."""
        maps = {(a.metrics["image"], a.metrics["method"]): a.path for a in result.artifacts
                if a.kind == "map" and a.metrics["resolution"] == "input"}  # fmt: skip
        return [
            HistoryItem(
                f"{a.metrics['image']}/{a.metrics['method']}",
                {"model": a.model, "layer": a.layer, "image": a.metrics["image"],
                 "method": a.metrics["method"], "class": a.metrics["class"],
                 "centre": [a.metrics["centre_x"], a.metrics["centre_y"]],
                 "region": a.metrics["region"], "concentration": a.metrics["top10_share"],
                 "map": maps.get((a.metrics["image"], a.metrics["method"]))},
                a.path,
            )  # fmt: skip
            for a in result.artifacts
            if a.kind == "heatmap"
        ]

    def trend_figures(self, runs: list[Run]) -> dict[str, Series]:
        """Mean concentration: the share of the heat in the hottest 10 % of pixels."""
        return {"mean concentration": {"top-10 % heat share": means(runs, "concentration")}}

    def change_metrics(self, old: dict[str, Any], new: dict[str, Any], limits: dict[str, float]) -> Change:
        """Changed: another explained class, maps whose Pearson correlation is below `correlation`, or a
        centre of heat that moved by more than `shift` image diagonals (both from the stored maps at input
        resolution; without them, a change of the region word counts)."""
        a, b = old["metrics"], new["metrics"]
        figures: dict[str, Any] = {"class_flips": int(a["class"] != b["class"]), "correlation": None,
                                   "centre_shift": None}  # fmt: skip
        ma, mb = (stored_map(e) for e in (old, new))
        if ma is not None and mb is not None and ma.shape == mb.shape:
            figures["correlation"] = round(map_correlation(ma, mb), 4)
            figures["centre_shift"] = round(centre_shift(ma, mb), 4)
        reasons = [f"class {a['class']} → {b['class']}"] if figures["class_flips"] else []
        if figures["correlation"] is None:
            if a["region"] != b["region"]:
                reasons.append(f"centre {a['region']} → {b['region']}")
        else:
            if figures["correlation"] < limits["correlation"]:
                reasons.append(f"map correlation {figures['correlation']:.2f}")
            if figures["centre_shift"] > limits["shift"]:
                reasons.append(f"centre moved {figures['centre_shift']:.2f} diagonals ({a['region']} → "
                               f"{b['region']})")  # fmt: skip
        score = figures["class_flips"] + (1.0 - (figures["correlation"] if figures["correlation"] is not None
                                                 else 1.0 - bool(reasons)))  # fmt: skip
        return Change(bool(reasons), "; ".join(reasons), figures, score)

    @staticmethod
    def findings(
        rows: list[dict[str, Any]],
        sizes: list[tuple[int, int]],
        res: dict[str, np.ndarray],
        methods: list[str],
    ) -> list[str]:
        """Where the first method puts each image's heat, how focused it is, and (with several methods)
        how closely the others' maps follow it: methods that disagree deserve a closer look."""
        first = methods[0]
        label = "" if methods == ["gradcam"] else f"{LABELS[first]}: "
        main = [r for r in rows if r["method"] == first]
        out = []
        for row, i in list(zip(main, res["kept"].tolist(), strict=True))[:FINDING_IMAGES]:
            w, h = sizes[i]
            if row["top10_share"] is None:
                out.append(
                    f"{label}{row['image']}: no positive evidence for {row['class']!r} at this layer "
                    "(the map is empty)."
                )
                continue
            out.append(
                f"{label}{row['image']}: heat for {row['class']!r} ({row['probability']:.2f}) centres at "
                f"x {row['centre_x']}, y {row['centre_y']} of {w}x{h} px ({row['region']}); "
                f"the hottest 10% of pixels hold {row['top10_share']:.0%} of it."
            )
        shares = [r["top10_share"] for r in main if r["top10_share"] is not None]
        if len(shares) > 1:
            best = max((r for r in main if r["top10_share"] is not None), key=lambda r: r["top10_share"])
            out.append(
                f"Across {len(shares)} images the hottest 10% of pixels hold {np.mean(shares):.0%} "
                f"of the heat on average (most focused: {best['image']}, {best['top10_share']:.0%})."
            )
        base = res[STORED[first][0]]
        for m in methods[1:]:
            other = res[STORED[m][0]]
            corr = [
                float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
                for a, b in zip(base, other, strict=True)
                if a.std() > 0 and b.std() > 0
            ]
            same = sum(
                r["region"] == q["region"]
                for r, q in zip(main, (r for r in rows if r["method"] == m), strict=True)
            )
            text = f"{LABELS[m]} vs {LABELS[first]}: same region in {same} of {len(main)} images"
            out.append(text + (f", pixel correlation {np.mean(corr):.2f} on average." if corr else "."))
        return out





ANALYSIS = GradcamAnalysis()
