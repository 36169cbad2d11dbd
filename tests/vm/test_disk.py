"""The node disk: two copies of the firmware on LVM, GRUB's choice between them, fallback
with no hand on the node, and a flasher that will not overwrite a node by accident."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cbios import lvm_layout
from cbios.boot import disk_boot_spec
from cbios.disk import flash, flasher_spec, make_media
from cbios.machine import Machine
from cbios.profile import Profile
from cbios.project import Project

log = logging.getLogger("cbios")


def boot_disk(project: Project, profile: Profile, built: Path, disk: Path, name: str,
              fw_cfg: dict[str, str] | None = None) -> Machine:
    spec = disk_boot_spec(project, profile, built, disk, persist=True)
    spec.fw_cfg = fw_cfg or {}
    return Machine(spec, disk.parent / "vm", name=name)  # started by `with`


def status(machine: Machine) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(machine.succeed("cbios status --json"))
    return data


def test_disk_boots_the_primary_commits_it_and_boots_it_again(
        vm_project: Project, profile: Profile, built: Path, disk_copy: Path) -> None:
    vg = profile.storage.vg
    with boot_disk(vm_project, profile, built, disk_copy, "disk") as m:
        assert "copy=root" in m.wait_ready(profile.qemu.ready_timeout)
        assert "CBIOS: booting copy root (lvm/root, state new)" in m.console_log.read_text()
        assert m.succeed("findmnt -n -o SOURCE,OPTIONS / | cut -d, -f1") == "/dev/mapper/cbios-root ro"
        assert f"({vg}-root)" in m.succeed("dmsetup deps -o devname cbios-root")
        assert m.succeed("findmnt -n -o SOURCE,FSTYPE /var") == f"/dev/mapper/{vg}-var ext4"
        m.succeed("echo kept > /var/lib/cbios-test")
        swap = m.succeed(f"readlink -f /dev/{vg}/swap")
        assert m.succeed("swapon --show=NAME,SIZE --noheadings | tr -s ' '") == f"{swap} 64M"
        # The source document's slot volume name, and the size the profile gives it.
        assert m.succeed(f"blockdev --getsize64 /dev/mapper/{vg}-slot2-0") == str(16 << 20)
        st = status(m)
        assert st["running"] == "root" and st["next_boot"] == "root" and st["last_fallback"] is None
        assert st["copies"]["root"]["state"] == "good"  # committed once ready
        assert st["copies"]["root"]["tries_left"] is None
        assert {c["version"] for c in st["copies"].values()} == {profile.version}
        rows = [line.split() for line in m.succeed("cbios status").splitlines()]
        assert ["root", f"{vg}/root", profile.version, "good", "-", "(running)"] in rows

        m.succeed("systemctl reboot")
        assert "copy=root" in m.wait_ready(profile.qemu.ready_timeout)
        assert "CBIOS: booting copy root (lvm/root, state good)" in m.console_log.read_text()
        assert m.succeed("cat /var/lib/cbios-test") == "kept"
        assert status(m)["copies"]["root"]["state"] == "good"
        m.shutdown()


def test_destroyed_primary_boots_the_spare_with_no_input(
        vm_project: Project, profile: Profile, built: Path, disk_copy: Path) -> None:
    offset = lvm_layout.lv_offset(disk_copy, profile.storage.vg, "root")
    lvm_layout.overwrite(disk_copy, offset, 64 << 10)  # the squashfs superblock and what follows
    with boot_disk(vm_project, profile, built, disk_copy, "broken-primary") as m:
        assert "copy=spare" in m.wait_ready(profile.qemu.ready_timeout)
        st = status(m)
        assert st["running"] == "spare" and st["next_boot"] == "spare"
        assert st["copies"]["root"]["state"] == "bad"
        assert st["copies"]["root"]["version"] is None  # its file system is unreadable
        assert st["last_fallback"] == "copy root could not be loaded (kernel, initrd or file system)"
        assert "last fallback: copy root could not be loaded" in m.succeed("cbios status")
        m.shutdown()


def flip_somewhere(disk: Path, vg: str, lv: str, image_bytes: int, within: tuple[int, int] | None = None) -> int:
    """One byte inverted at a random place of the copy's root.img (squashfs or hash tree), or
    of the range WITHIN of it."""
    start, end = within or (0, image_bytes)
    where = random.randrange(start, end)
    old, new = lvm_layout.flip_byte(disk, lvm_layout.lv_offset(disk, vg, lv) + where)
    log.info("  flipped byte %d of %s/%s's root.img (%d bytes): %#04x -> %#04x", where, vg, lv, image_bytes,
             old, new)
    return where


def stored_at(built: Path, inside: Path) -> tuple[int, int]:
    """Where a file of the root is in root.img: squashfs stores the blocks of an already
    compressed file (kernel, initrd, slot images) as they are, so its bytes are there whole."""
    image, data = (built / "root.img").read_bytes(), inside.read_bytes()
    offset = image.find(data[:1 << 20])
    assert offset >= 0, f"{inside} is not stored as it is in root.img"
    return offset, offset + (1 << 20)


# Where the byte lands decides who finds it: GRUB's sha256 check (kernel, initrd), or the
# scrub after ready (a block nothing reads at boot, as a slot image's). A block read while
# the node boots is dm-verity's at run time: see the note in README's corruption section.
FLIPS = {
    "initrd": lambda built: stored_at(built, built / "initrd.img"),
    "slot-image": lambda built: stored_at(built, built / "work/out/root/root/usr/lib/cbios/slot-images/service.sqfs"),
}


@pytest.mark.parametrize("region", sorted(FLIPS))
def test_a_byte_flipped_in_the_primary_ends_with_the_node_ready_on_the_spare(
        vm_project: Project, profile: Profile, built: Path, disk_copy: Path, build_manifest: dict[str, Any],
        region: str) -> None:
    """The node ends up ready on the spare with no hands, at most one reboot, and says why."""
    where = flip_somewhere(disk_copy, profile.storage.vg, "root", build_manifest["artifacts"]["root.img"]["size"],
                           FLIPS[region](built))
    with boot_disk(vm_project, profile, built, disk_copy, f"flipped-primary-{region}") as m:
        deadline = 3 * profile.qemu.ready_timeout
        ready = m.wait_report(("READY",), deadline, skip_failed=True)
        if "copy=root" in ready:  # the scrub after ready finds it, and reboots into the spare
            ready = m.wait_report(("READY",), deadline, skip_failed=True)
        assert "copy=spare" in ready, f"byte {where}: {ready}"
        st = status(m)
        assert (st["running"], st["next_boot"], st["copies"]["root"]["state"]) == ("spare", "spare", "bad"), where
        reason = st["last_fallback"]
        expected = "copy root could not be loaded" if region == "initrd" else "copy root: corrupt"
        assert reason.startswith(expected), (where, reason)
        assert "last fallback: copy root" in m.succeed("cbios status")
        boots = m.console_log.read_text(errors="replace").count("CBIOS: booting copy")
        assert boots <= 3, f"byte {where}: {boots} boot loader choices"  # root, spare; or root, root again, spare
        m.shutdown()


def test_a_corrupt_spare_is_found_by_the_scrub_and_never_booted(
        vm_project: Project, profile: Profile, built: Path, disk_copy: Path, build_manifest: dict[str, Any]) -> None:
    size = build_manifest["artifacts"]["root.img"]["size"]
    where = flip_somewhere(disk_copy, profile.storage.vg, "root-spare", size)
    with boot_disk(vm_project, profile, built, disk_copy, "flipped-spare") as m:
        assert "copy=root" in m.wait_ready(profile.qemu.ready_timeout)
        corrupt = m.wait_report(("CORRUPT",), profile.qemu.ready_timeout)  # the scrub after ready
        assert corrupt.startswith("CORRUPT copy spare: "), (where, corrupt)
        st = status(m)
        assert (st["running"], st["next_boot"]) == ("root", "root")
        assert (st["copies"]["root"]["state"], st["copies"]["spare"]["state"]) == ("good", "bad")
        assert st["last_corruption"].startswith("copy spare: corrupt: "), st["last_corruption"]
        assert "corruption:    copy spare: corrupt" in m.succeed("cbios status")
        # The daily scrub finds nothing more, and leaves the spare alone.
        assert "copy spare: skipped: marked bad already" in m.succeed("cbios scrub")
        m.shutdown()


def test_primary_that_never_becomes_ready_falls_back_after_its_tries(
        vm_project: Project, profile: Profile, built: Path, disk_copy: Path) -> None:
    knob = {"opt/org.cbios/fail-ready": "root"}  # the test image's health check fails on root
    with boot_disk(vm_project, profile, built, disk_copy, "unhealthy-primary", fw_cfg=knob) as m:
        timeout = (profile.boot.tries + 1) * profile.qemu.ready_timeout
        assert "copy=spare" in m.wait_report(("READY",), timeout, skip_failed=True)
        failed = [r for r in m.reports if r.startswith("FAILED")]
        assert len(failed) == profile.boot.tries
        assert all("copy=root" in r and "check=10-test-fail-ready" in r for r in failed)
        st = status(m)
        assert st["running"] == "spare"
        assert st["copies"]["root"]["state"] == "bad"
        assert st["last_fallback"] == "copy root did not become ready in its tries"
        m.shutdown()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_refuses_a_disk_that_holds_cbios(
        vm_project: Project, profile: Profile, built: Path, disk_copy: Path, tmp_path: Path) -> None:
    media = tmp_path / "media.img"
    make_media(built, media, tmp_path / "media.log")
    before = _sha256(disk_copy)
    line = flash(flasher_spec(vm_project, profile, built, disk_copy, media), tmp_path / "vm", "reflash")
    assert line.startswith("FAILED install: /dev/vda holds LVM VG lvm (a CBIOS node?): not overwritten"), line
    assert "cbios.force" in line
    assert _sha256(disk_copy) == before


def test_boot_disk_check_verb(node_disk: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cbios.cli", "boot", "qemu-test", "--disk", "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "reached ready" in proc.stderr

