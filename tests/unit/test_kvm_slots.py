"""kvm-system slots, the code around QEMU: its command line, the system disk's initrd
contents (modules in load order, a static busybox), the template's checks, the CLI's view.
That the VM boots, answers and powers off is shown in tests/vm/test_slots.py."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cbios.errors import ProfileError
from cbios.node import slotcli
from cbios.node.executor import kvm
from cbios.node.wire import Failed
from cbios.profile import template as slot_template
from cbios.project import Project
from cbios.vmimage import is_static, module_paths

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
"""


def test_modules_come_after_what_they_need_each_once() -> None:
    assert module_paths(MODULES_DEP, ["virtio_net", "virtio", "crc32c_intel"]) == [
        "kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko", "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko", "kernel/drivers/net/virtio_net.ko", "kernel/arch/x86/crypto/crc32c-intel.ko"]
    with pytest.raises(KeyError):
        module_paths(MODULES_DEP, ["ext4"])


def _elf(path: Path, program_headers: list[int]) -> Path:
    """A 64-bit ELF header and program headers of the given types: enough for is_static."""
    head = bytearray(64)
    head[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", head, 0x20, 64)
    struct.pack_into("<HH", head, 0x36, 56, len(program_headers))
    path.write_bytes(bytes(head) + b"".join(struct.pack("<I", t) + bytes(52) for t in program_headers))
    return path


def test_a_busybox_with_a_program_interpreter_is_not_static(tmp_path: Path) -> None:
    assert is_static(_elf(tmp_path / "static", [1, 1, 4]))
    assert not is_static(_elf(tmp_path / "dynamic", [6, 3, 1]))
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert not is_static(tmp_path / "script")


def _vm(accel: str) -> kvm.Vm:
    return kvm.Vm(eid=7, vg="lvm", bridge="br0", node_id="31000040010", memory=192, cpus=1, volumes=(0, 1),
                  console_log="/var/log/cbios/slots/slot7.console.log", accel=accel)


def test_qemu_command_line_of_a_slot() -> None:
    argv = kvm.argv(_vm("tcg"), "console=ttyS0 quiet")
    line = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64" and "-accel tcg" in line and "-cpu host" not in line
    assert "-m 192 -smp 1" in line and "-no-reboot" in line and "-nodefaults" in line
    assert "-kernel /run/cbios/kvm/slot7/vmlinuz -initrd /run/cbios/kvm/slot7/initrd.img" in line
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet"
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert [d.split(",")[0] for d in drives] == ["file=/dev/mapper/lvm-slot7-0", "file=/dev/mapper/lvm-slot7-1"]
    assert "tap,id=net0,ifname=tap7,script=no,downscript=no" in argv
    assert f"mac={kvm.mac_address('31000040010', 7)}" in line
    assert "file,id=console,path=/var/log/cbios/slots/slot7.console.log,append=on" in argv
    assert "unix:/run/cbios/kvm/slot7/qmp.sock,server=on,wait=off" in argv
    assert "-accel kvm -cpu host" in " ".join(kvm.argv(_vm("kvm"), ""))


def test_mac_addresses_are_stable_and_apart_per_node_and_slot() -> None:
    mac = kvm.mac_address("31000040010", 7)
    assert mac == kvm.mac_address("31000040010", 7) and mac.startswith("52:54:00:")
    assert len({mac, kvm.mac_address("31000040010", 6), kvm.mac_address("31000041010", 7)}) == 3


def test_a_kvm_template_needs_its_vm_and_only_kvm_templates_have_one(project: Project, tmp_path: Path) -> None:
    compute = slot_template.load_template(project, "compute")
    assert compute.vm is not None and compute.vm.memory == 192 and "virtio_net" in compute.vm.modules
    fake = Project(tmp_path, build_dir=tmp_path / "build")
    for name, yaml in (("novm", "type: kvm-system\nversion: '1'\ndescription: x\n"),
                       ("lxcvm", "type: lxc-system\nversion: '1'\ndescription: x\nvm: {memory: 128}\n")):
        d = fake.slot_templates / name
        (d / "vm").mkdir(parents=True)
        for f in ("slot.yaml", "health", "vm/init", "mkosi.conf"):
            (d / f).write_text(yaml if f == "slot.yaml" else "")
        with pytest.raises(ProfileError) as err:
            slot_template.load_template(fake, name)
        assert ("a vm: section" if name == "novm" else "vm: is for kvm-system templates") in str(err.value)


def test_show_runtime_of_a_vm_names_its_process_cpus_memory_and_acceleration() -> None:
    info = {"location": "31000040775", "parent": "31000040010", "type": "compute", "kind": "kvm-system",
            "version": "1.0.0", "status": "ON", "state": "RUNNING", "pid": 4242, "unit": "cbios-slot7.service",
            "vcpus": 1, "memory_mib": 192, "accel": "tcg", "tap": "tap7", "mac": "52:54:00:aa:bb:cc",
            "bridge": "br0", "address": "10.0.249.70/24", "ips": ["10.0.249.70/24"], "cpu_seconds": 12.5,
            "memory_bytes": 300 << 20, "health": {"ok": True, "output": "compute70 ready"},
            "volumes": [{"volume": "slot7-0", "device": "/dev/mapper/lvm-slot7-0", "size": 64 << 20,
                         "mount": "/dev/vda in the VM"}],
            "console_log": "/var/log/cbios/slots/slot7.console.log"}
    text = slotcli.runtime_text(info)
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())
    assert rows["PID"] == "4242 (qemu-system-x86_64, cbios-slot7.service)"
    assert rows["vCPUs"] == "1" and rows["VM memory"] == "192 MiB" and rows["Acceleration"] == "TCG"
    assert rows["Interface"] == "eth0 (52:54:00:aa:bb:cc) <-> tap7 on br0"
    assert rows["Volume slot7-0"] == "/dev/mapper/lvm-slot7-0 64 MiB on /dev/vda in the VM"
    assert rows["Console log"] == "/var/log/cbios/slots/slot7.console.log"


