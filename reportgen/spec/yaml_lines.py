"""Parse YAML while remembering where every value came from, so errors can say file:line:col."""

from __future__ import annotations

from typing import Any

import yaml

Path_ = tuple[Any, ...]


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


def parse(text: str, filename: str = "<spec>") -> Located:
    """Compose the YAML node tree (keeps marks) and convert it to plain Python objects."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    marks: dict[Path_, tuple[int, int]] = {}
    key_marks: dict[Path_, tuple[int, int]] = {}
    if node is None:
        return Located({}, marks, key_marks)
    constructor = yaml.SafeLoader(text)

    def build(n: yaml.Node, path: Path_) -> Any:
        marks[path] = (n.start_mark.line + 1, n.start_mark.column + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k, v in n.value:
                key = constructor.construct_object(k, deep=True)
                if key in out:  # PyYAML keeps the last silently: an edit would be lost without a word
                    first = key_marks[path + (key,)][0]
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first}); keep one", k.start_mark
                    )
                key_marks[path + (key,)] = (k.start_mark.line + 1, k.start_mark.column + 1)
                out[key] = build(v, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v, path + (i,)) for i, v in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    data = build(node, ())
    constructor.dispose()
    return Located(data, marks, key_marks)
