"""Helpers that several section types share. Sections never import each other: what two of them need
lives here (this module defines no `ANALYSIS`, so it is no section type)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reportgen.analyses import dataset_pass
from reportgen.analyses.base import Artifact, RunContext, SectionOutput
from reportgen.datasets import Dataset, ImageItem, load_image
from reportgen.engine.gradient_batches import as_uint8, load_inputs  # noqa: F401 - the sections' image helpers
from reportgen.engine.recipes import RECIPES, Recipe, resolve_recipe
from reportgen.errors import ReportgenError, SpecError, echo
from reportgen.imaging import overlay, to_pil, upscale_for_print
from reportgen.models import LoadedModel
from reportgen.spec.fields import expand_filters
from reportgen.store import content_key
from reportgen.work import AscentRequest, DatasetRequest, peaks_key

THUMB_SIDE = 192  # thumbnails are fitted into this square; smaller images are upscaled to stay sharp
NAMES_IN_NOTE = 8  # file names a note lists before "and N more"
DEFAULT_IMAGES = 12  # images shown when a section names neither `images` nor `limit`
FINDING_IMAGES = 6  # images described one by one in the findings


# -- images of gradcam, occlusion and saliency: selection, checks, loading, keys, display ---------------


def select_images(section: Any, ctx: RunContext, index: int) -> tuple[Dataset, list[ImageItem], list[str]]:
    """The section's images; without `images`/`limit` only the first DEFAULT_IMAGES, said in a note."""
    ds = ctx.datasets.get(section.dataset)
    items = ds.select(section.images, section.limit, ctx.where(index, "images"))
    notes = []
    if section.images is None and section.limit is None and len(items) > DEFAULT_IMAGES:
        notes.append(
            f"Showing the first {DEFAULT_IMAGES} of {len(items)} images of dataset {ds.key!r}; "
            "set `limit:` or `images:` to choose others."
        )
        items = items[:DEFAULT_IMAGES]
    return ds, items, notes


def resolve_target(lm: LoadedModel, target: int | str | None, where: str) -> int:
    """Class index to explain, or -1 for each image's top prediction."""
    if target is None:
        return -1
    idx = lm.class_index(target, where)
    n = int(lm.model.output_shape[-1])
    if not 0 <= idx < n:
        raise ReportgenError(
            f"{where}: class index {idx} is out of range; model {lm.key!r} has {n} classes (0..{n - 1})"
        )
    return idx


def check_conv_layer(lm: LoadedModel, layer: str, where: str) -> None:
    """Grad-CAM weighs a layer's feature maps, so the layer must have (H, W, channels) outputs."""
    shape = tuple(lm.layer(layer, where).output.shape)
    if len(shape) != 4:
        raise ReportgenError(
            f"{where}: layer {layer!r} of model {lm.key!r} outputs {shape}, not feature maps; choose a "
            "convolutional layer (usually the last one; `reportgen layers` lists them)"
        )


def image_sizes(items: list[ImageItem]) -> list[tuple[int, int]]:
    """(width, height) of each file from its header; (0, 0) where unreadable (decoding reports it)."""
    sizes = []
    for it in items:
        try:
            with Image.open(it.path) as im:
                sizes.append(im.size)
        except OSError:
            sizes.append((0, 0))
    return sizes


def skipped_note(items: list[ImageItem], kept: np.ndarray) -> list[str]:
    """A note naming the files that could not be decoded (left out of the section)."""
    bad = [it.name for i, it in enumerate(items) if i not in set(kept.tolist())]
    if not bad:
        return []
    return [f"Skipped {len(bad)} unreadable file(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}."]


def result_key(
    kind: str, version: str, lm: LoadedModel, ds: Dataset, items: list[ImageItem], params: dict[str, Any]
) -> str:
    """Everything a result depends on: weights, preprocessing, input size, files and parameters."""
    return content_key(
        kind,
        version,
        lm.digest,
        lm.preprocessing.model_dump(),
        list(lm.input_size),
        lm.channels,
        ds.digest,
        [it.name for it in items],
        params,
    )


