"""`cbios release NAME`: one file that carries a build's update, for `cbios update FILE` on a
node (a USB stick, scp): an uncompressed tar of manifest.json (and its signature), SHA256SUMS
and root.img, the manifest first."""

from __future__ import annotations

import tarfile
from pathlib import Path

from cbios import manifest
from cbios.errors import CbiosError

SUFFIX = ".cbios.tar"
MEMBERS = [manifest.MANIFEST, manifest.SIGNATURE, "SHA256SUMS", "root.img"]


def write_release(out: Path, dest: Path | None = None) -> Path:
    """The release file of the build in OUT (default: OUT/PROFILE-VERSION.cbios.tar), written whole or not at all."""
    if not (out / manifest.MANIFEST).is_file():
        raise CbiosError(f"{out}: no build there (no {manifest.MANIFEST})", hint="build the profile first")
    data = manifest.read(out / manifest.MANIFEST)
    image = out / "root.img"
    if not image.is_file() or manifest.sha256_file(image) != data["artifacts"][image.name]["sha256"]:
        raise CbiosError(f"{image}: missing, or not what the manifest says", hint="rebuild: cbios build NAME --force")
    dest = dest or out / f"{data['profile']}-{data['version']}{SUFFIX}"
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in MEMBERS:
            if (out / name).is_file():
                tar.add(out / name, arcname=name, recursive=False)
    tmp.replace(dest)
    return dest
