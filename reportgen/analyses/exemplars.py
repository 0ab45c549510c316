"""`exemplars`: for each chosen unit, the dataset images that drive it the most (and optionally the least),
cropped to what the unit sees.

One streamed forward pass per (model, dataset) — the same pass class rankings and predictions use —
keeps, for every channel of the layer, the k images with the largest peak and the position (y, x) of that
peak in the layer's map (`DatasetRequest` statistic "topk"; "bottomk" keeps the most negative peaks of
the output before a fused ReLU). Shards of the pass merge exactly (`reportgen.engine.topk`). `build` then
crops each exemplar to the unit's receptive field around its peak (`reportgen.engine.receptive_field`),
mapped from model-input pixels back to the source image's pixels, since natural crops of what a unit
sees read better than whole images (NetDissect, OpenAI Microscope). With a `recipe` (and `compare`), the
unit's activation-maximization images lead its row, so the synthetic and the natural pictures sit side by
side (a human study found natural top-activating images more informative than synthetic ones, Borowski
et al., ICLR 2021: both on one row let a reader judge each against the other); each visualisation
carries `exemplar_ratio`, its activation over the best natural image's under the same statistic (the
channel mean, read from the same pass's "means" piece that class rankings use). With class folders,
each row names the classes whose images drive the unit most (per-class means of that piece).

`atlas: true` lays the units out as a unit atlas: one compact row per unit (unit column, visualisations,
crops), a fixed number of rows per page computed by `reportgen.report.layout.atlas_layout`, thumbnails
sized for print, so `filters: all` on a 512-channel layer reads as pages of equal rows.
"""

from __future__ import annotations

import functools
from statistics import median
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from reportgen.analyses import dataset_pass
from reportgen.analyses.base import (
    Analysis,
    Artifact,
    Change,
    HistoryItem,
    RunContext,
    SectionOutput,
    SectionResult,
    slugify,
)
from reportgen.analyses.shared import (
    FAR_BELOW,
    class_means,
    exemplar_ratio,
    filter_requests,
    known_recipes,
    reference_activations,
    reference_request,
    unit_list,
    visual_tile,
)
from reportgen.datasets import Dataset, load_image
from reportgen.engine.quality import NOT_ROBUST
from reportgen.engine.receptive_field import Field as ReceptiveField
from reportgen.engine.receptive_field import receptive_field, source_box
from reportgen.engine.recipes import ascent_size, params_json_schema, resolve_recipe
from reportgen.errors import ReportgenError
from reportgen.history.figures import set_overlap
from reportgen.imaging import compact_number, to_pil, upscale_for_print
from reportgen.models import LoadedModel
from reportgen.report.layout import atlas_layout, lead_height
from reportgen.report.markdown import render_markdown
from reportgen.spec.fields import FilterSelection, SectionBase, Strict, check_filter_selection, expand_filters
from reportgen.work import DatasetRequest, peaks_key

CROP_SIDE = 96  # exemplar crops are upscaled (nearest) to at least this side for print
# A peak at most this share of the layer's largest peak (top; at least minus it for bottom) is no response:
# float rounding of the resize leaves ~1e-6 of a 100-scale unit where the exact answer is 0.
SILENT_SHARE = 1e-4
SOURCES_KEPT = 16  # decoded source images kept while cropping (one image often serves several units)


