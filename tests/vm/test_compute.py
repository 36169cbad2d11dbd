"""A management node boots its compute nodes, in order, on one virtual network: qemu-test
takes a compute release into CB-Manager's image store (`slot image add`, over HTTP), and
its boot-server slot is installed with the nodes it boots. A compute node with no disk
then boots over PXE, diskless, to ready; a second one, set to install, installs to its own
disk and boots from it. Both receipts show in the slot, and the image they boot cannot be
removed from the store.

The network is a VLAN switch on this machine (vlan_switch.py): the management node's ctl
is its trunk (br0 is on the management VLAN, ctl.249); the compute nodes are on access
ports. The site's DHCP server is qemu-test's dhcp slot; the boot server answers beside it
as proxy-DHCP. QEMU's virtio NIC boots iPXE from its own ROM. The release reaches the
management node from this machine through QEMU's user network on its second NIC."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbios.boot import disk_boot_spec
from cbios.disk import disk_size, overlay
from cbios.machine import Machine
from cbios.node import contract
from cbios.profile import Profile, load_profile
from cbios.project import Project
from cbios.pxe.lab import GUEST_SERVER, PxeLab
from cbios.qemu import VmSpec, choose_accel
from tests.vm.conftest import ready_machine
from tests.vm.images import COMPUTE_PROFILE, compute_release
from tests.vm.vlan_switch import VlanSwitch

log = logging.getLogger("cbios")

NODE = "31000040010"
BOOT = "31000040475"  # the boot-server slot (eid 4), at 10.0.249.4
DISKLESS, INSTALL = "52:54:00:c0:10:01", "52:54:00:c0:10:02"
VERSION = "1.0.0"
# The management node reaches this machine's HTTP server on its second NIC (svn).
JOIN_SVN = "ip -4 addr show dev svn | grep -q 10.0.2.15/ || ip addr add 10.0.2.15/24 dev svn"


@pytest.fixture(scope="module")
def release(vm_project: Project) -> Path:
    return compute_release(vm_project)


@pytest.fixture(scope="module")
def compute_profile(vm_project: Project) -> Profile:
    return load_profile(vm_project, COMPUTE_PROFILE)


@pytest.fixture(scope="module")
def switch(profile: Profile) -> Iterator[VlanSwitch]:
    with VlanSwitch(profile.network.vlan, access_ports=2) as s:
        yield s


@pytest.fixture(scope="module")
def lab(release: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PxeLab]:
    """This machine's HTTP server, serving the release file alone."""
    with PxeLab(release.parent, tmp_path_factory.mktemp("compute-lab"), mode=None) as lab:
        lab.server.files = {release.name}
        yield lab


