"""Top-k and bottom-k peaks of the dataset pass from one convolution per layer (issue 9): the pass reads a
ReLU layer's pre-activation once and takes its activation as relu(pre), checked against a NumPy
convolution of the same weights on the same decoded image files."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from reportgen.datasets import ImageItem
from reportgen.engine.forward import forward, program_for
from reportgen.models import PRESETS, LoadedModel

SIDE = 16
IMAGES = 6
LAYERS = ("c1", "c2")


def layers() -> list[keras.layers.Layer]:
    return [
        keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="c2"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(3, name="head"),
    ]


def build(kind: str) -> keras.Model:
    """Seeded weights with both signs, so every channel has positive and negative responses."""
    if kind == "sequential":
        model = keras.Sequential([keras.Input((SIDE, SIDE, 3)), *layers()])
    else:
        x = inp = keras.Input((SIDE, SIDE, 3))
        for layer in layers():
            x = layer(x)
        model = keras.Model(inp, x)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    return model


def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(N, H, W, C) 3x3 'same' convolution with bias, no activation, in float64."""
    xp = np.pad(x.astype(np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
    h, w = x.shape[1:3]
    out = sum(
        np.einsum("nhwc,co->nhwo", xp[:, i : i + h, j : j + w], kernel[i, j].astype(np.float64))
        for i in range(3)
        for j in range(3)
    )
    return out + bias


def reference_pre(model: keras.Model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Each conv layer's output before its ReLU: c1 from the preprocessed pixels, c2 from the max-pooled
    relu of c1 (pooling done in NumPy too)."""
    x = pixels / 127.5 - 1.0
    c1 = conv_same(x, *model.get_layer("c1").get_weights())
    n, h, w, c = c1.shape
    pooled = np.maximum(c1, 0).reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    return {"c1": c1, "c2": conv_same(pooled, *model.get_layer("c2").get_weights())}


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[ImageItem]:
    root = tmp_path_factory.mktemp("bottomk")
    rng = np.random.default_rng(7)
    out = []
    for i in range(IMAGES):
        path = Path(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path)
        out.append(ImageItem(path, path.name, None, None))
    return out


def convolutions(extractor: keras.Model) -> int:
    return sum(isinstance(layer, keras.layers.Conv2D) for layer in extractor.layers)


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_top_and_bottom_k_peaks_equal_a_numpy_reference(kind: str, items: list[ImageItem]) -> None:
    model = build(kind)
    lm = LoadedModel("m", model, PRESETS["tf"], (SIDE, SIDE), None, "test-digest", "relu convs")
    peaks = [(stat, layer) for layer in LAYERS for stat in ("topk", "bottomk")]
    result = forward(lm, items, list(LAYERS), outputs=True, peaks=peaks)
    pixels = np.stack([np.asarray(Image.open(item.path), np.float64) for item in items])
    pre = reference_pre(model, pixels)
    for layer in LAYERS:
        ref = {"topk": np.maximum(pre[layer], 0), "bottomk": pre[layer]}
        np.testing.assert_allclose(result.means[layer], ref["topk"].mean(axis=(1, 2)), rtol=1e-4, atol=1e-4)
        for stat, largest in (("topk", True), ("bottomk", False)):
            value, y, x = result.peaks[(stat, layer)]
            flat = ref[stat].reshape(IMAGES, -1, ref[stat].shape[-1])
            want = flat.max(axis=1) if largest else flat.min(axis=1)
            np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-4, err_msg=f"{stat} {layer}")
            assert (want < 0).any() if stat == "bottomk" else (want > 0).all()  # below the ReLU's 0
            # the position is the reference's peak wherever the peak is clear of the runner-up
            order = np.sort(flat, axis=1)
            clear = (order[:, -1] - order[:, -2] > 1e-3) if largest else (order[:, 1] - order[:, 0] > 1e-3)
            where = np.argmax(flat, axis=1) if largest else np.argmin(flat, axis=1)
            width = ref[stat].shape[2]
            assert clear.mean() > 0.5
            np.testing.assert_array_equal(y[clear], (where // width)[clear])
            np.testing.assert_array_equal(x[clear], (where % width)[clear])
    assert result.outputs is not None
    np.testing.assert_allclose(result.outputs, model.predict(pixels / 127.5 - 1.0, verbose=0), atol=1e-4)
    # the functional model's pass convolves each layer once; a Sequential one, which Keras cannot rebuild
    # with the ReLU split off, convolves the bottom-k layers a second time to get the pre-activation
    program = program_for(lm, list(LAYERS), True, peaks)
    assert convolutions(program.extractor) == (2 if kind == "functional" else 4)
