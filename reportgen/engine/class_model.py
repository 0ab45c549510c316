"""Class models: images that maximise one class's pre-softmax score, all classes in one batch.

The score is the class logit (`LoadedModel.logits_output`): softmax couples the classes, so maximising a
probability can succeed by pushing the other classes down instead of making the image more like the
class (Simonyan et al. 2014). The loop uses the parameters of a `Recipe` (steps, lr, jitter, rotation,
zoom, blur, decay, total variation, clip_weak) in the same canonical space as the filter ascent
(x in [-1, 1], pixel = (x + 1) * 127.5) and shares its pieces: seeded starts and augmentation draws,
host-side transforms and the per-sample gradient normalisation, which make a sample's result independent
of its batch. x is clipped to [-1, 1] after every step so that the result is a real image. The float32
model then scores that image once more, quantised to uint8 exactly as it is saved, so the confidence in
the report is the one the model gives the picture the reader sees, whatever precision optimised it.

Class indices are a tensor: a new class never retraces (`trace_count`); each sample's start and random
augmentations depend only on (model, class, seed), so a class gives the same image whatever else is in
the batch, and results can be cached per class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from reportgen.engine.ascent import (
    FLOAT16_LOSS_SCALE,
    PRECISIONS,
    TRANSFORM_DIMS,
    AscentJob,
    ascent_size,
    gaussian_kernel,
    initial_state,
    mixed_precision_clone,
    normalize_per_sample,
    project,
    regularize,
    total_variation,
    transform_params,
)
from reportgen.engine.recipes import Recipe
from reportgen.models import LoadedModel

CLASS_TAG = "__class_model__"  # the `layer` part of a class sample's seed, distinct from every layer name


@dataclass
class ClassModelResult:
    target: int
    image: np.ndarray  # uint8 (H, W, C): the pixels the model scored for `probs`
    probs: np.ndarray  # float32 (classes,): the model's softmax on `image`
    logit_start: float  # target logit of the start image
    logit_final: float  # target logit of `image`

    @property
    def confidence(self) -> float:
        return float(self.probs[self.target])

    @property
    def top_class(self) -> int:
        return int(np.argmax(self.probs))


class ClassModelProgram:
    """The compiled class-model loop for one model, recipe and precision."""

    def __init__(self, model: LoadedModel, recipe: Recipe, dtype: str = "float32"):
        import keras

        if dtype not in PRECISIONS:
            raise ValueError(f"precision {dtype!r} is not one of {', '.join(PRECISIONS)}")
        logits = model.logits_output
        if len(logits.shape) != 2:
            raise ValueError(
                f"model {model.key!r} has no classifier output (its output shape is "
                f"{tuple(logits.shape)}); class models need one score per class"
            )
        self.model, self.recipe = model, recipe
        self.size = ascent_size(model, recipe)
        self.scorer = keras.Model(model.model.inputs, logits)  # float32: the final, reported scores
        self.optimised = self.scorer if dtype == "float32" else mixed_precision_clone(self.scorer, dtype)
        self.loss_scale = FLOAT16_LOSS_SCALE if dtype == "float16" else 1.0
        self.trace_count = 0
        h, w = self.size
        c = model.channels
        self._blur = gaussian_kernel(recipe.blur_sigma, c) if recipe.blur_every else None
        spec = [
            tf.TensorSpec((None, h, w, c), tf.float32),
            tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None, recipe.steps, TRANSFORM_DIMS), tf.float32),
        ]
        self._run = tf.function(self._optimise, input_signature=spec)

    def _score(self, scorer: object, x: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """Each sample's target logit for canonical images x (preprocessing in float32)."""
        logits = tf.cast(scorer(self.model.preprocess((x + 1.0) * 127.5), training=False), tf.float32)
        return tf.gather(logits, targets, batch_dims=1)

    def _optimise(self, x0: tf.Tensor, targets: tf.Tensor, transforms: tf.Tensor) -> tuple[tf.Tensor, ...]:
        self.trace_count += 1  # runs only while tracing
        r = self.recipe
        use_aug = bool(r.jitter or r.rotate or r.scale)
        x = x0
        start = self._score(self.scorer, x0, targets)
        for step in tf.range(r.steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                seen = project(x, transforms[:, step], self.size) if use_aug else x
                score = self._score(self.optimised, seen, targets)
                objective = score - r.tv * total_variation(x) if r.tv else score
                total = tf.reduce_sum(objective) * self.loss_scale
            x = x + r.lr * normalize_per_sample(tape.gradient(total, x))
            x = regularize(x, step, r, self._blur, self.size, clip=True)
        pixels = tf.round(tf.clip_by_value((x + 1.0) * 127.5, 0.0, 255.0))
        logits = tf.cast(self.scorer(self.model.preprocess(pixels), training=False), tf.float32)
        return pixels, start, tf.gather(logits, targets, batch_dims=1), tf.nn.softmax(logits, axis=-1)

    def run(
        self,
        targets: Sequence[int],
        seed: int,
        batch_size: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> list[ClassModelResult]:
        """Optimise all targets, by default in one batch; the chunk halves on out-of-memory."""
        targets = [int(t) for t in targets]
        jobs = [AscentJob(CLASS_TAG, t, seed) for t in targets]
        starts, augs = initial_state(self.model, jobs, self.recipe)
        transforms = transform_params(augs, self.recipe, self.size)
        size = batch_size or max(1, len(targets))
        results: list[ClassModelResult] = []
        pos = 0
        while pos < len(targets):
            n = min(size, len(targets) - pos)
            try:
                pixels, start, final, probs = self._run(
                    tf.constant(starts[pos : pos + n]),
                    tf.constant(targets[pos : pos + n], tf.int32),
                    tf.constant(transforms[pos : pos + n]),
                )
            except tf.errors.ResourceExhaustedError:
                if n == 1:
                    raise
                size = max(1, n // 2)
                continue
            pixels, start, final, probs = pixels.numpy(), start.numpy(), final.numpy(), probs.numpy()
            results += [
                ClassModelResult(
                    targets[pos + i], pixels[i].astype(np.uint8), probs[i], float(start[i]), float(final[i])
                )
                for i in range(n)
            ]
            pos += n
            if on_chunk:
                on_chunk(n)
        return results


def class_model_program(model: LoadedModel, recipe: Recipe, dtype: str = "float32") -> ClassModelProgram:
    """Programs are kept on the model, so sections with the same recipe share one trace."""
    key = ("class_model", recipe, dtype)
    if key not in model.extractors:
        model.extractors[key] = ClassModelProgram(model, recipe, dtype)
    return model.extractors[key]
