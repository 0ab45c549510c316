"""What distributing a dataset pass costs: a local Dask cluster (2 workers x 1 thread, loopback) against the
same pass in process, on the same cores, in the same run.

The pass is a class ranking's: VGG16-HED `block3_conv1` (all 256 channels) over a folder of generated
224 px JPEGs (`benchmarks.ranking.write_images`), planned and executed exactly as `reportgen run` does it
(`plan.plan_work` then `execute.execute_dataset`: in process one shard; on the cluster one file range per
worker, computed there, stored in the shared store and merged on the host). Both timings include planning
(the Dask one asks the scheduler for its workers) and the merge; neither includes loading the spec and
the model on the host or rendering. The workers are started, have loaded the model and traced the pass
in a first, untimed run, as the host has: a long-lived cluster serving nightly runs, not its start-up.
Between rounds the store is emptied, so every timed round computes the whole pass; each figure is the
best of `--rounds` rounds in alternating order (on a shared machine, the least disturbed).

overhead = Dask seconds / in-process seconds - 1 (the issue's target: at most 15 %), in wall time and in
CPU time (user + system of this process and, on the cluster, of both worker processes, read with
`getrusage`; other jobs on a shared machine disturb it far less than wall time).

    python benchmarks/dask_overhead.py                  # 64 images, 2 rounds
    python benchmarks/dask_overhead.py --images 256 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ONEDNN_MODES, RAW, Row, machine, select_kernels  # noqa: E402

LAYER = "block3_conv1"


@dataclass
class Timing:
    inprocess: float  # best wall seconds
    dask: float
    inprocess_cpu: float  # least CPU seconds of a round: this process (all threads)
    dask_cpu: float  # ... of this process plus both worker processes
    shards: int  # file ranges the cluster ran

    @property
    def overhead(self) -> float:
        return self.dask / self.inprocess - 1.0

    @property
    def cpu_overhead(self) -> float:
        return self.dask_cpu / self.inprocess_cpu - 1.0


def _cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) of the calling process; runs on the workers too."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_project(root: Path, images: int, size: int) -> Path:
    """The JPEG folder and a spec with one class_ranking section over it; returns the spec's path."""
    import yaml

    from benchmarks.ranking import write_images

    (root / "photos").mkdir()
    write_images(root / "photos", images, size)
    spec = root / "bench.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "dask overhead", "output": "out", "cache": "cache", "formats": ["html"],
        "models": {"vgg": {"builtin": "vgg16-hed", "input_size": [size, size]}},
        "datasets": {"photos": {"path": "photos"}},
        "sections": [{"type": "class_ranking", "model": "vgg", "layer": LAYER, "filters": "all",
                      "dataset": "photos", "top": 2}],
    }))
    return spec


def measure(images: int, size: int, batch: int, rounds: int) -> Timing:
    """Best in-process and best Dask seconds of the whole dataset pass (plan + execute + merge)."""
    from distributed import Client, LocalCluster

    from reportgen.execute import execute_dataset
    from reportgen.parallel import Backend
    from reportgen.plan import plan_work
    from reportgen.progress import Progress
    from reportgen.runner import _prepare
    from reportgen.spec.load import load_spec

    with tempfile.TemporaryDirectory(prefix="reportgen-bench-dask-") as tmp:
        root = Path(tmp)
        spec_path = write_project(root, images, size)
        ctx, _ = _prepare(load_spec(spec_path), spec_path, root / "staging", Progress(quiet=True), batch)
        store_root = root / "cache"

        def pass_seconds(backend: Any) -> tuple[float, float, int]:
            """(wall seconds, CPU seconds here and on the workers, shards) of one whole pass."""
            shutil.rmtree(store_root, ignore_errors=True)
            with Client(cluster) as client:
                before = sum(client.run(_cpu_seconds).values())
            cpu, t0 = _cpu_seconds(), time.perf_counter()
            workers = backend.planned_workers if backend else 1
            work = plan_work(ctx, 1.0, batch, workers)
            execute_dataset(work.dataset, ctx, backend, spec_path, batch)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu
            with Client(cluster) as client:
                cpu += sum(client.run(_cpu_seconds).values()) - before
            (p,) = work.dataset
            return seconds, cpu, len(p.shards)

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster:
            dask = Backend("dask", scheduler=cluster.scheduler_address)
            print(f"warm-up (model loads and traces here and on both workers), {images} images", flush=True)
            pass_seconds(None)
            pass_seconds(dask)
            wall = {"in process": float("inf"), "dask": float("inf")}
            cpu = dict(wall)
            shards = 0
            for r in range(rounds):
                order = [("in process", None), ("dask", dask)]
                for name, backend in order if r % 2 == 0 else order[::-1]:
                    seconds, cpu_seconds, count = pass_seconds(backend)
                    wall[name], cpu[name] = min(wall[name], seconds), min(cpu[name], cpu_seconds)
                    shards = count if backend else shards
                    print(f"  round {r + 1}, {name}: {seconds:.1f} s, {cpu_seconds:.1f} CPU s "
                          f"({images / seconds:.2f} images/s, {count} shard{'s' if count != 1 else ''})",
                          flush=True)
    return Timing(wall["in process"], wall["dask"], cpu["in process"], cpu["dask"], shards)


def run(images: int, size: int, batch: int, rounds: int) -> Row:
    """The results-table row: seconds of the pass in process (naive) and on the cluster (reportgen)."""
    t = measure(images, size, batch, rounds)
    return Row(
        f"dataset pass on a local Dask cluster (2 workers x 1 thread) vs in process, same 2 cores: "
        f"VGG16-HED `{LAYER}`, {images} images, {size} px",
        "s",
        t.inprocess,
        t.dask,
        t.inprocess / t.dask,
        notes=[
            f"overhead {100 * t.overhead:+.1f} % wall, {100 * t.cpu_overhead:+.1f} % CPU time "
            f"({t.inprocess_cpu:.1f} vs {t.dask_cpu:.1f} CPU s, host and workers; {t.shards} shards on the "
            f"workers; best of {rounds} rounds)"
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--onednn", choices=ONEDNN_MODES, default="reportgen",
                        help="CPU kernels of this process; workers choose theirs as `reportgen run` does")
    args = parser.parse_args(argv)
    select_kernels(args.onednn)
    print(machine())
    row = run(args.images, args.size, args.batch, args.rounds)
    print(f"\n{row.case}\n  in process {row.naive:.1f} s, dask {row.reportgen:.1f} s: {row.notes[0]}")


if __name__ == "__main__":
    main()
