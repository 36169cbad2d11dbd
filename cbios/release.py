"""`cbios release NAME`: one file that carries a build, for `cbios update FILE` on a node (a
USB stick, scp) and for `slot image add` on a management node, which boots its compute nodes
from it: an uncompressed tar of manifest.json and its signature first (a reader checks them
before it takes anything else), SHA256SUMS, the boot files, and root.img last."""

from __future__ import annotations

import tarfile
from pathlib import Path

from cbios import manifest
from cbios.errors import CbiosError
from cbios.node import contract

SUFFIX = ".cbios.tar"
# The store's files, in the order a reader takes them in one pass; SHA256SUMS is for people.
MEMBERS = [*contract.STORE_FILES[:2], manifest.SUMS, *contract.STORE_FILES[2:]]


def write_release(out: Path, dest: Path | None = None) -> Path:
    """The release file of the build in OUT (default: OUT/PROFILE-VERSION.cbios.tar), written whole or not at all."""
    if not (out / manifest.MANIFEST).is_file():
        raise CbiosError(f"{out}: no build there (no {manifest.MANIFEST})", hint="build the profile first")
    data = manifest.read(out / manifest.MANIFEST)
    for name in MEMBERS[3:]:
        path = out / name
        if not path.is_file() or manifest.sha256_file(path) != data["artifacts"][name]["sha256"]:
            raise CbiosError(f"{path}: missing, or not what the manifest says",
                             hint="rebuild: cbios build NAME --force")
    dest = dest or out / f"{data['profile']}-{data['version']}{SUFFIX}"
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in MEMBERS:
            if (out / name).is_file():  # SHA256SUMS and the signature of an older build may be missing
                tar.add(out / name, arcname=name, recursive=False)
    tmp.replace(dest)
    return dest
