"""Refuse, at validation, an `output:` or `cache:` whose use would delete or corrupt the user's files.

A run swaps the whole output folder out for the new report and deletes the old one, so the output must
be a folder reportgen made (or a new or empty one), and must not hold anything else the spec names.
Checked before any compute, on resolved paths (symbolic links followed on both sides, so a link cannot
hide that a dataset lies inside the output). `reportgen.publish.publish` checks again before the swap.
"""

from __future__ import annotations

from pathlib import Path

from reportgen.publish import MARKER, safe_to_replace
from reportgen.spec.schema import Spec
from reportgen.spec.yaml_lines import Located

NEW_FOLDER = "name a new folder for the report, e.g. `output: out/report`"


def _blocking_file(path: Path) -> Path | None:
    """The path itself or its nearest existing ancestor, when that is not a folder (nothing can be created
    under a file)."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def _home() -> Path | None:
    """The user's home folder ($HOME), or None where it cannot be told (no $HOME and no passwd entry)."""
    home = Path("~").expanduser()
    return home.resolve() if home.is_absolute() else None


def _named_paths(spec: Spec) -> list[tuple[str, Path]]:
    """(what, resolved path) of every dataset folder and model file (saved model, weights, class names)
    the spec names."""
    named = [(f"the folder of dataset {k!r}", d.path) for k, d in spec.datasets.items()]
    for key, m in spec.models.items():
        named.append((f"the file of model {key!r}", m.path))
        if m.weights not in ("imagenet", "none"):
            named.append((f"the weights file of model {key!r}", m.weights))
        if isinstance(m.class_names, str):
            named.append((f"the class names file of model {key!r}", m.class_names))
    return [(what, Path(p).resolve()) for what, p in named if p is not None]


def _output_problem(spec: Spec, raw: str, spec_dir: Path) -> str | None:
    """What is wrong with `output:`, the most telling reason first (one line even if several apply). An
    output inside or around the result store is `_cache_problem`'s, reported once at `cache:`."""
    given = Path(spec.output)
    out = given.resolve()
    if not raw.strip():
        return f"is empty, which means the spec's own folder {spec_dir}; {NEW_FOLDER}"
    if out == Path(out.anchor):
        return f"{out} is the root folder; {NEW_FOLDER}"
    if ".." in given.parts:
        return f"{raw!r} goes up with `..`; write the folder's path without it"
    blocker = _blocking_file(out)
    if blocker == out:
        return f"{out} is an existing file, not a folder; {NEW_FOLDER} (the file is kept)"
    if blocker is not None:
        return f"{blocker}, above the output folder {out}, is a file, not a folder; {NEW_FOLDER}"
    if given.is_symlink():
        return f"{given} is a symbolic link to {out}; name the folder itself, or a new one"
    home = _home()
    if home is not None and home.is_relative_to(out):
        what = "your home folder" if out == home else f"a folder above your home folder {home}"
        return f"{out} is {what}; {NEW_FOLDER}"
    if spec_dir.is_relative_to(out):
        what = "the spec's own folder" if out == spec_dir else "a folder above the spec"
        return f"{out} is {what}, and a run replaces the whole output folder; {NEW_FOLDER}"
    for what, path in _named_paths(spec):
        if path.is_relative_to(out):
            return f"{out} contains {what} ({path}), and a run replaces the whole output folder; {NEW_FOLDER}"
        if out.is_relative_to(path):
            return (
                f"{out} lies inside {what} ({path}), and the next run would read the report's images as "
                "input; name a folder outside it for the report, e.g. `output: out/report`"
            )
    if not safe_to_replace(out):
        return (
            f"{out} already holds files reportgen did not write (no {MARKER} marker), and a run replaces "
            f"the whole output folder; {NEW_FOLDER}, or an empty one"
        )
    return None


def _cache_problem(spec: Spec, cache: Path) -> str | None:
    """What is wrong with the result store's folder (`cache:`, or its default beside the output)."""
    out = Path(spec.output).resolve()
    blocker = _blocking_file(cache)
    if blocker is not None:
        what = "is an existing file" if blocker == cache else f"lies under {blocker}, which is a file"
        if spec.cache is None:
            return f"the result store's default folder {cache} {what}; set `cache:` to a folder"
        return f"{cache} {what}; name a folder for the result store, e.g. `cache: .reportgen-cache`"
    if spec.cache is None:
        return None  # the default sits beside the output: neither can hold the other
    if cache.is_relative_to(out):
        where = "is the output folder" if cache == out else f"lies inside the output folder {out}"
        return (
            f"{cache} {where}, which a run replaces; choose a folder outside it, e.g. "
            "`cache: .reportgen-cache`"
        )
    if out.is_relative_to(cache):
        return f"{cache} contains the output folder {out}; keep the report and the result store apart"
    return None


def _unreadable(exc: OSError) -> str:
    """A folder on the way this user may not look into: the check cannot tell whether the path is safe."""
    return f"cannot look at {exc.filename}: {exc.strerror}; make it readable for this user, or pick another"


def check_output(spec: Spec, located: Located, filename: str, spec_dir: Path) -> list[str]:
    """Problems (`file:line:col: field: problem; fix`) of a validated spec whose paths are resolved;
    `spec_dir` is the spec file's resolved folder."""
    problems = []
    cache = (Path(spec.cache) if spec.cache else Path(spec.output).parent / ".reportgen-cache").resolve()
    try:
        output_problem = _output_problem(spec, str(located.data.get("output", "")), spec_dir)
    except OSError as exc:  # a folder on the way that this user may not look into
        output_problem = _unreadable(exc)
    if output_problem:
        line, col = located.where(("output",))
        problems.append(f"{filename}:{line}:{col}: output: {output_problem}")
    # the default cache follows from `output:`: a problem of both (a file above them) is said once
    try:
        cache_problem = None if output_problem and spec.cache is None else _cache_problem(spec, cache)
    except OSError as exc:
        cache_problem = _unreadable(exc)
    if cache_problem:
        field = "cache" if spec.cache is not None else "output"
        line, col = located.where((field,))
        problems.append(f"{filename}:{line}:{col}: {field}: {cache_problem}")
    return problems
