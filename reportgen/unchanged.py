"""An unchanged night costs almost nothing: decide before importing TensorFlow whether anything can differ.

A warm rerun computes nothing, yet it used to load every model (importing TensorFlow and Keras, ~2.3 s)
just to plan work that the store already held. Every result's content key is made of the inputs below,
so when none of them changed since the last published run, nothing in the sections can change either:

- reportgen's version and a digest of its own source files (an analysis' code may change any result);
- the versions of the libraries that change results or rendering (`reportgen.report.context.versions`);
- the spec file's path and bytes, and the command-line options that shape a run (jobs, backend, batch);
- each model's digest from its file's bytes (`reportgen.models.source_digest`, equal to the digest the
  store's keys use) and the bytes of a class-names file;
- each dataset's digest (names, sizes and mtimes of its files: the store's own key part).

After every full run that published, the runner writes a memo (`<cache>/results/reports/<spec id>.pickle`,
inside the result store, so deleting the store drops it): that fingerprint, the sections as the templates
saw them, the models' facts the report shows, the run-history items, the sha256 of every file the sections
wrote into the report folder, and the result files of the store the run read or wrote. The next run of the
spec computes the fingerprint first. The report is rebuilt from the memo only if the fingerprint is the
same, every result file listed is still in the store, and the report folder published last still holds
every file the sections wrote, byte for byte: the run copies those into its staging folder and does only
what depends on the time and the history (the "What changed" report against the last run, trends, HTML,
PDF, manifest, the history row). Anything else, including a spec with a keras.applications model (Keras
finds its weights file) or `baseline: {align: ...}` (it reads the models' activations), takes the full
path: the shortcut can only be skipped, never taken on a changed input it checks.

The memo is a pickle read with an unpickler that only builds the few plain types it holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reportgen.progress import log
from reportgen.store import atomic_write, store_root

MEMO_FOLDER = "reports"


@dataclass
class ModelFacts:
    """What the report shows of a loaded model (`report_context` reads these attributes)."""

    key: str
    description: str
    input_size: tuple[int, int]
    fixed_input: bool
    channels: int
    digest: str


@dataclass
class Memo:
    """What a full run leaves for the next run of the same spec to rebuild its report from."""

    fingerprint: str
    sections: list[dict[str, Any]]  # section entries as built (`section_entry`), before any run-level keys
    models: list[ModelFacts]
    sizes: dict[str, set[tuple[int, int]]]
    history: list[Any]  # reportgen.history.ItemRow
    files: dict[str, str]  # report-folder-relative path -> sha256 of what the sections wrote
    results: list[str]  # store-relative result files the run read or wrote
    computed: int  # results the run computed and reused: all reused on the next unchanged night
    reused: int
    plan: list[str] = field(default_factory=list)
    device: str = ""


def code_digest() -> str:
    """sha256 over reportgen's own source files (path and bytes), in a stable order."""
    import reportgen

    root = Path(reportgen.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(spec: Any, spec_path: Path, options: dict[str, Any], datasets: Any = None) -> str | None:
    """The digest of every input of the run's results (see the module docstring), without importing
    TensorFlow; None when a model's digest can only be known by loading it, or when an input cannot be
    read: the full run then reports that problem at its spec line. `datasets`: the run's
    `DatasetRegistry`, so that the folders are scanned once."""
    try:
        return _fingerprint(spec, spec_path, options, datasets)
    except Exception as exc:  # noqa: BLE001 - the full run's checks say what is wrong, located
        log.debug("inputs not fingerprinted (%s: %s): full run", type(exc).__name__, exc)
        return None


def _fingerprint(spec: Any, spec_path: Path, options: dict[str, Any], datasets: Any) -> str | None:
    from reportgen import __version__
    from reportgen.datasets import DatasetRegistry
    from reportgen.models import source_digest
    from reportgen.report.context import versions

    models = {}
    for key, model in spec.models.items():
        digest = source_digest(model)
        if digest is None:
            return None
        names = model.class_names
        if isinstance(names, str):
            names = hashlib.sha256(Path(names).read_bytes()).hexdigest()
        models[key] = [digest, names]
    registry = datasets or DatasetRegistry(spec)
    digests = {key: registry.get(key).digest for key in spec.datasets}
    parts = {
        "reportgen": [__version__, code_digest()],
        "versions": versions(),
        "spec": [str(spec_path.resolve()), hashlib.sha256(spec_path.read_bytes()).hexdigest()],
        "options": options,
        "models": models,
        "datasets": digests,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def memo_path(spec: Any, spec_path: Path) -> Path:
    name = hashlib.sha256(str(spec_path.resolve()).encode()).hexdigest()[:24]
    return store_root(spec) / MEMO_FOLDER / f"{name}.pickle"


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its folder-relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def save(spec: Any, spec_path: Path, memo: Memo) -> None:
    """Write the memo atomically; a failure only costs the next run its shortcut, so it is logged."""
    try:
        atomic_write(memo_path(spec, spec_path), pickle.dumps(memo, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError as exc:
        log.warning("could not keep the memo of this run for the next unchanged one: %s", exc)


_PLAIN = ("set", "frozenset", "tuple", "list", "dict", "int", "float", "str", "bool", "complex", "bytes")
_ALLOWED = {("builtins", name) for name in _PLAIN} | {
    ("reportgen.unchanged", "Memo"), ("reportgen.unchanged", "ModelFacts"),
    ("reportgen.analyses.base", "Artifact"), ("reportgen.history.store", "ItemRow"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}  # fmt: skip


class _Unpickler(pickle.Unpickler):
    """Builds only the types a memo holds: a memo can never run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a memo")
        return super().find_class(module, name)


def reusable(spec: Any, spec_path: Path, inputs: str, output: Path) -> Memo | None:
    """The memo of the last full run when this run's report can be rebuilt from it (module docstring),
    else None. `inputs`: this run's `fingerprint`. Reads files only; never imports TensorFlow."""
    path = memo_path(spec, spec_path)
    baseline = getattr(spec, "baseline", None)
    if not path.is_file() or getattr(baseline, "align", None) is not None:
        return None
    try:
        memo = _Unpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:  # noqa: BLE001 - a memo from another version or a damaged file: full run
        log.debug("the memo %s is not usable (%s): full run", path, exc)
        return None
    if not isinstance(memo, Memo) or memo.fingerprint != inputs:
        return None
    root = store_root(spec)
    if not all((root / r).is_file() for r in memo.results):
        log.debug("a result the last report stood on was deleted from the store: full run")
        return None
    for rel, digest in memo.files.items():
        published = output / rel
        if not published.is_file() or hashlib.sha256(published.read_bytes()).hexdigest() != digest:
            log.debug("the published report lacks or changed %s: full run", rel)
            return None
    return memo


def copy_files(memo: Memo, output: Path, staging: Path) -> None:
    """The sections' files of the published report into the staging folder (checked by `reusable`)."""
    for rel in memo.files:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output / rel, staging / rel)