@pytest.fixture(scope="module")
def manager(vm_project: Project, profile: Profile, built: Path, node_disk: Path, switch: VlanSwitch,
            lab: PxeLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """qemu-test from (a copy of) its disk: ctl on the switch's trunk, svn on QEMU's user network."""
    disk = overlay(node_disk, tmp_path_factory.mktemp("compute") / "manager.qcow2")
    spec = disk_boot_spec(vm_project, profile, built, disk, persist=True)
    spec.links[0] = switch.netdev(0)
    spec.links[1] = f"user,restrict=on,{lab.guestfwd()}"
    yield from ready_machine(Machine(spec, disk.parent / "vm", name="manager"), profile)


def compute_vm(vm_project: Project, compute_profile: Profile, switch: VlanSwitch, port: int, mac: str,
               logdir: Path, name: str, disk: Path | None = None) -> Machine:
    """A compute node on an access port: PXE first; DISK, if any, its only drive."""
    out = vm_project.build / COMPUTE_PROFILE
    spec = VmSpec(memory=compute_profile.qemu.memory, cpus=compute_profile.qemu.cpus,
                  accel=choose_accel(out / "vmlinuz", vm_project.build), macs=[mac], no_reboot=False,
                  boot="order=nc", links={0: switch.netdev(port)},
                  drives=[f"file={disk},format=qcow2,if=virtio"] if disk else [])
    return Machine(spec, logdir, name=name)


@pytest.fixture(scope="module")
def served(manager: Machine, release: Path) -> dict[str, str]:
    """The release in the store, and the boot server installed with the two nodes: what
    every test here needs, whichever runs first (or alone)."""
    manager.succeed(JOIN_SVN)
    added = manager.succeed(f"slot image add http://{GUEST_SERVER}/{release.name}", timeout=900)
    nodes = f"{DISKLESS}={COMPUTE_PROFILE}@{VERSION}:diskless,{INSTALL}={COMPUTE_PROFILE}@{VERSION}:install"
    manager.succeed(f"slot remove {BOOT}", timeout=120)
    installed = manager.succeed(f"slot install boot-server {BOOT} --address 10.0.249.4/24 --hostname boot4 "
                                f"--param nodes={nodes}", timeout=300)
    return {"added": added, "installed": installed}


def test_a_compute_release_goes_into_the_store_and_a_boot_server_serves_it(
        manager: Machine, served: dict[str, str]) -> None:
    assert served["added"].startswith(f"{COMPUTE_PROFILE} {VERSION}: stored (")
    assert re.search(rf"{BOOT}\s+boot-server .* ON ", served["installed"]), served["installed"]
    runtime = manager.succeed(f"slot show-runtime {BOOT}")
    assert re.search(r"^Receipts\s+none$", runtime, re.M), runtime
    store = contract.slot_mounts(int(BOOT[-3])) / contract.STORE_MOUNT
    assert manager.succeed(f"findmnt -no OPTIONS {store}").startswith("ro,")


@pytest.mark.usefixtures("served")
def test_a_compute_node_with_no_disk_boots_diskless_from_the_boot_server(
        vm_project: Project, compute_profile: Profile, manager: Machine, switch: VlanSwitch,
        tmp_path: Path) -> None:
    with compute_vm(vm_project, compute_profile, switch, 1, DISKLESS, tmp_path, "diskless") as m:
        m.wait_ready(compute_profile.qemu.ready_timeout)
        log.info("compute figures: diskless power-on to ready %.1f s", m.uptime())
        assert "booted from:   network (diskless): the firmware runs from RAM" in m.succeed("cbios status")
        assert m.succeed("lsblk -dno NAME | grep -c '^vd' || true") == "0"
        assert m.succeed("findmnt -no SOURCE /").startswith("/dev/mapper/cbios-root")
        m.shutdown()
    runtime = manager.succeed(f"slot show-runtime {BOOT}")
    receipt = re.search(rf"^Receipt {DISKLESS}\s+(.*)$", runtime, re.M)
    assert receipt and receipt.group(1).startswith(f"BOOTED diskless {COMPUTE_PROFILE} {VERSION} at "), runtime
    sent = json.loads(manager.succeed(f"slot show-runtime {BOOT} --json"))["receipts"]
    log.info("compute figures: diskless bytes received %s", [r.get("bytes_received") for r in sent])


@pytest.mark.usefixtures("served")
def test_a_compute_node_set_to_install_installs_and_then_boots_from_its_disk(
        vm_project: Project, compute_profile: Profile, manager: Machine, switch: VlanSwitch,
        tmp_path: Path) -> None:
    disk = tmp_path / "compute.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk),
                    str(disk_size(vm_project, compute_profile))], check=True)
    with compute_vm(vm_project, compute_profile, switch, 2, INSTALL, tmp_path, "install", disk) as m:
        flashed = m.wait_report(("FLASHED",), compute_profile.qemu.ready_timeout)
        assert flashed.startswith(f"FLASHED install {COMPUTE_PROFILE} {VERSION} on /dev/vda")
        log.info("compute figures: install flashed after %.1f s", m.uptime())
        start = m.uptime()
        ready = m.wait_ready(compute_profile.qemu.ready_timeout)  # the flasher reboots; PXE sends it to its disk
        log.info("compute figures: from disk, reboot to ready %.1f s", m.uptime() - start)
        assert "copy=root" in ready
        status = json.loads(m.succeed("cbios status --json"))
        assert (status["booted_from"], status["running"], status["version"]) == ("disk", "root", VERSION)
        m.shutdown()
    slot_log = json.loads(manager.succeed(f"slot show-runtime {BOOT} --json"))["console_log"]
    assert f"{INSTALL}: installed {COMPUTE_PROFILE} {VERSION}: boots from its disk" in manager.succeed(
        f"cat {slot_log}")
    runtime = manager.succeed(f"slot show-runtime {BOOT}")
    receipt = re.search(rf"^Receipt {INSTALL}\s+(.*)$", runtime, re.M)
    assert receipt and receipt.group(1).startswith(f"FLASHED install {COMPUTE_PROFILE} {VERSION} at "), runtime
    # What the boot server boots stays in the store.
    rc, out = manager.execute(f"slot image remove {COMPUTE_PROFILE} {VERSION}")
    assert rc == 2 and f"boot server {BOOT} boots {DISKLESS}, {INSTALL} from it" in out, out
