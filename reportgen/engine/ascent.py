"""Batched activation maximization: many filters, from one or several layers, optimised together.

One compiled program per (model, layer set, input size, recipe) runs the whole ascent loop for a
chunk of samples in a single call. The filter and layer of each sample, its start image and its
random augmentation draws are tensors, so a new filter never retraces; `trace_count` proves it.

Each sample's objective is its own (per-sample tensors built on the host, so all kinds share one loop):
`channel` (the mean activation of its filter, border excluded; the default), `neuron` (the filter's unit
at the centre or at a given position of the map), `layer` (the mean square of the whole layer, DeepDream)
or `direction` (the mean over positions of the activations' dot product with a vector over channels);
Olah et al. (Distill 2017) and lucid name this set. The gradient of the batch sum w.r.t. each image is
that sample's own gradient (samples do not interact in inference mode); the classic recipes L2-normalise
it per sample, the Fourier ones take Adam steps in their parameterisation (`parameterization.py`).
The one exception to independence is `diversity`: the N variants of one filter are optimised together in
one chunk (never split) with lucid's penalty on the cosine similarity of their Gram matrices.

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

from reportgen.engine.forward import pre_relu_output
from reportgen.engine.parameterization import Parameterization, optimizer_tables
from reportgen.engine.quality import ROBUSTNESS_DRAWS, hf_energy, robustness_ratio, robustness_transforms
from reportgen.engine.recipes import Recipe, ascent_size
from reportgen.models import LoadedModel

AUG_DIMS = 4  # per step: dx, dy, angle, zoom, each uniform in [-1, 1]
TRANSFORM_DIMS = 8  # per step: the projective transform (a0, a1, a2, b0, b1, b2, c0, c1) of the draws above
PRECISIONS = ("float32", "bfloat16", "float16")
# float16 gradients of a mean over thousands of positions underflow; the gradient is L2-normalised per
# sample, so scaling the objective first changes nothing but the range the backward pass works in.
FLOAT16_LOSS_SCALE = 1024.0

log = logging.getLogger("reportgen")


OBJECTIVES = ("channel", "neuron", "layer", "direction")


@dataclass(frozen=True)
class AscentJob:
    layer: str
    filter: int
    seed: int
    objective: str = "channel"
    position: tuple[int, int] | None = None  # neuron: (y, x) in the layer's map; None = its centre
    direction: tuple[float, ...] | None = None  # direction: one weight per channel of the layer
    variant: int = 0  # diversity: which of the `diversity` images of this unit
    diversity: int = 1

    @property
    def group(self) -> tuple[Any, ...]:
        """Jobs optimised together (the variants of one unit under `diversity`)."""
        return (
            self.layer,
            self.filter,
            self.seed,
            self.objective,
            self.position,
            self.direction,
            self.diversity,
        )


@dataclass
class AscentResult:
    job: AscentJob
    image: np.ndarray  # uint8 (H, W, C) after the display transform
    raw: np.ndarray  # float32 canonical image in [-1, 1]-ish space, before display
    activation: float  # final mean activation (border excluded) of the filter
    initial_activation: float
    dead: bool
    hf_energy: float = 0.0  # reportgen.engine.quality
    robustness: float | None = None
    mask: np.ndarray | None = None  # (H, W) accumulated |gradient| w.r.t. the image (MaCo's transparency)


def sample_seed(model_key: str, layer: str, filt: int, seed: int, variant: int = 0) -> int:
    """Seed of one sample's start and augmentations: depends only on (the spec's model key, layer, filter,
    seed) and, for the further images of `diversity`, the variant. Not on the weights: a new checkpoint of
    the model then starts every unit from the same image, so a unit whose weights did not change yields the
    same picture and a change report can tell changed units from unchanged ones (issue 10). The result's
    content key (`engine.scheduler.ascent_key`) still includes the weights digest."""
    key = f"{model_key}|{layer}|{filt}|{seed}{f'|v{variant}' if variant else ''}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def initial_state(
    model: LoadedModel, jobs: Sequence[AscentJob], recipe: Recipe
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded start images (gray + uniform noise, canonical space) and augmentation draws per job."""
    h, w = ascent_size(model, recipe)
    c = model.channels
    starts = np.empty((len(jobs), h, w, c), np.float32)
    augs = np.empty((len(jobs), recipe.steps, AUG_DIMS), np.float32)
    for i, job in enumerate(jobs):
        rng = np.random.default_rng(sample_seed(model.key, job.layer, job.filter, job.seed))
        starts[i] = (rng.random((h, w, c), dtype=np.float32) - 0.5) * recipe.init_scale
        augs[i] = rng.uniform(-1.0, 1.0, (recipe.steps, AUG_DIMS)).astype(np.float32)
    return starts, augs


