"""`reportgen diff OLD NEW -o DIR`: the "What changed" report between two existing output folders.

Nothing is recomputed and TensorFlow is never imported: both folders' manifest.json hold every section's
items (the figures the run history keeps, with the paths of their pictures and maps), so the comparison
is the one a run with `baseline: OLD` makes (`reportgen.history.changes.compare`: the same change
metrics, NEW's thresholds when its manifest has a change report, else the defaults, each overridable with
`--threshold TYPE.FIELD=NUMBER`; units aligned where both folders stored the alignment means). With
`--fail-on-change RULE` (the grammar of `reportgen.gate`) it exits 4 after publishing when a rule fires,
so a CI job can gate two existing outputs the way `run` gates a night. DIR gets report.html (+ report.pdf),
manifest.json with the same `changes` structure, and the most-changed pictures; it is published like a
run's report: built in a staging folder and swapped in, and only over a folder reportgen made
(`reportgen.publish`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reportgen import __version__
from reportgen.errors import SpecError, echo, suggest
from reportgen.gate import check_report_rules, evaluate
from reportgen.history.changes import compare, folder_alignments, from_manifest, read_manifest
from reportgen.publish import clean_stale, new_staging, publish, run_lock, safe_to_replace
from reportgen.report.context import now
from reportgen.report.render import environment, render_pdf, template_dir
from reportgen.spec.schema import ChangeThresholds


@dataclass
class DiffSummary:
    output: Path
    pages: int
    counts: dict[str, int]  # changed / unchanged / new / removed over all sections
    fired: list[str]  # the message of each `--fail-on-change` rule the change report crossed


THRESHOLD_FORM = "TYPE.FIELD=NUMBER, e.g. filters.ssim=0.8 or predictions.confidence=0.1"
_THRESHOLD = re.compile(r"^\s*(?P<kind>\w+)\s*\.\s*(?P<field>\w+)\s*=\s*(?P<value>\S+)\s*$")


def thresholds_from(recorded: dict[str, Any] | None, overrides: list[str]) -> Any:
    """The change thresholds of a diff: those NEW's run recorded (else the defaults), then every
    `--threshold TYPE.FIELD=NUMBER` on top. A wrong override is one line (exit 2) with a did-you-mean,
    checked against the same models as the spec's `changes:` (ranges included)."""
    data: dict[str, Any] = {k: dict(v) for k, v in (recorded or {}).items() if isinstance(v, dict)}
    kinds = ChangeThresholds.model_fields
    for text in overrides:
        m = _THRESHOLD.match(text)
        if m is None:
            raise SpecError([f"--threshold {echo(text)}: write {THRESHOLD_FORM}"])
        kind, name = m["kind"], m["field"]
        if kind not in kinds:
            raise SpecError([f"--threshold {echo(text)}: no section type {echo(kind)} has thresholds; "
                             f"{suggest(kind, list(kinds))}"])  # fmt: skip
        fields = kinds[kind].annotation.model_fields
        if name not in fields:
            raise SpecError([f"--threshold {echo(text)}: {kind} has no threshold {echo(name)}; "
                             f"{suggest(name, list(fields))}"])  # fmt: skip
        try:
            value = float(m["value"])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SpecError([f"--threshold {echo(text)}: the value must be a finite number; "
                             f"write {THRESHOLD_FORM}"])  # fmt: skip
        data.setdefault(kind, {})[name] = value
    try:
        return ChangeThresholds.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SpecError([f"--threshold {where}: {first['msg']}"]) from None


def diff(
    old: Path,
    new: Path,
    output: Path,
    *,
    pdf: bool = True,
    thresholds: list[str] | None = None,
    rules: list[str] | None = None,
) -> DiffSummary:
    """Compare the reports in `old` and `new` and publish the change report to `output`. `thresholds`:
    `--threshold` overrides (see `thresholds_from`); `rules`: `--fail-on-change` rules, whose sections must
    be NEW's; both are checked before anything is written, the rules evaluated after publishing."""
    old, new, output = old.resolve(), new.resolve(), output.resolve()
    old_manifest = read_manifest(old, "reportgen diff", "OLD")
    new_manifest = read_manifest(new, "reportgen diff", "NEW")
    if not safe_to_replace(output):
        raise SpecError([f"reportgen diff: -o {output} holds files reportgen did not write; choose an empty "
                         "or new folder (or one reportgen published)"])  # fmt: skip
    limits = thresholds_from((new_manifest.get("changes") or {}).get("thresholds"), thresholds or [])
    gates = check_report_rules(rules or [], new_manifest["sections"])
    with run_lock(output):
        clean_stale(output)
        staging = new_staging(output)
        try:
            now_sections = from_manifest(new, new_manifest)
            by_id = {s.sid: s for s in from_manifest(old, old_manifest)}
            paired = [(by_id.get(s.sid), s) for s in now_sections]
            alignments = folder_alignments(old, new, now_sections)
            changes = compare(str(old), "folder", paired, limits, alignments, staging)
            context = _context(old, new, old_manifest, new_manifest, changes)
            html = environment().get_template("diff.html.j2").render(**context)
            (staging / "report.html").write_text(html, encoding="utf-8")
            shutil.copyfile(template_dir() / "report.css", staging / "report.css")
            pages = render_pdf(staging / "report.html", staging / "report.pdf") if pdf else 0
            manifest = {
                "title": context["title"],
                "old": str(old),
                "new": str(new),
                "created": context["created"],
                "versions": {"reportgen": __version__},
                "changes": changes,
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            publish(staging, output, where=f"reportgen diff -o {output}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    totals = {
        k: sum(s["counts"][k] for s in changes["sections"])
        for k in ("changed", "unchanged", "new", "removed")
    }
    return DiffSummary(output, pages, totals, evaluate(gates, changes))


def _context(
    old: Path, new: Path, old_manifest: dict[str, Any], new_manifest: dict[str, Any], changes: dict[str, Any]
) -> dict[str, Any]:
    """What diff.html.j2 shows: the change report and where each side came from."""
    sides = [
        {"side": name, "folder": str(folder), "title": m.get("title"), "finished": m.get("finished"),
         "spec_sha256": m.get("spec_sha256")}
        for name, folder, m in (("old", old, old_manifest), ("new", new, new_manifest))
    ]  # fmt: skip
    title = f"What changed: {new_manifest.get('title', new.name)}"
    return {"title": title, "changes": changes, "sides": sides, "created": now(), "version": __version__}
