"""A boot server's receipts, for `slot show-runtime`: what each node it booted said last.

They are files the slot wrote on its own volume, so they are read as a slot's files are:
each directory on the way and each file opened without following a link, no file larger
than a receipt may be, only the fields a row shows, each a short text."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

SHOWN = ("mac", "result", "mode", "profile", "version", "object_id", "finished", "seconds", "bytes_received",
         "reason")
MAX_FILE = 64 << 10
MAX_FIELD = 160
KEEP = 32  # the nodes shown, newest first


def latest(volume: Path, directory: str) -> list[dict[str, str]]:
    """The newest receipt of each node under VOLUME/DIRECTORY (one file a node)."""
    try:
        fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        for part in directory.split("/"):
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        found = []
        for name in os.listdir(fd):
            if name.endswith(".json") and (receipt := _read(fd, name)) is not None:
                found.append(receipt)
    except OSError:
        return []
    finally:
        os.close(fd)
    found.sort(key=lambda r: r.get("finished", ""), reverse=True)
    return found[:KEEP]


def _read(dir_fd: int, name: str) -> dict[str, str] | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        return None
    try:
        doc: Any = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested past Python's bound
        return None
    if not isinstance(doc, dict):
        return None
    return {k: _text(doc[k]) for k in SHOWN if k in doc and isinstance(doc[k], (str, int, float))}


def _text(value: str | int | float) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(value))[:MAX_FIELD]
