"""Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps", sec. 3.1).

The weights of the model's parameterised layers are re-drawn one layer at a time from the output down: step
1 randomises the top layer, step k the top k layers. An explanation method that still draws nearly the same
map after the model has lost what it learned is explaining the input (edges, colour), not the model.

The work happens on a CLONE of the user's model (`keras.models.clone_model` plus a copy of its weights);
the user's model is never touched. The clone's variables are re-assigned in place step after step, so a
compiled program on the clone (the gradient engine) traces once for the whole cascade.

How a layer is re-drawn: every trainable weight array w of the layer becomes N(0, std(w)²), drawn with a
generator seeded per (model digest, layer name, seed). Drawing with the trained weights' own spread, rather
than the layer's kernel initializer, keeps each layer's output on the scale the layers above it (and batch
normalisation's trained statistics, which are not re-drawn) expect: a Glorot draw for a layer trained to
much larger or smaller weights can saturate or silence the rest of the network, and the maps would then
differ because they are flat, not because the method noticed the change. A bias that was all zeros stays
zero (its spread is zero).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from reportgen.errors import ReportgenError


def cascade_layers(model: Any) -> list[str]:
    """Names of the model's parameterised layers (those owning a kernel: a trainable weight of 2 or more
    dimensions: Dense, Conv*, SeparableConv*, DepthwiseConv*), from the output down: the cascade's order.
    Works on the layer objects only, so sections can list the steps without running TensorFlow."""
    return [
        layer.name
        for layer in reversed(model.layers)
        if any(len(w.shape) >= 2 for w in layer.trainable_weights)
    ]


def layer_rng(digest: str, layer: str, seed: int) -> np.random.Generator:
    """The generator of one layer's new weights: seeded per (model, layer, seed), so a re-run, another
    shard or another method draws the same randomised model."""
    return np.random.default_rng([seed, zlib.crc32(digest.encode()), zlib.crc32(layer.encode())])


def redrawn(weights: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """New values for a layer's trainable weights: N(0, std(w)²) of each array's own shape and dtype."""
    return [
        (rng.standard_normal(w.shape) * float(np.std(w))).astype(w.dtype, copy=False) for w in weights
    ]


def clone(lm: Any) -> Any:
    """A `LoadedModel` on a copy of the model (same architecture, layer names and weights) with its own
    compiled programs; the user's model and its engines are untouched."""
    import keras

    try:
        copy = keras.models.clone_model(lm.model)
    except Exception as exc:  # keras raises ValueError/TypeError/NotImplementedError by model kind
        raise ReportgenError(
            f"model {lm.key!r} cannot be cloned for the randomisation check ({type(exc).__name__}: {exc}); "
            "use a functional or Sequential Keras model"
        ) from exc
    copy.set_weights(lm.model.get_weights())
    return dataclasses.replace(lm, model=copy, extractors={}, digest=f"{lm.digest}/randomised-clone")


def cascade(lm: Any, seed: int, depth: int | None = None) -> Iterator[tuple[int, str | None, Any]]:
    """(step, layer, model) for step 0..depth (default: every parameterised layer): `model` is ONE clone,
    with the trained weights at step 0 and, from step 1 on, re-drawn weights in the layers from the top down
    to `layer` (cumulative, as in the paper). The same clone object is yielded each time, changed in place
    (read it before advancing), so everything computed on it, the trained maps included, shares its
    compiled programs."""
    layers = cascade_layers(lm.model)
    if depth is not None:
        layers = layers[:depth]
    work = clone(lm)
    yield 0, None, work
    for step, name in enumerate(layers, start=1):
        layer = work.model.get_layer(name)
        rng = layer_rng(lm.digest, name, seed)
        variables = layer.trainable_weights
        for var, value in zip(variables, redrawn([v.numpy() for v in variables], rng), strict=True):
            var.assign(value)
        yield step, name, work
