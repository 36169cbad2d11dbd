"""The LXC configuration of a slot, written by CB-Executor from a validated definition.

Every lxc slot runs in a user namespace of its own (contract.slot_ids): its root is not the
node's root, nor any other slot's. Its volumes are mounted on the node by CB-Executor
(contract.slot_mount) and bound in idmapped (idmap=container), so the files on them belong
to ids 0..65535 as the slot sees them and stay so on disk. LXC binds an idmapped mount only
onto a directory that is already there on the root's own file system (it makes none, and
crosses no mount to reach one): contract.volume_target, made by the build in the CBIOS root
and by CB-Executor in an lxc-system's. A template that states why
(slot.yaml `privileged`) runs without one: the exception, nfs for the kernel's nfsd.

lxc-service: the CBIOS root, read-only, shared as the container's root; its own pid, uts,
ipc, mount and net namespaces; volume 0 is its /var (writable, its own); /run and /tmp
are tmpfs; the template's `run` is PID 1. No CAP_SYS_ADMIN: it cannot undo its mounts; a
template that mounts (nfs) gives it back in its lxc.conf. No CAP_DAC_READ_SEARCH: no
open_by_handle_at into what its mounts cover, the node's /var among them.
lxc-system: volume 0 is the container's own root file system, with its own init.
Either way further volumes appear at /srv/volume<iid>, and eth0 is one end of a veth
whose other end, veth<eid>, is on the node's bridge."""

from __future__ import annotations

import hashlib
import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

from cbios.node.contract import (
    NODE_ARCHITECTURE,
    SLOT_IDS,
    STORE_MOUNT,
    STORE_TARGET,
    TEMPLATES,
    container_name,
    slot_ids,
    slot_mount,
    slot_mounts,
    volume_name,
    volume_target,
)

LOG_DIR = "/var/log/cbios/slots"
CONSOLE_LOG_MAX = "1MB"  # then rotated once (.1): at most twice this on /var a slot
LOG_MAX = 1 << 20  # LXC's own log, a VM's console: rotated (.1) past this, at a start and while it runs
# Never a slot's: loading code into the kernel, raw I/O, the clock, device nodes (no mknod:
# the device list below is the only way to a device), handles that reach past its mounts.
CAP_DROP = "sys_module sys_time sys_boot sys_rawio mac_admin mac_override dac_read_search mknod"
SECCOMP = "/usr/lib/cbios/slot.seccomp"
# The devices a slot may open (cgroup2): what a process and a terminal need, nothing else;
# no disk among them, so a node's volumes stay the node's whatever the slot makes of /dev.
DEVICES = ("c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",  # null zero full random urandom
           "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm")  # tty console ptmx pts/*
MEMORY, PIDS = 512 << 20, 512  # when a definition names none (the template's defaults)
# lxc.arch of a slot whose architecture is not the node's: the personality its processes
# start with, so that uname -m inside says what its packages were built for.
LXC_ARCH = {"i386": "i686"}


@dataclass(frozen=True)
class Definition:
    eid: int
    template: str
    kind: str  # lxc-service | lxc-system
    vg: str
    bridge: str
    node_id: str
    hostname: str | None
    address: str | None  # 10.0.249.52/24
    volumes: tuple[int, ...]
    extra: str = ""  # the template's lxc.conf, not yet substituted
    memory: int = MEMORY  # bytes: cgroup memory.max
    pids: int = PIDS  # cgroup pids.max
    privileged: bool = False  # no user namespace: the template says why
    image_store: bool = False  # CB-Manager's image store, read-only (a boot server)
    architecture: str = NODE_ARCHITECTURE  # the template's (Debian's name)


def lxc_log(eid: int) -> Path:
    return Path(LOG_DIR) / f"{container_name(eid)}.lxc.log"


def console_log(eid: int) -> Path:
    """An lxc slot's console, or a VM's serial console."""
    return Path(LOG_DIR) / f"{container_name(eid)}.console.log"


