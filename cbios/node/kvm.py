"""kvm-system slots: a VM that CB-Executor runs with QEMU, as a transient systemd unit.

The slot's system disk is its volume 0 (slot<eid>-0), further volumes are further disks.
Its kernel, initrd and command line are read from its system disk (boot/) at every start,
so the slot boots what its disk holds, as a machine boots its own. Its NIC is a tap,
tap<eid>, on the node's bridge; its serial console goes to the console log; QMP on a
socket of its own is how it is asked to shut down (the ACPI power button). KVM when the
node has /dev/kvm, TCG otherwise. The unit (cbios-slot<eid>.service) keeps the VM apart
from CB-Executor: a restart of the executor leaves running VMs running."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbios.node.command import run as _run
from cbios.node.slotdefs import volume_name
from cbios.node.wire import Failed

RUN = Path("/run/cbios/kvm")
QEMU = "qemu-system-x86_64"
BOOT_FILES = ("vmlinuz", "initrd.img", "cmdline")
STOP_KILL_TIMEOUT = 10


@dataclass(frozen=True)
class Vm:
    eid: int
    vg: str
    bridge: str
    node_id: str
    memory: int  # MiB
    cpus: int
    volumes: tuple[int, ...]
    console_log: str
    accel: str = "tcg"

    @property
    def unit(self) -> str:
        return f"cbios-slot{self.eid}.service"

    @property
    def tap(self) -> str:
        return f"tap{self.eid}"

    @property
    def run_dir(self) -> Path:
        return RUN / f"slot{self.eid}"

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"


def accel() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def mac_address(node_id: str, eid: int) -> str:
    """Stable per node and slot, in QEMU's OUI (LXC's is for containers)."""
    digest = hashlib.sha256(f"{node_id}:vm:{eid}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def argv(vm: Vm, cmdline: str) -> list[str]:
    """QEMU's command line: no display, no defaults, the disks and the tap, console to a file."""
    out = [QEMU, "-name", f"slot{vm.eid},process=cbios-slot{vm.eid}", "-machine", "pc", "-accel", vm.accel,
           *(["-cpu", "host"] if vm.accel == "kvm" else []),
           "-m", str(vm.memory), "-smp", str(vm.cpus),
           "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
           "-kernel", str(vm.run_dir / "vmlinuz"), "-initrd", str(vm.run_dir / "initrd.img"), "-append", cmdline,
           "-chardev", f"file,id=console,path={vm.console_log}", "-serial", "chardev:console",
           "-qmp", f"unix:{vm.qmp},server=on,wait=off"]
    for iid in vm.volumes:
        out += ["-drive", f"file=/dev/mapper/{vm.vg}-{volume_name(vm.eid, iid)},format=raw,if=virtio,cache=none"]
    out += ["-netdev", f"tap,id=net0,ifname={vm.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac_address(vm.node_id, vm.eid)},romfile="]
    return out


def state(vm: Vm) -> dict[str, Any]:
    """RUNNING (the unit is active), STOPPING, or STOPPED; the QEMU process."""
    out = _run(["systemctl", "show", "-p", "ActiveState", "-p", "MainPID", vm.unit])
    info = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    active = info.get("ActiveState", "inactive")
    name = {"active": "RUNNING", "activating": "RUNNING", "deactivating": "STOPPING"}.get(active, "STOPPED")
    pid = int(info.get("MainPID", "0") or 0)
    return {"eid": vm.eid, "state": name, "pid": pid or None}


