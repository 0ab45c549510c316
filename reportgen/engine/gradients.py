"""Batched gradient engines: class activation maps (Grad-CAM, Grad-CAM++, LayerCAM, Score-CAM,
Faster-ScoreCAM), input-gradient saliency (vanilla, SmoothGrad) and occlusion.

Every image-dependent value (pixels, target class, occluding box) is a tensor argument of a function
compiled once per model (and per Grad-CAM layer) with a fixed `input_signature` whose batch dimension
is open, so a new image, a new class or a smaller last chunk never retraces; `GradientEngine.traces`
counts traces to prove it.

Class scores are the PRE-softmax logits (`LoadedModel.logits_output`): the gradient of a softmax output
also depends on every other class and vanishes when the model is confident, which washes maps out.
The score of a batch is the sum of each image's own target score; in inference mode images do not
interact, so the gradient w.r.t. each image (or its feature maps) is that image's own gradient.

A target of -1 means "the image's top prediction"; the resolved class comes back with every result.

Every CAM is the positive part of a weighted sum of the layer's feature maps, divided by its peak (an
all-zero map stays zero) at the layer's resolution, then bilinearly upsampled to the input. The methods
differ only in the weights: Grad-CAM, Grad-CAM++ and LayerCAM come from the same forward and backward
pass; Score-CAM needs one extra forward pass per (image, channel) mask, batched across images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from reportgen.engine.methods import CAM_METHODS, GRADIENT_CAMS
from reportgen.models import LoadedModel

Fill = Literal["gray", "black", "blur", "mean"]
GRAY = 128.0  # mid-gray in 0..255 pixel space
EPSILON = 1e-7  # keras.backend.epsilon(): keeps Score-CAM's min-max normalisation finite on flat maps


@dataclass
class CamResult:
    heatmaps: np.ndarray  # float32 (N, H, W) in [0, 1], at the model's input size
    maps: np.ndarray  # float32 (N, h, w) in [0, 1], the same maps at the layer's own resolution
    classes: np.ndarray  # int32 (N,) the class each map explains (target, or the top prediction)
    probability: np.ndarray  # float32 (N,) softmax probability of that class
    top: np.ndarray  # int32 (N,) the top predicted class
    probs: np.ndarray  # float32 (N, K) softmax of the logits


@dataclass
class CamMaps:
    """Several CAM methods of one layer for the same images (`gradcam` bundles only Grad-CAM)."""

    heatmaps: dict[str, np.ndarray]  # method -> float32 (N, H, W) in [0, 1] at the model's input size
    maps: dict[str, np.ndarray]  # method -> float32 (N, h, w) in [0, 1] at the layer's resolution
    classes: np.ndarray  # int32 (N,)
    probability: np.ndarray  # float32 (N,)
    top: np.ndarray  # int32 (N,)
    probs: np.ndarray  # float32 (N, K)
    masked_passes: int  # Score-CAM forward passes run (one per kept channel per image)


@dataclass
class GradResult:
    gradients: np.ndarray  # float32 (N, H, W, C): d(target logit) / d(pixel 0..255)
    classes: np.ndarray  # int32 (N,)
    probability: np.ndarray  # float32 (N,)


@dataclass
class SlidingResult:
    drops: np.ndarray  # float32 (N, ny, nx): probability drop of the target class per patch position
    sensitivity: np.ndarray  # float32 (N, H, W): mean drop of the patches covering each pixel
    boxes: np.ndarray  # int32 (ny, nx, 4): each position's [x0, y0, x1, y1] in model-input pixels
    base: np.ndarray  # float32 (N,) target probability of the unoccluded image


def saliency_map(gradients: np.ndarray) -> np.ndarray:
    """(N, H, W, C) gradients -> (N, H, W) max |gradient| over channels (Simonyan et al.)."""
    return np.abs(gradients).max(axis=-1)


def smoothgrad_noise(seed: int, image: int, samples: int, shape: Sequence[int], std: float) -> np.ndarray:
    """The noise of one image's SmoothGrad copies: seeded per (seed, image), so chunking never changes it."""
    rng = np.random.default_rng([seed, image])
    return (rng.standard_normal((samples, *shape), dtype=np.float32) * np.float32(std)).astype(np.float32)


