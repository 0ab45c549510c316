"""Up-front checks of the files a spec names, at the start of `run` and in `validate --models`.

Validation proper (`load_spec`) needs no data, so that a spec can be checked on a laptop before the
models and images are copied to the machine that runs it. The files are checked here instead, before
any compute: a missing dataset folder used to surface after an hour of ascent, as an absolute path with
exit 1. Every problem becomes a `SpecError` line at the `file:line:col` of the field that names the
file (`datasets.photos.path`, `models.net.weights`), with the real cause (a truncated `.keras`, a text
file named `.h5`, a Lambda layer safe mode refused) and exit 2. Problems of the machine (permissions,
no network for ImageNet weights, a broken installation) stay `ReportgenError`s: exit 1.

The models and datasets the sections use are loaded through the run's registries, which keep them, so
checking them costs nothing extra; files of unused entries only have to exist.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from reportgen.analyses import analysis_for
from reportgen.errors import ReportgenError, SpecError
from reportgen.spec.fields import _RANGE
from reportgen.spec.load import locate
from reportgen.spec.schema import Spec

log = logging.getLogger("reportgen")

def _dotted(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _position(problem: str) -> tuple[int, int]:
    m = re.search(r":(\d+):(\d+): ", problem)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def selection_problem(value: Any, channels: int, layer: str, noun: str) -> str | None:
    """Why an explicit selection does not fit a layer of `channels` channels, or None.

    The documented default (`0:64` for filters) is never checked: it is meant to adapt to the layer.
    An explicit range that ends past the layer, or starts past it, used to be clipped silently, so
    `"0:999"` on a 3-filter layer looked like a request for 999 filters that was honoured."""
    have = f"layer {layer!r} has {channels} {noun} (0..{channels - 1})"
    if isinstance(value, int):
        value = [value]
    if isinstance(value, list):
        beyond = [v for v in value if v >= channels]
        return f"{noun[:-1]} {beyond[0]} does not exist: {have}" if beyond else None
    m = _RANGE.match(value) if isinstance(value, str) else None
    if not m:
        return None  # `all`
    start = int(m.group(1) or 0)
    stop = int(m.group(2)) if m.group(2) else None
    if start >= channels:
        return f"range {value!r} starts past the last {noun[:-1]}: {have}"
    if stop is not None and stop > channels:
        return f"range {value!r} ends past the last {noun[:-1]}: {have}; use '{start}:{channels}' or `all`"
    return None


def _check_selections(spec: Spec, loaded: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Explicit filter ranges and indices against the layers' channel counts (models are loaded now)."""
    found = []
    for i, section in enumerate(spec.sections):
        fields = analysis_for(section.type).filter_selection
        model = loaded.get(getattr(section, "model", None))
        if fields is None or model is None or fields[0] not in section.model_fields_set:
            continue
        field, layer_field = fields
        value = getattr(section, field)
        if section.type == "activations" and not isinstance(value, str):
            continue  # activations leave out missing channel indices with a note, as documented
        layers = getattr(section, layer_field)
        checked, problems = 0, []
        for name in layers if isinstance(layers, list) else [layers]:
            try:
                channels = model.layer_channels(name)
            except (ReportgenError, AttributeError, ValueError, IndexError):
                continue  # an unknown layer: the section reports it, with suggestions
            checked += 1
            problem = selection_problem(value, channels, name, field)
            if problem:
                problems.append(problem)
        # One selection for layers of different widths ("the first 16 of each") is fine where it fits
        # some of them: the smaller ones show what they have, said in the log. Fitting none is a mistake.
        if problems and len(problems) == checked:
            found.append((("sections", i, field), problems[0]))
        elif problems:
            where = locate(spec, ("sections", i, field))
            log.warning("%s: sections[%d].%s: %s (shown: what the layer has)", where, i, field, problems[0])
    return found


def check_files(spec: Spec, models: Any, datasets: Any) -> None:
    """Raise SpecError listing every file the spec names that is missing or unusable (see module doc).

    `models` / `datasets`: the run's ModelRegistry and DatasetRegistry (`get(key)` loads and keeps)."""
    from reportgen.datasets import DatasetFileError
    from reportgen.models import ModelFileError, check_model_file, check_weights_file

    used_models = {getattr(s, "model", None) for s in spec.sections} - {None}
    used_datasets = {getattr(s, "dataset", None) for s in spec.sections} - {None}
    found: list[tuple[tuple[Any, ...], str]] = []

    for key, ds in spec.datasets.items():
        try:
            if key in used_datasets:
                datasets.get(key)
            elif ds.path is not None and not Path(ds.path).is_dir():
                what = "is not a folder" if Path(ds.path).exists() else "does not exist"
                raise DatasetFileError("path", f"dataset {key!r}: {ds.path} {what}; fix `path:`")
        except DatasetFileError as exc:
            if ds.builtin:  # a builtin set is reportgen's own: its problems are the installation's
                raise ReportgenError(str(exc)) from None
            found.append((("datasets", key, exc.field), str(exc)))

    loaded: dict[str, Any] = {}
    for key, m in spec.models.items():
        try:
            if key in used_models:
                loaded[key] = models.get(key)
                continue
            if m.path is not None:
                check_model_file(Path(m.path))
            if m.keras_app and m.weights not in ("imagenet", "none"):
                check_weights_file(Path(m.weights))
            if isinstance(m.class_names, str) and not Path(m.class_names).is_file():
                fix = "fix `class_names:` (relative to the spec file)"
                raise ModelFileError("class_names", f"{m.class_names} does not exist; {fix}")
        except ModelFileError as exc:
            found.append((("models", key, exc.field), str(exc)))

    found += _check_selections(spec, loaded)
    if found:
        problems = [f"{locate(spec, path)}: {_dotted(path)}: {message}" for path, message in found]
        raise SpecError(sorted(dict.fromkeys(problems), key=_position))
