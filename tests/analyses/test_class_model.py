"""class_model: a tiny model whose logits are the mean of each colour channel (hand-set 1x1 conv + global
average pooling), so maximising "red" must make the image red; the reported confidence is checked against
the model's own softmax on the returned image."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from reportgen.engine.ascent import AscentJob  # noqa: E402
from reportgen.engine.class_model import ClassModelProgram, ClassModelResult  # noqa: E402
from reportgen.engine.recipes import resolve_recipe  # noqa: E402
from reportgen.models import LoadedModel  # noqa: E402
from reportgen.spec.fields import Preprocess  # noqa: E402
from reportgen.work import CLASS_TAG  # noqa: E402

SIDE = 16
GAIN = 4.0  # logits in [0, 4]: softmax is not saturated, so confidences are informative


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    inp = keras.Input((SIDE, SIDE, 3))
    x = keras.layers.Conv2D(3, 1, use_bias=False, name="colour")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Activation("softmax", name="probs")(x))
    model.get_layer("colour").set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3) * GAIN])
    return LoadedModel("rgb", model, Preprocess(scale=1 / 255.0), (SIDE, SIDE), ["red", "green", "blue"],
                       "digest", "test")


@pytest.fixture(scope="module")
def program(lm) -> ClassModelProgram:
    return ClassModelProgram(lm, resolve_recipe("regularized", {"steps": 12}))


def classes(program: ClassModelProgram, targets: list[int], seed: int) -> list[ClassModelResult]:
    """All targets in one batch, as the scheduler's chunk loop runs them."""
    return program.run_classes([AscentJob(CLASS_TAG, t, seed) for t in targets], len(targets))


def test_logits_are_pre_softmax(lm):
    pixels = np.zeros((1, SIDE, SIDE, 3), np.float32)
    pixels[..., 0] = 255
    logits = keras.Model(lm.model.inputs, lm.logits_output)(pixels / 255.0).numpy()
    np.testing.assert_allclose(logits, [[GAIN, 0, 0]], atol=1e-5)


def test_maximising_red_and_blue_in_one_batch(lm, program):
    red, blue = lm.class_index("red"), lm.class_index("Blue")
    results = classes(program, [red, blue], seed=0)
    assert program.trace_count == 1
    by_class = {r.target: r for r in results}

    img = by_class[red].image.astype(np.float64)
    means = img.mean(axis=(0, 1))
    assert means[0] > means[1] + 50 and means[0] > means[2] + 50
    assert by_class[red].top_class == red and by_class[red].logit_final > by_class[red].logit_start
    img = by_class[blue].image.astype(np.float64).mean(axis=(0, 1))
    assert img[2] > img[0] + 50 and img[2] > img[1] + 50

    for r in results:
        assert r.image.dtype == np.uint8 and r.image.shape == (SIDE, SIDE, 3)
        own = lm.model(r.image[None].astype(np.float32) / 255.0).numpy()[0]  # the model's own softmax
        np.testing.assert_allclose(r.probs, own, rtol=1e-5, atol=1e-6)
        assert r.confidence == pytest.approx(float(own[r.target]), rel=1e-5)
        np.testing.assert_allclose(r.logit_final, GAIN * r.image[..., r.target].mean() / 255.0, rtol=1e-4)
        # the logit objective saturates the target channel and leaves the others near gray (it does not
        # push other classes down as maximising the probability would): softmax([4, 2, 2]) ~ 0.79
        assert r.confidence > 0.75


def test_new_classes_do_not_retrace_and_results_are_seeded_per_class(lm, program):
    together = {r.target: r.image for r in classes(program, [0, 2], seed=5)}
    alone = classes(program, [2], seed=5)[0].image
    assert program.trace_count == 1
    np.testing.assert_array_equal(together[2], alone)  # batch-invariant: cacheable per class
    other_seed = classes(program, [2], seed=6)[0].image
    assert not np.array_equal(other_seed, alone)


def test_bfloat16_optimisation_reports_the_float32_models_confidence(lm):
    program = ClassModelProgram(lm, resolve_recipe("regularized", {"steps": 6}), "bfloat16")
    r = classes(program, [lm.class_index("green")], seed=0)[0]
    means = r.image.astype(np.float64).mean(axis=(0, 1))
    assert means[1] > means[0] + 50 and means[1] > means[2] + 50
    own = lm.model(r.image[None].astype(np.float32) / 255.0).numpy()[0]
    np.testing.assert_allclose(r.probs, own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["fourier", "maco"])
