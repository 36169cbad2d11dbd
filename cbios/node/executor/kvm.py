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
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbios.node.command import run as _run
from cbios.node.executor import lxcconf
from cbios.node.wire import Failed

RUN = Path("/run/cbios/kvm")
QEMU = "qemu-system-x86_64"
BOOT_FILES = ("vmlinuz", "initrd.img", "cmdline")
STOP_KILL_TIMEOUT = 10
RUNAS = "cbios-vm"  # overlays/base/usr/lib/sysusers.d/cbios.conf
START_TIMEOUT = 60


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

    def disk(self, iid: int) -> str:
        return lxcconf.device(self.vg, self.eid, iid)


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
           "-chardev", f"file,id=console,path={vm.console_log},append=on", "-serial", "chardev:console",
           "-qmp", f"unix:{vm.qmp},server=on,wait=off",
           # The guest is not trusted: QEMU gives up root once its devices are open, and
           # its system calls are filtered (no new processes, no obsolete calls).
           "-runas", RUNAS, "-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny"]
    for iid in vm.volumes:
        out += ["-drive", f"file={vm.disk(iid)},format=raw,if=virtio,cache=none"]
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


MAX_BOOT_FILE = {"vmlinuz": 256 << 20, "initrd.img": 1 << 30, "cmdline": 2048}


def copy_boot(device: str, dest: Path) -> str:
    """boot/{vmlinuz,initrd.img,cmdline} of the slot's system disk DEVICE into DEST; the
    command line. Read with debugfs: the guest writes that file system, so the node's
    kernel never mounts it, and debugfs reads nothing but it (a link cannot lead out of
    it). Only regular files of bounded size; the command line one line of printable ASCII."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in BOOT_FILES:
        info = _debugfs(device, f"stat boot/{name}")
        kind, size = re.search(r"\bType: (\w+)", info), re.search(r"\bSize: (\d+)", info)
        if kind is None or size is None:
            raise Failed(f"its system disk has no boot/{name}: reinstall the slot")
        if kind.group(1) != "regular" or int(size.group(1)) > MAX_BOOT_FILE[name]:
            raise Failed(f"boot/{name} on its system disk is not a file of at most {MAX_BOOT_FILE[name]} bytes")
        out = dest / name
        out.unlink(missing_ok=True)
        _debugfs(device, f"dump boot/{name} {out}")
        if not out.is_file() or out.stat().st_size != int(size.group(1)):
            raise Failed(f"boot/{name} on its system disk could not be read whole")
    cmdline = (dest / "cmdline").read_bytes().strip()
    if not re.fullmatch(rb"[\x20-\x7e]*", cmdline):
        raise Failed("boot/cmdline on its system disk is not one line of printable ASCII")
    return cmdline.decode()


def _debugfs(device: str, request: str) -> str:
    """debugfs's answer to REQUEST on DEVICE, read-only. A file it does not find is a line
    on its standard error, with exit status 0: the answer is then empty."""
    return _run(["debugfs", "-R", request, device])


def start(vm: Vm) -> None:
    """Copy the kernel, initrd and command line from its system disk, put the tap on the
    bridge, start QEMU in its unit, and wait until the guest runs."""
    try:
        cmdline = copy_boot(vm.disk(0), vm.run_dir)
    except Failed as e:
        raise Failed(f"slot {vm.eid}: {e}") from None
    vm.qmp.unlink(missing_ok=True)
    errors = vm.run_dir / "qemu.log"
    errors.unlink(missing_ok=True)
    Path(vm.console_log).parent.mkdir(parents=True, exist_ok=True)
    lxcconf.rotated(Path(vm.console_log))
    _tap_up(vm)
    try:
        # Before=cbios-slots.service: at shutdown the VM is stopped after that unit's power
        # button. ExecStopPost: the tap goes however QEMU ended (the guest's own power-off too).
        _run(["systemd-run", f"--unit={vm.unit}", "--collect", "--property=KillMode=mixed",
              "--property=Before=cbios-slots.service", f"--property=StandardError=file:{errors}",
              f"--property=ExecStopPost=-/sbin/ip link del {vm.tap}",
              f"--property=TimeoutStopSec={STOP_KILL_TIMEOUT}", f"--description=CBIOS slot {vm.eid} (kvm-system)",
              *(f"--property={p}" for p in hardening(vm)), "--", *argv(vm, cmdline)])
        _wait_running(vm, errors)
    except Failed:
        _run(["systemctl", "stop", vm.unit], timeout=STOP_KILL_TIMEOUT + 30)
        _tap_down(vm)
        raise


def hardening(vm: Vm) -> list[str]:
    """The unit's confinement: the node read-only but for the VM's run directory and its
    console log, the devices it runs (its volumes, the tap's clone device, KVM) and no other."""
    return ["NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
            "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes", "ProtectClock=yes", "ProtectHostname=yes", "RestrictRealtime=yes",
            "RestrictSUIDSGID=yes", "LockPersonality=yes", f"ReadWritePaths={vm.run_dir} {Path(vm.console_log).parent}",
            "DevicePolicy=closed", "DeviceAllow=/dev/net/tun rw",
            *(["DeviceAllow=/dev/kvm rw"] if vm.accel == "kvm" else []),
            *(f"DeviceAllow={vm.disk(iid)} rw" for iid in vm.volumes)]


def _wait_running(vm: Vm, errors: Path) -> None:
    """Until QEMU answers on its monitor that the guest runs: its machine is made, its
    disks and tap open (its monitor answers only from its main loop)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if state(vm)["state"] != "RUNNING":
            lines = errors.read_text(errors="replace").strip().splitlines() if errors.exists() else []
            raise Failed(f"slot {vm.eid}: QEMU ended at start: {lines[-1] if lines else 'no message'}")
        try:
            status = qmp(vm, "query-status")
            if status.get("status") == "running":
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise Failed(f"slot {vm.eid}: QEMU's guest not running within {START_TIMEOUT} s")
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
    shutil.rmtree(vm.run_dir, ignore_errors=True)
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
    return {"state": st["state"], "pid": st["pid"], "vcpus": vm.cpus, "memory_mib": vm.memory,
            "accel": vm.accel, "unit": vm.unit, "tap": vm.tap if st["state"] == "RUNNING" else None,
            "mac": mac_address(vm.node_id, vm.eid)}


def _tap_up(vm: Vm) -> None:
    if not Path(f"/sys/class/net/{vm.tap}").exists():
        _run(["ip", "tuntap", "add", "dev", vm.tap, "mode", "tap"])
    _run(["ip", "link", "set", vm.tap, "master", vm.bridge, "up"])


def _tap_down(vm: Vm) -> None:
    if Path(f"/sys/class/net/{vm.tap}").exists():
        _run(["ip", "link", "del", vm.tap])
