"""The whole spec as one pydantic model: the single source of truth for validation and the JSON Schema.

The `sections` union is derived from the section types `reportgen.analyses` finds (each module declares
its own section model), so a new type needs no edit here.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr

from reportgen.analyses import change_thresholds, section_models
from reportgen.spec.changes import Baseline
from reportgen.spec.fields import MAX_SEED, DatasetSpec, ModelSpec, Strict

_MODELS = section_models()
Section = Annotated[typing.Union[tuple(_MODELS)], Field(discriminator="type")]  # noqa: UP007
"""One section of any type, told apart by its `type:`."""

ChangeThresholds = change_thresholds()
"""The `changes:` thresholds, one field per section type that declares them."""

SECTION_TYPES = [typing.get_args(m.model_fields["type"].annotation)[0] for m in _MODELS]


class Spec(Strict):
    title: str
    output: str = Field(description="Output folder, relative to the spec file.")
    formats: list[Literal["html", "pdf"]] = Field(default_factory=lambda: ["html", "pdf"])
    seed: int = Field(0, ge=0, le=MAX_SEED)
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    cache: str | None = Field(
        None, description="Result store folder (default: .reportgen-cache beside output)."
    )
    author: str | None = None
    introduction: str | None = Field(None, description="Markdown shown before the first section.")
    models: dict[str, ModelSpec] = Field(min_length=1)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    sections: list[Section] = Field(min_length=1)
    baseline: Baseline | None = Field(
        None,
        description="Open the report with a 'What changed' section: previous (the last successful run of "
        "this spec in the run history <cache>/history.sqlite), an earlier output folder, or {run: previous | "
        "PATH, model: KEY, align: DATASET_KEY}.",
    )
    changes: ChangeThresholds = Field(  # type: ignore[valid-type]
        default_factory=ChangeThresholds,
        description="Per section type: the thresholds beyond which an item counts as changed.",
    )
    _located: Any = PrivateAttr(None)
    _filename: str = PrivateAttr("<spec>")


def json_schema() -> dict[str, Any]:
    """JSON Schema of the spec, for editors (e.g. the YAML language server's `# yaml-language-server`)."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "reportgen spec"
    return schema
