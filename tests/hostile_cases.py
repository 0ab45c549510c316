"""Building blocks for tests/test_hostile_inputs.py: a user's project on disk, hostile files crafted
cheaply, a byte-for-byte snapshot of a folder tree, and the CLI run in a measuring wrapper process.

Why a wrapper process: `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` of a fresh interpreter whose only
child is `reportgen` is that run's peak resident memory, so a bomb case can assert on what it really
used; an address-space limit alone can be slipped past by TensorFlow's failed allocations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30

# The wrapper: runs argv[2:] with an optional address-space cap (argv[1], bytes; 0 = none) and a wall
# limit, and prints exit code, output and the child's peak RSS as JSON. On timeout subprocess.run kills
# the child itself, so a runaway case never outlives the test.
_WRAPPER = """
import json, resource, subprocess, sys
cap, timeout, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
def limit():
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    r = subprocess.run(argv, capture_output=True, timeout=timeout, preexec_fn=limit)
    rc, out, err = r.returncode, r.stdout, r.stderr
except subprocess.TimeoutExpired as exc:
    rc, out, err = "timeout", exc.stdout or b"", exc.stderr or b""
print(json.dumps({"rc": rc, "out": out.decode("utf-8", "replace"), "err": err.decode("utf-8", "replace"),
                  "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


@dataclass(frozen=True)
class Outcome:
    """What a user sees of one CLI call, plus the peak resident memory (bytes) it needed."""

    rc: int | str
    stdout: str
    stderr: str
    maxrss: int

    @property
    def err_lines(self) -> list[str]:
        return self.stderr.splitlines()


def cli(
    *args: object, cwd: Path, env: dict[str, str], timeout: float, as_cap: int = 0
) -> Outcome:
    """`python -m reportgen ARGS` (as tests/conftest.py's run_cli) inside the measuring wrapper."""
    argv = [sys.executable, "-m", "reportgen", *map(str, args)]
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(as_cap), str(timeout), *argv],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout + 60,
    )
    assert proc.returncode == 0, f"measuring wrapper failed: {proc.stderr[-2000:]}"
    data = json.loads(proc.stdout)
    return Outcome(data["rc"], data["out"], data["err"], data["maxrss"])


# -- snapshots ---------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root -> what it is: 'dir', 'link:TARGET' (not followed) or the file's sha256."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[rel] = h.hexdigest()
    return out


def changed_entries(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Pre-existing entries that are gone or differ (new entries, e.g. a report, are allowed)."""
    return [
        f"{rel}: {'deleted' if rel not in after else 'changed'}"
        for rel, what in sorted(before.items())
        if after.get(rel) != what
    ]


# -- hostile files -----------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int = 20000) -> None:
    """A valid side x side 8-bit gray PNG of zeros, compressed row block by row block: ~400 KB on disk,
    side**2 pixels once decoded, built without ever holding the pixels in memory."""
    row = b"\x00" * (side + 1)  # filter byte 0 + one zero byte per pixel
    block_rows = 256
    comp = zlib.compressobj(9)
    parts = []
    for start in range(0, side, block_rows):
        parts.append(comp.compress(row * min(block_rows, side - start)))
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs': each level lists the previous one `width` times; about 1 KB of YAML that
    expands to width**levels strings."""
    lines = ["title: laughs", "output: ../out/report"]
    lines.append('l0: &l0 [' + ", ".join(['"lol"'] * width) + "]")
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# -- locating fields in a spec text -------------------------------------------------------------------


def field_line(text: str, field: str) -> int:
    """1-based line of a dotted field (`sections[1].limit`, `datasets.photos.path`) in a block-style
    spec: each key is searched after the line of its parent, `[n]` is the n-th `- ` item after it."""
    lines = text.splitlines()
    pos = 0
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", field):
        if part.startswith("["):
            items = [i for i in range(pos, len(lines)) if re.match(r"\s*- ", lines[i])]
            pos = items[int(part[1:-1])]
            continue
        key = re.compile(r"(^|[\s{,\-])" + re.escape(part) + r"\s*:")
        pos = next(i for i in range(pos, len(lines)) if key.search(lines[i]))
    return pos + 1
