"""Activation maximization on a conv layer whose kernels are set by hand: the answer is known in advance."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from reportgen.engine.ascent import AscentJob, AscentProgram, initial_state, program_for, sample_seed
from reportgen.engine.recipes import Recipe, resolve_recipe
from reportgen.imaging import png_bytes
from reportgen.models import PRESETS, LoadedModel

EDGE, RED, DEAD = 0, 1, 2  # hand-set filters of layer "hand"; filters 3..7 are random
SIZE = 32
RECIPE = Recipe(steps=12, size=SIZE, crop=0)  # the keras-example recipe, small and uncropped


def hand_model() -> LoadedModel:
    """Input(None, None, 3) -> Conv2D "hand" (8 filters, 3x3, ReLU) -> Conv2D "second" (4 filters, ReLU).

    filter 0: vertical-edge detector, columns [-1, 0, 1] on every channel (responds to d/dx);
    filter 1: red detector, centre tap +1 on R, -1 on G and B;
    filter 2: zero kernel with bias -1: ReLU output is 0 for every input, i.e. dead.
    """
    inp = keras.Input((None, None, 3))
    hand = keras.layers.Conv2D(8, 3, activation="relu", name="hand")
    second = keras.layers.Conv2D(4, 3, activation="relu", name="second")
    model = keras.Model(inp, second(hand(inp)))
    rng = np.random.default_rng(7)
    kernel = rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32)
    bias = np.zeros(8, np.float32)
    kernel[..., EDGE] = 0
    kernel[:, 0, :, EDGE], kernel[:, 2, :, EDGE] = -1.0, 1.0
    kernel[..., RED] = 0
    kernel[1, 1, :, RED] = [1.0, -1.0, -1.0]
    kernel[..., DEAD], bias[DEAD] = 0.0, -1.0
    hand.set_weights([kernel, bias])
    second.set_weights([rng.normal(0, 0.3, (3, 3, 8, 4)).astype(np.float32), np.zeros(4, np.float32)])
    # "tf" preprocessing maps the gray start to 0, so the red filter starts at the ReLU's edge, not below it
    return LoadedModel(key="hand", model=model, preprocessing=PRESETS["tf"], input_size=(SIZE, SIZE),
                       class_names=None, digest="d1" * 32, description="hand-set kernels")


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return hand_model()


@pytest.fixture(scope="module")
def oracle_results(lm: LoadedModel) -> dict[int, object]:
    program = AscentProgram(lm, ["hand"], RECIPE)
    results = program.run([AscentJob("hand", f, 0) for f in (EDGE, RED, DEAD, 3)], batch_size=4)
    return {r.job.filter: r for r in results}


def gradient_energy(image: np.ndarray) -> tuple[float, float]:
    """(mean squared horizontal difference, mean squared vertical difference) of an image."""
    img = image.astype(np.float64)
    return float(np.mean(np.diff(img, axis=1) ** 2)), float(np.mean(np.diff(img, axis=0) ** 2))


def test_vertical_edge_filter_draws_vertical_structure(oracle_results) -> None:
    res = oracle_results[EDGE]
    assert res.image.shape == (SIZE, SIZE, 3) and res.image.dtype == np.uint8
    dx, dy = gradient_energy(res.image)
    assert dx > 4 * dy, (dx, dy)
    assert res.activation > 10 * max(res.initial_activation, 1e-3)  # the ascent really climbed
    assert not res.dead


def test_red_filter_draws_red(oracle_results) -> None:
    res = oracle_results[RED]
    r, g, b = res.image.astype(np.float64).mean(axis=(0, 1))
    assert r > g + 25 and r > b + 25, (r, g, b)
    assert abs(g - b) < 5  # the kernel treats G and B alike
    assert res.activation > res.initial_activation and not res.dead


def test_the_edge_filter_is_colourless_and_the_red_filter_has_no_orientation(oracle_results) -> None:
    """Cross-check the two oracles: each property belongs to its own filter only."""
    r, g, b = oracle_results[EDGE].image.astype(np.float64).mean(axis=(0, 1))
    assert max(r, g, b) - min(r, g, b) < 5
    dx, dy = gradient_energy(oracle_results[RED].image)
    assert 0.5 < dx / dy < 2


def test_dead_filter_is_flagged(oracle_results) -> None:
    dead = oracle_results[DEAD]
    assert dead.dead and dead.activation == 0.0 and dead.initial_activation == 0.0
    assert np.all(np.isfinite(dead.raw))  # a zero gradient must not turn into NaN through l2_normalize
    assert not any(oracle_results[f].dead for f in (EDGE, RED, 3))


def reference_ascent(lm: LoadedModel, layer: str, filt: int, start: np.ndarray, recipe: Recipe) -> np.ndarray:
    """Naive one-image Keras-example loop: the batched program must give the same image for every sample."""
    extractor = keras.Model(lm.model.inputs, lm.model.get_layer(layer).output)
    x = tf.Variable(start[None])
    b = recipe.border
    for _ in range(recipe.steps):
        with tf.GradientTape() as tape:
            out = extractor(lm.preprocess((x + 1.0) * 127.5), training=False)
            loss = tf.reduce_mean(out[:, b:-b, b:-b, filt])
        grads = tape.gradient(loss, x)
        x.assign_add(recipe.lr * tf.math.l2_normalize(grads))
    return x.numpy()[0]


def test_batched_multi_layer_program_matches_a_naive_loop(lm: LoadedModel) -> None:
    recipe = Recipe(steps=6, size=24, crop=0)
    jobs = [AscentJob("hand", EDGE, 0), AscentJob("second", 1, 0), AscentJob("hand", 4, 0),
            AscentJob("second", 3, 0)]
    program = AscentProgram(lm, ["hand", "second"], recipe)
    results = program.run(jobs, batch_size=3)  # chunks of 3 and 1, two layers mixed in one batch
    starts, _ = initial_state(lm, jobs, recipe)
    for job, res, start in zip(jobs, results, starts, strict=True):
        assert res.job == job
        expected = reference_ascent(lm, job.layer, job.filter, start, recipe)
        np.testing.assert_allclose(res.raw, expected, atol=2e-4, err_msg=str(job))


def test_no_retrace_per_filter_or_chunk(lm: LoadedModel) -> None:
    program = AscentProgram(lm, ["hand"], RECIPE.with_overrides({"steps": 2}))
    first = program.run([AscentJob("hand", f, 0) for f in (0, 1, 2)], batch_size=3)
    assert program.trace_count == 1
    second = program.run([AscentJob("hand", f, 0) for f in (3, 4, 5, 6, 7)], batch_size=2)  # chunks 2, 2, 1
    assert program.trace_count == 1
    assert [r.job.filter for r in first + second] == list(range(8))


def test_program_for_reuses_the_compiled_program(lm: LoadedModel) -> None:
    recipe = RECIPE.with_overrides({"steps": 3})
    assert program_for(lm, ["hand"], recipe) is program_for(lm, ["hand"], recipe)
    assert program_for(lm, ["hand"], recipe) is not program_for(lm, ["hand", "second"], recipe)


def test_same_seed_gives_identical_png_bytes(lm: LoadedModel) -> None:
    jobs = [AscentJob("hand", f, 0) for f in (EDGE, RED, 3, 5)]
    runs = [AscentProgram(lm, ["hand"], RECIPE).run(jobs, batch_size=2) for _ in range(2)]
    assert [png_bytes(r.image) for r in runs[0]] == [png_bytes(r.image) for r in runs[1]]


def test_different_seed_gives_different_pixels(lm: LoadedModel) -> None:
    program = AscentProgram(lm, ["hand"], RECIPE)
    a = program.run([AscentJob("hand", f, 0) for f in (EDGE, 3)], batch_size=2)
    b = program.run([AscentJob("hand", f, 1) for f in (EDGE, 3)], batch_size=2)
    for x, y in zip(a, b, strict=True):
        assert np.abs(x.image.astype(int) - y.image.astype(int)).mean() > 1.0


def test_start_depends_only_on_model_layer_filter_and_seed(lm: LoadedModel) -> None:
    base = sample_seed(lm.key, "hand", 3, 0)
    assert base == sample_seed(lm.key, "hand", 3, 0)
    variants = [sample_seed("other", "hand", 3, 0), sample_seed(lm.key, "second", 3, 0),
                sample_seed(lm.key, "hand", 4, 0), sample_seed(lm.key, "hand", 3, 1)]
    assert len({base, *variants}) == 5
    # a job's start and augmentations do not depend on its neighbours, its position or the recipe's size
    recipe = resolve_recipe("regularized", {"size": 24, "steps": 4})
    job = AscentJob("hand", 3, 0)
    alone_start, alone_aug = initial_state(lm, [job], recipe)
    neighbours = [AscentJob("hand", 5, 0), AscentJob("second", 1, 2), job]
    mixed_start, mixed_aug = initial_state(lm, neighbours, recipe)
    np.testing.assert_array_equal(alone_start[0], mixed_start[2])
    np.testing.assert_array_equal(alone_aug[0], mixed_aug[2])
    assert alone_start.shape == (1, 24, 24, 3)
    assert np.abs(alone_start).max() <= recipe.init_scale / 2  # gray + uniform noise of +-init_scale/2


def test_a_new_checkpoint_keeps_the_pictures_of_unchanged_units(lm: LoadedModel) -> None:
    """Starts are seeded by (model key, layer, filter, seed), not by the weights: a checkpoint that differs
    only in filter 1's kernel (so in its digest) gives filter 0 the very same picture, filter 1 a new one."""
    kernel, bias = (w.copy() for w in lm.model.get_layer("hand").get_weights())
    kernel[..., RED] = 0
    kernel[1, 1, :, RED] = [-1.0, 1.0, -1.0]  # now a green detector
    retrained = hand_model()
    retrained.model.get_layer("hand").set_weights([kernel, bias])
    retrained = dataclasses.replace(retrained, digest="e2" * 32)
    jobs = [AscentJob("hand", f, 0) for f in (EDGE, RED)]
    old = AscentProgram(lm, ["hand"], RECIPE).run(jobs, batch_size=2)
    new = AscentProgram(retrained, ["hand"], RECIPE).run(jobs, batch_size=2)
    assert png_bytes(old[0].image) == png_bytes(new[0].image)
    assert old[0].activation == new[0].activation
    assert np.abs(old[1].image.astype(int) - new[1].image.astype(int)).mean() > 1.0


def test_regularized_recipe_runs_and_stays_in_range(lm: LoadedModel) -> None:
    """Jitter/rotate/zoom, blur, decay and clipping together: the image stays within the canonical range."""
    recipe = resolve_recipe("regularized", {"size": 32, "steps": 8, "crop": 0, "blur_every": 2})
    program = AscentProgram(lm, ["hand"], recipe)
    (edge, red) = program.run([AscentJob("hand", EDGE, 0), AscentJob("hand", RED, 0)], batch_size=2)
    for res in (edge, red):
        assert np.all(np.isfinite(res.raw)) and np.abs(res.raw).max() <= 1.0 + 1e-6
    r, g, b = red.image.astype(np.float64).mean(axis=(0, 1))
    assert r > g + 10 and r > b + 10
