"""The `neuron` objective's position on a padded canvas: a fixed-size model sees the canvas scaled back to
its input size, so it must read the cell whose receptive-field centre lies on the same image pixel as the
chosen cell of the unpadded image's map (issue 9), as a free-size model does on its larger map.

Oracle: hand-set linear layers (a 1x1 identity conv, then a 2x2 stride-2 mean), so a cell's gradient
w.r.t. the image is its receptive field, carried through the same padding and resize; the expected cell is
the one whose centre, mapped back through resize and pad, is nearest the chosen cell's centre on the image.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from reportgen.engine.ascent import AscentJob, AscentProgram
from reportgen.engine.recipes import Recipe
from reportgen.engine.scheduler import unit_revision
from reportgen.models import PRESETS, LoadedModel

SIDE = 32
PAD = 8
CANVAS = SIDE + 2 * PAD
STRIDES = {"ident": 1, "pool": 2}
# one step, so the returned mask is |d objective / d image| at step 0; no jitter, rotation or zoom, so the
# only transform is the gray pad (phase_only: the recipe that returns the mask)
RECIPE = Recipe(steps=1, fourier=True, phase_only=True, pad=PAD, border=0, crop=0)
# (layer, (y, x) in the unpadded image's map); none is equally near two cells of the zoomed map
CASES = [("ident", (4, 27)), ("ident", (16, 10)), ("pool", (5, 13)), ("pool", (10, 4))]


def linear_model(fixed: bool) -> keras.Model:
    inp = keras.Input((SIDE, SIDE, 1) if fixed else (None, None, 1))
    x = keras.layers.Conv2D(1, 1, use_bias=False, name="ident")(inp)
    x = keras.layers.Conv2D(1, 2, strides=2, use_bias=False, name="pool")(x)
    model = keras.Model(inp, x)
    model.get_layer("ident").set_weights([np.ones((1, 1, 1, 1), np.float32)])
    model.get_layer("pool").set_weights([np.full((2, 2, 1, 1), 0.25, np.float32)])
    return model


def loaded(fixed: bool) -> LoadedModel:
    model = linear_model(fixed)
    return LoadedModel("lin", model, PRESETS["tf"], (SIDE, SIDE), None, "test-digest", "linear model")


def image_centre(cell: int, stride: int, zoomed: bool) -> float:
    """Where a map cell's receptive-field centre lies on the unpadded image (pixel edges at integers):
    in the model's input at (cell + 0.5) * stride, on the canvas that times canvas / side when the model
    sees the canvas scaled to its side, then minus the pad."""
    x = (cell + 0.5) * stride
    return x * CANVAS / SIDE - PAD if zoomed else x - PAD


def expected_cell(pos: int, stride: int, zoomed: bool) -> int:
    """The cell of the map the model computes on the canvas nearest the chosen cell's image centre."""
    target = (pos + 0.5) * stride
    size = SIDE if zoomed else CANVAS
    cells = np.arange(size // stride)
    distance = np.abs([image_centre(int(j), stride, zoomed) - target for j in cells])
    assert np.sort(distance)[1] > distance.min() + 1e-9  # no tie: the case has one answer
    return int(cells[np.argmin(distance)])


def reference_mask(model: keras.Model, layer: str, cell: tuple[int, int], zoomed: bool) -> np.ndarray:
    """|d unit / d image| with the canvas built by hand: gray (0) pad, bilinear resize for a fixed model;
    the canonical image is the model's input under the `tf` preprocessing ((x + 1) * 127.5 / 127.5 - 1)."""
    extractor = keras.Model(model.inputs, model.get_layer(layer).output)
    img = tf.zeros((1, SIDE, SIDE, 1))
    with tf.GradientTape() as tape:
        tape.watch(img)
        canvas = tf.pad(img, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
        seen = tf.image.resize(canvas, (SIDE, SIDE), method="bilinear") if zoomed else canvas
        unit = extractor(seen)[0, cell[0], cell[1], 0]
    return np.abs(tape.gradient(unit, img).numpy()[0, ..., 0])


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-size", "free-size"])
def test_neuron_reads_the_cell_centred_on_the_same_image_pixel(fixed: bool) -> None:
    lm = loaded(fixed)
    program = AscentProgram(lm, list(STRIDES), RECIPE)
    jobs = [AscentJob(layer, 0, 0, objective="neuron", position=pos) for layer, pos in CASES]
    for (layer, pos), res in zip(CASES, program.run(jobs), strict=True):
        stride = STRIDES[layer]
        cell = (expected_cell(pos[0], stride, fixed), expected_cell(pos[1], stride, fixed))
        want = reference_mask(lm.model, layer, cell, fixed)
        assert want.sum() > 0 and res.mask is not None
        np.testing.assert_allclose(res.mask, want, atol=1e-6, err_msg=f"{layer} {pos} -> cell {cell}")
        # and the gradient's centre of mass is the chosen cell's centre on the image, to half a cell
        weight = res.mask / res.mask.sum()
        centre = [float((coord * weight).sum()) for coord in np.indices(want.shape) + 0.5]
        half = 0.5 * stride * (CANVAS / SIDE if fixed else 1.0)
        for got, p in zip(centre, pos, strict=True):
            assert abs(got - (p + 0.5) * stride) <= half + 1e-6, (layer, pos, centre)


def test_only_the_moved_neurons_get_new_store_keys() -> None:
    """Results whose cell moved are recomputed (their content key is marked); all others keep their keys."""
    fixed, free = loaded(True), loaded(False)
    at = ("neuron", (4, 27), None, 0, 1)
    assert unit_revision(fixed, RECIPE, at) == ("zoomed-cell",)
    assert unit_revision(free, RECIPE, at) == ()
    assert unit_revision(fixed, RECIPE, ("neuron", None, None, 0, 1)) == ()  # the centre stays the centre
    assert unit_revision(fixed, Recipe(pad=PAD, crops=2), at) == ()  # crops never see the canvas
    assert unit_revision(fixed, Recipe(), at) == unit_revision(fixed, RECIPE, ()) == ()
