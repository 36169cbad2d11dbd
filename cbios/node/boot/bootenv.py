"""The boot state of a node's two firmware copies: GRUB's environment block (grubenv) on
the plain boot partition, which GRUB reads at every boot and writes with save_env."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SIZE = 1024
SECTOR = 512
HEADER = b"# GRUB Environment Block\n"
# What GRUB chooses a copy by, in this order at the head of the block, all within its first
# sector: a write torn between the block's two sectors leaves them all old or all new, never
# a new active copy beside an old state (the flasher's lib.sh writes the same order).
STATE_KEYS = ("cbios_active", "cbios_root_state", "cbios_root_tries", "cbios_root_verity",
              "cbios_spare_state", "cbios_spare_tries", "cbios_spare_verity")
# What GRUB loads of the block (grub.cfg's load_env): the state, then what it only shows or appends.
GRUB_KEYS = (*STATE_KEYS, "cbios_fallback", "cbios_cmdline_extra", "cbios_root_cmdline", "cbios_spare_cmdline")
BOOT_LABEL = "cbios-boot"
MOUNTPOINT = Path("/run/cbios/boot")
COPIES = {"root": "root", "spare": "root-spare"}  # copy -> LV name
NETBOOT_COPY = Path("/run/cbios/copy")  # written by the initrd of a netboot
NETBOOT_SOURCE = Path("/run/cbios/boot-source")


class BootEnvError(Exception):
    pass


def sums_path(grubenv: Path, copy: str) -> Path:
    """Beside grubenv: the sha256s GRUB checks COPY's kernel and initrd against (grub.cfg)."""
    return grubenv.parent / f"cbios-{copy}.sha256"


def write_sums(grubenv: Path, copy: str, kernel_sha256: str, initrd_sha256: str) -> None:
    """COPY's sums, as `sha256sum --check` reads them, written whole or not at all."""
    path = sums_path(grubenv, copy)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{kernel_sha256}  vmlinuz\n{initrd_sha256}  initrd.img\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def parse(data: bytes) -> dict[str, str]:
    if not data.startswith(HEADER):
        raise BootEnvError("not a GRUB environment block")
    env: dict[str, str] = {}
    for raw in data[len(HEADER):].decode(errors="replace").split("\n"):
        if not raw or raw.startswith("#") or "=" not in raw:
            continue
        key, value = raw.split("=", 1)
        env[key] = value.replace("\\n", "\n").replace("\\\\", "\\")
    return env


def render(env: dict[str, str]) -> bytes:
    """The block: STATE_KEYS first (within the first sector), the rest after, sorted."""
    def line(key: str) -> bytes:
        value = env[key].replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + "n")
        return f"{key}={value}\n".encode()

    state = HEADER + b"".join(line(k) for k in STATE_KEYS if k in env)
    if len(state) > SECTOR:
        raise BootEnvError(f"boot state of {len(state)} bytes does not fit in the block's first {SECTOR}")
    data = state + b"".join(line(k) for k in sorted(env) if k not in STATE_KEYS)
    if len(data) > SIZE:
        raise BootEnvError(f"boot state of {len(data)} bytes does not fit in {SIZE}")
    return data + b"#" * (SIZE - len(data))


def read(path: Path) -> dict[str, str]:
    return parse(path.read_bytes())