def for_print(image: np.ndarray, heat: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """Nearest-upscaled image (sharp in print), with the heatmap blended over it smoothly if given."""
    big = upscale_for_print(to_pil(image).convert("RGB"))
    if heat is None:
        return np.asarray(big)
    return overlay(np.asarray(big), heat, alpha)


def region_word(fx: float, fy: float) -> str:
    """A position as a share of width/height -> words (e.g. 'upper left', 'centre')."""
    row = "upper" if fy < 1 / 3 else "lower" if fy > 2 / 3 else ""
    col = "left" if fx < 1 / 3 else "right" if fx > 2 / 3 else ""
    return " ".join(w for w in (row, col) if w) or "centre"


def heat_stats(heat: np.ndarray, original: tuple[int, int]) -> dict[str, Any]:
    """Centre of mass (in the original image's pixels and as a share of its sides) and the share of all
    heat held by the hottest 10% of pixels (0.1 = spread evenly, 1 = a few pixels)."""
    h, w = heat.shape
    total = float(heat.sum())
    if total <= 0:
        return {
            "empty": True,
            "com_x": None,
            "com_y": None,
            "fx": None,
            "fy": None,
            "top10": None,
            "region": "none",
        }
    ys, xs = np.mgrid[0:h, 0:w]
    fx = float((heat * (xs + 0.5)).sum() / total / w)
    fy = float((heat * (ys + 0.5)).sum() / total / h)
    flat = np.sort(heat.ravel())[::-1]
    top10 = float(flat[: max(1, flat.size // 10)].sum() / total)
    ow, oh = original if original[0] else (w, h)
    return {
        "empty": False,
        "com_x": round(fx * ow),
        "com_y": round(fy * oh),
        "fx": fx,
        "fy": fy,
        "top10": top10,
        "region": region_word(fx, fy),
    }


def explained(lm: LoadedModel, target: int) -> str:
    return "each image's top prediction" if target < 0 else f"class {lm.class_name(target)!r}"


# -- the section ----------------------------------------------------------------------------------


# -- images of dataset sections (class_ranking, predictions) ---------------------------------------


def thumbnail(path: Path, side: int = THUMB_SIDE) -> np.ndarray:
    """Display copy of an image: fitted into side x side, tiny images upscaled (nearest) for print."""
    image = Image.fromarray(load_image(path))
    image.thumbnail((side, side), Image.BILINEAR)
    return np.asarray(upscale_for_print(image, side))


def missing_note(items: list[ImageItem], missing: list[int]) -> str | None:
    """The caveat listing files that could not be decoded (they are left out, not fatal)."""
    if not missing:
        return None
    names = [items[i].name for i in missing]
    shown = ", ".join(names[:NAMES_IN_NOTE])
    if len(names) > NAMES_IN_NOTE:
        shown += f" and {len(names) - NAMES_IN_NOTE} more"
    return f"{len(names)} unreadable image{'s' if len(names) != 1 else ''} skipped (not decodable): {shown}."


# -- filters and circuit: ascent requests and the words for a filter that never fires -------------


def dead_label(pre_relu: bool) -> str:
    """What a "dead" filter is under the recipe. Without `pre_relu` the objective is the ReLU output, which
    cannot go below 0, so a dead filter's activation stays ~0. With it the objective is the conv output
    before the ReLU, which may stay negative (e.g. -25): the filter never turns positive, and its ReLU
    output is 0 for every image the ascent tried; "stays ~0" would misdescribe a tile labelled -25."""
    return "never positive" if pre_relu else "dead"


def dead_explanation(pre_relu: bool) -> str:
    if pre_relu:
        return (
            "the objective is the conv output before its ReLU, and it stayed at or below 0 even at the "
            "optimum, so after the ReLU the filter is silent for every image tried"
        )
    return "activation stays ~0"


def known_recipes(value: list[str]) -> list[str]:
    """Field validator of a list of recipe names (`compare`): each must be a recipe, with a close match
    suggested for a typo."""
    for name in value:
        if name not in RECIPES:
            close = difflib.get_close_matches(name, list(RECIPES), n=1) if len(name) < 100 else []
            raise ValueError(
                f"unknown recipe {echo(name)}; "
                + (f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(RECIPES)}")
            )
    return value


def map_shape(lm: Any, layer: str, size: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) of a layer's maps when the model runs at `size` (the ascent may run at another
    size than the model's own when its input is flexible)."""
    shape = lm.layer(layer).output.shape
    if shape[1] is None or shape[2] is None or tuple(size) != tuple(lm.input_size):
        import keras

        sub = keras.Model(lm.model.inputs, lm.layer(layer).output)
        shape = sub.compute_output_shape((1, *size, lm.channels))
    return int(shape[1]), int(shape[2])


def check_position(
    lm: Any, layer: str, position: list[int], sizes: list[tuple[int, int]], where: str
) -> tuple[int, int]:
    """A neuron objective's [y, x], checked against the layer's map at every input size the ascent runs
    at: the engine clips a position outside the map to its edge (and reads a negative one as the centre),
    so a typo would silently visualise another unit. The position is in the map of the unpadded image.
    A located spec problem (exit 2), like the section's other fields."""
    y, x = (int(v) for v in position)
    if len(lm.layer(layer).output.shape) != 4:
        raise SpecError(
            [
                f"{where}: position: layer {layer!r} has no spatial map (output "
                f"{tuple(lm.layer(layer).output.shape)}); a neuron position needs a convolutional layer"
            ]
        )
    for size in dict.fromkeys(tuple(s) for s in sizes):
        h, w = map_shape(lm, layer, size)
        if not (0 <= y < h and 0 <= x < w):
            raise SpecError(
                [
                    f"{where}: position: [{y}, {x}] is outside the {h}x{w} map of layer {layer!r} at "
                    f"{size[0]}x{size[1]} px input; give y in 0..{h - 1} and x in 0..{w - 1}"
                ]
            )
    return y, x


def filter_requests(
    section: Any,
    ctx: RunContext,
    layer: str,
    filters: list[int],
    recipe_name: str,
    params: dict[str, Any],
    unit: dict[str, Any] | None = None,
) -> list[AscentRequest]:
    """Ascent requests for filters of one layer; shared with `circuit`, which visualises input channels.
    `unit` (`unit_options`): the objective, position, direction and diversity; the `diversity` variants
    of a filter are consecutive (they are optimised together)."""
    recipe = resolve_recipe(recipe_name, params)
    unit = unit or {}
    n = unit.get("diversity", 1)
    extra = {k: unit[k] for k in ("objective", "position", "direction") if unit.get(k) is not None}
    return [
        AscentRequest(section.model, layer, f, recipe, ctx.spec.seed, variant=v, diversity=n, **extra)
        for f in filters
        for v in range(n)
    ]


# -- visualisations beside natural exemplars: MaCo's mask, exemplar_ratio, top classes --------------------

# A visualisation whose activation is below this share of the best natural image's falls "far below" its
# exemplars: the ascent maximises exactly that number, so it should beat any photo; less than half means
# the optimisation (its size, regularisers, steps) did not find what the unit responds to.
FAR_BELOW = 0.5
SILENT_REFERENCE = 1e-6  # a best natural activation at most this: the unit never fires there, no ratio


def mask_alpha(mask: np.ndarray, crop: int) -> np.ndarray:
    """MaCo's transparency (H, W) as alpha in [0, 1]: cropped like the image, scaled so the 99th percentile
    is opaque (a few extreme gradients would otherwise leave everything else invisible)."""
    m = np.asarray(mask, np.float64)
    if crop and m.shape[0] > 2 * crop + 8 and m.shape[1] > 2 * crop + 8:
        m = m[crop:-crop, crop:-crop]
    top = np.percentile(m, 99)
    return np.clip(m / top, 0.0, 1.0) if top > 0 else np.ones_like(m)


def fade(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The image over white with the given alpha: where the mask is low the image fades out."""
    a = alpha[..., None]
    return (image.astype(np.float64) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def visual_tile(
    ctx: RunContext,
    out: SectionOutput,
    req: AscentRequest,
    recipe_name: str,
    recipe: Recipe,
    path: Path,
    meta: dict[str, Any],
    stem: str,
    extra: dict[str, Any] | None = None,
) -> tuple[np.ndarray, Artifact | None]:
    """A visualisation as shown: the stored image, or for MaCo the image faded by its transparency mask,
    with the mask as its own artifact (`.npy` + PNG, `"kind": "mask"`); `filters` and `exemplars` show
    the same tile for the same result."""
    tile = np.asarray(Image.open(path).convert("RGB"))
    if not meta.get("mask"):
        return tile, None
    place = (req.layer, artifact_filter(req))
    alpha, artifact = mask_artifact(ctx, out, req, recipe_name, recipe.crop, stem, place, extra)
    return fade(tile, alpha), artifact


def mask_artifact(
    ctx: RunContext,
    out: SectionOutput,
    req: AscentRequest,
    recipe_name: str,
    crop: int,
    stem: str,
    place: tuple[str | None, int | None],
    extra: dict[str, Any] | None = None,
) -> tuple[np.ndarray, Artifact]:
    """A MaCo result's transparency mask as the section shows it (alpha in [0, 1], cropped by `crop` like
    the displayed image) and as its own artifact: the stored mask as `.npy` (metrics' `array`) and the
    alpha as PNG, `"kind": "mask"`, at `place` = (layer, filter) of the picture it belongs to, with the
    recipe and `extra` (e.g. the variant, or a class model's class) as metrics. `filters`,
    `exemplars` and `class_model` write the same files for the same result."""
    mask = ctx.store.get_npy(ctx.ascent.requests[req] + "-mask")
    alpha = mask_alpha(mask, crop)
    array = out.array(f"{stem}_mask.npy", mask)
    png = out.image(f"{stem}_mask.png", (alpha * 255).astype(np.uint8))
    metrics = {"recipe": recipe_name, "array": array, **(extra or {})}
    return alpha, Artifact("mask", png, req.model, place[0], place[1], metrics)


def artifact_filter(req: AscentRequest) -> int | None:
    """The artifact's filter field: None for the one image of a `layer` / `direction` objective."""
    return None if req.objective in ("layer", "direction") else req.filter


def exemplar_partner(ctx: RunContext, model: str, layer: str) -> tuple[str, int, set[int]] | None:
    """(dataset, top k, units) of the first `exemplars` section of the spec on this model and layer: the
    natural images a visualisation of one of those units is compared with (`exemplar_ratio`)."""
    for s in ctx.spec.sections:
        if s.type == "exemplars" and s.model == model and s.layer == layer:
            channels = ctx.models.get(model).layer_channels(layer)
            return s.dataset, s.top, set(expand_filters(s.filters, channels))
    return None


def reference_request(model: str, dataset: str, layer: str, objective: str, k: int) -> DatasetRequest | None:
    """What the dataset pass must keep to compare a visualisation with natural images under the same
    statistic: a channel objective (the map's mean) with each image's channel mean ("means", the piece
    class rankings read), a neuron (one position) with the images' peaks ("topk" with the exemplars' k);
    a layer or direction objective has no single unit to compare."""
    if objective == "channel":
        return DatasetRequest(model, dataset, layers=(layer,))
    if objective == "neuron":
        return DatasetRequest(model, dataset, layers=(layer,), stats=("topk",), k=k)
    return None


def reference_activations(
    ctx: RunContext, lm: LoadedModel, ds: Dataset, layer: str, objective: str, k: int
) -> np.ndarray | None:
    """(C,) the best natural activation of each channel under the objective's statistic (see
    `reference_request`): the largest channel mean over the images, or the top exemplar's peak."""
    if objective == "channel":
        means = dataset_pass.layer_means(ctx, lm, ds, layer)["means"]
        valid = ~np.isnan(means).any(axis=1)
        return means[valid].max(axis=0) if valid.any() else None
    if objective == "neuron":
        return ctx.result(peaks_key(lm, ds, layer, "topk", k), "dataset pass")["value"][0]
    return None


def exemplar_ratio(activation: float, reference: float) -> float | None:
    """The visualisation's activation over the best natural image's (None where the unit never fires on
    the dataset: a ratio to ~0 says nothing)."""
    return float(activation / reference) if reference > SILENT_REFERENCE else None


def class_means(means: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) per-image channel means -> (K, C) per-class means and (K,) image counts.

    Rows of undecodable images (NaN) are left out; classes without any image get NaN means.
    """
    valid = ~np.isnan(means).any(axis=1)
    sums = np.zeros((n_classes, means.shape[1]), np.float64)
    np.add.at(sums, labels[valid], means[valid].astype(np.float64))
    counts = np.bincount(labels[valid], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


def unit_list(units: list[str], shown: int = NAMES_IN_NOTE) -> str:
    """"1, 4, 9 and 3 more": units named in a finding, the list capped for wide layers."""
    head = ", ".join(units[:shown])
    return head + (f" and {len(units) - shown} more" if len(units) > shown else "")


# `faithfulness: true` of the map sections (gradcam, saliency): deletion/insertion curves (Petsiuk et al.
# 2018) of each map, computed with the maps (`reportgen.engine.sanity_batches`).
FAITHFULNESS_STEPS = 16  # deletion/insertion levels
FAITHFULNESS_BASELINE = "blur"  # what deleted pixels become (RISE's blurred copy)


def curve_params(ctx: RunContext) -> dict[str, Any]:
    """The deletion/insertion parameters of `faithfulness: true` (seed: the curves' tie-breaks)."""
    return {"steps": FAITHFULNESS_STEPS, "baseline": FAITHFULNESS_BASELINE, "seed": ctx.spec.seed}


def map_areas(res: dict[str, np.ndarray], method: str, k: int) -> dict[str, float]:
    """Image k's deletion and insertion areas of one method's maps, as the engine stored them."""
    s = method.replace("++", "pp")
    return {"deletion_auc": round(float(res[f"deletion_auc_{s}"][k]), 4),
            "insertion_auc": round(float(res[f"insertion_auc_{s}"][k]), 4)}  # fmt: skip


def faithfulness_findings(faithful: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """Each method's mean deletion and insertion areas, and (with several methods) which is most faithful."""
    if not faithful:
        return []
    methods = list(dict.fromkeys(f["method"] for f in faithful))
    mean = {
        m: (np.mean([f["deletion_auc"] for f in faithful if f["method"] == m]),
            np.mean([f["insertion_auc"] for f in faithful if f["method"] == m]))
        for m in methods
    }  # fmt: skip
    out = [
        f"{labels[m]}: deletion area {d:.3f} (lower: the map finds the evidence), insertion area {i:.3f} "
        "(higher is better) on average."
        for m, (d, i) in mean.items()
    ]
    if len(methods) > 1:
        best_d = min(methods, key=lambda m: mean[m][0])
        best_i = max(methods, key=lambda m: mean[m][1])
        out.append(f"Most faithful by deletion: {labels[best_d]}; by insertion: {labels[best_i]}.")
    return out
