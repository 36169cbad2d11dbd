"""YAML reading that keeps the line of every key and refuses duplicate keys.

PyYAML keeps the last of two duplicate keys without a word; a profile is configuration
for firmware, so a duplicate is an error here, reported with both lines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A key path: ("slots", 2, "eid").
KeyPath = tuple[str | int, ...]


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


@dataclass
class Located:
    """A loaded YAML document: plain data plus the source line of every key and item."""

    file: str
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)


class YamlError(Exception):
    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")


def load_yaml(path: Path, display: str) -> Located:
    try:
        text = path.read_text()
    except OSError as e:
        raise YamlError(display, 0, f"cannot read: {e.strerror}") from e
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        doc = Located(display, None)
        doc.data = _construct(loader, node, (), doc) if node is not None else {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise YamlError(display, line, f"YAML syntax: {e.problem or e.context}") from e
    finally:
        loader.dispose()
    return doc


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, doc: Located) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise YamlError(doc.file, line, f"{format_path(path)}: key {key!r} is not a string")
            if key in out:
                first = doc.lines[(*path, key)]
                raise YamlError(doc.file, line,
                                f"{format_path((*path, key))}: duplicate key (first set on line {first})")
            doc.lines[(*path, key)] = line
            out[key] = _construct(loader, value_node, (*path, key), doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            doc.lines[(*path, i)] = item.start_mark.line + 1
            items.append(_construct(loader, item, (*path, i), doc))
        return items
    return loader.construct_object(node, deep=True)
