"""The `fourier` and `maco` recipes, the objectives beyond the channel mean, diversity and the quality
figures, on a model whose kernels are set by hand, so the right picture is known in advance."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from reportgen.engine.ascent import AscentJob, AscentProgram
from reportgen.engine.quality import hf_energy
from reportgen.engine.recipes import resolve_recipe
from reportgen.models import PRESETS, LoadedModel

XRAMP, YRAMP = 0, 1  # filters of layer "ramp"; 2..5 are random
SIZE = 32
# the recipes at test scale: lucid's transforms shrunk to a 32-px image, few steps
FOURIER = resolve_recipe(
    "fourier",
    {"size": SIZE, "steps": 40, "pad": 2, "jitter": 2, "jitter_after": 1, "rotate": 5, "scale": 0.05},
)
# maco keeps its own crop schedule (whole image -> half): with xplique's 50% -> 5% on a canvas the size of
# the model's input the final image did not drive the unit as a whole (this test's `not res.dead` failed)
MACO = resolve_recipe("maco", {"size": SIZE, "steps": 64, "crops": 4})


def ramp_model() -> LoadedModel:
    """Input -> Conv2D "ramp" (6 filters, 7x7, linear) -> AveragePooling2D(2) "pool".

    filter 0: x-ramp, weight (j - 3) at column j on every channel: responds to brightness rising along x,
    i.e. vertical structure; filter 1: the same along y (horizontal structure); 2..5: random."""
    inp = keras.Input((None, None, 3))
    ramp = keras.layers.Conv2D(6, 7, name="ramp")
    pool = keras.layers.AveragePooling2D(2, name="pool")
    model = keras.Model(inp, pool(ramp(inp)))
    rng = np.random.default_rng(3)
    kernel = rng.normal(0, 0.3, (7, 7, 3, 6)).astype(np.float32)
    steps = np.arange(7, dtype=np.float32) - 3
    kernel[..., XRAMP] = steps[None, :, None] / 10
    kernel[..., YRAMP] = steps[:, None, None] / 10
    ramp.set_weights([kernel, np.zeros(6, np.float32)])
    return LoadedModel(
        key="ramp", model=model, preprocessing=PRESETS["tf"], input_size=(SIZE, SIZE),
        class_names=None, digest="r2" * 32, description="hand-set ramps",
    )  # fmt: skip


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return ramp_model()


def energy(image: np.ndarray, weight: np.ndarray | None = None) -> tuple[float, float]:
    """(x, y) gradient energy of an image, optionally weighted per pixel."""
    img = image.astype(np.float64).mean(axis=-1)
    dx, dy = np.diff(img, axis=1)[:-1, :] ** 2, np.diff(img, axis=0)[:, :-1] ** 2
    w = np.ones_like(dx) if weight is None else weight[:-1, :-1]
    return float((dx * w).sum() / w.sum()), float((dy * w).sum() / w.sum())


def centre_window(image: np.ndarray, half: int = 4) -> np.ndarray:
    """The centre neuron's receptive field (7 px) and a pixel around it."""
    c = image.shape[0] // 2
    return image[c - half : c + half, c - half : c + half]


@pytest.fixture(scope="module")
def fourier_neurons(lm: LoadedModel) -> dict[int, object]:
    program = AscentProgram(lm, ["ramp"], FOURIER)
    jobs = [AscentJob("ramp", f, 0, objective="neuron") for f in (XRAMP, YRAMP)]
    return {r.job.filter: r for r in program.run(jobs, batch_size=2)}


def test_fourier_neuron_draws_the_ramps_orientation(fourier_neurons) -> None:
    dx, dy = energy(centre_window(fourier_neurons[XRAMP].image))
    assert dx > 4 * dy, (dx, dy)
    dx, dy = energy(centre_window(fourier_neurons[YRAMP].image))
    assert dy > 4 * dx, (dx, dy)
    for res in fourier_neurons.values():
        assert res.activation > res.initial_activation + 1.0 and not res.dead
        assert res.mask is None  # only MaCo keeps its mask


def test_maco_draws_the_orientation_inside_its_mask(lm: LoadedModel) -> None:
    """Summed over three seeds: one random phase start can leave a weak orientation (seen: 1.43x)."""
    program = AscentProgram(lm, ["ramp"], MACO)
    jobs = [AscentJob("ramp", f, seed, objective="neuron") for f in (XRAMP, YRAMP) for seed in range(3)]
    results = program.run(jobs, batch_size=2)
    for f, (a, b) in ((XRAMP, (0, 1)), (YRAMP, (1, 0))):
        total = np.zeros(2)
        for res in (r for r in results if r.job.filter == f):
            mask = res.mask
            assert mask is not None and mask.shape == (SIZE, SIZE) and mask.min() >= 0 and mask.max() > 0
            total += energy(res.image, (mask / mask.max()) ** 2)  # weighted towards where the mask is strong
            assert res.activation > res.initial_activation and not res.dead
        assert total[a] > 1.5 * total[b], (f, total)


