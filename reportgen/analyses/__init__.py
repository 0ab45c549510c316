"""Section types, found by looking: every module of this package that defines `ANALYSIS` is one type.

A type's module declares everything about it: its section model (the `type:` name and fields, whether it
needs the classifier head), the work it requests in `prepare` and the `build` that turns results into
the template context. The registry here, the spec's `sections` union and the JSON Schema are derived from
those modules, so adding a type is one module, one template partial and the regenerated schema file.
Modules without `ANALYSIS` (base, shared helpers) are skipped.

Every module here must import without TensorFlow (`reportgen validate` and `schema` load them all).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

from pydantic import Field, create_model

from reportgen.spec.changes import ThresholdsBase


@cache
def analyses() -> dict[str, Any]:
    """`type:` -> the `Analysis` instance of every section type, in module-name order."""
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        analysis = getattr(module, "ANALYSIS", None)
        if analysis is not None:
            found[analysis.type] = analysis
    return found


def analysis_for(section_type: str) -> Any:
    """The `Analysis` of a section type (`reportgen.analyses.base.Analysis`)."""
    return analyses()[section_type]


def section_models() -> list[type]:
    """The pydantic models of every section type, for the spec's `sections` union."""
    return [analysis.section for analysis in analyses().values()]


@cache
def change_thresholds() -> type:
    """The spec's `changes:` model: one field per section type that declares `thresholds` (its own pydantic
    model of when an item counts as changed), defaulting to that model's defaults."""
    fields: dict[str, Any] = {
        name: (a.thresholds, Field(default_factory=a.thresholds))
        for name, a in analyses().items()
        if a.thresholds is not None
    }
    doc = "Per section type: when an item counts as changed."
    return create_model("ChangeThresholds", __base__=ThresholdsBase, __doc__=doc, **fields)
