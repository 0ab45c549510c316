"""`occlusion`: hide parts of each image and watch the prediction move (named masks, sliding patch).

Named masks answer "does the model need this part?" for regions the author chose; the sliding patch
(Zeiler & Fergus) maps the drop of the class probability at every position without any prior choice.
The Grad-CAMs of the original and the occluded image, side by side, show where the evidence went.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, field_validator

from reportgen.analyses.base import (
    Analysis,
    Artifact,
    Change,
    HistoryItem,
    RunContext,
    SectionOutput,
    SectionResult,
    map_array,
)
from reportgen.analyses.shared import (
    check_conv_layer,
    explained,
    for_print,
    image_sizes,
    region_word,
    resolve_target,
    result_key,
    select_images,
    skipped_note,
)
from reportgen.datasets import ImageItem
from reportgen.errors import ReportgenError
from reportgen.history.series import Run, Series, means
from reportgen.models import LoadedModel
from reportgen.spec.fields import ImagesMixin, Index, SectionBase, Strict
from reportgen.work import ImageRequest


class OcclusionMask(Strict):
    name: str
    box: tuple[Index, Index, Index, Index] = Field(description="[x0, y0, x1, y1] in the image's own pixels.")
    image: str | None = Field(None, description="Apply only to this image (file name or stem).")
    fill: Literal["gray", "black", "blur", "mean"] = "gray"

    @field_validator("box")
    @classmethod
    def _not_empty(cls, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {list(box)} is empty; [x0, y0, x1, y1] needs x1 > x0 and y1 > y0")
        return box


class SlidingPatch(Strict):
    patch: int = Field(32, ge=1, description="Patch size in model-input pixels.")
    stride: int = Field(16, ge=1)
    fill: Literal["gray", "black", "blur", "mean"] = Field("gray", description="What the patch shows.")


class OcclusionSection(SectionBase, ImagesMixin):
    type: Literal["occlusion"]
    needs_top: ClassVar[bool] = True
    model: str
    layer: str
    masks: list[OcclusionMask] = Field(default_factory=list)
    sliding: SlidingPatch | None = None
    target: Index | str | None = None

NEGLIGIBLE = 0.02  # a probability change below this is reported as "barely moves"


def _matches(item: ImageItem, name: str) -> bool:
    return name in (item.name, item.path.name, item.stem)


Box = tuple[int, int, int, int]
Plan = tuple[list[tuple[int, int, Box]], list[str]]


def plan_masks(
    section: OcclusionSection,
    ctx: RunContext,
    index: int,
    lm: LoadedModel,
    items: list[ImageItem],
    sizes: list[tuple[int, int]],
) -> Plan:
    """(item index, mask index, box in model-input pixels) for every mask and image it applies to."""
    from reportgen.engine.gradients import scale_box  # imports TensorFlow

    pairs, notes = [], []
    for j, mask in enumerate(section.masks):
        x0, y0, x1, y1 = mask.box
        if x1 <= x0 or y1 <= y0:
            raise ReportgenError(
                f"{ctx.where(index, 'masks', j, 'box')}: mask {mask.name!r} box {list(mask.box)} is empty; "
                "give [x0, y0, x1, y1] with x1 > x0 and y1 > y0, in the image's own pixels"
            )
        targets = list(range(len(items)))
        if mask.image is not None:
            targets = [i for i, it in enumerate(items) if _matches(it, mask.image)]
            if not targets:
                shown = ", ".join(it.name for it in items[:8])
                raise ReportgenError(
                    f"{ctx.where(index, 'masks', j, 'image')}: mask {mask.name!r} is for image "
                    f"{mask.image!r}, which is not among this section's images ({shown}); fix the name or "
                    "add it to `images:`"
                )
        for i in targets:
            if not sizes[i][0]:
                continue  # unreadable file: reported once by the loader
            box = scale_box(mask.box, sizes[i], lm.input_size)
            if box[2] <= box[0] or box[3] <= box[1]:
                msg = (
                    f"mask {mask.name!r} box {list(mask.box)} lies outside {items[i].name} "
                    f"({sizes[i][0]}x{sizes[i][1]} px)"
                )
                if mask.image is not None:
                    raise ReportgenError(
                        f"{ctx.where(index, 'masks', j, 'box')}: {msg}; use the image's own pixels"
                    )
                notes.append(f"Skipped: {msg}.")
                continue
            pairs.append((i, j, box))
    return pairs, notes


def _outlined(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The occluded image for print, with the occluded box outlined (a blur fill is otherwise hard to see)."""
    big = Image.fromarray(for_print(image))
    f = big.width / image.shape[1]
    x0, y0, x1, y1 = box
    ImageDraw.Draw(big).rectangle(
        [x0 * f, y0 * f, x1 * f - 1, y1 * f - 1], outline=(0, 220, 255), width=max(1, round(f / 2))
    )
    return np.asarray(big)