def test_fourier_and_maco_class_models_raise_the_logit_reproducibly(lm, recipe):
    """lucid's Fourier recipe and MaCo (phase only) through the class logit. With `fourier`, maximising
    "red" makes red the brightest channel (the padded canvas is scaled back to the fixed 16-px input);
    MaCo keeps a natural magnitude spectrum, so it can barely move a colour mean (this logit's only
    input) but still raises it. A fresh program gives the same pixels: the draws are seeded per class."""
    params = {"steps": 24, "lr": 0.2} if recipe == "fourier" else {"steps": 24}
    program = ClassModelProgram(lm, resolve_recipe(recipe, params))
    red = lm.class_index("red")
    (r,) = classes(program, [red], seed=0)
    means = r.image.astype(np.float64).mean(axis=(0, 1))
    if recipe == "fourier":
        assert means[0] > means[1] + 10 and means[0] > means[2] + 10, means
        assert r.logit_final > r.logit_start + 0.5 and r.top_class == red
    else:
        assert r.logit_final > r.logit_start + 0.05
    np.testing.assert_allclose(r.logit_final, GAIN * means[0] / 255.0, rtol=1e-4)  # scored as saved
    own = lm.model(r.image[None].astype(np.float32) / 255.0).numpy()[0]
    np.testing.assert_allclose(r.probs, own, rtol=1e-5, atol=1e-6)
    assert (r.mask is not None) == (recipe == "maco")  # MaCo's transparency comes along
    (again,) = classes(ClassModelProgram(lm, resolve_recipe(recipe, params)), [red], seed=0)
    np.testing.assert_array_equal(again.image, r.image)


MACO_SPEC = """\
title: MaCo class models
output: out
formats: [html]
models:
  rgb: {path: rgb.keras, preprocess: unit, class_names: [red, green, blue]}
sections:
  - type: class_model
    model: rgb
    classes: [red, blue]
    recipe: maco
    params: {steps: 12, crops: 2}
"""


def test_maco_class_models_store_and_show_their_transparency_mask(lm, tmp_path):
    """A run with `recipe: maco` writes one `"kind": "mask"` artifact per class, with the class image's
    model and class fields: its .npy is the mask the engine returns for that class (same seed, a fresh
    program), at the image's spatial size, and its PNG is that mask as alpha in [0, 1] (99th percentile
    opaque, as `filters` shows MaCo tiles); the report shows the image faded by it beside the image."""
    import json

    from PIL import Image

    from reportgen.analyses.shared import fade, mask_alpha
    from reportgen.runner import run

    lm.model.save(tmp_path / "rgb.keras")
    (tmp_path / "spec.yaml").write_text(MACO_SPEC, encoding="utf-8")
    run(tmp_path / "spec.yaml", quiet=True)
    out = tmp_path / "out"
    (section,) = json.loads((out / "manifest.json").read_text())["sections"]
    images = {a["class"]: a for a in section["artifacts"] if a["kind"] == "class_model"}
    masks = {a["class"]: a for a in section["artifacts"] if a["kind"] == "mask"}
    assert set(images) == set(masks) == {0, 2}

    program = ClassModelProgram(lm, resolve_recipe("maco", {"steps": 12, "crops": 2}))
    html = (out / "report.html").read_text()
    for r in classes(program, [0, 2], seed=0):
        a, image = masks[r.target], images[r.target]
        assert (a["model"], a["layer"], a["filter"]) == (image["model"], image["layer"], image["filter"])
        assert (a["name"], a["recipe"]) == (image["name"], "maco") and a["array"].endswith(".npy")
        stored = np.load(out / a["array"], allow_pickle=False)
        assert stored.shape == r.image.shape[:2] == (SIDE, SIDE)
        np.testing.assert_allclose(stored, r.mask, rtol=1e-5, atol=1e-7)
        assert stored.min() >= 0 and stored.max() > 0
        alpha = np.asarray(Image.open(out / a["path"]), np.float64) / 255.0
        assert alpha.shape == (SIDE, SIDE) and 0 <= alpha.min() and alpha.max() == 1.0
        np.testing.assert_allclose(alpha, mask_alpha(stored, 0), atol=1 / 255)
        # the overlay beside the image: the scored pixels faded to white by that alpha, upscaled for print
        overlay = out / image["path"].replace(".png", "_masked.png")
        assert overlay.is_file() and overlay.relative_to(out).as_posix() in html
        shown = np.asarray(Image.open(overlay).convert("RGB"))
        factor = shown.shape[0] // SIDE
        np.testing.assert_array_equal(shown[::factor, ::factor], fade(r.image, mask_alpha(stored, 0)))
    assert "transparency mask" in html and html.count("cm-masked") == 2
