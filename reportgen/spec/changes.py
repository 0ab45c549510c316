"""The spec's `baseline:` (what a run is compared with) and `changes:` (when an item counts as changed).

`baseline:` takes three forms: `previous` (the last successful run of this spec in the run history),
a PATH (an earlier output folder: its manifest.json and pictures), or a mapping
`{run: previous | PATH, model: KEY, align: DATASET_KEY}`. `model:` compares within this run: every
section of another model against the section of model KEY with the same type and the same fields
(e.g. two checkpoints of one network run through the same sections); `run:` and `model:` exclude each
other. `align:` matches units of the two checkpoints over that dataset before comparing them
(`reportgen.history.align`).

`changes:` holds per section type the thresholds beyond which an item counts as changed; the defaults
are the values below (README, "What changed").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag

from reportgen.errors import echo
from reportgen.spec.fields import Strict


class BaselineSpec(Strict):
    run: str | None = Field(
        None, description="previous (the last successful run of this spec) or an earlier output folder."
    )
    model: str | None = Field(
        None,
        description="Compare every section of the other models with the same section of this model "
        "(same type and fields but `model`), in this run.",
    )
    align: str | None = Field(
        None,
        description="Dataset key: match units of the two checkpoints by the correlation of their per-image "
        "channel means over it (Li et al. 2015) before comparing them.",
    )


Baseline = Annotated[
    Annotated[str, Tag("run")] | Annotated[BaselineSpec, Tag("mapping")],
    Discriminator(lambda value: "run" if isinstance(value, str) else "mapping"),
]
"""`previous`, a PATH, or the mapping form: told apart by the value's kind, so a wrong mapping gets the
mapping's errors only (not also "not a string")."""


class ThresholdsBase(Strict):
    """Per section type: when an item counts as changed (`reportgen.history.changes`). The fields are the
    types' own threshold models (`Analysis.thresholds`); `reportgen.analyses.change_thresholds` derives the
    spec's `changes:` model from them, so a type declares its thresholds in its own module."""

    def limits(self, section_type: str) -> dict[str, float]:
        """The thresholds of one section type ({} for a type without any)."""
        found = getattr(self, section_type, None)
        return found.model_dump() if isinstance(found, Strict) else {}


def baseline_problems(
    data: dict[str, Any], at: Callable[[tuple[Any, ...], str], None], suggest: Callable[[str, list[str]], str]
) -> None:
    """References of `baseline:` to the spec's models and datasets (on the parsed data, like the other
    cross-checks): an unknown key gets its line and a did-you-mean."""
    baseline = data.get("baseline")
    if not isinstance(baseline, dict):
        return
    models = list(data["models"]) if isinstance(data.get("models"), dict) else []
    datasets = list(data["datasets"]) if isinstance(data.get("datasets"), dict) else []
    model, dataset = baseline.get("model"), baseline.get("align")
    if isinstance(model, str) and model not in models:
        at(("baseline", "model"), f"unknown model {echo(model)}; {suggest(model, models)}")
    elif isinstance(model, str) and len(models) < 2:
        at(("baseline", "model"), "compares with a second model of the spec, but the spec has one; add the "
           "other checkpoint under `models:` (or use `run: previous`)")  # fmt: skip
    if isinstance(dataset, str) and dataset not in datasets:
        hint = suggest(dataset, datasets) if datasets else "declare it under `datasets:`"
        at(("baseline", "align"), f"unknown dataset {echo(dataset)}; {hint}")
    if baseline.get("run") is not None and model is not None:
        at(("baseline", "model"), "run: and model: exclude each other; compare with an earlier run (run:) or "
           "with another model of this run (model:)")  # fmt: skip
    if baseline.get("run") is None and model is None:
        at(("baseline",), "needs run: (previous or an output folder) or model: (a model key)")
