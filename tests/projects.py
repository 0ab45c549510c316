"""Small real projects that several test modules build: class folders of tinted images and a tiny
classifier saved as .keras (the planner, executor and cluster tests run whole specs on them)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from PIL import Image


def tinted_class_folders(root: Path, classes: tuple[str, ...], per_class: int, seed: int, step: int) -> None:
    """`root/data/<class>/<class>_<i>.png`: 20x20 noise whose channel k (the class's index) is raised by
    120 + i * step, so the class is visible in the colour and images of one class differ."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / "data" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (20, 20, 3))
            pixels[..., k] += 120 + i * step
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / name / f"{name}_{i}.png")


def tiny_classifier(path: Path, classes: int, seed: int, convs: tuple[tuple[str, int], ...]) -> None:
    """16x16 RGB -> the ReLU 3x3 convs `convs` ((name, filters), ...) -> average -> softmax, at `path`."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    for name, filters in convs:
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=name)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="probs")(x)).save(path)
