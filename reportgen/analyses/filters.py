"""`filters`: activation-maximization grids for chosen layers (the classic Keras example and regularised),
optionally with several recipes side by side."""

from __future__ import annotations

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
)
from reportgen.analyses.shared import (
    FAR_BELOW,
    artifact_filter,
    check_position,
    dead_explanation,
    dead_label,
    exemplar_partner,
    exemplar_ratio,
    filter_requests,
    known_recipes,
    map_shape,
    reference_activations,
    reference_request,
    unit_list,
    visual_tile,
)
from reportgen.engine.quality import NOT_ROBUST
from reportgen.engine.recipes import RECIPES, ascent_size, params_json_schema, resolve_recipe
from reportgen.errors import ReportgenError, SpecError
from reportgen.history.figures import relative_change
from reportgen.history.perceptual import entry_pictures
from reportgen.history.series import Run, Series, means
from reportgen.imaging import compact_number, grid
from reportgen.report.layout import lead_height, plain_params, plan_grid_heights
from reportgen.report.markdown import render_markdown
from reportgen.spec.fields import FilterSelection, SectionBase, Strict, check_filter_selection, expand_filters


class FiltersSection(SectionBase):
    type: Literal["filters"]
    model: str
    layers: list[str] = Field(min_length=1)
    filters: FilterSelection = "0:64"
    recipe: str = "keras-example"
    compare: list[str] = Field(
        default_factory=list, description="More recipes, shown side by side with `recipe` for each layer."
    )
    params: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Recipe overrides.", json_schema_extra=params_json_schema
    )
    columns: int | None = Field(
        None, ge=1, le=256, description="Grid columns (default: square grid); the grid is one image."
    )
    objective: Literal["channel", "neuron", "layer", "direction"] = Field(
        "channel",
        description="What each image maximises: a filter's mean (channel), its unit at one position "
        "(neuron), the whole layer's mean square (layer: one image per layer), or the dot product with "
        "`direction` (one image per layer).",
    )
    position: list[int] | None = Field(
        None, min_length=2, max_length=2, description="neuron: [y, x] in the layer's map; default its centre."
    )
    direction: list[float] | str | None = Field(
        None, description="direction: one weight per channel of the layer, or a .npy file (spec-relative)."
    )
    diversity: int = Field(
        1, ge=1, le=16, description="Images per filter, pushed apart by lucid's Gram-similarity penalty."
    )

    _f = field_validator("filters")(check_filter_selection)

    _c = field_validator("compare")(known_recipes)

    @property
    def recipes(self) -> list[str]:
        return [self.recipe, *[r for r in self.compare if r != self.recipe]]

DEAD_MARK = "\u2020"  # dagger after a dead filter's label: a word would not fit a small tile
MIN_FILTERS_FOR_RATIO = 3  # live filters needed before the best one is compared with their median


def border_notes(lm: Any, layers: list[str], border: int, size: tuple[int, int]) -> list[str]:
    """The ascent leaves `border` rows and columns out of the mean only where the map is larger than twice
    that; a smaller map is averaged whole. Said in the section, since the caption says "border excluded"."""
    if not border:
        return []
    notes = []
    for layer in layers:
        h, w = map_shape(lm, layer, size)
        if h <= 2 * border or w <= 2 * border:
            notes.append(
                f"{layer}: its maps are {h}x{w} at {size[0]}x{size[1]} px input, too small to leave out "
                f"a {border}-px border, so each filter's objective is its mean over the whole map "
                "(no border excluded)."
            )
    return notes


def unit_options(section: FiltersSection, ctx: RunContext, index: int, layer: str) -> dict[str, Any]:
    """The section's objective settings for one layer, checked against it: a direction has one weight per
    channel (given inline or as a .npy file next to the spec)."""
    out: dict[str, Any] = {"objective": section.objective, "diversity": section.diversity}
    if section.objective == "neuron" and section.position is not None:
        lm = ctx.models.get(section.model)
        sizes = [ascent_size(lm, resolve_recipe(n, section.params)) for n in section.recipes]
        out["position"] = check_position(lm, layer, section.position, sizes, ctx.where(index, "position"))
    if section.objective != "direction":
        return out
    where = ctx.where(index, "direction")
    if section.direction is None:
        raise SpecError([f"{where}: direction: missing; give one weight per channel or a .npy file"])
    values: Any = section.direction
    if isinstance(values, str):
        path = ctx.spec_path.parent / values
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SpecError(
                [f"{where}: direction: cannot read {values!r} as .npy ({exc}); fix the path"]
            ) from None
    vec = np.asarray(values, np.float64).ravel()
    channels = ctx.models.get(section.model).layer_channels(layer)
    if vec.size != channels or not np.all(np.isfinite(vec)):
        raise SpecError(
            [
                f"{where}: direction: {vec.size} finite weights given; give one per channel of {layer!r} "
                f"({channels})"
            ]
        )
    out["direction"] = tuple(float(v) for v in vec)
    return out


