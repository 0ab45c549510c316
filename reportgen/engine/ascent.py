"""Batched activation maximization: many filters, from one or several layers, optimised together.

One compiled program per (model, layer set, input size, recipe) runs the whole ascent loop for a
chunk of samples in a single call. The filter and layer of each sample, its start image and its
random augmentation draws are tensors, so a new filter never retraces; `trace_count` proves it.

Each sample's objective is the mean activation of its own filter with the border excluded; the
gradient of the batch sum w.r.t. each image is that sample's own gradient (samples do not interact in
inference mode), and it is L2-normalised per sample, as the classic recipe does for its batch of one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from reportgen.engine.recipes import Recipe
from reportgen.models import LoadedModel

AUG_DIMS = 4  # per step: dx, dy, angle, zoom, each uniform in [-1, 1]


@dataclass(frozen=True)
class AscentJob:
    layer: str
    filter: int
    seed: int


@dataclass
class AscentResult:
    job: AscentJob
    image: np.ndarray  # uint8 (H, W, C) after the display transform
    raw: np.ndarray  # float32 canonical image in [-1, 1]-ish space, before display
    activation: float  # final mean activation (border excluded) of the filter
    initial_activation: float
    dead: bool


def sample_seed(digest: str, layer: str, filt: int, seed: int) -> int:
    """Seed of one sample's start and augmentations: depends only on (model, layer, filter, seed)."""
    key = f"{digest[:16]}|{layer}|{filt}|{seed}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def ascent_size(model: LoadedModel, recipe: Recipe) -> tuple[int, int]:
    if model.fixed_input or not recipe.size:
        return model.input_size
    return (recipe.size, recipe.size)


