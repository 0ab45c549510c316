"""`reportgen run SPEC --fail-on-change RULE`: a CI gate on the run's change report.

A nightly job wants the report published either way, and the job to fail when something moved beyond
what the team accepts. A rule names a section, one of the figures the section's change report holds,
a comparison and a number:

    RULE    := SECTION "." FIGURE OP NUMBER ["%"]
    SECTION := a section type (every section of that type) or a section's title (case-insensitive)
    FIGURE  := changed | unchanged | new | removed          (item counts)
             | changed_share | unchanged_share | new_share | removed_share   (count / items of the section)
             | any number the section's change report holds: a section-level figure (e.g. `flips`, `tau`),
               else the mean over the items of an item metric of that name (a true/false metric counts
               as 1/0, so its mean is a share)
    OP      := > | >= | < | <= | == | !=
    NUMBER  := a decimal number; with "%" a percentage (5% = 0.05)

e.g. `predictions.flips>0.05`, `filters.changed>=3`, `class_ranking.tau<0.8`. The rules are read from
the manifest's `"changes"` (`{"sections": [{"title", "type", "counts", "items": [{"status",
"metrics"}]}]}`), so any figure a section type adds to its change report can be gated on without a
change here. A rule whose section fires in any of its sections fails the run with exit 4, after the
report was published; the grammar, the sections and the baseline are checked before any compute
(exit 2).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from reportgen.errors import SpecError, echo

EXIT_CHANGED = 4
COUNTS = ("changed", "unchanged", "new", "removed")
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}  # fmt: skip
GRAMMAR = "SECTION.FIGURE OP NUMBER, e.g. predictions.flips>0.05 or filters.changed>=3 (OP: > >= < <= == !=)"
_RULE = re.compile(
    r"^\s*(?P<section>.+?)\s*\.\s*(?P<figure>[A-Za-z_]\w*)\s*(?P<op>>=|<=|==|!=|>|<)\s*"
    r"(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<percent>%?)\s*$"
)


@dataclass(frozen=True)
class Rule:
    """One parsed `--fail-on-change` rule; `text` is what the user wrote (quoted back in messages)."""

    text: str
    section: str
    figure: str
    op: str
    threshold: float

    def matches(self, section: dict[str, Any]) -> bool:
        """Whether a change-report section is one this rule names (by type, or by title ignoring case)."""
        name = self.section.casefold()
        return name in (str(section.get("type", "")).casefold(), str(section.get("title", "")).casefold())

    def fires(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.threshold)


def parse_rule(text: str) -> Rule:
    """A rule from its text, or SpecError (exit 2) with one line saying what the grammar is."""
    m = _RULE.match(text)
    if m is None:
        raise SpecError([f"--fail-on-change {echo(text)}: not a rule; write {GRAMMAR}"])
    number = float(m["number"]) / (100.0 if m["percent"] else 1.0)
    if not math.isfinite(number):
        raise SpecError([f"--fail-on-change {echo(text)}: the number must be finite; write {GRAMMAR}"])
    return Rule(text.strip(), m["section"], m["figure"], m["op"], number)


def check_rules(texts: Iterable[str], spec: Any) -> list[Rule]:
    """Parse every rule and check it against the spec before any compute: the spec must have a baseline
    (without one there is no change report to gate on) and each rule's section must name a section type
    or a title of the spec. Raises SpecError with one line for the first problem."""
    rules = [parse_rule(t) for t in texts]
    if rules and getattr(spec, "baseline", None) is None:
        raise SpecError([
            f"--fail-on-change {echo(rules[0].text)}: the spec has no `baseline:`, so the run makes no "
            "change report to check; add `baseline: previous` to the spec"
        ])  # fmt: skip
    named = [(s.type, s.title) for s in spec.sections]
    _check_sections(rules, named, "the spec", lambda name: _is_default_title(name, spec))
    return rules


def check_report_rules(texts: Iterable[str], sections: list[dict[str, Any]]) -> list[Rule]:
    """Parse every rule and check its section against a change report's sections (`reportgen diff`, whose
    sections come from NEW's manifest, with their titles as published). SpecError (exit 2) with one line."""
    rules = [parse_rule(t) for t in texts]
    named = [(str(s.get("type", "")), s.get("title")) for s in sections]
    _check_sections(rules, named, "the NEW report", lambda name: False)
    return rules


