"""QEMU command lines, and the choice between KVM and TCG.

The build machines have a /dev/kvm on which guests hang, so KVM is probed once, with a
bound, by booting the image's own kernel to a deliberate panic; CBIOS_ACCEL=kvm|tcg
overrides the probe."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cbios.errors import CbiosError

log = logging.getLogger("cbios")

QEMU = "qemu-system-x86_64"
# On QEMU's user network, the address QEMU forwards (guestfwd) to a server on this machine:
# the PXE lab's and `cbios pxe publish`'s, as a VM reaches them.
GUEST_FORWARD = "10.0.2.100"
PROBE_TIMEOUT = 30.0
KVM_DEVICE = Path("/dev/kvm")
ACCEL_CACHE = "accel.json"  # the probe's verdict, in the build directory
READY_PORT = "org.cbios.ready"
SHELL_PORT = "org.cbios.shell"


@dataclass
class VmSpec:
    """What to boot and how: everything a QEMU command line is made from."""

    memory: int
    cpus: int
    accel: str
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    drives: list[str] = field(default_factory=list)  # -drive values
    serial: str = "mon:stdio"  # or "file:PATH"
    ready_file: Path | None = None
    shell_socket: Path | None = None
    qmp_socket: Path | None = None
    netdev: str = "user,id=n0,restrict=on"
    macs: list[str] = field(default_factory=list)  # one NIC a MAC on netdevs n0, n1, ...; none: one NIC
    no_reboot: bool = True  # a guest reboot ends QEMU (kernel boots); disk boots may reboot
    pxe: str = ""  # extra options of netdev n0 (tftp=, bootfile=, guestfwd=): the first NIC boots over PXE
    boot: str = ""  # -boot value, e.g. "once=n": PXE first, the disk after a reboot
    pxe_rom: Path | None = None  # the first NIC's iPXE ROM, if not QEMU's own (cbios/pxe/newer_ipxe.py)
    links: dict[int, str] = field(default_factory=dict)  # NIC index -> its own netdev, e.g. "socket,udp=..."

    def argv(self) -> list[str]:
        cpu = "host" if self.accel == "kvm" else "max"
        argv = [QEMU, "-accel", self.accel, "-cpu", cpu, "-m", str(self.memory), "-smp", str(self.cpus),
                "-nodefaults", "-no-user-config", "-display", "none",
                *(["-no-reboot"] if self.no_reboot else []),
                "-serial", self.serial, "-device", "virtio-rng-pci",
                # A board's watchdog, as nodes have: systemd pings it (the profile's boot.watchdog).
                "-device", "i6300esb", "-action", "watchdog=reset"]
        for i, mac in enumerate(self.macs or [""]):
            netdev = f"{self.links[i]},id=n{i}" if i in self.links else self.netdev.replace("id=n0", f"id=n{i}")
            argv += ["-netdev", netdev + (f",{self.pxe}" if self.pxe and i == 0 and 0 not in self.links else "")]
            argv += ["-device", f"virtio-net-pci,netdev=n{i}" + (f",mac={mac}" if mac else "")
                     # iPXE since 2020 is built for virtio's modern PCI id only: the NIC drops the legacy one
                     + (f",disable-legacy=on,romfile={self.pxe_rom}" if self.pxe_rom and i == 0 else "")]
        if self.boot:
            argv += ["-boot", self.boot]
        if self.kernel:
            argv += ["-kernel", str(self.kernel)]
        if self.initrd:
            argv += ["-initrd", str(self.initrd)]
        if self.cmdline:
            argv += ["-append", self.cmdline]
        for drive in self.drives:
            argv += ["-drive", drive]
        if self.ready_file or self.shell_socket:
            argv += ["-device", "virtio-serial-pci"]
        if self.ready_file:
            argv += ["-chardev", f"file,id=ready,path={self.ready_file}",
                     "-device", f"virtserialport,chardev=ready,name={READY_PORT}"]
        if self.shell_socket:
            argv += ["-chardev", f"socket,id=shell,path={self.shell_socket},server=on,wait=off",
                     "-device", f"virtserialport,chardev=shell,name={SHELL_PORT}"]
        if self.qmp_socket:
            argv += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        return argv


def choose_accel(kernel: Path, state_dir: Path) -> str:
    """'kvm' or 'tcg': $CBIOS_ACCEL, else a cached probe result for this boot of the host."""
    forced = os.environ.get("CBIOS_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise CbiosError(f"CBIOS_ACCEL={forced}: must be 'kvm' or 'tcg'")
        return forced
    if kvm_unusable() is not None:
        return "tcg"
    cached = probed_accel(state_dir)
    if cached is not None:
        return cached
    accel = "kvm" if probe_kvm(kernel) else "tcg"
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / ACCEL_CACHE).write_text(json.dumps({"boot_id": _boot_id(), "accel": accel}) + "\n")
    return accel


def kvm_unusable() -> str | None:
    """Why KVM cannot even be tried here (then TCG it is, with no probe); None when it can."""
    if not KVM_DEVICE.exists():
        return f"no {KVM_DEVICE} (no kvm module loaded, or no virtualization in this CPU or VM)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE}: no read-write access for this user"
    return None


def probed_accel(state_dir: Path) -> str | None:
    """The probe's verdict ('kvm' or 'tcg') in STATE_DIR, if it ran since the host booted."""
    try:
        cached = json.loads((state_dir / ACCEL_CACHE).read_text())
        if cached.get("boot_id") == _boot_id():
            return str(cached["accel"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def probe_kvm(kernel: Path) -> bool:
    """Does a KVM guest get anywhere? Boot KERNEL with no root to a panic, within a bound."""
    log.info("‣ Probing KVM (at most %.0f s)", PROBE_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="cbios-kvm-probe-") as tmp:
        console = Path(tmp) / "console"
        spec = VmSpec(memory=256, cpus=1, accel="kvm", kernel=kernel,
                      cmdline="console=ttyS0 panic=-1 root=/dev/cbios-probe-none",
                      serial=f"file:{console}", netdev="user,id=n0,restrict=on")
        start = time.monotonic()
        proc = subprocess.Popen(spec.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = console.read_text(errors="replace") if console.exists() else ""
        works = "Kernel panic" in text
        log.info("  KVM %s (%.1f s); using %s", "works" if works else "does not work",
                 time.monotonic() - start, "kvm" if works else "tcg")
        return works
