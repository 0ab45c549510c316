"""What the templates and manifest.json are made of: one entry per section, the run's metadata, the
models, and the manifest. The runner hands over what happened; this module only arranges it."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reportgen import __version__
from reportgen.plan import human_bytes, human_flops
from reportgen.report.markdown import render_markdown
from reportgen.spec.load import spec_sha256


def plan_row(row: dict[str, Any]) -> dict[str, Any]:
    """One pass of the plan as the metadata page's table shows it: the sections it serves by number (their
    ids are "s<number>-<title>", the anchors of the sections), FLOPs and memory in human units. A table
    instead of the dry run's sentences keeps the plan of a big spec on one page."""
    return {
        **row,
        "serves": [(sid, sid.split("-", 1)[0].removeprefix("s")) for sid in row["sections"]],
        "flops_text": human_flops(row["flops"]) if row["flops"] else "",
        "bytes_text": human_bytes(row["bytes_per_sample"]) if row["bytes_per_sample"] else "",
    }

def now() -> str:
    """UTC time to the second, ISO 8601: when a run started or finished."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions of reportgen, Python and the libraries that change results or rendering."""
    out = {"reportgen": __version__, "python": platform.python_version()}
    for dist in ("tensorflow", "keras", "numpy", "weasyprint", "pydantic", "jinja2"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def run_meta(
    spec: Any, spec_path: Path, summary: Any, started: str, steps: list[dict[str, Any]],
    sections: list[dict[str, Any]], timings: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """The metadata page: spec, seed, precision, device, versions, times, the plan and every step.
    `summary`: the run's `RunSummary` so far; `timings`: the run's named timers."""
    finished = now()
    return {
        "spec_path": str(spec_path.resolve()),
        "spec_name": spec_path.name,
        "spec_sha256": spec_sha256(spec_path),
        "seed": spec.seed,
        "precision": spec.precision,
        "device": summary.device,
        "versions": versions(),
        "started": started,
        "finished": finished,
        "finished_human": finished.replace("T", " "),
        "computed": summary.computed,
        "reused": summary.reused,
        "plan": summary.plan,
        "passes": [plan_row(row) for row in summary.passes],
        "steps": steps,
        "timings": {
            **{s["title"]: s["seconds"] for s in sections},
            **{k: v for k, v in timings.items() if k.startswith("engine")},
        },
    }


def section_entry(
    section: Any, sid: str, title: str, result: Any, notes: list[str], seconds: float, ascent_seconds: float,
    results: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    """One section as the templates see it (`c` is its `context`)."""
    return {
        "id": sid,
        "type": section.type,
        "title": title,
        "model": getattr(section, "model", None),
        "context": result.context,
        "findings": result.findings,
        "notes": result.notes + notes,
        "observations": render_markdown(section.observations),
        "artifacts": result.artifacts,
        "seconds": seconds,
        "ascent_seconds": ascent_seconds,
        "results": results,
    }


def report_context(
    spec: Any, meta: dict[str, Any], sections: list[dict[str, Any]], models: list[Any],
    sizes: dict[str, set[tuple[int, int]]], changes: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The whole template context. `sizes`: model key -> input sizes the run used; `changes`: the "What
    changed" section (`reportgen.history.compare`) when the spec has a baseline."""
    return {
        "title": spec.title,
        "changes": changes,
        "author": spec.author,
        "introduction": render_markdown(spec.introduction),
        "sections": sections,
        "meta": meta,
        "models": [
            {
                "key": m.key,
                "description": m.description,
                "input_size": m.input_size,
                # what ran: a fixed input is the only size; a flexible one, the sizes sections used
                "sizes": [m.input_size] if m.fixed_input else sorted(sizes.get(m.key, ())),
                "channels": m.channels,
                "digest": m.digest,
            }
            for m in models
        ],
    }


def write_manifest(
    path: Path, spec: Any, meta: dict[str, Any], sections: list[dict[str, Any]], timings: dict[str, float],
    changes: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """manifest.json: what a script needs from a run (findings, artifacts, counts), without the HTML.
    `changes`: the change report against the spec's baseline (`reportgen.history.compare`), if any."""
    manifest = {
        "title": spec.title,
        "sections": [
            {
                "id": s["id"],
                "type": s["type"],
                "title": s["title"],
                "findings": s["findings"],
                "results": s["results"],
                "artifacts": [a.manifest() for a in s["artifacts"]],
                "items": s.get("items", []),  # the run history's items (reportgen.history.changes)
            }
            for s in sections
        ],
        "spec_sha256": meta["spec_sha256"],
        "started": meta["started"],
        "finished": now(),
        "versions": meta["versions"],
        "device": meta["device"],
        "seed": spec.seed,
        "precision": spec.precision,
        "computed": meta["computed"],
        "reused": meta["reused"],
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if changes is not None:
        manifest["changes"] = changes
    path.write_text(json.dumps(manifest, indent=1))
