"""circuit: kernel-slice norms and signs against numpy, the previous layer through pooling, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from reportgen.analyses.circuit import (  # noqa: E402
    channel_stats,
    conv_layer,
    kernel_slices,
    previous_layer,
    sign_word,
)
from reportgen.errors import ReportgenError  # noqa: E402
from reportgen.models import LoadedModel  # noqa: E402
from reportgen.spec.fields import Preprocess  # noqa: E402


def _model() -> keras.Model:
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(5, 3, activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, x)


def _loaded(model: keras.Model) -> LoadedModel:
    return LoadedModel("m", model, Preprocess(), (16, 16), None, "digest", "test")


def test_norms_and_signs_equal_numpy_on_a_hand_set_kernel():
    model = _model()
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
    kernel[:, :, 2, 1] = np.abs(kernel[:, :, 2, 1]) * 3  # strongly excitatory
    kernel[:, :, 4, 1] = -np.abs(kernel[:, :, 4, 1]) * 2  # strongly inhibitory
    model.get_layer("c2").set_weights([kernel, np.arange(4, dtype=np.float32)])

    layer = conv_layer(_loaded(model), "c2", "spec.yaml:9:12")
    got = kernel_slices(layer, 1)
    np.testing.assert_array_equal(got["slices"], kernel[:, :, :, 1])
    np.testing.assert_array_equal(got["channels"], np.arange(5))
    assert float(got["bias"]) == 1.0

    norms, sums = channel_stats(got["slices"])
    for c in range(5):
        np.testing.assert_allclose(norms[c], np.linalg.norm(kernel[:, :, c, 1]), rtol=1e-6)
        np.testing.assert_allclose(sums[c], kernel[:, :, c, 1].sum(), rtol=1e-5, atol=1e-6)
        expected = "excitatory" if kernel[:, :, c, 1].sum() > 0 else "inhibitory"
        assert sign_word(sums[c]) == expected
    order = np.argsort(-norms)
    assert order[0] == 2 and sign_word(sums[2]) == "excitatory"
    assert order[1] == 4 and sign_word(sums[4]) == "inhibitory"


def test_grouped_conv_maps_slices_to_model_input_channels():
    inp = keras.Input((8, 8, 4))
    model = keras.Model(inp, keras.layers.Conv2D(6, 1, groups=2, name="g")(inp))
    kernel = np.arange(2 * 6, dtype=np.float32).reshape(1, 1, 2, 6)
    model.get_layer("g").set_weights([kernel, np.zeros(6, np.float32)])
    got = kernel_slices(model.get_layer("g"), 4)  # filters 3..5 read input channels 2..3
    np.testing.assert_array_equal(got["channels"], [2, 3])
    np.testing.assert_array_equal(got["slices"][0, 0], kernel[0, 0, :, 4])


def test_previous_layer_is_found_through_pooling_and_normalisation():
    model = _model()
    assert previous_layer(model, "c2") == ("c1", ["bn", "pool"])
    assert previous_layer(model, "c1") == (None, [])


def test_previous_layer_in_a_saved_sequential_model(tmp_path):
    seq = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(2, 1, name="a"),
                            keras.layers.MaxPooling2D(name="mp"), keras.layers.Conv2D(3, 1, name="b")])
    seq.save(tmp_path / "s.keras")
    loaded = keras.models.load_model(tmp_path / "s.keras")
    assert previous_layer(loaded, "b") == ("a", ["mp"])


def test_a_layer_that_is_not_conv2d_is_a_located_error():
    expected = r"spec.yaml:9:12: layer 'pool' is a MaxPooling2D, not a Conv2D.*c1, c2"
    with pytest.raises(ReportgenError, match=expected):
        conv_layer(_loaded(_model()), "pool", "spec.yaml:9:12")


# -- end to end: activations + class_model + circuit through reportgen.runner.run ---------------------------

SPEC = """\
title: Tiny end-to-end report
output: out
formats: [html]
models:
  tiny:
    path: tiny.keras
    preprocess: unit
    class_names: [cat, dog, bird]