def units_of(section: FiltersSection, filters: list[int]) -> list[int]:
    """Filters of a layer the section visualises: `layer` and `direction` objectives have one unit each."""
    return [0] if section.objective in ("layer", "direction") else filters


def layer_filters(section: FiltersSection, ctx: RunContext, index: int) -> dict[str, list[int]]:
    """Selected filter indices per layer (indices past the layer's channel count are dropped)."""
    lm = ctx.models.get(section.model)
    out = {}
    for j, layer in enumerate(section.layers):
        channels = int(lm.layer(layer, ctx.where(index, "layers", j)).output.shape[-1])
        chosen = expand_filters(section.filters, channels)
        beyond = [f for f in chosen if f >= channels]
        if beyond and not isinstance(section.filters, str):  # a range is clipped; an explicit index is a typo
            raise ReportgenError(
                f"{ctx.where(index, 'filters')}: filter {beyond[0]} does not exist in {layer!r}, "
                f"which has {channels} filters (0..{channels - 1})"
            )
        out[layer] = [f for f in chosen if f < channels]
    return out


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(median(known)) if known else None


# -- page layout ---------------------------------------------------------------------------------------

class FilterChanges(Strict):
    """When an item counts as changed (the spec\'s `changes: {filters: ...}`)."""

    ssim: float = Field(0.9, ge=0, le=1, description="Changed below this SSIM of old and new picture.")
    feature: float = Field(
        0.1, ge=0, le=1, description="Changed above this feature-space distance (0..1) of the pictures."
    )
    activation: float = Field(
        0.05, ge=0, le=10, description="Changed above this relative activation change |new-old|/max."
    )


