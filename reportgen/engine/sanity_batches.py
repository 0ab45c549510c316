"""The work of the `sanity` section and of `faithfulness: true` in `gradcam` and `saliency`, run by the
executor (`reportgen.execute.pixel_engine`) from the sections' requests before any section builds.

`sanity`: each method's maps on the trained model, their deletion/insertion curves
(`reportgen.engine.faithfulness`), and the maps of the same images and classes on the model randomised
from the top down (`reportgen.engine.randomize`) with their similarity to the trained model's maps.
`gradcam_faithfulness` / `saliency_faithfulness`: the section's batch (`gradient_batches.gradcam` /
`.saliency`) plus the curves of its maps.

Array names use the method's slug ("gradcam++" -> "gradcampp"). Every array is per image, so the shards of
a request merge by concatenation (`reportgen.execute.merge_image_shards`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reportgen.engine.gradient_batches import gradcam, saliency
from reportgen.engine.methods import CAM_METHODS


def slug(method: str) -> str:
    return method.replace("++", "pp")


def attribution_maps(
    lm: Any, batch: int, pixels: np.ndarray, targets: np.ndarray | int, methods: list[str],
    params: dict[str, Any], ids: np.ndarray,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:  # fmt: skip
    """(N, H, W) map of each method at the model's input size, the class each explains (`targets`, or each
    image's top class where -1) and its probability: CAMs of `params["layer"]` from one pass (Score-CAM's
    masked passes batched), input-space methods through the shared attribution engine
    (`reportgen.engine.attribution`: their display maps, e.g. |sum over colour channels| of gradient x
    input), which shares one clean gradient pass and one noisy pass between them. The first family run
    resolves the classes, which the other then explains."""
    from reportgen.engine.attribution import AttributionParams, attributor_for
    from reportgen.engine.gradients import engine_for

    eng = engine_for(lm, batch)
    out: dict[str, np.ndarray] = {}
    cams = [m for m in methods if m in CAM_METHODS]
    if cams:
        r = eng.cams(pixels, params["layer"], targets, cams, params["max_n"])
        out.update(r.heatmaps)
        targets, probability = r.classes, r.probability
    others = [m for m in methods if m not in CAM_METHODS]
    if others:
        p = AttributionParams(
            samples=params["samples"], noise=params["noise"], seed=params["seed"],
            ig_baseline=params["ig_baseline"], ig_steps=params["ig_steps"], model_key=params["model_key"],
        )  # fmt: skip
        found = attributor_for(eng).attribute_all(others, pixels, targets, p, ids)
        out.update({m: a.maps for m, a in found.items()})
        targets, probability = found[others[0]].classes, found[others[0]].probability
    return {m: out[m].astype(np.float32) for m in methods}, np.asarray(targets, np.int32), probability


def _curves(
    lm: Any, batch: int, pixels: np.ndarray, ids: np.ndarray, maps: dict[str, np.ndarray],
    classes: np.ndarray, params: dict[str, Any],
) -> dict[str, np.ndarray]:  # fmt: skip
    """Deletion/insertion curves and their areas of each method's maps, as arrays named by its slug."""
    from reportgen.engine.faithfulness import curve_program

    program = curve_program(lm, batch)
    arrays: dict[str, np.ndarray] = {}
    for m, values in maps.items():
        c = program.curves(pixels, values, classes, params["steps"], params["baseline"], params["seed"], ids)
        s = slug(m)
        arrays.update({
            f"deletion_{s}": c.deletion, f"insertion_{s}": c.insertion,
            f"deletion_auc_{s}": c.deletion_auc, f"insertion_auc_{s}": c.insertion_auc,
        })  # fmt: skip
    return arrays