datasets:
  photos:
    path: photos
sections:
  - type: activations
    model: tiny
    dataset: photos
    layers: [c1, c2]
    max_channels: 4
    map_size: 16
  - type: class_model
    model: tiny
    classes: [cat, 2]
    params: {steps: 4}
  - type: circuit
    model: tiny
    layer: LAYER
    filter: 1
    top: 3
    objective: neuron
    params: {steps: 3}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("project")
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    keras.utils.set_random_seed(0)
    keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="pred")(x)).save(root / "tiny.keras")
    (root / "photos").mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        img = Image.fromarray(getattr(data, name)()).resize((32, 32), Image.BILINEAR)
        img.save(root / "photos" / f"{name}.png")
    return root


def test_runner_builds_the_three_sections_and_a_rerun_computes_nothing(project):
    import json

    from reportgen.runner import run

    spec = project / "spec.yaml"
    spec.write_text(SPEC.replace("LAYER", "c2"))
    first = run(spec, quiet=True)
    assert first.computed > 0
    out = project / "out"
    html = (out / "report.html").read_text()
    for kind in ("activations", "class_model", "circuit"):
        assert f"type-{kind}" in html
    assert "Automatic findings" in html and "draws most on input channel" in html
    manifest = json.loads((out / "manifest.json").read_text())
    sections = {s["type"]: s for s in manifest["sections"]}
    assert set(sections) == {"activations", "class_model", "circuit"}
    for s in sections.values():
        assert s["artifacts"] and s["findings"]
        for a in s["artifacts"]:
            assert (out / a["path"]).is_file(), a["path"]
    kinds = {a["kind"] for a in sections["circuit"]["artifacts"]}
    assert {"chart", "heatmap", "filter", "table"} <= kinds
    inputs = [a for a in sections["circuit"]["artifacts"] if a["kind"] == "filter" and a["layer"] == "c1"]
    assert len(inputs) == 3  # the top input channels, visualised in c1 (through the pooling layer)
    visualised = [a for a in sections["circuit"]["artifacts"] if a["kind"] == "filter"]
    assert len(visualised) == 4 and {a["objective"] for a in visualised} == {"neuron"}
    assert "centre of its channel&#39;s map (objective: neuron)" in html
    class_models = [a for a in sections["class_model"]["artifacts"] if a["kind"] == "class_model"]
    assert [a["name"] for a in class_models] == ["cat", "bird"]
    assert all(0 <= a["confidence"] <= 1 for a in class_models)
    grids = [a for a in sections["activations"]["artifacts"] if a["kind"] == "grid"]
    assert len(grids) == 2 * 3  # layers x images

    again = run(spec, quiet=True)
    assert again.computed == 0 and again.reused > 0


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("layer: LAYER", "layer: pool", r"layer 'pool' is a MaxPooling2D, not a Conv2D"),
        ("classes: [cat, 2]", "classes: [kat, 2]", r"no class 'kat'; did you mean 'cat'"),
        ("colormap: viridis", "colormap: viridiss", r"colormap 'viridiss'; did you mean 'viridis'"),
    ],
)
def test_runner_names_the_field_of_a_bad_value(project, old, new, message):
    from reportgen.runner import run

    text = SPEC.replace("map_size: 16", "map_size: 16\n    colormap: viridis").replace(old, new)
    text = text.replace("LAYER", "c2").replace("output: out", "output: out-bad")
    spec = project / "bad.yaml"
    spec.write_text(text)
    line = [i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == new][0]
    with pytest.raises(ReportgenError, match=rf"bad.yaml:{line}:\d+: .*{message}"):
        run(spec, quiet=True)


