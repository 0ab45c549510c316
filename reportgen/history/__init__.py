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
         status TEXT,                 -- "ok" (published) or "failed" (took the lock, then failed; no items)
         items INTEGER)               -- the number of item rows of the run (a check on completeness)
    models(run_id TEXT, key TEXT, digest TEXT, PRIMARY KEY (run_id, key))  -- key: the spec's model key
    items(run_id TEXT, section_index INTEGER, section_id TEXT, section_type TEXT,
          item_key TEXT,              -- the item within its section, e.g. "model/layer/filter/recipe", or an
                                      -- image name
          image_digest TEXT,          -- sha256 of the item's picture (PNG bytes) where it has one, else NULL
          metrics TEXT,               -- JSON: the figures of the item (see below); "picture": the picture's
                                      -- path relative to the run's output folder (old | new thumbnails)
          PRIMARY KEY (run_id, section_index, item_key))

What an item holds is declared by its section type: `Analysis.history_items(result)` in the type's own
module (filters: activation, robustness, dead and the picture; class_ranking: the top images in rank order
and the peak class; predictions: top-1, its confidence and the top-k; occlusion: per image and mask the
probability before and after, the drop and the top-1 after; gradcam: per image and method the class, the
map's centre, region and concentration). Types without the hook record none.

Modules: `store` (the database), `changes` (the "What changed" report: baselines, per-type change
metrics, old | new thumbnails), `perceptual` (picture distances), `align` (units matched across
checkpoints), `trends` (figures over many runs).
"""

from reportgen.history.store import (
    MIGRATIONS,
    ItemRow,
    RunRecord,
    connect,
    history_path,
    item_rows,
    previous_run,
    record_run,
    run_items,
    runs,
)

__all__ = [
    "MIGRATIONS", "ItemRow", "RunRecord", "connect", "history_path", "item_rows", "previous_run",
    "record_run", "run_items", "runs",
]  # fmt: skip