def _disk(tmp_path: Path, cmdline: bytes = b"console=ttyS0 quiet\n", plant: str = "") -> str:
    """A system disk as the guest leaves it: an ext4 image with boot/, made by mkfs.ext4 -d."""
    tree = tmp_path / "tree"
    boot = tree / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(b"kernel")
    (boot / "initrd.img").write_bytes(b"initrd")
    (boot / "cmdline").write_bytes(cmdline)
    (tree / "etc").mkdir()
    (tree / "etc" / "shadow").write_text("root:secret\n")
    if plant == "link":
        (boot / "cmdline").unlink()
        (boot / "cmdline").symlink_to("/etc/shadow")
    elif plant == "fifo":
        (boot / "vmlinuz").unlink()
        os.mkfifo(boot / "vmlinuz")
    elif plant == "no-boot":
        shutil.rmtree(boot)
    image = tmp_path / "disk.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"], check=True)
    return str(image)


def test_boot_files_are_read_from_the_slots_disk_without_mounting_it(tmp_path: Path) -> None:
    assert kvm.copy_boot(_disk(tmp_path), tmp_path / "run") == "console=ttyS0 quiet"
    assert (tmp_path / "run" / "vmlinuz").read_bytes() == b"kernel"
    assert (tmp_path / "run" / "initrd.img").read_bytes() == b"initrd"


@pytest.mark.parametrize(("plant", "message"), [
    ("link", r"boot/cmdline on its system disk is not a file of at most"),  # a link: not followed
    ("fifo", r"boot/vmlinuz on its system disk is not a file of at most"),  # a FIFO: not waited on
    ("no-boot", r"its system disk has no boot/vmlinuz"),
])
def test_what_the_guest_left_instead_of_its_boot_files_is_refused(tmp_path: Path, plant: str, message: str) -> None:
    with pytest.raises(Failed, match=message):
        kvm.copy_boot(_disk(tmp_path, plant=plant), tmp_path / "run")
    assert not (tmp_path / "run" / "cmdline").exists() or b"secret" not in (tmp_path / "run" / "cmdline").read_bytes()


def test_a_cmdline_that_is_not_one_printable_line_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Failed, match="printable ASCII"):
        kvm.copy_boot(_disk(tmp_path, b"console=ttyS0\ninit=/bin/sh\xff\n"), tmp_path / "run")


def test_qemu_runs_unprivileged_sandboxed_and_confined_to_its_devices() -> None:
    vm = _vm("tcg")
    argv = kvm.argv(vm, "")
    assert argv[argv.index("-runas") + 1] == kvm.RUNAS
    assert argv[argv.index("-sandbox") + 1].startswith("on,")
    props = kvm.hardening(vm)
    assert "DevicePolicy=closed" in props and "NoNewPrivileges=yes" in props and "ProtectSystem=strict" in props
    assert [p for p in props if p.startswith("DeviceAllow=/dev/mapper")] == [
        "DeviceAllow=/dev/mapper/lvm-slot7-0 rw", "DeviceAllow=/dev/mapper/lvm-slot7-1 rw"]
