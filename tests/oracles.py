"""The oracle classifier shared by the gradient-engine and section tests.

Hand-set weights: a 3x3 conv turns "redness" (R - (G+B)/2) and "greenness" into two channels, a 1x1
identity conv passes them on, and a dense head scores red in the top-left quadrant (class "red"), green in
the bottom-right quadrant (class "green") against a constant ("background"). So the evidence for each
class lies in a known region, and a gray or black box over it removes it.
"""

from __future__ import annotations

import keras
import numpy as np

from reportgen.models import LoadedModel
from reportgen.spec.fields import Preprocess

SIDE = 32
CLASSES = ["red", "green", "background"]
RED_BOX = (4, 4, 12, 12)  # x0, y0, x1, y1 inside the top-left quadrant
GREEN_BOX = (20, 20, 28, 28)  # inside the bottom-right quadrant


def oracle_model(channels: int = 3) -> keras.Model:
    """Hand-set: class 0 = 20 x mean redness in the top-left quadrant, class 1 = the same for green in the
    bottom-right quadrant, class 2 = constant 1.5. Inputs are 0..1 (the model's preprocessing is `unit`)."""
    inp = keras.Input((SIDE, SIDE, channels))
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="detect")(inp)
    x = keras.layers.Conv2D(2, 1, activation="relu", name="features")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    k = np.zeros((3, 3, channels, 2), np.float32)
    if channels == 3:
        k[1, 1, :, 0] = (1.0, -0.5, -0.5)
        k[1, 1, :, 1] = (-0.5, 1.0, -0.5)
    else:  # gray: channel 0 = brightness, channel 1 unused
        k[1, 1, 0, 0] = 1.0
    model.get_layer("detect").set_weights([k, np.zeros(2, np.float32)])
    identity = np.eye(2, dtype=np.float32)[None, None]
    model.get_layer("features").set_weights([identity, np.zeros(2, np.float32)])
    w = np.zeros((SIDE, SIDE, 2, 3), np.float32)
    q = SIDE // 2
    w[:q, :q, 0, 0] = 20.0 / (q * q)
    w[q:, q:, 1, 1] = 20.0 / (q * q)
    model.get_layer("head").set_weights([w.reshape(-1, 3), np.array([0.0, 0.0, 1.5], np.float32)])
    return model


def random_model(channels: int, seed: int = 1) -> keras.Model:
    """Random weights, pooling and a separate softmax layer: the other `logits_output` path."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((24, 24, channels))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="tanh", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5, name="logits")(x)
    out = keras.layers.Activation("softmax")(x)
    return keras.Model(inp, out)


def loaded(model: keras.Model, preprocess: Preprocess, names: list[str] | None = None) -> LoadedModel:
    h, w = model.input_shape[1:3]
    return LoadedModel("m", model, preprocess, (h, w), names, "test-digest", "test model")


def scene(red: bool = True, green: bool = False, channels: int = 3) -> np.ndarray:
    """0..255 pixels: dark-gray background with a pure red and/or green square."""
    img = np.full((SIDE, SIDE, 3), 20.0, np.float32)
    if red:
        x0, y0, x1, y1 = RED_BOX
        img[y0:y1, x0:x1] = (255, 0, 0)
    if green:
        x0, y0, x1, y1 = GREEN_BOX
        img[y0:y1, x0:x1] = (0, 255, 0)
    if channels == 1:
        return img.max(axis=-1, keepdims=True)
    return img


def in_box(yx: tuple[int, int], box: tuple[int, int, int, int]) -> bool:
    y, x = yx
    return box[0] <= x < box[2] and box[1] <= y < box[3]


# -- references: one image at a time, straight from the Keras layers ---------------------------------


# -- a linear edge detector (the randomisation check of tests/engine/test_faithfulness.py, tests/analyses/
# test_sanity.py) ---------------------------------------------------------------------------------------


def edge_model() -> keras.Model:
    """Linear up to the softmax: Sobel x and y kernels on the colour sum, a seeded random dense head."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(2, 3, padding="same", name="edges")(inp)
    x = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x))
    model = keras.Model(inp, keras.layers.Activation("softmax")(x))
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    k = np.zeros((3, 3, 3, 2), np.float32)
    k[..., 0], k[..., 1] = sobel[:, :, None] / 3, sobel.T[:, :, None] / 3
    model.get_layer("edges").set_weights([k, np.zeros(2, np.float32)])
    return model


def shapes(seed: int) -> np.ndarray:
    """Three coloured squares on black."""
    rng = np.random.default_rng(seed)
    img = np.zeros((32, 32, 3), np.float32)
    for _ in range(3):
        x0, y0 = rng.integers(0, 24, 2)
        s = rng.integers(4, 9)
        img[y0 : y0 + s, x0 : x0 + s] = rng.uniform(80, 255, 3)
    return img


# the input-space methods' settings of `reportgen.engine.sanity_batches.sanity` params, kept small for tests
ATTRIBUTION = {"samples": 4, "noise": 0.15, "ig_baseline": "black", "ig_steps": 8, "model_key": "m"}
