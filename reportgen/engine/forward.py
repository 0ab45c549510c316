"""Batched forward passes over image lists: every channel of every requested layer in one streamed pass.

Analyses that rank classes or images by a filter need one number per (image, channel): the spatial
mean of the channel's map. One multi-output extractor `keras.Model(inputs, [layer outputs..., model
output])` runs inside a `tf.function` with a fixed input signature, so the graph is traced once per
(model, layers, input size) and reused for every batch and every section; the maps are reduced to
channel means on the device, batch by batch, so full activation maps never accumulate on the host.
Images stream through `datasets.stream` (parallel decode/resize, prefetch); files that fail to decode
never arrive and are reported by index. Bottom-k statistics read a ReLU layer's output before its ReLU:
the extractor is then built on the model's graph with that ReLU split off (`relu_split`), so the one
convolution gives both the pre-activation and the activation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from reportgen.datasets import ImageItem, missing_indices, stream
from reportgen.errors import ReportgenError
from reportgen.models import LoadedModel

BATCH_SIZE = 8
# A model output is taken as a probability vector when every row is >= 0 and sums to 1 within this.
PROBABILITY_TOLERANCE = 1e-3


@dataclass
class ForwardResult:
    """Rows follow the order of the items; rows of files that failed to decode are NaN."""

    means: dict[str, np.ndarray]  # layer -> (N, C) float32 spatial mean of each channel
    outputs: np.ndarray | None  # (N, K) float32 model outputs as the model returns them, if requested
    missing: list[int]  # indices of items that could not be decoded
    # (stat, layer) -> (values, y, x), each (N, C): every image's peak of each channel and where it is
    # ("topk": the maximum of the output, "bottomk": the minimum of the output before a fused ReLU)
    peaks: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


def channel_means(tensor: tf.Tensor) -> tf.Tensor:
    """(B, ..., C) -> (B, C): mean over every axis between batch and channels (H, W for conv maps)."""
    axes = list(range(1, len(tensor.shape) - 1))
    return tf.reduce_mean(tensor, axis=axes) if axes else tensor


def peak_positions(tensor: tf.Tensor, largest: bool) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(B, H, W, C) -> (B, C) peak value, y and x of each channel's peak (the first one on ties)."""
    width = tf.shape(tensor)[2]
    flat = tf.reshape(tensor, (tf.shape(tensor)[0], -1, tensor.shape[-1]))
    if largest:
        value, where = tf.reduce_max(flat, axis=1), tf.argmax(flat, axis=1, output_type=tf.int32)
    else:
        value, where = tf.reduce_min(flat, axis=1), tf.argmin(flat, axis=1, output_type=tf.int32)
    return value, where // width, where % width


def fused_relu(layer: Any) -> bool:
    """Whether the layer applies a ReLU as its own activation (a Conv2D/Dense with `activation="relu"`)."""
    return getattr(getattr(layer, "activation", None), "__name__", "") == "relu"


def linear_twin(layer: Any) -> Any:
    """A copy of a layer with a linear activation and the same weights: its output is the layer's before
    the fused activation."""
    config = dict(layer.get_config(), activation="linear", name=f"{layer.name}_pre_relu")
    twin = type(layer).from_config(config)
    twin.build(layer.input.shape)
    twin.set_weights(layer.get_weights())
    return twin


def pre_relu_output(layer: Any) -> Any:
    """The layer's symbolic output before a fused ReLU (its own output when it has none): the most
    negative responses, which a ReLU flattens to 0, are what bottom-k exemplars show. Computed by a second
    convolution on the layer's input; `relu_split` avoids it where the model's graph can be rebuilt."""
    return linear_twin(layer)(layer.input) if fused_relu(layer) else layer.output


@dataclass
class SplitGraph:
    """The model's graph rebuilt with some layers' fused ReLU split off (`relu_split`)."""

    inputs: list[Any]
    outputs: list[Any]  # the model's outputs
    layers: dict[str, Any]  # every layer's symbolic output (after its ReLU)
    pre: dict[str, Any]  # each split layer's output before its ReLU


def relu_split(model: Any, names: set[str]) -> SplitGraph | None:
    """The model's graph with each named layer (all with a fused ReLU) computed as its linear twin followed
    by a ReLU, so one convolution gives both the pre-activation (bottom-k) and the activation, which is
    relu(pre) exactly, for the layer itself and for every layer after it. The other layers are the model's
    own (shared weights). None where Keras cannot rebuild the graph (Sequential or subclassed models)."""
    import keras

    layers: dict[str, Any] = {}
    pre: dict[str, Any] = {}

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer.name in names and layer.name not in pre:  # a shared layer: its first call is its output
            pre[layer.name] = linear_twin(layer)(*args, **kwargs)
            relu = keras.layers.Activation("relu", name=f"{layer.name}_split_relu", dtype=layer.dtype_policy)
            out = relu(pre[layer.name])
        else:
            out = layer(*args, **kwargs)
        layers.setdefault(layer.name, out)
        return out

    try:
        clone = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    except ValueError:
        return None
    if not names <= pre.keys():
        return None
    return SplitGraph(list(clone.inputs), list(clone.outputs), layers, pre)


def class_count(model: LoadedModel) -> int:
    """Number of classes of a classifier; a clear error for models without one (batch, classes) output."""
    outs = model.model.outputs
    if len(outs) != 1 or len(outs[0].shape) != 2:
        shapes = ", ".join(str(tuple(o.shape)) for o in outs)
        raise ReportgenError(
            f"model {model.key!r} returns {shapes}, not one (batch, classes) vector; class scores need "
            "a classifier (for keras_app models set `include_top: true`)"
        )
    return int(outs[0].shape[-1])