POSITION_SPEC = """\
title: Circuit at a position
output: out-pos
formats: [html]
models:
  tiny: {path: tiny.keras, preprocess: unit}
sections:
  - type: circuit
    model: tiny
    layer: c2
    filter: 1
    top: 2
    objective: neuron
    params: {steps: 3, pre_relu: true}
  - type: circuit
    model: tiny
    layer: c2
    filter: 1
    top: 2
    objective: neuron
    position: POSITION
    params: {steps: 3, pre_relu: true}
"""


def _spread(image: np.ndarray, box: tuple[slice, slice]) -> tuple[float, float]:
    """Mean |pixel - the image's median| inside the box and outside it (the start is gray plus a little
    noise: what the ascent changed stands out from the median)."""
    dev = np.abs(image.astype(np.float64) - np.median(image, axis=(0, 1))).mean(axis=-1)
    inside = np.zeros(dev.shape, bool)
    inside[box] = True
    return float(dev[inside].mean()), float(dev[~inside].mean())


def test_neuron_position_moves_the_unit_and_its_input_channels(project):
    """c2's unit at [0, 0] (the 32 px model: c1 3x3 -> 30, pool 2 -> 15, c2 3x3 -> 13) sees input pixels
    [0, 8) on each axis; the ascent changes only those, so the picture differs from the centre unit's
    (which sees [12, 20)) and its changes lie in that corner. The input channels are visualised at the c1
    unit under the centre of that field: pixel 3.5, between c1 units 2 and 3 (centred on 3 and 4), the tie
    going to 3."""
    import json

    from PIL import Image

    from reportgen.runner import run

    spec = project / "position.yaml"
    spec.write_text(POSITION_SPEC.replace("POSITION", "[0, 0]"))
    run(spec, quiet=True)
    out = project / "out-pos"
    centre, corner = (
        {(a["layer"], a["filter"]): a for a in s["artifacts"] if a["kind"] == "filter"}
        for s in json.loads((out / "manifest.json").read_text())["sections"]
    )
    assert corner[("c2", 1)]["position"] == [0, 0] and "position" not in centre[("c2", 1)]
    inputs = [a for key, a in corner.items() if key[0] == "c1"]
    assert len(inputs) == 2 and all(a["position"] == [3, 3] for a in inputs)

    def pixels(a):
        return np.asarray(Image.open(out / a["path"]).convert("RGB"))

    assert not np.array_equal(pixels(centre[("c2", 1)]), pixels(corner[("c2", 1)]))
    inside, outside = _spread(pixels(corner[("c2", 1)]), (slice(0, 8), slice(0, 8)))
    assert inside > 5 * outside, (inside, outside)
    inside, outside = _spread(pixels(centre[("c2", 1)]), (slice(12, 20), slice(12, 20)))
    assert inside > 5 * outside, (inside, outside)
    for a in inputs:  # c1 unit 3 sees pixels [3, 6)
        inside, outside = _spread(pixels(a), (slice(3, 6), slice(3, 6)))
        assert inside > 5 * outside, (inside, outside)
    html = (out / "report.html").read_text()
    assert "unit at [0, 0] of c2" in html and "unit at [3, 3] of c1" in html


@pytest.mark.parametrize("position", ["[13, 0]", "[0, -1]"])
def test_a_neuron_position_outside_the_map_is_a_located_error(project, cli_main, position):
    """c2's map is 13x13: y 13 or a negative x is refused at the field, exit 2, one line."""
    text = POSITION_SPEC.replace("POSITION", position).replace("output: out-pos", "output: out-pos-bad")
    spec = project / "position-bad.yaml"
    spec.write_text(text)
    line = text.splitlines().index(f"    position: {position}") + 1
    code, _, err = cli_main("run", spec)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{spec}:{line}:5: position: {position} is outside"), err
    assert "the 13x13 map of layer 'c2' at 32x32 px input; give y in 0..12 and x in 0..12" in err
    assert not (project / "out-pos-bad").exists()
