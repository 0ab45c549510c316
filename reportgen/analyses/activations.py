"""`activations`: feature maps of chosen layers for chosen images, with the top filter and sparsity per image.

`prepare` checks the fields and declares the maps as an `ImageRequest`; the executor computes them with
one compiled forward pass (`reportgen.engine.activation_maps`) and stores them before any section builds;
`build` reads them and draws the grids, the table and the findings.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from reportgen.analyses.base import (
    Analysis,
    Artifact,
    RunContext,
    SectionOutput,
    SectionResult,
    map_array,
)
from reportgen.datasets import ImageItem, load_image, missing_indices
from reportgen.errors import ReportgenError
from reportgen.imaging import colormap, grid, to_pil, upscale_for_print
from reportgen.models import LoadedModel
from reportgen.spec.fields import (
    FilterSelection,
    ImagesMixin,
    SectionBase,
    check_filter_selection,
    expand_filters,
)
from reportgen.store import content_key
from reportgen.work import ImageRequest


class ActivationsSection(SectionBase, ImagesMixin):
    type: Literal["activations"]
    model: str
    layers: list[str] = Field(min_length=1)
    channels: FilterSelection = "all"
    max_channels: int = Field(64, ge=1, description="Cap of maps shown per layer and image.")
    colormap: str = "viridis"
    map_size: int = Field(
        64, ge=4, description="Maps larger than this (pixels a side) are downsampled for display."
    )
    zero_tolerance: float = Field(
        1e-3,
        ge=0,
        lt=1,
        description="A channel stays ~0 for an image when its peak |activation| is at most this share of the "
        "layer's peak for that image (ReLU channels that never fire are exactly 0).",
    )

    _f = field_validator("channels")(check_filter_selection)

TABLE_ROWS = 25  # rows of the top-filter table shown in the report; the CSV has them all
TILE_SIDE = 64  # display side of one feature-map tile (nearest upscaling of small maps)
def silent_channels(peak: np.ndarray, tolerance: float) -> np.ndarray:
    """Channels whose peak |activation| for the image is at most `tolerance` x the layer's largest peak."""
    top = float(peak.max()) if peak.size else 0.0
    return peak <= tolerance * top


def shown_channels(
    section: ActivationsSection, ctx: RunContext, index: int, lm: LoadedModel
) -> tuple[list[list[int]], list[str]]:
    """Channels shown per layer (selection, capped at max_channels) and notes on what was left out."""
    shown, notes = [], []
    for j, name in enumerate(section.layers):
        layer = lm.layer(name, ctx.where(index, "layers", j))
        shape = layer.output.shape
        if len(shape) != 4:
            raise ReportgenError(
                f"{ctx.where(index, 'layers', j)}: layer {name!r} outputs shape {tuple(shape)}, not "
                "feature maps (batch, height, width, channels); choose a convolutional or pooling layer"
            )
        channels = int(shape[-1])
        wanted = expand_filters(section.channels, channels)
        valid = [c for c in wanted if c < channels]
        if len(valid) < len(wanted):
            notes.append(
                f"{name}: channels {sorted(set(wanted) - set(valid))} do not exist "
                f"(the layer has {channels}); left out."
            )
        if not valid:
            raise ReportgenError(
                f"{ctx.where(index, 'channels')}: none of the selected channels exist in "
                f"layer {name!r} ({channels} channels); choose indices below {channels}"
            )
        if len(valid) > section.max_channels:
            notes.append(
                f"{name}: {len(valid)} channels selected, the first {section.max_channels} shown "
                "(max_channels); the top filter and sparsity still cover all "
                f"{channels} channels."
            )
            valid = valid[: section.max_channels]
        shown.append(valid)
    return shown, notes


