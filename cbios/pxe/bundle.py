"""build/NAME/pxe/: all that a PXE server serves for one build, hard links to the build's
own artifacts (no copies of the large files). The flasher reads manifest.json and its
signature, then grub.cfg and root.img, each checked against the signed manifest; iPXE reads
boot.ipxe, vmlinuz and initrd.img. SHA256SUMS is for people (sha256sum -c); nothing trusts
it. The slots' images travel inside root.img (/usr/lib/cbios/slot-images)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cbios import manifest
from cbios.errors import CbiosError

PXE_DIR = "pxe"
FILES = ["boot.ipxe", "vmlinuz", "initrd.img", "root.img", "grub.cfg", "SHA256SUMS",
         manifest.MANIFEST, manifest.SIGNATURE]


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


def check_bundle(bundle: Path) -> dict[str, object]:
    """The bundle's manifest, once every file it serves is there and matches it."""
    if not (bundle / manifest.MANIFEST).is_file():
        raise CbiosError(f"{bundle}: not a PXE bundle (no {manifest.MANIFEST})",
                         hint="build the profile first: cbios build NAME")
    try:
        data = manifest.read(bundle / manifest.MANIFEST)
        artifacts = data["artifacts"]
    except (ValueError, KeyError, TypeError) as e:
        raise CbiosError(f"{bundle / manifest.MANIFEST}: unreadable manifest ({e})") from None
    for name in FILES:
        if name in (manifest.MANIFEST, "SHA256SUMS", manifest.SIGNATURE):
            continue
        meta = artifacts.get(name)
        path = bundle / name
        if meta is None:
            raise CbiosError(f"{bundle}: the manifest does not list {name}")
        if not path.is_file():
            raise CbiosError(f"{path}: missing from the bundle")
        if path.stat().st_size != meta["size"] or manifest.sha256_file(path) != meta["sha256"]:
            raise CbiosError(f"{path}: does not match its sha256 in the manifest")
    return data