class FiltersAnalysis(Analysis):
    section = FiltersSection
    filter_selection = ("filters", "layers")
    thresholds = FilterChanges
    unit_items = True

    def ascent_layers(self, section: FiltersSection, model: Any) -> list[str]:
        return list(section.layers)

    def default_title(self, section: FiltersSection) -> str:
        return f"Filters of {', '.join(section.layers)} ({' vs '.join(section.recipes)})"

    def prepare(self, section: FiltersSection, ctx: RunContext, index: int) -> None:
        """The ascent requests of every (layer, recipe); where an `exemplars` section shows natural images
        of the same units, also the dataset pass's piece that gives their `exemplar_ratio`."""
        for layer, filters in layer_filters(section, ctx, index).items():
            unit = unit_options(section, ctx, index, layer)
            partner = exemplar_partner(ctx, section.model, layer)
            if partner is not None:
                ref = reference_request(section.model, partner[0], layer, section.objective, partner[1])
                if ref is not None:
                    dataset_pass.request(ctx, ref)
            for name in section.recipes:
                for req in filter_requests(
                    section, ctx, layer, units_of(section, filters), name, section.params, unit
                ):
                    ctx.ascent.request(req)

    def _grid(
        self,
        section: FiltersSection,
        ctx: RunContext,
        out: SectionOutput,
        layer: str,
        filters: list[int],
        recipe_name: str,
        index: int,
    ) -> tuple[dict[str, Any], list[Artifact]]:
        """One recipe's grid for one layer: tiles labelled with index and activation, dead ones dimmed."""
        recipe = resolve_recipe(recipe_name, section.params)
        tiles, labels, dead, rows, artifacts = [], [], [], [], []
        unit = unit_options(section, ctx, index, layer)
        per_unit = section.objective not in ("layer", "direction")
        references = self.references(section, ctx, layer)
        for req in filter_requests(
            section, ctx, layer, units_of(section, filters), recipe_name, section.params, unit
        ):
            f, v = req.filter, req.variant
            path, meta = ctx.ascent.result(req)
            stem = (
                f"{layer}_{recipe_name}_f{f:04d}"
                if per_unit
                else f"{layer}_{recipe_name}_{section.objective}"
            )
            stem += f"_v{v}" if section.diversity > 1 else ""
            rel = out.copy(f"{stem}.png", path)
            quality = {"hf_energy": meta.get("hf_energy"), "robustness": meta.get("robustness")}
            if f in references:
                quality["exemplar_ratio"] = exemplar_ratio(meta["activation"], references[f])
            variant = {"variant": v} if section.diversity > 1 else {}
            tile, mask = visual_tile(ctx, out, req, recipe_name, recipe, path, meta, stem, variant)
            if mask is not None:  # MaCo: the transparency mask as its own artifact, the tile as an overlay
                artifacts.append(mask)
            tiles.append(tile)
            mark = f" {DEAD_MARK}" if meta["dead"] else ""
            name = f"#{f}" if per_unit else section.objective
            labels.append(
                f"{name}{f'.{v}' if section.diversity > 1 else ''} {compact_number(meta['activation'])}{mark}"
            )
            dead.append(meta["dead"])
            rows.append(
                {
                    "filter": f,
                    "variant": v,
                    "activation": meta["activation"],
                    "dead": meta["dead"],
                    "path": rel,
                    "exemplar_ratio": None,
                    **quality,
                }
            )
            metrics = {
                "recipe": recipe_name,
                "activation": meta["activation"],
                "dead": meta["dead"],
                "initial_activation": meta["initial_activation"],
                "objective": section.objective,
                **quality,
            }
            if section.diversity > 1:
                metrics["variant"] = v
            artifacts.append(Artifact("filter", rel, section.model, layer, artifact_filter(req), metrics))
        # with diversity, one row per filter: its variants side by side
        columns = section.diversity if section.diversity > 1 else section.columns
        image = grid(tiles, labels, columns=columns, tile_side=128, dim=dead)
        grid_rel = out.image(f"{layer}_{recipe_name}_grid.png", np.asarray(image))
        artifacts.append(
            Artifact(
                "grid", grid_rel, section.model, layer, None, {"recipe": recipe_name, "filters": len(filters)}
            )
        )
        live = [r for r in rows if not r["dead"]]
        info = {
            "hf_energy": _median([r["hf_energy"] for r in live]),
            "robustness": _median([r["robustness"] for r in live]),
            "exemplar_ratio": _median([r["exemplar_ratio"] for r in live]),
            "recipe": recipe_name,
            "grid": grid_rel,
            "filters": rows,
            "dead": sum(dead),
            "dead_label": dead_label(recipe.pre_relu),
            "px": image.size,
        }
        return info, artifacts

    def build(
        self, section: FiltersSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm = ctx.models.get(section.model)
        layers, artifacts, findings = [], [], []
        for layer, filters in layer_filters(section, ctx, index).items():
            grids = []
            for name in section.recipes:
                g, arts = self._grid(section, ctx, out, layer, filters, name, index)
                grids.append(g)
                artifacts += arts
                alive = [r for r in g["filters"] if not r["dead"]]
                tag = f"{layer} ({name})" if len(section.recipes) > 1 else layer
                shaky = [r for r in alive if r["robustness"] is not None and r["robustness"] < NOT_ROBUST]
                if shaky:
                    names = ", ".join(
                        f"{r['filter']}" + (f".{r['variant']}" if section.diversity > 1 else "")
                        for r in shaky[:8]
                    )
                    findings.append(
                        f"{tag}: the visualisation of {len(shaky)} of {len(alive)} live units is not robust "
                        "(under small unseen shifts, zooms and rotations it keeps less than "
                        f"{NOT_ROBUST:.0%} of its activation): {names}{', ...' if len(shaky) > 8 else ''}."
                    )
                below = [
                    r for r in alive if r["exemplar_ratio"] is not None and r["exemplar_ratio"] < FAR_BELOW
                ]
                if below:
                    partner = exemplar_partner(ctx, section.model, layer)
                    dataset = partner[0] if partner else ""
                    findings.append(
                        f"{tag}: the visualisation of {len(below)} of {len(alive)} live units falls far "
                        f"below the natural exemplars of dataset {dataset!r} (less than {FAR_BELOW:.0%} of "
                        "the best image's activation): "
                        + unit_list([f"{r['filter']}" for r in below])
                        + "."
                    )
                if g["dead"]:
                    pre_relu = resolve_recipe(name, section.params).pre_relu
                    verb = "never turn positive" if pre_relu else "are dead"
                    why = "output before the ReLU at most 0" if pre_relu else "activation stays ~0"
                    findings.append(
                        f"{tag}: {g['dead']} of {len(filters)} filters {verb} ({why}); they are greyed out."
                    )
                if alive:
                    best = max(alive, key=lambda r: r["activation"])
                    med = median(r["activation"] for r in alive)
                    # against one or two others a "median" is not a typical filter: no ratio then
                    ratio = (
                        f", {best['activation'] / med:.1f}x the median"
                        if med > 0 and len(alive) >= MIN_FILTERS_FOR_RATIO
                        else ""
                    )
                    findings.append(
                        f"{tag}: filter {best['filter']} reaches the highest activation, "
                        f"{best['activation']:.3g}{ratio}."
                    )
            layers.append(
                {"name": layer, "grids": grids, "count": len(filters), "channels": lm.layer_channels(layer)}
            )
        recipes, notes = [], []
        for n in section.recipes:
            recipe = resolve_recipe(n, section.params)
            size = ascent_size(lm, recipe)
            recipes.append(
                {
                    "name": n,
                    "description": RECIPES[n].description,
                    "params": recipe.as_dict(),
                    "size": size,
                    "dead_label": dead_label(recipe.pre_relu),
                    "dead_explanation": dead_explanation(recipe.pre_relu),
                }
            )
            notes += border_notes(lm, [layer["name"] for layer in layers], recipe.border, size)
        masked = any(resolve_recipe(n, section.params).phase_only for n in section.recipes)
        lead = lead_height(
            section.title or self.default_title(section),
            findings,
            render_markdown(section.observations),
            [
                f"Recipe {r['name']}: {r['description']} Parameters: {plain_params(r['params'], r['size'])}"
                for r in recipes
            ],
            bool(section.params),
        )
        dead_caption = self.dead_caption(recipes)
        for layer in layers:  # the template's caption, as plain text, for the layout estimate
            layer["caption"] = (
                f"{layer['count']} of {layer['channels']} filters; each tile is the input that maximises the "
                "filter's mean activation (border excluded), labelled with the filter index and its final "
                f"activation; {dead_caption}."
            )
        for layer in layers:  # the line under the grids: in the template and in the layout estimate
            layer["quality"] = self.quality_line(layer["grids"], len(recipes) > 1, masked)
        for layer, cap in zip(layers, plan_grid_heights(lead, layers, len(recipes) > 1), strict=True):
            layer["max_height"] = cap
        return SectionResult(
            context={
                "layers": layers,
                "recipes": recipes,
                "overrides": dict(section.params),
                "model": section.model,
                "side_by_side": len(recipes) > 1,
            },
            artifacts=artifacts,
            findings=findings,
            notes=list(dict.fromkeys(notes)),  # recipes that share size and border share the notes
            sizes=[r["size"] for r in recipes],
        )

    def history_items(self, result: SectionResult) -> list[HistoryItem]:
        """Per filter picture: activation, robustness, dead, and the picture itself (its digest)."""
        items = []
        for a in result.artifacts:
            if a.kind != "filter":
                continue
            m = a.metrics
            unit = a.filter if a.filter is not None else m["objective"]
            variant = f".{m['variant']}" if "variant" in m else ""
            items.append(
                HistoryItem(
                    f"{a.model}/{a.layer}/{unit}{variant}/{m['recipe']}",
                    {k: m.get(k) for k in ("activation", "robustness", "dead", "recipe", "variant")}
                    | {"model": a.model, "layer": a.layer, "filter": a.filter},
                    a.path,
                )
            )
        return items

    def trend_figures(self, runs: list[Run]) -> dict[str, Series]:
        """Mean activation per layer (one line each) and the number of dead filters, per run."""
        layers = sorted({str(m.get("layer")) for run in runs for m in run.values()})
        activation = {layer: means(runs, "activation", layer) for layer in layers}
        dead = {"dead filters": [float(sum(bool(m.get("dead")) for m in run.values())) for run in runs]}
        return {"mean activation per layer": activation, "number of dead filters": dead}

    def change_metrics(self, old: dict[str, Any], new: dict[str, Any], limits: dict[str, float]) -> Change:
        """Changed: pictures that look different (SSIM below `ssim`, or the fixed network's feature distance
        above `feature`: `reportgen.history.perceptual`), or an activation that moved by more than
        `activation` of the larger magnitude (a picture can stay while the unit's response moves)."""
        a, b = old["metrics"]["activation"], new["metrics"]["activation"]
        figures: dict[str, Any] = {"activation_change": round(relative_change(a, b), 4)}
        looks = entry_pictures(old, new)
        reasons = []
        if looks is None:  # the old picture is gone: only its digest is left to compare
            figures.update(ssim=None, feature=None)
            if old["image_digest"] != new["image_digest"]:
                reasons.append("picture changed (old picture no longer on disk)")
        else:
            figures.update(looks)
            if looks["ssim"] < limits["ssim"] or looks["feature"] > limits["feature"]:
                reasons.append(f"picture SSIM {looks['ssim']:.2f}, feature distance {looks['feature']:.2f}")
        if figures["activation_change"] > limits["activation"]:
            reasons.append(f"activation {compact_number(a)} → {compact_number(b)}")
        seen = looks or {"ssim": 1.0 if not reasons else 0.0, "feature": 0.0}
        score = max(figures["activation_change"], 1.0 - seen["ssim"], seen["feature"])
        return Change(bool(reasons), "; ".join(reasons), figures, score)

    @staticmethod
    def references(section: FiltersSection, ctx: RunContext, layer: str) -> dict[int, float]:
        """Per unit that an `exemplars` section of the spec also shows: its best natural activation under
        this section's objective (the denominator of `exemplar_ratio`); empty without such a section."""
        partner = exemplar_partner(ctx, section.model, layer)
        if partner is None:
            return {}
        dataset, k, units = partner
        lm, ds = ctx.models.get(section.model), ctx.datasets.get(dataset)
        best = reference_activations(ctx, lm, ds, layer, section.objective, k)
        return {} if best is None else {f: float(best[f]) for f in units}

    @staticmethod
    def quality_line(grids: list[dict[str, Any]], side_by_side: bool, masked: bool) -> str:
        """The medians of the quality figures of a layer's grids, each with what it measures (short: the
        line is part of the layer's block, which never breaks, and counts in the page-flow estimate)."""
        parts = []
        for g in grids:
            hf = f"{g['hf_energy']:.1%}" if g.get("hf_energy") is not None else "n/a"
            rob = f"{g['robustness']:.2f}" if g.get("robustness") is not None else "n/a"
            name = f"{g['recipe']}: " if side_by_side else ""
            ratio = (
                f", {g['exemplar_ratio']:.2f}x the best natural image (units with exemplars)"
                if g.get("exemplar_ratio") is not None
                else ""
            )
            parts.append(f"{name}high-frequency energy {hf}, robustness {rob}{ratio}")
        mask = " MaCo tiles fade to white where its transparency mask is low." if masked else ""
        return (
            f"Quality, medians over live units: {'; '.join(parts)} (share of spectral power above 0.25 "
            f"cycles/px; activation kept under unseen shifts, zooms and rotations).{mask}"
        )

    @staticmethod
    def dead_caption(recipes: list[dict[str, Any]]) -> str:
        """How the grid marks dead filters, in the words that fit each recipe's objective."""
        kinds = {r["dead_label"]: r for r in recipes}
        if len(kinds) == 1:
            r = recipes[0]
            if r["dead_label"] == "dead":
                return f"dead filters (activation stays ~0) are greyed out and marked {DEAD_MARK}"
            return (
                f"filters that never turn positive are greyed out and marked {DEAD_MARK}: their output "
                "before the ReLU (the label) stays at or below 0 even at the optimum, so the ReLU "
                "silences them"
            )
        parts = "; ".join(f"{r['name']}: {r['dead_label']}, {r['dead_explanation']}" for r in recipes)
        return f"filters that stay silent are greyed out and marked {DEAD_MARK} ({parts})"


ANALYSIS = FiltersAnalysis()
