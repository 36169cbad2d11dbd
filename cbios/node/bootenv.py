"""The boot state of a node's two firmware copies: GRUB's environment block (grubenv) on
the plain boot partition, which GRUB reads at every boot and writes with save_env."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIZE = 1024
HEADER = b"# GRUB Environment Block\n"
BOOT_LABEL = "cbios-boot"
MOUNTPOINT = Path("/run/cbios/boot")
COPIES = {"root": "root", "spare": "root-spare"}  # copy -> LV name
NETBOOT_COPY = Path("/run/cbios/copy")  # written by the initrd of a netboot
NETBOOT_SOURCE = Path("/run/cbios/boot-source")


class BootEnvError(Exception):
    pass


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
    body = b"".join(
        f"{k}={v.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}\n".encode()
        for k, v in env.items())
    data = HEADER + body
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
    """The boot partition, mounted for as long as it is needed (it has no journal)."""
    MOUNTPOINT.mkdir(parents=True, exist_ok=True)
    options = "rw,sync" if writable else "ro"
    proc = subprocess.run(["mount", "-o", options, f"LABEL={BOOT_LABEL}", str(MOUNTPOINT)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise BootEnvError(f"cannot mount the boot partition (LABEL={BOOT_LABEL}): {proc.stderr.strip()}")
    try:
        yield MOUNTPOINT / "grub" / "grubenv"
    finally:
        subprocess.run(["umount", str(MOUNTPOINT)], check=False, stdin=subprocess.DEVNULL)


def running_copy(cmdline: str | None = None, netboot_copy: Path = NETBOOT_COPY) -> str | None:
    """The copy this boot runs ('root' or 'spare'), or None when not booted from a node disk.
    GRUB names it on the kernel command line; a netboot's initrd, in /run/cbios/copy."""
    text = cmdline if cmdline is not None else Path("/proc/cmdline").read_text()
    found = None
    for arg in text.split():
        if arg.startswith("cbios.copy="):
            found = arg.split("=", 1)[1]
    if found is None and netboot_copy.is_file():
        found = netboot_copy.read_text().strip()
    return found if found in COPIES else None


def boot_source(netboot_source: Path = NETBOOT_SOURCE) -> str:
    """'network' when the kernel and initrd came over PXE, else 'disk'."""
    return "network" if netboot_source.is_file() else "disk"


FAILURE_MAX = 300  # the block is 1024 bytes in all


def with_failure(env: dict[str, str], copy: str, version: str, reason: str) -> dict[str, str]:
    """ENV keeping why COPY (at VERSION) was not ready on its last boot."""
    new = dict(env)
    new["cbios_failure"] = f"copy {copy} ({version}): {' '.join(reason.split())}"[:FAILURE_MAX]
    return new


def committed(env: dict[str, str], copy: str) -> dict[str, str]:
    """ENV after committing COPY: good, no tries pending, and the copy to boot next."""
    new = dict(env)
    new[f"cbios_{copy}_state"] = "good"
    new.pop(f"cbios_{copy}_tries", None)
    new["cbios_active"] = copy
    return new