@pytest.mark.parametrize("recipe", [FOURIER, MACO], ids=["fourier", "maco"])
def test_one_trace_and_bit_identical_across_batch_sizes(lm: LoadedModel, recipe) -> None:
    """A mix of objectives in one batch; new filters do not retrace; batch 1 and batch 4 agree bit for bit."""
    program = AscentProgram(lm, ["ramp", "pool"], recipe)
    jobs = [
        AscentJob("ramp", 2, 0),
        AscentJob("pool", 3, 0, objective="neuron", position=(4, 5)),
        AscentJob("ramp", 0, 0, objective="layer"),
        AscentJob("pool", 0, 0, objective="direction", direction=(0.5, -1.0, 0.0, 2.0, 0.0, 1.0)),
    ]
    one = program.run(jobs, batch_size=1)
    four = program.run(jobs, batch_size=4)
    more = program.run([AscentJob("ramp", f, 5) for f in range(6)], batch_size=3)
    assert program.trace_count == 1
    assert len(more) == 6
    for a, b in zip(one, four, strict=True):
        assert np.array_equal(a.raw, b.raw) and a.activation == b.activation
        assert (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)
        assert a.robustness == b.robustness and a.hf_energy == b.hf_energy


def test_one_hot_direction_is_the_channel_objective(lm: LoadedModel) -> None:
    """The direction objective with a one-hot vector is the channel mean, to the bit (the other channels
    contribute exact zeros); a direction of another channel gives another image."""
    program = AscentProgram(lm, ["ramp"], FOURIER)
    onehot = tuple(float(c == 4) for c in range(6))
    other = tuple(float(c == 5) for c in range(6))
    a, b, c = program.run(
        [
            AscentJob("ramp", 4, 0),
            AscentJob("ramp", 4, 0, objective="direction", direction=onehot),
            AscentJob("ramp", 4, 0, objective="direction", direction=other),
        ]
    )
    assert np.array_equal(a.raw, b.raw)
    assert not np.array_equal(a.raw, c.raw)


def pairwise_correlations(images: list[np.ndarray]) -> list[float]:
    flat = [i.astype(np.float64).ravel() for i in images]
    return [
        float(np.corrcoef(flat[i], flat[j])[0, 1]) for i in range(len(flat)) for j in range(i + 1, len(flat))
    ]


def test_diversity_gives_distinct_images(lm: LoadedModel) -> None:
    """Three variants of one channel, optimised together with lucid's Gram penalty, differ more than the
    same three seeds without the penalty; they stay together in a chunk whatever the batch size."""
    recipe = resolve_recipe("fourier", {"size": SIZE, "steps": 40, "pad": 2, "jitter": 2, "jitter_after": 1})
    plain = resolve_recipe(
        "fourier",
        {"size": SIZE, "steps": 40, "pad": 2, "jitter": 2, "jitter_after": 1, "diversity_weight": 0},
    )
    jobs = [AscentJob("ramp", 3, 0, variant=v, diversity=3) for v in range(3)]
    diverse = AscentProgram(lm, ["ramp"], recipe)
    res = diverse.run(jobs, batch_size=2)  # a chunk of 2 cannot hold the group: it runs as one chunk of 3
    assert [r.job.variant for r in res] == [0, 1, 2]
    base = AscentProgram(lm, ["ramp"], plain).run(jobs, batch_size=3)
    with_penalty = pairwise_correlations([r.image for r in res])
    without = pairwise_correlations([r.image for r in base])
    assert max(with_penalty) < 0.8, with_penalty
    assert np.mean(with_penalty) < np.mean(without) - 0.05, (with_penalty, without)
    again = diverse.run(jobs, batch_size=8)
    assert all(np.array_equal(a.raw, b.raw) for a, b in zip(res, again, strict=True))


def test_hf_energy_separates_noise_from_smooth_images() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.repeat((127 + 100 * np.sin(xx / 6.0) * np.cos(yy / 9.0))[..., None], 3, axis=2)
    assert 0.7 < hf_energy(noise) < 0.9  # white noise: the area beyond radius 0.25 of the unit square
    assert hf_energy(smooth) < 0.01


def test_fourier_is_smoother_than_pixel_ascent(lm: LoadedModel, fourier_neurons) -> None:
    """The quality figures come with every result; pixel-space ascent of a random filter is rougher."""
    pixel = resolve_recipe("keras-example", {"size": SIZE, "steps": 40, "crop": 0})
    fourier = AscentProgram(lm, ["ramp"], FOURIER).run([AscentJob("ramp", 2, 0)])[0]
    keras_example = AscentProgram(lm, ["ramp"], pixel).run([AscentJob("ramp", 2, 0)])[0]
    assert fourier.hf_energy < keras_example.hf_energy / 2, (fourier.hf_energy, keras_example.hf_energy)
    assert fourier.robustness is not None and fourier_neurons[XRAMP].robustness is not None