def write(path: Path, env: dict[str, str]) -> None:
    """Rewrite the block in place (GRUB's save_env finds it by its blocks), and sync."""
    data = render(env)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def boot_partition(writable: bool = False) -> Iterator[Path]:
    """The boot partition, mounted for as long as it is needed (it has no journal); one
    process at a time (`cbios status` beside the health gate's scrub, say), the others wait."""
    MOUNTPOINT.mkdir(parents=True, exist_ok=True)
    with open(MOUNTPOINT.parent / "boot.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        options = "rw,sync" if writable else "ro"
        proc = subprocess.run(["mount", "-o", options, f"LABEL={BOOT_LABEL}", str(MOUNTPOINT)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            raise BootEnvError(f"cannot mount the boot partition (LABEL={BOOT_LABEL}): {proc.stderr.strip()}")
        try:
            yield MOUNTPOINT / "grub" / "grubenv"
        finally:
            subprocess.run(["umount", str(MOUNTPOINT)], check=False, stdin=subprocess.DEVNULL)


FLASH_RECEIPT = "cbios-receipt.json"  # beside grubenv; the flasher writes it (initrd: flash, keep_receipt)
RECEIPT_MAX = 64 << 10


def flash_receipt(grubenv: Path) -> dict[str, Any] | None:
    """The receipt of the last flash of this node's disk (install or update), kept by the
    flasher on the boot partition whether or not its server took one; None if none or unreadable."""
    try:
        with open(grubenv.parent / FLASH_RECEIPT, "rb") as f:
            raw = f.read(RECEIPT_MAX + 1)
        data = json.loads(raw) if len(raw) <= RECEIPT_MAX else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def running_copy(cmdline: str | None = None, netboot_copy: Path = NETBOOT_COPY) -> str | None:
    """The copy this boot runs ('root' or 'spare'), or None when not booted from a node disk.
    GRUB names it on the kernel command line; a netboot's initrd, in /run/cbios/copy."""
    found = cmdline_value("cbios.copy", cmdline)
    if found is None and netboot_copy.is_file():
        found = netboot_copy.read_text().strip()
    return found if found in COPIES else None


def cmdline_value(name: str, cmdline: str | None = None) -> str | None:
    """The value of kernel parameter NAME=VALUE (the last one), or None."""
    text = cmdline if cmdline is not None else Path("/proc/cmdline").read_text()
    values = [arg.split("=", 1)[1] for arg in text.split() if arg.startswith(f"{name}=")]
    return values[-1] if values else None


DISKLESS = "network (diskless)"


def boot_source(netboot_source: Path = NETBOOT_SOURCE) -> str:
    """'disk'; 'network' when the kernel and initrd came over PXE and the copy from the disk;
    DISKLESS when the firmware itself came over the network, into RAM (the initrd says which)."""
    try:
        said = netboot_source.read_text().strip()
    except FileNotFoundError:
        return "disk"
    return DISKLESS if said == "diskless" else "network"


# The block is 1024 bytes in all: what a reason may take of it.
FAILURE_MAX = 160
CORRUPT_MAX = 100
REFUSED = "cbios_refused"  # versions that failed the health gate here, newest last
REFUSED_KEEP = 4


def other(copy: str) -> str:
    return "spare" if copy == "root" else "root"


def refused(env: dict[str, str]) -> list[str]:
    return env.get(REFUSED, "").split()


def marked_bad(env: dict[str, str], copy: str) -> dict[str, str]:
    """COPY bad, and the other one (the running one) to boot: GRUB boots an active copy that
    is bad (it counts tries of new copies only), so a bad copy must never be the active one."""
    new = dict(env)
    new[f"cbios_{copy}_state"] = "bad"
    new.pop(f"cbios_{copy}_tries", None)
    new.pop(f"cbios_{copy}_verity", None)
    new.pop(f"cbios_{copy}_cmdline", None)  # its parameters were for the firmware it held
    new["cbios_active"] = other(copy)
    return new


def to_try(env: dict[str, str], copy: str, tries: int, param: str) -> dict[str, str]:
    """COPY on trial next boot, with TRIES boots to become ready, opened with verity PARAM."""
    new = dict(env)
    new[f"cbios_{copy}_state"] = "new"
    new[f"cbios_{copy}_tries"] = str(tries)
    new[f"cbios_{copy}_verity"] = param
    new["cbios_active"] = copy
    return new


def with_failure(env: dict[str, str], copy: str, version: str, reason: str) -> dict[str, str]:
    """ENV keeping why COPY (at VERSION) was not ready on its last boot. A copy on trial that
    fails is a version this node refuses from now on (unless forced)."""
    new = dict(env)
    new["cbios_failure"] = f"copy {copy} ({version}): {' '.join(reason.split())}"[:FAILURE_MAX]
    if env.get(f"cbios_{copy}_state") == "new":
        versions = [v for v in refused(env) if v != version] + [version]
        new[REFUSED] = " ".join(versions[-REFUSED_KEEP:])
    return new


def committed(env: dict[str, str], copy: str, version: str | None = None) -> dict[str, str]:
    """ENV after committing COPY (at VERSION): good, no tries pending, the copy to boot next,
    and VERSION no longer refused (it became ready here)."""
    new = dict(env)
    new[f"cbios_{copy}_state"] = "good"
    new.pop(f"cbios_{copy}_tries", None)
    new["cbios_active"] = copy
    if version is not None and version in refused(env):
        versions = [v for v in refused(env) if v != version]
        if versions:
            new[REFUSED] = " ".join(versions)
        else:
            new.pop(REFUSED)
    return new


def rebuilt(copy: str, verity: str) -> dict[str, str]:
    """The boot state rebuilt from what a node running COPY (opened with VERITY) can see,
    when its block is unreadable: COPY good and the one to boot; the other copy bad, since
    nothing it can read tells which firmware that one holds (an update rewrites it)."""
    return {"cbios_active": copy, f"cbios_{copy}_state": "good", f"cbios_{copy}_verity": verity,
            f"cbios_{other(copy)}_state": "bad",
            "cbios_fallback": f"the boot state was unreadable: rebuilt, copy {other(copy)} bad until updated"}


def corrupted(env: dict[str, str], copy: str, reason: str) -> dict[str, str]:
    """ENV with COPY found corrupt (REASON): bad, and, while the other copy is not bad too,
    the other one is the copy to boot. A corrupt copy is never tried again by itself."""
    new = dict(env)
    reason = f"copy {copy}: {' '.join(reason.split())}"[:CORRUPT_MAX]
    new[f"cbios_{copy}_state"] = "bad"
    new.pop(f"cbios_{copy}_tries", None)
    new["cbios_corrupt"] = reason
    if env.get("cbios_active", "root") == copy and env.get(f"cbios_{other(copy)}_state") != "bad":
        new["cbios_active"] = other(copy)
        new["cbios_fallback"] = reason
    return new
