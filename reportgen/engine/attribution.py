"""Input-space attribution methods, batched and compiled once: vanilla gradients, SmoothGrad, integrated
gradients, VarGrad, gradient x input, guided backpropagation and deconvnet, for a class or for a unit.

Every method is built from one program per (gradient rule, target): the gradient of a per-row objective
w.r.t. the row's 0..255 pixels (preprocessing included). The program is a `tf.function` with a fixed
`input_signature` whose batch dimension is open, so new images, new targets, the noisy copies of
SmoothGrad/VarGrad and the path points of integrated gradients all stream through the same trace
(`GradientEngine.traces` counts them, under "attribution:<rule>:<target>"). Rows of different images
share a call: a chunk holds as many rows as the planner's batch allows, whichever image they belong to.

Objectives (`target`):
- a class index (or -1: each image's top prediction): its PRE-softmax logit, as in
  `reportgen.engine.gradients` (a softmax score's gradient vanishes when the model is confident);
- `UnitTarget(layer, filter)`: the spatial mean of that filter's activation at the layer, i.e. the
  "back-propagation map" of a unit (Simonyan et al. 2014; Zeiler & Fergus 2014 draw them per layer);
- `UnitTarget(layer, None)`: HALF THE MEAN SQUARE of the whole layer's activations. Its gradient is
  mean(a * da/dx): every unit's gradient weighted by its own activation, so silent units add nothing and
  units of opposite sign (tanh, linear or pre-activation layers) do not cancel, which a plain sum would
  let them do; it is the DeepDream objective (Mordvintsev et al. 2015) for the same reason.

Gradient rules (`rule`): "plain"; "guided" (guided backpropagation, Springenberg et al. 2015: at every
ReLU, pass the gradient only where BOTH the forward input and the incoming gradient are positive); and
"deconv" (deconvnet, Zeiler & Fergus 2014: pass only the positive part of the incoming gradient,
whatever the forward input). Both run on a CLONE of the user's model (keras.models.clone_model) whose
ReLUs have the overridden gradient (`tf.custom_gradient`); the user's model, its layers and their
activation functions are never touched. Overridden: `Activation("relu")` layers, `ReLU()` layers with
default arguments (no max value, slope or threshold) and any layer whose `activation` is ReLU
(Conv2D/Dense/... `activation="relu"`), in nested models too. Not overridden: leaky ReLU, ReLU6, ELU,
GELU, swish and ReLUs applied inside custom or Lambda layers; they keep their ordinary gradient, and
`overridden_relus` says how many were replaced so callers can report a model where none was.
Max-pooling keeps its switches (the gradient goes to the max location), as both papers describe.

Methods (all return signed, unreduced (N, H, W, C) `raw` values and (N, H, W) `maps` for display):
- vanilla (Simonyan et al. 2014): the gradient; map = max |g| over channels.
- smoothgrad (Smilkov et al. 2017): mean gradient over noisy copies; map = max |.| over channels.
- vargrad (Adebayo et al. 2018): the variance (1/n, population) of the gradient over the SAME noisy
  copies as SmoothGrad (`smoothgrad_noise`); map = max over channels.
- gradient_x_input (Shrikumar et al. 2016): g * x with x the 0..255 pixels; map = |sum over channels|.
- integrated_gradients (Sundararajan et al. 2017): (x - b) * mean over the path of g(b + a (x - b)), the
  midpoint Riemann rule a_k = (k + 1/2) / m; map = |sum over channels|. The attributions add up to
  score(x) - score(b) ("completeness") up to the rule's error, which is returned per image. Midpoint,
  not trapezoid: the trapezoid rule evaluates the gradient AT the image, where pixels of flat synthetic
  images sit exactly on a ReLU's kink (zero gradient there, not the path's limit), which made its error
  decay only as 1/m on such images (80 % at 16 steps on the oracle of tests/analyses/test_saliency.py);
  score(x) comes from the clean pass every method shares, score(b) from one pass over the baselines.
- guided_backprop, deconvnet: the gradient under those rules; map = max |.| over channels.
The two signed methods are reduced by summing channels first: their values are contributions to the
score, so a pixel's contribution is the sum of its channels'.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from reportgen.engine.gradients import GradientEngine, fill_source, saliency_map, smoothgrad_noise
from reportgen.engine.methods import ATTRIBUTION_METHODS, NOISY
from reportgen.errors import ReportgenError

RULES = {"guided_backprop": "guided", "deconvnet": "deconv"}  # other methods use the plain gradient
Baseline = Literal["black", "blur", "noise"]
Rule = Literal["plain", "guided", "deconv"]


@dataclass(frozen=True)
class UnitTarget:
    """A unit instead of a class: one filter of `layer` (its spatial mean) or the whole layer (half its
    mean square, see the module docstring)."""

    layer: str
    filter: int | None = None


@dataclass
class AttributionParams:
    """Method settings: SmoothGrad/VarGrad noise (std as a share of 0..255) and samples, integrated
    gradients' baseline and steps, the seed of every draw, and `model_key`, which seeds the noise baseline
    per (model, image, seed)."""

    samples: int = 16
    noise: float = 0.15
    seed: int = 0
    ig_baseline: Baseline = "black"
    ig_steps: int = 32
    model_key: str = ""


@dataclass
class Attribution:
    maps: np.ndarray  # float32 (N, H, W), reduced for display (see the module docstring)
    raw: np.ndarray  # float32 (N, H, W, C), signed and unreduced
    classes: np.ndarray  # int32 (N,): the explained class (unit targets: the top prediction)
    probability: np.ndarray  # float32 (N,) softmax probability of that class
    score_difference: np.ndarray | None = None  # integrated gradients: score(x) - score(baseline)
    completeness_error: np.ndarray | None = None  # |sum(raw) - score_difference| / max(|diff|, 1e-12)


# -- ReLU gradient overrides ----------------------------------------------------------------------------


@tf.custom_gradient
def guided_relu(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """ReLU whose gradient passes only where the forward input and the incoming gradient are positive."""

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * tf.cast(x > 0, dy.dtype) * tf.cast(dy > 0, dy.dtype)

    return tf.nn.relu(x), grad


@tf.custom_gradient
def deconv_relu(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """ReLU whose backward pass is a ReLU of the incoming gradient (the forward input is ignored)."""

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(dy)

    return tf.nn.relu(x), grad


OVERRIDES = {"guided": guided_relu, "deconv": deconv_relu}


def _is_relu(fn: Any) -> bool:
    import keras

    return fn is keras.activations.relu or getattr(fn, "__name__", "") == "relu"


def overridden_clone(model: Any, rule: Rule) -> tuple[Any, int]:
    """A clone of `model` (same weights) whose ReLUs back-propagate by `rule`, and how many were replaced.

    Layers are rebuilt from their configs (`keras.models.clone_model`), the ReLU ones with the override as
    their activation, and every layer's weights are copied by name; the user's model is only read."""
    import keras

    relu = OVERRIDES[rule]
    count = 0

    def clone(layer: Any) -> Any:
        nonlocal count
        if isinstance(layer, keras.Model):  # a nested model (e.g. a keras.applications base): its own ReLUs
            inner, found = overridden_clone(layer, rule)
            count += found
            return inner
        if isinstance(layer, keras.layers.ReLU):
            cfg = layer.get_config()
            if cfg.get("max_value") is None and not cfg.get("negative_slope") and not cfg.get("threshold"):
                count += 1
                return keras.layers.Activation(relu, name=layer.name)
        new = layer.__class__.from_config(layer.get_config())
        if _is_relu(getattr(layer, "activation", None)):
            new.activation = relu
            count += 1
        return new

    try:
        twin = keras.models.clone_model(model, clone_function=clone)
    except ValueError as exc:  # subclassed models have no graph to rebuild
        raise ReportgenError(
            f"guided backprop / deconvnet need a functional or sequential Keras model to clone ({exc}); "
            "use another saliency method for this model"
        ) from None
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            twin.get_layer(layer.name).set_weights(weights)
    return twin, count


# -- the compiled per-row gradient ---------------------------------------------------------------------


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _unit_score(acts: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Per row: the spatial mean of filter `target` of `acts`, or half the mean square of every
    activation where target < 0."""
    spatial = list(range(1, len(acts.shape) - 1))
    means = tf.reduce_mean(acts, axis=spatial) if spatial else acts  # (N, K)
    one = tf.gather(means, tf.maximum(target, 0), axis=1, batch_dims=1)
    whole = 0.5 * tf.reduce_mean(tf.square(acts), axis=list(range(1, len(acts.shape))))
    return tf.where(target >= 0, one, whole)


