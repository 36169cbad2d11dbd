"""One node's life over PXE, in order, on one disk: a blank disk whose install loses its
power half way, installed again over the network; updates refused before anything is
written (a manifest signed with another key, a grub.cfg changed by the server); an update
cut off by the server stopping mid-write, after which the node boots its old firmware (an
image corrupted on the way meets the same checks: test_update.py); an update; a netboot
that runs the updated copy from the node's own LVs.

Run in part (pytest -k), a step sets up what it needs through the `installed` fixture, or
skips and names the step it needs.

QEMU user networking with restrict=on: iPXE gets a chain script from QEMU's TFTP server,
and everything else over HTTP through guestfwd from the server `cbios pxe serve` runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbios import manifest
from cbios.boot import disk_boot_spec
from cbios.disk import FLASH_TIMEOUT, disk_size
from cbios.machine import Machine
from cbios.profile import Profile
from cbios.project import Project
from cbios.pxe.bundle import PXE_DIR
from cbios.pxe.lab import PxeLab, Site, StaticLab
from tests.vm.images import NEXT_VERSION

log = logging.getLogger("cbios")

MAC = "52:54:00:c0:00:01"  # qemu-test's first NIC: the one that PXE-boots
POWEROFF = "cbios.flash.done=poweroff"  # instead of the bundle's reboot: the tests boot the disk next


@dataclasses.dataclass
class Node:
    disk: Path
    logdir: Path
    figures: dict[str, float] = dataclasses.field(default_factory=dict)
    done: dict[str, Any] = dataclasses.field(default_factory=dict)  # step -> what it saw

    def needs(self, step: str, test: str) -> None:
        if step not in self.done:
            pytest.skip(f"needs the '{step}' step ({test}) to have run first in this session")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, vm_project: Project, profile: Profile) -> Iterator[Node]:
    """A blank disk the size qemu-test's flasher needs: the node of every test here."""
    work = tmp_path_factory.mktemp("pxe")
    disk = work / "node.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(disk_size(vm_project, profile))],
                   check=True)
    n = Node(disk, work / "vm")
    yield n
    log.info("PXE figures: %s", json.dumps(n.figures))


def pxe_machine(vm_project: Project, profile: Profile, built: Path, node: Node, lab: Site, name: str) -> Machine:
    spec = disk_boot_spec(vm_project, profile, built, node.disk, persist=True)
    spec.pxe = lab.netdev_options()
    spec.pxe_rom = lab.rom
    spec.boot = "once=n"  # the network first; the disk after the flasher reboots
    return Machine(spec, node.logdir, name=name)


def flash(vm_project: Project, profile: Profile, built: Path, node: Node, lab: Site, name: str) -> str:
    """The flasher over PXE; its verdict once it has powered off."""
    with pxe_machine(vm_project, profile, built, node, lab, name) as m:
        line = m.wait_report(("FLASHED", "FAILED"), FLASH_TIMEOUT)
        node.figures[f"{name}_s"] = round(m.uptime(), 1)
        if not m.wait_exit(120):
            raise m.error("the flasher did not power off within 120 s")
        return line


def disk_machine(vm_project: Project, profile: Profile, built: Path, node: Node, name: str) -> Machine:
    """The node booting from its disk: BIOS, GRUB, LVM. (A fresh QEMU: after iPXE, a warm
    reset makes SeaBIOS's disk reads under TCG slow for minutes.)"""
    return Machine(disk_boot_spec(vm_project, profile, built, node.disk, persist=True), node.logdir, name=name)


def status(m: Machine) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(m.succeed("cbios status --json"))
    return data


def image_size(build_dir: Path) -> int:
    size: int = manifest.read(build_dir / manifest.MANIFEST)["artifacts"]["root.img"]["size"]
    return size


