"""activations: a hand-set conv (channel 0 copies red, channel 1 is always 0) as oracle, and the batched
one-pass results against a naive per-image, per-layer reference call on the same model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from reportgen.analyses.activations import (  # noqa: E402
    ActivationsSection,
    shown_channels,
    silent_channels,
)
from reportgen.datasets import scan_folder  # noqa: E402
from reportgen.engine.activation_maps import ActivationProgram, display_shape  # noqa: E402
from reportgen.errors import ReportgenError  # noqa: E402
from reportgen.models import LoadedModel  # noqa: E402
from reportgen.spec.fields import DatasetSpec, Preprocess  # noqa: E402

SIDE = 40


def _model() -> keras.Model:
    """'copy': 1x1 conv, channel 0 = red, channel 1 = 0 always; 'mix': a seeded 3x3 conv on top of it
    and the image; 'dense': no feature maps."""
    inp = keras.Input((SIDE, SIDE, 3))
    copy = keras.layers.Conv2D(2, 1, name="copy")(inp)
    both = keras.layers.Concatenate()([copy, inp])
    mix = keras.layers.Conv2D(6, 3, strides=2, activation="relu", name="mix",
                              kernel_initializer=keras.initializers.GlorotUniform(seed=1))(both)
    dense = keras.layers.Dense(2, name="dense")(keras.layers.GlobalAveragePooling2D()(mix))
    model = keras.Model(inp, dense)
    kernel = np.zeros((1, 1, 3, 2), np.float32)
    kernel[0, 0, 0, 0] = 1.0
    model.get_layer("copy").set_weights([kernel, np.zeros(2, np.float32)])
    return model


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return LoadedModel("m", _model(), Preprocess(scale=1 / 255.0), (SIDE, SIDE), None, "digest", "test")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("images")
    red = np.zeros((SIDE, SIDE, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(root / "red.png")
    Image.fromarray(data.astronaut()).resize((SIDE, SIDE), Image.BILINEAR).save(root / "astronaut.png")
    Image.fromarray(data.chelsea()).resize((SIDE, SIDE), Image.BILINEAR).save(root / "chelsea.png")
    return scan_folder("photos", root, DatasetSpec(path=str(root)))


def test_red_image_fires_channel_0_and_the_dead_channel_counts_as_silent(lm, dataset):
    items = dataset.select(["red"])
    program = ActivationProgram(lm, ["copy"], [[0, 1]], map_size=64)
    arrays = program.run(items)
    mean, peak = arrays["mean_0"][0], arrays["peak_0"][0]
    assert int(np.argmax(mean)) == 0
    np.testing.assert_allclose(mean, [1.0, 0.0], atol=1e-6)  # red / 255
    silent = silent_channels(peak, 1e-3)
    assert silent.tolist() == [False, True]
    assert silent.mean() == 0.5
    maps = arrays["maps_0"][0].astype(np.float32)
    np.testing.assert_allclose(maps[..., 0], 1.0, atol=1e-3)
    np.testing.assert_array_equal(maps[..., 1], 0.0)


def test_one_batched_pass_equals_per_image_reference_calls(lm, dataset):
    items = dataset.select(limit=3)
    layers, shown, map_size = ["copy", "mix"], [[1, 0], [5, 2, 3]], 16
    program = ActivationProgram(lm, layers, shown, map_size)
    arrays = program.run(items, batch_size=2)  # two batches, one trace
    assert program.trace_count == 1
    assert arrays["index"].tolist() == [0, 1, 2]
    assert arrays["shape_0"].tolist() == [SIDE, SIDE] and arrays["shape_1"].tolist() == [19, 19]
    assert arrays["maps_0"].shape == (3, 16, 16, 2)  # downsampled for display
    assert arrays["maps_1"].shape == (3, 16, 16, 3)

    for n, item in enumerate(items):
        pixels = np.asarray(Image.open(item.path).convert("RGB"), np.float32)[None]
        for i, name in enumerate(layers):
            reference = keras.Model(lm.model.inputs, lm.model.get_layer(name).output)
            out = reference(pixels / 255.0).numpy()[0]
            np.testing.assert_allclose(arrays[f"mean_{i}"][n], out.mean(axis=(0, 1)), rtol=1e-4, atol=1e-5)
            peak = np.abs(out).max(axis=(0, 1))
            np.testing.assert_allclose(arrays[f"peak_{i}"][n], peak, rtol=1e-4, atol=1e-5)
            target = display_shape(out.shape[:2], map_size)
            maps = tf.image.resize(out[..., shown[i]], target, method="area").numpy()
            np.testing.assert_allclose(arrays[f"maps_{i}"][n].astype(np.float32), maps, rtol=2e-3, atol=2e-3)

    program.run(dataset.select(["chelsea"]))  # another image set: no retrace
    assert program.trace_count == 1


def _ctx() -> SimpleNamespace:
    return SimpleNamespace(where=lambda index, *path: f"spec.yaml:{index}:{'.'.join(map(str, path))}")


def test_channel_selection_is_capped_and_noted(lm):
    section = ActivationsSection(type="activations", model="m", dataset="d", layers=["copy", "mix"],
                                 channels=[0, 1, 4, 5], max_channels=2)
    shown, notes = shown_channels(section, _ctx(), 0, lm)
    assert shown == [[0, 1], [0, 1]]
    assert any("copy: channels [4, 5] do not exist" in n for n in notes)
    assert any("mix: 4 channels selected, the first 2 shown" in n for n in notes)


def test_a_layer_without_feature_maps_is_a_located_error(lm):
    section = ActivationsSection(type="activations", model="m", dataset="d", layers=["copy", "dense"])
    with pytest.raises(ReportgenError, match=r"spec.yaml:0:layers.1: layer 'dense' outputs shape"):
        shown_channels(section, _ctx(), 0, lm)
