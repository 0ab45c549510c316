"""Batched activation maximization: many filters, from one or several layers, optimised together.

One compiled program per (model, layer set, input size, recipe) runs the whole ascent loop for a
chunk of samples in a single call. The filter and layer of each sample, its start image and its
random augmentation draws are tensors, so a new filter never retraces; `trace_count` proves it.

Each sample's objective is the mean activation of its own filter with the border excluded; the
gradient of the batch sum w.r.t. each image is that sample's own gradient (samples do not interact in
inference mode), and it is L2-normalised per sample, as the classic recipe does for its batch of one.

A sample's result does not depend on which other samples share its batch, nor on the batch size: on CPU
the loop's ops are batch-invariant bit for bit (checked for conv nets with Eigen and oneDNN kernels; the
augmentation's trigonometry is done on the host, and the gradient is divided by an exactly rounded sqrt
instead of multiplied by a vectorised rsqrt), so a chunk halved after an out-of-memory error, a resumed
run and a cluster worker give the same pixels as one uninterrupted local run. (cuDNN may choose other
algorithms for other batch sizes: on GPU expect agreement to rounding, not to the bit.)

Precision: with `bfloat16` or `float16` the extractor is a clone of the model's layers under the Keras
mixed policy (float32 weights, 16-bit compute); the image, its gradient and its normalisation stay float32.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from reportgen.engine.recipes import Recipe
from reportgen.models import LoadedModel

AUG_DIMS = 4  # per step: dx, dy, angle, zoom, each uniform in [-1, 1]
TRANSFORM_DIMS = 8  # per step: the projective transform (a0, a1, a2, b0, b1, b2, c0, c1) of the draws above
PRECISIONS = ("float32", "bfloat16", "float16")
# float16 gradients of a mean over thousands of positions underflow; the gradient is L2-normalised per
# sample, so scaling the objective first changes nothing but the range the backward pass works in.
FLOAT16_LOSS_SCALE = 1024.0

log = logging.getLogger("reportgen")


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


def initial_state(
    model: LoadedModel, jobs: Sequence[AscentJob], recipe: Recipe
) -> tuple[np.ndarray, np.ndarray]:
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


def transform_params(augs: np.ndarray, recipe: Recipe, size: tuple[int, int]) -> np.ndarray:
    """Projective transforms (N, steps, 8) of the augmentation draws: random jitter, rotation about the
    centre and zoom. Computed on the host in float64 so that a sample's transform does not depend on how
    many samples share its batch (TF's vectorised sin/cos differ from the scalar ones in the last bit)."""
    h, w = size
    a = augs.astype(np.float64)
    dx, dy = a[..., 0] * recipe.jitter, a[..., 1] * recipe.jitter
    angle = a[..., 2] * (recipe.rotate * math.pi / 180.0)
    zoom = 1.0 + a[..., 3] * recipe.scale
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # output (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotation+zoom about the centre
    a2 = cx - cos * cx + sin * cy - dx
    b2 = cy - sin * cx - cos * cy - dy
    zeros = np.zeros_like(cos)
    return np.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=-1).astype(np.float32)


def normalize_per_sample(grads: tf.Tensor) -> tf.Tensor:
    """`tf.math.l2_normalize(grads, axis=[1, 2, 3])` with an exactly rounded sqrt and division, so the
    result is the same whatever the batch size (the vectorised rsqrt differs from the scalar one in the
    last bit). The clamp sits between sqrt and division so that grappler does not turn them into rsqrt."""
    norm = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=[1, 2, 3], keepdims=True))
    return grads / tf.maximum(norm, 1e-6)


def mixed_precision_clone(model: Any, dtype: str) -> Any:
    """A clone of a functional Keras model whose layers compute in `dtype` (bfloat16 or float16) with
    float32 weights (the `mixed_<dtype>` policy), sharing the original's weight values."""
    import keras

    policy = keras.DTypePolicy(f"mixed_{dtype}")

    def clone_layer(layer: Any) -> Any:
        config = layer.get_config()
        if "dtype" in config and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return type(layer).from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    for src, dst in zip(model.layers, clone.layers, strict=True):
        if src.weights:
            dst.set_weights(src.get_weights())
    return clone


