"""Content-addressed result store: every result lives under the hash of everything that determines it.

A rerun asks the store before computing; a key that did not change is a hit. Writes go to a temporary
file in the same folder and are renamed into place, so a killed run never leaves a half-written result
and resumes from whatever was complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def content_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of parts (dict keys sorted; tuples as lists)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    """Results under root/ab/<key>.<ext>."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str, ext: str) -> Path:
        return self.root / key[:2] / f"{key}.{ext}"

    def has(self, key: str, ext: str) -> bool:
        return self.path(key, ext).exists()

    def put_bytes(self, key: str, ext: str, data: bytes) -> Path:
        path = self.path(key, ext)
        atomic_write(path, data)
        return path

    def put_json(self, key: str, obj: Any) -> Path:
        return self.put_bytes(key, "json", json.dumps(obj, sort_keys=True, indent=1).encode())

    def get_json(self, key: str) -> Any | None:
        path = self.path(key, "json")
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def put_npy(self, key: str, array: np.ndarray) -> Path:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return self.put_bytes(key, "npy", buf.getvalue())

    def get_npy(self, key: str) -> np.ndarray | None:
        path = self.path(key, "npy")
        if not path.exists():
            return None
        return np.load(path, allow_pickle=False)

    def put_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> Path:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return self.put_bytes(key, "npz", buf.getvalue())

    def get_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(key, "npz")
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def put_png(self, key: str, image: np.ndarray) -> Path:
        from reportgen.imaging import png_bytes

        return self.put_bytes(key, "png", png_bytes(image))
