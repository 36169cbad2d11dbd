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
RECORD = "disk.json"  # the disk's own record: the signed manifest is never rewritten
WORK = "work"


def build_files() -> list[tuple[str, str]]:
    """What build/NAME/ holds, each with what it is: the README's table (cbios/docs.py)."""
    from cbios.pxe import pack
    from cbios.pxe.bundle import PXE_DIR
    from cbios.release import SUFFIX

    described = {
        "vmlinuz": "the kernel",
        "initrd.img": "the CBIOS initrd (systemd), with the kernel modules it needs to reach the root",
        "root.img": "the firmware: a squashfs image (xz) of the CBIOS root followed by its dm-verity hash tree. "
                    "A node's LV holds it byte for byte, as it is sent, and mounts it read-only through "
                    "dm-verity; it carries its own kernel and initrd in `/boot`",
        "grub.cfg": "the node disk's boot loader configuration",
        "boot.ipxe": "the PXE bundle's iPXE script",
    }
    assert set(described) == set(ARTIFACTS), "every artifact is described"
    return [
        *((name, described[name]) for name in ARTIFACTS),
        (manifest.MANIFEST, "profile name and version, whether it is a test firmware, the resolved profile's "
                            "sha256, every artifact's sha256 and size, the verity root hash of `root.img`, the node "
                            "disk's layout, the kernel version, the package lists of the root and of the initrd"),
        (manifest.SIGNATURE, "its Ed25519 signature: every path that writes firmware checks it first"),
        (manifest.SUMS, "the artifacts' sha256s, for people (`sha256sum -c`); nothing trusts it"),
        (f"{PXE_DIR}/", "the PXE bundle: hard links to what a PXE or web server serves (`cbios pxe serve`, nginx)"),
        (DISK, "`cbios disk`: a whole node disk (GPT, GRUB, the volume group with both copies, `/var` and "
               "the slots' volumes), flashed by the flasher in QEMU"),
        (RECORD, "`cbios disk`'s record of that disk: its sha256 and size, and the build it holds"),
        (f"NAME-VERSION{SUFFIX}", "`cbios release`: the update in one file, for `cbios update FILE` on a node "
                                  "and `slot image add` on a management node"),
        (f"NAME-VERSION{pack.SUFFIX}", "`cbios pxe pack`: the field kit, one file with the PXE bundle, its "
                                       "public key and a PXE server (`python3 KIT serve`)"),
        (f"{WORK}/", "rendered configuration, mkosi's outputs, logs (`work/logs/`), VM consoles (`work/vm/`)"),
    ]


def out_dir(project: Project, profile: Profile) -> Path:
    return project.build / profile.name


def built(project: Project, profile: Profile) -> Path:
    """build/NAME of a finished build (its manifest is written last), or CbiosError."""
    out = out_dir(project, profile)
    if not (out / manifest.MANIFEST).is_file():
        raise CbiosError(f"{project.display(out)}: no finished build of '{profile.name}'",
                         hint=f"run 'cbios build {profile.name}' first")
    return out
