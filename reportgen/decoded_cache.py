"""Opt-in cache of a dataset's decoded, resized model-input pixels (`decoded_cache: true`).

Why: on a CPU box, decoding and resizing JPEGs competes with the convolutions for the same cores, and a
nightly report over a big, unchanged folder with a new checkpoint would decode the same images again
every night. The first streamed pass at a given input size writes each image's pixels, rounded to
uint8, as one fixed-size row of a flat file; later passes (any model with that input size and channel
count) read the rows back instead of decoding.

Layout, under the store's cache folder (`<cache>/decoded/`):

    <key>.u8     N rows of H*W*C bytes, row i = the dataset's i-th image (rows of unreadable files stay 0)
    <key>.json   the index: the key's inputs, the row size, the dataset's names in row order, and the
                 names that could not be decoded (the stream skips them, as decoding would)
    <key>.<a>-<b>.u8 / .json   a part: rows a..b-1 only, written by a shard of a pass (below)

A dataset pass runs in shards of file ranges (`reportgen.plan.shard_ranges`: above 1024 images, and one
per worker on a parallel backend), each streaming only its own range. A stream over a contiguous range of
the dataset's rows builds the part of the cache for that range; a stream over the whole dataset builds
the whole `<key>.u8`. A reader takes each row from any committed part (or the whole file) that holds it,
so the shards of a first night, here or on cluster workers sharing the store's folder, build the cache
together, and any later pass over any selection reads it. Every part has its own files, written by one
writer under a temporary name unique to its host and process and renamed into place: writers never share
a file, so concurrent shards (other processes, other machines on a shared filesystem) are safe, and two
writers of the same range (two runs) write the same bytes, the last rename winning.

The key hashes the dataset digest (every file's name, size, mtime and label), the input size, the
channel count and the resize method, so a changed, added or removed file gives a new key, never stale
pixels; the new cache then replaces the one of the folder's earlier state. Both files are written under
temporary names and renamed, data first and index last: the index is the commit mark, so a run killed
mid-build leaves no cache that a later run would read (its temporary file is removed by the next
build). Writing is best effort: a full disk or an unwritable folder costs one warning and the pass goes
on decoding.

Rows are read with plain `pread`s into one batch buffer, not through `np.memmap`: pages of a mapped
file count towards the process's resident memory as they are touched, so a pass over a 10 GB cache
would look like (and, under memory pressure, behave like) a 10 GB process. Memory stays O(batch).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reportgen.errors import ReportgenError
from reportgen.progress import log

FORMAT = "1"
# The stream's resize (tf.image.resize, bilinear with antialiasing): part of the key, because another
# method gives other pixels for the same file and size.
RESIZE_METHOD = "bilinear-antialias"
# Room left free beside a new cache: filling the disk would break the store's own atomic writes.
FREE_MARGIN = 256 * 2**20


@dataclass(frozen=True, eq=False)
class DecodedSource:
    """Where an opted-in dataset keeps decoded pixels; every item of the dataset carries the same one,
    so any stream over its items (a whole pass, a shard, a few chosen images) finds the cache."""

    folder: Path  # <cache>/decoded
    digest: str  # the dataset's digest: changes with any file
    names: tuple[str, ...]  # the dataset's item names; row i holds names[i]
    # The dataset's folder and selection settings, without its files: the caches an earlier state of
    # the same folder left are replaced by a new build (a nightly folder that grows must not fill the disk)
    lineage: str = ""
    span: tuple[int, int] | None = None  # a writer's rows [start, stop) (`part`); None: every row

    @functools.cached_property
    def rows(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @property
    def start_stop(self) -> tuple[int, int]:
        return self.span or (0, len(self.names))

    def key(self, size: tuple[int, int], channels: int) -> str:
        parts = [FORMAT, self.digest, int(size[0]), int(size[1]), int(channels), RESIZE_METHOD]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]

    def paths(self, size: tuple[int, int], channels: int) -> tuple[Path, Path]:
        """(data file, index file) of this source's rows at this input size: the whole cache, or a part."""
        key = self.key(size, channels)
        start, stop = self.start_stop
        stem = key if (start, stop) == (0, len(self.names)) else f"{key}.{start}-{stop}"
        return self.folder / f"{stem}.u8", self.folder / f"{stem}.json"

    def part(self, names: Sequence[str]) -> DecodedSource | None:
        """The source a stream over `names` may build: the whole cache when they are every row in order,
        a part when they are a contiguous range of rows in order (a shard of a pass), else None (rows a
        selection leaves out would look decoded)."""
        if not names or names[0] not in self.rows:
            return None
        start = self.rows[names[0]]
        stop = start + len(names)
        if tuple(names) != self.names[start:stop]:
            return None
        if (start, stop) == (0, len(self.names)):
            return self
        return dataclasses.replace(self, span=(start, stop))