def start(vm: Vm, boot: Path) -> None:
    """Copy the kernel, initrd and command line from BOOT (its system disk's boot/,
    mounted), put the tap on the bridge, and start QEMU in its unit."""
    vm.run_dir.mkdir(parents=True, exist_ok=True)
    for name in BOOT_FILES:
        src = boot / name
        if not src.is_file():
            raise Failed(f"slot {vm.eid}: its system disk has no boot/{name}: reinstall the slot")
        (vm.run_dir / name).write_bytes(src.read_bytes())
    cmdline = (vm.run_dir / "cmdline").read_text().strip()
    vm.qmp.unlink(missing_ok=True)
    Path(vm.console_log).parent.mkdir(parents=True, exist_ok=True)
    _tap_up(vm)
    # Before=cbios-slots.service: at shutdown the VM is stopped after that unit's power button.
    _run(["systemd-run", f"--unit={vm.unit}", "--collect", "--property=KillMode=mixed",
          "--property=Before=cbios-slots.service",
          f"--property=TimeoutStopSec={STOP_KILL_TIMEOUT}", f"--description=CBIOS slot {vm.eid} (kvm-system)",
          "--", *argv(vm, cmdline)])
    deadline = time.monotonic() + 30
    while not vm.qmp.exists():  # QEMU is up once its monitor listens
        if state(vm)["state"] != "RUNNING":
            tail = _run(["journalctl", "-u", vm.unit, "-n", "3", "-o", "cat", "--no-pager"]).strip()
            raise Failed(f"slot {vm.eid}: QEMU ended at start: {tail.splitlines()[-1] if tail else 'no output'}")
        if time.monotonic() > deadline:
            raise Failed(f"slot {vm.eid}: QEMU's monitor not up within 30 s")
        time.sleep(0.2)


def stop(vm: Vm, timeout: int) -> dict[str, Any]:
    """The ACPI power button, then up to TIMEOUT s for the guest to power off; then the kill.
    Says which it took."""
    how = "powered off"
    if state(vm)["state"] != "STOPPED":
        try:
            qmp(vm, "system_powerdown")
        except (OSError, ValueError) as e:
            how = f"killed (no monitor: {e})"
        deadline = time.monotonic() + timeout
        while how == "powered off" and state(vm)["state"] != "STOPPED":
            if time.monotonic() > deadline:
                how = f"killed (still running {timeout} s after the power button)"
                break
            time.sleep(0.5)
        if how != "powered off":
            _run(["systemctl", "stop", vm.unit], timeout=STOP_KILL_TIMEOUT + 30)
    _tap_down(vm)
    return {**state(vm), "stopped": how}


def qmp(vm: Vm, command: str) -> Any:
    """One QMP command, after the greeting and capabilities negotiation."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(vm.qmp))
        f = s.makefile("rwb")
        json.loads(f.readline())  # the greeting
        result: Any = None
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:  # events may come before the answer
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    break
            if "error" in msg:
                raise ValueError(f"QMP {cmd}: {msg['error'].get('desc')}")
            result = msg["return"]
        return result


def runtime(vm: Vm) -> dict[str, Any]:
    st = state(vm)
    usage: dict[str, float] = {}
    if st["state"] == "RUNNING":
        cg = Path("/sys/fs/cgroup/system.slice") / vm.unit
        try:
            stat = dict(line.split() for line in (cg / "cpu.stat").read_text().splitlines())
            usage = {"cpu_seconds": int(stat["usage_usec"]) / 1e6,
                     "memory_bytes": int((cg / "memory.current").read_text())}
        except (OSError, KeyError, ValueError):
            pass
    return {"state": st["state"], "pid": st["pid"], "vcpus": vm.cpus, "memory_mib": vm.memory,
            "accel": vm.accel, "unit": vm.unit, "tap": vm.tap if st["state"] == "RUNNING" else None,
            "mac": mac_address(vm.node_id, vm.eid), **usage}


def _tap_up(vm: Vm) -> None:
    if not Path(f"/sys/class/net/{vm.tap}").exists():
        _run(["ip", "tuntap", "add", "dev", vm.tap, "mode", "tap"])
    _run(["ip", "link", "set", vm.tap, "master", vm.bridge, "up"])


def _tap_down(vm: Vm) -> None:
    if Path(f"/sys/class/net/{vm.tap}").exists():
        _run(["ip", "link", "del", vm.tap])
