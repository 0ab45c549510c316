"""The `sanity` section's work batched vs the way a one-call-at-a-time metric library runs it.

Task (default): the bundled Fashion-MNIST CNN (`fashion-cnn`, 28x28x1, real weights) over crops of the
bundled photos decoded to the model's input.

- Deletion + insertion curves (Petsiuk et al. 2018), 16 levels: naive = for every image, curve and level,
  the image is built on the host (pixels in map order replaced by the blurred copy) and run through the
  model ALONE, one compiled call per row (the same logits model and softmax; `model.predict` per row would
  cost ~2.2x more here); reportgen = `faithfulness.CurveProgram.curves`: every (image, level, curve) row
  is assembled inside one compiled program and the rows of all images run in batches of `--batch`.
- Randomisation cascade (Adebayo et al. 2018), Grad-CAM + vanilla maps of every step: naive = a fresh
  clone and a fresh gradient engine per step (what a library call per randomised model does: each traces
  its programs again); reportgen = `randomize.cascade`: ONE clone whose variables are re-assigned, so its
  compiled programs trace once. Traces are part of the measured cost on both sides (they are the
  difference), so the cascade rows are single timed runs, not best-of.

Curves are timed after a warm-up (traces excluded), best of `--repeats` interleaved rounds; both sides'
curves are compared.

    python benchmarks/faithfulness.py                      # 8 images, fashion-cnn
    python benchmarks/faithfulness.py --images 2 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attribution import best_of, load_images  # noqa: E402
from benchmarks.common import (  # noqa: E402
    ONEDNN_MODES,
    RAW,
    Row,
    build_model,
    machine,
    print_rows,
    select_kernels,
)


def naive_curves(lm: Any, pixels: Any, maps: Any, classes: Any, steps: int) -> Any:
    """(N, 2, steps + 1) deletion and insertion probabilities, one host-built image per model call."""
    import numpy as np
    import tensorflow as tf

    from reportgen.engine.faithfulness import baseline_images, levels, pixel_ranks
    from reportgen.engine.gradients import engine_for

    model = engine_for(lm, 1).logits_model
    call = tf.function(lambda x: tf.nn.softmax(model([lm.preprocess(x)], training=False), axis=-1))
    bases = baseline_images(pixels, "blur")
    ranks = pixel_ranks(maps, 0, range(len(pixels)))
    out = np.zeros((len(pixels), 2, steps + 1), np.float32)
    for i in range(len(pixels)):
        for j, count in enumerate(levels(ranks[i].size, steps)):
            moved = (ranks[i] < count)[..., None]
            deleted, inserted = np.where(moved, bases[i], pixels[i]), np.where(moved, pixels[i], bases[i])
            for c, x in enumerate((deleted, inserted)):
                out[i, c, j] = call(tf.constant(x[None], tf.float32))[0, classes[i]].numpy()
    return out


def cascade_maps(lm: Any, pixels: Any, layer: str, classes: Any, batch: int, fresh: bool) -> int:
    """Grad-CAM and vanilla maps of every cascade step; `fresh`: a new clone and engine per step (traces
    per step), else the one re-assigned clone. Returns the steps run."""
    from reportgen.engine.gradients import engine_for
    from reportgen.engine.randomize import cascade

    steps = 0
    for step, _, work in cascade(lm, 0):
        if fresh and step:  # a copy of this step's randomised model, with programs of its own
            from reportgen.engine.randomize import clone

            work = clone(work)
        eng = engine_for(work, batch)
        eng.cams(pixels, layer, classes, ("gradcam",))
        eng.vanilla(pixels, classes)
        steps += 1
    return steps


def run(model: str, layer: str, images: int, steps: int, batch: int, repeats: int) -> list[Row]:
    import numpy as np

    from reportgen.engine.faithfulness import curve_program
    from reportgen.engine.gradients import engine_for

    lm = build_model(model)
    h, w = lm.input_size
    pixels = load_images(lm, images)
    eng = engine_for(lm, batch)
    cam = eng.cams(pixels, layer, -1, ("gradcam",))
    maps, classes = cam.heatmaps["gradcam"], cam.classes
    program = curve_program(lm, batch)
    print(f"\n## faithfulness: {model} ({h}x{w}x{lm.channels}), {images} images, {steps} levels, "
          f"batch {batch}")
    program.curves(pixels[:1], maps[:1], classes[:1], steps)  # warm-up: traces
    naive_curves(lm, pixels[:1], maps[:1], classes[:1], steps)
    t = best_of({"naive": lambda: naive_curves(lm, pixels, maps, classes, steps),
                 "batched": lambda: program.curves(pixels, maps, classes, steps)}, repeats)  # fmt: skip
    ref = naive_curves(lm, pixels, maps, classes, steps)
    ours = program.curves(pixels, maps, classes, steps)
    diff = float(max(np.abs(ours.deletion - ref[:, 0]).max(), np.abs(ours.insertion - ref[:, 1]).max()))
    rows_per_image = 2 * (steps + 1)
    print(f"curves naive  : {t['naive']:.2f} s ({images * rows_per_image} one-image calls)")
    print(f"curves batched: {t['batched']:.2f} s ({t['naive'] / t['batched']:.1f}x); "
          f"curves agree to {diff:.1e}")

    # reportgen's side first: any process-wide warm-up (autograph's conversion cache) goes against it
    t0 = time.perf_counter()
    n_steps = cascade_maps(lm, pixels, layer, classes, batch, fresh=False)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    cascade_maps(lm, pixels, layer, classes, batch, fresh=True)
    t_fresh = time.perf_counter() - t0
    print(f"cascade fresh engine per step: {t_fresh:.2f} s; one clone: {t_one:.2f} s "
          f"({t_fresh / t_one:.1f}x) over {n_steps} models")
    return [
        Row(case=f"Deletion + insertion curves ({steps} levels): {model}, {images} images at {h} px, one "
                 "host-built image per call vs rows assembled in one compiled program, batched",
            unit="s/image", naive=t["naive"] / images, reportgen=t["batched"] / images,
            speedup=t["naive"] / t["batched"], notes=[f"curves agree to {diff:.1e}", f"batch {batch}"]),
        Row(case=f"Randomisation cascade (Grad-CAM + vanilla, {n_steps} models incl. the trained one): "
                 f"{model}, {images} images, a fresh clone + engine per step vs one clone re-assigned "
                 "(traces included)",
            unit="s", naive=t_fresh, reportgen=t_one, speedup=t_fresh / t_one, notes=["single run"]),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    parser.add_argument("--model", default="fashion-cnn", help="a builtin classifier")
    parser.add_argument("--layer", default="conv3", help="Grad-CAM's layer (the maps the curves follow)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="deletion/insertion levels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved rounds")
    parser.add_argument("--onednn", choices=ONEDNN_MODES, default="reportgen",
                        help="CPU kernels: as `reportgen run` picks, or forced")
    args = parser.parse_args(argv)
    select_kernels(args.onednn)
    print(machine())
    rows = run(args.model, args.layer, args.images, args.steps, args.batch, args.repeats)
    print_rows(rows)


if __name__ == "__main__":
    main()