def scale_box(
    box: Sequence[int], original: tuple[int, int], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] in an image's own pixels (original = (width, height)) -> model-input pixels.

    Rounds outwards so a small box never vanishes, and clamps to the input; may return an empty box
    (x1 <= x0) when the box lies outside the image, which callers report.
    """
    (w0, h0), (h, w) = original, size
    sx, sy = w / w0, h / h0
    x0, y0, x1, y1 = box
    bx0 = int(np.clip(np.floor(x0 * sx), 0, w))
    by0 = int(np.clip(np.floor(y0 * sy), 0, h))
    bx1 = int(np.clip(np.ceil(x1 * sx), 0, w))
    by1 = int(np.clip(np.ceil(y1 * sy), 0, h))
    return bx0, by0, bx1, by1


def fill_source(pixels: np.ndarray, fill: Fill) -> np.ndarray:
    """What replaces occluded pixels, as a full image per input image (N, H, W, C) float32.

    `mean` is each image's per-channel mean (it hides structure but keeps the colour balance); `blur`
    is a strong Gaussian blur (sigma 1/12 of the shorter side), which removes detail but keeps the
    coarse shape, so it tests whether the model needs the fine texture inside the box.
    """
    pixels = np.asarray(pixels, np.float32)
    if fill == "gray":
        return np.full_like(pixels, GRAY)
    if fill == "black":
        return np.zeros_like(pixels)
    if fill == "mean":
        return np.broadcast_to(pixels.mean(axis=(1, 2), keepdims=True), pixels.shape).astype(np.float32)
    if fill == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = max(1.0, min(pixels.shape[1:3]) / 12)
        return gaussian_filter(pixels, sigma=(0, sigma, sigma, 0), mode="reflect").astype(np.float32)
    raise ValueError(f"unknown fill {fill!r}")


def occlude(pixels: np.ndarray, source: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """Copy of one image (H, W, C) with box [x0, y0, x1, y1] (model-input pixels) taken from `source`."""
    out = np.array(pixels, np.float32, copy=True)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = source[y0:y1, x0:x1]
    return out


def patch_boxes(size: tuple[int, int], patch: int, stride: int) -> np.ndarray:
    """(ny, nx, 4) [x0, y0, x1, y1] of every sliding-patch position; the last row/column touches the edge."""

    def starts(length: int) -> list[int]:
        p = min(patch, length)
        out = list(range(0, length - p + 1, stride))
        if out[-1] != length - p:
            out.append(length - p)
        return out

    h, w = size
    ys, xs = starts(h), starts(w)
    boxes = np.zeros((len(ys), len(xs), 4), np.int32)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            boxes[i, j] = (x, y, min(x + patch, w), min(y + patch, h))
    return boxes


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _pick(logits: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-row class (target, or argmax where target < 0) and its logit."""
    top = tf.argmax(logits, axis=-1, output_type=tf.int32)
    cls = tf.where(target >= 0, target, top)
    return cls, tf.gather(logits, cls, axis=1, batch_dims=1)