def rotated(path: Path, limit: int = LOG_MAX) -> None:
    """PATH, if over LIMIT bytes, moved to PATH.1 (the one before goes): a log LXC or QEMU
    appends to across starts stays within twice LIMIT."""
    try:
        if path.stat().st_size > limit:
            path.replace(path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass


def trimmed(path: Path, limit: int = LOG_MAX) -> bool:
    """PATH, if over LIMIT bytes while its writer runs, copied to PATH.1 and emptied in place.
    For logs written with O_APPEND (QEMU's append=on, LXC's own log): the writer goes on at
    the new end, so a log stays within twice LIMIT however long its slot runs."""
    try:
        with path.open("r+b") as f:
            if os.fstat(f.fileno()).st_size <= limit:
                return False
            with path.with_name(path.name + ".1").open("wb") as old:
                shutil.copyfileobj(f, old)
            f.truncate(0)
            return True
    except FileNotFoundError:
        return False


def mac_address(node_id: str, eid: int) -> str:
    """Stable per node and slot (DHCP leases and ARP caches survive a restart); LXC's OUI."""
    digest = hashlib.sha256(f"{node_id}:{eid}".encode()).digest()
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in digest[:3])


def device(vg: str, eid: int, iid: int) -> str:
    return f"/dev/mapper/{vg}-{volume_name(eid, iid)}"


def render(d: Definition) -> str:
    name = container_name(d.eid)
    bind = "bind,create=dir" if d.privileged else "bind,idmap=container"  # an idmapped target must be there
    lines = [
        f"# Slot {d.eid} ({d.template}), written by CB-Executor: redefined on every start of the slot.",
        f"lxc.uts.name = {d.hostname or name}",
        *([f"lxc.arch = {LXC_ARCH[d.architecture]}"] if d.architecture != NODE_ARCHITECTURE else []),
        *([] if d.privileged else [f"lxc.idmap = {kind} 0 {slot_ids(d.eid)} {SLOT_IDS}" for kind in "ug"]),
        "lxc.apparmor.profile = unconfined",
        f"lxc.cap.drop = {CAP_DROP}" + (" sys_admin" if d.kind == "lxc-service" else ""),
        "lxc.mount.auto = proc:mixed sys:ro cgroup:mixed",
        "lxc.autodev = 1",
        "lxc.tty.max = 0",
        "lxc.pty.max = 16",
        f"lxc.seccomp.profile = {SECCOMP}",
        "lxc.cgroup2.devices.deny = a",
        *(f"lxc.cgroup2.devices.allow = {rule}" for rule in DEVICES),
        f"lxc.cgroup2.memory.max = {d.memory}",
        "lxc.cgroup2.memory.swap.max = 0",  # past its memory a slot is stopped, not the node slowed
        f"lxc.cgroup2.pids.max = {d.pids}",
        f"lxc.log.file = {lxc_log(d.eid)}",
        "lxc.log.level = WARN",
        f"lxc.console.logfile = {console_log(d.eid)}",
        f"lxc.console.size = {CONSOLE_LOG_MAX}",
        "lxc.console.rotate = 1",
    ]
    if d.kind == "lxc-service":
        lines += [
            "lxc.rootfs.path = dir:/",
            "lxc.mount.entry = tmpfs run tmpfs rw,nosuid,nodev,mode=0755 0 0",
            "lxc.mount.entry = tmpfs tmp tmpfs rw,nosuid,nodev 0 0",
            f"lxc.init.cmd = {TEMPLATES}/{d.template}/run",
            "lxc.signal.halt = SIGTERM",
        ]
    else:
        lines += [f"lxc.rootfs.path = dir:{slot_mount(d.eid, 0)}",
                  *([] if d.privileged else ["lxc.rootfs.options = idmap=container"]),
                  "lxc.signal.halt = SIGRTMIN+3"]
    for iid in d.volumes:
        if iid == 0 and d.kind != "lxc-service":
            continue
        lines.append(f"lxc.mount.entry = {slot_mount(d.eid, iid)} {volume_target(d.kind, iid)} none {bind} 0 0")
    if d.image_store:
        lines.append(f"lxc.mount.entry = {slot_mounts(d.eid) / STORE_MOUNT} {STORE_TARGET} none {bind},ro 0 0")
    lines += [
        "lxc.net.0.type = veth",
        f"lxc.net.0.link = {d.bridge}",
        "lxc.net.0.name = eth0",
        f"lxc.net.0.veth.pair = veth{d.eid}",
        f"lxc.net.0.hwaddr = {mac_address(d.node_id, d.eid)}",
        "lxc.net.0.flags = up",
    ]
    if d.address:
        lines.append(f"lxc.net.0.ipv4.address = {d.address}")
    if d.extra:
        values = {"eid": str(d.eid), "name": name, "vg": d.vg, "cap_drop": CAP_DROP}
        values.update({f"volume{iid}": device(d.vg, d.eid, iid) for iid in d.volumes})
        lines += ["", "# From the template:", string.Template(d.extra).substitute(values).strip()]
    return "\n".join(lines) + "\n"
