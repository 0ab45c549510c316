"""Activation maps: one compiled forward pass from chosen images to chosen layers, returning only what a
report shows (the `activations` section's work, run by the executor, `reportgen.execute`).

All layers come from one multi-output extractor, compiled once per (layers, shown channels, map size)
and kept on the model, over streamed batches. Only reduced statistics leave the compiled function:
per-channel means and peaks (small, for the top filter and sparsity over *all* channels) and the maps of
the shown channels (at the layer's own resolution, and downsampled to `map_size` for display), so a
512-channel 56x56 layer never sits in host memory whole. TensorFlow is imported where a program is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reportgen.datasets import ImageItem, stream
from reportgen.errors import NothingDecodedError
from reportgen.models import LoadedModel

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
            raise NothingDecodedError(f"none of the {len(items)} selected images could be decoded")
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