class ForwardProgram:
    """The compiled pass for one model, layer set and optional class output, traced once."""

    def __init__(
        self,
        model: LoadedModel,
        layers: Sequence[str],
        with_outputs: bool,
        peaks: Sequence[tuple[str, str]] = (),
    ):
        import keras

        self.model, self.layers, self.with_outputs = model, tuple(layers), with_outputs
        self.peaks = tuple(peaks)
        # bottom-k reads the output before a fused ReLU: one convolution for it and the activation where
        # the graph can be rebuilt with the ReLU split off, a second convolution otherwise
        split = {name for stat, name in self.peaks if stat == "bottomk" and fused_relu(model.layer(name))}
        graph = relu_split(model.model, split) if split else None
        inputs = graph.inputs if graph else model.model.inputs

        def output(name: str, stat: str = "topk") -> Any:
            if graph:
                return graph.pre[name] if stat == "bottomk" and name in split else graph.layers[name]
            return model.layer(name).output if stat == "topk" else pre_relu_output(model.layer(name))

        outputs = [output(name) for name in self.layers]
        if with_outputs:
            class_count(model)
            outputs.append(graph.outputs[0] if graph else model.model.outputs[0])
        outputs += [output(name, stat) for stat, name in self.peaks]
        if not outputs:
            raise ValueError("a forward pass needs at least one layer or the model output")
        self.extractor = keras.Model(inputs, outputs)
        self.size = model.input_size
        self.trace_count = 0
        spec = [tf.TensorSpec((None, *self.size, model.channels), tf.float32)]
        self._run = tf.function(self._forward, input_signature=spec)

    def _forward(self, pixels: tf.Tensor) -> list[tf.Tensor]:
        self.trace_count += 1  # runs only while tracing
        outs = self.extractor(self.model.preprocess(pixels), training=False)
        if not isinstance(outs, list | tuple):
            outs = [outs]
        n_layers, n_peaks = len(self.layers), len(self.peaks)
        reduced = [tf.cast(channel_means(o), tf.float32) for o in outs[:n_layers]]
        heads = [tf.cast(o, tf.float32) for o in outs[n_layers : len(outs) - n_peaks]]
        peaks = []
        for (stat, _), o in zip(self.peaks, outs[len(outs) - n_peaks :], strict=True):
            peaks += peak_positions(tf.cast(o, tf.float32), stat == "topk")
        return reduced + heads + peaks

    def run(
        self,
        items: Sequence[ImageItem],
        batch_size: int = BATCH_SIZE,
        on_batch: Callable[[int], None] | None = None,
    ) -> ForwardResult:
        """Stream the items once; write each batch's reduced results into preallocated rows."""
        n = len(items)
        width = [int(self.model.layer(name).output.shape[-1]) for name in self.layers]
        if self.with_outputs:
            width.append(class_count(self.model))
        rows = [np.full((n, w), np.nan, np.float32) for w in width]
        for _, name in self.peaks:
            c = int(self.model.layer(name).output.shape[-1])
            rows += [np.full((n, c), np.nan, np.float32), *(np.zeros((n, c), np.int32) for _ in "yx")]
        seen: list[np.ndarray] = []
        batches = stream(list(items), self.size, self.model.channels, batch_size) if n else []
        for pixels, index in batches:
            idx = index.numpy()
            for target, value in zip(rows, self._run(pixels), strict=True):
                target[idx] = value.numpy()
            seen.append(idx)
            if on_batch:
                on_batch(len(idx))
        missing = missing_indices(n, np.concatenate(seen) if seen else [])
        if on_batch and missing:
            on_batch(len(missing))
        means = dict(zip(self.layers, rows[: len(self.layers)], strict=True))
        outputs = rows[len(self.layers)] if self.with_outputs else None
        peaks = {}
        for i, peak in enumerate(self.peaks):
            value, y, x = rows[len(width) + 3 * i : len(width) + 3 * i + 3]
            peaks[peak] = (value, y, x)
        return ForwardResult(means, outputs, missing, peaks)


def program_for(
    model: LoadedModel,
    layers: Sequence[str],
    with_outputs: bool = False,
    peaks: Sequence[tuple[str, str]] = (),
) -> ForwardProgram:
    """Programs are cached on the model, so sections over the same layers share one trace; the input size
    is part of the key because the traced signature fixes it."""
    key = ("forward", tuple(layers), with_outputs, tuple(peaks), model.input_size)
    if key not in model.extractors:
        model.extractors[key] = ForwardProgram(model, layers, with_outputs, peaks)
    return model.extractors[key]


def forward(
    model: LoadedModel,
    items: Sequence[ImageItem],
    layers: Sequence[str],
    *,
    outputs: bool = False,
    batch_size: int = BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    peaks: Sequence[tuple[str, str]] = (),
) -> ForwardResult:
    """Channel means of all channels of `layers` (and the model outputs, and each image's channel peaks
    of the (stat, layer) pairs in `peaks`) for every item, in one pass."""
    return program_for(model, layers, outputs, peaks).run(items, batch_size, on_batch)


def to_probabilities(scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """Model outputs -> class probabilities, and whether softmax had to be applied.

    Outputs are probabilities already when every (decoded) row is non-negative and sums to 1: checking
    the values, not the last layer's type, also covers softmax in a Lambda or a custom layer. Otherwise
    they are logits and get a (numerically stable) softmax. NaN rows (undecodable files) stay NaN.
    """
    s = np.asarray(scores, np.float64)
    valid = s[~np.isnan(s).any(axis=1)]
    sums_to_one = np.allclose(valid.sum(axis=1), 1.0, atol=PROBABILITY_TOLERANCE)
    if not len(valid) or (valid >= 0).all() and sums_to_one:
        return s.astype(np.float32), False
    shifted = np.exp(s - s.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32), True