def sanity(
    lm: Any, pixels: np.ndarray, ids: np.ndarray, params: dict[str, Any], batch: int
) -> dict[str, np.ndarray]:
    """Maps, faithfulness curves and the randomisation cascade of `params["methods"]`, all computed on one
    clone of the model (`randomize.cascade`; the trained maps at its step 0), so each program traces once.

    params: methods, layer (CAMs), max_n (Faster-ScoreCAM), target (-1: each image's top class), steps and
    baseline (curves), depth (cascade steps; None: every parameterised layer), seed. `ids`: each decoded
    image's index in the section's chosen images (seeds its tie-breaking in the curves)."""
    from reportgen.engine.faithfulness import spearman, ssim
    from reportgen.engine.randomize import cascade

    methods = list(params["methods"])
    pixels = np.asarray(pixels, np.float32)
    target = np.full(len(pixels), params["target"], np.int32)
    steps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    arrays: dict[str, np.ndarray] = {}
    for _, layer, work in cascade(lm, params["seed"], params["depth"]):
        if layer is None:  # step 0: the clone holds the trained weights: the reference maps, their curves
            # the trained model's classes; every randomised model explains the same ones
            maps, classes, probability = attribution_maps(work, batch, pixels, target, methods, params, ids)
            arrays.update(classes=classes, probability=probability)
            arrays.update({f"map_{slug(m)}": maps[m] for m in methods})
            arrays.update(_curves(work, batch, pixels, ids, maps, classes, params))
            continue
        _sync_relu_twins(work, batch, layer)
        for m, values in attribution_maps(work, batch, pixels, classes, methods, params, ids)[0].items():
            steps[m].append(values)
    n, (h, w) = len(pixels), lm.input_size
    for m in methods:
        s = slug(m)
        stack = np.stack(steps[m], axis=1) if steps[m] else np.zeros((n, 0, h, w), np.float32)
        arrays[f"cascade_{s}"] = stack
        arrays[f"spearman_{s}"] = np.asarray(
            [[spearman(maps[m][i], stack[i, k]) for k in range(stack.shape[1])] for i in range(n)], np.float32
        ).reshape(n, -1)
        arrays[f"ssim_{s}"] = np.asarray(
            [[ssim(maps[m][i], stack[i, k]) for k in range(stack.shape[1])] for i in range(n)], np.float32
        ).reshape(n, -1)
    return arrays


def _sync_relu_twins(randomised: Any, batch: int, layer: str) -> None:
    """Guided backprop and deconvnet run on the attribution engine's own copies of the model (ReLU gradients
    overridden), made once with the weights of their day: give them the randomised layer's new weights, so
    their compiled programs see the cascade too (and stay compiled once)."""
    from reportgen.engine.attribution import attributor_for
    from reportgen.engine.gradients import engine_for

    attributor_for(engine_for(randomised, batch)).sync_weights([layer])


def gradcam_faithfulness(
    lm: Any, pixels: np.ndarray, ids: np.ndarray, params: dict[str, Any], batch: int
) -> dict[str, np.ndarray]:
    """The `gradcam` section's arrays (`gradient_batches.gradcam`) plus deletion/insertion curves of each
    method's maps for the class it explains. params: gradcam's, plus steps, baseline, seed."""
    arrays = gradcam(lm, pixels, ids, params, batch)
    maps = {m: arrays["heatmaps" if m == "gradcam" else f"heatmaps_{m}"] for m in params["methods"]}
    pixels = np.asarray(pixels, np.float32)
    return {**arrays, **_curves(lm, batch, pixels, ids, maps, arrays["classes"], params)}


def saliency_faithfulness(
    lm: Any, pixels: np.ndarray, ids: np.ndarray, params: dict[str, Any], batch: int
) -> dict[str, np.ndarray]:
    """The `saliency` section's arrays (`gradient_batches.saliency`) plus deletion/insertion curves of each
    method's display map for the class it explains. params: saliency's, plus steps, baseline, seed."""
    arrays = saliency(lm, pixels, ids, params, batch)
    maps = {m: arrays[m] for m in params["methods"]}
    pixels = np.asarray(pixels, np.float32)
    return {**arrays, **_curves(lm, batch, pixels, ids, maps, arrays["classes"], params)}
