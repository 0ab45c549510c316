"""The run history database (SQLite beside the result store): schema, migrations, writing a run in one
transaction and reading runs back. See `reportgen.history` for the schema."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reportgen.errors import ReportgenError
from reportgen.store import store_root

BUSY_TIMEOUT_S = 60.0  # a concurrent run's write lasts milliseconds; a long wait means a stuck process


def _v1(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE runs (run_id TEXT PRIMARY KEY, started TEXT NOT NULL, finished TEXT NOT NULL, "
        "spec_path TEXT NOT NULL, spec_sha TEXT NOT NULL, output TEXT NOT NULL, status TEXT NOT NULL, "
        "items INTEGER NOT NULL)"
    )
    db.execute("CREATE INDEX runs_by_spec ON runs (spec_path, finished)")
    db.execute(
        "CREATE TABLE models (run_id TEXT NOT NULL REFERENCES runs(run_id), key TEXT NOT NULL, "
        "digest TEXT NOT NULL, PRIMARY KEY (run_id, key))"
    )
    db.execute(
        "CREATE TABLE items (run_id TEXT NOT NULL REFERENCES runs(run_id), section_index INTEGER NOT NULL, "
        "section_id TEXT NOT NULL, section_type TEXT NOT NULL, item_key TEXT NOT NULL, image_digest TEXT, "
        "metrics TEXT NOT NULL, PRIMARY KEY (run_id, section_index, item_key))"
    )


# MIGRATIONS[i] takes the database from user_version i to i + 1. Append only; never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1]


@dataclass
class ItemRow:
    """One item of a run's section, ready for the `items` table."""

    section_index: int
    section_id: str
    section_type: str
    key: str
    metrics: dict[str, Any]
    image_digest: str | None = None


@dataclass
class RunRecord:
    """What one run appends: its times, spec, models (key -> weights digest) and items."""

    started: str
    finished: str
    spec_path: str
    spec_sha: str
    output: str
    models: dict[str, str] = field(default_factory=dict)
    items: list[ItemRow] = field(default_factory=list)
    status: str = "ok"


def history_path(spec: Any) -> Path:
    """The history database of a spec: beside its result store (`<cache>/results`), not inside it."""
    return store_root(spec).parent / "history.sqlite"


def item_rows(
    index: int, section_id: str, section_type: str, items: Iterable[Any], root: Path
) -> list[ItemRow]:
    """Rows of one section's `HistoryItem`s; a picture's digest is read from `root` / its path (the
    staging folder, before it is published). The path itself goes into the metrics as "picture": a later
    run finds the old picture in this run's output folder by it, without the store."""
    rows = []
    for item in items:
        digest = hashlib.sha256((root / item.image).read_bytes()).hexdigest() if item.image else None
        metrics = item.metrics | ({"picture": item.image} if item.image else {})
        rows.append(ItemRow(index, section_id, section_type, item.key, metrics, digest))
    return rows


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating and migrating where needed) the history at `path`. Autocommit mode: every write
    names its own transaction, so nothing is left half-done by an implicit one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA foreign_keys = ON")
        _migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to `len(MIGRATIONS)`. The version is read again inside the write transaction, so
    of two processes opening an old file at once, the second finds it already upgraded."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version, len(MIGRATIONS)):
            MIGRATIONS[step](db)
        db.execute(f"PRAGMA user_version = {max(version, len(MIGRATIONS))}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def new_run_id(started: str) -> str:
    """Sortable by start time (compact UTC), unique across concurrent runs (random suffix)."""
    compact = "".join(ch for ch in started[:19] if ch.isdigit())
    return f"{compact}-{uuid.uuid4().hex[:8]}"


def record_run(path: Path, record: RunRecord) -> str:
    """Append a run in one transaction and return its run id. Any failure is one line (exit 1): the report
    is already published, but a history without this run would mislead the next comparison."""
    run_id = new_run_id(record.started)
    try:
        db = connect(path)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, record.started, record.finished, record.spec_path, record.spec_sha,
                     record.output, record.status, len(record.items)),
                )  # fmt: skip
                models = [(run_id, key, digest) for key, digest in record.models.items()]
                db.executemany("INSERT INTO models VALUES (?, ?, ?)", models)
                db.executemany(
                    "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (run_id, r.section_index, r.section_id, r.section_type, r.key, r.image_digest,
                         json.dumps(r.metrics, sort_keys=True, default=_plain))
                        for r in record.items
                    ],
                )  # fmt: skip
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()
    except (sqlite3.Error, OSError) as exc:
        raise ReportgenError(
            f"the report was published but the run history {path} could not be written: {exc}; make that "
            "folder writable (or free space there), or move the damaged file away to start a new history"
        ) from None
    return run_id


def _plain(value: Any) -> Any:
    """numpy scalars (metrics come from arrays) as plain JSON numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def runs(path: Path, spec_path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The recorded runs, oldest first (those of one spec when `spec_path` is given)."""
    db = connect(path)
    try:
        db.row_factory = sqlite3.Row
        if spec_path is None:
            rows = db.execute("SELECT * FROM runs ORDER BY finished, run_id").fetchall()
        else:
            rows = db.execute(
                "SELECT * FROM runs WHERE spec_path = ? ORDER BY finished, run_id", (str(spec_path),)
            ).fetchall()
        return [dict(r) for r in rows]
    finally:
        db.close()


def run_items(path: Path, run_id: str) -> list[dict[str, Any]]:
    """The item rows of one run, metrics decoded, in section order."""
    db = connect(path)
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT * FROM items WHERE run_id = ? ORDER BY section_index, item_key", (run_id,)
        ).fetchall()
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]
    finally:
        db.close()


def previous_run(path: Path, spec_path: str) -> dict[str, Any] | None:
    """The last successful run of the spec at `spec_path` (absolute), or None (no history yet)."""
    if not path.exists():
        return None
    found = [r for r in runs(path, spec_path) if r["status"] == "ok"]
    return found[-1] if found else None