def initial_state(model: LoadedModel, jobs: Sequence[AscentJob], recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """Seeded start images (gray + uniform noise, canonical space) and augmentation draws per job."""
    h, w = ascent_size(model, recipe)
    c = model.channels
    starts = np.empty((len(jobs), h, w, c), np.float32)
    augs = np.empty((len(jobs), recipe.steps, AUG_DIMS), np.float32)
    for i, job in enumerate(jobs):
        rng = np.random.default_rng(sample_seed(model.digest, job.layer, job.filter, job.seed))
        starts[i] = (rng.random((h, w, c), dtype=np.float32) - 0.5) * recipe.init_scale
        augs[i] = rng.uniform(-1.0, 1.0, (recipe.steps, AUG_DIMS)).astype(np.float32)
    return starts, augs


def display(raw: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The classic display transform: standardise to std `display_std` around 0.5, crop, clip, uint8."""
    img = raw.astype(np.float64)
    img = img - img.mean()
    img = img / (img.std() + 1e-5) * recipe.display_std
    c = recipe.crop
    if c and img.shape[0] > 2 * c + 8 and img.shape[1] > 2 * c + 8:
        img = img[c:-c, c:-c, :]
    img = np.clip(img + 0.5, 0, 1)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _gaussian_kernel(sigma: float, channels: int) -> tf.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    xs = np.arange(-radius, radius + 1, dtype=np.float32)
    k1 = np.exp(-(xs**2) / (2 * sigma**2))
    k2 = np.outer(k1, k1)
    k2 /= k2.sum()
    return tf.constant(np.tile(k2[:, :, None, None], (1, 1, channels, 1)))


def _objective_output(layer, pre_relu: bool):
    """The layer's symbolic output, or with `pre_relu` its output before a fused ReLU: a clone of the
    layer with a linear activation and the same weights, applied to the layer's own input."""
    act = getattr(layer, "activation", None)
    if not pre_relu or getattr(act, "__name__", "") != "relu":
        return layer.output
    config = dict(layer.get_config(), activation="linear", name=f"{layer.name}_pre_relu")
    clone = type(layer).from_config(config)
    clone.build(layer.input.shape)
    clone.set_weights(layer.get_weights())
    return clone(layer.input)


class AscentProgram:
    """The compiled ascent loop for one model, layer set, size and recipe."""

    def __init__(self, model: LoadedModel, layers: Sequence[str], recipe: Recipe, dtype: str = "float32"):
        import keras

        self.model, self.layers, self.recipe = model, tuple(layers), recipe
        self.size = ascent_size(model, recipe)
        outputs = [_objective_output(model.layer(name), recipe.pre_relu) for name in self.layers]
        self.extractor = keras.Model(model.model.inputs, outputs)
        self.channels = [int(o.shape[-1]) for o in outputs]
        self.dtype = tf.as_dtype(dtype)
        self.trace_count = 0
        h, w = self.size
        c = model.channels
        self._blur = _gaussian_kernel(recipe.blur_sigma, c) if recipe.blur_every else None
        spec = [
            tf.TensorSpec((None, h, w, c), tf.float32),
            tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None, recipe.steps, AUG_DIMS), tf.float32),
        ]
        self._run = tf.function(self._ascend, input_signature=spec, reduce_retracing=True)

    # -- graph pieces -------------------------------------------------------------------------
    def _activations(self, x: tf.Tensor, layer_idx: tf.Tensor, filter_idx: tf.Tensor) -> tf.Tensor:
        """Per-sample mean activation of the sample's own (layer, filter), border excluded."""
        pixels = (x + 1.0) * 127.5
        inputs = self.model.preprocess(tf.cast(pixels, self.dtype))
        outs = self.extractor(inputs, training=False)
        if not isinstance(outs, list | tuple):
            outs = [outs]
        b = self.recipe.border
        value = tf.zeros(tf.shape(x)[:1], tf.float32)
        for i, (out, channels) in enumerate(zip(outs, self.channels, strict=True)):
            if b and out.shape[1] is not None and out.shape[1] > 2 * b and out.shape[2] > 2 * b:
                out = out[:, b:-b, b:-b, :]
            means = tf.cast(tf.reduce_mean(out, axis=[1, 2]), tf.float32)
            picked = tf.gather(means, tf.minimum(filter_idx, channels - 1), batch_dims=1)
            value = tf.where(layer_idx == i, picked, value)
        return value

    def _transform(self, x: tf.Tensor, aug: tf.Tensor) -> tf.Tensor:
        """Random jitter / rotation / zoom per sample, one projective-transform op for the whole batch."""
        r = self.recipe
        h, w = self.size
        dx, dy = aug[:, 0] * r.jitter, aug[:, 1] * r.jitter
        angle = aug[:, 2] * (r.rotate * math.pi / 180.0)
        zoom = 1.0 + aug[:, 3] * r.scale
        cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        # output (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotation+zoom about the centre
        a2 = cx - cos * cx + sin * cy - dx
        b2 = cy - sin * cx - cos * cy - dy
        zeros = tf.zeros_like(cos)
        transforms = tf.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x,
            transforms=transforms,
            output_shape=tf.constant([h, w]),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )

    def _tv(self, x: tf.Tensor) -> tf.Tensor:
        dh = x[:, 1:, :, :] - x[:, :-1, :, :]
        dw = x[:, :, 1:, :] - x[:, :, :-1, :]
        return tf.reduce_mean(tf.abs(dh), axis=[1, 2, 3]) + tf.reduce_mean(tf.abs(dw), axis=[1, 2, 3])

    def _regularize(self, x: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        r = self.recipe
        if r.decay:
            x = x * (1.0 - r.decay)
        if r.blur_every:
            do = tf.equal(tf.math.floormod(step + 1, r.blur_every), 0)
            blurred = tf.nn.depthwise_conv2d(x, self._blur, [1, 1, 1, 1], "SAME")
            if r.clip_weak:
                norms = tf.norm(blurred, axis=-1)
                flat = tf.sort(tf.reshape(norms, [tf.shape(x)[0], -1]), axis=1)
                k = int(r.clip_weak / 100.0 * (self.size[0] * self.size[1] - 1))
                cut = flat[:, k][:, None, None]
                blurred = blurred * tf.cast(norms >= cut, x.dtype)[..., None]
            x = tf.where(do, blurred, x)
        if r.is_regularized:
            x = tf.clip_by_value(x, -1.0, 1.0)
        return x

    def _ascend(self, x0, layer_idx, filter_idx, augs):
        self.trace_count += 1  # runs only while tracing
        r = self.recipe
        use_aug = bool(r.jitter or r.rotate or r.scale)
        x = x0
        first = tf.zeros(tf.shape(x0)[:1], tf.float32)
        for step in tf.range(r.steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                seen = self._transform(x, augs[:, step]) if use_aug else x
                act = self._activations(seen, layer_idx, filter_idx)
                objective = act - r.tv * self._tv(x) if r.tv else act
                total = tf.reduce_sum(objective)
            grads = tape.gradient(total, x)
            grads = tf.math.l2_normalize(grads, axis=[1, 2, 3])
            first = tf.where(tf.equal(step, 0), act, first)
            x = x + r.lr * grads
            x = self._regularize(x, step)
        final = self._activations(x, layer_idx, filter_idx)
        return x, first, final

    # -- host side ----------------------------------------------------------------------------
    def run(self, jobs: Sequence[AscentJob], batch_size: int = 16,
            on_chunk: Callable[[int], None] | None = None) -> list[AscentResult]:
        """Optimise all jobs in chunks of `batch_size`, halving the chunk on out-of-memory."""
        index = {name: i for i, name in enumerate(self.layers)}
        starts, augs = initial_state(self.model, jobs, self.recipe)
        results: list[AscentResult] = []
        pos = 0
        while pos < len(jobs):
            chunk = list(jobs[pos : pos + batch_size])
            n = len(chunk)
            try:
                x, first, final = self._run(
                    tf.constant(starts[pos : pos + n]),
                    tf.constant([index[j.layer] for j in chunk], tf.int32),
                    tf.constant([j.filter for j in chunk], tf.int32),
                    tf.constant(augs[pos : pos + n]),
                )
            except tf.errors.ResourceExhaustedError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                continue
            xs, first, final = x.numpy(), first.numpy(), final.numpy()
            for i, job in enumerate(chunk):
                results.append(
                    AscentResult(
                        job=job,
                        image=display(xs[i], self.recipe),
                        raw=xs[i],
                        activation=float(final[i]),
                        initial_activation=float(first[i]),
                        dead=bool(final[i] <= self.recipe.dead_threshold),
                    )
                )
            pos += n
            if on_chunk:
                on_chunk(n)
        return results


def program_for(model: LoadedModel, layers: Sequence[str], recipe: Recipe, dtype: str = "float32") -> AscentProgram:
    """Programs are cached on the model so a second section with the same layers reuses the trace."""
    key = ("ascent", tuple(layers), recipe, dtype)
    if key not in model.extractors:
        model.extractors[key] = AscentProgram(model, layers, recipe, dtype)
    return model.extractors[key]
