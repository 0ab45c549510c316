"""Class models: images that maximise one class's pre-softmax score, all classes in one batch.

The score is the class logit (`LoadedModel.logits_output`): softmax couples the classes, so maximising a
probability can succeed by pushing the other classes down instead of making the image more like the
class (Simonyan et al. 2014). The loop is the filter ascent's (`reportgen.engine.ascent.AscentProgram`),
whose objective here reads the logits: every recipe works for class models as for filters — the pixel
recipes (steps along the L2-normalised gradient, jitter, rotation, zoom, blur, decay, total variation),
lucid's `fourier` (1/f-scaled Fourier coefficients, colour decorrelation, Adam; Olah et al. 2017) and
`maco` (phase only, fixed natural magnitude, random crops and noise, Nadam; Fel et al. 2023) — with the
same seeded starts and augmentation draws, so a class's image does not depend on its batch. Pixel
recipes clip x to [-1, 1] after every step so that the result is a real image (the Fourier ones are in
range by their sigmoid; a classifier that takes only its input size sees lucid's padded canvas scaled
back to it, `AscentProgram._views`). The float32 model then scores the image once more, quantised to
uint8 exactly as it is saved, so the confidence in the report is the one the model gives the picture the
reader sees, whatever precision optimised it.

Class indices are a tensor: a new class never retraces (`trace_count`); each sample's start and random
augmentations depend only on (model key, class, seed), so results are cached per class and planned,
batched and distributed with the filter ascent (`reportgen.engine.scheduler`, pass layer `CLASS_TAG`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from reportgen.engine.ascent import AscentJob, AscentProgram, AscentResult, draw
from reportgen.engine.quality import hf_energy
from reportgen.engine.recipes import Recipe
from reportgen.models import LoadedModel
from reportgen.work import CLASS_TAG


@dataclass
class ClassModelResult(AscentResult):
    """An ascent result whose `image` is the uint8 picture the model scored (not display-standardised),
    with the model's softmax on it and the class logit of the start image and of `image`."""

    probs: np.ndarray | None = None  # float32 (classes,)
    logit_start: float = 0.0
    logit_final: float = 0.0

    @property
    def target(self) -> int:
        return self.job.filter

    @property
    def confidence(self) -> float:
        assert self.probs is not None
        return float(self.probs[self.target])

    @property
    def top_class(self) -> int:
        assert self.probs is not None
        return int(np.argmax(self.probs))


class ClassModelProgram(AscentProgram):
    """The compiled ascent loop for one model, recipe and precision, with the class logit as objective."""

    def __init__(self, model: LoadedModel, recipe: Recipe, dtype: str = "float32"):
        import keras

        logits = model.logits_output
        if len(logits.shape) != 2:
            raise ValueError(
                f"model {model.key!r} has no classifier output (its output shape is "
                f"{tuple(logits.shape)}); class models need one score per class"
            )
        super().__init__(model, (CLASS_TAG,), recipe, dtype)
        self.clip_pixels = True  # a class model is a real image at every step
        self.scorer = keras.Model(model.model.inputs, logits)  # float32: the final, reported scores
        h, w = self.size
        spec = [tf.TensorSpec((None, h, w, model.channels), tf.float32)]
        self._score = tf.function(self._logits, input_signature=spec)

    def _objective_outputs(self) -> list[Any]:
        return [self.model.logits_output]

    def _objective(self, outs: list[tf.Tensor], t: dict[str, tf.Tensor], canvas: bool = False) -> tf.Tensor:
        """Each sample's class logit (its `filter` is the class index), in float32; a logit has no
        position, so it is the same on the canvas (`canvas`) as on the image."""
        return tf.gather(tf.cast(outs[0], tf.float32), t["filter"], batch_dims=1)

    def _logits(self, pixels: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.scorer(self.model.preprocess(pixels), training=False), tf.float32)

    def run_classes(
        self,
        jobs: Sequence[AscentJob],
        batch_size: int = 16,
        on_chunk: Callable[[int], None] | None = None,
    ) -> list[ClassModelResult]:
        """Optimise the jobs (layer CLASS_TAG, filter = class index) in chunks of `batch_size` (halved on
        out-of-memory by `AscentProgram.run`), then score the start and the saved uint8 image of each."""
        results = self.run(jobs, batch_size, on_chunk)
        starts = self.param.image(tf.constant(draw(self.model, jobs, self.recipe, self.param).starts))
        out = []
        for pos in range(0, len(results), max(1, self.batch_limit or batch_size)):
            chunk = results[pos : pos + max(1, self.batch_limit or batch_size)]
            pixels = np.round(np.clip((np.stack([r.raw for r in chunk]) + 1.0) * 127.5, 0.0, 255.0))
            final = self._score(tf.constant(pixels.astype(np.float32))).numpy()
            first = self._score((starts[pos : pos + len(chunk)] + 1.0) * 127.5).numpy()
            for i, r in enumerate(chunk):
                image = pixels[i].astype(np.uint8)
                t = r.job.filter
                out.append(
                    ClassModelResult(
                        job=r.job,
                        image=image,
                        raw=r.raw,
                        activation=float(final[i, t]),
                        initial_activation=r.initial_activation,
                        dead=False,  # a logit has no "dead" threshold
                        hf_energy=hf_energy(image),
                        robustness=r.robustness,
                        mask=r.mask,
                        probs=tf.nn.softmax(final[i]).numpy().astype(np.float32),
                        logit_start=float(first[i, t]),
                        logit_final=float(final[i, t]),
                    )
                )
        return out


def class_model_program(model: LoadedModel, recipe: Recipe, dtype: str = "float32") -> ClassModelProgram:
    """Programs are kept on the model, so sections with the same recipe share one trace."""
    key = ("class_model", recipe, dtype)
    if key not in model.extractors:
        model.extractors[key] = ClassModelProgram(model, recipe, dtype)
    return model.extractors[key]
