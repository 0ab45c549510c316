"""The exemplar pass against the plain forward pass: top-k images with peak positions for every channel
of two layers must ride on the forward pass, not cost a second one (issue target: >= 90 % of the
forward pass's throughput).

VGG16-HED `block4_conv3` and `block5_conv1` (512 channels each), N seeded crops of the bundled photos
written as 224 px JPEGs. Cases, each the best of `--rounds` (the order rotates between rounds):

- forward floor: the traced forward program of both layers on pixels decoded beforehand (a pool of at
  most POOL images, cycled: 10,000 decoded images would take 6 GB, and the pixels do not change the
  cost), reduced to channel means (the cheapest reduction that keeps the layers' outputs alive);
- exemplar pass, pre-decoded: the dataset pass's program with the "topk" statistic of both layers (each
  image's peak value and (y, x) per channel) on the same pixels, plus the exact top-k selection over all
  images that the executor runs at the end of a shard (`reportgen.engine.topk.select`, k = `--k`);
- exemplar pass, end to end: the same, streaming and decoding the JPEGs (`reportgen.engine.forward`),
  as `reportgen run` does; and with the "means" piece of a class ranking and the "bottomk" piece of
  `bottom:` on the same pass.

% of floor = floor wall time / case wall time (and the same with process CPU time, which other jobs on
a shared machine disturb less).

    python benchmarks/exemplars.py                         # the issue's case: 10,000 images
    python benchmarks/exemplars.py --images 64 --rounds 2  # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ONEDNN_MODES, RAW, machine, select_kernels  # noqa: E402

LAYERS = ("block4_conv3", "block5_conv1")
SECTION = "## Exemplar pass vs the forward pass"
POOL = 256  # pre-decoded images held in memory for the floor


def measure(images: int, batch: int, k: int, rounds: int) -> list[dict[str, Any]]:
    """Rows {case, images/s, % of floor (wall, CPU)} of the four cases, best of `rounds`."""
    import numpy as np
    import tensorflow as tf

    from benchmarks.common import build_model
    from benchmarks.ranking import write_images
    from reportgen.datasets import ImageItem, stream
    from reportgen.engine import topk
    from reportgen.engine.forward import forward, program_for

    lm = build_model("vgg16-hed")
    layers = list(LAYERS)
    peaks = [("topk", layer) for layer in layers]
    floor_program = program_for(lm, layers)
    peak_program = program_for(lm, [], peaks=peaks)
    with tempfile.TemporaryDirectory(prefix="reportgen-bench-exemplars-") as tmp:
        paths = write_images(Path(tmp), images, lm.input_size[0])
        items = [ImageItem(p, p.name, None, None) for p in paths]
        pool = np.concatenate([p.numpy() for p, _ in stream(items[:POOL], lm.input_size, lm.channels, batch)])
        starts = [(s % len(pool)) // batch * batch for s in range(0, images, batch)]
        pixels = [tf.constant(pool[s : s + batch]) for s in sorted(set(starts))]
        batches = [pixels[sorted(set(starts)).index(s)] for s in starts]
        for program in (floor_program, peak_program):  # trace once, outside every timing
            program._run(batches[0])

        def select(found: dict[tuple[str, str], tuple[np.ndarray, ...]]) -> None:
            for (stat, _), (value, y, x) in found.items():
                topk.select(value, np.arange(len(value)), y, x, k, largest=stat == "topk")

        def floor() -> None:
            for x in batches:
                [v.numpy() for v in floor_program._run(x)]

        def predecoded() -> None:
            rows: list[list[np.ndarray]] = []
            for x in batches:
                rows.append([v.numpy() for v in peak_program._run(x)])
            joined = [np.concatenate(parts) for parts in zip(*rows, strict=True)]
            select({p: tuple(joined[3 * i : 3 * i + 3]) for i, p in enumerate(peaks)})

        def streamed() -> None:
            select(forward(lm, items, [], batch_size=batch, peaks=peaks).peaks)

        def shared() -> None:
            select(forward(lm, items, layers, batch_size=batch, peaks=both).peaks)

        both = [*peaks, *(("bottomk", layer) for layer in layers)]
        forward(lm, items[:batch], [], batch_size=batch, peaks=peaks)  # trace outside the timing
        forward(lm, items[:batch], layers, batch_size=batch, peaks=both)
        cases = {
            "forward floor (pre-decoded, channel means)": floor,
            "exemplar pass, pre-decoded (top-k with positions)": predecoded,
            "exemplar pass, end to end (decoding JPEGs)": streamed,
            "one pass: top-k + bottom-k + class-ranking means, end to end": shared,
        }
        wall = dict.fromkeys(cases, float("inf"))
        cpu = dict.fromkeys(cases, float("inf"))
        names = list(cases)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                cases[name]()
                wall[name] = min(wall[name], time.perf_counter() - w0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
            rates = ", ".join(f"{images / wall[n]:.2f} img/s" for n in names)
            print(f"  round {r + 1}: {rates}", flush=True)
    first = names[0]
    return [
        {"case": n, "images/s": images / wall[n], "wall": wall[first] / wall[n], "cpu": cpu[first] / cpu[n]}
        for n in names
    ]


def markdown(rows: list[dict[str, Any]], images: int, k: int) -> str:
    lines = [
        f"| case: VGG16-HED `{'` + `'.join(LAYERS)}`, all 1024 channels, {images} images at 224 px, k = {k} "
        "| images/s | % of floor (wall) | % of floor (CPU time) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        wall, cpu = f"{100 * r['wall']:.0f} %", f"{100 * r['cpu']:.0f} %"
        lines.append(f"| {r['case']} | {r['images/s']:.2f} | {wall} | {cpu} |")
    return "\n".join(lines)


def section(rows: list[dict[str, Any]], images: int, k: int, command: str = "", minutes: float = 0.0) -> str:
    """The results-file section (run_all.py writes it too, without a command)."""
    head = [f"- machine: {machine()}"]
    head += [f"- command: `{command.strip()}` ({minutes:.1f} min)"] if command else []
    return "\n".join([SECTION, "", *head, "", markdown(rows, images, k), ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=10, help="exemplars kept per channel")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes of each case; the best counts")
    parser.add_argument("--onednn", choices=ONEDNN_MODES, default="reportgen")
    args = parser.parse_args(argv)
    select_kernels(args.onednn)
    t0 = time.perf_counter()
    print(machine())
    rows = measure(args.images, args.batch, args.k, args.rounds)
    command = "python benchmarks/exemplars.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print()
    minutes = (time.perf_counter() - t0) / 60
    print(section(rows, args.images, args.k, command, minutes))


if __name__ == "__main__":
    main()
