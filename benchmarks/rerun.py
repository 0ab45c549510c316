"""Cold vs warm rerun of a spec: what the result store saves when nothing changed.

The spec is copied into a temporary folder with `output:` and `cache:` pointing there (relative model,
weights, class-name and dataset paths are made absolute, so the copy reads the same inputs). It is then
run twice, each time in a fresh Python process as a user would (`reportgen run` twice):

- cold: empty cache, everything is computed;
- warm: unchanged spec and cache, nothing should be computed (`computed` must be 0).

Printed: process wall time (Python + TensorFlow start-up included) and `runner.run`'s own time for each,
warm/cold ratio, computed / reused counts, and where the warm run spends its time (manifest timings).

    python benchmarks/rerun.py                     # specs/demo.yaml
    python benchmarks/rerun.py --small             # a tiny generated spec (smoke test, ~1 min)
    python benchmarks/rerun.py --spec my.yaml
"""

from __future__ import annotations

import argparse
import json
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
                      "pages": summary.pages, "timings": manifest.get("timings", {})}))


def run_once(spec: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec)],
                          capture_output=True, text=True, cwd=REPO, env=user_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"reportgen run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    return out


def run(spec: Path | None) -> Row:
    name = spec.name if spec else "small generated spec"
    with tempfile.TemporaryDirectory(prefix="reportgen-bench-rerun-") as tmp:
        copy = temp_copy(spec, Path(tmp))
        cold = run_once(copy)
        warm = run_once(copy)
    print(f"\n## rerun: {name}")
    for label, r in (("cold", cold), ("warm", warm)):
        print(f"{label:<10}: {r['wall']:.2f} s process, {r['run_seconds']:.2f} s in runner.run; computed "
              f"{r['computed']}, reused {r['reused']}, {r['pages']} PDF pages")
    print(f"ratio     : warm/cold {warm['wall'] / cold['wall']:.3f} (process), "
          f"{warm['run_seconds'] / cold['run_seconds']:.3f} (runner.run); cold is "
          f"{cold['wall'] / warm['wall']:.1f}x the warm rerun")
    top = sorted(warm["timings"].items(), key=lambda kv: -kv[1])[:6]
    # section timings contain their engines' ("engine: forward", ...); the ascent engine runs on its own
    outer = [v for k, v in warm["timings"].items() if not k.startswith("engine:") or k == "engine: ascent"]
    rest = warm["run_seconds"] - sum(outer)
    print("warm run's largest timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in top)
          + f"; outside the timed parts (imports, model loading, planning, publishing): ~{rest:.2f} s")
    if warm["computed"]:
        print(f"WARNING: the unchanged rerun computed {warm['computed']} results; the cache missed")
    return Row(
        case=f"rerun: {name}, cold (empty cache) vs warm (unchanged), process wall time",
        unit="s", naive=cold["wall"], reportgen=warm["wall"], speedup=cold["wall"] / warm["wall"],
        notes=[f"warm computed {warm['computed']}, reused {warm['reused']}"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RAW)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--spec", type=Path, default=None,
                       help=f"spec to run (default {DEMO.relative_to(REPO)})")
    group.add_argument("--small", action="store_true", help="a tiny generated spec instead (smoke test)")
    group.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    print(machine("kernels as `reportgen run` picks them (fresh processes)"))
    row = run(None if args.small else (args.spec or DEMO))
    print()
    print(markdown_table([row]))


if __name__ == "__main__":
    main()
