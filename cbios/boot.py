"""Booting a built profile in QEMU: interactively, or as a check that it reaches ready."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cbios import manifest
from cbios.artifacts import DISK, WORK, built
from cbios.errors import CbiosError
from cbios.machine import Machine
from cbios.profile import Profile
from cbios.project import Project
from cbios.qemu import VmSpec, choose_accel

log = logging.getLogger("cbios")


def kernel_boot_spec(project: Project, profile: Profile, out: Path,
                     root: tuple[Path, str] | None = None) -> VmSpec:
    """Kernel and initrd from the build, root.img as a read-only virtio disk, opened through
    dm-verity with the root hash of the build's manifest. ROOT: another root.img and its
    verity parameter, booted the same way."""
    image, verity = root or (out / "root.img", manifest.read(out / manifest.MANIFEST)["verity"]["param"])
    cmdline = " ".join(["cbios.image=/dev/vda", f"cbios.verity={verity}", "ro", *profile.kernel_cmdline()])
    return VmSpec(
        memory=profile.qemu.memory,
        cpus=profile.qemu.cpus,
        accel=choose_accel(out / "vmlinuz", project.build),
        kernel=out / "vmlinuz",
        initrd=out / "initrd.img",
        cmdline=cmdline,
        drives=[f"file={image},format=raw,if=virtio,readonly=on"],
        macs=[nic.mac for nic in profile.network.nics],
    )


def disk_boot_spec(project: Project, profile: Profile, out: Path, disk: Path, *, persist: bool = False) -> VmSpec:
    """The node disk as the only drive, booted by the firmware's BIOS and GRUB. Unless
    PERSIST, writes go to a throw-away snapshot and the disk stays as it was built."""
    drive = f"file={disk},format=qcow2,if=virtio" + ("" if persist else ",snapshot=on")
    return VmSpec(
        memory=profile.qemu.memory,
        cpus=profile.qemu.cpus,
        accel=choose_accel(out / "vmlinuz", project.build),
        drives=[drive],
        no_reboot=False,
        macs=[nic.mac for nic in profile.network.nics],
    )


def boot(project: Project, profile: Profile, *, check: bool, timeout: int | None,
         disk: bool = False, persist: bool = False) -> int:
    out = built(project, profile)
    if disk:
        if not (out / DISK).is_file():
            raise CbiosError(f"{project.display(out / DISK)}: no node disk",
                             hint=f"run 'cbios disk {profile.name}' first")
        spec = disk_boot_spec(project, profile, out, out / DISK, persist=persist)
    else:
        spec = kernel_boot_spec(project, profile, out)
    if not check:
        from cbios.pxe.serve import RELEASE_PORT, VM_RELEASE_SERVER

        # `cbios pxe publish` on this machine is http://10.0.2.100/ for the node: cbios update.
        spec.pxe = f"guestfwd=tcp:{VM_RELEASE_SERVER}:80-cmd:socat - TCP:127.0.0.1:{RELEASE_PORT}"
        log.info("‣ Booting %s in QEMU (%s). Serial console here; Ctrl-A X quits.", profile.name, spec.accel)
        argv = spec.argv()
        os.execvp(argv[0], argv)
    limit = timeout or profile.qemu.ready_timeout
    with Machine(spec, out / WORK / "vm", name=profile.name) as machine:
        machine.wait_ready(limit)
        ready_after = machine.uptime()
        machine.shutdown()
    log.info("‣ %s %s reached ready in %.1f s (%s) and powered off", profile.name, profile.version,
             ready_after, spec.accel)
    return 0
