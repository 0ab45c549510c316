"""Load a spec file: parse with positions, validate, cross-check references, report every problem at once.

Each problem reads `file:line:col: field.path: what is wrong; what to do`, the format editors and CI
logs turn into links.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from reportgen.engine.recipes import recipe_problems
from reportgen.errors import ECHO_CHARS, SpecError, echo, suggest
from reportgen.spec import schema
from reportgen.spec.changes import baseline_problems
from reportgen.spec.output_check import check_output
from reportgen.spec.yaml_lines import MAX_SPEC_BYTES, Located, SpecTextError, decode, parse


def spec_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dotted(loc: tuple[Any, ...]) -> str:
    """A field's path as an error line names it: `sections[0].params.size`."""
    out = ""
    for part in loc:
        name = str(part) if len(str(part)) <= ECHO_CHARS else echo(part)  # keys can be long too
        out += f"[{part}]" if isinstance(part, int) else (f".{name}" if out else name)
    return out or "(top level)"


def _model_for_loc(loc: tuple[Any, ...], data: Any) -> type[BaseModel] | None:
    """The pydantic model class that owns the mapping at `loc`, to suggest known keys for a typo."""
    model: Any = schema.Spec
    node = data
    for part in loc:
        if model is None:
            return None
        if isinstance(model, type) and issubclass(model, BaseModel):
            if part not in model.model_fields:
                return None
            ann = model.model_fields[part].annotation
            node = node.get(part) if isinstance(node, dict) else None
            model = _unwrap(ann, node)
        elif isinstance(model, tuple) and model[0] == "dict":
            node = node.get(part) if isinstance(node, dict) else None
            model = _unwrap(model[1], node)
        elif isinstance(model, tuple) and model[0] == "list":
            in_range = isinstance(node, list) and isinstance(part, int) and part < len(node)
            node = node[part] if in_range else None
            model = _unwrap(model[1], node)
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(ann: Any, node: Any) -> Any:
    import typing

    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Annotated:
        return _unwrap(args[0], node)
    if origin is dict:
        return ("dict", args[1])
    if origin is list:
        return ("list", args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(node, dict) and "type" in node:
            for m in models:
                tag = m.model_fields.get("type")
                if tag is not None and node["type"] in typing.get_args(tag.annotation):
                    return m
        return models[0] if len(models) == 1 else None
    return ann


def _format_pydantic(err: dict[str, Any], located: Located, filename: str) -> str:
    loc = tuple(err["loc"])
    # A section's discriminator tag follows its index in the loc: ("sections", 0, "filters", "titel").
    # The tag can equal a field name (`filters`), so drop it before walking the data.
    sections = located.data.get("sections") if isinstance(located.data, dict) else None
    if len(loc) > 2 and loc[0] == "sections" and isinstance(loc[1], int) and isinstance(sections, list):
        section = sections[loc[1]] if loc[1] < len(sections) else None
        if isinstance(section, dict) and section.get("type") == loc[2]:
            loc = loc[:2] + loc[3:]
    # pydantic inserts union member names into locs too; drop non-data parts.
    data_loc: list[Any] = []
    node = located.data
    for part in loc:
        if isinstance(node, dict) and part in node:
            data_loc.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            data_loc.append(part)
            node = node[part]
        elif err["type"] in ("extra_forbidden", "missing") and part == loc[-1]:
            data_loc.append(part)  # the key is absent from the data: name it, locate its parent
    line, col = located.where(tuple(data_loc))
    field = dotted(tuple(data_loc))
    etype = err["type"]
    if etype == "extra_forbidden":
        owner = _model_for_loc(tuple(data_loc[:-1]), located.data)
        known = list(owner.model_fields) if owner else []
        msg = f"unknown key {echo(data_loc[-1])}; {suggest(data_loc[-1], known)}".rstrip("; ")
    elif etype == "missing":
        msg = "required field is missing; add it"
    elif etype == "union_tag_invalid":
        msg = f"unknown section type {echo(err.get('input', {}).get('type'))}; " + suggest(
            str(err.get("input", {}).get("type")), schema.SECTION_TYPES
        )
    elif etype == "union_tag_not_found":
        msg = f"a section needs `type:` (one of {', '.join(schema.SECTION_TYPES)})"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if value is not None and not isinstance(value, dict | list) and echo(value) not in msg:
            msg += f" (got {echo(value)})"
    return f"{filename}:{line}:{col}: {field}: {msg}"


def _recipe_defaults() -> dict[str, str]:
    """Section type -> its default recipe, for the section types that run the ascent engine."""
    import typing

    members = typing.get_args(typing.get_args(schema.Section)[0])
    return {
        typing.get_args(m.model_fields["type"].annotation)[0]: m.model_fields["recipe"].default
        for m in members
        if "recipe" in m.model_fields
    }


def _cross_check(located: Located, filename: str) -> list[str]:
    """References between parts of the spec: model and dataset keys, recipes and their parameters.

    Works on the parsed data, not the validated spec, so that it also runs when validation failed and
    a typo elsewhere does not hide these problems until the next attempt.
    """
    problems: list[str] = []
    data = located.data
    models = data.get("models") if isinstance(data.get("models"), dict) else None
    datasets = list(data["datasets"]) if isinstance(data.get("datasets"), dict) else []
    sections = data.get("sections") if isinstance(data.get("sections"), list) else []
    recipes = _recipe_defaults()

    def at(path: tuple[Any, ...], msg: str) -> None:
        line, col = located.where(path)
        problems.append(f"{filename}:{line}:{col}: {dotted(path)}: {msg}")

    for i, sec in enumerate(sections):
        if not isinstance(sec, dict):
            continue
        model = sec.get("model")
        if isinstance(model, str) and models is not None and model not in models:
            at(("sections", i, "model"), f"unknown model {echo(model)}; {suggest(model, list(models))}")
        dataset = sec.get("dataset")
        if isinstance(dataset, str) and dataset not in datasets:
            hint = suggest(dataset, datasets) if datasets else "declare it under `datasets:`"
            at(("sections", i, "dataset"), f"unknown dataset {echo(dataset)}; {hint}")
        recipe = sec.get("recipe", recipes.get(sec.get("type")))
        params = sec.get("params") or {}
        if isinstance(recipe, str) and sec.get("type") in recipes and isinstance(params, dict):
            # values of the wrong type are schema errors, reported by validation
            numeric = {k: v for k, v in params.items() if isinstance(v, int | float | bool)}
            for exc in recipe_problems(recipe, numeric):
                at(("sections", i, "params", exc.param) if exc.param else ("sections", i, "recipe"), str(exc))
    baseline_problems(data, at, suggest)
    return problems


def _resolve_paths(spec: schema.Spec, base: Path) -> schema.Spec:
    """Make every relative path absolute against the spec file's folder."""

    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    models = {}
    for key, m in spec.models.items():
        upd: dict[str, Any] = {"path": absolute(m.path)}
        if m.weights not in ("imagenet", "none"):
            upd["weights"] = absolute(m.weights)
        if isinstance(m.class_names, str):
            upd["class_names"] = absolute(m.class_names)
        models[key] = m.model_copy(update=upd)
    datasets = {k: d.model_copy(update={"path": absolute(d.path)}) for k, d in spec.datasets.items()}
    return spec.model_copy(
        update={
            "output": absolute(spec.output),
            "cache": absolute(spec.cache),
            "models": models,
            "datasets": datasets,
        }
    )


def _position(problem: str, filename: str) -> tuple[int, int]:
    """(line, col) of a `file:line:col: ...` problem, to list problems in file order."""
    m = re.match(re.escape(filename) + r":(\d+):(\d+): ", problem)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _read_bounded(path: Path, filename: str) -> bytes:
    """The spec's bytes, refusing a file over MAX_SPEC_BYTES before reading it whole (the size is checked
    first, and at most one byte more is read, for files whose size the file system does not know)."""
    limit = MAX_SPEC_BYTES
    too_big = (
        f"{filename}: the spec is over {limit // 2**20} MiB; a spec is a hand-written YAML file of a few "
        "KiB, check that this is the right file"
    )
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise SpecError([too_big])
            data = f.read(limit + 1)
    except OSError as exc:
        raise SpecError([f"{filename}: cannot read the spec: {exc.strerror}"]) from None
    if len(data) > limit:
        raise SpecError([too_big])
    return data


def load_spec(path: str | Path) -> schema.Spec:
    """Read, validate and resolve a spec; raise SpecError listing every problem found."""
    path = Path(path)
    filename = str(path)
    try:
        located = parse(decode(_read_bounded(path, filename)))
    except SpecTextError as exc:
        raise SpecError([f"{filename}:{exc.line}:{exc.col}: {exc.message}"]) from None
    if not isinstance(located.data, dict):
        data = located.data
        kind = f"the single value {echo(data)}"
        kind = "empty" if data is None else "a list" if isinstance(data, list) else kind
        raise SpecError(
            [f"{filename}:1:1: the spec is {kind}; it must be a mapping with title, output, models, sections"]
        )
    problems: list[str] = []
    try:
        spec = schema.Spec.model_validate(located.data)
    except ValidationError as exc:
        problems = [_format_pydantic(e, located, filename) for e in exc.errors()]
    problems += _cross_check(located, filename)
    if problems:
        raise SpecError(sorted(dict.fromkeys(problems), key=lambda p: _position(p, filename)))
    spec = _resolve_paths(spec, path.resolve().parent)
    unsafe = check_output(spec, located, filename, path.resolve().parent)
    if unsafe:
        raise SpecError(unsafe)
    spec._located = located
    spec._filename = filename
    return spec


def locate(spec: schema.Spec, path: tuple[Any, ...]) -> str:
    """`file:line:col` of a field of a loaded spec, for errors found later (e.g. unknown layer names)."""
    located: Located | None = getattr(spec, "_located", None)
    filename = getattr(spec, "_filename", "<spec>")
    if located is None:
        return filename
    line, col = located.where(path)
    return f"{filename}:{line}:{col}"
