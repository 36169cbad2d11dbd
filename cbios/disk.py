"""The node disk of a build, disk.qcow2: made by booting the flasher (the initrd in flash
mode) in QEMU on a blank disk, the firmware reaching it on a read-only second drive. It is
the same code path that field staff use, and the build host needs no device-mapper."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cbios import manifest
from cbios.artifacts import DISK, RECORD, WORK, built
from cbios.boot import kernel_boot_spec
from cbios.errors import StepError
from cbios.flasher_watch import FlasherWatch
from cbios.machine import Machine
from cbios.profile import Profile, parse_size
from cbios.profile import template as slot_template
from cbios.progress import StatusLine
from cbios.project import Project
from cbios.qemu import VmSpec
from cbios.run import run

log = logging.getLogger("cbios")

MEDIA_LABEL = "cbios-media"
MEDIA_FILES = [manifest.MANIFEST, manifest.SIGNATURE, "grub.cfg", "root.img"]
EXTENT = 4 << 20
FLASH_TIMEOUT = 900


def disk_size(project: Project, profile: Profile) -> int:
    """Bytes for GPT, bios_grub, boot and a PV holding every LV (rounded to LVM extents)."""
    storage = profile.storage
    lvs = [storage.root_size, storage.root_size, storage.var_size, storage.swap_size]
    sizes = [parse_size(size) for size in lvs] + [parse_size(storage.slot_room)]
    slots = slot_template.node_slots(profile, slot_template.templates_of(project, profile))["slots"]
    sizes += [v["size"] for s in slots for v in s["volumes"]]
    pv = (1 << 20) + sum(-(-size // EXTENT) * EXTENT for size in sizes)
    return (4 << 20) + parse_size(storage.boot_size) + pv + (8 << 20)


def overlay(backing: Path, path: Path) -> Path:
    """A writable qcow2 on top of BACKING, which stays as it is."""
    # qemu-img resolves a relative backing path against the overlay: pass it absolute.
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing.resolve(), "-F", "qcow2", path],
        step="qemu-img create")
    return path


def flash_cmdline(profile: Profile, *, source: str = f"LABEL={MEDIA_LABEL}", target: str = "/dev/vda",
                  force: bool = False) -> str:
    args = ["cbios.flash=install", f"cbios.source={source}", f"cbios.target={target}",
            "cbios.flash.done=poweroff", *profile.kernel_cmdline()]
    if source.startswith(("http://", "https://")):
        args.append("ip=dhcp")
    if force:
        args.append("cbios.force")
    return " ".join(args)


def make_media(out: Path, dest: Path, log_file: Path) -> None:
    """A small ext4 image holding what the flasher reads, like a stick a technician carries."""
    with tempfile.TemporaryDirectory(prefix="cbios-media-", dir=out / WORK) as tmp:
        for name in MEDIA_FILES:
            shutil.copy2(out / name, Path(tmp) / name)
        used = sum((Path(tmp) / n).stat().st_size for n in MEDIA_FILES)
        size = ((used + used // 10 + (8 << 20)) >> 20) + 1
        dest.unlink(missing_ok=True)
        run(["mkfs.ext4", "-q", "-F", "-L", MEDIA_LABEL, "-O", "^has_journal", "-d", tmp, dest, f"{size}M"],
            step="flash media", log_file=log_file)


def flasher_spec(project: Project, profile: Profile, out: Path, target: Path, media: Path | None,
                 *, source: str = f"LABEL={MEDIA_LABEL}", force: bool = False) -> VmSpec:
    """The flasher in QEMU: TARGET as /dev/vda, MEDIA (if any) as a read-only /dev/vdb."""
    spec = kernel_boot_spec(project, profile, out)
    spec.cmdline = flash_cmdline(profile, source=source, force=force)
    spec.drives = [f"file={target},format=qcow2,if=virtio,cache=unsafe"]
    if media is not None:
        spec.drives.append(f"file={media},format=raw,if=virtio,readonly=on")
    return spec


def flash(spec: VmSpec, logdir: Path, name: str, *, target: Path | None = None) -> str:
    """Run the flasher, its progress shown (and TARGET's growth, if given); return its report
    line (FLASHED or FAILED ...)."""
    with Machine(spec, logdir, name=name) as machine, StatusLine(name) as status:
        watch = FlasherWatch(machine.console_log, status, target=target)
        line = machine.wait_report(("FLASHED", "FAILED"), FLASH_TIMEOUT, on_poll=watch.poll)
        if not machine.wait_exit(120):
            raise machine.error("the flasher did not power off within 120 s")
        return line


def read_record(out: Path) -> dict[str, Any] | None:
    """What disk.json says of OUT's node disk, or None."""
    try:
        return manifest.read(out / RECORD)
    except (OSError, ValueError):
        return None


def make_disk(project: Project, profile: Profile, *, force: bool = False) -> Path:
    out = built(project, profile)
    data = manifest.read(out / manifest.MANIFEST)
    root_sha = data["artifacts"]["root.img"]["sha256"]
    disk = out / DISK
    entry = read_record(out)
    if not force and disk.is_file() and entry and entry.get("root_sha256") == root_sha \
            and disk.stat().st_size == entry["size"]:
        log.info("‣ %s is up to date", project.display(disk))
        return disk
    start = time.monotonic()
    work = out / WORK
    media = work / "media.img"
    make_media(out, media, work / "logs" / "disk.log")
    tmp = work / f"{DISK}.tmp"
    tmp.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, str(disk_size(project, profile))],
        step="qemu-img create", log_file=work / "logs" / "disk.log")
    log.info("‣ Flashing %s with the initrd's flasher in QEMU", project.display(disk))
    line = flash(flasher_spec(project, profile, out, tmp, media), work / "vm", "flasher", target=tmp)
    if not line.startswith("FLASHED"):
        raise StepError("flasher", line)
    # Compact: the flasher's zeroed blocks need not be stored.
    run(["qemu-img", "convert", "-O", "qcow2", tmp, disk], step="qemu-img convert",
        log_file=work / "logs" / "disk.log")
    tmp.unlink()
    media.unlink()
    manifest.write(out / RECORD, {"sha256": manifest.sha256_file(disk), "size": disk.stat().st_size,
                                  "virtual_size": disk_size(project, profile), "root_sha256": root_sha,
                                  "seconds": round(time.monotonic() - start, 1)})
    log.info("‣ Made %s in %.0f s (%d MiB)", project.display(disk), time.monotonic() - start,
             disk.stat().st_size >> 20)
    return disk
