"""Each ascent recipe on VGG16-HED `block4_conv3` and `block5_conv1` at 128 px: seconds per filter and the
quality figures (reportgen.engine.quality) side by side.

All recipes run through `reportgen.engine.ascent.program_for` exactly as a report does: one compiled
program per (recipe, layer), the filters of a layer in batches. Per layer and recipe the table gives
seconds per filter (wall time of the whole layer / filters, compile included: a report pays it too), and
the medians over the live filters (dead ones left out) of `hf_energy` (share of luma spectral power above
0.25 cycles/pixel; lower = less high-frequency texture) and `robustness` (activation after unseen random
shifts, zooms and rotations / activation; higher = the image shows the feature, not a pixel-exact
pattern) and `exemplar_ratio` (the filter's activation over the largest channel mean of that filter
over natural images: `--images` crops of the bundled sample photos at the model's 224 px, as a report
with an `exemplars` section computes it; > 1: the picture drives the unit harder than any photo). The
issue's targets: fourier and maco on block4_conv3 with `hf_energy` at most half of keras-example's and
`robustness` at least 1.5x keras-example's.

    python benchmarks/recipes.py                               # the issue's case: 16 filters, all recipes
    python benchmarks/recipes.py --filters 2 --steps 32        # a quick look (fewer filters and steps)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402

LAYERS = ("block4_conv3", "block5_conv1")
RECIPES = ("keras-example", "regularized", "fourier", "maco")
SIZE = 128


def vgg16_hed() -> Any:
    from reportgen.models import load_model
    from reportgen.spec.fields import ModelSpec

    return load_model("hed", ModelSpec(builtin="vgg16-hed"))


def best_natural(lm: Any, layers: list[str], images: int) -> dict[str, Any]:
    """Per layer, (C,) the largest channel mean over `images` seeded crops of the bundled photos: the
    denominator of exemplar_ratio (one streamed pass for all layers, as the report's dataset pass)."""
    import tempfile

    import numpy as np

    from benchmarks.ranking import write_images
    from reportgen.datasets import ImageItem
    from reportgen.engine.forward import forward

    with tempfile.TemporaryDirectory(prefix="reportgen-bench-recipes-") as tmp:
        paths = write_images(Path(tmp), images, lm.input_size[0])
        result = forward(lm, [ImageItem(p, p.name, None, None) for p in paths], layers)
    return {layer: np.nanmax(result.means[layer], axis=0) for layer in layers}


def measure(
    lm: Any, layer: str, recipe_name: str, filters: int, steps: int | None, batch: int, best: Any
) -> dict[str, Any]:
    from reportgen.engine.ascent import AscentJob, program_for
    from reportgen.engine.recipes import resolve_recipe

    overrides: dict[str, Any] = {"size": SIZE}
    if steps:
        overrides["steps"] = steps
    recipe = resolve_recipe(recipe_name, overrides)
    t0 = time.perf_counter()
    program = program_for(lm, [layer], recipe)
    results = program.run([AscentJob(layer, f, 0) for f in range(filters)], batch_size=batch)
    seconds = time.perf_counter() - t0
    from reportgen.analyses.shared import exemplar_ratio

    live = [r for r in results if not r.dead]
    robust = [r.robustness for r in live if r.robustness is not None]
    ratios = [q for r in live if (q := exemplar_ratio(r.activation, float(best[r.job.filter]))) is not None]
    return {
        "layer": layer,
        "recipe": recipe_name,
        "steps": recipe.steps,
        "s_per_filter": seconds / filters,
        "live": len(live),
        "hf_energy": median(r.hf_energy for r in live) if live else float("nan"),
        "robustness": median(robust) if robust else float("nan"),
        "exemplar_ratio": median(ratios) if ratios else float("nan"),
    }


def table(rows: list[dict[str, Any]], filters: int) -> str:
    lines = [
        f"| layer | recipe | steps | s/filter | live of {filters} | hf_energy | robustness "
        "| exemplar_ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['recipe']} | {r['steps']} | {r['s_per_filter']:.2f} | {r['live']} | "
            f"{r['hf_energy']:.3f} | {r['robustness']:.2f} | {r['exemplar_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--steps", type=int, default=0, help="override every recipe's steps (0: its own)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", nargs="+", default=list(LAYERS))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--images", type=int, default=64, help="natural images for exemplar_ratio")
    args = ap.parse_args(argv)
    lm = vgg16_hed()
    best = best_natural(lm, args.layers, args.images)
    rows = []
    for layer in args.layers:
        for name in args.recipes:
            rows.append(measure(lm, layer, name, args.filters, args.steps or None, args.batch, best[layer]))
            print(table(rows[-1:], args.filters).splitlines()[-1], flush=True)
    print(f"\n{machine()}\n")
    print(table(rows, args.filters))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
