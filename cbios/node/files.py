"""A file replaced whole on the node: a new one beside it, written and synced, renamed over
it, and the directory synced. A power cut leaves the old file or the new one, never part of
either; the name is never opened, so whatever is there (a link, a FIFO) is not followed."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def replace(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """NAME in the directory DIR_FD holds DATA. OSError if the new file cannot be made."""
    temp = f".{name}.cbios-new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp, dir_fd=dir_fd)
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    with os.fdopen(out, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def replace_path(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        replace(fd, path.name, data, mode)
    finally:
        os.close(fd)
