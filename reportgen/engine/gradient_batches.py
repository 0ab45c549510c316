"""Gradient work of the `gradcam`, `saliency` and `occlusion` sections over their chosen images, run by the
executor (`reportgen.execute`) from the sections' requests before any section builds.

Each function takes the model, the chosen images and the request's parameters (plain data, see
`reportgen.work.ImageRequest.params`) and returns the arrays the section reads from the store: the
decoded model-input images (uint8) and the indices of those that decoded (`kept`), then its maps. The
batch is the planner's; the executor halves it on out-of-memory. TensorFlow is imported by the gradient
engine (`reportgen.engine.gradients`) when a function runs, so sections can import `load_inputs` and
`as_uint8` from here without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reportgen.datasets import Dataset, ImageItem, load_pixels
from reportgen.errors import NothingDecodedError


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def load_inputs(lm: Any, ds: Dataset, items: list[ImageItem], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Model-input pixels of the decodable items and their indices into `items`."""
    pixels, bad = load_pixels(items, lm.input_size, lm.channels)
    unreadable = set(bad)
    kept = np.asarray([i for i, it in enumerate(items) if it.name not in unreadable], np.int32)
    if not len(kept):
        raise NothingDecodedError(
            f"{where}: none of the {len(items)} selected images of dataset {ds.key!r} could be decoded "
            f"(e.g. {bad[0]}); check the files or pick others with `images:`"
        )
    return pixels, kept


def gradcam(
    lm: Any, pixels: np.ndarray, ids: np.ndarray, params: dict[str, Any], batch: int
) -> dict[str, np.ndarray]:
    """Class activation maps of `params["layer"]` by each of `params["methods"]` (canonical order), for
    `params["target"]` (-1: each image's top class); Faster-ScoreCAM keeps `params["max_n"]` channels.

    Grad-CAM's arrays keep the names they had before `methods` existed ("heatmaps", "maps"), the others
    are suffixed by the method, so results stored by earlier versions stay readable. `ids` (the images'
    indices in the request) are part of every gradient engine's signature; the maps do not depend on them."""
    from reportgen.engine.gradients import engine_for

    methods = list(params["methods"])
    r = engine_for(lm, batch).cams(pixels, params["layer"], params["target"], methods, params["max_n"])
    arrays: dict[str, np.ndarray] = {}
    for m in methods:
        suffix = "" if m == "gradcam" else f"_{m}"
        arrays[f"heatmaps{suffix}"], arrays[f"maps{suffix}"] = r.heatmaps[m], r.maps[m]
    return {
        **arrays,
        "classes": r.classes,
        "probability": r.probability,
        "top": r.top,
        "top_probability": r.probs[np.arange(len(r.top)), r.top],
    }


def saliency(
    lm: Any, pixels: np.ndarray, ids: np.ndarray, params: dict[str, Any], batch: int
) -> dict[str, np.ndarray]:
    """Input attributions of `params["target"]` by each of `params["methods"]`
    (`reportgen.engine.attribution.ATTRIBUTION_METHODS`).

    params: target (a class index, -1 for each image's top class, or (("layer", name), ("filter", index
    or None)) for a unit),
    methods, samples, noise, seed (SmoothGrad/VarGrad), ig_baseline, ig_steps (integrated gradients).
    `ids`: each decoded image's index in the section's chosen images, which seeds its noise (a shard of
    them draws the same noise). Returns per method its display map under the method's name (the name
    vanilla and SmoothGrad maps had before) and its signed (N, H, W, C) values as `raw_<method>`;
    integrated gradients add `ig_score_difference` and `ig_completeness_error`, guided backprop and
    deconvnet `overridden_relus` (how many ReLUs their model clone overrides, repeated per image)."""
    from reportgen.engine.attribution import AttributionParams, UnitTarget, attributor_for
    from reportgen.engine.gradients import engine_for

    target = params["target"]
    if isinstance(target, tuple):  # a unit, as (key, value) pairs: requests hold hashable plain data
        unit = dict(target)
        target = UnitTarget(unit["layer"], unit["filter"])
    p = AttributionParams(
        samples=params.get("samples", 16),
        noise=params.get("noise", 0.15),
        seed=params.get("seed", 0),
        ig_baseline=params.get("ig_baseline", "black"),
        ig_steps=params.get("ig_steps", 32),
        model_key=lm.key,
    )
    methods = list(params["methods"])
    attributor = attributor_for(engine_for(lm, batch))
    results = attributor.attribute_all(methods, pixels, target, p, ids)
    first = results[methods[0]]
    arrays = {"classes": first.classes, "probability": first.probability}
    if "guided_backprop" in methods or "deconvnet" in methods:
        # per image (arrays of image shards are concatenated), so the section can say when none was found
        rule = "guided" if "guided_backprop" in methods else "deconv"
        arrays["overridden_relus"] = np.full(len(pixels), attributor.overridden_relus(rule), np.int32)
    for m, r in results.items():
        arrays[m], arrays[f"raw_{m}"] = r.maps, r.raw
        if r.score_difference is not None and r.completeness_error is not None:
            arrays["ig_score_difference"] = r.score_difference
            arrays["ig_completeness_error"] = r.completeness_error
    return arrays


