"""Content-addressed result store: every result lives under the hash of everything that determines it.

A rerun asks the store before computing; a key that did not change is a hit. Writes go to a temporary
file in the same folder and are renamed into place, so a killed run never leaves a half-written result
and resumes from whatever was complete.

Runs of different specs may share a store (`cache:`). A run claims a key (`Store.claim`) before it
computes it, so a second run that needs the same result waits for the first and then reads it instead
of computing it again. Claims are `flock` locks on `root/ab/<key>.claim`: the kernel releases them
when their process dies, even by `kill -9`, so a crashed run never blocks the next one (a lock *file*
created with O_EXCL would stay behind and need a stale-lock heuristic). flock also works on NFS (Linux
emulates it with POSIX locks there), the shared folder of a Dask cluster.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from reportgen.errors import ReportgenError


def content_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of parts (dict keys sorted; tuples as lists)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


log = logging.getLogger("reportgen")


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file renamed into place. A full disk is reported with the file's path:
    a failing `write` raises an OSError without a filename, and the one-line error should name it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    """Results under root/ab/<key>.<ext>. `used`: the result files this process found or wrote, so a run
    can note which results its report stands on (`reportgen.unchanged`: deleting one forces a rebuild)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.used: set[Path] = set()

    def path(self, key: str, ext: str) -> Path:
        return self.root / key[:2] / f"{key}.{ext}"

    def _found(self, path: Path) -> bool:
        if path.exists():
            self.used.add(path)
            return True
        return False

    def has(self, key: str, ext: str) -> bool:
        return self._found(self.path(key, ext))

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold the right to compute `key` until the block ends; another process asking for the same key
        waits here meanwhile. Check `has` again inside the block: the previous holder may have stored it.

        The claim file is removed on release. A waiter may then hold a lock on the removed file while a
        newcomer locks a new one, so after locking, a claim counts only if the path still names the file
        that was locked (the usual flock + unlink protocol); otherwise it retries."""
        path = self.path(key, "claim")
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for another run that is computing result %s", key[:12])
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                if current is not None and current.st_ino == os.fstat(fd).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)  # closing releases the lock

    @contextmanager
    def claim_all(self, keys: Iterable[str]) -> Iterator[None]:
        """Claim several keys (a chunk of a pass). Always in sorted order, so two runs whose chunks
        overlap cannot each hold a key the other waits for."""
        with ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.enter_context(self.claim(key))
            yield

    def put_bytes(self, key: str, ext: str, data: bytes) -> Path:
        path = self.path(key, ext)
        atomic_write(path, data)
        self.used.add(path)
        return path

    def put_json(self, key: str, obj: Any) -> Path:
        return self.put_bytes(key, "json", json.dumps(obj, sort_keys=True, indent=1).encode())

    def get_json(self, key: str) -> Any | None:
        path = self.path(key, "json")
        if not self._found(path):
            return None
        return json.loads(path.read_text())

    def put_npy(self, key: str, array: np.ndarray) -> Path:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return self.put_bytes(key, "npy", buf.getvalue())

    def get_npy(self, key: str) -> np.ndarray | None:
        path = self.path(key, "npy")
        if not self._found(path):
            return None
        return np.load(path, allow_pickle=False)

    def put_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> Path:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return self.put_bytes(key, "npz", buf.getvalue())

    def get_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(key, "npz")
        if not self._found(path):
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def put_png(self, key: str, image: np.ndarray) -> Path:
        from reportgen.imaging import png_bytes

        return self.put_bytes(key, "png", png_bytes(image))


def store_root(spec: Any) -> Path:
    """The result store's folder of a spec (`reportgen.spec.Spec`): its `cache:`, or .reportgen-cache
    beside the output."""
    output = Path(spec.output)
    cache = Path(spec.cache) if spec.cache else output.parent / ".reportgen-cache"
    return cache / "results"


def create_store_root(spec: Any) -> None:
    """Create the result store's folder before any compute, so that an unwritable `cache:` is one line
    (exit 1) now rather than a traceback after the first pass."""
    root = store_root(spec)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportgenError(
            f"cannot create the result store {exc.filename or root}: {exc.strerror or exc}; make that "
            "folder writable for this user (or free space there), or set `cache:` to another folder"
        ) from None
