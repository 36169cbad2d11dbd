"""Where a profile's build puts what it makes: build/NAME, its artifacts, its node disk.

Read by every verb that uses a build (boot, disk, release, pxe, bench), written by the
build and by `cbios disk`; it imports none of them."""

from __future__ import annotations

from pathlib import Path

from cbios import manifest
from cbios.errors import CbiosError
from cbios.profile import Profile
from cbios.project import Project

ARTIFACTS = ["vmlinuz", "initrd.img", "root.img", "grub.cfg", "boot.ipxe"]
DISK = "disk.qcow2"  # the node disk, made by `cbios disk` from the artifacts


def out_dir(project: Project, profile: Profile) -> Path:
    return project.build / profile.name


def built(project: Project, profile: Profile) -> Path:
    """build/NAME of a finished build (its manifest is written last), or CbiosError."""
    out = out_dir(project, profile)
    if not (out / manifest.MANIFEST).is_file():
        raise CbiosError(f"{project.display(out)}: no finished build of '{profile.name}'",
                         hint=f"run 'cbios build {profile.name}' first")
    return out
