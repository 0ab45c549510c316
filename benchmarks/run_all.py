"""All benchmarks in one run: matmul peak, filters, ranking, rerun, attribution (Score-CAM, integrated
gradients), sanity (deletion/insertion curves, randomisation cascade), dataset-pass throughput, a dataset
pass on a local Dask cluster vs in process, and the exemplar pass; Markdown results tables.

Every ratio compares reportgen with the naive approach measured in this same run, and every FLOP rate
is divided by the matmul peak measured in this same run, so the table holds on the machine it ran on.

    python benchmarks/run_all.py --quick    # a few minutes on 2 cores: small counts, small rerun spec
    python benchmarks/run_all.py --full     # the issue's sizes: 64 filters, 256 images, specs/demo.yaml,
                                            # peak RSS of passes over 1,000 and 10,000 images

The table is printed and written to benchmarks/results.md (`--out` to change).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (  # noqa: E402
    attribution,
    dask_overhead,
    exemplars,
    faithfulness,
    filters,
    ranking,
    rerun,
    throughput,
)
from benchmarks import peak as peak_mod  # noqa: E402
from benchmarks.common import ONEDNN_MODES, RAW, Row, machine, markdown_table, select_kernels  # noqa: E402

MODES = {
    # quick: 4 filters in 2 chunks (so the engine's steady rate is seen), 64 images, the small rerun spec
    "quick": {"filters": 4, "batch": 2, "images": 64, "classic_filters": 2, "classic_images": 8,
              "spec": None, "peak_repeats": 3, "rounds": 1, "rss": [200, 1000], "attribution_images": 8,
              "exemplar_images": 32},
    "full": {"filters": 64, "batch": 16, "images": 256, "classic_filters": 4, "classic_images": 16,
             "spec": rerun.DEMO, "peak_repeats": 5, "rounds": 2, "rss": [1000, 10000],
             "attribution_images": 32, "exemplar_images": 10000},
}


def report(mode: str, command: str, described: str, steady: str, rows: list[Row], seconds: float,
           passes: list[throughput.Measure], exemplar_text: str) -> str:
    notes = [f"- {r.case}: " + "; ".join(r.notes) for r in rows if r.notes]
    return "\n".join([
        f"# reportgen benchmarks ({mode})",
        "",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- {described}; fractions are of the better float32 peak (of the bfloat16 peak for an engine "
        "computing in bfloat16)",
        f"- {steady}",
        f"- command: `{command}` ({seconds / 60:.1f} min)",
        "- naive = the classic approach measured in this run (rerun: the cold run); ratio = how many times "
        "faster reportgen is; see benchmarks/README.md",
        "",
        markdown_table(rows),
        "",
        *notes,
        "",
        throughput.section(passes),
        exemplar_text,
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small settings (default)")
    group.add_argument("--full", action="store_true", help="the issue's sizes (~half an hour on 2 cores)")
    parser.add_argument("--precision", choices=list(filters.PRECISIONS), default="float32",
                        help="the ascent engine's dtype in the filters benchmark")
    parser.add_argument("--onednn", choices=ONEDNN_MODES, default="reportgen",
                        help="CPU kernels: as `reportgen run` picks for the precision (default), or forced")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.md")
    args = parser.parse_args(argv)
    mode = "full" if args.full else "quick"
    cfg = MODES[mode]
    t0 = time.perf_counter()
    select_kernels(args.onednn, args.precision)
    print(machine())
    peaks, described = peak_mod.measure(2048, cfg["peak_repeats"], filters.peak_dtypes(args.precision))
    print(described)
    rows = filters.run(list(filters.CASES), cfg["filters"], 180, 30, cfg["batch"], args.precision, peaks)
    rows.append(ranking.run("vgg16-hed", "block3_conv1", cfg["images"], 224, 8, cfg["classic_filters"],
                            cfg["classic_images"], peaks))
    rows += rerun.run(cfg["spec"])
    rows += attribution.run("fashion-cnn", "conv3", cfg["attribution_images"], 32, 32, peaks)
    rows += faithfulness.run("fashion-cnn", "conv3", cfg["attribution_images"], 16, 32, cfg["rounds"])
    rows.append(dask_overhead.run(cfg["images"], 224, 8, cfg["rounds"]))
    passes = throughput.run(cfg["images"], 224, 8, cfg["rounds"], cfg["rss"], "block1_conv1")
    exemplar_rows = exemplars.measure(cfg["exemplar_images"], 8, 10, cfg["rounds"])
    exemplar_text = exemplars.section(exemplar_rows, cfg["exemplar_images"], 10)
    command = "python benchmarks/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    end_peaks = peak_mod.measure(2048, cfg["peak_repeats"], filters.peak_dtypes(args.precision))[0]
    text = report(mode, command.strip(), described, peak_mod.stability(peaks, end_peaks), rows,
                  time.perf_counter() - t0, passes, exemplar_text)
    print()
    print(text)
    args.out.write_text(text, encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