class Attributor:
    """The attribution programs of one model, kept with its `GradientEngine` (`attributor_for`)."""

    def __init__(self, engine: GradientEngine):
        self.engine = engine
        self.lm = engine.lm
        self._clones: dict[str, tuple[Any, int]] = {}
        self._programs: dict[tuple[str, str], Callable[..., Any]] = {}

    def overridden_relus(self, rule: Rule) -> int:
        """How many ReLUs the `rule` clone replaced (0 for "plain")."""
        return 0 if rule == "plain" else self._model(rule)[1]

    def sync_weights(self, layers: Sequence[str] | None = None) -> None:
        """Copy the model's current weights (of `layers`, default every layer) into the ReLU-overridden
        clones. The clones copy the weights once, when made; a caller that changes the model's weights in
        place (the sanity check's randomisation cascade) calls this so guided backprop and deconvnet see the
        change and keep their compiled programs."""
        names = [lyr.name for lyr in self.lm.model.layers] if layers is None else list(layers)
        for twin, _ in self._clones.values():
            for name in names:
                weights = self.lm.model.get_layer(name).get_weights()
                if weights:
                    twin.get_layer(name).set_weights(weights)

    def _model(self, rule: Rule) -> tuple[Any, int]:
        if rule == "plain":
            return self.lm.model, 0
        if rule not in self._clones:
            self._clones[rule] = overridden_clone(self.lm.model, rule)
        return self._clones[rule]

    def program(self, rule: Rule, unit: str | None) -> Callable[..., Any]:
        """(pixels (N, H, W, C), target (N,)) -> gradient of each row's objective w.r.t. its pixels, the
        objective, the explained class (top prediction for a unit) and its softmax probability."""
        key = (rule, unit or "")
        if key in self._programs:
            return self._programs[key]
        import keras

        model, _ = self._model(rule)
        twin = dataclasses.replace(self.lm, model=model, extractors={})
        outputs = [twin.logits_output] + ([model.get_layer(unit).output] if unit else [])
        sub = keras.Model(model.inputs, outputs)
        name = f"attribution:{rule}:{'unit:' + unit if unit else 'class'}"
        eng, lm = self.engine, self.lm

        @tf.function(input_signature=[eng.pixel_spec, tf.TensorSpec((None,), tf.int32)])
        def grads(pixels: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, ...]:
            eng._trace(name)
            with tf.GradientTape() as tape:
                tape.watch(pixels)
                out = sub([lm.preprocess(pixels)], training=False)
                logits = out[0] if unit else out
                top = tf.argmax(logits, axis=-1, output_type=tf.int32)
                if unit:
                    cls, score = top, _unit_score(out[1], target)
                else:
                    cls = tf.where(target >= 0, target, top)
                    score = tf.gather(logits, cls, axis=1, batch_dims=1)
                total = tf.reduce_sum(score)
            probs = tf.nn.softmax(logits, axis=-1)
            prob = tf.gather(probs, cls, axis=1, batch_dims=1)
            return tape.gradient(total, pixels), score, cls, prob

        self._programs[key] = grads
        return grads

    def rows(
        self, fn: Callable[..., Any], rows: np.ndarray, target: np.ndarray, batch: int
    ) -> tuple[np.ndarray, ...]:
        """Run `fn` over (R, H, W, C) rows with their (R,) targets in chunks of `batch` rows."""
        parts = [fn(tf.constant(rows[s]), tf.constant(target[s])) for s in _chunks(len(rows), batch)]
        if not parts:
            empty = np.zeros(0, np.float32)
            return np.zeros_like(rows), empty, np.zeros(0, np.int32), empty
        return tuple(np.concatenate([p[i].numpy() for p in parts]) for i in range(4))

    def baselines(
        self, pixels: np.ndarray, kind: Baseline, ids: Sequence[int], params: AttributionParams
    ) -> np.ndarray:
        """Integrated gradients' reference image per input: black (pixel 0), blur (the occlusion fill's
        strong Gaussian blur: no detail, same coarse layout) or uniform 0..255 noise seeded per
        (model, image, seed), so a shard of an image set draws what the whole set would."""
        if kind == "black":
            return np.zeros_like(pixels)
        if kind == "blur":
            return fill_source(pixels, "blur")
        if kind == "noise":
            out = np.empty_like(pixels)
            for k, i in enumerate(ids):
                key = f"{params.model_key}|{int(i)}|{params.seed}|ig-noise".encode()
                rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
                out[k] = rng.uniform(0.0, 255.0, pixels.shape[1:]).astype(np.float32)
            return out
        raise ValueError(f"unknown baseline {kind!r}")

    def attribute(
        self,
        method: str,
        pixels: np.ndarray,
        targets: np.ndarray | int | UnitTarget = -1,
        params: AttributionParams | None = None,
        ids: Sequence[int] | None = None,
    ) -> Attribution:
        """One method for every image (0..255 pixels at the input size); see `attribute_all`."""
        return self.attribute_all([method], pixels, targets, params, ids)[method]

    def attribute_all(
        self,
        methods: Sequence[str],
        pixels: np.ndarray,
        targets: np.ndarray | int | UnitTarget = -1,
        params: AttributionParams | None = None,
        ids: Sequence[int] | None = None,
    ) -> dict[str, Attribution]:
        """Several methods for the same images, sharing their work: one clean gradient pass per rule (the
        plain one also resolves each image's class, which every other method then explains, so noisy
        copies and path points explain the clean image's class), and one pass over the noisy copies for
        both SmoothGrad and VarGrad. `ids` numbers the images for their noise (default: their position),
        so a shard of an image set draws what the whole set would."""
        unknown = [m for m in methods if m not in ATTRIBUTION_METHODS]
        if unknown:
            raise ValueError(f"unknown attribution methods {unknown}; known: {list(ATTRIBUTION_METHODS)}")
        p = params or AttributionParams()
        pixels = np.asarray(pixels, np.float32)
        n = len(pixels)
        ids = list(range(n)) if ids is None else [int(i) for i in ids]
        unit = targets.layer if isinstance(targets, UnitTarget) else None
        if isinstance(targets, UnitTarget):
            target = np.full(n, -1 if targets.filter is None else targets.filter, np.int32)
        else:
            target = np.broadcast_to(np.asarray(targets, np.int32), (n,)).copy()
        batch = self.engine.batch_size
        plain = self.program("plain", unit)
        grads, score, cls, prob = self.rows(plain, pixels, target, batch)
        if not unit:
            target = cls
        out: dict[str, Attribution] = {}
        for m in methods:
            if m == "vanilla":
                out[m] = Attribution(saliency_map(grads), grads, cls, prob)
            elif m == "gradient_x_input":
                raw = grads * pixels
                out[m] = Attribution(np.abs(raw.sum(-1)), raw, cls, prob)
            elif m in RULES:
                g = self.rows(self.program(RULES[m], unit), pixels, target, batch)[0]
                out[m] = Attribution(saliency_map(g), g, cls, prob)
            elif m == "integrated_gradients":
                out[m] = self._integrated(plain, pixels, target, score, cls, prob, p, ids)
        noisy = [m for m in methods if m in NOISY]
        if noisy:
            mean, var = self._noisy(plain, pixels, target, p, ids)
            if "smoothgrad" in noisy:
                out["smoothgrad"] = Attribution(saliency_map(mean), mean, cls, prob)
            if "vargrad" in noisy:
                out["vargrad"] = Attribution(var.max(-1), var, cls, prob)
        return {m: out[m] for m in methods}

    def _noisy(
        self,
        fn: Callable[..., Any],
        pixels: np.ndarray,
        target: np.ndarray,
        p: AttributionParams,
        ids: list[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean (SmoothGrad) and population variance (VarGrad) of the gradient over `samples` noisy copies
        per image, streamed in whole batches of copies whatever image they belong to."""
        n, s = len(pixels), p.samples
        total = np.zeros_like(pixels, dtype=np.float64)
        square = np.zeros_like(total)
        per_chunk = max(1, self.engine.batch_size // s)  # images whose copies fit one batch
        for c in _chunks(n, per_chunk):
            copies = np.concatenate(
                [
                    pixels[i] + smoothgrad_noise(p.seed, ids[i], s, pixels.shape[1:], p.noise * 255.0)
                    for i in range(c.start, c.stop)
                ]
            )
            g = self.rows(fn, copies, np.repeat(target[c], s), self.engine.batch_size)[0]
            g = g.reshape(c.stop - c.start, s, *pixels.shape[1:]).astype(np.float64)
            total[c] = g.sum(1)
            square[c] = np.square(g).sum(1)
        mean = total / s
        var = np.maximum(square / s - np.square(mean), 0.0)
        return mean.astype(np.float32), var.astype(np.float32)

    def _integrated(
        self,
        fn: Callable[..., Any],
        pixels: np.ndarray,
        target: np.ndarray,
        score: np.ndarray,
        cls: np.ndarray,
        prob: np.ndarray,
        p: AttributionParams,
        ids: list[int],
    ) -> Attribution:
        """Integrated gradients by the midpoint rule: the `ig_steps` path points of an image go through the
        program together (several images' paths per chunk where the batch holds them; an image's path is
        split over chunks only when the batch is smaller than the steps)."""
        n, m = len(pixels), p.ig_steps
        base = self.baselines(pixels, p.ig_baseline, ids, p)
        base_score = self.rows(fn, base, target, self.engine.batch_size)[1]
        alphas = ((np.arange(m, dtype=np.float32) + 0.5) / m).reshape(m, 1, 1, 1)
        batch = self.engine.batch_size
        chunk = batch if batch < m else (batch // m) * m
        per_chunk = max(1, chunk // m)
        mean = np.zeros_like(pixels)
        for c in _chunks(n, per_chunk):
            delta = pixels[c] - base[c]
            path = (base[c][:, None] + alphas[None] * delta[:, None]).reshape(-1, *pixels.shape[1:])
            g = self.rows(fn, path, np.repeat(target[c], m), chunk)[0]
            mean[c] = g.reshape(c.stop - c.start, m, *pixels.shape[1:]).mean(1)
        raw = ((pixels - base) * mean).astype(np.float32)
        diff = (score - base_score).astype(np.float32)
        err = np.abs(raw.reshape(n, -1).sum(1, dtype=np.float64) - diff) / np.maximum(np.abs(diff), 1e-12)
        return Attribution(np.abs(raw.sum(-1)), raw, cls, prob, diff, err.astype(np.float32))


def attributor_for(engine: GradientEngine) -> Attributor:
    """The engine's attributor, built once and kept with it, so its compiled programs are reused."""
    key = ("attribution", str(engine.batch_size))
    if key not in engine.lm.extractors:
        engine.lm.extractors[key] = Attributor(engine)
    return engine.lm.extractors[key]


def input_attributions(
    engine: GradientEngine,
    method: str,
    pixels: np.ndarray,
    targets: np.ndarray | int | UnitTarget = -1,
    params: AttributionParams | None = None,
    ids: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """The public entry point for any saliency method by name (`ATTRIBUTION_METHODS`): "maps" (N, H, W)
    reduced for display, "raw" (N, H, W, C) signed, "classes", "probability" and, for integrated
    gradients, "score_difference" and "completeness_error" (N,)."""
    r = attributor_for(engine).attribute(method, pixels, targets, params, ids)
    out = {"maps": r.maps, "raw": r.raw, "classes": r.classes, "probability": r.probability}
    if r.score_difference is not None and r.completeness_error is not None:
        out.update(score_difference=r.score_difference, completeness_error=r.completeness_error)
    return out