@pytest.fixture
def installed(vm_project: Project, profile: Profile, built: Path, node: Node) -> dict[str, Any]:
    """The node installed over PXE, after a first try cut off by a power cut, and booted once
    from its disk (a file left in /var); done once, by the first test that needs it."""
    if "install" in node.done:
        return node.done["install"]  # type: ignore[no-any-return]
    seen: dict[str, Any] = {}
    # A first install loses its power half way through root.img (the server holds it there, so
    # the test sets the pace): the disk holds the partitions, the VG and half-written copies.
    with PxeLab(built / PXE_DIR, node.logdir / "cut", mode="install", kernel_args=POWEROFF,
                hold_after=("root.img", image_size(built) // 2)) as lab, \
            pxe_machine(vm_project, profile, built, node, lab, "pxe-install-cut") as m:
        if not lab.server.held.wait(FLASH_TIMEOUT):
            raise m.error("the flasher never fetched half of root.img")
        m.kill()  # the power cut
    # Done again from a stock nginx serving the bundle as plain files in a folder of a site, to
    # Debian 13's iPXE: no code of this project on the server. nginx slows root.img down past
    # its first third; there it is stopped and started again (the server sets the pace: the cut
    # falls where the transfer crawls), and the flasher takes the transfer up where it broke off.
    site = node.logdir / "site"
    (site / "cbios").mkdir(parents=True, exist_ok=True)
    (site / "cbios" / "qemu-test").symlink_to((built / PXE_DIR).resolve())
    slow_after = image_size(built) // 3
    with StaticLab(site, "cbios/qemu-test/boot.ipxe", node.logdir / "install", vm_project.cache, mode="install",
                   kernel_args=POWEROFF, rate="256k", rate_after=f"{slow_after >> 10}k") as lab, \
            pxe_machine(vm_project, profile, built, node, lab, "pxe-install") as m:
        m.wait_console_match(r"root\.img: (\d+) of \d+ MiB", FLASH_TIMEOUT,
                             lambda found: int(found[1]) > (slow_after >> 20) + 1)
        lab.server.stop()
        lab.server.start(rate="", rate_after="")
        seen["flashed"] = m.wait_report(("FLASHED", "FAILED"), FLASH_TIMEOUT)
        if not m.wait_exit(120):
            raise m.error("the flasher did not power off within 120 s")
        node.figures["pxe-install_s"] = round(m.uptime(), 1)
        seen["served"] = lab.server.served()
        seen["console"] = m.console()
    assert seen["flashed"].startswith("FLASHED install"), seen["flashed"]
    with disk_machine(vm_project, profile, built, node, "installed") as m:
        seen["ready"] = m.wait_ready(profile.qemu.ready_timeout)
        node.figures["installed_to_ready_s"] = round(m.uptime(), 1)
        seen["status"] = status(m)
        m.succeed("echo kept > /var/lib/cbios-pxe-test")
        seen["slots"] = m.succeed("slot list 31000040010")
        m.shutdown()
    node.done["install"] = seen
    return seen


def test_an_install_cut_off_is_done_again_from_a_stock_web_server_that_restarts_mid_transfer(
        built: Path, node: Node, installed: dict[str, Any]) -> None:
    sums = manifest.read(built / manifest.MANIFEST)["artifacts"]
    size = image_size(built)
    console = installed["console"]
    assert installed["flashed"].startswith("FLASHED install qemu-test 1.0.0 on /dev/vda"), installed["flashed"]
    assert "cbios-flash: /dev/vda holds an install that did not finish: installing again" in console
    # boot.ipxe found its folder by itself (the flasher's source is that folder on the stock
    # server); the transfer broke off where nginx was stopped, and was taken up there with one
    # Range request, so that root.img crossed the network once in all.
    assert re.search(r"cbios-flash: http://10\.0\.2\.100/cbios/qemu-test/root\.img: broken off at \d+ of \d+ MiB",
                     console), console[-3000:]
    images = [s for s in installed["served"] if s.name == "root.img"]
    resumed = images[-1]
    assert (resumed.status, resumed.range.startswith("bytes=")) == (206, True), images
    offset = int(resumed.range.removeprefix("bytes=").rstrip("-"))
    assert offset > size // 3 and resumed.sent == size - offset
    assert {"boot.ipxe", "vmlinuz", "initrd.img", "manifest.json", "manifest.json.sig", "grub.cfg"} <= \
        {s.name for s in installed["served"] if s.status == 200}
    # The server took no receipt (a POST to plain files); the node kept it on its boot partition.
    assert "the server did not take the receipt (kept on the node)" in console
    receipt = installed["status"]["last_flash"]
    assert (receipt["result"], receipt["mode"], receipt["version"]) == ("FLASHED", "install", "1.0.0")
    assert receipt["bytes_received"] == size  # what the node received: not a byte twice
    assert re.search(r"cbios-flash: root\.img: (\d+) of \1 MiB \(100%\) in \d+ s", console)  # progress
    assert "cbios-flash: manifest.json: signature good" in console
    assert "cbios-flash: receipt: {" in console and sums["root.img"]["sha256"][:12] in installed["flashed"]
    assert "version=1.0.0 copy=root" in installed["ready"]
    st = installed["status"]
    assert st["booted_from"] == "disk" and st["running"] == "root"
    assert st["copies"]["root"]["state"] == "good" and st["copies"]["spare"]["state"] == "good"
    assert "dhcp" in installed["slots"]


def tampered_bundle(built: Path, dest: Path, name: str, change: Any) -> Path:
    """A copy of the build's PXE bundle whose NAME CHANGE rewrites, SHA256SUMS made to match."""
    shutil.copytree(built / PXE_DIR, dest, copy_function=os.link)
    data = (dest / name).read_bytes()
    (dest / name).unlink()  # a hard link: the build's file stays as it is
    (dest / name).write_bytes(change(data))
    sums = (dest / "SHA256SUMS").read_text().splitlines()
    new = hashlib.sha256((dest / name).read_bytes()).hexdigest()
    (dest / "SHA256SUMS").unlink()
    (dest / "SHA256SUMS").write_text("".join(f"{new}  {name}\n" if line.endswith(f"  {name}") else line + "\n"
                                             for line in sums))
    return dest


def other_key_signature(data: bytes, tmp: Path) -> bytes:
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp / "other.pem")], check=True)
    (tmp / "doc").write_bytes(data)
    subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(tmp / "other.pem"), "-in",
                    str(tmp / "doc"), "-out", str(tmp / "doc.sig")], check=True)
    return (tmp / "doc.sig").read_bytes()


