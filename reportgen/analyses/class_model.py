"""`class_model`: images that maximise a class's pre-softmax score, and how confident the model is on them.

`prepare` requests one ascent sample per class (`AscentRequest` with layer `CLASS_TAG`, its filter the
class index); the planner batches the classes of every section with the same model and recipe into one
class-model pass (`--dry-run` lists it, `--batch-size` and the out-of-memory back-off apply, a parallel
backend runs its pieces on the workers) and the executor stores each class's result on its own (it
depends only on model, class, recipe and seed), so adding a class to a spec computes only that class.
`build` only reads the stored results. Every recipe works: the pixel ones, `fourier` and `maco`; with
`maco` each class also gets MaCo's transparency mask as its own artifact and the image faded by it, as
`filters` shows MaCo tiles (`shared.mask_artifact`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from reportgen.analyses.base import Analysis, Artifact, RunContext, SectionOutput, SectionResult
from reportgen.analyses.shared import fade, mask_artifact
from reportgen.engine.recipes import RECIPES, ascent_size, params_json_schema, resolve_recipe
from reportgen.errors import ReportgenError
from reportgen.imaging import upscale_for_print
from reportgen.spec.fields import Index, SectionBase
from reportgen.work import CLASS_TAG, AscentRequest


class ClassModelSection(SectionBase):
    type: Literal["class_model"]
    needs_top: ClassVar[bool] = True
    model: str
    classes: list[Index | str] = Field(min_length=1)
    recipe: str = Field(
        "regularized",
        description="How the images are optimised: regularized (jitter, blur, decay in pixel space), "
        "keras-example (plain ascent), fourier (lucid: 1/f Fourier coefficients, decorrelated colour, "
        "Adam) or maco (Fourier phase only with a natural magnitude, random crops, Nadam).",
    )
    params: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Recipe overrides.", json_schema_extra=params_json_schema
    )

TABLE_ROWS = 25
LISTED_FINDINGS = 6  # classes named one by one in the findings; more are summarised


def target_classes(
    section: ClassModelSection, ctx: RunContext, index: int, lm: Any, n_classes: int
) -> list[int]:
    """Class indices in spec order without duplicates; names and out-of-range indices are located errors."""
    out: list[int] = []
    for j, target in enumerate(section.classes):
        where = ctx.where(index, "classes", j)
        idx = lm.class_index(target, where)
        if not 0 <= idx < n_classes:
            raise ReportgenError(
                f"{where}: class index {idx} is out of range; model {section.model!r} "
                f"has {n_classes} classes (0 to {n_classes - 1})"
            )
        if idx not in out:
            out.append(idx)
    return out


CSV_COLUMNS = [
    "class",
    "name",
    "confidence",
    "top_class",
    "top_name",
    "top_prob",
    "logit_start",
    "logit_final",
    "top3",
    "image",
]


class ClassModelAnalysis(Analysis):
    section = ClassModelSection
    version = "3"  # 3: planned with the ascent (results keyed by engine.scheduler.request_key)

    def default_title(self, section: ClassModelSection) -> str:
        return f"Class models ({section.recipe})"

    def _plan(self, section: ClassModelSection, ctx: RunContext, index: int) -> tuple[Any, Any, list[int]]:
        """Model, recipe and class indices, with located errors for a model without classes or bad names."""
        lm = ctx.models.get(section.model)
        recipe = resolve_recipe(section.recipe, section.params)
        shape = tuple(lm.logits_output.shape)
        if len(shape) != 2:
            raise ReportgenError(
                f"{ctx.where(index, 'model')}: model {section.model!r} has no classifier output "
                f"(output shape {shape}); class models need one score per class"
            )
        return lm, recipe, target_classes(section, ctx, index, lm, int(shape[-1]))

    def _requests(self, section: ClassModelSection, ctx: RunContext, index: int) -> list[AscentRequest]:
        """One ascent request per class, in spec order."""
        _, recipe, targets = self._plan(section, ctx, index)
        return [AscentRequest(section.model, CLASS_TAG, t, recipe, ctx.spec.seed) for t in targets]

    def prepare(self, section: ClassModelSection, ctx: RunContext, index: int) -> None:
        """Checks the fields and requests every class from the ascent planner."""
        for req in self._requests(section, ctx, index):
            ctx.ascent.request(req)

    def build(
        self, section: ClassModelSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm, recipe, _ = self._plan(section, ctx, index)
        size = ascent_size(lm, recipe)
        rows, artifacts = [], []
        for req in self._requests(section, ctx, index):
            t = req.filter
            path, meta = ctx.ascent.result(req)
            stored = ctx.store.get_arrays(ctx.ascent.requests[req])
            if stored is None:
                raise KeyError(f"class model probabilities missing for {req}")
            probs = stored["probs"]
            order = np.argsort(-probs, kind="stable")[:3]
            top = int(order[0])
            name = lm.class_name(t)
            with Image.open(path) as image:  # the uint8 pixels the model scored, stored losslessly
                rel = out.image(f"class_{t:04d}.png", np.asarray(upscale_for_print(image)))
                pixels = np.asarray(image.convert("RGB"))
            masked, mask = None, None
            if meta.get("mask"):  # MaCo: the mask as its own artifact, the image faded by it beside the image
                # a class model is shown uncropped, so its mask is not cropped either
                unit, stem = {"class": t, "name": name}, f"class_{t:04d}"
                alpha, mask = mask_artifact(ctx, out, req, section.recipe, 0, stem, (None, None), unit)
                faded = upscale_for_print(Image.fromarray(fade(pixels, alpha)))
                masked = out.image(f"class_{t:04d}_masked.png", np.asarray(faded))
            row = {
                "class": t,
                "name": name,
                "logit_start": float(meta["logit_start"]),
                "logit_final": float(meta["logit_final"]),
                "confidence": float(probs[t]),
                "top_class": top,
                "top_name": lm.class_name(top),
                "top_prob": float(probs[top]),
                "top3": "; ".join(f"{lm.class_name(int(k))} {probs[k]:.3f}" for k in order),
            }
            rows.append({**row, "image": rel, "masked": masked})
            artifacts.append(
                Artifact(
                    "class_model",
                    rel,
                    section.model,
                    None,
                    None,
                    {
                        k: row[k]
                        for k in (
                            "class",
                            "name",
                            "confidence",
                            "top_class",
                            "top_name",
                            "logit_start",
                            "logit_final",
                        )
                    },
                )
            )
            if mask is not None:
                artifacts.append(mask)
        csv_rel = out.csv("class_models.csv", rows, CSV_COLUMNS)
        artifacts.append(Artifact("table", csv_rel, section.model, None, None, {"rows": len(rows)}))
        kept = (
            "the Fourier parameterisation's sigmoid keeps pixels in the valid range"
            if recipe.fourier
            else "pixels are clipped to the valid range every step"
        )
        notes = [
            f"Optimised in {size[0]}x{size[1]} canonical input space for {recipe.steps} steps; {kept}, and "
            "each image is shown exactly as the model scored it (uint8, no contrast stretch or crop), so its "
            "confidence is the model's softmax on the picture shown.",
        ]
        if recipe.pad and recipe.crops == 0 and lm.fixed_input:
            notes.append(
                f"The model takes only {size[0]}x{size[1]} inputs: each step it saw the recipe's canvas, "
                f"padded by {recipe.pad} px, scaled back to that size."
            )
        if len(rows) > TABLE_ROWS:
            notes.append(f"The table shows {TABLE_ROWS} of {len(rows)} classes; all are in class_models.csv.")
        return SectionResult(
            context={
                "model": section.model,
                "recipe": section.recipe,
                "recipe_description": RECIPES[section.recipe].description,
                "params": recipe.as_dict(),
                "overrides": dict(section.params),
                "classes": rows,
                "table": rows[:TABLE_ROWS],
                "csv": csv_rel,
                "size": size,
                "masked": any(r["masked"] for r in rows),
            },
            artifacts=artifacts,
            findings=self._findings(rows),
            notes=notes,
            sizes=[size],
        )

    @staticmethod
    def _findings(rows: list[dict[str, Any]]) -> list[str]:
        out = []
        for r in rows[:LISTED_FINDINGS]:
            text = f"class model of {r['name']!r} reaches {r['confidence']:.2f} confidence"
            if r["top_class"] != r["class"]:
                text += f", but the model's top class for it is {r['top_name']!r} ({r['top_prob']:.2f})"
            out.append(text + f"; logit {r['logit_start']:.3g} -> {r['logit_final']:.3g}.")
        if len(rows) > LISTED_FINDINGS:
            own = sum(r["top_class"] == r["class"] for r in rows)
            best = max(rows, key=lambda r: r["confidence"])
            worst = min(rows, key=lambda r: r["confidence"])
            out.append(
                f"{own} of {len(rows)} class models are classified as their own class; confidence ranges "
                f"from {worst['confidence']:.2f} ({worst['name']!r}) to {best['confidence']:.2f} "
                f"({best['name']!r})."
            )
        return out


ANALYSIS = ClassModelAnalysis()
