"""Deletion and insertion curves (Petsiuk et al. 2018, "RISE") and the similarity of two attribution maps
(Spearman rank correlation and SSIM, as in Adebayo et al. 2018, "Sanity checks for saliency maps").

Deletion replaces the image's pixels by a baseline in the order of the map, most important first, and reads
the class probability after each step: a map that points at the evidence makes the probability fall fast
(low area under the curve). Insertion starts from the baseline and puts the pixels back in the same order:
a good map makes the probability rise fast (high area). The x-axis is the share of pixels moved, 0..1, in
`steps` equal levels, so the areas of images of different sizes compare.

Every (image, level, deletion|insertion) row is assembled inside one compiled function from the images,
their baselines and each pixel's rank in the map (a `where` on rank < level), so the rows of all images
stream through the model in batches and nothing retraces for a new image, map or level.

Ties in a map (the flat zero region of a Grad-CAM, say) are broken by a permutation seeded per (seed,
image): a raster order would remove the top rows first and favour maps whose zeros lie where the
evidence is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Baseline = Literal["blur", "gray"]
BASELINES: tuple[str, ...] = ("blur", "gray")
DEFAULT_STEPS = 16
SSIM_WINDOW = 7  # skimage's default window; smaller maps use the largest odd side that fits


@dataclass
class Curves:
    deletion: np.ndarray  # float32 (N, steps + 1): class probability after deleting each level's pixels
    insertion: np.ndarray  # float32 (N, steps + 1): the same after inserting them into the baseline
    deletion_auc: np.ndarray  # float32 (N,) area under the deletion curve over x in [0, 1]
    insertion_auc: np.ndarray  # float32 (N,)


def auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoid area under curves sampled at evenly spaced x in [0, 1] (last axis) -> values in [0, 1]
    for probabilities."""
    c = np.asarray(curves, np.float64)
    steps = c.shape[-1] - 1
    return ((c[..., :-1] + c[..., 1:]).sum(axis=-1) / (2.0 * steps)).astype(np.float32)


def levels(pixels: int, steps: int) -> np.ndarray:
    """Number of pixels moved at each of the steps + 1 levels: 0, ..., all of them."""
    return np.rint(np.linspace(0, pixels, steps + 1)).astype(np.int32)


def pixel_ranks(maps: np.ndarray, seed: int, ids: Sequence[int]) -> np.ndarray:
    """(N, H, W) attributions -> (N, H, W) int32 rank of each pixel, 0 = largest value; ties broken by a
    permutation seeded per (seed, image id), so a shard of the images ranks as the whole set would."""
    maps = np.asarray(maps, np.float32)
    n, h, w = maps.shape
    ranks = np.empty((n, h * w), np.int32)
    for i in range(n):
        tie = np.random.default_rng([seed, int(ids[i])]).permutation(h * w)
        order = np.lexsort((tie, -maps[i].ravel()))
        ranks[i, order] = np.arange(h * w, dtype=np.int32)
    return ranks.reshape(n, h, w)


