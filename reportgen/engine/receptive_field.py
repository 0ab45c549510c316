"""Receptive fields from the layer graph: which model-input pixels a unit at (y, x) of a layer sees.

Each axis is described by (jump, offset, size): the unit at map position i sees input pixels
[i * jump + offset, i * jump + offset + size). A convolution or pooling layer with effective kernel
k = dilation * (kernel - 1) + 1, stride s and leading padding p maps a unit of its output to inputs
[i*s - p, i*s - p + k) of its own input, so composing it with the field of its input gives
jump' = s * jump, offset' = offset - p * jump, size' = size + (k - 1) * jump. Layers that keep positions
(activations, normalisation, adds, concatenations, rescaling) pass the field through; a layer with
several inputs (a residual add) takes the union of their fields. Layers that move positions in other ways
(upsampling, reshapes, dense layers over maps) have no box and are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from reportgen.errors import ReportgenError


@dataclass(frozen=True)
class Axis:
    """The field along one axis: unit i sees [i * jump + offset, i * jump + offset + size)."""

    jump: int
    offset: int
    size: int


@dataclass(frozen=True)
class Field:
    """The field of one layer's units, along height and width."""

    y: Axis
    x: Axis

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[x0, y0, x1, y1) of the unit at (y, x) in model-input pixels, clamped to height x width."""
        y0, x0 = y * self.y.jump + self.y.offset, x * self.x.jump + self.x.offset
        return (max(x0, 0), max(y0, 0), min(x0 + self.x.size, width), min(y0 + self.y.size, height))


IDENTITY = Axis(1, 0, 1)
# layers that move spatial positions in a way no box describes
_REFUSED = ("UpSampling", "Reshape", "Flatten", "Dense", "Transpose", "Global", "Resizing", "Permute")


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _same_pad(n: int, k: int, s: int) -> int:
    """Leading padding of TensorFlow's "same": the total is split with the extra pixel at the end."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2


def _windowed(layer: Any, inp: Axis, n: int, axis: int) -> tuple[Axis, int]:
    """A convolution or pooling window along `axis` (0: height, 1: width) over a map of `n` pixels."""
    kernel = _pair(getattr(layer, "kernel_size", None) or layer.pool_size)[axis]
    stride = _pair(getattr(layer, "strides", None) or kernel)[axis]
    dilation = _pair(getattr(layer, "dilation_rate", 1))[axis]
    k = dilation * (kernel - 1) + 1
    if str(getattr(layer, "padding", "valid")).lower() == "same":
        pad, out = _same_pad(n, k, stride), math.ceil(n / stride)
    else:
        pad, out = 0, (n - k) // stride + 1
    return Axis(inp.jump * stride, inp.offset - pad * inp.jump, inp.size + (k - 1) * inp.jump), out


def _layer_axis(layer: Any, inp: Axis, n: int, axis: int) -> tuple[Axis, int]:
    """The field of `layer`'s units along `axis` and its map's length there, from its input's."""
    name = type(layer).__name__
    if hasattr(layer, "kernel_size") or hasattr(layer, "pool_size"):
        if "Global" in name or "Transpose" in name:
            raise ReportgenError(f"layer {layer.name!r} ({name}) has no receptive-field box")
        return _windowed(layer, inp, n, axis)
    if name == "ZeroPadding2D":
        lead, tail = (int(v) for v in layer.padding[axis])
        return Axis(inp.jump, inp.offset - lead * inp.jump, inp.size), n + lead + tail
    if name == "Cropping2D":
        lead, tail = (int(v) for v in layer.cropping[axis])
        return Axis(inp.jump, inp.offset + lead * inp.jump, inp.size), n - lead - tail
    if any(word in name for word in _REFUSED) or hasattr(layer, "layers"):
        raise ReportgenError(
            f"layer {layer.name!r} ({name}) moves positions in a way a receptive-field box cannot follow; "
            "choose a layer before it"
        )
    return inp, n


def _inbound(layer: Any) -> list[Any]:
    """The layers whose outputs feed `layer` (Keras 3 nodes)."""
    parents = []
    for node in getattr(layer, "_inbound_nodes", [])[:1]:
        for tensor in node.input_tensors:
            parents.append(tensor._keras_history.operation)
    return parents


def receptive_field(model: Any, layer_name: str, input_size: tuple[int, int] | None = None) -> Field:
    """The receptive field of the units of `layer_name` in `model` (a functional keras.Model) whose input
    is `input_size` (height, width; default the model's own). Map sizes are followed from the input,
    because "same" padding before a strided window depends on them (and a model with a free input size
    has none in its graph)."""
    size = input_size or tuple(int(d) for d in model.input_shape[1:3])
    memo: dict[int, tuple[tuple[Axis, int], tuple[Axis, int]]] = {}

    def walk(layer: Any) -> tuple[tuple[Axis, int], tuple[Axis, int]]:
        if id(layer) in memo:
            return memo[id(layer)]
        parents = _inbound(layer)
        if not parents:  # the input layer
            result = ((IDENTITY, int(size[0])), (IDENTITY, int(size[1])))
        else:
            ins = [walk(p) for p in parents]
            merged = []
            for axis in (0, 1):
                axes = [fields[axis][0] for fields in ins]
                start = min(a.offset for a in axes)
                end = max(a.offset + a.size for a in axes)
                union = Axis(max(a.jump for a in axes), start, end - start)
                merged.append(_layer_axis(layer, union, max(fields[axis][1] for fields in ins), axis))
            result = (merged[0], merged[1])
        memo[id(layer)] = result
        return result

    (y, _), (x, _) = walk(model.get_layer(layer_name))
    return Field(y, x)


def source_box(
    box: tuple[int, int, int, int], input_size: tuple[int, int], source_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A [x0, y0, x1, y1) box in model-input pixels (input_size: height, width) -> the same region of the
    source image (source_size: width, height). The loader resizes the whole image to the input size
    without keeping its aspect, so each axis scales by its own factor; the box grows outward to whole
    pixels and stays inside the image."""
    h_in, w_in = input_size
    w_src, h_src = source_size
    sx, sy = w_src / w_in, h_src / h_in
    x0, y0, x1, y1 = box
    return (
        max(0, math.floor(x0 * sx)),
        max(0, math.floor(y0 * sy)),
        min(w_src, max(math.ceil(x1 * sx), math.floor(x0 * sx) + 1)),
        min(h_src, max(math.ceil(y1 * sy), math.floor(y0 * sy) + 1)),
    )