def _row_bytes(size: tuple[int, int], channels: int) -> int:
    return int(size[0]) * int(size[1]) * int(channels)


@dataclass(frozen=True)
class CachePart:
    """A committed file of the cache: rows [start, stop) of the dataset."""

    start: int
    stop: int
    data: Path
    unreadable: frozenset[str]


class CacheReader:
    """The committed parts of a cache (or its whole file): batches of uint8 rows by item name, each row
    read with `pread` from a part that holds it into one batch buffer."""

    def __init__(self, source: DecodedSource, size: tuple[int, int], channels: int, parts: list[CachePart]):
        self.source, self.size, self.channels = source, size, channels
        self.parts = sorted(parts, key=lambda p: (p.start, -p.stop))
        self.starts = [p.start for p in self.parts]
        self.unreadable = set().union(*(p.unreadable for p in self.parts))
        self.row_bytes = _row_bytes(size, channels)

    @classmethod
    def open(cls, source: DecodedSource, size: tuple[int, int], channels: int) -> CacheReader | None:
        """The committed parts of the cache for this input size, or None when there are none. Files that
        do not match their index (e.g. a data file left by a build killed between its two renames, whose
        index is the old one or absent) are left out."""
        key = source.key(size, channels)
        row_bytes = _row_bytes(size, channels)
        parts = []
        for index in source.folder.glob(f"{key}*.json"):
            try:
                meta = json.loads(index.read_text(encoding="utf-8"))
                data = index.with_suffix(".u8")
                length = data.stat().st_size
            except (OSError, ValueError):
                continue
            start, stop = meta.get("start", 0), meta.get("stop", meta.get("rows"))
            if (
                meta.get("format") != FORMAT
                or meta.get("key") != key
                or meta.get("rows") != len(source.names)
                or not isinstance(start, int)
                or not isinstance(stop, int)
                or not 0 <= start < stop <= len(source.names)
                or length != (stop - start) * row_bytes
            ):
                continue
            parts.append(CachePart(start, stop, data, frozenset(meta.get("unreadable", []))))
        return cls(source, size, channels, parts) if parts else None

    def _part(self, row: int) -> CachePart | None:
        """A part that holds the row (the one starting last at or before it, widest first), or None."""
        at = bisect.bisect_right(self.starts, row)
        for part in reversed(self.parts[:at]):
            if part.stop > row:
                return part
        return None

    def has(self, names: Sequence[str]) -> bool:
        rows = self.source.rows
        return all(n in rows and self._part(rows[n]) is not None for n in names)

    def batches(self, names: Sequence[str], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(uint8 (B, H, W, C), positions in `names` (B,) int32) in order; names recorded as unreadable
        never arrive, as a failed decode never does."""
        keep = [i for i, n in enumerate(names) if n not in self.unreadable]
        shape = (batch_size, *self.size, self.channels)
        buf = np.empty(shape, np.uint8)
        files: dict[Path, Any] = {}
        try:
            for start in range(0, len(keep), batch_size):
                chunk = keep[start:start + batch_size]
                for j, i in enumerate(chunk):
                    row = self.source.rows[names[i]]
                    part = self._part(row)
                    assert part is not None  # `has` checked every name
                    if part.data not in files:
                        files[part.data] = open(part.data, "rb", buffering=0)  # noqa: SIM115
                    offset = (row - part.start) * self.row_bytes
                    got = os.preadv(files[part.data].fileno(), [memoryview(buf[j]).cast("B")], offset)
                    if got != self.row_bytes:
                        raise ReportgenError(
                            f"decoded-image cache {part.data} is shorter than its index says; delete it "
                            "(the next pass decodes again and rebuilds it)"
                        )
                yield buf[: len(chunk)].copy(), np.asarray(chunk, np.int32)
        finally:
            for f in files.values():
                f.close()


class CacheWriter:
    """Builds the cache during a full pass: rows written as batches arrive, committed by two renames.

    Every method swallows OSError after one warning (`active` turns False): the cache only saves time."""

    def __init__(self, source: DecodedSource, size: tuple[int, int], channels: int):
        self.source, self.size, self.channels = source, size, channels
        self.start, self.stop = source.start_stop  # the rows this writer holds (a part, or all)
        self.row_bytes = _row_bytes(size, channels)
        self.data, self.index = source.paths(size, channels)
        self.tmp = self.data.with_name(f".{self.data.name}.tmp-{_writer_tag()}")
        self.written: set[int] = set()
        self.fd: int | None = None
        need = (self.stop - self.start) * self.row_bytes
        try:
            source.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            free = shutil.disk_usage(source.folder).free
            if free < need + FREE_MARGIN:
                log.warning(
                    "decoded-image cache not built: it needs %.1f GB and %s has %.1f GB free; free space "
                    "there or set `decoded_cache: false`", need / 1e9, source.folder, free / 1e9)
                return
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self.fd, need)
        except OSError as exc:
            self._fail(exc)

    @property
    def active(self) -> bool:
        return self.fd is not None

    def _remove_stale(self) -> None:
        """Temporary files of this cache's builds (any part) whose process on this host is gone (killed
        runs): they are never read. A temporary file of another host is left alone: its process may be
        writing it (a cluster worker on a shared filesystem)."""
        key = self.source.key(self.size, self.channels)
        for tmp in self.source.folder.glob(f".{key}.*.tmp-*"):
            pid, _, rest = tmp.name.rsplit(".tmp-", 1)[-1].partition("-")
            host = rest.partition("-")[2]  # "<pid>-<token>-<host>"; "<pid>" alone from older builds
            if host in ("", socket.gethostname()) and pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def _fail(self, exc: OSError) -> None:
        log.warning("decoded-image cache not built (%s: %s); the pass goes on decoding",
                    exc.filename or self.source.folder, exc.strerror or exc)
        self.abort()

    def write(self, pixels: np.ndarray, positions: np.ndarray, names: Sequence[str]) -> None:
        """Rows of one batch: pixels uint8 (B, H, W, C), positions into `names` (the stream's items)."""
        if self.fd is None:
            return
        try:
            for row_pixels, i in zip(pixels, positions, strict=True):
                row = self.source.rows[names[int(i)]]
                offset = (row - self.start) * self.row_bytes
                os.pwrite(self.fd, np.ascontiguousarray(row_pixels).tobytes(), offset)
                self.written.add(row)
        except OSError as exc:
            self._fail(exc)

    def commit(self) -> bool:
        """Rename the finished data file into place, then write the index (the commit mark)."""
        if self.fd is None:
            return False
        mine = enumerate(self.source.names[self.start : self.stop], self.start)
        unreadable = [n for i, n in mine if i not in self.written]
        meta = {
            "format": FORMAT,
            "key": self.source.key(self.size, self.channels),
            "lineage": self.source.lineage,
            "digest": self.source.digest,
            "size": list(self.size),
            "channels": self.channels,
            "method": RESIZE_METHOD,
            "rows": len(self.source.names),
            "start": self.start,
            "stop": self.stop,
            "row_bytes": self.row_bytes,
            "names": list(self.source.names),
            "unreadable": unreadable,
        }
        index_tmp = self.index.with_name(f".{self.index.name}.tmp-{_writer_tag()}")
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp, self.data)
            index_tmp.write_text(json.dumps(meta), encoding="utf-8")
            os.replace(index_tmp, self.index)
        except OSError as exc:
            index_tmp.unlink(missing_ok=True)
            self._fail(exc)
            return False
        self._remove_superseded()
        return True

    def _remove_superseded(self) -> None:
        """Caches (every part) of the same folder and settings at this input size whose files have changed
        since: their key can never come back unless every file does. Index first (it uncommits), then data;
        a pass still reading one keeps its open file. The other parts of this cache stay."""
        if not self.source.lineage:
            return
        key = self.source.key(self.size, self.channels)
        for index in self.source.folder.glob("*.json"):
            if index == self.index:
                continue
            try:
                meta = json.loads(index.read_text(encoding="utf-8"))
                same = (meta.get("lineage"), meta.get("size"), meta.get("channels")) == (
                    self.source.lineage, list(self.size), self.channels
                )
                if same and meta.get("key") != key:
                    index.unlink(missing_ok=True)
                    index.with_suffix(".u8").unlink(missing_ok=True)
            except (OSError, ValueError):
                continue

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


def _writer_tag() -> str:
    """What makes a temporary file's name unique to its writer: process, a random token (two writers in
    one process) and host (cluster workers on several machines share the folder; process ids repeat
    across machines, so only this host's dead processes' files are stale)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}-{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def source_of(items: Sequence[Any]) -> DecodedSource | None:
    """The decoded-image cache all these items share (None when any item has none or they differ)."""
    first = getattr(items[0], "decoded", None) if items else None
    if first is None or any(getattr(it, "decoded", None) is not first for it in items):
        return None
    return first