def baseline_images(pixels: np.ndarray, baseline: str) -> np.ndarray:
    """What deleted pixels become and insertion starts from: RISE's blurred copy (keeps the coarse colour
    layout, removes the detail a class needs) or flat mid-gray."""
    from reportgen.engine.gradients import fill_source

    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
    return fill_source(pixels, "blur" if baseline == "blur" else "gray")


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class CurveProgram:
    """The compiled deletion/insertion pass of one model; get it with `curve_program(model, batch)`."""

    def __init__(self, lm: Any, batch_size: int):
        import tensorflow as tf

        from reportgen.engine.gradients import engine_for

        self.lm = lm
        self.batch_size = batch_size
        self.traces = 0
        h, w = lm.input_size
        pixel_spec = tf.TensorSpec((None, h, w, lm.channels), tf.float32)
        model = engine_for(lm, batch_size).logits_model  # shares the gradient engine's logits model
        rows = tf.TensorSpec((None,), tf.int32)

        @tf.function(
            input_signature=[
                pixel_spec, pixel_spec, tf.TensorSpec((None, h, w), tf.int32), rows, rows,
                tf.TensorSpec((None,), tf.bool), rows,
            ]
        )  # fmt: skip
        def probability(
            images: tf.Tensor,
            baselines: tf.Tensor,
            ranks: tf.Tensor,
            index: tf.Tensor,
            level: tf.Tensor,
            insert: tf.Tensor,
            target: tf.Tensor,
        ) -> tf.Tensor:
            self.traces += 1  # a Python side effect: runs while tracing only
            moved = tf.gather(ranks, index) < level[:, None, None]
            # deletion: moved pixels show the baseline; insertion: only the moved pixels show the image
            use_base = tf.math.logical_xor(moved, insert[:, None, None])[..., None]
            x = tf.where(use_base, tf.gather(baselines, index), tf.gather(images, index))
            probs = tf.nn.softmax(model([lm.preprocess(x)], training=False), axis=-1)
            return tf.gather(probs, target, axis=1, batch_dims=1)

        self._fn: Callable[..., Any] = probability

    def curves(
        self,
        pixels: np.ndarray,
        maps: np.ndarray,
        targets: np.ndarray,
        steps: int = DEFAULT_STEPS,
        baseline: str = "blur",
        seed: int = 0,
        ids: Sequence[int] | None = None,
    ) -> Curves:
        """Deletion and insertion curves of each image (0..255 pixels) in the order of its map (N, H, W at
        the input size), for each image's (concrete) target class. `ids` number the images for their
        tie-breaking permutation (default: their position)."""
        import tensorflow as tf

        pixels = np.asarray(pixels, np.float32)
        n = len(pixels)
        h, w = self.lm.input_size
        if np.asarray(maps).shape != (n, h, w):
            raise ValueError(f"maps of shape {np.asarray(maps).shape} do not match {n} images of {h}x{w}")
        ids = list(range(n)) if ids is None else ids
        lv = levels(h * w, steps)
        if not n:
            empty = np.zeros((0, steps + 1), np.float32)
            return Curves(empty, empty, np.zeros(0, np.float32), np.zeros(0, np.float32))
        images = tf.constant(pixels)
        bases = tf.constant(baseline_images(pixels, baseline))
        ranks = tf.constant(pixel_ranks(maps, seed, ids))
        target = np.asarray(targets, np.int32)
        # rows: image-major, then deletion levels, then insertion levels
        rows_img = np.repeat(np.arange(n, dtype=np.int32), 2 * len(lv))
        rows_level = np.tile(np.concatenate([lv, lv]), n)
        rows_insert = np.tile(np.repeat([False, True], len(lv)), n)
        probs = np.concatenate(
            [
                self._fn(
                    images, bases, ranks, tf.constant(rows_img[s]), tf.constant(rows_level[s]),
                    tf.constant(rows_insert[s]), tf.constant(target[rows_img[s]]),
                ).numpy()
                for s in _chunks(len(rows_img), self.batch_size)
            ]  # fmt: skip
        ).reshape(n, 2, len(lv))
        deletion, insertion = probs[:, 0].astype(np.float32), probs[:, 1].astype(np.float32)
        return Curves(deletion, insertion, auc(deletion), auc(insertion))


def curve_program(lm: Any, batch_size: int = 16) -> CurveProgram:
    """The model's deletion/insertion program, built once and kept with the model."""
    key = ("faithfulness", str(batch_size))
    if key not in lm.extractors:
        lm.extractors[key] = CurveProgram(lm, batch_size)
    return lm.extractors[key]


# -- similarity of two maps (model-parameter randomisation check) -------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of the absolute values of two maps (Adebayo et al. compare absolute
    values: a sign flip of the whole map is no change of what it highlights); NaN when either map is flat
    (no ranking to compare)."""
    from scipy.stats import spearmanr

    x, y = np.abs(np.asarray(a, np.float64)).ravel(), np.abs(np.asarray(b, np.float64)).ravel()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of the absolute values of two 2-D maps, each scaled to its own peak (maps of
    different methods and models have arbitrary scales); an all-zero map stays zero."""
    from skimage.metrics import structural_similarity

    def scaled(m: np.ndarray) -> np.ndarray:
        m = np.abs(np.asarray(m, np.float64))
        peak = m.max()
        return m / peak if peak > 0 else m

    side = min(np.asarray(a).shape[-2:])
    win = min(SSIM_WINDOW, side if side % 2 else side - 1)
    if win < 3:
        raise ValueError(f"SSIM needs maps of at least 3x3 pixels, got {np.asarray(a).shape}")
    return float(structural_similarity(scaled(a), scaled(b), data_range=1.0, win_size=win))
