"""The node disk: two copies of the firmware on LVM, GRUB's choice between them, fallback
with no hand on the node, and a flasher that will not overwrite a node by accident."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest

from cbios import lvm_layout
from cbios.boot import disk_boot_spec
from cbios.disk import flash, flasher_spec, make_media
from cbios.machine import Machine
from cbios.node import contract
from cbios.profile import Profile
from cbios.project import Project
from tests.vm import squashfs_map

log = logging.getLogger("cbios")


def boot_disk(project: Project, profile: Profile, built: Path, disk: Path, name: str) -> Machine:
    spec = disk_boot_spec(project, profile, built, disk, persist=True)
    return Machine(spec, disk.parent / "vm", name=name)  # started by `with`


def status(machine: Machine) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(machine.succeed("cbios status --json"))
    return data


def test_disk_boots_the_primary_and_commits_it(
        vm_project: Project, profile: Profile, built: Path, disk_copy: Path, build_manifest: dict[str, Any]) -> None:
    """The primary boots and is committed (test_slots boots a committed copy again); a byte
    flipped at a random place of the spare is found by the scheduled scrub while the primary
    runs, and the spare is never booted."""
    vg = profile.storage.vg
    where = flip_somewhere(disk_copy, vg, "root-spare", build_manifest["artifacts"]["root.img"]["size"])
    with boot_disk(vm_project, profile, built, disk_copy, "disk") as m:
        assert "copy=root" in m.wait_ready(profile.qemu.ready_timeout)
        assert "CBIOS: booting copy root (lvm/root, state new)" in m.console_log.read_text()
        assert m.succeed("findmnt -n -o SOURCE,OPTIONS / | cut -d, -f1") == "/dev/mapper/cbios-root ro"
        assert f"({vg}-root)" in m.succeed("dmsetup deps -o devname cbios-root")
        assert m.succeed("findmnt -n -o SOURCE,FSTYPE /var") == f"/dev/mapper/{vg}-var ext4"
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
        # The scrub at boot reads the running copy; the timer's run reads both.
        assert m.wait_until_succeeds("journalctl -b -o cat | grep 'scrub: copy root: clean'", 120)
        assert "copy spare" not in m.succeed("journalctl -b -o cat | grep 'scrub: copy' || true")
        m.succeed("systemctl start cbios-scrub.service", timeout=300)
        corrupt = m.wait_report(("CORRUPT",), 60)
        assert corrupt.startswith("CORRUPT copy spare: "), (where, corrupt)
        st = status(m)
        assert (st["running"], st["next_boot"]) == ("root", "root")
        assert (st["copies"]["root"]["state"], st["copies"]["spare"]["state"]) == ("good", "bad")
        assert st["last_corruption"].startswith("copy spare: corrupt: "), st["last_corruption"]
        assert "corruption:    copy spare: corrupt" in m.succeed("cbios status")
        # Found once: the next scrub leaves the spare alone.
        assert "copy spare: skipped: marked bad already" in m.succeed("cbios scrub", timeout=300)
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


# Where the byte lands decides who finds it: GRUB's sha256 check (the initrd), or the scrub
# after ready (a block nothing reads at boot: the compute slot's initrd, which only an install
# of that slot reads). A block read while the node boots is dm-verity's at run time: see the
# note in README's corruption section.
FLIPS = {
    "initrd": "boot/initrd.img",
    "slot-image": f"{contract.IMAGES}/compute/boot/initrd.img",
}


@pytest.mark.parametrize("region", sorted(FLIPS))
def test_a_byte_flipped_in_the_primary_ends_with_the_node_ready_on_the_spare(
        vm_project: Project, profile: Profile, built: Path, disk_copy: Path, build_manifest: dict[str, Any],
        region: str) -> None:
    """The node ends up ready on the spare with no hands, at most one reboot, and says why."""
    where = flip_somewhere(disk_copy, profile.storage.vg, "root", build_manifest["artifacts"]["root.img"]["size"],
                           squashfs_map.data_extent(built / "root.img", FLIPS[region]))
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