@pytest.mark.parametrize("case", ["manifest signed with another key", "grub.cfg changed by the server"])
def test_an_update_the_server_changed_is_refused_with_nothing_written(
        vm_project: Project, profile: Profile, built: Path, node: Node, installed: dict[str, Any],
        tmp_path: Path, case: str) -> None:
    if case.startswith("manifest"):
        # The server's own layout and hashes, signed with its own key.
        doc = json.loads((built / PXE_DIR / manifest.MANIFEST).read_text())
        doc["layout"]["var_size"] *= 2
        bad = tampered_bundle(built, tmp_path / "bad", manifest.MANIFEST, lambda _: json.dumps(doc).encode())
        sig = other_key_signature((bad / manifest.MANIFEST).read_bytes(), tmp_path)
        (bad / manifest.SIGNATURE).unlink()
        (bad / manifest.SIGNATURE).write_bytes(sig)
        expected = "FAILED update: manifest.json: its signature does not verify with this initrd's key"
    else:
        bad = tampered_bundle(built, tmp_path / "bad", "grub.cfg", lambda d: d + b"set cbios_cmdline_extra=init=/x\n")
        expected = "FAILED update: grub.cfg: checksum mismatch"
    before = tmp_path / "before.qcow2"
    shutil.copyfile(node.disk, before)
    with PxeLab(bad, node.logdir / "tampered", mode="update", kernel_args=POWEROFF) as lab:
        line = flash(vm_project, profile, built, node, lab, "pxe-tampered")
        assert line.startswith(expected), line
        assert lab.server.bytes_sent("root.img") == 0
        assert lab.wait_receipt()["result"] == "FAILED"
    compare = subprocess.run(["qemu-img", "compare", "-q", str(before), str(node.disk)], check=False)
    assert compare.returncode == 0, "the refused update changed the disk"


