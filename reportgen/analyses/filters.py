"""`filters`: activation-maximization grids for chosen layers (the classic Keras example and regularised),
optionally with several recipes side by side."""

from __future__ import annotations

from statistics import median
from typing import Any

import numpy as np
from PIL import Image

from reportgen.analyses.base import Analysis, Artifact, RunContext, SectionOutput, SectionResult
from reportgen.engine.recipes import RECIPES, resolve_recipe
from reportgen.engine.scheduler import AscentRequest
from reportgen.errors import ReportgenError
from reportgen.imaging import grid
from reportgen.spec.schema import FiltersSection, expand_filters


def filter_requests(
    section: Any, ctx: RunContext, layer: str, filters: list[int], recipe_name: str, params: dict[str, Any]
) -> list[AscentRequest]:
    """Ascent requests for filters of one layer; shared with `circuit`, which visualises input channels."""
    recipe = resolve_recipe(recipe_name, params)
    return [AscentRequest(section.model, layer, f, recipe, ctx.spec.seed) for f in filters]


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


class FiltersAnalysis(Analysis):
    type = "filters"

    def default_title(self, section: FiltersSection) -> str:
        return f"Filters of {', '.join(section.layers)} ({' vs '.join(section.recipes)})"

    def prepare(self, section: FiltersSection, ctx: RunContext, index: int) -> None:
        for layer, filters in layer_filters(section, ctx, index).items():
            for name in section.recipes:
                for req in filter_requests(section, ctx, layer, filters, name, section.params):
                    ctx.ascent.request(req)

    def _grid(
        self,
        section: FiltersSection,
        ctx: RunContext,
        out: SectionOutput,
        layer: str,
        filters: list[int],
        recipe_name: str,
    ) -> tuple[dict[str, Any], list[Artifact]]:
        """One recipe's grid for one layer: tiles labelled with index and activation, dead ones dimmed."""
        recipe = resolve_recipe(recipe_name, section.params)
        tiles, labels, dead, rows, artifacts = [], [], [], [], []
        for f in filters:
            path, meta = ctx.ascent.result(AscentRequest(section.model, layer, f, recipe, ctx.spec.seed))
            rel = out.copy(f"{layer}_{recipe_name}_f{f:04d}.png", path)
            tiles.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(f"#{f} {meta['activation']:.3g}" + (" dead" if meta["dead"] else ""))
            dead.append(meta["dead"])
            rows.append({"filter": f, "activation": meta["activation"], "dead": meta["dead"], "path": rel})
            artifacts.append(
                Artifact(
                    "filter",
                    rel,
                    section.model,
                    layer,
                    f,
                    {
                        "recipe": recipe_name,
                        "activation": meta["activation"],
                        "dead": meta["dead"],
                        "initial_activation": meta["initial_activation"],
                    },
                )
            )
        image = grid(tiles, labels, columns=section.columns, tile_side=128, dim=dead)
        grid_rel = out.image(f"{layer}_{recipe_name}_grid.png", np.asarray(image))
        artifacts.append(
            Artifact(
                "grid", grid_rel, section.model, layer, None, {"recipe": recipe_name, "filters": len(filters)}
            )
        )
        return {"recipe": recipe_name, "grid": grid_rel, "filters": rows, "dead": sum(dead)}, artifacts

    def build(
        self, section: FiltersSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm = ctx.models.get(section.model)
        layers, artifacts, findings = [], [], []
        for layer, filters in layer_filters(section, ctx, index).items():
            grids = []
            for name in section.recipes:
                g, arts = self._grid(section, ctx, out, layer, filters, name)
                grids.append(g)
                artifacts += arts
                alive = [r for r in g["filters"] if not r["dead"]]
                tag = f"{layer} ({name})" if len(section.recipes) > 1 else layer
                if g["dead"]:
                    findings.append(
                        f"{tag}: {g['dead']} of {len(filters)} filters are dead (activation stays "
                        "~0); they are greyed out."
                    )
                if alive:
                    best = max(alive, key=lambda r: r["activation"])
                    med = median(r["activation"] for r in alive)
                    ratio = f", {best['activation'] / med:.1f}x the median" if med > 0 else ""
                    findings.append(
                        f"{tag}: filter {best['filter']} reaches the highest activation, "
                        f"{best['activation']:.3g}{ratio}."
                    )
            layers.append(
                {"name": layer, "grids": grids, "count": len(filters), "channels": lm.layer_channels(layer)}
            )
        recipes = [
            {
                "name": n,
                "description": RECIPES[n].description,
                "params": resolve_recipe(n, section.params).as_dict(),
            }
            for n in section.recipes
        ]
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
        )


ANALYSIS = FiltersAnalysis()
