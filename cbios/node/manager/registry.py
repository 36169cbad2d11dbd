"""CB-Manager's slot registry: one JSON file on its own volume (its /var), so it survives
reboots and a switch of firmware copy. Written whole, to a new file renamed into place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cbios.node import files

REGISTRY = Path("/var/lib/cbios/registry.json")
FORMAT = 1


def load(path: Path = REGISTRY) -> dict[int, dict[str, Any]] | None:
    """{eid: entry}, or None when there is no registry yet (the node's first start)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: registry format {data.get('format')!r}, expected {FORMAT}")
    return {int(s["eid"]): s for s in data["slots"]}


def save(slots: dict[int, dict[str, Any]], path: Path = REGISTRY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "slots": [slots[e] for e in sorted(slots)]}, indent=2) + "\n"
    files.replace_path(path, text.encode(), 0o600)
