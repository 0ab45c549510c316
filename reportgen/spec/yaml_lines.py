"""Parse YAML while remembering where every value came from, so errors can say file:line:col.

A spec is a small hand-written file, so the reader refuses what no hand-written spec needs and what
would otherwise exhaust memory or the stack: files over MAX_SPEC_BYTES, nesting deeper than MAX_DEPTH,
and more than MAX_NODES values. The last one counts every value each time it is reached, also through
an alias: PyYAML composes `*name` as a shared node (a 1 KB "billion laughs" file is a few hundred
nodes), but turning the shared nodes into plain Python objects with positions copies each use, so nine
levels of nine aliases would become 387 million values (tens of GiB).
"""

from __future__ import annotations

from typing import Any

import yaml

from reportgen.errors import echo

Path_ = tuple[Any, ...]

MAX_SPEC_BYTES = 2 * 2**20  # a spec is written by hand: a few KiB; this is room for long observations
MAX_DEPTH = 64  # a spec nests about 5 levels; PyYAML's composer recurses and hits Python's limit at ~1000
MAX_NODES = 50_000  # a spec holds hundreds of values (a long `classes:` list a thousand); aliases count


class SpecTextError(Exception):
    """A spec that cannot be read as YAML text, at 1-based (line, col): the message says what to do."""

    def __init__(self, line: int, col: int, message: str):
        super().__init__(message)
        self.line, self.col, self.message = line, col, message


class Located:
    """Parsed YAML data plus a map from each value's path (keys / indices) to its (line, col), 1-based."""

    def __init__(
        self, data: Any, marks: dict[Path_, tuple[int, int]], key_marks: dict[Path_, tuple[int, int]]
    ):
        self.data = data
        self.marks = marks
        self.key_marks = key_marks

    def where(self, path: Path_) -> tuple[int, int]:
        """Closest known position for path: the value itself, else its key, else the nearest parent."""
        path = tuple(path)
        while True:
            if path in self.key_marks:
                return self.key_marks[path]
            if path in self.marks:
                return self.marks[path]
            if not path:
                return (1, 1)
            path = path[:-1]


def decode(data: bytes) -> str:
    """The spec's bytes as text: UTF-8 (a BOM is allowed), else a SpecTextError at the first bad byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SpecTextError(1, 1, "the spec is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecTextError(
            line,
            col,
            f"the spec is not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8"
            " (a spec is a YAML text file, is this the right file?)",
        ) from None


def _at(mark: yaml.Mark | None) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark else (1, 1)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer stops at MAX_DEPTH levels and MAX_NODES distinct nodes, before the
    recursion or the node objects (~600 bytes each) can exhaust the stack or memory."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if not self.check_event(yaml.AliasEvent):
            self.nodes += 1
            if self.depth >= MAX_DEPTH or self.nodes > MAX_NODES:
                line, col = _at(self.peek_event().start_mark)
                raise SpecTextError(line, col, _too_deep() if self.depth >= MAX_DEPTH else _too_many())
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _too_deep() -> str:
    return f"values nested more than {MAX_DEPTH} levels deep; a spec needs a few levels, flatten it"


def _too_many() -> str:
    return (
        f"the spec holds more than {MAX_NODES} values (a value reached through an alias `*name` counts "
        "each time); write out only what the report needs"
    )


def parse(text: str) -> Located:
    """Compose the YAML node tree (keeps marks) and convert it to plain Python objects.

    Raises SpecTextError for text that is not a YAML document within the limits above."""
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # the reader checks the whole text for control characters here
        return _build(loader, loader.get_single_node())
    except yaml.MarkedYAMLError as exc:
        line, col = _at(exc.problem_mark)
        raise SpecTextError(line, col, f"invalid YAML: {exc.problem}") from None
    except yaml.reader.ReaderError as exc:  # a control character: binary data, or a NUL in the text
        before = text[: exc.position]
        line, col = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        raise SpecTextError(
            line,
            col,
            f"the spec contains the control character U+{exc.character:04X}; a spec is YAML text"
            " (is this the right file?)",
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _build(loader: _BoundedLoader, node: yaml.Node | None) -> Located:
    marks: dict[Path_, tuple[int, int]] = {}
    key_marks: dict[Path_, tuple[int, int]] = {}
    if node is None:  # an empty file, or only comments
        return Located(None, marks, key_marks)
    visited = 0

    def scalar(n: yaml.Node) -> Any:
        try:
            return loader.construct_object(n, deep=True)
        except (ValueError, TypeError, OverflowError):  # e.g. `2020-13-45`, `!!int abc`, 5000 digits
            kind = str(n.tag).rsplit(":", 1)[-1]
            line, col = _at(n.start_mark)
            raise SpecTextError(
                line, col, f"cannot read {echo(n.value)} as a YAML {kind}; quote it to make it text"
            ) from None

    def build(n: yaml.Node, path: Path_) -> Any:
        nonlocal visited
        visited += 1
        marks[path] = _at(n.start_mark)
        if visited > MAX_NODES:
            raise SpecTextError(*marks[path], _too_many())
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k, v in n.value:
                here = _at(k.start_mark)
                if k.tag == "tag:yaml.org,2002:merge":
                    raise SpecTextError(*here, "merge keys (`<<`) are not supported; write the keys out")
                if not isinstance(k, yaml.ScalarNode):
                    raise SpecTextError(*here, "a key must be a plain name or number, not a list or mapping")
                key = scalar(k)
                if key in out:  # PyYAML keeps the last silently: an edit would be lost without a word
                    first = key_marks[path + (key,)][0]
                    raise SpecTextError(
                        *here, f"invalid YAML: duplicate key {echo(key)} (first at line {first}); keep one"
                    )
                key_marks[path + (key,)] = here
                out[key] = build(v, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v, path + (i,)) for i, v in enumerate(n.value)]
        return scalar(n)

    return Located(build(node, ()), marks, key_marks)