def gaussian_kernel(sigma: float, channels: int) -> tf.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    xs = np.arange(-radius, radius + 1, dtype=np.float32)
    k1 = np.exp(-(xs**2) / (2 * sigma**2))
    k2 = np.outer(k1, k1)
    k2 /= k2.sum()
    return tf.constant(np.tile(k2[:, :, None, None], (1, 1, channels, 1)))


def project(x: tf.Tensor, transforms: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Random jitter / rotation / zoom per sample (see `transform_params`), one op for the whole batch."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.constant(list(size)),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )


def total_variation(x: tf.Tensor) -> tf.Tensor:
    """Per-sample mean absolute difference between neighbouring pixels."""
    dh = x[:, 1:, :, :] - x[:, :-1, :, :]
    dw = x[:, :, 1:, :] - x[:, :, :-1, :]
    return tf.reduce_mean(tf.abs(dh), axis=[1, 2, 3]) + tf.reduce_mean(tf.abs(dw), axis=[1, 2, 3])


def regularize(
    x: tf.Tensor, step: tf.Tensor, r: Recipe, blur: tf.Tensor | None, size: tuple[int, int], clip: bool
) -> tf.Tensor:
    """The recipe's per-step image regularizers: decay towards gray, a Gaussian blur every `blur_every`
    steps (zeroing pixels whose norm is below the `clip_weak` percentile), and clipping to [-1, 1]."""
    if r.decay:
        x = x * (1.0 - r.decay)
    if r.blur_every and blur is not None:
        do = tf.equal(tf.math.floormod(step + 1, r.blur_every), 0)
        blurred = tf.nn.depthwise_conv2d(x, blur, [1, 1, 1, 1], "SAME")
        if r.clip_weak:
            norms = tf.norm(blurred, axis=-1)
            flat = tf.sort(tf.reshape(norms, [tf.shape(x)[0], -1]), axis=1)
            k = int(r.clip_weak / 100.0 * (size[0] * size[1] - 1))
            cut = flat[:, k][:, None, None]
            blurred = blurred * tf.cast(norms >= cut, x.dtype)[..., None]
        x = tf.where(do, blurred, x)
    return tf.clip_by_value(x, -1.0, 1.0) if clip else x


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

        if dtype not in PRECISIONS:
            raise ValueError(f"precision {dtype!r} is not one of {', '.join(PRECISIONS)}")
        self.model, self.layers, self.recipe = model, tuple(layers), recipe
        self.size = ascent_size(model, recipe)
        outputs = [_objective_output(model.layer(name), recipe.pre_relu) for name in self.layers]
        extractor = keras.Model(model.model.inputs, outputs)
        self.extractor = extractor if dtype == "float32" else mixed_precision_clone(extractor, dtype)
        self.channels = [int(o.shape[-1]) for o in outputs]
        self.dtype = tf.as_dtype(dtype)  # compute dtype of the extractor; the image stays float32
        self.loss_scale = FLOAT16_LOSS_SCALE if dtype == "float16" else 1.0
        self.trace_count = 0
        self.batch_limit: int | None = None  # set after an out-of-memory error: later chunks start there
        h, w = self.size
        c = model.channels
        self._blur = gaussian_kernel(recipe.blur_sigma, c) if recipe.blur_every else None
        spec = [
            tf.TensorSpec((None, h, w, c), tf.float32),
            tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None, recipe.steps, TRANSFORM_DIMS), tf.float32),
        ]
        self._run = tf.function(self._ascend, input_signature=spec, reduce_retracing=True)

    # -- graph pieces -------------------------------------------------------------------------
    def _activations(self, x: tf.Tensor, layer_idx: tf.Tensor, filter_idx: tf.Tensor) -> tf.Tensor:
        """Per-sample mean activation of the sample's own (layer, filter), border excluded.

        The preprocessing runs in float32 (a mixed-precision extractor casts its input itself); each
        sample's channel is picked before the mean, which is taken in float32."""
        pixels = (x + 1.0) * 127.5
        inputs = self.model.preprocess(pixels)
        outs = self.extractor(inputs, training=False)
        if not isinstance(outs, list | tuple):
            outs = [outs]
        b = self.recipe.border
        value = tf.zeros(tf.shape(x)[:1], tf.float32)
        for i, (out, channels) in enumerate(zip(outs, self.channels, strict=True)):
            if b and out.shape[1] is not None and out.shape[1] > 2 * b and out.shape[2] > 2 * b:
                out = out[:, b:-b, b:-b, :]
            picked = tf.gather(out, tf.minimum(filter_idx, channels - 1), axis=3, batch_dims=1)
            mean = tf.reduce_mean(tf.cast(picked, tf.float32), axis=[1, 2])
            value = tf.where(layer_idx == i, mean, value)
        return value

    def _ascend(self, x0, layer_idx, filter_idx, transforms):
        self.trace_count += 1  # runs only while tracing
        r = self.recipe
        use_aug = bool(r.jitter or r.rotate or r.scale)
        x = x0
        first = tf.zeros(tf.shape(x0)[:1], tf.float32)
        for step in tf.range(r.steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                seen = project(x, transforms[:, step], self.size) if use_aug else x
                act = self._activations(seen, layer_idx, filter_idx)
                objective = act - r.tv * total_variation(x) if r.tv else act
                total = tf.reduce_sum(objective)
                if self.loss_scale != 1.0:
                    total = total * self.loss_scale
            grads = normalize_per_sample(tape.gradient(total, x))
            first = tf.where(tf.equal(step, 0), act, first)
            x = x + r.lr * grads
            x = regularize(x, step, r, self._blur, self.size, clip=r.is_regularized)
        final = self._activations(x, layer_idx, filter_idx)
        return x, first, final

    # -- host side ----------------------------------------------------------------------------
    def run(
        self,
        jobs: Sequence[AscentJob],
        batch_size: int = 16,
        on_chunk: Callable[[int], None] | None = None,
        on_results: Callable[[list[AscentResult]], None] | None = None,
    ) -> list[AscentResult]:
        """Optimise all jobs in chunks of `batch_size`, halving the chunk on out-of-memory.

        After an out-of-memory error the failed chunk is retried at half the size, and the program keeps
        that limit (`batch_limit`) for its later chunks. `on_results` gets each finished chunk's results
        (the scheduler stores them at once, so a killed run resumes from there); `on_chunk` its size."""
        index = {name: i for i, name in enumerate(self.layers)}
        starts, augs = initial_state(self.model, jobs, self.recipe)
        transforms = transform_params(augs, self.recipe, self.size)
        limit = max(1, min(batch_size, self.batch_limit or batch_size))
        results: list[AscentResult] = []
        pos = 0
        while pos < len(jobs):
            chunk = list(jobs[pos : pos + limit])
            n = len(chunk)
            try:
                x, first, final = self._run(
                    tf.constant(starts[pos : pos + n]),
                    tf.constant([index[j.layer] for j in chunk], tf.int32),
                    tf.constant([j.filter for j in chunk], tf.int32),
                    tf.constant(transforms[pos : pos + n]),
                )
            except tf.errors.ResourceExhaustedError:
                if n == 1:
                    raise
                limit = self.batch_limit = max(1, n // 2)
                log.warning("out of memory with a batch of %d; retrying with %d", n, limit)
                continue
            xs, first, final = x.numpy(), first.numpy(), final.numpy()
            done = [
                AscentResult(
                    job=job,
                    image=display(xs[i], self.recipe),
                    raw=xs[i],
                    activation=float(final[i]),
                    initial_activation=float(first[i]),
                    dead=bool(final[i] <= self.recipe.dead_threshold),
                )
                for i, job in enumerate(chunk)
            ]
            results.extend(done)
            pos += n
            if on_results:
                on_results(done)
            if on_chunk:
                on_chunk(n)
        return results


def program_for(
    model: LoadedModel, layers: Sequence[str], recipe: Recipe, dtype: str = "float32"
) -> AscentProgram:
    """Programs are cached on the model so a second section with the same layers reuses the trace."""
    key = ("ascent", tuple(layers), recipe, dtype)
    if key not in model.extractors:
        model.extractors[key] = AscentProgram(model, layers, recipe, dtype)
    return model.extractors[key]
