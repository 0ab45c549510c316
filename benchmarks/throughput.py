"""Nightly throughput of dataset passes: the streamed pass against the forward floor, with and without the
decoded-image cache, and peak memory against the folder size.

Forward floor = the same traced forward program on pixels decoded beforehand (one float32 tensor in
memory), in the same process and run: what the pass would cost if images arrived for free. Cases:

- cold: `forward(...)` over the JPEG folder, decoding and resizing as it goes (`tf.data`, parallel map);
- cold, building the cache: the first pass of a dataset with `decoded_cache: true` (decodes and writes
  the uint8 rows);
- warm cache: a later pass of that dataset (reads rows, no decode).

Each figure is the best of `--rounds` end-to-end passes (the program is traced before any is timed; the
order of the kinds rotates between rounds); on a shared machine the best is the least disturbed.
% of floor (wall) = floor wall time / pass wall time;
% of floor (CPU time) = the same with the process's CPU seconds (all threads), which other jobs on the
machine disturb far less than wall time: on saturated cores, what decoding adds to the CPU time is what
it takes from the convolutions.

Peak RSS: a pass over N generated 224 px JPEGs (`limit: N` of one folder of the largest N), each in a
fresh subprocess whose peak resident memory the parent reads with
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` (a fresh intermediate process per measurement, since that
figure is a maximum over all children ever waited for). With a cheap layer (`block1_conv1`) the pass is
dominated by decoding, the part whose memory could grow with the folder.

    python benchmarks/throughput.py                               # 256 images vs floor; RSS at 1k and 10k
    python benchmarks/throughput.py --images 32 --rss 100 300     # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ONEDNN_MODES, RAW, machine, select_kernels, user_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Runs one measured child in a fresh process and prints that child's peak RSS (KiB on Linux).
WRAP = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
)


KINDS = {
    "floor": "forward floor (pre-decoded tensors)",
    "cold": "ranking pass, cold decode",
    "build": "ranking pass, cold decode building the decoded cache",
    "warm": "ranking pass, decoded cache warm",
}
SECTION = "## Dataset passes: forward floor, decoded-image cache, peak memory"
LABELS = {
    "plain": "dataset pass, decoding",
    "build": "dataset pass building the decoded cache",
    "warm": "dataset pass, decoded cache warm",
}


@dataclass
class Measure:
    """One line of the throughput table."""

    case: str
    images: int
    rate: float | None = None  # images/s end to end
    floor_fraction: float | None = None  # floor wall time / this wall time
    cpu_fraction: float | None = None  # floor CPU time / this CPU time (robust on a shared machine)
    rss_mib: float | None = None
    note: str = ""


def markdown(rows: list[Measure]) -> str:
    lines = [
        "| case | images | images/s | % of forward floor (wall) | % of forward floor (CPU time) | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = f"{r.rate:.1f}" if r.rate is not None else "—"
        frac, cpu = (f"{100 * f:.0f} %" if f is not None else "—" for f in (r.floor_fraction, r.cpu_fraction))
        rss = f"{r.rss_mib:.0f} MiB" if r.rss_mib is not None else "—"
        lines.append(f"| {r.case} | {r.images} | {rate} | {frac} | {cpu} | {rss} |")
    return "\n".join(lines)


def cached_items(items: list[Any], folder: Path) -> list[Any]:
    """The items as a dataset with `decoded_cache: true` hands them out (cache under `folder`)."""
    import dataclasses
    import hashlib

    from reportgen.decoded_cache import DecodedSource

    digest = hashlib.sha256("|".join(str(it.path) for it in items).encode()).hexdigest()
    source = DecodedSource(folder, digest, tuple(it.name for it in items))
    return [dataclasses.replace(it, decoded=source) for it in items]


def ranking_vs_floor(
    model: str, layer: str, images: int, size: int, batch: int, rounds: int
) -> list[Measure]:
    """images/s of the floor, a cold pass, the cache-building pass and a warm-cache pass (best of rounds)."""
    import numpy as np
    import tensorflow as tf

    from benchmarks.common import build_model
    from benchmarks.ranking import write_images
    from reportgen.datasets import ImageItem, stream
    from reportgen.engine.forward import forward, program_for

    lm = build_model(model)
    lm.input_size = (size, size)
    channels = lm.layer_channels(layer)
    program = program_for(lm, [layer])
    print(f"\n## {model} {layer} ({channels} channels), {images} images at {size} px, batch {batch}")
    with tempfile.TemporaryDirectory(prefix="reportgen-bench-throughput-") as tmp:
        (Path(tmp) / "jpeg").mkdir()
        paths = write_images(Path(tmp) / "jpeg", images, size)
        items = [ImageItem(p, p.name, None, None) for p in paths]
        pixels = np.concatenate([p.numpy() for p, _ in stream(items, lm.input_size, lm.channels, batch)])
        forward(lm, items[:batch], [layer], batch_size=batch)  # trace once, outside every timing

        def floor() -> None:
            for start in range(0, len(pixels), batch):
                [v.numpy() for v in program._run(tf.constant(pixels[start:start + batch]))]

        def build(folder: Path) -> None:
            forward(lm, cached_items(items, folder), [layer], batch_size=batch)
            if not list(folder.glob("*.u8")):
                raise RuntimeError("the cache-building pass wrote no cache")

        def warm(folder: Path) -> None:
            warm_items = cached_items(items, folder)
            forward(lm, warm_items, [layer], batch_size=batch)
            check = stream(warm_items, lm.input_size, lm.channels, batch)  # what a warm pass reads
            sum(1 for _ in check)
            if check.decoded or check.from_cache != images:
                raise RuntimeError(f"a warm pass decoded {check.decoded} images")

        warm_folder = Path(tmp) / "decoded-warm"
        build(warm_folder)  # untimed: the cache every timed warm pass reads
        wall = dict.fromkeys(KINDS, float("inf"))
        cpu = dict.fromkeys(KINDS, float("inf"))
        for r in range(rounds):
            folder = Path(tmp) / f"decoded-{r}"
            runs = {"floor": floor, "cold": functools.partial(forward, lm, items, [layer], batch_size=batch),
                    "build": functools.partial(build, folder), "warm": functools.partial(warm, warm_folder)}
            order = list(KINDS)[r % len(KINDS):] + list(KINDS)[:r % len(KINDS)]  # no kind always first
            for kind in order:
                w0, c0 = time.perf_counter(), time.process_time()
                runs[kind]()
                wall[kind] = min(wall[kind], time.perf_counter() - w0)
                cpu[kind] = min(cpu[kind], time.process_time() - c0)
            print(f"  round {r + 1}: " + ", ".join(
                f"{k} {images / wall[k]:.1f} img/s ({cpu[k]:.1f} CPU s)" for k in KINDS), flush=True)
    name = f"{model} `{layer}`, all {channels} channels, {size} px"
    return [
        Measure(f"{KINDS[kind]}: {name}", images, images / wall[kind], wall["floor"] / wall[kind],
                cpu_fraction=cpu["floor"] / cpu[kind], note=f"{cpu[kind]:.1f} CPU s")
        for kind in KINDS
    ]


def child(folder: str, limit: int, layer: str, mode: str, cache: str) -> None:
    """One measured dataset pass (run in its own process): `plain`, `build` or `warm`."""
    import resource

    from benchmarks.common import build_model
    from reportgen.datasets import scan_folder
    from reportgen.engine.forward import forward
    from reportgen.spec.schema import DatasetSpec

    lm = build_model("vgg16-hed")
    spec = DatasetSpec(path=folder, limit=limit, decoded_cache=mode != "plain")
    ds = scan_folder("bench", Path(folder), spec, decoded_folder=Path(cache))
    forward(lm, ds.items[:8], [layer])  # trace outside the timing (a part of the dataset never builds)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = forward(lm, ds.items, [layer])
    seconds = time.perf_counter() - t0
    built = list(Path(cache).glob("*.u8"))
    print("CHILD " + json.dumps({"seconds": seconds, "missing": len(result.missing), "before_kib": before,
                                 "cache_files": len(built)}))


def measure_rss(folder: Path, limit: int, layer: str, mode: str, cache: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-c", WRAP, sys.executable, str(Path(__file__).resolve()), "--child", str(folder),
           str(limit), layer, mode, str(cache)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=user_env()).stdout
    info = json.loads(next(line[6:] for line in out.splitlines() if line.startswith("CHILD ")))
    kib = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("RSS_KIB"))
    return kib / 1024, info


def rss_vs_count(counts: list[int], size: int, layer: str) -> list[Measure]:
    """Peak RSS of a plain, a cache-building and a warm-cache pass over the first N of max(counts) JPEGs."""
    from benchmarks.ranking import write_images

    rows: list[Measure] = []
    with tempfile.TemporaryDirectory(prefix="reportgen-bench-rss-") as tmp:
        folder = Path(tmp) / "jpeg"
        folder.mkdir()
        t0 = time.perf_counter()
        write_images(folder, max(counts), size)
        print(f"\n## peak RSS: wrote {max(counts)} JPEGs of {size} px in {time.perf_counter() - t0:.0f} s "
              f"({sum(p.stat().st_size for p in folder.iterdir()) / 1e6:.0f} MB)", flush=True)
        for n in counts:
            cache = Path(tmp) / f"decoded-{n}"
            for mode in ("plain", "build", "warm"):
                mib, info = measure_rss(folder, n, layer, mode, cache)
                if info["missing"] or (mode != "plain" and info["cache_files"] != 1):
                    raise RuntimeError(f"{mode} pass over {n} images: {info}")
                label = LABELS[mode]
                before = f"RSS before the pass (model loaded, traced): {info['before_kib'] / 1024:.0f} MiB"
                rows.append(Measure(f"{label}: vgg16-hed `{layer}`, {size} px", n, n / info["seconds"],
                                    rss_mib=mib, note=before))
                print(f"  {n} images, {mode}: peak RSS {mib:.0f} MiB (after model load "
                      f"{info['before_kib'] / 1024:.0f} MiB), {n / info['seconds']:.1f} images/s", flush=True)
    return rows


def run(
    images: int, size: int, batch: int, rounds: int, rss_counts: list[int], rss_layer: str
) -> list[Measure]:
    rows = ranking_vs_floor("vgg16-hed", "block3_conv1", images, size, batch, rounds)
    if rss_counts:
        rows += rss_vs_count(rss_counts, size, rss_layer)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    parser.add_argument("--images", type=int, default=256, help="images of the ranking pass (default 256)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="timed passes of each kind; the best counts")
    parser.add_argument("--rss", type=int, nargs="*", default=[1000, 10000],
                        help="image counts of the peak-RSS passes (none: skip them)")
    parser.add_argument("--rss-layer", default="block1_conv1")
    parser.add_argument("--onednn", choices=ONEDNN_MODES, default="reportgen")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file whose dataset-pass section to write (e.g. benchmarks/results.md)")
    parser.add_argument("--child", nargs=5, metavar=("FOLDER", "LIMIT", "LAYER", "MODE", "CACHE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    select_kernels(args.onednn)
    if args.child:
        folder, limit, layer, mode, cache = args.child
        child(folder, int(limit), layer, mode, cache)
        return
    t0 = time.perf_counter()
    print(machine())
    rows = run(args.images, args.size, args.batch, args.rounds, args.rss, args.rss_layer)
    print()
    text = section(rows, command="python benchmarks/throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv), seconds=time.perf_counter() - t0)
    print(text)
    if args.out:
        write_section(args.out, text)
        print(f"written to {args.out}")


def section(rows: list[Measure], command: str = "", seconds: float | None = None) -> str:
    """The results-file section of these measurements (run_all.py writes it too, without a command)."""
    notes = [f"- {m.case}, {m.images} images: {m.note}" for m in rows if m.note]
    header = []
    if command:
        from datetime import datetime, timezone

        header = [
            f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            f"- machine: {machine()}",
            f"- command: `{command.strip()}`" + (f" ({seconds / 60:.1f} min)" if seconds else ""),
        ]
    return "\n".join([
        SECTION,
        "",
        *header,
        "- forward floor = the same traced program on pre-decoded tensors in this run; figures are the best "
        "of the rounds; peak RSS of each pass in a fresh subprocess (benchmarks/throughput.py)",
        "",
        markdown(rows),
        "",
        *notes,
        "",
    ])


def write_section(path: Path, text: str) -> None:
    """Put the section into the results file: in place of an earlier one, else at the end."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    head = old.split(SECTION)[0].rstrip()
    path.write_text((head + "\n\n" if head else "") + text, encoding="utf-8")


if __name__ == "__main__":
    main()