def display(raw: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The classic display transform: standardise to std `display_std` around 0.5, crop, clip, uint8.
    Without `standardize` (the Fourier recipes, whose sigmoid already gives natural contrast) the
    canonical image is shown as it is."""
    img = raw.astype(np.float64)
    if recipe.standardize:
        img = img - img.mean()
        img = img / (img.std() + 1e-5) * recipe.display_std
    else:
        img = img / 2.0
    c = recipe.crop
    if c and img.shape[0] > 2 * c + 8 and img.shape[1] > 2 * c + 8:
        img = img[c:-c, c:-c, :]
    img = np.clip(img + 0.5, 0, 1)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def transform_params(
    augs: np.ndarray, recipe: Recipe, size: tuple[int, int], after: np.ndarray | None = None
) -> np.ndarray:
    """Projective transforms (N, steps, 8) of the augmentation draws: random jitter, rotation about the
    centre and zoom, and with lucid's transforms (`pad`, `jitter_after`) the image placed on a canvas
    `pad` px larger on each side and a second jitter (`after`, draws in [-1, 1]) after zoom and rotation.
    Computed on the host in float64 so that a sample's transform does not depend on how many samples
    share its batch (TF's vectorised sin/cos differ from the scalar ones in the last bit)."""
    h, w = size
    a = augs.astype(np.float64)
    dx, dy = a[..., 0] * recipe.jitter, a[..., 1] * recipe.jitter
    angle = a[..., 2] * (recipe.rotate * math.pi / 180.0)
    zoom = 1.0 + a[..., 3] * recipe.scale
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    ex = ey = np.zeros_like(dx)
    if after is not None:
        ex, ey = after[..., 0] * recipe.jitter_after, after[..., 1] * recipe.jitter_after
    ox, oy = cx + recipe.pad + ex, cy + recipe.pad + ey
    # output (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotation+zoom about the centre,
    # input = A (output - pad - e - c) + c - d
    a2 = cx - dx - (cos * ox - sin * oy)
    b2 = cy - dy - (sin * ox + cos * oy)
    zeros = np.zeros_like(cos)
    return np.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=-1).astype(np.float32)


def normalize_per_sample(grads: tf.Tensor) -> tf.Tensor:
    """`tf.math.l2_normalize(grads, axis=[1, 2, 3])` with an exactly rounded sqrt and division, so the
    result is the same whatever the batch size (the vectorised rsqrt differs from the scalar one in the
    last bit). The clamp sits between sqrt and division so that grappler does not turn them into rsqrt."""
    axes = list(range(1, grads.shape.rank))
    norm = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=axes, keepdims=True))
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


def project(x: tf.Tensor, transforms: tf.Tensor, size: tuple[int, int], fill: str = "REFLECT") -> tf.Tensor:
    """Random jitter / rotation / zoom per sample (see `transform_params`), one op for the whole batch;
    `size` is the output's (a padded canvas with `fill` "CONSTANT": gray, 0 in canonical space)."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.constant(list(size)),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=fill,
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
    return pre_relu_output(layer) if pre_relu else layer.output


@dataclass
class Draws:
    """Everything random about a batch of jobs, drawn on the host from each job's own seed."""

    starts: np.ndarray  # (N, *state shape)
    transforms: np.ndarray  # (N, steps, 8)
    crops: np.ndarray  # (N, steps, crops, 8) projective transforms of the random crops; crops >= 1
    noise_seeds: np.ndarray  # (N, 2) seeds of the in-graph (stateless, per-sample) noise
    robust: np.ndarray  # (N, ROBUSTNESS_DRAWS, 8) transforms of the robustness figure