def _to_image_px(box: np.ndarray, original: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """A model-input box back in the original image's pixels."""
    (w0, h0), (h, w) = original, size
    x0, y0, x1, y1 = (int(v) for v in box)
    return [round(x0 * w0 / w), round(y0 * h0 / h), round(x1 * w0 / w), round(y1 * h0 / h)]



class OcclusionChanges(Strict):
    """When an item counts as changed (the spec\'s `changes: {occlusion: ...}`)."""

    drop: float = Field(0.05, ge=0, le=1, description="Changed above this change of the probability drop.")


class OcclusionAnalysis(Analysis):
    section = OcclusionSection
    thresholds = OcclusionChanges
    version = "2"  # 2: the Grad-CAMs at the layer's own resolution are stored too

    def default_title(self, section: OcclusionSection) -> str:
        return f"Occlusion on {section.model}"

    def _work(
        self, section: OcclusionSection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, int, Any, list[ImageItem], list[tuple[int, int]], Plan, str]:
        """Model, target, dataset, images, their sizes, the planned masks (with notes) and the content key,
        with located errors for every bad field (raised in `prepare`, before any pass runs)."""
        if not section.masks and section.sliding is None:
            raise ReportgenError(
                f"{ctx.where(index, 'type')}: an occlusion section needs `masks:` (named "
                "boxes) and/or `sliding:` (e.g. sliding: {patch: 32, stride: 16})"
            )
        lm = ctx.models.get(section.model)
        check_conv_layer(lm, section.layer, ctx.where(index, "layer"))
        target = resolve_target(lm, section.target, ctx.where(index, "target"))
        ds, items, notes = select_images(section, ctx, index)
        sizes = image_sizes(items)
        pairs, plan_notes = plan_masks(section, ctx, index, lm, items, sizes)
        params = {
            "layer": section.layer,
            "target": target,
            "masks": [m.model_dump() for m in section.masks],
            "sliding": section.sliding.model_dump() if section.sliding else None,
        }
        key = result_key(self.type, self.version, lm, ds, items, params)
        return lm, target, ds, items, sizes, (pairs, notes + plan_notes), key

    def prepare(self, section: OcclusionSection, ctx: RunContext, index: int) -> None:
        """Declare the gradient batch: a Grad-CAM of every image and of every occluded copy (forward +
        backward), and for the sliding patch one forward sample per position and image plus the unoccluded
        probabilities. The executor computes it (`reportgen.engine.gradient_batches.occlusion`) before any
        section builds."""
        from reportgen.engine.gradients import patch_boxes  # imports TensorFlow

        lm, target, _, items, _, (pairs, _), key = self._work(section, ctx, index)
        n = len(items)
        forward = 0
        if section.sliding is not None:
            positions = patch_boxes(lm.input_size, section.sliding.patch, section.sliding.stride).shape[:2]
            forward = n * (int(np.prod(positions)) + 1)
        sl, last = section.sliding, (lm.model.layers[-1].name,)
        params = {
            "layer": section.layer,
            "target": target,
            "pairs": tuple((int(i), int(j), tuple(int(v) for v in box)) for i, j, box in pairs),
            "fills": tuple(m.fill for m in section.masks),
            "sliding": (sl.patch, sl.stride, sl.fill) if sl is not None else None,
            "where": ctx.where(index, "dataset"),
        }
        ctx.work.add(
            ImageRequest(
                "gradient", section.model, section.dataset, key, n, n + len(pairs), last,
                backward=True, forward_samples=forward, engine="gradient_batches.occlusion",
                names=tuple(it.name for it in items), params=tuple(params.items()),
            )  # fmt: skip
        )

    def build(
        self, section: OcclusionSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm, target, _, items, sizes, (_, notes), key = self._work(section, ctx, index)
        res = ctx.result(key, "occlusion")
        notes += skipped_note(items, res["kept"])
        return self._present(section, lm, items, sizes, res, out, target, notes)

    def _present(
        self,
        section: OcclusionSection,
        lm: LoadedModel,
        items: list[ImageItem],
        sizes: list[tuple[int, int]],
        res: dict[str, np.ndarray],
        out: SectionOutput,
        target: int,
        notes: list[str],
    ) -> SectionResult:
        images, rows, artifacts, findings, slides = [], [], [], [], []
        for k, i in enumerate(res["kept"].tolist()):
            item = items[i]
            cls = int(res["classes"][k])
            before = float(res["probability"][k])
            top_before = int(res["top"][k])
            stem = f"{k:03d}_{item.stem}"
            orig = out.image(f"{stem}_original.png", for_print(res["images"][k]))
            cam = out.image(f"{stem}_gradcam.png", for_print(res["images"][k], res["heatmaps"][k]))
            artifacts.append(Artifact("image", orig, section.model, None, None, {"image": item.name}))
            artifacts += self._cam_arrays(
                section, out, f"{stem}_gradcam", item.name, res["maps"][k], res["heatmaps"][k]
            )
            artifacts.append(
                Artifact(
                    "heatmap",
                    cam,
                    section.model,
                    section.layer,
                    None,
                    {"image": item.name, "class": lm.class_name(cls), "probability": before},
                )
            )
            entry: dict[str, Any] = {
                "name": item.name,
                "cls": lm.class_name(cls),
                "probability": before,
                "original": orig,
                "gradcam": cam,
                "masks": [],
                "sliding": None,
                "empty": not res["heatmaps"][k].any(),
            }
            for p in np.flatnonzero(res["pair_image"] == k).tolist():
                mask = section.masks[int(res["pair_mask"][p])]
                box = tuple(int(v) for v in res["pair_box"][p])
                after = float(res["occ_probability"][p])
                top_after = int(res["occ_top"][p])
                name = f"{stem}_{int(res['pair_mask'][p]):02d}"
                occ_rel = out.image(f"{name}_occluded.png", _outlined(res["occluded"][p], box))
                occ_cam = out.image(
                    f"{name}_occluded_gradcam.png", for_print(res["occluded"][p], res["occ_heatmaps"][p])
                )
                row = {
                    "image": item.name,
                    "mask": mask.name,
                    "fill": mask.fill,
                    "box": list(mask.box),
                    "class": lm.class_name(cls),
                    "before": round(before, 4),
                    "after": round(after, 4),
                    "change": round(after - before, 4),
                    "top_before": lm.class_name(top_before),
                    "top_after": lm.class_name(top_after),
                    "top_after_probability": round(float(res["occ_top_probability"][p]), 4),
                }
                rows.append(row)
                artifacts += self._cam_arrays(
                    section,
                    out,
                    f"{name}_occluded_gradcam",
                    item.name,
                    res["occ_maps"][p],
                    res["occ_heatmaps"][p],
                    mask=mask.name,
                )
                entry["masks"].append(
                    {
                        **row,
                        "occluded": occ_rel,
                        "gradcam": occ_cam,
                        "new_top": top_after != top_before,
                        "empty": not res["occ_heatmaps"][p].any(),
                    }
                )
                artifacts.append(
                    Artifact(
                        "occluded",
                        occ_rel,
                        section.model,
                        section.layer,
                        None,
                        {"image": item.name, "mask": mask.name},
                    )
                )
                artifacts.append(
                    Artifact(
                        "heatmap",
                        occ_cam,
                        section.model,
                        section.layer,
                        None,
                        {k2: v for k2, v in row.items() if k2 != "box"},
                    )
                )
            if "drops" in res:
                entry["sliding"] = self._sliding(
                    section, lm, item, sizes[i], res, k, stem, out, artifacts, slides
                )
            images.append(entry)
        if rows:
            csv_rel = out.csv("occlusion.csv", rows)
            artifacts.append(
                Artifact("table", csv_rel, section.model, section.layer, None, {"rows": len(rows)})
            )
            findings += self._mask_findings(rows)
        else:
            csv_rel = None
        findings += slides
        return SectionResult(
            context={
                "layer": section.layer,
                "model": section.model,
                "explains": explained(lm, target),
                "images": images,
                "total_rows": len(rows),
                "csv": csv_rel,
                "sliding": section.sliding.model_dump() if section.sliding else None,
            },
            artifacts=artifacts,
            findings=findings,
            notes=notes,
        )

    def history_items(self, result: SectionResult) -> list[HistoryItem]:
        """Per (image, mask): the target's probability before and after occluding, its drop, and the top-1
        class after."""
        model = result.context["model"]
        return [
            HistoryItem(
                f"{image['name']}/{m['mask']}",
                {"model": model, "image": image["name"], "mask": m["mask"], "before": m["before"],
                 "after": m["after"], "drop": -m["change"], "top_after": m["top_after"]},
            )  # fmt: skip
            for image in result.context["images"]
            for m in image["masks"]
        ]

    def trend_figures(self, runs: list[Run]) -> dict[str, Series]:
        """Mean probability drop under the masks."""
        return {"mean probability drop": {"drop": means(runs, "drop")}}

    def change_metrics(self, old: dict[str, Any], new: dict[str, Any], limits: dict[str, float]) -> Change:
        """Changed: the probability drop moved by more than `drop`, or the occluded image's top-1 changed."""
        a, b = old["metrics"], new["metrics"]
        shift = abs(a["drop"] - b["drop"])
        figures = {"drop_change": round(shift, 4), "top_after_flips": int(a["top_after"] != b["top_after"])}
        if shift <= limits["drop"] and not figures["top_after_flips"]:
            return Change(False, "", figures, shift)
        what = f"drop {a['drop']:.3f} → {b['drop']:.3f}; top-1 occluded {a['top_after']} → {b['top_after']}"
        return Change(True, what, figures, shift + figures["top_after_flips"])

    @staticmethod
    def _cam_arrays(
        section: OcclusionSection,
        out: SectionOutput,
        stem: str,
        image: str,
        own: np.ndarray,
        at_input: np.ndarray,
        **extra: Any,
    ) -> list[Artifact]:
        """A Grad-CAM's raw maps: at the layer's own resolution and at the model's input resolution."""
        return [
            map_array(
                out,
                f"{stem}_{resolution}.npy",
                values,
                resolution,
                section.model,
                section.layer,
                image,
                "gradcam",
                **extra,
            )
            for resolution, values in (("layer", own), ("input", at_input))
        ]

    @staticmethod
    def _sliding(
        section: OcclusionSection,
        lm: LoadedModel,
        item: ImageItem,
        original: tuple[int, int],
        res: dict[str, np.ndarray],
        k: int,
        stem: str,
        out: SectionOutput,
        artifacts: list[Artifact],
        findings: list[str],
    ) -> dict[str, Any]:
        """One image's sensitivity overlay (drops clipped at 0, scaled by the largest) and its finding."""
        drops, sens = res["drops"][k], res["sensitivity"][k]
        peak = float(sens.max())
        heat = np.clip(sens, 0, None) / peak if peak > 0 else np.zeros_like(sens)
        rel = out.image(f"{stem}_sliding.png", for_print(res["images"][k], heat))
        # The drop per patch position (its own grid) and, per input pixel, the mean drop of the patches
        # covering it (what the figure colours).
        for resolution, values in (("patch", drops), ("input", sens)):
            artifacts.append(
                map_array(
                    out,
                    f"{stem}_sliding_{resolution}.npy",
                    values,
                    resolution,
                    section.model,
                    None,
                    item.name,
                    "sliding",
                )
            )
        best = np.unravel_index(int(np.argmax(drops)), drops.shape)
        max_drop = float(drops[best])
        box = _to_image_px(
            res["patch_boxes"][best], original if original[0] else lm.input_size[::-1], lm.input_size
        )
        h, w = lm.input_size
        cx = (res["patch_boxes"][best][0] + res["patch_boxes"][best][2]) / 2 / w
        cy = (res["patch_boxes"][best][1] + res["patch_boxes"][best][3]) / 2 / h
        artifacts.append(
            Artifact(
                "heatmap",
                rel,
                section.model,
                section.layer,
                None,
                {
                    "image": item.name,
                    "method": "sliding",
                    "max_drop": round(max_drop, 4),
                    "max_drop_box": box,
                },
            )
        )
        cls = lm.class_name(int(res["classes"][k]))
        if max_drop > NEGLIGIBLE:
            findings.append(
                f"{item.name}: the sliding patch lowers {cls!r} most, by {max_drop:.2f} (from "
                f"{float(res['sliding_base'][k]):.2f}), where it covers x {box[0]}-{box[2]}, "
                f"y {box[1]}-{box[3]} of the image ({region_word(cx, cy)})."
            )
        else:
            findings.append(
                f"{item.name}: no position of the sliding patch lowers {cls!r} by more than "
                f"{NEGLIGIBLE}; the evidence is spread out or redundant."
            )
        return {"src": rel, "max_drop": max_drop, "box": box, "base": float(res["sliding_base"][k])}

    @staticmethod
    def _mask_findings(rows: list[dict[str, Any]]) -> list[str]:
        best = max(rows, key=lambda r: abs(r["change"]))
        moved = (
            f"new top class: {best['top_after']}"
            if best["top_after"] != best["top_before"]
            else f"the top class stays {best['top_after']}"
        )
        out = [
            f"Occluding {best['mask']!r} on {best['image']} moves the prediction most: {best['class']} "
            f"{best['before']:.2f} -> {best['after']:.2f} ({best['change']:+.2f}); {moved}."
        ]
        idle = sorted(
            {r["mask"] for r in rows if abs(r["change"]) < NEGLIGIBLE}
            - {r["mask"] for r in rows if abs(r["change"]) >= NEGLIGIBLE}
        )
        if idle and len(rows) > 1:
            out.append(f"Masks that barely move the prediction (|change| < {NEGLIGIBLE}): {', '.join(idle)}.")
        flips = [r for r in rows if r["top_after"] != r["top_before"]]
        if flips:
            out.append(f"{len(flips)} of {len(rows)} occlusions change the top class.")
        return out


ANALYSIS = OcclusionAnalysis()