class ExemplarsSection(SectionBase):
    type: Literal["exemplars"]
    model: str
    dataset: str
    layer: str
    filters: FilterSelection = Field(description="Units (channels of `layer`) to show exemplars for.")
    top: int = Field(8, ge=1, le=64, description="Most activating images per unit.")
    bottom: int = Field(
        0, ge=0, le=64, description="Most negative images per unit (output before the layer's ReLU)."
    )
    recipe: str | None = Field(None, description="Show this recipe's visualisation beside the exemplars.")
    compare: list[str] = Field(
        default_factory=list, description="More recipes whose visualisations follow `recipe`'s."
    )
    params: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Recipe overrides.", json_schema_extra=params_json_schema
    )
    classes: int = Field(
        3, ge=0, le=10, description="With class folders: the classes whose images drive each unit most."
    )
    atlas: bool = Field(
        False,
        description="Unit atlas: one compact row per unit (visualisations, crops, top classes), rows per "
        "page computed for print; for many units (`filters: all`).",
    )

    _f = field_validator("filters")(check_filter_selection)
    _c = field_validator("compare")(known_recipes)

    @property
    def recipes(self) -> list[str]:
        """The visualisations shown per unit: `recipe`, then `compare` (none without `recipe`)."""
        if self.recipe is None:
            return []
        return [self.recipe, *[r for r in self.compare if r != self.recipe]]

    @property
    def visualize(self) -> bool:
        """Whether the section runs the ascent engine (the planner checks its samples fit the device)."""
        return self.recipe is not None


def crop_exemplar(
    image: np.ndarray, field: ReceptiveField, y: int, x: int, input_size: tuple[int, int]
) -> tuple[np.ndarray, list[int]]:
    """The source image's crop of the receptive field of the unit at (y, x), and its [x0, y0, x1, y1) box
    in source pixels. The box is computed in model-input pixels (clamped to the input) and scaled back,
    because the loader resizes the whole image to the input size."""
    box_in = field.box(y, x, *input_size)
    x0, y0, x1, y1 = source_box(box_in, input_size, (image.shape[1], image.shape[0]))
    return image[y0:y1, x0:x1], [x0, y0, x1, y1]



class ExemplarChanges(Strict):
    """When an item counts as changed (the spec\'s `changes: {exemplars: ...}`)."""

    overlap: float = Field(0.5, ge=0, le=1, description="Changed below this share of common exemplar images.")


