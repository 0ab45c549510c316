"""`filters`: activation-maximization grids for chosen layers (the classic Keras example and regularised)."""

from __future__ import annotations

from statistics import median
from typing import Any

import numpy as np
from PIL import Image

from reportgen.analyses.base import Analysis, Artifact, RunContext, SectionOutput, SectionResult
from reportgen.engine.recipes import RECIPES, resolve_recipe
from reportgen.engine.scheduler import AscentRequest
from reportgen.imaging import grid
from reportgen.spec.schema import FiltersSection, expand_filters



def filter_requests(section: Any, ctx: RunContext, index: int, layer: str, filters: list[int],
                    recipe_name: str, params: dict[str, Any]) -> list[AscentRequest]:
    """Ascent requests for filters of one layer; shared with `circuit`, which visualises input channels."""
    recipe = resolve_recipe(recipe_name, params)
    return [AscentRequest(section.model, layer, f, recipe, ctx.spec.seed) for f in filters]


def layer_filters(section: FiltersSection, ctx: RunContext, index: int) -> dict[str, list[int]]:
    lm = ctx.models.get(section.model)
    out = {}
    for j, layer in enumerate(section.layers):
        channels = int(lm.layer(layer, ctx.where(index, "layers", j)).output.shape[-1])
        chosen = [f for f in expand_filters(section.filters, channels) if f < channels]
        out[layer] = chosen
    return out


class FiltersAnalysis(Analysis):
    type = "filters"

    def default_title(self, section: FiltersSection) -> str:
        return f"Filters of {', '.join(section.layers)} ({section.recipe})"

    def prepare(self, section: FiltersSection, ctx: RunContext, index: int) -> None:
        for layer, filters in layer_filters(section, ctx, index).items():
            for req in filter_requests(section, ctx, index, layer, filters, section.recipe, section.params):
                ctx.ascent.request(req)

    def build(self, section: FiltersSection, ctx: RunContext, out: SectionOutput, index: int) -> SectionResult:
        recipe = resolve_recipe(section.recipe, section.params)
        layers, artifacts, findings = [], [], []
        for layer, filters in layer_filters(section, ctx, index).items():
            tiles, labels, dead, rows = [], [], [], []
            for f in filters:
                path, meta = ctx.ascent.result(AscentRequest(section.model, layer, f, recipe, ctx.spec.seed))
                rel = out.copy(f"{layer}_f{f:04d}.png", path)
                tiles.append(Image.open(path).convert("RGB"))
                labels.append(f"#{f} {meta['activation']:.3g}" + (" dead" if meta["dead"] else ""))
                dead.append(meta["dead"])
                rows.append({"filter": f, "activation": meta["activation"], "dead": meta["dead"], "path": rel})
                artifacts.append(Artifact("filter", rel, section.model, layer, f,
                                          {"activation": meta["activation"], "dead": meta["dead"],
                                           "initial_activation": meta["initial_activation"]}))
            image = grid([np.asarray(t) for t in tiles], labels, columns=section.columns, tile_side=128, dim=dead)
            grid_rel = out.image(f"{layer}_grid.png", np.asarray(image))
            artifacts.append(Artifact("grid", grid_rel, section.model, layer, None, {"filters": len(filters)}))
            n_dead = sum(dead)
            alive = [r for r in rows if not r["dead"]]
            if n_dead:
                findings.append(f"{layer}: {n_dead} of {len(filters)} filters are dead (activation stays ~0); "
                                "they are greyed out.")
            if alive:
                best = max(alive, key=lambda r: r["activation"])
                med = median(r["activation"] for r in alive)
                ratio = f", {best['activation'] / med:.1f}x the median" if med > 0 else ""
                findings.append(f"{layer}: filter {best['filter']} reaches the highest activation, "
                                f"{best['activation']:.3g}{ratio}.")
            layers.append({"name": layer, "grid": grid_rel, "filters": rows, "dead": n_dead,
                           "channels": ctx.models.get(section.model).layer_channels(layer)})
        return SectionResult(
            context={"layers": layers, "recipe": section.recipe, "recipe_description": RECIPES[section.recipe].description,
                     "params": recipe.as_dict(), "overrides": dict(section.params), "model": section.model},
            artifacts=artifacts,
            findings=findings,
        )


ANALYSIS = FiltersAnalysis()
