"""Booting a built profile in QEMU: interactively, or as a check that it reaches ready."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cbios import manifest
from cbios.errors import CbiosError
from cbios.image import ROOT_LABEL
from cbios.machine import Machine
from cbios.profile import Profile
from cbios.project import Project
from cbios.qemu import VmSpec, choose_accel

log = logging.getLogger("cbios")


def built(project: Project, profile: Profile) -> Path:
    out = project.build / profile.name
    if not (out / manifest.MANIFEST).is_file():
        raise CbiosError(f"{project.display(out)}: no finished build of '{profile.name}'",
                         hint=f"run 'cbios build {profile.name}' first")
    return out


def kernel_boot_spec(project: Project, profile: Profile, out: Path) -> VmSpec:
    """Kernel and initrd from the build, root.img as a read-only virtio disk."""
    cmdline = " ".join([f"root=LABEL={ROOT_LABEL}", "ro", *profile.kernel.cmdline])
    return VmSpec(
        memory=profile.qemu.memory,
        cpus=profile.qemu.cpus,
        accel=choose_accel(out / "vmlinuz", project.build),
        kernel=out / "vmlinuz",
        initrd=out / "initrd.img",
        cmdline=cmdline,
        drives=[f"file={out / 'root.img'},format=raw,if=virtio,readonly=on"],
    )


def boot(project: Project, profile: Profile, *, check: bool, timeout: int | None) -> int:
    out = built(project, profile)
    spec = kernel_boot_spec(project, profile, out)
    if not check:
        log.info("‣ Booting %s in QEMU (%s). Serial console here; Ctrl-A X quits.", profile.name, spec.accel)
        argv = spec.argv()
        os.execvp(argv[0], argv)
    limit = timeout or profile.qemu.ready_timeout
    with Machine(spec, out / "work" / "vm", name=profile.name) as machine:
        machine.wait_ready(limit)
        ready_after = machine.uptime()
        machine.shutdown()
    log.info("‣ %s %s reached ready in %.1f s (%s) and powered off", profile.name, profile.version,
             ready_after, spec.accel)
    return 0