class ExemplarsAnalysis(Analysis):
    section = ExemplarsSection
    thresholds = ExemplarChanges
    unit_items = True
    version = "1"

    def ascent_layers(self, section: Any, model: Any) -> list[str]:
        """The layer of the units whose visualisations sit beside their exemplars."""
        return [section.layer]

    def default_title(self, section: ExemplarsSection) -> str:
        return f"Exemplars of {section.layer}"

    def _check(self, section: ExemplarsSection, ctx: RunContext, index: int) -> tuple[LoadedModel, list[int]]:
        """The model and the chosen filters; the layer must have maps whose receptive field is known."""
        lm = ctx.models.get(section.model)
        where = ctx.where(index, "layer")
        shape = tuple(lm.layer(section.layer, where).output.shape)
        if len(shape) != 4:
            raise ReportgenError(
                f"{where}: layer {section.layer!r} of model {section.model!r} outputs {shape}, not feature "
                "maps; exemplars crop around a unit's position, so choose a convolutional layer"
            )
        try:
            receptive_field(lm.model, section.layer, lm.input_size)
        except ReportgenError as exc:
            raise ReportgenError(f"{where}: {exc}") from None
        channels = lm.layer_channels(section.layer)
        filters = list(dict.fromkeys(expand_filters(section.filters, channels)))
        bad = [f for f in filters if f >= channels]
        if bad or not filters:
            what = f"filter {bad[0]} does not exist" if bad else f"{section.filters!r} selects no filter"
            raise ReportgenError(
                f"{ctx.where(index, 'filters')}: {what}; layer {section.layer!r} of model "
                f"{section.model!r} has {channels} channels (0..{channels - 1})"
            )
        return lm, filters

    def prepare(self, section: ExemplarsSection, ctx: RunContext, index: int) -> None:
        """Ask for the layer's top-k (and bottom-k) images per channel; with visualisations or class folders
        its per-image channel means too (the class ranking's piece of the same pass); the ascent images."""
        _, filters = self._check(section, ctx, index)
        layer = (section.layer,)
        dataset_pass.request(
            ctx, DatasetRequest(section.model, section.dataset, layers=layer, stats=("topk",), k=section.top)
        )
        if section.bottom:
            dataset_pass.request(
                ctx,
                DatasetRequest(
                    section.model, section.dataset, layers=layer, stats=("bottomk",), k=section.bottom
                ),
            )
        if section.recipes or self._labelled(section, ctx):
            means = reference_request(section.model, section.dataset, section.layer, "channel", section.top)
            dataset_pass.request(ctx, means)  # type: ignore[arg-type]  # "channel" always has one
        for name in section.recipes:
            for req in filter_requests(section, ctx, section.layer, filters, name, section.params):
                ctx.ascent.request(req)

    @staticmethod
    def _labelled(section: ExemplarsSection, ctx: RunContext) -> bool:
        """Whether each row names its top classes: the dataset has class folders and `classes` > 0."""
        return bool(section.classes and ctx.datasets.get(section.dataset).class_names)

    def _visuals(
        self, section: ExemplarsSection, ctx: RunContext, out: SectionOutput, filters: list[int], best: Any
    ) -> tuple[dict[int, list[dict[str, Any]]], list[Artifact]]:
        """Per unit, one entry per recipe: the tile as shown (MaCo faded by its mask), its activation and
        quality figures; `best`: (C,) the best natural channel mean, the denominator of exemplar_ratio."""
        visuals: dict[int, list[dict[str, Any]]] = {f: [] for f in filters}
        artifacts: list[Artifact] = []
        for name in section.recipes:
            recipe = resolve_recipe(name, section.params)
            for req in filter_requests(section, ctx, section.layer, filters, name, section.params):
                path, meta = ctx.ascent.result(req)
                stem = f"{slugify(section.layer)}_{name}_f{req.filter:04d}"
                tile, mask = visual_tile(ctx, out, req, name, recipe, path, meta, stem)
                rel = out.image(f"{stem}.png", tile) if mask else out.copy(f"{stem}.png", path)
                ratio = (
                    exemplar_ratio(meta["activation"], float(best[req.filter])) if best is not None else None
                )
                figures = {
                    "recipe": name,
                    "activation": float(meta["activation"]),
                    "dead": bool(meta["dead"]),
                    "hf_energy": meta.get("hf_energy"),
                    "robustness": meta.get("robustness"),
                    "exemplar_ratio": ratio,
                }
                visuals[req.filter].append({"path": rel, **figures})
                artifacts += [Artifact("filter", rel, section.model, section.layer, req.filter, figures)]
                artifacts += [mask] if mask else []
        return visuals, artifacts

    @staticmethod
    def _top_classes(
        section: ExemplarsSection, ctx: RunContext, lm: LoadedModel, ds: Dataset, filters: list[int]
    ) -> dict[int, list[dict[str, Any]]]:
        """Per unit, the `classes` classes with the largest mean activation of the channel over their
        images (from the per-image channel means of the dataset pass), largest first; a class whose mean is
        not above 0 does not drive the unit and is left out."""
        means = dataset_pass.layer_means(ctx, lm, ds, section.layer)["means"]
        labels = np.asarray([it.label for it in ds.items])
        per_class, _ = class_means(means, labels, len(ds.class_names))
        out = {}
        for f in filters:
            column = np.nan_to_num(per_class[:, f], nan=-np.inf)
            order = np.argsort(-column, kind="stable")[: section.classes]
            out[f] = [
                {"name": ds.class_names[k], "value": float(column[k])}
                for k in order
                if np.isfinite(column[k]) and column[k] > 0
            ]
        return out

    def build(
        self, section: ExemplarsSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm, filters = self._check(section, ctx, index)
        ds = ctx.datasets.get(section.dataset)
        field = receptive_field(lm.model, section.layer, lm.input_size)
        polarities = [("top", "topk", section.top)] + (
            [("bottom", "bottomk", section.bottom)] if section.bottom else []
        )
        data = {
            pol: ctx.result(peaks_key(lm, ds, section.layer, stat, k), "dataset pass")
            for pol, stat, k in polarities
        }
        best = (
            reference_activations(ctx, lm, ds, section.layer, "channel", section.top)
            if section.recipes
            else None
        )
        visuals, artifacts = self._visuals(section, ctx, out, filters, best)
        classes = self._top_classes(section, ctx, lm, ds, filters) if self._labelled(section, ctx) else {}
        rows = []
        peaks = np.abs(data["top"]["value"])
        silent = SILENT_SHARE * float(np.nanmax(peaks)) if np.isfinite(peaks).any() else 0.0

        @functools.lru_cache(maxsize=SOURCES_KEPT)
        def source(i: int) -> np.ndarray:
            return load_image(ds.items[i].path, None, lm.channels)

        for f in filters:
            row: dict[str, Any] = {
                "filter": f, "visuals": visuals[f], "crops": {}, "silent": False,
                "classes": classes.get(f, []),
            }  # fmt: skip
            for pol, _, _ in polarities:
                crops = []
                arrays = data[pol]
                for r in range(arrays["index"].shape[0]):
                    i, value = int(arrays["index"][r, f]), float(arrays["value"][r, f])
                    if i < 0 or (value if pol == "top" else -value) <= silent:
                        continue  # undecodable, or a peak of 0 whose position is any tie
                    item = ds.items[i]
                    y, x = int(arrays["y"][r, f]), int(arrays["x"][r, f])
                    crop, box = crop_exemplar(source(i), field, y, x, lm.input_size)
                    big = np.asarray(upscale_for_print(to_pil(crop).convert("RGB"), CROP_SIDE))
                    name = f"{slugify(section.layer)}_f{f:04d}_{pol}{r + 1:02d}.png"
                    rel = out.image(name, big)
                    crops.append({"rank": r + 1, "path": rel, "file": item.name, "value": value, "box": box})
                    metrics = {
                        "rank": r + 1, "source": item.name, "box": box, "activation": value, "polarity": pol,
                        "position": [y, x],
                    }  # fmt: skip
                    artifacts.append(Artifact("exemplar", rel, section.model, section.layer, f, metrics))
                row["crops"][pol] = crops
            row["silent"] = not row["crops"]["top"] and bool((data["top"]["index"][:, f] >= 0).any())
            rows.append(row)
        findings = self._findings(section, rows)
        h, w = lm.input_size
        caption = self.caption(section, ds, field, (h, w), bool(classes))
        context: dict[str, Any] = {
            "model": section.model,
            "layer": section.layer,
            "dataset": section.dataset,
            "images": len(ds.items),
            "recipes": section.recipes,
            "field": [field.y.size, field.x.size],
            "stride": [field.y.jump, field.x.jump],
            "input": [h, w],
            "top": section.top,
            "bottom": bool(section.bottom),
            "caption": caption,
            "atlas": section.atlas,
            "filters": rows,
        }
        if section.atlas:
            lead = lead_height(
                section.title or self.default_title(section),
                findings,
                render_markdown(section.observations),
                [],
                False,
            )
            thumbs = len(section.recipes) + section.top + section.bottom
            lines = 1 + (1 if section.recipes else 0) + (section.classes if classes else 0)
            layout = atlas_layout(lead, caption, thumbs, lines)
            context |= {"thumb": round(layout.thumb, 1), "pages": layout.pages(rows)}
        return SectionResult(
            context=context,
            artifacts=artifacts,
            findings=findings,
            sizes=[ascent_size(lm, resolve_recipe(n, section.params)) for n in section.recipes],
        )

    def history_items(self, result: SectionResult) -> list[HistoryItem]:
        """Per filter and polarity: the source images of its exemplars in rank order (the exemplar set)."""
        units: dict[tuple[Any, Any, Any, str], list[list[Any]]] = {}
        for a in result.artifacts:
            if a.kind == "exemplar":
                key = (a.model, a.layer, a.filter, a.metrics["polarity"])
                row = [a.metrics["rank"], a.metrics["source"], a.metrics["activation"]]
                units.setdefault(key, []).append(row)
        return [
            HistoryItem(f"{m}/{layer}/{f}/{pol}", {"model": m, "layer": layer, "filter": f, "polarity": pol,
                                                   "exemplars": sorted(rows)})  # fmt: skip
            for (m, layer, f, pol), rows in units.items()
        ]

    def change_metrics(self, old: dict[str, Any], new: dict[str, Any], limits: dict[str, float]) -> Change:
        """Changed: the share of exemplar source images both runs show below `overlap`."""
        sources = [[e[1] for e in side["metrics"]["exemplars"]] for side in (old, new)]
        overlap = set_overlap(*sources)
        changed = overlap < limits["overlap"]
        what = f"exemplar overlap {overlap:.0%}" if changed else ""
        return Change(changed, what, {"overlap": overlap}, 1 - overlap)

    @staticmethod
    def _findings(section: ExemplarsSection, rows: list[dict[str, Any]]) -> list[str]:
        """Units that never fire; visualisations that are not robust or fall far below the natural images;
        without the atlas, each unit's natural peak (an atlas of hundreds of units gives medians)."""
        findings = []
        silent = [str(r["filter"]) for r in rows if r["silent"]]
        if silent:
            verb = "never fires" if len(silent) == 1 else "never fire"
            findings.append(
                f"Filter{'s' if len(silent) > 1 else ''} {unit_list(silent)} {verb} on this dataset: "
                "no image to show."
            )
        for name in section.recipes:
            live = [
                (r["filter"], v) for r in rows for v in r["visuals"] if v["recipe"] == name and not v["dead"]
            ]
            shaky = [str(f) for f, v in live if v["robustness"] is not None and v["robustness"] < NOT_ROBUST]
            if shaky:
                findings.append(
                    f"{name}: the visualisation of {len(shaky)} of {len(live)} live units is not robust "
                    "(under small unseen shifts, zooms and rotations it keeps less than "
                    f"{NOT_ROBUST:.0%} of its activation): {unit_list(shaky)}."
                )
            ratios = [(f, v["exemplar_ratio"]) for f, v in live if v["exemplar_ratio"] is not None]
            below = [str(f) for f, q in ratios if q < FAR_BELOW]
            if below:
                findings.append(
                    f"{name}: the visualisation of {len(below)} of {len(ratios)} units falls far below the "
                    f"natural exemplars (less than {FAR_BELOW:.0%} of the best image's mean activation): "
                    f"{unit_list(below)}."
                )
            if ratios and section.atlas:
                findings.append(
                    f"{name}: the visualisations reach a median {median(q for _, q in ratios):.2f}x the mean "
                    "activation of each unit's best natural image."
                )
        if not section.atlas:
            for r in rows:
                top = r["crops"]["top"]
                if top:  # a peak at one position: the crops' own figure, not the visualisations' mean
                    findings.append(
                        f"Filter {r['filter']} peaks at {compact_number(top[0]['value'])} "
                        f"on {top[0]['file']}."
                    )
        return findings

    @staticmethod
    def caption(
        section: ExemplarsSection, ds: Dataset, field: ReceptiveField, size: tuple[int, int], classes: bool
    ) -> str:
        """What a row shows, in words (the template prints it; the atlas's page estimate counts it)."""
        text = (
            f"Units of layer {section.layer} of model {section.model} over dataset {section.dataset} "
            f"({len(ds.items)} images). Each crop is the unit's receptive field "
            f"({field.y.size}x{field.x.size} px of the {size[0]}x{size[1]} px model input, stride "
            f"{field.y.jump}) around the position where the unit peaks in that image, mapped back to the "
            "source image's pixels, labelled with its peak activation."
        )
        if section.recipes:
            text += (
                f" The first {'images are' if len(section.recipes) > 1 else 'image is'} the unit's "
                f"activation maximization ({', '.join(section.recipes)}), labelled with its activation and "
                "exemplar ratio (its channel mean over that of the best natural image)."
            )
        if section.bottom:
            text += " Crops after the bar are the most negative responses before the layer's ReLU."
        if classes:
            text += f" Classes: the {section.classes} classes with the highest mean activation of the unit."
        return text


ANALYSIS = ExemplarsAnalysis()
