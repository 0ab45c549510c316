"""`activations`: feature maps of chosen layers for chosen images, with the top filter and sparsity per image.

All layers come from one forward pass (one multi-output extractor, compiled once per layer set) over
streamed batches. Only what the report shows leaves the compiled function: per-channel means and peaks
(small, for the top filter and sparsity over *all* channels) and the maps of the shown channels (at the
layer's own resolution, saved as .npy beside the figure, and downsampled to `map_size` for display), so a
512-channel 56x56 layer never sits in host memory whole.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
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
from reportgen.datasets import ImageItem, load_image, missing_indices, stream
from reportgen.errors import ReportgenError
from reportgen.execute import with_backoff
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
F16_MAX = float(np.finfo(np.float16).max)


def display_shape(shape: tuple[int, int], map_size: int) -> tuple[int, int]:
    """Map shape after downsampling so that the longer side is at most `map_size` (aspect kept)."""
    h, w = shape
    if max(h, w) <= map_size:
        return h, w
    scale = map_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


class ActivationProgram:
    """One compiled forward pass to all requested layers, returning only reduced statistics and the
    (downsampled) maps of the shown channels; traced once per program (`trace_count`)."""

    def __init__(
        self, model: LoadedModel, layers: Sequence[str], shown: Sequence[Sequence[int]], map_size: int
    ):
        import keras
        import tensorflow as tf

        self.model, self.layers, self.map_size = model, tuple(layers), map_size
        self.shown = [tf.constant(list(s), tf.int32) for s in shown]
        outputs = [model.layer(name).output for name in self.layers]
        self.extractor = keras.Model(model.model.inputs, outputs)
        self.trace_count = 0
        h, w = model.input_size
        spec = [tf.TensorSpec((None, h, w, model.channels), tf.float32)]
        self._run = tf.function(self._forward, input_signature=spec)

    def _forward(self, pixels: Any) -> list[Any]:
        import tensorflow as tf

        self.trace_count += 1  # runs only while tracing
        outs = self.extractor(self.model.preprocess(pixels), training=False)
        if not isinstance(outs, list | tuple):
            outs = [outs]
        results = []
        for out, idx in zip(outs, self.shown, strict=True):
            out = tf.cast(out, tf.float32)
            maps = tf.gather(out, idx, axis=3)
            shape = (int(out.shape[1]), int(out.shape[2]))
            target = display_shape(shape, self.map_size)
            if target != shape:
                maps = tf.image.resize(maps, target, method="area")
            results += [
                tf.reduce_mean(out, axis=[1, 2]),
                tf.reduce_max(tf.abs(out), axis=[1, 2]),
                maps,
                tf.constant(shape, tf.int32),
                tf.gather(out, idx, axis=3),
            ]
        return results

    def run(
        self, items: list[ImageItem], batch_size: int = 16, on_batch: Callable[[int], None] | None = None
    ) -> dict[str, np.ndarray]:
        """Arrays for the store: `index` (images that decoded) and per layer i `mean_i`, `peak_i` (N, C) over
        all channels, `maps_i` (N, h, w, shown) float16 for display, `shape_i`, the layer's own map shape,
        and `full_i` (N, H, W, shown) float32, the shown maps at that shape."""
        index, chunks = [], []
        for pixels, idx in stream(items, self.model.input_size, self.model.channels, batch_size):
            index.append(idx.numpy())
            chunks.append([t.numpy() for t in self._run(pixels)])
            if on_batch:
                on_batch(len(index[-1]))
        if not chunks:
            raise ReportgenError(f"none of the {len(items)} selected images could be decoded")
        arrays: dict[str, np.ndarray] = {"index": np.concatenate(index).astype(np.int32)}
        for i in range(len(self.layers)):
            arrays[f"mean_{i}"] = np.concatenate([c[5 * i] for c in chunks]).astype(np.float32)
            arrays[f"peak_{i}"] = np.concatenate([c[5 * i + 1] for c in chunks]).astype(np.float32)
            maps = np.concatenate([c[5 * i + 2] for c in chunks])
            arrays[f"maps_{i}"] = np.clip(maps, -F16_MAX, F16_MAX).astype(np.float16)  # display only
            arrays[f"shape_{i}"] = chunks[0][5 * i + 3].astype(np.int32)
            arrays[f"full_{i}"] = np.concatenate([c[5 * i + 4] for c in chunks]).astype(np.float32)
        return arrays


def activation_program(
    model: LoadedModel, layers: Sequence[str], shown: Sequence[Sequence[int]], map_size: int
) -> ActivationProgram:
    """Programs are kept on the model, so two sections with the same layers and channels share one trace."""
    key = ("activations", tuple(layers), tuple(tuple(s) for s in shown), map_size)
    if key not in model.extractors:
        model.extractors[key] = ActivationProgram(model, layers, shown, map_size)
    return model.extractors[key]


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
        """Check the fields (a typo fails before any pass runs) and declare the maps for the planner."""
        lm, ds, items, shown, _ = self._plan(section, ctx, index)
        key = self._key(section, lm, ds, items, shown)
        layers = tuple(section.layers)
        n = len(items)
        ctx.work.add(ImageRequest("activations", section.model, section.dataset, key, n, n, layers))

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
        key = self._key(section, lm, ds, items, shown)

        def compute() -> dict[str, np.ndarray]:
            program = activation_program(lm, section.layers, shown, section.map_size)
            label = f"activations {section.model} ({len(shown)} layers)"
            with ctx.progress.task(label, len(items)) as advance:
                return with_backoff(
                    lambda b: program.run(items, b, advance), ctx.work.batch_for(key, ctx.batch_size), label
                )

        with ctx.timed("engine: activations"):
            arrays = ctx.cached(key, compute)
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
