"""build/NAME/pxe/: all that a PXE server serves for one build, hard links to the build's
own artifacts (no copies of the large files). The flasher reads manifest.json and its
signature, then grub.cfg and root.img, each checked against the signed manifest; iPXE reads
boot.ipxe, vmlinuz and initrd.img. SHA256SUMS is for people (sha256sum -c); nothing trusts
it. The slots' images travel inside root.img (/usr/lib/cbios/slot-images).

Standard library only: the field kit (cbios/pxe/kit.py) carries it and checks its own
copy of a bundle with check_members."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cbios import manifest
from cbios.errors import CbiosError
from cbios.node import contract

log = logging.getLogger("cbios")

PXE_DIR = "pxe"
FILES = [*contract.STORE_FILES, contract.SUMS]  # what a node asks for, and SHA256SUMS for people
SIGNED = [n for n in FILES if n not in (manifest.SUMS, manifest.MANIFEST, manifest.SIGNATURE)]  # in the manifest


def make_bundle(out: Path) -> Path:
    """(Re)make OUT/pxe from the published build in OUT, atomically: a server reading the
    old bundle keeps it whole until the new one replaces it."""
    tmp = out / f".{PXE_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in FILES:
        try:
            os.link(out / name, tmp / name)
        except OSError:
            shutil.copy2(out / name, tmp / name)
    old = out / f".{PXE_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / PXE_DIR).exists():
        os.replace(out / PXE_DIR, old)
    os.replace(tmp, out / PXE_DIR)
    shutil.rmtree(old, ignore_errors=True)
    return out / PXE_DIR


class Members(Protocol):
    """A bundle's files wherever they are kept: a folder, a field kit."""

    def where(self, name: str) -> str:
        """NAME as a person finds it."""

    def size(self, name: str) -> int | None:
        """NAME's size, or None: it is not there."""

    def sha256(self, name: str) -> str: ...


class Folder:
    """A bundle's folder (build/NAME/pxe or a copy of it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def where(self, name: str) -> str:
        return str(self.path / name)

    def size(self, name: str) -> int | None:
        return (self.path / name).stat().st_size if (self.path / name).is_file() else None

    def sha256(self, name: str) -> str:
        return manifest.sha256_file(self.path / name)


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest in RAW, with the artifacts it lists; WHERE names it in the error."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data["artifacts"], dict):
            raise TypeError("no artifacts")
        for name, meta in data["artifacts"].items():
            if not (isinstance(meta, dict) and type(meta.get("size")) is int and isinstance(meta.get("sha256"), str)):
                raise TypeError(f"artifact {name!r} has no size and sha256")
    except (ValueError, KeyError, TypeError) as e:
        raise CbiosError(f"{where}: unreadable manifest ({e})") from None
    return data


def check_members(members: Members, data: dict[str, Any],
                  checked: Callable[[str, int], None] = lambda name, size: None) -> None:
    """Every file the bundle serves is there and matches DATA (its manifest), each one CHECKED as it is."""
    for name in SIGNED:
        meta = data["artifacts"].get(name)
        if meta is None:
            raise CbiosError(f"{members.where(manifest.MANIFEST)}: the manifest does not list {name}")
        size = members.size(name)
        if size is None:
            raise CbiosError(f"{members.where(name)}: missing from the bundle")
        if size != meta["size"] or members.sha256(name) != meta["sha256"]:
            raise CbiosError(f"{members.where(name)}: does not match its sha256 in the manifest")
        checked(name, size)
    if data.get("test"):
        log.warning("‣ %s %s is a TEST firmware (the public test key, an empty root password, the tests' back "
                    "door): for QEMU and labs, never for real nodes", data.get("profile"), data.get("version"))


def check_bundle(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest, once every file it serves is there and matches it."""
    if not (bundle / manifest.MANIFEST).is_file():
        raise CbiosError(f"{bundle}: not a PXE bundle (no {manifest.MANIFEST})",
                         hint="build the profile first: cbios build NAME")
    data = parse_manifest((bundle / manifest.MANIFEST).read_bytes(), str(bundle / manifest.MANIFEST))
    check_members(Folder(bundle), data)
    return data