def draw(model: LoadedModel, jobs: Sequence[AscentJob], recipe: Recipe, param: Parameterization) -> Draws:
    """Seeded draws per job. For pixel recipes the start and augmentations are drawn first and in the same
    order as `initial_state`, so the classic recipes keep their images."""
    n, steps, k = len(jobs), recipe.steps, max(1, recipe.crops)
    size = param.size
    out = Draws(
        np.empty((n, *param.shape), np.float32),
        np.empty((n, steps, TRANSFORM_DIMS), np.float32),
        np.zeros((n, steps, k, TRANSFORM_DIMS), np.float32),
        np.zeros((n, 2), np.int32),
        np.empty((n, ROBUSTNESS_DRAWS, TRANSFORM_DIMS), np.float32),
    )
    mean_side = np.linspace(recipe.crop_start, recipe.crop_end, steps)[:, None]
    for i, job in enumerate(jobs):
        seed = sample_seed(model.key, job.layer, job.filter, job.seed, job.variant)
        rng = np.random.default_rng(seed)
        out.starts[i] = param.initial(rng, recipe.init_scale)
        augs = rng.uniform(-1.0, 1.0, (steps, AUG_DIMS)).astype(np.float32)
        after = rng.uniform(-1.0, 1.0, (steps, 2)) if recipe.jitter_after else None
        out.transforms[i] = transform_params(augs, recipe, size, after)
        if recipe.crops:  # xplique's MaCo: centres ~ N(0.5, 0.15), sides ~ N(mean, 0.05) in [0.05, 1]
            centre = 0.5 + rng.normal(0.0, 0.15, (steps, k, 2))
            side = np.clip(rng.normal(mean_side, 0.05, (steps, k)), 0.05, 1.0)[..., None]
            out.crops[i] = crop_transforms(centre - side / 2, side, size)
        out.noise_seeds[i] = rng.integers(0, 2**30, 2)
        out.robust[i] = robustness_transforms(np.random.default_rng([seed, 1]), size)
    return out