def _check_colormap(name: str, where: str) -> None:
    from matplotlib import colormaps

    if name not in colormaps:
        import difflib

        close = difflib.get_close_matches(name, list(colormaps), n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "e.g. viridis, magma, gray"
        raise ReportgenError(f"{where}: unknown matplotlib colormap {name!r}; {hint}")


class ActivationsAnalysis(Analysis):
    section = ActivationsSection
    filter_selection = ("channels", "layers")
    version = "2"  # 2: the shown maps at the layer's own resolution are stored too

    def default_title(self, section: ActivationsSection) -> str:
        return f"Feature maps of {', '.join(section.layers)}"

    def _plan(
        self, section: ActivationsSection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, Any, list[ImageItem], list[list[int]], list[str]]:
        """Model, dataset, images and shown channels, with located errors for every bad field."""
        _check_colormap(section.colormap, ctx.where(index, "colormap"))
        lm = ctx.models.get(section.model)
        ds = ctx.datasets.get(section.dataset)
        items = ds.select(
            section.images, section.limit, ctx.where(index, "images" if section.images else "dataset")
        )
        shown, notes = shown_channels(section, ctx, index, lm)
        return lm, ds, items, shown, notes

    def prepare(self, section: ActivationsSection, ctx: RunContext, index: int) -> None:
        """Check the fields (a typo fails before any pass runs) and declare the maps: the executor computes
        them (`reportgen.engine.activation_maps`) before any section builds."""
        lm, ds, items, shown, _ = self._plan(section, ctx, index)
        key = self._key(section, lm, ds, items, shown)
        layers = tuple(section.layers)
        n = len(items)
        names = tuple(it.name for it in items)
        params = (("shown", tuple(tuple(s) for s in shown)), ("map_size", section.map_size))
        ctx.work.add(
            ImageRequest(
                "activations", section.model, section.dataset, key, n, n, layers,
                engine="activation_maps", names=names, params=params,
            )  # fmt: skip
        )

    def _key(
        self,
        section: ActivationsSection,
        lm: LoadedModel,
        ds: Any,
        items: list[ImageItem],
        shown: list[list[int]],
    ) -> str:
        """The content key of the section's maps: everything that changes them."""
        return content_key(
            "activations",
            self.version,
            lm.digest,
            lm.preprocessing.model_dump(),
            ds.digest,
            [it.name for it in items],
            list(section.layers),
            shown,
            section.map_size,
            lm.input_size,
        )

    def build(
        self, section: ActivationsSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        lm, ds, items, shown, notes = self._plan(section, ctx, index)
        arrays = ctx.result(self._key(section, lm, ds, items, shown), "activations")
        found = [int(i) for i in arrays["index"]]
        missing = missing_indices(len(items), found)
        if missing:
            notes.append(
                f"{len(missing)} image(s) could not be decoded and are left out: "
                + ", ".join(items[i].name for i in missing[:10])
            )

        thumbs, artifacts = {}, []
        for n, i in enumerate(found):
            thumb = upscale_for_print(to_pil(load_image(items[i].path, lm.input_size, lm.channels)), 96)
            thumbs[i] = out.image(f"input_{n:03d}.png", np.asarray(thumb))
            artifacts.append(
                Artifact("image", thumbs[i], section.model, None, None, {"image": items[i].name})
            )

        layers, rows, findings = [], [], []
        for li, name in enumerate(section.layers):
            mean, peak, maps = (
                arrays[f"mean_{li}"],
                arrays[f"peak_{li}"],
                arrays[f"maps_{li}"].astype(np.float32),
            )
            shape = tuple(int(v) for v in arrays[f"shape_{li}"])
            channels = mean.shape[1]
            if maps.shape[1:3] != shape:
                notes.append(
                    f"{name}: {shape[0]}x{shape[1]} maps are shown downsampled to "
                    f"{maps.shape[1]}x{maps.shape[2]} (area average; map_size {section.map_size})."
                )
            entries, shares, tops = [], [], []
            for n, i in enumerate(found):
                silent = silent_channels(peak[n], section.zero_tolerance)
                top = int(np.argmax(mean[n]))
                share = float(silent.mean())
                shares.append(share)
                tops.append(top)
                tiles_vals = maps[n]
                lo, hi = min(0.0, float(tiles_vals.min())), float(tiles_vals.max())
                tiles = [
                    colormap(tiles_vals[..., k], section.colormap, lo, hi)
                    for k in range(tiles_vals.shape[-1])
                ]
                labels = [f"#{c}" for c in shown[li]]
                image = grid(
                    tiles,
                    labels,
                    columns=math.ceil(math.sqrt(len(tiles))),
                    tile_side=TILE_SIDE,
                    dim=[bool(silent[c]) for c in shown[li]],
                )
                rel = out.image(f"{name}_{n:03d}.png", np.asarray(image))
                metrics = {
                    "image": items[i].name,
                    "top_filter": top,
                    "top_mean": float(mean[n, top]),
                    "silent_share": share,
                    "shown_channels": len(shown[li]),
                }
                artifacts.append(Artifact("grid", rel, section.model, name, None, metrics))
                artifacts += self._arrays(
                    out, section, lm, name, n, items[i].name, arrays[f"full_{li}"][n], shown[li]
                )
                row = {
                    "image": items[i].name,
                    "layer": name,
                    "top_filter": top,
                    "mean_activation": float(mean[n, top]),
                    "silent": int(silent.sum()),
                    "channels": channels,
                    "silent_pct": 100.0 * share,
                }
                rows.append(row)
                entries.append({**row, "grid": rel, "thumb": thumbs[i], "scale": (lo, hi)})
            layers.append(
                {
                    "name": name,
                    "channels": channels,
                    "shown": len(shown[li]),
                    "shape": shape,
                    "display": tuple(maps.shape[1:3]),
                    "images": entries,
                }
            )
            findings += self._layer_findings(name, [items[i].name for i in found], shares, tops)

        csv_rel = out.csv("activations.csv", rows, None if rows else ["image"])
        artifacts.append(Artifact("table", csv_rel, section.model, None, None, {"rows": len(rows)}))
        if len(rows) > TABLE_ROWS:
            notes.append(f"The table shows {TABLE_ROWS} of {len(rows)} rows; all are in activations.csv.")
        return SectionResult(
            context={
                "model": section.model,
                "dataset": section.dataset,
                "colormap": section.colormap,
                "tolerance": section.zero_tolerance,
                "layers": layers,
                "table": rows[:TABLE_ROWS],
                "rows": len(rows),
                "csv": csv_rel,
            },
            artifacts=artifacts,
            findings=findings,
            notes=notes,
        )

    @staticmethod
    def _arrays(
        out: SectionOutput,
        section: ActivationsSection,
        lm: LoadedModel,
        layer: str,
        n: int,
        image: str,
        full: np.ndarray,
        channels: list[int],
    ) -> list[Artifact]:
        """The shown channels' maps (height, width, channel) as the layer computed them, and bilinearly
        resized to the model's input (as Grad-CAM is), so a map can be laid over the input pixel by pixel."""
        import tensorflow as tf

        at_input = tf.image.resize(full[None], lm.input_size, method="bilinear")[0].numpy()
        return [
            map_array(
                out,
                f"{layer}_{n:03d}_{resolution}.npy",
                values,
                resolution,
                section.model,
                layer,
                image,
                "activations",
                channels=channels,
            )
            for resolution, values in (("layer", full), ("input", at_input))
        ]

    @staticmethod
    def _layer_findings(layer: str, names: list[str], shares: list[float], tops: list[int]) -> list[str]:
        """The sparsest image of the layer, and a filter that is the top one for several images."""
        out = []
        if shares and max(shares) > 0:
            n = int(np.argmax(shares))
            avg = (
                f" (mean over {len(shares)} images: {100 * np.mean(shares):.0f}%)" if len(shares) > 1 else ""
            )
            out.append(f"{layer}: {100 * shares[n]:.0f}% of channels stay at 0 for {names[n]}{avg}.")
        if len(tops) > 1:
            filt, count = Counter(tops).most_common(1)[0]
            if count > 1:
                out.append(f"{layer}: filter {filt} fires most for {count} of {len(tops)} images.")
        return out


ANALYSIS = ActivationsAnalysis()