def occlusion(
    lm: Any, pixels: np.ndarray, ids: np.ndarray, params: dict[str, Any], batch: int
) -> dict[str, np.ndarray]:
    """Grad-CAMs of the images and of their occluded copies, and the sliding-patch drops.

    params: layer, target, pairs ((image index into the chosen images, mask index, box in model-input
    pixels) for every mask and image it applies to), fills (each mask's fill), sliding ((patch, stride,
    fill) or None); `ids`: each decoded image's index into the chosen images. Pairs of images that are not
    among them (undecodable, or in another shard) are dropped; `pair_image` indexes the decoded."""
    from reportgen.engine.gradients import engine_for, fill_source, occlude

    layer, target, fills = params["layer"], params["target"], params["fills"]
    pos = {int(i): k for k, i in enumerate(ids)}
    live = [(pos[i], j, box) for i, j, box in params["pairs"] if i in pos]
    eng = engine_for(lm, batch)
    base = eng.gradcam(pixels, layer, target)
    sources: dict[tuple[int, str], np.ndarray] = {}
    occluded = []
    for k, j, box in live:
        if (k, fills[j]) not in sources:
            sources[k, fills[j]] = fill_source(pixels[k : k + 1], fills[j])[0]
        occluded.append(occlude(pixels[k], sources[k, fills[j]], box))
    h, w = lm.input_size
    occ_px = np.stack(occluded) if occluded else np.zeros((0, h, w, lm.channels), np.float32)
    # The occluded image explains the class its original explained, whatever it predicts now.
    occ_targets = base.classes[[k for k, _, _ in live]].astype(np.int32)
    occ = eng.gradcam(occ_px, layer, occ_targets)
    arrays = {
        "heatmaps": base.heatmaps,
        "maps": base.maps,
        "classes": base.classes,
        "probability": base.probability,
        "top": base.top,
        "top_probability": base.probs[np.arange(len(base.top)), base.top],
        "pair_image": np.asarray([k for k, _, _ in live], np.int32).reshape(-1),
        "pair_mask": np.asarray([j for _, j, _ in live], np.int32).reshape(-1),
        "pair_box": np.asarray([box for _, _, box in live], np.int32).reshape(-1, 4),
        "occluded": as_uint8(occ_px),
        "occ_heatmaps": occ.heatmaps,
        "occ_maps": occ.maps,
        "occ_probability": occ.probability,
        "occ_top": occ.top,
        "occ_top_probability": occ.probs[np.arange(len(occ.top)), occ.top],
    }
    if params["sliding"] is not None:
        patch, stride, fill = params["sliding"]
        sl = eng.sliding(pixels, base.classes, patch, stride, fill)
        arrays.update(drops=sl.drops, sensitivity=sl.sensitivity, patch_boxes=sl.boxes, sliding_base=sl.base)
    return arrays
