"""Run history: every successful run appends what it found to a SQLite database beside the result store,
so that later runs (and people) can ask what changed since the last night.

The file is `<cache>/history.sqlite`, next to `<cache>/results`: deleting the cached results (to free
space, or to force a recompute) keeps the history. It is written once per run, after the report was
published, in ONE transaction (`BEGIN IMMEDIATE` ... `COMMIT`): a run killed at any point leaves either
its whole run (run row, model rows, every item row) or nothing. The database is in WAL mode with a busy
timeout, so concurrent runs sharing a cache wait for each other's short write instead of failing.

Schema (version 1; `PRAGMA user_version` holds the version, `MIGRATIONS[i]` upgrades version i to i+1,
each in the transaction that sets the new version, so a new reportgen upgrades an old file in place and
two processes opening an old file upgrade it once):

    runs(run_id TEXT PRIMARY KEY,  -- "<started, compact UTC>-<8 hex>": sorts by time, unique
         started TEXT, finished TEXT,  -- ISO 8601 UTC
         spec_path TEXT,              -- absolute path of the spec
         spec_sha TEXT,               -- sha256 of the spec file's bytes
         output TEXT,                 -- the output folder the report was published to
         status TEXT,                 -- "ok" (only published runs are recorded)
         items INTEGER)               -- the number of item rows of the run (a check on completeness)
    models(run_id TEXT, key TEXT, digest TEXT, PRIMARY KEY (run_id, key))  -- key: the spec's model key
    items(run_id TEXT, section_index INTEGER, section_id TEXT, section_type TEXT,
          item_key TEXT,              -- the item within its section, e.g. "model/layer/filter/recipe", or an
                                      -- image name
          image_digest TEXT,          -- sha256 of the item's picture (PNG bytes) where it has one, else NULL
          metrics TEXT,               -- JSON: the figures of the item (see below)
          PRIMARY KEY (run_id, section_index, item_key))

What an item holds is declared by its section type: `Analysis.history_items(result)` in the type's own
module (filters: activation, robustness, dead and the picture; class_ranking: the top images in rank order
and the peak class; predictions: top-1, its confidence and the top-k; occlusion: per image and mask the
probability before and after, the drop and the top-1 after; gradcam: per image and method the class, the
map's centre, region and concentration). Types without the hook record none.
"""

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
    staging folder, before it is published)."""
    rows = []
    for item in items:
        digest = hashlib.sha256((root / item.image).read_bytes()).hexdigest() if item.image else None
        rows.append(ItemRow(index, section_id, section_type, item.key, item.metrics, digest))
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


IDENTITY = ("model", "layer", "filter", "image")  # the metrics that name an item in the manifest


def compare(
    baseline: str | None,
    old_items: list[dict[str, Any]],
    rows: list[ItemRow],
    sections: list[tuple[Any, ...]],
) -> dict[str, Any]:
    """The change report of this run's `rows` against `old_items` (a baseline run's `run_items`), in the
    manifest's "changes" form. `sections`: (section id, title, type, analysis) of this run; sections match
    by id (position and title), items by key; `analysis.item_change(old, new)` decides "changed" and says
    what changed. An item only in the baseline is "removed", one only in this run "new"."""
    out = []
    for sid, title, stype, analysis in sections:
        before = {i["item_key"]: i for i in old_items if (i["section_id"], i["section_type"]) == (sid, stype)}
        now = {r.key: {"image_digest": r.image_digest, "metrics": r.metrics} for r in rows
               if r.section_id == sid}
        counts = {"changed": 0, "unchanged": 0, "new": 0, "removed": 0}
        items = []
        for key in sorted(set(before) | set(now)):
            old, new = before.get(key), now.get(key)
            change = None
            if old is None:
                status = "new"
            elif new is None:
                status = "removed"
            else:
                change = analysis.item_change(old, new)
                status = "changed" if change else "unchanged"
            counts[status] += 1
            shown = (new or old or {})["metrics"]
            metrics = {"change": change} if change else {}
            metrics.update(old=old["metrics"] if old else None, new=new["metrics"] if new else None)
            items.append({k: shown[k] for k in IDENTITY if k in shown} | {"key": key, "status": status,
                                                                         "metrics": metrics})  # fmt: skip
        if items:
            out.append({"title": title, "type": stype, "counts": counts, "items": items})
    return {"baseline": baseline, "sections": out}


def baseline_changes(
    path: Path, spec_path: str, rows: list[ItemRow], sections: list[tuple[Any, ...]]
) -> dict[str, Any]:
    """`baseline: previous`: this run's items against the last successful run of the same spec (every
    item "new" and baseline None when there is none yet). Read before this run is recorded."""
    previous = previous_run(path, spec_path)
    old = run_items(path, previous["run_id"]) if previous else []
    return compare(previous["run_id"] if previous else None, old, rows, sections)