def _weighted(fmaps: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """(N, h, w, K) feature maps x (N, 1, 1, K) channel weights -> (N, h, w) weighted sum."""
    return tf.reduce_sum(fmaps * weights, axis=-1)


def _gradcam_pp_weights(fmaps: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al. 2018, eq. 19 with the exponential-score trick).

    With Y = exp(S), dY/dA = Y g, and for a piecewise-linear network the 2nd/3rd derivatives are Y g^2 and
    Y g^3 (g = dS/dA); Y cancels in alpha = g^2 / (2 g^2 + sum_ab(A) g^3) and only scales the map, which is
    peak-normalised, so it is left out: exp of a large logit would overflow float32. A zero denominator
    becomes 1, and alpha is divided by its spatial sum, as both the authors' code and tf-keras-vis do.
    """
    g2 = tf.square(grads)
    denom = 2.0 * g2 + g2 * grads * tf.reduce_sum(fmaps, axis=(1, 2), keepdims=True)
    alpha = g2 / tf.where(denom != 0.0, denom, tf.ones_like(denom))
    norm = tf.reduce_sum(alpha, axis=(1, 2), keepdims=True)
    alpha = alpha / tf.where(norm != 0.0, norm, tf.ones_like(norm))
    return tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2), keepdims=True)


def _peak_normalised(cams: tf.Tensor) -> tf.Tensor:
    """(N, h, w, M) maps -> their positive part divided by each map's peak; an all-zero map (no positive
    evidence) stays zero instead of becoming NaN."""
    heat = tf.nn.relu(cams)
    return tf.math.divide_no_nan(heat, tf.reduce_max(heat, axis=(1, 2), keepdims=True))


def faster_scorecam_channels(fmaps: np.ndarray, max_n: int) -> np.ndarray:
    """(N, min(max_n, K)) indices of each image's channels of largest spatial standard deviation, largest
    first (ties: lower index, as tf.math.top_k); Faster-ScoreCAM masks only with these."""
    std = np.asarray(fmaps, np.float32).std(axis=(1, 2))
    return np.argsort(-std, axis=1, kind="stable")[:, : min(max_n, std.shape[1])]


class GradientEngine:
    """Compiled gradient programs of one model; get it with `engine_for(model)`."""

    def __init__(self, model: LoadedModel, batch_size: int = 16):
        self.lm = model
        self.batch_size = batch_size
        self.traces: dict[str, int] = {}
        h, w = model.input_size
        self.size = (h, w)
        self.pixel_spec = tf.TensorSpec((None, h, w, model.channels), tf.float32)
        self.classes = int(model.model.output_shape[-1])
        self._logits_model: Any = None
        self._cams: dict[str, Callable[..., Any]] = {}
        self._grads: Callable[..., Any] | None = None
        self._occluded: Callable[..., Any] | None = None
        self._masked: Callable[..., Any] | None = None

    def _trace(self, name: str) -> None:
        # Runs only while tracing (a Python side effect), so it counts traces, not calls.
        self.traces[name] = self.traces.get(name, 0) + 1

    @property
    def logits_model(self) -> Any:
        import keras

        if self._logits_model is None:
            self._logits_model = keras.Model(self.lm.model.inputs, self.lm.logits_output)
        return self._logits_model

    # -- class activation maps ---------------------------------------------------------------------

    def _cam_fn(self, layer: str) -> Callable[..., Any]:
        """Grad-CAM, Grad-CAM++ and LayerCAM of one layer from a single forward + backward pass.

        Returns the three maps as the last axis of (N, h, w, 3) at the layer's resolution and upsampled
        (the resize treats them as channels, each interpolated on its own), plus the feature maps, which
        Score-CAM turns into masks.
        """
        if layer in self._cams:
            return self._cams[layer]
        import keras

        outputs = [self.lm.model.get_layer(layer).output, self.lm.logits_output]
        sub = keras.Model(self.lm.model.inputs, outputs)
        size = self.size
        name = f"gradcam:{layer}"

        @tf.function(input_signature=[self.pixel_spec, tf.TensorSpec((None,), tf.int32)])
        def cam(pixels: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, ...]:
            self._trace(name)
            with tf.GradientTape() as tape:
                fmaps, logits = sub([self.lm.preprocess(pixels)], training=False)
                cls, score = _pick(logits, target)
                total = tf.reduce_sum(score)
            grads = tape.gradient(total, fmaps)
            raw = tf.stack(
                [
                    _weighted(fmaps, tf.reduce_mean(grads, axis=(1, 2), keepdims=True)),  # Grad-CAM
                    _weighted(fmaps, _gradcam_pp_weights(fmaps, grads)),
                    tf.reduce_sum(tf.nn.relu(grads) * fmaps, axis=-1),  # LayerCAM: per-location weights
                ],
                axis=-1,
            )
            own = _peak_normalised(raw)
            heat = tf.image.resize(own, size, method="bilinear")
            probs = tf.nn.softmax(logits, axis=-1)
            top = tf.argmax(logits, axis=-1, output_type=tf.int32)
            return heat, cls, tf.gather(probs, cls, axis=1, batch_dims=1), top, probs, own, fmaps

        self._cams[layer] = cam
        return cam

    def _masked_fn(self) -> Callable[..., Any]:
        """Score-CAM's forward pass: each row is one (image, activation map) pair; the map is upsampled to
        the input, min-max normalised and multiplied with the image's PREPROCESSED input (as the paper and
        tf-keras-vis do), and the row returns the softmax probability of its target class. Map sizes are
        open in the signature, so every layer shares the one trace."""
        if self._masked is None:
            model = self.logits_model
            size = self.size

            @tf.function(
                input_signature=[
                    self.pixel_spec,
                    tf.TensorSpec((None, None, None), tf.float32),
                    tf.TensorSpec((None,), tf.int32),
                    tf.TensorSpec((None,), tf.int32),
                ]
            )
            def masked(images: tf.Tensor, maps: tf.Tensor, index: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
                self._trace("scorecam")
                up = tf.image.resize(maps[..., None], size, method="bilinear")
                lo = tf.reduce_min(up, axis=(1, 2, 3), keepdims=True)
                hi = tf.reduce_max(up, axis=(1, 2, 3), keepdims=True)
                mask = (up - lo) / (hi - lo + EPSILON)
                x = self.lm.preprocess(tf.gather(images, index)) * mask
                probs = tf.nn.softmax(model([x], training=False), axis=-1)
                return tf.gather(probs, target, axis=1, batch_dims=1)

            self._masked = masked
        return self._masked

    def _score_weights(
        self, pixels: np.ndarray, fmaps: np.ndarray, classes: np.ndarray, channels: list[np.ndarray]
    ) -> np.ndarray:
        """(N, K) Score-CAM weights: the class probability of each image masked by each of its `channels`
        (zero for channels not listed). The rows of all images go through the compiled pass in chunks of
        batch_size, so a chunk holds one image's masks or several images' where they fit."""
        fn = self._masked_fn()
        rows_img = np.concatenate([np.full(len(c), i, np.int32) for i, c in enumerate(channels)])
        rows_ch = np.concatenate(channels).astype(np.int32)
        weights = np.zeros((len(pixels), fmaps.shape[-1]), np.float32)
        for s in _chunks(len(rows_img), self.batch_size):
            used, local = np.unique(rows_img[s], return_inverse=True)
            p = fn(
                tf.constant(pixels[used]),
                tf.constant(np.ascontiguousarray(fmaps[rows_img[s], :, :, rows_ch[s]])),
                tf.constant(local.astype(np.int32)),
                tf.constant(classes[rows_img[s]]),
            )
            weights[rows_img[s], rows_ch[s]] = p.numpy()
        return weights

    def cams(
        self,
        pixels: np.ndarray,
        layer: str,
        targets: np.ndarray | int = -1,
        methods: Sequence[str] = ("gradcam",),
        max_n: int = 10,
    ) -> CamMaps:
        """The CAMs of `layer` by each of `methods` (see CAM_METHODS) for each image (0..255 pixels).

        Score-CAM masks with every channel of the layer; Faster-ScoreCAM only with each image's `max_n`
        channels of largest spatial standard deviation (tf-keras-vis). When both are asked for, the
        faster one reuses Score-CAM's probabilities for its channels instead of recomputing them.
        """
        unknown = sorted(set(methods) - set(CAM_METHODS))
        if unknown:
            raise ValueError(f"unknown CAM methods {unknown}; known: {list(CAM_METHODS)}")
        pixels = np.asarray(pixels, np.float32)
        target = np.broadcast_to(np.asarray(targets, np.int32), (len(pixels),))
        fn = self._cam_fn(layer)
        parts = [
            fn(tf.constant(pixels[s]), tf.constant(target[s])) for s in _chunks(len(pixels), self.batch_size)
        ]
        if not parts:
            h, w = self.size
            lh, lw, k = self.lm.model.get_layer(layer).output.shape[1:4]
            empty = {m: np.zeros((0, h, w), np.float32) for m in methods}
            return CamMaps(
                empty,
                {m: np.zeros((0, lh or 0, lw or 0), np.float32) for m in methods},
                np.zeros(0, np.int32),
                np.zeros(0, np.float32),
                np.zeros(0, np.int32),
                np.zeros((0, self.classes), np.float32),
                0,
            )
        heat, cls, prob, top, probs, own, fmaps = (
            np.concatenate([p[i].numpy() for p in parts]) for i in range(7)
        )
        heatmaps = {m: heat[..., j] for j, m in enumerate(GRADIENT_CAMS) if m in methods}
        maps = {m: own[..., j] for j, m in enumerate(GRADIENT_CAMS) if m in methods}
        passes = 0
        if "scorecam" in methods or "faster-scorecam" in methods:
            every = np.arange(fmaps.shape[-1])
            keep = faster_scorecam_channels(fmaps, max_n)
            channels = [every] * len(pixels) if "scorecam" in methods else list(keep)
            weights = self._score_weights(pixels, fmaps, cls, channels)
            passes = sum(len(c) for c in channels)
            chosen = {"scorecam": weights}
            if "faster-scorecam" in methods:
                chosen["faster-scorecam"] = np.zeros_like(weights)
                np.put_along_axis(chosen["faster-scorecam"], keep, np.take_along_axis(weights, keep, 1), 1)
            for m in methods:
                if m in chosen:
                    raw = np.einsum("nhwk,nk->nhw", fmaps, chosen[m])
                    own_m = _peak_normalised(tf.constant(raw[..., None]))
                    maps[m] = own_m.numpy()[..., 0]
                    heatmaps[m] = tf.image.resize(own_m, self.size, method="bilinear").numpy()[..., 0]
        return CamMaps(
            {m: heatmaps[m] for m in methods},
            {m: maps[m] for m in methods},
            cls,
            prob,
            top,
            probs,
            passes,
        )

    def gradcam(self, pixels: np.ndarray, layer: str, targets: np.ndarray | int = -1) -> CamResult:
        """Grad-CAM of `layer` for each image (0..255 pixels at the input size), in chunks of batch_size."""
        r = self.cams(pixels, layer, targets, ("gradcam",))
        return CamResult(r.heatmaps["gradcam"], r.maps["gradcam"], r.classes, r.probability, r.top, r.probs)

    # -- input gradients ---------------------------------------------------------------------------

    def _grad_fn(self) -> Callable[..., Any]:
        if self._grads is None:
            model = self.logits_model

            @tf.function(input_signature=[self.pixel_spec, tf.TensorSpec((None,), tf.int32)])
            def grads(pixels: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, ...]:
                self._trace("input_gradients")
                with tf.GradientTape() as tape:
                    tape.watch(pixels)
                    logits = model([self.lm.preprocess(pixels)], training=False)
                    cls, score = _pick(logits, target)
                    total = tf.reduce_sum(score)
                probs = tf.nn.softmax(logits, axis=-1)
                return tape.gradient(total, pixels), cls, tf.gather(probs, cls, axis=1, batch_dims=1)

            self._grads = grads
        return self._grads

    def input_gradients(self, pixels: np.ndarray, targets: np.ndarray | int = -1) -> GradResult:
        """Gradient of each image's target logit w.r.t. its 0..255 pixels (preprocessing included)."""
        pixels = np.asarray(pixels, np.float32)
        target = np.broadcast_to(np.asarray(targets, np.int32), (len(pixels),))
        fn = self._grad_fn()
        parts = [
            fn(tf.constant(pixels[s]), tf.constant(target[s])) for s in _chunks(len(pixels), self.batch_size)
        ]
        if not parts:
            return GradResult(np.zeros_like(pixels), np.zeros(0, np.int32), np.zeros(0, np.float32))
        g, cls, prob = (np.concatenate([p[i].numpy() for p in parts]) for i in range(3))
        return GradResult(g, cls, prob)

    def vanilla(self, pixels: np.ndarray, targets: np.ndarray | int = -1) -> tuple[np.ndarray, GradResult]:
        """Vanilla saliency maps (N, H, W) and the gradients they come from."""
        result = self.input_gradients(pixels, targets)
        return saliency_map(result.gradients), result

    def smoothgrad(
        self,
        pixels: np.ndarray,
        targets: np.ndarray,
        samples: int,
        noise: float,
        seed: int,
        ids: Sequence[int] | None = None,
    ) -> np.ndarray:
        """SmoothGrad (Smilkov et al.): mean gradient over `samples` noisy copies, then max |.| over channels.

        Noise std is `noise * 255` (a share of the pixel range). `targets` must be concrete classes (the
        clean images' classes), so every copy explains the same class even where noise flips the top
        prediction. The copies of all images are streamed through the compiled gradient in chunks of
        batch_size, whatever image they belong to. `ids` numbers the images for their noise (default:
        their position), so that a shard of an image set draws the noise the whole set would.
        """
        pixels = np.asarray(pixels, np.float32)
        target = np.asarray(targets, np.int32)
        n = len(pixels)
        shape = pixels.shape[1:]
        total = np.zeros_like(pixels)
        fn = self._grad_fn()
        rows_x: list[np.ndarray] = []
        rows_i: list[int] = []

        def flush() -> None:
            if rows_x:
                idx = np.asarray(rows_i)
                g = fn(tf.constant(np.stack(rows_x)), tf.constant(target[idx]))[0].numpy()
                np.add.at(total, idx, g)
                rows_x.clear()
                rows_i.clear()

        for i in range(n):
            number = i if ids is None else int(ids[i])
            for copy in pixels[i] + smoothgrad_noise(seed, number, samples, shape, noise * 255.0):
                rows_x.append(copy)
                rows_i.append(i)
                if len(rows_x) == self.batch_size:
                    flush()
        flush()
        return saliency_map(total / samples)

    # -- occlusion ---------------------------------------------------------------------------------

    def _occluded_fn(self) -> Callable[..., Any]:
        if self._occluded is None:
            model = self.logits_model
            h, w = self.size

            @tf.function(
                input_signature=[
                    self.pixel_spec,
                    self.pixel_spec,
                    tf.TensorSpec((None,), tf.int32),
                    tf.TensorSpec((None, 4), tf.int32),
                    tf.TensorSpec((None,), tf.int32),
                ]
            )
            def occluded(
                images: tf.Tensor, sources: tf.Tensor, index: tf.Tensor, boxes: tf.Tensor, target: tf.Tensor
            ) -> tf.Tensor:
                self._trace("occluded_probability")
                ys = tf.range(h)[None, :, None, None]
                xs = tf.range(w)[None, None, :, None]
                b = boxes[:, None, None, None, :]
                inside = (xs >= b[..., 0]) & (xs < b[..., 2]) & (ys >= b[..., 1]) & (ys < b[..., 3])
                x = tf.where(inside, tf.gather(sources, index), tf.gather(images, index))
                probs = tf.nn.softmax(model([self.lm.preprocess(x)], training=False), axis=-1)
                return tf.gather(probs, target, axis=1, batch_dims=1)

            self._occluded = occluded
        return self._occluded

    def sliding(
        self,
        pixels: np.ndarray,
        targets: np.ndarray,
        patch: int,
        stride: int,
        fill: Fill = "gray",
        base: np.ndarray | None = None,
    ) -> SlidingResult:
        """Sliding-patch occlusion (Zeiler & Fergus): the drop of the target probability per patch position.

        Images and their fill sources go to the compiled function once per chunk; each row of a chunk is
        an (image, position) pair that the graph assembles by masking, so every position of every image
        is batched without materialising all occluded copies on the host. `base` (the unoccluded target
        probabilities) is computed when not given.
        """
        pixels = np.asarray(pixels, np.float32)
        target = np.asarray(targets, np.int32)
        n, (h, w) = len(pixels), self.size
        boxes = patch_boxes(self.size, patch, stride)
        ny, nx = boxes.shape[:2]
        flat = boxes.reshape(-1, 4)
        if base is None:
            base = self.probability(pixels, target)
        fn = self._occluded_fn()
        sources = tf.constant(fill_source(pixels, fill))
        images = tf.constant(pixels)
        rows_img = np.repeat(np.arange(n, dtype=np.int32), len(flat))
        rows_box = np.tile(flat, (n, 1))
        probs = (
            np.concatenate(
                [
                    fn(
                        images,
                        sources,
                        tf.constant(rows_img[s]),
                        tf.constant(rows_box[s]),
                        tf.constant(target[rows_img[s]]),
                    ).numpy()
                    for s in _chunks(len(rows_img), self.batch_size)
                ]
            )
            if n
            else np.zeros(0, np.float32)
        )
        drops = (np.asarray(base, np.float32)[:, None] - probs.reshape(n, -1)).reshape(n, ny, nx)
        summed = np.zeros((n, h, w), np.float32)
        count = np.zeros((h, w), np.float32)
        for k, (x0, y0, x1, y1) in enumerate(flat):
            summed[:, y0:y1, x0:x1] += drops.reshape(n, -1)[:, k, None, None]
            count[y0:y1, x0:x1] += 1
        return SlidingResult(
            drops.astype(np.float32), summed / np.maximum(count, 1), boxes, np.asarray(base, np.float32)
        )

    def probability(self, pixels: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Softmax probability of each image's (concrete) target class, through the occlusion program with
        an empty box, so that drops compare numbers computed the same way."""
        pixels = np.asarray(pixels, np.float32)
        n = len(pixels)
        if not n:
            return np.zeros(0, np.float32)
        fn = self._occluded_fn()
        images = tf.constant(pixels)
        target = np.asarray(targets, np.int32)
        return np.concatenate(
            [
                fn(
                    images,
                    images,
                    tf.range(s.start, s.stop, dtype=tf.int32),
                    tf.zeros((s.stop - s.start, 4), tf.int32),
                    tf.constant(target[s]),
                ).numpy()
                for s in _chunks(n, self.batch_size)
            ]
        )


def engine_for(model: LoadedModel, batch_size: int = 16) -> GradientEngine:
    """The model's engine, built once and kept with the model: every section reuses its compiled programs."""
    key = ("gradients", str(batch_size))
    if key not in model.extractors:
        model.extractors[key] = GradientEngine(model, batch_size)
    return model.extractors[key]