def test_server_stopped_mid_update_leaves_the_node_on_its_old_firmware(
        vm_project: Project, profile: Profile, built: Path, next_build: Path, node: Node,
        installed: dict[str, Any]) -> None:
    # The server holds root.img a third of the way through, and stops there for good: the test
    # sets the pace. The flasher tries again twice (cbios.fetch.tries), then gives up.
    hold = ("root.img", image_size(next_build) // 3)
    with PxeLab(next_build / PXE_DIR, node.logdir / "stopped", mode="update",
                kernel_args=f"{POWEROFF} cbios.fetch.tries=2", hold_after=hold) as lab, \
            pxe_machine(vm_project, profile, built, node, lab, "pxe-stopped") as m:
        if not lab.server.held.wait(FLASH_TIMEOUT):
            raise m.error("the flasher never fetched a third of root.img")
        threading.Thread(target=lab.server.stop).start()
        line = m.wait_report(("FLASHED", "FAILED"), FLASH_TIMEOUT)
        assert line.startswith("FAILED update: http://10.0.2.100/root.img: the transfer broke off after"), line
        assert " and 2 tries (curl status " in line, line
        assert m.wait_exit(120), "the flasher did not power off"

    with disk_machine(vm_project, profile, built, node, "after-stopped") as m:
        ready = m.wait_ready(profile.qemu.ready_timeout)
        assert "version=1.0.0 copy=root" in ready
        st = status(m)
        assert st["running"] == "root" and st["next_boot"] == "root"
        assert st["copies"]["root"]["state"] == "good"
        assert st["copies"]["spare"]["state"] == "bad"  # half written (or corrupt): never booted
        assert m.succeed("cat /var/lib/cbios-pxe-test") == "kept"
        m.shutdown()


def test_update_over_pxe_writes_the_other_copy(
        vm_project: Project, profile: Profile, built: Path, next_build: Path, node: Node,
        installed: dict[str, Any]) -> None:
    with PxeLab(next_build / PXE_DIR, node.logdir / "update", mode="update", kernel_args=POWEROFF) as lab:
        line = flash(vm_project, profile, built, node, lab, "pxe-update")
        assert line.startswith(f"FLASHED update qemu-test {NEXT_VERSION} copy=spare"), line
        receipt = lab.wait_receipt()
        assert (receipt["previous"], receipt["copies"]) == ("qemu-test 1.0.0", "spare")

    node.done["update"] = True


def test_netboot_by_the_menus_default_runs_the_updated_copy_from_the_nodes_own_lvs(
        vm_project: Project, profile: Profile, built: Path, next_build: Path, node: Node) -> None:
    """The copy the update wrote, on trial: the netboot spends its tries as GRUB would, and
    commits it once ready. (test_update boots an updated copy from the disk.)"""
    node.needs("update", "test_update_over_pxe_writes_the_other_copy")
    # No mode chosen for the node: iPXE's menu, whose default after its timeout is netboot.
    with PxeLab(next_build / PXE_DIR, node.logdir / "netboot", mode=None) as lab, \
            pxe_machine(vm_project, profile, built, node, lab, "pxe-netboot") as m:
        ready = m.wait_ready(profile.qemu.ready_timeout)
        assert f"version={NEXT_VERSION} copy=spare" in ready  # the copy the boot state names
        node.figures["netboot_to_ready_s"] = round(m.uptime(), 1)
        assert "BOOTIF=01-52-54-00-c0-00-01" in m.succeed("cat /proc/cmdline")
        assert "cbios-root: booting copy spare (lvm/root-spare, verity " in m.console_log.read_text(errors="replace")
        assert m.succeed("findmnt -n -o SOURCE /") == "/dev/mapper/cbios-root"
        assert "(lvm-root--spare)" in m.succeed("dmsetup deps -o devname cbios-root")
        assert m.succeed("findmnt -n -o SOURCE /var") == "/dev/mapper/lvm-var"
        st = status(m)
        assert (st["booted_from"], st["running"], st["next_boot"]) == ("network", "spare", "spare")
        assert (st["version"], st["copies"]["spare"]["state"]) == (NEXT_VERSION, "good")  # committed once ready
        assert (st["copies"]["root"]["version"], st["copies"]["root"]["state"]) == ("1.0.0", "good")
        assert "booted from:   network" in m.succeed("cbios status")
        assert m.succeed("cat /var/lib/cbios-pxe-test") == "kept"  # var untouched
        assert " ON " in m.succeed("slot show 31000040010 --by-type=dhcp")  # the dhcp slot, on its volume as it was
        assert {t.name for t in lab.server.transfers} == {"vmlinuz", "initrd.img"}  # nothing else fetched
        m.shutdown()
