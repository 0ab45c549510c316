"""Writing spec files in tests and reading back where the loader says a problem is (the file:line oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reportgen.errors import SpecError
from reportgen.spec.load import load_spec


def write(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    """The problem lines `load_spec` refuses the file with (the test fails if it loads)."""
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing needle (the oracle for file:line)."""
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def col_of(text: str, needle: str) -> int:
    """1-based column of needle on that line."""
    ln = text.splitlines()[line_of(text, needle) - 1]
    return ln.index(needle) + 1
