"""`predictions`: the model's top-k classes, with probabilities, for chosen images of a dataset.

The class outputs come from a dataset pass (`dataset_pass`, requested in `prepare`): the whole dataset's
when a class ranking reads it anyway, else one over just the chosen images, stored per (model,
preprocessing, input size, dataset content, selected images). Class names come from
the model spec, else from the offline ImageNet index for 1000-way models, else are class indices.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from reportgen.analyses import dataset_pass
from reportgen.analyses.base import (
    Analysis,
    Artifact,
    Change,
    HistoryItem,
    RunContext,
    SectionOutput,
    SectionResult,
)
from reportgen.analyses.shared import missing_note, thumbnail
from reportgen.datasets import Dataset, ImageItem
from reportgen.errors import ReportgenError
from reportgen.history.series import Run, Series, means, with_previous
from reportgen.labels import IMAGENET_NUM_CLASSES, decode_top_k
from reportgen.models import LoadedModel
from reportgen.spec.fields import ImagesMixin, SectionBase, Strict
from reportgen.work import DatasetRequest


class PredictionsSection(SectionBase, ImagesMixin):
    type: Literal["predictions"]
    needs_top: ClassVar[bool] = True
    model: str
    top_k: int = Field(5, ge=1)


def class_names(lm: LoadedModel, ctx: RunContext, n_classes: int) -> tuple[list[str], str]:
    """Names of all outputs and where they come from; a class_names list of the wrong length is an error,
    since it would silently put every label on the wrong class."""
    if lm.class_names:
        if len(lm.class_names) != n_classes:
            from reportgen.spec.load import locate

            where = locate(ctx.spec, ("models", lm.key, "class_names"))
            raise ReportgenError(
                f"{where}: model {lm.key!r} has {n_classes} outputs but "
                f"{len(lm.class_names)} class names; give one name per output, in order"
            )
        return list(lm.class_names), "class names from the spec"
    names = [lm.class_name(i) for i in range(n_classes)]
    if n_classes == IMAGENET_NUM_CLASSES:
        return names, "ImageNet class names (offline index)"
    return names, "no class names given: outputs are shown by index"



class PredictionChanges(Strict):
    """When an item counts as changed (the spec\'s `changes: {predictions: ...}`)."""

    confidence: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Changed above this confidence change of the same top-1 class (a flip "
        "of the top-1 class is always a change).",
    )


class PredictionsAnalysis(Analysis):
    section = PredictionsSection
    thresholds = PredictionChanges
    version = "1"

    def default_title(self, section: PredictionsSection) -> str:
        return f"Top-{section.top_k} predictions of {section.model}"

    @staticmethod
    def _images(
        section: PredictionsSection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, Dataset, list[ImageItem], tuple[str, ...] | None]:
        """Model, dataset, chosen images, and the images the dataset pass runs over: None (every image)
        when a class ranking reads the whole (model, dataset) anyway, else just the chosen ones."""
        from reportgen.engine.forward import class_count  # imports TensorFlow

        lm = ctx.models.get(section.model)
        class_count(lm)
        ds = ctx.datasets.get(section.dataset)
        items = ds.select(section.images, section.limit, ctx.where(index, "images"))
        shared = dataset_pass.shares_pass(ctx, section.model, section.dataset)
        return lm, ds, items, None if shared else tuple(it.name for it in items)

    def prepare(self, section: PredictionsSection, ctx: RunContext, index: int) -> None:
        """Ask for the class outputs of the chosen images (or of every image, riding a ranking's pass)."""
        _, _, _, images = self._images(section, ctx, index)
        dataset_pass.request(ctx, DatasetRequest(section.model, section.dataset, outputs=True, images=images))

    def build(
        self, section: PredictionsSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        from reportgen.engine.forward import class_count  # imports TensorFlow

        lm, ds, items, images = self._images(section, ctx, index)
        n_classes = class_count(lm)
        names, names_source = class_names(lm, ctx, n_classes)
        data = self._probabilities(ctx, lm, ds, items, images)
        probs, missing = data["probs"], {int(i) for i in data["missing"]}
        k = min(section.top_k, n_classes)
        notes = [n for n in [missing_note(items, sorted(missing))] if n]
        if bool(data["softmax_applied"]):
            notes.append(
                "The model's outputs are not probabilities (no softmax layer): softmax was applied "
                "to its logits to get the probabilities shown."
            )
        if k < section.top_k:
            notes.append(f"top_k {section.top_k} is more than the model's {n_classes} classes: showing {k}.")

        rows, artifacts, table = [], [], []
        for i, item in enumerate(items):
            if i in missing:
                continue
            top = decode_top_k(probs[i : i + 1], k, names)[0]
            thumb = out.image(f"image_{i:04d}.png", thumbnail(item.path))
            preds = [{"rank": r, "index": c, "name": name, "p": p} for r, (c, name, p) in enumerate(top, 1)]
            rows.append({"file": item.name, "label": item.class_name, "thumb": thumb, "preds": preds})
            table += [
                {
                    "image": item.name,
                    "rank": p["rank"],
                    "class_index": p["index"],
                    "class": p["name"],
                    "probability": f"{p['p']:.6f}",
                }
                for p in preds
            ]
            metrics = {
                "image": item.name,
                "top_class": preds[0]["name"],
                "probability": preds[0]["p"],
                "top_k": [[p["name"], p["p"]] for p in preds],
            }
            artifacts.append(Artifact("image", thumb, section.model, None, None, metrics))
        csv_rel = None
        if table:
            csv_rel = out.csv("predictions.csv", table)
            artifacts.append(
                Artifact("table", csv_rel, section.model, None, None, {"images": len(rows), "top_k": k})
            )
        return SectionResult(
            context={
                "model": section.model,
                "dataset": section.dataset,
                "k": k,
                "classes": n_classes,
                "names_source": names_source,
                "images": rows,
                "csv": csv_rel,
            },
            artifacts=artifacts,
            findings=self._findings(rows, names),
            notes=notes,
        )

    def history_items(self, result: SectionResult) -> list[HistoryItem]:
        """Per image: the top-1 class, its confidence and the whole top-k (a flip is a change of top-1)."""
        return [
            HistoryItem(
                a.metrics["image"],
                {"model": a.model, "image": a.metrics["image"], "top1": a.metrics["top_class"],
                 "confidence": a.metrics["probability"], "top_k": a.metrics["top_k"]},
                a.path,
            )  # fmt: skip
            for a in result.artifacts
            if a.kind == "image"
        ]

    def trend_figures(self, runs: list[Run]) -> dict[str, Series]:
        """Mean top-1 confidence, and the share of images both runs predicted whose top-1 class stayed."""

        def agreement(before: Run, now: Run) -> float | None:
            both = [k for k in now if k in before]
            same = sum(before[k].get("top1") == now[k].get("top1") for k in both)
            return same / len(both) if both else None

        return {
            "mean confidence": {"mean top-1 confidence": means(runs, "confidence")},
            "top-1 agreement with the previous run": {"share of images": with_previous(runs, agreement)},
        }

    def change_metrics(self, old: dict[str, Any], new: dict[str, Any], limits: dict[str, float]) -> Change:
        """Changed: a flip of the top-1 class (`flips` 1, whose mean over a section is the share of flipped
        images), or a confidence in the same class that moved by more than `confidence`."""
        a, b = old["metrics"], new["metrics"]
        flip = a["top1"] != b["top1"]
        delta = b["confidence"] - a["confidence"]
        figures = {"flips": int(flip), "confidence_delta": round(delta, 4) + 0.0}  # + 0.0: no "-0"
        if flip:
            what = f"top-1 {a['top1']} ({a['confidence']:.2f}) → {b['top1']} ({b['confidence']:.2f})"
            return Change(True, what, figures, 1.0 + abs(delta))
        moved = abs(delta) > limits["confidence"]
        what = f"confidence in {a['top1']} {a['confidence']:.2f} → {b['confidence']:.2f}" if moved else ""
        return Change(moved, what, figures, abs(delta))

    @staticmethod
    def _probabilities(
        ctx: RunContext, lm: LoadedModel, ds: Dataset, items: list[ImageItem], images: tuple[str, ...] | None
    ) -> dict[str, np.ndarray]:
        """The chosen images' rows of the class outputs the dataset pass stored (over every image of the
        dataset, or over the chosen ones), as probabilities."""
        from reportgen.engine.forward import to_probabilities  # imports TensorFlow

        stored = dataset_pass.class_outputs(ctx, lm, ds, images)
        pass_items = ds.items if images is None else items
        position = {it.name: i for i, it in enumerate(pass_items)}
        rows = [position[it.name] for it in items]
        bad = {int(i) for i in stored["missing"]}
        probs, applied = to_probabilities(stored["outputs"][[r for r in rows if r not in bad]])
        full = np.full((len(items), probs.shape[1]), np.nan, np.float32)
        full[[i for i, r in enumerate(rows) if r not in bad]] = probs
        missing = [i for i, r in enumerate(rows) if r in bad]
        return {
            "probs": full,
            "softmax_applied": np.asarray(applied),
            "missing": np.asarray(missing, np.int64),
        }

    def _findings(self, rows: list[dict[str, Any]], names: list[str]) -> list[str]:
        """Confidence extremes, agreement with folder labels, and a model that predicts one class for all."""
        if not rows:
            return []
        findings = []
        by_conf = sorted(rows, key=lambda r: -r["preds"][0]["p"])
        best = by_conf[0]
        findings.append(
            f"Most confident: {best['file']} is {best['preds'][0]['name']} ({best['preds'][0]['p']:.1%})."
        )
        if len(rows) > 1:
            worst = by_conf[-1]
            runner = (
                f"; runner-up {worst['preds'][1]['name']} ({worst['preds'][1]['p']:.1%})"
                if len(worst["preds"]) > 1
                else ""
            )
            findings.append(
                f"Least confident: {worst['file']} is {worst['preds'][0]['name']} "
                f"({worst['preds'][0]['p']:.1%}){runner}."
            )
            tops = {r["preds"][0]["name"] for r in rows}
            if len(tops) == 1:
                findings.append(f"All {len(rows)} images are predicted as {tops.pop()}.")
        known = {n.lower() for n in names}
        labelled = [r for r in rows if r["label"] and r["label"].lower() in known]
        if labelled:
            top1 = sum(r["preds"][0]["name"].lower() == r["label"].lower() for r in labelled)
            topk = sum(any(p["name"].lower() == r["label"].lower() for p in r["preds"]) for r in labelled)
            findings.append(
                f"The top-1 class matches the image's folder class for {top1} of {len(labelled)} "
                f"labelled images (top-{len(labelled[0]['preds'])}: {topk})."
            )
        return findings


ANALYSIS = PredictionsAnalysis()
