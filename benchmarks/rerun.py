"""Cold vs warm rerun of a spec: what the result store saves, and what an unchanged night costs.

The spec is copied into a temporary folder with `output:` and `cache:` pointing there (relative model,
weights, class-name and dataset paths are made absolute, so the copy reads the same inputs). It is then
run in a fresh Python process per run, as a user would (`reportgen run`):

- cold: empty cache, everything is computed (skipped with `--cache DIR`, which starts from a copy of
  an existing cache of the same spec instead);
- warm, full path: unchanged inputs, but the memo of the last run is deleted first, so the run loads
  the models (imports TensorFlow) and plans before finding that nothing is to be computed: what every
  unchanged rerun cost before `reportgen.unchanged`;
- unchanged: the same rerun with the memo: decided before importing TensorFlow, only rendering.

Printed: process wall and CPU time (user + system, from `getrusage`: less sensitive to other load on
the machine than wall time), `runner.run`'s own time, computed/reused counts, whether TensorFlow was
imported, and where each warm run spends its time (manifest timings).

    python benchmarks/rerun.py                     # specs/demo.yaml
    python benchmarks/rerun.py --cache output/.reportgen-cache   # the demo without its cold run
    python benchmarks/rerun.py --small             # a tiny generated spec (smoke test, ~1 min)
    python benchmarks/rerun.py --spec my.yaml
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RAW, Row, machine, markdown_table, user_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "specs" / "demo.yaml"

SMALL_SPEC: dict[str, Any] = {
    "title": "reportgen rerun benchmark (small)",
    "output": "out",
    "seed": 0,
    "models": {"vgg": {"builtin": "vgg16-hed"}},
    "sections": [
        {"type": "filters", "model": "vgg", "layers": ["block1_conv2", "block2_conv1"], "filters": "0:4",
         "recipe": "keras-example", "params": {"size": 64, "crop": 8, "steps": 10}},
    ],
}


def temp_copy(spec: Path | None, folder: Path) -> Path:
    """The spec (or the small one) rewritten into `folder`, its inputs absolute, outputs inside `folder`."""
    import yaml

    if spec is None:
        data, base = json.loads(json.dumps(SMALL_SPEC)), folder
    else:
        data, base = yaml.safe_load(spec.read_text(encoding="utf-8")), spec.resolve().parent

    def absolute(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    for model in (data.get("models") or {}).values():
        if model.get("path"):
            model["path"] = absolute(model["path"])
        if model.get("weights") not in (None, "imagenet", "none"):
            model["weights"] = absolute(model["weights"])
        if isinstance(model.get("class_names"), str):
            model["class_names"] = absolute(model["class_names"])
    for ds in (data.get("datasets") or {}).values():
        if ds.get("path"):
            ds["path"] = absolute(ds["path"])
    data["output"] = str(folder / "output")
    data["cache"] = str(folder / "cache")
    target = folder / (spec.name if spec else "small.yaml")
    target.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target


def child(spec: str) -> None:
    """Run the spec in this (fresh) process and print the summary as JSON on the last line."""
    from reportgen.runner import run

    t0 = time.perf_counter()
    summary = run(spec, quiet=True)
    seconds = time.perf_counter() - t0
    manifest = json.loads((summary.output / "manifest.json").read_text())
    print(json.dumps({"run_seconds": seconds, "computed": summary.computed, "reused": summary.reused,
                      "pages": summary.pages, "timings": manifest.get("timings", {}),
                      "tensorflow": "tensorflow" in sys.modules}))


def run_once(spec: Path, drop_memo: bool = False) -> dict[str, Any]:
    """One `reportgen run` in a fresh process; `drop_memo`: delete the memo of the last run first (the
    full path, as before `reportgen.unchanged`)."""
    if drop_memo:
        shutil.rmtree(spec.parent / "cache" / "results" / "reports", ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec)],
                          capture_output=True, text=True, cwd=REPO, env=user_env())
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"reportgen run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    out["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out


def run(spec: Path | None, cache: Path | None = None) -> list[Row]:
    """Cold (unless `cache` seeds the store), warm full path and unchanged runs of `spec`: their rows."""
    name = spec.name if spec else "small generated spec"
    with tempfile.TemporaryDirectory(prefix="reportgen-bench-rerun-") as tmp:
        copy = temp_copy(spec, Path(tmp))
        if cache is not None:
            shutil.copytree(cache, Path(tmp) / "cache")
            shutil.rmtree(Path(tmp) / "cache" / "results" / "reports", ignore_errors=True)
        runs = {} if cache is not None else {"cold": run_once(copy)}
        runs["warm, full path"] = run_once(copy, drop_memo=True)
        runs["unchanged"] = run_once(copy)
    print(f"\n## rerun: {name}")
    for label, r in runs.items():
        print(f"{label:<16}: {r['wall']:.2f} s process ({r['cpu']:.2f} s CPU), {r['run_seconds']:.2f} s in "
              f"runner.run; computed {r['computed']}, reused {r['reused']}, {r['pages']} PDF pages; "
              f"TensorFlow {'imported' if r['tensorflow'] else 'not imported'}")
    for label in ("warm, full path", "unchanged"):
        top = sorted(runs[label]["timings"].items(), key=lambda kv: -kv[1])[:5]
        print(f"{label} run's largest timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in top))
    full, fast = runs["warm, full path"], runs["unchanged"]
    for label, r in runs.items():
        if label != "cold" and r["computed"]:
            print(f"WARNING: the {label} rerun computed {r['computed']} results; the cache missed")
    rows = []
    if "cold" in runs:
        cold = runs["cold"]
        rows.append(Row(
            case=f"rerun: {name}, cold (empty cache) vs unchanged, process wall time", unit="s",
            naive=cold["wall"], reportgen=fast["wall"], speedup=cold["wall"] / fast["wall"],
            notes=[f"unchanged computed {fast['computed']}, reused {fast['reused']}"],
        ))
    rows.append(Row(
        case=f"rerun: {name}, unchanged: full path (TensorFlow, plan) vs decided before TensorFlow, "
             "process wall time", unit="s",
        naive=full["wall"], reportgen=fast["wall"], speedup=full["wall"] / fast["wall"],
        notes=[f"CPU {full['cpu']:.2f} s vs {fast['cpu']:.2f} s; PDF "
               f"{fast['timings'].get('render: pdf', 0.0):.2f} s of the unchanged run"],
    ))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--spec", type=Path, default=None,
                       help=f"spec to run (default {DEMO.relative_to(REPO)})")
    group.add_argument("--small", action="store_true", help="a tiny generated spec instead (smoke test)")
    group.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None,
                        help="start from a copy of this cache folder of the same spec (no cold run)")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    print(machine("kernels as `reportgen run` picks them (fresh processes)"))
    rows = run(None if args.small else (args.spec or DEMO), args.cache)
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
