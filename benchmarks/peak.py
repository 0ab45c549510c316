"""Measured matmul peak of this machine, the yardstick for every "fraction of peak" in the benchmarks.

Square `tf.linalg.matmul`s (2048 x 2048 by default) inside a `tf.function`, several independent products
per call (distinct inputs, so grappler cannot merge them) so that the call overhead vanishes, best of N
calls: about the highest FLOP rate TensorFlow reaches here. Convolutions are GEMM-like, so a conv engine
at 100 % of this is at the limit.

TensorFlow's CPU kernels are chosen when it is imported (`TF_ENABLE_ONEDNN_OPTS`), and reportgen turns
oneDNN off by default (see reportgen/__init__.py), so the peak is measured in two fresh processes, with
oneDNN on and off; the machine's peak for a dtype is the better of the two.

    python benchmarks/peak.py                  # float32 and bfloat16, oneDNN on and off
    python benchmarks/peak.py --size 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RAW, machine  # noqa: E402

PRODUCTS_PER_CALL = 4
KERNELS = {"oneDNN on": "1", "oneDNN off": "0"}  # label -> TF_ENABLE_ONEDNN_OPTS


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float | None:
    """Best GFLOP/s of `size` x `size` matmuls in `dtype` in this process (with the kernels its
    TensorFlow was imported with); None when this build cannot run the dtype."""
    import tensorflow as tf

    tdtype = tf.as_dtype(dtype)
    gen = tf.random.Generator.from_seed(0)
    mats = [tf.cast(gen.uniform((size, size), -1.0, 1.0), tdtype) for _ in range(2 * PRODUCTS_PER_CALL)]

    @tf.function(input_signature=[tf.TensorSpec((size, size), tdtype)] * (2 * PRODUCTS_PER_CALL))
    def products(*xs: tf.Tensor) -> tf.Tensor:
        # distinct operands: identical products would be merged by grappler's common-subexpression pass
        acc = tf.zeros((), tf.float32)
        for i in range(PRODUCTS_PER_CALL):
            acc += tf.cast(tf.linalg.matmul(xs[2 * i], xs[2 * i + 1])[0, 0], tf.float32)
        return acc

    try:
        products(*mats).numpy()  # trace + warm-up
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnimplementedError):
        return None
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        products(*mats).numpy()
        best = min(best, time.perf_counter() - t0)
    return PRODUCTS_PER_CALL * 2.0 * size**3 / best / 1e9


def _in_fresh_process(onednn: str, size: int, repeats: int, dtypes: tuple[str, ...]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "REPORTGEN_ONEDNN_SET"}
    env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--size", str(size),
           "--repeats", str(repeats), "--dtype", *dtypes]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak measurement failed (TF_ENABLE_ONEDNN_OPTS={onednn}):\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(size: int = 2048, repeats: int = 5,
                dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, dict[str, float]]:
    """{kernel label: {dtype: GFLOP/s}}, each measured in a fresh process (dtypes that run only)."""
    return {label: _in_fresh_process(flag, size, repeats, dtypes) for label, flag in KERNELS.items()}


def best(detail: dict[str, dict[str, float]]) -> dict[str, float]:
    """The machine's peak per dtype: the better kernel configuration."""
    out: dict[str, float] = {}
    for values in detail.values():
        for dtype, value in values.items():
            out[dtype] = max(out.get(dtype, 0.0), value)
    return out


def measure(size: int = 2048, repeats: int = 5,
            dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> tuple[dict[str, float], str]:
    """(peak GFLOP/s per dtype, a one-line description of every measurement) for the benchmarks."""
    detail = measure_all(size, repeats, dtypes)
    return best(detail), describe(detail, size)


def describe(detail: dict[str, dict[str, float]], size: int) -> str:
    peaks = best(detail)
    parts = [f"{d} {v:.0f} GFLOP/s" for d, v in peaks.items()]
    per = "; ".join(f"{label}: " + ", ".join(f"{d} {v:.0f}" for d, v in values.items())
                    for label, values in detail.items())
    return f"measured matmul peak ({size}x{size}, best of N): " + ", ".join(parts) + f" ({per})"


def stability(start: dict[str, float], end: dict[str, float]) -> str:
    """A line comparing the peak measured at a run's start and end: if it moved, so did everything else."""
    change = max(abs(end[d] - start[d]) / start[d] for d in start if d in end)
    verdict = "steady" if change <= 0.15 else "NOT steady (other load?): treat this run's numbers as noise"
    values = ", ".join(f"{d} {end[d]:.0f}" for d in end)
    return f"peak re-measured at the end: {values} GFLOP/s; {change:.0%} change from the start, {verdict}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    parser.add_argument("--size", type=int, default=2048, help="matrix side (default 2048)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the best counts (default 5)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="dtypes to measure")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # in a fresh process whose kernels the parent chose
        values = {d: matmul_peak(d, args.size, args.repeats) for d in args.dtype}
        print(json.dumps({d: v for d, v in values.items() if v is not None}))
        return
    print(machine("kernels: oneDNN on and off, each in a fresh process"))
    detail = measure_all(args.size, args.repeats, tuple(args.dtype))
    print(describe(detail, args.size))
    for dtype in args.dtype:
        if dtype not in best(detail):
            print(f"{dtype}: not supported by this TensorFlow build / CPU")


if __name__ == "__main__":
    main()
