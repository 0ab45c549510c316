"""Filter visualisation: the classic per-filter loop vs reportgen's batched ascent engine, same run.

Naive = the Keras example "Visualizing what convnets learn" as written: `feature_extractor =
keras.Model(model.inputs, layer.output)`, a `@tf.function gradient_ascent_step(img, filter_index,
learning_rate)` with `tf.GradientTape`, loss = mean of `activation[:, 2:-2, 2:-2, filter_index]`,
`tf.math.l2_normalize` of the gradient, `img += lr * grads`; 30 calls per filter, one filter at a time.
`filter_index` is a Python int, so the step function retraces for every filter (counted below). The
only additions are the model's own preprocessing of the canonical image (the engine applies the same) and,
as in the engine, no border cut on maps too small for one (smoke tests at tiny sizes).

reportgen = `reportgen.engine.ascent.program_for(...)` with the `keras-example` recipe: one compiled
program runs all steps for a batch of filters per call.

Both start from the same seeded images (the engine's `initial_state`), so their final activations must
agree; the maximum relative difference is printed as a correctness check of the comparison.

FLOPs per filter = steps x 2 x (forward FLOPs to the layer at this size): an ascent step is a forward
pass plus the input-gradient pass; no weight gradients are needed.

    python benchmarks/filters.py                       # 8 filters, both cases, 180 px
    python benchmarks/filters.py --filters 64          # the issue's case
    python benchmarks/filters.py --filters 2 --size 64 --case resnet50v2   # a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peak as peak_mod  # noqa: E402
from benchmarks.common import (  # noqa: E402
    ASCENT_STEP_FACTOR,
    ONEDNN_MODES,
    RAW,
    Row,
    build_keras_app,
    forward_flops,
    machine,
    markdown_table,
    select_kernels,
)

PRECISIONS = ("float32", "bfloat16", "float16")  # AscentProgram's dtypes

# The cases: (keras.applications model, layer).
CASES: dict[str, tuple[str, str]] = {
    "resnet50v2": ("ResNet50V2", "conv3_block4_out"),
    "vgg16": ("VGG16", "block4_conv3"),
}


@dataclasses.dataclass
class Measurement:
    seconds: float  # end to end, program construction and tracing included
    per_filter: list[float]  # naive: seconds of each filter; engine: seconds of each chunk / its size
    activations: Any  # final mean activation of each filter (border excluded)
    traces: int
    retrace: float = 0.0  # naive: mean seconds a filter's first (tracing) step takes beyond a later step


def naive_loop(lm: Any, layer: str, filters: list[int], recipe: Any, starts: Any) -> Measurement:
    """The Keras example's loop, verbatim apart from the model's preprocessing of the image."""
    import keras
    import numpy as np
    import tensorflow as tf

    t_start = time.perf_counter()
    feature_extractor = keras.Model(inputs=lm.model.inputs, outputs=lm.layer(layer).output)
    b = recipe.border
    traces = 0

    def compute_loss(input_image: tf.Tensor, filter_index: int) -> tf.Tensor:
        activation = feature_extractor(lm.preprocess((input_image + 1.0) * 127.5))
        # We avoid border artifacts by only involving non-border pixels in the loss.
        if activation.shape[1] > 2 * b and activation.shape[2] > 2 * b:  # as the engine: tiny maps keep all
            activation = activation[:, b:-b, b:-b, :]
        filter_activation = activation[:, :, :, filter_index]
        return tf.reduce_mean(filter_activation)

    @tf.function
    def gradient_ascent_step(img: tf.Tensor, filter_index: int, learning_rate: float) -> tuple:
        nonlocal traces
        traces += 1  # runs only while tracing: once per distinct Python filter_index
        with tf.GradientTape() as tape:
            tape.watch(img)
            loss = compute_loss(img, filter_index)
        # Compute gradients.
        grads = tape.gradient(loss, img)
        # Normalize gradients.
        grads = tf.math.l2_normalize(grads)
        img += learning_rate * grads
        return loss, img

    def deprocess_image(img: np.ndarray) -> np.ndarray:
        img -= img.mean()
        img /= img.std() + 1e-5
        img *= recipe.display_std
        c = recipe.crop
        if c and img.shape[0] > 2 * c + 8:
            img = img[c:-c, c:-c, :]
        img += 0.5
        img = np.clip(img, 0, 1)
        img *= 255
        return np.clip(img, 0, 255).astype("uint8")

    per_filter, finals, extra = [], [], []
    for i, filter_index in enumerate(filters):
        t0 = time.perf_counter()
        img = tf.constant(starts[i : i + 1])
        marks = [t0]
        for _ in range(recipe.steps):
            loss, img = gradient_ascent_step(img, filter_index, recipe.lr)
            marks.append(time.perf_counter())  # steps run eagerly one call at a time: wall time per step
        deprocess_image(img[0].numpy())
        per_filter.append(time.perf_counter() - t0)
        finals.append(img)
        step_times = np.diff(marks)
        if len(step_times) > 1:
            extra.append(float(step_times[0] - np.median(step_times[1:])))
    seconds = time.perf_counter() - t_start
    # untimed: the final activation of each filter, for the agreement check
    acts = np.array([float(compute_loss(img, f)) for img, f in zip(finals, filters, strict=True)])
    return Measurement(seconds, per_filter, acts, traces, float(np.mean(extra)) if extra else 0.0)


def engine_run(lm: Any, layer: str, filters: list[int], recipe: Any, batch: int,
               precision: str) -> tuple[Measurement, Any]:
    """reportgen's batched program over all filters; chunk times show the traced first call apart."""
    import numpy as np

    from reportgen.engine.ascent import AscentJob, AscentProgram

    jobs = [AscentJob(layer, f, 0) for f in filters]
    t_start = time.perf_counter()
    program = AscentProgram(lm, [layer], recipe, precision)
    marks = [time.perf_counter()]
    sizes: list[int] = []

    def on_chunk(n: int) -> None:
        marks.append(time.perf_counter())
        sizes.append(n)

    results = program.run(jobs, batch, on_chunk=on_chunk)
    seconds = time.perf_counter() - t_start
    per_chunk = [(marks[i + 1] - marks[i]) / n for i, n in enumerate(sizes)]
    if len(sizes) == 1:  # one chunk holds the trace: time one more (traced already) for the steady rate
        t0 = time.perf_counter()
        program.run(jobs[:batch], batch)
        per_chunk.append((time.perf_counter() - t0) / min(batch, len(jobs)))
    acts = np.array([r.activation for r in results])
    return Measurement(seconds, per_chunk, acts, program.trace_count), program