def _check_sections(
    rules: list[Rule], named: list[tuple[str, str | None]], where: str, default_title: Callable[[str], bool]
) -> None:
    """Each rule's section must be one of `named`'s types or titles (or a default title)."""
    known: dict[str, str] = {}
    for kind, title in named:
        known.setdefault(kind.casefold(), kind)
        if title:
            known.setdefault(title.casefold(), title)
    for rule in rules:
        if rule.section.casefold() not in known and not default_title(rule.section):
            names = ", ".join(sorted(set(known.values())))
            raise SpecError([
                f"--fail-on-change {echo(rule.text)}: {where} has no section {echo(rule.section)}; name a "
                f"section type or title: {names}"
            ])  # fmt: skip


def _is_default_title(name: str, spec: Any) -> bool:
    """A section without `title:` is titled by its type's default; rules may name that title too."""
    from reportgen.analyses import analysis_for

    wanted = name.casefold()
    untitled = [s for s in spec.sections if not s.title]
    return any(analysis_for(s.type).default_title(s).casefold() == wanted for s in untitled)


def figures(section: dict[str, Any]) -> dict[str, float]:
    """Every number a change-report section offers to rules (see the module docstring): counts, their
    shares, section-level numbers (top level or under "metrics"), and means of the items' metrics."""
    counts = {k: float(section.get("counts", {}).get(k, 0)) for k in COUNTS}
    total = sum(counts.values())
    out: dict[str, float] = dict(counts)
    out.update({f"{k}_share": (v / total if total else 0.0) for k, v in counts.items()})
    sums: dict[str, list[float]] = {}
    for item in section.get("items", []):
        for name, value in (item.get("metrics") or {}).items():
            if _number(value) is not None:
                sums.setdefault(name, []).append(_number(value))  # type: ignore[arg-type]
    out.update({name: sum(v) / len(v) for name, v in sums.items() if name not in out})
    level = {k: v for k, v in section.items() if k not in ("counts", "items", "metrics")}
    level.update(section.get("metrics") if isinstance(section.get("metrics"), dict) else {})
    out.update({k: _number(v) for k, v in level.items() if _number(v) is not None and k not in counts})  # type: ignore[misc]
    return out


def _number(value: Any) -> float | None:
    """A finite number (a bool as 0/1), or None for anything else (text, lists, missing values)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def evaluate(rules: list[Rule], changes: dict[str, Any] | None) -> list[str]:
    """The one-line message of every rule that fires on `changes` (the manifest's change report), in rule
    order. A rule whose sections hold no such figure is a SpecError naming the figures there are."""
    fired = []
    sections = (changes or {}).get("sections", [])
    for rule in rules:
        mine = [s for s in sections if rule.matches(s)]
        offered: set[str] = set()
        found = False
        for s in mine:
            values = figures(s)
            offered.update(values)
            if rule.figure not in values:
                continue
            found = True
            value = values[rule.figure]
            if rule.fires(value):
                fired.append(
                    f"change gate {rule.text!r} fired: section {s.get('title')!r} ({s.get('type')}) has "
                    f"{rule.figure} = {value:.4g}, against baseline {(changes or {}).get('baseline')}"
                )
                break
        if mine and not found:
            raise SpecError([
                f"--fail-on-change {echo(rule.text)}: section {echo(rule.section)} reports no figure "
                f"{echo(rule.figure)}; it reports: {', '.join(sorted(offered))}"
            ])  # fmt: skip
    return fired