def crop_transforms(corner: np.ndarray, side: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Projective transforms of square crops (relative top-left `corner` (..., 2) as (y, x), relative side
    (..., 1)) resized to the whole image, as `tf.image.crop_and_resize` samples them. The transform op is
    used rather than crop_and_resize, whose gradient sums several crops of one image in an order that
    depends on the batch."""
    h, w = size
    s = side[..., 0].astype(np.float64)
    y0, x0 = corner[..., 0] * (h - 1), corner[..., 1] * (w - 1)
    zeros = np.zeros_like(s)
    return np.stack([s, zeros, x0, zeros, s, y0, zeros, zeros], axis=-1).astype(np.float32)


def chunk_ranges(jobs: Sequence[AscentJob], limit: int) -> list[tuple[int, int]]:
    """[start, end) of chunks of at most `limit` jobs that never split a `diversity` group (the variants
    of one unit, consecutive in `jobs`); a group larger than `limit` is a chunk of its own."""
    groups: list[list[int]] = []
    for i, job in enumerate(jobs):
        if groups and job.diversity > 1 and jobs[groups[-1][0]].group == job.group:
            groups[-1].append(i)
        else:
            groups.append([i])
    out: list[tuple[int, int]] = []
    for g in groups:
        if out and g[-1] + 1 - out[-1][0] <= limit:
            out[-1] = (out[-1][0], g[-1] + 1)
        else:
            out.append((g[0], g[-1] + 1))
    return out


def partners(jobs: Sequence[AscentJob]) -> tuple[np.ndarray, np.ndarray]:
    """For each job of a chunk, the chunk indices of the other variants of its group and their weights
    (1 / group size, as lucid divides by the batch; 0 pads a row): (N, P) each, P = largest group - 1."""
    index: dict[tuple[Any, ...], list[int]] = {}
    for i, job in enumerate(jobs):
        if job.diversity > 1:
            index.setdefault(job.group, []).append(i)
    width = max((len(v) - 1 for v in index.values()), default=0)
    idx = np.tile(np.arange(len(jobs), dtype=np.int32)[:, None], (1, width))
    weight = np.zeros((len(jobs), width), np.float32)
    for members in index.values():
        for i in members:
            others = [j for j in members if j != i]
            idx[i, : len(others)] = others
            weight[i, : len(others)] = 1.0 / len(members)
    return idx, weight


def objective_arrays(jobs: Sequence[AscentJob], channels: int) -> tuple[np.ndarray, ...]:
    """Per-sample objective kind, neuron position ((-1, -1): the map's centre) and direction (N, channels)."""
    kinds = np.array([OBJECTIVES.index(j.objective) for j in jobs], np.int32)
    pos = np.array([j.position if j.position is not None else (-1, -1) for j in jobs], np.int32).reshape(
        -1, 2
    )
    dirs = np.zeros((len(jobs), channels), np.float32)
    for i, job in enumerate(jobs):
        if job.direction is not None:
            dirs[i, : len(job.direction)] = job.direction
    return kinds, pos, dirs


def zoomed_cell(pos: Any, side: int, map_side: int, pad: int) -> Any:
    """The map cell that a fixed-size model reads for cell `pos` of the unpadded image's map (one axis;
    ints or int tensors), when it sees the image on a canvas `pad` px larger on each side scaled back to
    its input `side`. The cell's centre, pos + 0.5 in map units (a map of `map_side` cells spans the input
    side), moves by the pad in map units (pad * map_side / side) and then scales by side / canvas side;
    the cell that contains the result is ((2 pos + 1) side + 2 pad map_side) // (2 (side + 2 pad)), in
    integer arithmetic so that it does not depend on rounding."""
    return ((2 * pos + 1) * side + 2 * pad * map_side) // (2 * (side + 2 * pad))


class AscentProgram:
    """The compiled ascent loop for one model, layer set, size and recipe."""

    def __init__(self, model: LoadedModel, layers: Sequence[str], recipe: Recipe, dtype: str = "float32"):
        import keras

        if dtype not in PRECISIONS:
            raise ValueError(f"precision {dtype!r} is not one of {', '.join(PRECISIONS)}")
        self.model, self.layers, self.recipe = model, tuple(layers), recipe
        self.size = ascent_size(model, recipe)
        outputs = self._objective_outputs()
        extractor = keras.Model(model.model.inputs, outputs)
        self.extractor = extractor if dtype == "float32" else mixed_precision_clone(extractor, dtype)
        self.channels = [int(o.shape[-1]) for o in outputs]
        self.dtype = tf.as_dtype(dtype)  # compute dtype of the extractor; the image stays float32
        self.loss_scale = FLOAT16_LOSS_SCALE if dtype == "float16" else 1.0
        self.trace_count = 0
        self.batch_limit: int | None = None  # set after an out-of-memory error: later chunks start there
        h, w = self.size
        c = model.channels
        self.param = Parameterization(
            recipe.parameterization, self.size, c, recipe.decorrelate, recipe.decay_power
        )
        self.canvas = (h + 2 * recipe.pad, w + 2 * recipe.pad)
        # a neuron's position is given in the map of the unpadded image; on the padded canvas of a free-size
        # model it moves by half the difference of the two maps' sizes, and a fixed-size model, which sees
        # the canvas scaled back to its input size (`_views`), reads the cell `zoomed_cell` gives
        self._zoomed = bool(model.fixed_input and recipe.pad and not recipe.crops)
        shapes = extractor.compute_output_shape((1, h, w, c))
        if not isinstance(shapes[0], list | tuple):  # one output: one shape rather than a list of them
            shapes = [shapes]
        self._map_sizes = [(int(s[1] or 0), int(s[2] or 0)) if len(s) == 4 else (0, 0) for s in shapes]
        self.clip_pixels = recipe.is_regularized  # pixel recipes: clip x to [-1, 1] after every step
        self._blur = gaussian_kernel(recipe.blur_sigma, c) if recipe.blur_every else None
        self._opt = tf.constant(optimizer_tables(recipe.optimizer, recipe.steps)) if recipe.adam else None
        spec = [
            tf.TensorSpec((None, *self.param.shape), tf.float32),
            tf.TensorSpec((None,), tf.int32),  # layer index
            tf.TensorSpec((None,), tf.int32),  # filter index
            tf.TensorSpec((None, recipe.steps, TRANSFORM_DIMS), tf.float32),
            tf.TensorSpec((None,), tf.int32),  # objective kind
            tf.TensorSpec((None, 2), tf.int32),  # neuron position
            tf.TensorSpec((None, max(self.channels)), tf.float32),  # direction
            tf.TensorSpec((None, None), tf.int32),  # diversity partners
            tf.TensorSpec((None, None), tf.float32),  # ... and their weights
            tf.TensorSpec((None, recipe.steps, max(1, recipe.crops), TRANSFORM_DIMS), tf.float32),
            tf.TensorSpec((None, 2), tf.int32),  # noise seeds
            tf.TensorSpec((None, ROBUSTNESS_DRAWS, TRANSFORM_DIMS), tf.float32),
        ]
        self._run = tf.function(self._ascend, input_signature=spec, reduce_retracing=True)

    # -- graph pieces -------------------------------------------------------------------------
    def _objective_outputs(self) -> list[Any]:
        """The symbolic outputs the objectives read: one per layer (class models read the logits)."""
        return [_objective_output(self.model.layer(name), self.recipe.pre_relu) for name in self.layers]

    def _outputs(self, x: tf.Tensor) -> list[tf.Tensor]:
        """The layers' outputs for canonical images; the preprocessing runs in float32 (a mixed-precision
        extractor casts its input itself)."""
        outs = self.extractor(self.model.preprocess((x + 1.0) * 127.5), training=False)
        return list(outs) if isinstance(outs, list | tuple) else [outs]

    def _objective(self, outs: list[tf.Tensor], t: dict[str, tf.Tensor], canvas: bool = False) -> tf.Tensor:
        """Per-sample objective of the sample's own layer, kind and unit. The channel mean picks the
        sample's channel before the mean (in float32); all kinds are computed and one is selected per
        sample, so a batch may mix them (the others' gradients are exact zeros). `canvas`: `outs` are of
        the views of `_views` (the padded canvas) rather than of the image itself."""
        b, pad = self.recipe.border, self.recipe.pad
        value = tf.zeros(tf.shape(outs[0])[:1], tf.float32)
        for i, (out, channels) in enumerate(zip(outs, self.channels, strict=True)):
            inner = out
            if b and out.shape[1] is not None and out.shape[1] > 2 * b and out.shape[2] > 2 * b:
                inner = out[:, b:-b, b:-b, :]
            f = tf.minimum(t["filter"], channels - 1)
            picked = tf.gather(inner, f, axis=3, batch_dims=1)
            mine = tf.reduce_mean(tf.cast(picked, tf.float32), axis=[1, 2])
            hh, ww = tf.shape(out)[1], tf.shape(out)[2]
            mh, mw = self._map_sizes[i]
            py, px = t["pos"][:, 0], t["pos"][:, 1]
            if canvas and self._zoomed:
                py, px = zoomed_cell(py, self.size[0], mh, pad), zoomed_cell(px, self.size[1], mw, pad)
            else:  # the same map, or the larger map of the canvas of a free-size model
                py, px = py + (hh - mh) // 2, px + (ww - mw) // 2
            y = tf.where(t["pos"][:, 0] < 0, hh // 2, py)
            x = tf.where(t["pos"][:, 1] < 0, ww // 2, px)
            y, x = tf.clip_by_value(y, 0, hh - 1), tf.clip_by_value(x, 0, ww - 1)
            neuron = tf.cast(tf.gather_nd(out, tf.stack([y, x, f], axis=1), batch_dims=1), tf.float32)
            inner32 = tf.cast(inner, tf.float32)
            layer = tf.reduce_mean(tf.square(inner32), axis=[1, 2, 3])
            dots = tf.reduce_sum(inner32 * t["dirs"][:, None, None, :channels], axis=-1)
            direction = tf.reduce_mean(dots, axis=[1, 2])
            kind = t["kind"]
            mine = tf.where(
                kind == 1, neuron, tf.where(kind == 2, layer, tf.where(kind == 3, direction, mine))
            )
            value = tf.where(t["layer"] == i, mine, value)
        return value

    def _similarity(self, outs: list[tf.Tensor], t: dict[str, tf.Tensor], views: int) -> tf.Tensor:
        """lucid's diversity term per sample: the weighted sum of the cosine similarities of its layer's
        Gram matrix (averaged over its `views` crops) with those of its group's other variants."""
        value = tf.zeros(tf.shape(t["layer"]), tf.float32)
        for i, (out, c) in enumerate(zip(outs, self.channels, strict=True)):
            flat = tf.reshape(tf.cast(out, tf.float32), [tf.shape(out)[0], -1, c])
            gram = tf.matmul(flat, flat, transpose_a=True)
            gram = gram / tf.maximum(
                tf.sqrt(tf.reduce_sum(tf.square(gram), axis=[1, 2], keepdims=True)), 1e-10
            )
            gram = tf.reduce_mean(tf.reshape(gram, [-1, views, c, c]), axis=1)
            sims = tf.reduce_sum(gram[:, None] * tf.gather(gram, t["partners"]), axis=[2, 3])
            value = tf.where(t["layer"] == i, tf.reduce_sum(sims * t["weights"], axis=1), value)
        return value

    def _views(self, img: tf.Tensor, step: tf.Tensor, t: dict[str, tf.Tensor]) -> tf.Tensor:
        """What the model sees at `step`: the recipe's random crops, or its random transforms, plus noise
        (drawn in the graph by stateless ops from each sample's own seed)."""
        r = self.recipe
        k = max(1, r.crops)
        if r.crops:  # out of the image the crop sees gray, as crop_and_resize's extrapolation value 0
            crops = tf.reshape(t["crops"][:, step], [-1, TRANSFORM_DIMS])
            seen = project(tf.repeat(img, k, axis=0), crops, self.size, "CONSTANT")
        elif r.jitter or r.rotate or r.scale or r.pad or r.jitter_after:
            seen = project(img, t["transforms"][:, step], self.canvas, "CONSTANT" if r.pad else "REFLECT")
        else:
            seen = img
        if self.model.fixed_input and tuple(seen.shape[1:3]) != tuple(self.size):
            # a model that takes only its input size (a Flatten/Dense head) sees the canvas that lucid's
            # `pad` enlarges scaled back to that size (a zoom-out by size / canvas)
            seen = tf.image.resize(seen, self.size, method="bilinear")
        if r.noise:
            shape = [k, *seen.shape[1:]]

            def noise(seed: tf.Tensor) -> tf.Tensor:
                s = tf.stack([seed[0], seed[1] + step])
                gauss = tf.random.stateless_normal(shape, s, stddev=r.noise)
                return gauss + tf.random.stateless_uniform(shape, s + 1, -r.noise / 2, r.noise / 2)

            fn = tf.map_fn(noise, t["noise_seeds"], fn_output_signature=tf.TensorSpec(shape, tf.float32))
            seen = seen + tf.reshape(fn, tf.shape(seen))
        return seen

    def _repeat(self, t: dict[str, tf.Tensor], k: int) -> dict[str, tf.Tensor]:
        """The per-sample targets for `k` views of each sample (views of one sample are consecutive)."""
        keys = ("layer", "filter", "kind", "pos", "dirs")
        return {**t, **{key: tf.repeat(t[key], k, axis=0) for key in keys}} if k > 1 else t

    def _mean_over(self, values: tf.Tensor, k: int) -> tf.Tensor:
        return tf.reduce_mean(tf.reshape(values, [-1, k]), axis=1) if k > 1 else values

    def _ascend(
        self, z0, layer_idx, filter_idx, transforms, kind, pos, dirs, mates, weights, crops, seeds, robust
    ):
        self.trace_count += 1  # runs only while tracing
        r = self.recipe
        t = dict(layer=layer_idx, filter=filter_idx, kind=kind, pos=pos, dirs=dirs, partners=mates)
        t.update(weights=weights, transforms=transforms, crops=crops, noise_seeds=seeds)
        k = max(1, r.crops)
        tk = self._repeat(t, k)
        diverse = tf.shape(mates)[1] > 0
        z = z0
        m = tf.zeros_like(z0)
        v = tf.zeros_like(z0)
        mask = tf.zeros([tf.shape(z0)[0], *self.size, self.model.channels], tf.float32)
        first = tf.zeros(tf.shape(z0)[:1], tf.float32)
        eps = 1e-8 if r.optimizer == "adam" else 1e-7
        for step in tf.range(r.steps):
            with tf.GradientTape() as tape:
                tape.watch(z)
                img = self.param.image(z)
                outs = self._outputs(self._views(img, step, t))
                act = self._mean_over(self._objective(outs, tk, canvas=True), k)
                objective = act - r.tv * total_variation(img) if r.tv else act
                if r.diversity_weight:
                    penalty = tf.cond(
                        diverse,
                        lambda outs=outs: self._similarity(outs, t, k),
                        lambda act=act: tf.zeros_like(act),
                    )
                    objective = objective - r.diversity_weight * penalty
                total = tf.reduce_sum(objective)
                if self.loss_scale != 1.0:
                    total = total * self.loss_scale
            grads, image_grads = tape.gradient(total, [z, img])
            mask = mask + tf.abs(image_grads)
            first = tf.where(tf.equal(step, 0), act, first)
            if self._opt is None:
                z = z + r.lr * normalize_per_sample(grads)
            else:  # ascent: the optimiser's step on -objective, with Keras' moving-average form
                coef = self._opt[step]
                m = m + (grads - m) * 0.1
                v = v + (tf.square(grads) - v) * 0.001
                z = z + r.lr * (coef[0] * m + coef[1] * grads) / (tf.sqrt(coef[2] * v) + eps)
            if self.param.kind == "pixel":
                z = regularize(z, step, r, self._blur, self.size, clip=self.clip_pixels)
        img = self.param.image(z)
        final = self._objective(self._outputs(img), t)
        d = ROBUSTNESS_DRAWS
        moved = project(tf.repeat(img, d, axis=0), tf.reshape(robust, [-1, TRANSFORM_DIMS]), self.size)
        robust_act = self._mean_over(self._objective(self._outputs(moved), self._repeat(t, d)), d)
        return img, first, final, robust_act, tf.reduce_sum(mask, axis=-1)

    # -- host side ----------------------------------------------------------------------------
    def run(
        self,
        jobs: Sequence[AscentJob],
        batch_size: int = 16,
        on_chunk: Callable[[int], None] | None = None,
        on_results: Callable[[list[AscentResult]], None] | None = None,
    ) -> list[AscentResult]:
        """Optimise all jobs in chunks of `batch_size` (never splitting a `diversity` group), halving the
        chunk on out-of-memory.

        After an out-of-memory error the failed chunk is retried at half the size, and the program keeps
        that limit (`batch_limit`) for its later chunks. `on_results` gets each finished chunk's results
        (the scheduler stores them at once, so a killed run resumes from there); `on_chunk` its size."""
        for job in jobs:
            if job.objective not in OBJECTIVES:
                raise ValueError(f"objective {job.objective!r} is not one of {', '.join(OBJECTIVES)}")
        index = {name: i for i, name in enumerate(self.layers)}
        draws = draw(self.model, jobs, self.recipe, self.param)
        limit = max(1, min(batch_size, self.batch_limit or batch_size))
        results: list[AscentResult] = []
        pos = 0
        while pos < len(jobs):
            start, end = chunk_ranges(jobs[pos:], limit)[0]
            chunk = list(jobs[pos + start : pos + end])
            n = len(chunk)
            sl = slice(pos, pos + n)
            kinds, where, dirs = objective_arrays(chunk, max(self.channels))
            mates, weights = partners(chunk)
            try:
                x, first, final, robust, mask = self._run(
                    tf.constant(draws.starts[sl]),
                    tf.constant([index[j.layer] for j in chunk], tf.int32),
                    tf.constant([j.filter for j in chunk], tf.int32),
                    tf.constant(draws.transforms[sl]),
                    tf.constant(kinds),
                    tf.constant(where),
                    tf.constant(dirs),
                    tf.constant(mates),
                    tf.constant(weights),
                    tf.constant(draws.crops[sl]),
                    tf.constant(draws.noise_seeds[sl]),
                    tf.constant(draws.robust[sl]),
                )
            except tf.errors.ResourceExhaustedError:
                if n == 1 or limit == 1:
                    raise
                limit = self.batch_limit = max(1, n // 2)
                log.warning("out of memory with a batch of %d; retrying with %d", n, limit)
                continue
            xs, first, final = x.numpy(), first.numpy(), final.numpy()
            robust, mask = robust.numpy(), mask.numpy()
            done = []
            for i, job in enumerate(chunk):
                image = display(xs[i], self.recipe)
                done.append(
                    AscentResult(
                        job=job,
                        image=image,
                        raw=xs[i],
                        activation=float(final[i]),
                        initial_activation=float(first[i]),
                        dead=bool(final[i] <= self.recipe.dead_threshold),
                        hf_energy=hf_energy(image),
                        robustness=robustness_ratio(float(robust[i]), float(final[i])),
                        mask=mask[i] if self.recipe.phase_only else None,
                    )
                )
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