def compute_dtypes(program: Any) -> set[str]:
    """The dtypes the engine's conv layers compute in (what its `precision` really does)."""
    import keras

    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    return {str(ly.compute_dtype) for ly in program.extractor.layers if isinstance(ly, kinds)}


def run_case(case: str, filters: int, size: int, steps: int, batch: int, precision: str,
             peaks: dict[str, float]) -> Row:
    """Both approaches on one (model, layer); prints the details, returns the table row."""
    import numpy as np

    from reportgen.engine.ascent import AscentJob, initial_state
    from reportgen.engine.recipes import RECIPES

    app, layer = CASES[case]
    lm = build_keras_app(app)
    recipe = dataclasses.replace(RECIPES["keras-example"].recipe, size=size, steps=steps)
    chosen = list(range(filters))
    starts, _ = initial_state(lm, [AscentJob(layer, f, 0) for f in chosen], recipe)
    fwd = forward_flops(lm.model, lm.layer(layer).output, (size, size), lm.channels)
    flops = steps * ASCENT_STEP_FACTOR * fwd

    title = f"{app} {layer}, {size} px, {filters} filters, {steps} steps"
    if precision != "float32":
        title += f", engine {precision}"
    print(f"\n## {title}")
    print(f"forward to {layer}: {fwd / 1e9:.2f} GFLOP/image; per filter {flops / 1e9:.1f} GFLOP "
          f"(steps x {ASCENT_STEP_FACTOR:g} x forward)")

    naive = naive_loop(lm, layer, chosen, recipe, starts)
    engine, program = engine_run(lm, layer, chosen, recipe, min(batch, filters), precision)

    effective = compute_dtypes(program)
    only = next(iter(effective)) if len(effective) == 1 else "float32"
    peak_dtype = only if only in peaks else "float32"
    peak = peaks[peak_dtype]
    n_peak = peaks["float32"]  # the naive loop is the Keras example: float32
    if precision != "float32":
        print(f"engine precision {precision!r}: its conv layers compute in {', '.join(sorted(effective))}; "
              f"its fraction is of the {peak_dtype} peak, the naive loop's of the float32 peak")
    print(f"compute floor at the measured {peak_dtype} peak ({peak:.0f} GFLOP/s): "
          f"{flops / peak / 1e9:.3f} s/filter")

    n_s, e_s = naive.seconds / filters, engine.seconds / filters
    n_steady = float(np.median(naive.per_filter[1:])) if filters > 1 else naive.per_filter[0]
    e_steady = float(np.median(engine.per_filter[1:])) if len(engine.per_filter) > 1 else engine.per_filter[0]
    diff = np.abs(naive.activations - engine.activations)
    scale = np.maximum(np.maximum(np.abs(naive.activations), np.abs(engine.activations)), 1e-6)
    print(f"naive     : {n_s:.3f} s/filter end to end = {flops / n_s / 1e9:.0f} GFLOP/s "
          f"({naive.traces} traces for {filters} filters, ~{naive.retrace:.2f} s each; "
          f"first filter {naive.per_filter[0]:.2f} s, median of the others {n_steady:.3f} s)")
    print(f"reportgen : {e_s:.3f} s/filter end to end = {flops / e_s / 1e9:.0f} GFLOP/s (batch "
          f"{min(batch, filters)}, {engine.traces} trace; first chunk {engine.per_filter[0]:.3f} s/filter, "
          f"later chunks {e_steady:.3f} s/filter)")
    print(f"ratio     : {n_s / e_s:.2f}x end to end; "
          f"{n_steady / e_steady:.2f}x steady state (first filter / first chunk excluded)")
    print(f"fraction of the measured peak: naive {flops / n_s / 1e9 / n_peak:.1%}, reportgen "
          f"{flops / e_s / 1e9 / peak:.1%} end to end; steady: naive {flops / n_steady / 1e9 / n_peak:.1%}, "
          f"reportgen {flops / e_steady / 1e9 / peak:.1%}")
    dead = int((naive.activations <= recipe.dead_threshold).sum())
    print(f"agreement : final activations differ by at most {float((diff / scale).max()):.2e} (relative); "
          f"mean final activation {float(np.mean(naive.activations)):.3g}, {dead}/{filters} filters dead "
          f"(a dead filter gets no gradient, so it agrees trivially)")
    return Row(
        case=f"filters: {title}", unit="s/filter", naive=n_s, reportgen=e_s, speedup=n_s / e_s,
        naive_fraction=flops / n_s / 1e9 / n_peak, reportgen_fraction=flops / e_s / 1e9 / peak,
        notes=[f"compute floor {flops / peak / 1e9:.3f} s/filter",
               f"naive retraces per filter (~{naive.retrace:.2f} s each)",
               f"steady-state ratio {n_steady / e_steady:.2f}x"],
    )


