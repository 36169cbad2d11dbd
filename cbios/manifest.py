"""manifest.json: what one build produced, and how to check it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Named here too for the build's modules: manifest.MANIFEST, manifest.SIGNATURE.
from cbios.node.contract import MANIFEST as MANIFEST
from cbios.node.contract import SIGNATURE as SIGNATURE
from cbios.node.contract import SUMS as SUMS

FORMAT = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def describe(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(directory / n), "size": (directory / n).stat().st_size}
            for n in sorted(names)}


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def verify(directory: Path) -> list[str]:
    """Problems with the artifacts in DIRECTORY against its manifest (empty: all good)."""
    manifest = read(directory / MANIFEST)
    problems = []
    for name, meta in manifest["artifacts"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{name}: size {path.stat().st_size}, manifest says {meta['size']}")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{name}: sha256 does not match the manifest")
    return problems
