"""Publishing a report folder: one run per output at a time, an atomic swap, and only ever over a folder
reportgen made.

The swap replaces the whole output folder, so whatever was in it is deleted. That is right for a report
reportgen wrote and wrong for anything else (`output: .` once deleted the spec, the model and the data).
So every published folder carries a marker file, and a folder is only swapped out when losing it loses
nothing of the user's (`safe_to_replace`): validation refuses any other `output:` before the compute,
and `publish` checks again right before the swap, because the folder may have changed meanwhile.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reportgen import __version__
from reportgen.errors import ReportgenError, SpecError

MARKER = ".reportgen-report"
# What a report folder published before the marker existed holds, and nothing else.
LEGACY_ENTRIES = frozenset({"manifest.json", "report.html", "report.pdf", "report.css", "assets"})


class LockedError(ReportgenError):
    """Another run of the same spec output is in progress."""


def is_legacy_report(folder: Path) -> bool:
    """A report published before reportgen marked its folders: accepted so that upgrading does not make
    every nightly job fail once. It must hold only what reportgen writes (manifest.json, report.html,
    report.pdf, report.css, assets/) and a manifest that names a reportgen version: a user's folder that
    merely has a `manifest.json` of its own, or any file beside those, does not pass, so the swap cannot
    delete a file reportgen did not write. Its assets/ holds only the sections' folders (`s1-title`)."""
    try:
        names = {p.name for p in folder.iterdir()}
        assets = list((folder / "assets").iterdir()) if "assets" in names else []
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        names <= LEGACY_ENTRIES
        and bool(names & {"report.html", "report.pdf"})
        and all(p.is_dir() and not p.is_symlink() and re.fullmatch(r"s\d+-[a-z0-9-]+", p.name)
                for p in assets)
        and isinstance(manifest, dict)
        and isinstance(manifest.get("versions"), dict)
        and "reportgen" in manifest["versions"]
    )


def safe_to_replace(folder: Path) -> bool:
    """Whether swapping out `folder` loses nothing of the user's: it is absent, an empty folder, a folder
    reportgen marked when it published it, or a legacy report (`is_legacy_report`). A symbolic link is
    never replaced: the swap would move the link and leave its target behind."""
    if folder.is_symlink():
        return False
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    try:
        empty = next(folder.iterdir(), None) is None
    except OSError:
        return False
    return empty or (folder / MARKER).is_file() or is_legacy_report(folder)


@contextmanager
def run_lock(output: Path) -> Iterator[None]:
    """One run per output folder at a time: a second concurrent run is refused, not queued."""
    path = output.parent / f".{output.name}.lock"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # closed by the `with` below, after the lock's whole lifetime
    except OSError as exc:
        raise ReportgenError(_unwritable(exc, path)) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise LockedError(
                f"another reportgen run is writing {output} (pid {holder}); wait for it to finish "
                f"or stop it (lock file {path})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unwritable(exc: OSError, path: Path) -> str:
    """One line for a folder beside the output that cannot be created: an environment problem (exit 1).
    It names the folder the user must make writable: the nearest one that exists."""
    failed = Path(exc.filename) if exc.filename else path
    existing = next((p for p in failed.parents if p.is_dir()), failed.parent)
    return (
        f"cannot create {failed}: {exc.strerror or exc}; make {existing} writable for this user (or free "
        "space there), or choose another `output:` in the spec"
    )


def new_staging(output: Path) -> Path:
    """The folder this run builds its report in, beside the output (the swap is a rename, so it must be on
    the same file system)."""
    staging = output.parent / f".{output.name}.staging-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise ReportgenError(_unwritable(exc, staging)) from None
    return staging


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish(staging: Path, output: Path, *, where: str) -> None:
    """Mark the staging folder as a report and replace the output folder with it; readers see the old or
    the new report. `where` (`file:line:col` of the spec's `output:`) locates the refusal when the output
    folder changed since validation into one that is not safe to replace: then nothing is swapped."""
    if not safe_to_replace(output):
        raise SpecError(
            [
                f"{where}: output: {output} now holds files reportgen did not write (it changed during "
                "the run); the new report was not published (its results are stored): move those files "
                "away or choose another folder, and run again"
            ]
        )
    (staging / MARKER).write_text(json.dumps({"reportgen": __version__}) + "\n", encoding="utf-8")
    if output.exists() and _exchange(staging, output):
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.rename(output, old)
    os.rename(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(output: Path) -> None:
    """Staging folders left by killed runs (we hold the lock, so none is live)."""
    for stale in output.parent.glob(f".{output.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in output.parent.glob(f".{output.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
