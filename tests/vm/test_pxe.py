"""One node's life over PXE, in order, on one disk: a blank disk installed over the
network; an update from a corrupted server refused with the disk unchanged; an update cut
off by the server stopping mid-write, after which the node boots its old firmware; an
update that runs; a netboot that runs the firmware from the node's own LVs.

QEMU user networking with restrict=on: iPXE gets a chain script from QEMU's TFTP server,
and everything else over HTTP through guestfwd from the server `cbios pxe serve` runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import threading
import time
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
from cbios.pxe.lab import PxeLab
from tests.vm.conftest import NEXT_VERSION

log = logging.getLogger("cbios")

MAC = "52:54:00:c0:00:01"  # qemu-test's first NIC: the one that PXE-boots
POWEROFF = "cbios.flash.done=poweroff"  # instead of the bundle's reboot: the tests boot the disk next


@dataclasses.dataclass
class Node:
    disk: Path
    logdir: Path
    figures: dict[str, float] = dataclasses.field(default_factory=dict)


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


def pxe_machine(vm_project: Project, profile: Profile, built: Path, node: Node, lab: PxeLab, name: str) -> Machine:
    spec = disk_boot_spec(vm_project, profile, built, node.disk, persist=True)
    spec.pxe = lab.netdev_options()
    spec.boot = "once=n"  # the network first; the disk after the flasher reboots
    return Machine(spec, node.logdir, name=name)


def flash(vm_project: Project, profile: Profile, built: Path, node: Node, lab: PxeLab, name: str) -> str:
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


def zst_size(build_dir: Path) -> int:
    size: int = manifest.read(build_dir / manifest.MANIFEST)["artifacts"]["root.img.zst"]["size"]
    return size


def test_blank_node_installs_over_pxe_and_boots_from_its_disk(
        vm_project: Project, profile: Profile, built: Path, node: Node) -> None:
    sums = manifest.read(built / manifest.MANIFEST)["artifacts"]
    with PxeLab(built / PXE_DIR, node.logdir / "install", mode="install", kernel_args=POWEROFF) as lab:
        flashed = flash(vm_project, profile, built, node, lab, "pxe-install")
        assert flashed.startswith("FLASHED install qemu-test 1.0.0 on /dev/vda"), flashed
        node.figures["install_bytes"] = lab.server.bytes_sent()
        receipt = lab.wait_receipt()
        assert receipt["result"] == "FLASHED" and receipt["mode"] == "install"
        assert (receipt["mac"], receipt["object_id"], receipt["version"]) == (MAC, "31000040010", "1.0.0")
        assert receipt["root_sha256"] == sums["root.img"]["sha256"]
        assert receipt["zst_sha256"] == sums["root.img.zst"]["sha256"]
        assert receipt["bytes_received"] == 2 * zst_size(built)  # checked once, then written
        assert lab.server.bytes_sent("root.img.zst") == 2 * zst_size(built)
        assert {(t.mac, t.name) for t in lab.server.transfers} >= {(MAC, "vmlinuz"), (MAC, "initrd.img")}
        console = (node.logdir / "pxe-install.console.log").read_text(errors="replace")
        assert "cbios-flash: root.img.zst:" in console and "MiB (" in console  # progress on the console
        assert "cbios-flash: receipt: {" in console

    with disk_machine(vm_project, profile, built, node, "installed") as m:
        ready = m.wait_ready(profile.qemu.ready_timeout)
        assert "version=1.0.0 copy=root" in ready
        node.figures["installed_to_ready_s"] = round(m.uptime(), 1)
        st = status(m)
        assert st["booted_from"] == "disk" and st["running"] == "root"
        assert st["copies"]["root"]["state"] == "good" and st["copies"]["spare"]["state"] == "good"
        m.succeed("echo kept > /var/lib/cbios-pxe-test")
        assert "dhcp" in m.succeed("slot list 31000040010")
        m.shutdown()


def test_update_from_a_corrupted_server_is_refused_and_changes_nothing(
        vm_project: Project, profile: Profile, built: Path, node: Node, tmp_path: Path) -> None:
    bad = tmp_path / "bad-bundle"
    shutil.copytree(built / PXE_DIR, bad, copy_function=os.link)
    (bad / "root.img.zst").unlink()
    data = bytearray((built / PXE_DIR / "root.img.zst").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern in the middle: only the checksum can tell
    (bad / "root.img.zst").write_bytes(bytes(data))
    before = tmp_path / "before.qcow2"
    shutil.copyfile(node.disk, before)
    with PxeLab(bad, node.logdir / "corrupt", mode="update", kernel_args=POWEROFF) as lab:
        line = flash(vm_project, profile, built, node, lab, "pxe-corrupt")
        assert line.startswith("FAILED update: http://10.0.2.100/root.img.zst: checksum mismatch"), line
        receipt = lab.wait_receipt()
        assert receipt["result"] == "FAILED" and "checksum mismatch" in str(receipt["reason"])
    compare = subprocess.run(["qemu-img", "compare", "-q", str(before), str(node.disk)], check=False)
    assert compare.returncode == 0, "the refused update changed the disk"


def test_server_stopped_mid_update_leaves_the_node_on_its_old_firmware(
        vm_project: Project, profile: Profile, built: Path, next_build: Path, node: Node) -> None:
    with PxeLab(next_build / PXE_DIR, node.logdir / "stopped", mode="update", kernel_args=POWEROFF) as lab, \
            pxe_machine(vm_project, profile, built, node, lab, "pxe-stopped") as m:
        # The second transfer of root.img.zst is the one being written: stop the server in it.
        def second_transfer_under_way() -> bool:
            zst = [t for t in lab.server.transfers if t.name == "root.img.zst"]
            return len(zst) == 2 and zst[1].sent > zst_size(next_build) // 3
        deadline = time.monotonic() + FLASH_TIMEOUT
        while not second_transfer_under_way():
            assert m.running() and time.monotonic() < deadline, m.console_tail()
            time.sleep(0.05)
        threading.Thread(target=lab.server.stop).start()
        line = m.wait_report(("FLASHED", "FAILED"), FLASH_TIMEOUT)
        assert line.startswith("FAILED update: http://10.0.2.100/root.img.zst: the transfer broke off"), line
        assert m.wait_exit(120), "the flasher did not power off"

    with disk_machine(vm_project, profile, built, node, "after-stopped") as m:
        ready = m.wait_ready(profile.qemu.ready_timeout)
        assert "version=1.0.0 copy=root" in ready
        st = status(m)
        assert st["running"] == "root" and st["next_boot"] == "root"
        assert st["copies"]["root"]["state"] == "good"
        assert st["copies"]["spare"]["state"] == "bad"  # half written: never booted
        assert m.succeed("cat /var/lib/cbios-pxe-test") == "kept"
        m.shutdown()


def test_update_over_pxe_writes_the_other_copy_and_the_node_runs_it(
        vm_project: Project, profile: Profile, built: Path, next_build: Path, node: Node) -> None:
    with PxeLab(next_build / PXE_DIR, node.logdir / "update", mode="update", kernel_args=POWEROFF) as lab:
        line = flash(vm_project, profile, built, node, lab, "pxe-update")
        assert line.startswith(f"FLASHED update qemu-test {NEXT_VERSION} copy=spare"), line
        receipt = lab.wait_receipt()
        assert (receipt["previous"], receipt["copies"]) == ("qemu-test 1.0.0", "spare")

    with disk_machine(vm_project, profile, built, node, "updated") as m:
        ready = m.wait_ready(profile.qemu.ready_timeout)
        assert f"version={NEXT_VERSION} copy=spare" in ready
        node.figures["updated_to_ready_s"] = round(m.uptime(), 1)
        st = status(m)
        assert (st["running"], st["version"]) == ("spare", NEXT_VERSION)
        assert st["copies"]["spare"]["state"] == "good"  # committed once ready
        assert (st["copies"]["root"]["version"], st["copies"]["root"]["state"]) == ("1.0.0", "good")
        assert m.succeed("cat /var/lib/cbios-pxe-test") == "kept"  # var untouched
        assert " ON " in m.succeed("slot show 31000040010 --by-type=dhcp")  # the dhcp slot, on its volume as it was
        m.shutdown()


def test_netboot_by_the_menus_default_runs_the_firmware_from_the_nodes_own_lvs(
        vm_project: Project, profile: Profile, built: Path, next_build: Path, node: Node) -> None:
    vg = profile.storage.vg
    # No mode chosen for the node: iPXE's menu, whose default after its timeout is netboot.
    with PxeLab(next_build / PXE_DIR, node.logdir / "netboot", mode=None) as lab, \
            pxe_machine(vm_project, profile, built, node, lab, "pxe-netboot") as m:
        ready = m.wait_ready(profile.qemu.ready_timeout)
        assert f"version={NEXT_VERSION} copy=spare" in ready  # the copy the boot state names
        node.figures["netboot_to_ready_s"] = round(m.uptime(), 1)
        assert "BOOTIF=01-52-54-00-c0-00-01" in m.succeed("cat /proc/cmdline")
        assert "cbios-netboot: booting copy spare (lvm/root-spare, state good)" in m.console_log.read_text(
            errors="replace")
        assert m.succeed("findmnt -n -o SOURCE /") == f"/dev/mapper/{vg}-root--spare"
        assert m.succeed("findmnt -n -o SOURCE /var") == f"/dev/mapper/{vg}-var"
        st = status(m)
        assert (st["booted_from"], st["running"], st["next_boot"]) == ("network", "spare", "spare")
        assert "booted from:   network" in m.succeed("cbios status")
        assert m.succeed("cat /var/lib/cbios-pxe-test") == "kept"
        assert {t.name for t in lab.server.transfers} == {"vmlinuz", "initrd.img"}  # nothing else fetched
        m.shutdown()
