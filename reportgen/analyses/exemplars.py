"""`exemplars`: for each chosen unit, the dataset images that drive it the most (and optionally the least),
cropped to what the unit sees.

One streamed forward pass per (model, dataset) — the same pass class rankings and predictions use —
keeps, for every channel of the layer, the k images with the largest peak and the position (y, x) of that
peak in the layer's map (`DatasetRequest` statistic "topk"; "bottomk" keeps the most negative peaks of
the output before a fused ReLU). Shards of the pass merge exactly (`reportgen.engine.topk`). `build` then
crops each exemplar to the unit's receptive field around its peak (`reportgen.engine.receptive_field`),
mapped from model-input pixels back to the source image's pixels, since natural crops of what a unit
sees read better than whole images (NetDissect, OpenAI Microscope). With a `recipe`, the unit's
activation-maximization image leads its row, so the synthetic and the natural picture sit side by side.
"""

from __future__ import annotations

import functools
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
from reportgen.analyses.shared import filter_requests
from reportgen.datasets import load_image
from reportgen.engine.receptive_field import Field as ReceptiveField
from reportgen.engine.receptive_field import receptive_field, source_box
from reportgen.engine.recipes import ascent_size, params_json_schema, resolve_recipe
from reportgen.errors import ReportgenError
from reportgen.history.figures import set_overlap
from reportgen.imaging import compact_number, to_pil, upscale_for_print
from reportgen.models import LoadedModel
from reportgen.spec.fields import FilterSelection, SectionBase, check_filter_selection, expand_filters
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
    params: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Recipe overrides.", json_schema_extra=params_json_schema
    )

    _f = field_validator("filters")(check_filter_selection)

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


class ExemplarsAnalysis(Analysis):
    section = ExemplarsSection
    version = "1"

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
        """Ask for the layer's top-k (and bottom-k) images per channel, and the ascent images if shown."""
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
        if section.recipe is not None:
            for req in filter_requests(section, ctx, section.layer, filters, section.recipe, section.params):
                ctx.ascent.request(req)

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
        visuals: dict[int, tuple[str, float]] = {}
        artifacts: list[Artifact] = []
        if section.recipe is not None:
            for req in filter_requests(section, ctx, section.layer, filters, section.recipe, section.params):
                path, meta = ctx.ascent.result(req)
                rel = out.copy(f"{slugify(section.layer)}_{section.recipe}_f{req.filter:04d}.png", path)
                visuals[req.filter] = (rel, float(meta["activation"]))
                artifacts.append(
                    Artifact(
                        "filter", rel, section.model, section.layer, req.filter,
                        {"recipe": section.recipe, "activation": float(meta["activation"])},
                    )
                )  # fmt: skip
        rows, findings = [], []
        peaks = np.abs(data["top"]["value"])
        silent = SILENT_SHARE * float(np.nanmax(peaks)) if np.isfinite(peaks).any() else 0.0

        @functools.lru_cache(maxsize=SOURCES_KEPT)
        def source(i: int) -> np.ndarray:
            return load_image(ds.items[i].path, None, lm.channels)

        for f in filters:
            row: dict[str, Any] = {"filter": f, "visual": None, "crops": {}, "silent": False}
            if f in visuals:
                row["visual"] = {"path": visuals[f][0], "activation": visuals[f][1]}
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
            top = row["crops"]["top"]
            if not top and (data["top"]["index"][:, f] >= 0).any():
                row["silent"] = True
                findings.append(f"Filter {f} never fires on this dataset: no image to show.")
            if top:  # a peak at one position: not comparable with the ascent's objective (a channel mean)
                findings.append(f"Filter {f} peaks at {compact_number(top[0]['value'])} on {top[0]['file']}.")
            rows.append(row)
        h, w = lm.input_size
        return SectionResult(
            context={
                "model": section.model,
                "layer": section.layer,
                "dataset": section.dataset,
                "images": len(ds.items),
                "recipe": section.recipe,
                "field": [field.y.size, field.x.size],
                "stride": [field.y.jump, field.x.jump],
                "input": [h, w],
                "bottom": bool(section.bottom),
                "filters": rows,
            },
            artifacts=artifacts,
            findings=findings,
            sizes=[ascent_size(lm, resolve_recipe(section.recipe, section.params))] if section.recipe else [],
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


ANALYSIS = ExemplarsAnalysis()