def peak_dtypes(precision: str) -> tuple[str, ...]:
    """The peaks a run needs: float32 (the naive loop), bfloat16, and the engine's precision."""
    return tuple(dict.fromkeys(("float32", "bfloat16", precision)))


def run(cases: list[str], filters: int, size: int, steps: int, batch: int, precision: str,
        peaks: dict[str, float]) -> list[Row]:
    return [run_case(c, filters, size, steps, batch, precision, peaks) for c in cases]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run")
    parser.add_argument("--filters", type=int, default=8, help="filters per case (the issue's case: 64)")
    parser.add_argument("--size", type=int, default=180, help="input side in pixels (default 180)")
    parser.add_argument("--steps", type=int, default=30, help="ascent steps per filter (default 30)")
    parser.add_argument("--batch", type=int, default=16, help="the engine's batch size (default 16)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="float32",
                        help="the engine's dtype (AscentProgram dtype); the naive loop stays float32")
    parser.add_argument("--onednn", choices=ONEDNN_MODES, default="reportgen",
                        help="CPU kernels: as `reportgen run` picks for the precision (default), or forced")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix side of the peak measurement")
    args = parser.parse_args(argv)
    select_kernels(args.onednn, args.precision)
    print(machine())
    peaks, described = peak_mod.measure(args.peak_size, dtypes=peak_dtypes(args.precision))
    print(described)
    rows = run(args.case, args.filters, args.size, args.steps, args.batch, args.precision, peaks)
    print()
    print(markdown_table(rows))
    print(peak_mod.stability(peaks, peak_mod.measure(args.peak_size, dtypes=peak_dtypes(args.precision))[0]))


if __name__ == "__main__":
    main()
