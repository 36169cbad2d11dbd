"""YAML reading that keeps the line of every key and refuses duplicate keys.

PyYAML keeps the last of two duplicate keys without a word; a profile is configuration
for firmware, so a duplicate is an error here, reported with both lines. So are bytes
YAML refuses (a NUL, text that is not UTF-8), and aliases that expand beyond
MAX_ALIASED_NODES nodes ("billion laughs"): each is one line, found before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A key path: ("slots", 2, "eid").
KeyPath = tuple[str | int, ...]
# Nodes a document may reach a second time through aliases: far more than a profile needs
# (an anchor names a list of packages or a slot, used a few times), far less than a bomb.
MAX_ALIASED_NODES = 1000


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
        raw = path.read_bytes()
    except OSError as e:
        raise YamlError(display, 0, f"cannot read: {e.strerror}") from e
    text = _text(raw, display)
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as e:
        raise _refused(text, display, e) from None
    try:
        node = loader.get_single_node()
        doc = Located(display, None)
        doc.data = _Builder(loader, doc).build(node, ()) if node is not None else {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise YamlError(display, line, f"YAML syntax: {e.problem or e.context}") from e
    except yaml.reader.ReaderError as e:
        raise _refused(text, display, e) from None
    finally:
        loader.dispose()
    return doc


def _refused(text: str, display: str, e: yaml.reader.ReaderError) -> YamlError:
    """A character YAML does not allow, e.g. a control character."""
    line = text.count("\n", 0, e.position) + 1
    return YamlError(display, line, f"character U+{e.character:04X} is not allowed in YAML")


def _text(raw: bytes, display: str) -> str:
    """RAW as text, or YamlError naming the line of the first byte that is not text."""
    if b"\0" in raw:
        at = raw.index(b"\0")
        raise YamlError(display, raw.count(b"\n", 0, at) + 1, "a NUL byte: a profile is UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise YamlError(display, line, f"byte 0x{raw[e.start]:02x} is not UTF-8: a profile is UTF-8 text") from None


class _Builder:
    """Plain data from a YAML node graph, with the line of every key and item."""

    def __init__(self, loader: yaml.SafeLoader, doc: Located) -> None:
        self.loader = loader
        self.doc = doc
        self.seen: set[int] = set()
        self.aliased = 0
        self.alias: KeyPath | None = None  # where the alias being expanded is used

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        if id(node) not in self.seen:
            self.seen.add(id(node))
            return self._build(node, path)
        outer = self.alias is None
        if outer:
            self.alias = path
        self.aliased += 1
        if self.aliased > MAX_ALIASED_NODES:
            where = self.alias or path
            keys = [n for n in range(len(where), 0, -1) if isinstance(where[n - 1], str)]
            line = self.doc.lines.get(where[:keys[0]], 0) if keys else 0
            raise YamlError(self.doc.file, line,
                            f"{format_path(where)}: aliases expand to more than {MAX_ALIASED_NODES} nodes")
        try:
            return self._build(node, path)
        finally:
            if outer:
                self.alias = None

    def _build(self, node: yaml.Node, path: KeyPath) -> Any:
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.doc.lines[(*path, i)] = item.start_mark.line + 1
                items.append(self.build(item, (*path, i)))
            return items
        return self.loader.construct_object(node, deep=True)

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError(self.doc.file, line, f"{format_path(path)}: a key is not a string")
            key = self.loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise YamlError(self.doc.file, line, f"{format_path(path)}: key {key!r} is not a string")
            if key in out:
                first = self.doc.lines[(*path, key)]
                raise YamlError(self.doc.file, line,
                                f"{format_path((*path, key))}: duplicate key (first set on line {first})")
            self.doc.lines[(*path, key)] = line
            out[key] = self.build(value_node, (*path, key))
        return out
