"""The cluster key of a node: outside its firmware, on its /var, which updates and
rollbacks keep.

The operator sets it on each management node (`cbios cluster set-key`); no build writes
it, so no image, bundle or release holds it. `cbios cluster rotate-key` hands a new one
to every member over the cluster itself (cluster.py), and each node keeps the key it
replaced as the previous one: a member that missed a rotation is still understood, and
the next rotation reaches it. Files are 0640 in a 2770 directory of the node's root and
the group of CB-Manager's root (contract.MANAGER_USER; tmpfiles.d makes it), replaced by
rename: the node's root and CB-Manager read and replace them, no one else."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from cbios.node import contract, files

KEY_BYTES = 32  # a new key; a key set by hand has at least MIN_BYTES
MIN_BYTES = 32
MAX_BYTES = 4096
PREVIOUS_SUFFIX = ".previous"
MODE = 0o640  # the directory's group reads: CB-Manager, from its container


class BadKey(ValueError):
    """A key that is not one: too short, too long."""


def check(key: bytes, where: str) -> bytes:
    key = key.strip()
    if not MIN_BYTES <= len(key) <= MAX_BYTES:
        raise BadKey(f"{where}: a cluster key is {MIN_BYTES} to {MAX_BYTES} bytes (this is {len(key)})")
    return key


def new_key() -> bytes:
    return secrets.token_hex(KEY_BYTES).encode()


def fingerprint(key: bytes) -> str:
    """What two nodes can compare without showing the key."""
    return hashlib.sha256(b"cbios cluster key\0" + key).hexdigest()[:16]


class Keyring:
    """The key files under DIRECTORY: read afresh at every use, so a key set or rotated
    takes effect at once in every process that reads them (CB-Manager's container binds
    the directory)."""

    def __init__(self, path: Path = contract.CLUSTER_KEY, shown: Path = contract.CLUSTER_KEY) -> None:
        self.path = path
        self.shown = shown  # PATH as the operator finds it on the node, for messages
        self.previous_path = path.with_name(path.name + PREVIOUS_SUFFIX)

    def current(self) -> bytes | None:
        return self._read(self.path)

    def keys(self) -> list[bytes]:
        """The keys a request may be signed with: the current one, then the previous one."""
        return [k for k in (self._read(self.path), self._read(self.previous_path)) if k]

    def install(self, key: bytes) -> str:
        """KEY becomes the current key; the current one (if another) becomes the previous.
        KEY's fingerprint."""
        key = check(key, "the new key")
        self.path.parent.mkdir(mode=0o2770, parents=True, exist_ok=True)
        old = self.current()
        if old is not None and old != key:
            files.replace_path(self.previous_path, old, MODE)
        files.replace_path(self.path, key, MODE)
        return fingerprint(key)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return check(path.read_bytes(), str(path))
        except (OSError, BadKey):
            return None
