"""Input attribution methods against numpy references of their papers' rules and GradientTape oracles.

Guided backprop and deconvnet are checked on a hand-set model whose ReLUs appear in all three forms the
clone overrides (Conv2D activation="relu", a ReLU() layer, an Activation("relu") layer), against a numpy
forward/backward pass written from the rules; integrated gradients against completeness on a nonlinear
model and against a numpy midpoint Riemann sum on a model whose gradient has a closed form.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import loaded, random_model

from reportgen.engine.attribution import AttributionParams, UnitTarget, attributor_for, input_attributions
from reportgen.engine.gradients import GradientEngine, smoothgrad_noise
from reportgen.models import PRESETS

UNIT = 1.0 / 255.0  # d(model input) / d(pixel) of the "unit" preprocessing


def relu_model() -> tuple[keras.Model, list[np.ndarray]]:
    """4x4x2 input -> 1x1 conv (relu) -> flatten -> dense -> ReLU() -> dense -> Activation(relu) -> dense
    (logits, no softmax). Seeded normal weights, set by hand: both signs in every layer."""
    inp = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 1, activation="relu", name="conv")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, name="d1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.Dense(5, name="d2")(x)
    x = keras.layers.Activation("relu", name="r2")(x)
    out = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(11)
    weights = [
        rng.normal(0, 1, (1, 1, 2, 3)), rng.normal(0, 0.3, 3),
        rng.normal(0, 0.5, (48, 6)), rng.normal(0, 0.3, 6),
        rng.normal(0, 0.5, (6, 5)), rng.normal(0, 0.3, 5),
        rng.normal(0, 1, (5, 3)), np.zeros(3),
    ]  # fmt: skip
    weights = [w.astype(np.float32) for w in weights]
    model.set_weights(weights)
    return model, weights


def numpy_rule_gradient(weights: list[np.ndarray], image: np.ndarray, cls: int, rule: str) -> np.ndarray:
    """d logit[cls] / d pixel of `relu_model` with the ReLU backward step replaced by `rule`:
    plain: g * (z > 0); guided: g * (z > 0) * (g > 0); deconv: max(g, 0)."""
    k, b0, w1, b1, w2, b2, w3, _ = weights
    x = image * UNIT
    z0 = x @ k[0, 0] + b0  # (4, 4, 3): a 1x1 conv is a per-pixel matmul
    z1 = np.maximum(z0, 0).reshape(-1) @ w1 + b1
    z2 = np.maximum(z1, 0) @ w2 + b2

    def back(g: np.ndarray, z: np.ndarray) -> np.ndarray:
        if rule == "plain":
            return g * (z > 0)
        if rule == "guided":
            return g * (z > 0) * (g > 0)
        return np.maximum(g, 0)

    g = back(w3[:, cls], z2)
    g = back(w2 @ g, z1)
    g = back((w1 @ g).reshape(4, 4, 3), z0)
    return (g @ k[0, 0].T) * UNIT


def test_guided_backprop_and_deconvnet_equal_the_numpy_rules_and_leave_the_model_alone() -> None:
    model, weights = relu_model()
    lm = loaded(model, PRESETS["unit"])
    eng = GradientEngine(lm, batch_size=3)
    images = np.random.default_rng(0).uniform(0, 255, (5, 4, 4, 2)).astype(np.float32)
    before = model.predict(images * UNIT, verbose=0)
    activations = {lyr.name: getattr(lyr, "activation", None) for lyr in model.layers}
    got = {
        m: input_attributions(eng, m, images, np.array([0, 1, 2, 0, 1], np.int32))
        for m in ("vanilla", "guided_backprop", "deconvnet")
    }
    for m, rule in (("vanilla", "plain"), ("guided_backprop", "guided"), ("deconvnet", "deconv")):
        for i, cls in enumerate([0, 1, 2, 0, 1]):
            want = numpy_rule_gradient(weights, images[i], cls, rule)
            np.testing.assert_allclose(got[m]["raw"][i], want, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got[m]["maps"], np.abs(got[m]["raw"]).max(-1))
    # The rules really differ on this model (otherwise the comparison above proves nothing).
    assert not np.allclose(got["guided_backprop"]["raw"], got["vanilla"]["raw"], atol=1e-6)
    assert not np.allclose(got["deconvnet"]["raw"], got["guided_backprop"]["raw"], atol=1e-6)
    assert attributor_for(eng).overridden_relus("guided") == 3
    # The user's model: same activation functions, same weights, same predictions.
    assert {lyr.name: getattr(lyr, "activation", None) for lyr in model.layers} == activations
    for w, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, want)
    np.testing.assert_array_equal(model.predict(images * UNIT, verbose=0), before)
    with tf.GradientTape() as tape:
        x = tf.constant(images[:1] * UNIT)
        tape.watch(x)
        score = model(x)[0, 0]
    np.testing.assert_allclose(tape.gradient(score, x)[0].numpy() * UNIT,
                               numpy_rule_gradient(weights, images[0], 0, "plain"), rtol=1e-4, atol=1e-7)


def test_clones_follow_weights_changed_in_place_after_sync() -> None:
    model, weights = relu_model()
    eng = GradientEngine(loaded(model, PRESETS["unit"]), batch_size=4)
    images = np.random.default_rng(4).uniform(0, 255, (3, 4, 4, 2)).astype(np.float32)
    input_attributions(eng, "deconvnet", images, 0)  # the clone exists, with the old weights
    weights[4] = -weights[4]
    model.get_layer("d2").set_weights(weights[4:6])
    attributor_for(eng).sync_weights(["d2"])
    got = input_attributions(eng, "deconvnet", images, 0)["raw"]
    for i in range(3):
        np.testing.assert_allclose(got[i], numpy_rule_gradient(weights, images[i], 0, "deconv"), rtol=1e-4,
                                   atol=1e-7)
    assert eng.traces == {"attribution:plain:class": 1, "attribution:deconv:class": 1}


def test_relus_of_a_nested_model_are_overridden_too() -> None:
    """A model used as a layer (as a keras.applications base inside a user's classifier): its ReLUs are
    replaced in the clone, so guided backprop equals that of the same layers unnested."""
    flat, weights = relu_model()
    inp = keras.Input((4, 4, 2))
    base = keras.Model(flat.inputs, flat.layers[-2].output, name="base")
    nested = keras.Model(inp, keras.layers.Dense(3, name="head")(base(inp)))
    nested.get_layer("head").set_weights(weights[-2:])
    images = np.random.default_rng(3).uniform(0, 255, (4, 4, 4, 2)).astype(np.float32)
    got = {}
    for name, model in (("flat", flat), ("nested", nested)):
        eng = GradientEngine(loaded(model, PRESETS["unit"]), batch_size=4)
        got[name] = input_attributions(eng, "guided_backprop", images, 1)["raw"]
        assert attributor_for(eng).overridden_relus("guided") == 3
    np.testing.assert_allclose(got["nested"], got["flat"], rtol=1e-5, atol=1e-9)


def test_gradient_x_input_and_vanilla_match_the_gradient_engine() -> None:
    model = random_model(3, seed=2)
    eng = GradientEngine(loaded(model, PRESETS["tf"]), batch_size=2)
    images = np.random.default_rng(1).uniform(0, 255, (5, 24, 24, 3)).astype(np.float32)
    vanilla_maps, g = eng.vanilla(images, -1)
    v = input_attributions(eng, "vanilla", images)
    np.testing.assert_allclose(v["raw"], g.gradients, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(v["maps"], vanilla_maps, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(v["classes"], g.classes)
    gxi = input_attributions(eng, "gradient_x_input", images)
    np.testing.assert_allclose(gxi["raw"], g.gradients * images, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gxi["maps"], np.abs((g.gradients * images).sum(-1)), rtol=1e-4, atol=1e-6)


def test_smoothgrad_and_vargrad_over_the_same_seeded_noise() -> None:
    model = random_model(3, seed=4)
    eng = GradientEngine(loaded(model, PRESETS["tf"]), batch_size=5)  # 3 images x 4 copies: chunks mix
    images = np.random.default_rng(2).uniform(0, 255, (3, 24, 24, 3)).astype(np.float32)
    _, g = eng.vanilla(images, -1)
    p = AttributionParams(samples=4, noise=0.2, seed=7)
    ids = [5, 0, 9]  # a shard's images keep their noise
    smooth = input_attributions(eng, "smoothgrad", images, -1, p, ids)
    var = input_attributions(eng, "vargrad", images, -1, p, ids)
    np.testing.assert_allclose(smooth["maps"], eng.smoothgrad(images, g.classes, 4, 0.2, 7, ids), rtol=1e-4,
                               atol=1e-7)
    for i in range(3):
        copies = images[i] + smoothgrad_noise(7, ids[i], 4, images.shape[1:], 0.2 * 255)
        grads = eng.input_gradients(copies, int(g.classes[i])).gradients
        np.testing.assert_allclose(smooth["raw"][i], grads.mean(0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(var["raw"][i], grads.var(0), rtol=1e-3, atol=1e-9)
        np.testing.assert_allclose(var["maps"][i], grads.var(0).max(-1), rtol=1e-3, atol=1e-9)
    assert var["raw"].max() > 0


def smooth_model() -> keras.Model:
    """Nonlinear and smooth (no ReLU kinks, which the midpoint rule integrates poorly): conv (tanh) ->
    conv (softplus) -> global average -> dense (softplus) -> dense logits."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, activation="softplus")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, activation="softplus")(x)
    return keras.Model(inp, keras.layers.Dense(3)(x))


@pytest.mark.parametrize("baseline", ["black", "blur", "noise"])
def test_integrated_gradients_are_complete(baseline: str) -> None:
    eng = GradientEngine(loaded(smooth_model(), PRESETS["tf"]), batch_size=20)  # < 32: paths split
    images = np.random.default_rng(4).uniform(0, 255, (3, 12, 12, 3)).astype(np.float32)
    p = AttributionParams(ig_baseline=baseline, ig_steps=32, seed=1, model_key="m")
    r = input_attributions(eng, "integrated_gradients", images, np.array([0, 1, 2], np.int32), p)
    logits = eng.logits_model(eng.lm.preprocess(tf.constant(images))).numpy()
    base = attributor_for(eng).baselines(images, baseline, [0, 1, 2], p)
    base_logits = eng.logits_model(eng.lm.preprocess(tf.constant(base))).numpy()
    want = logits[[0, 1, 2], [0, 1, 2]] - base_logits[[0, 1, 2], [0, 1, 2]]
    np.testing.assert_allclose(r["score_difference"], want, rtol=1e-4, atol=1e-6)
    sums = r["raw"].reshape(3, -1).sum(1)
    np.testing.assert_allclose(sums, want, rtol=0.01)  # completeness within 1 %
    np.testing.assert_allclose(r["completeness_error"], np.abs(sums - want) / np.abs(want), rtol=1e-3,
                               atol=1e-6)
    assert eng.traces == {"attribution:plain:class": 1}


def test_integrated_gradients_equal_a_numpy_midpoint_sum_of_the_closed_form_gradient() -> None:
    """Score = v . tanh(W x + c) on the flattened 0..1 input: gradient W^T (v * (1 - tanh^2)). Few steps
    make the rule's error large, so summing the wrong points or forgetting (x - b) fails the test."""
    inp = keras.Input((3, 3, 2))
    x = keras.layers.Flatten()(inp)
    x = keras.layers.Dense(4, activation="tanh")(x)
    model = keras.Model(inp, keras.layers.Dense(2)(x))
    rng = np.random.default_rng(5)
    w, c = rng.normal(0, 1, (18, 4)).astype(np.float32), rng.normal(0, 0.5, 4).astype(np.float32)
    v = rng.normal(0, 1, (4, 2)).astype(np.float32)
    model.set_weights([w, c, v, np.zeros(2, np.float32)])
    eng = GradientEngine(loaded(model, PRESETS["unit"]), batch_size=4)  # 3 steps: paths split over chunks
    images = rng.uniform(0, 255, (3, 3, 3, 2)).astype(np.float32)
    steps = 3
    r = input_attributions(eng, "integrated_gradients", images, 1, AttributionParams(ig_steps=steps))
    for i in range(3):
        x0 = images[i].reshape(-1) * UNIT
        total = np.zeros(18)
        for k in range(steps):
            xa = (k + 0.5) / steps * x0  # black baseline: 0
            total += w @ (v[:, 1] * (1 - np.tanh(xa @ w + c) ** 2))
        want = (images[i].reshape(-1) * total / steps * UNIT).reshape(3, 3, 2)
        np.testing.assert_allclose(r["raw"][i], want, rtol=1e-4, atol=1e-6)
    assert np.abs(r["completeness_error"]).max() > 1e-4  # 3 steps do not add up exactly


def test_unit_targets_equal_a_gradient_tape_reference_and_compile_once() -> None:
    model = random_model(3, seed=6)
    eng = GradientEngine(loaded(model, PRESETS["tf"]), batch_size=2)
    images = np.random.default_rng(6).uniform(0, 255, (5, 24, 24, 3)).astype(np.float32)
    probe = keras.Model(model.inputs, model.get_layer("c2").output)

    def tape_gradient(objective: str) -> np.ndarray:
        x = tf.constant(images)
        with tf.GradientTape() as tape:
            tape.watch(x)
            a = probe(eng.lm.preprocess(x))
            score = tf.reduce_mean(a[..., 3], axis=(1, 2)) if objective == "filter" else 0.5 * tf.reduce_mean(
                tf.square(a), axis=(1, 2, 3))
            total = tf.reduce_sum(score)
        return tape.gradient(total, x).numpy()

    one = input_attributions(eng, "vanilla", images, UnitTarget("c2", 3))
    np.testing.assert_allclose(one["raw"], tape_gradient("filter"), rtol=1e-4, atol=1e-9)
    whole = input_attributions(eng, "vanilla", images, UnitTarget("c2"))
    np.testing.assert_allclose(whole["raw"], tape_gradient("layer"), rtol=1e-4, atol=1e-9)
    # another filter, other image batches and sizes: still the one trace of this (rule, unit)
    input_attributions(eng, "vanilla", images[:1], UnitTarget("c2", 0))
    input_attributions(eng, "gradient_x_input", images[:3], UnitTarget("c2", 7))
    assert eng.traces == {"attribution:plain:unit:c2": 1}


def test_one_trace_for_several_image_batches() -> None:
    eng = GradientEngine(loaded(random_model(1, seed=3), PRESETS["tf"]), batch_size=3)
    rng = np.random.default_rng(8)
    for n in (1, 4, 7):
        images = rng.uniform(0, 255, (n, 24, 24, 1)).astype(np.float32)
        for m in ("vanilla", "gradient_x_input", "integrated_gradients", "smoothgrad", "vargrad"):
            input_attributions(eng, m, images, -1, AttributionParams(samples=2, ig_steps=4))
        input_attributions(eng, "guided_backprop", images, 2)
    assert eng.traces == {"attribution:plain:class": 1, "attribution:guided:class": 1}
