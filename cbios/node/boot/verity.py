"""dm-verity of a firmware copy: how the build lays the hash tree out, and how the node reads it.

A copy's LV holds root.img as it was built: the squashfs image, padded to whole 4 KiB
blocks, then its dm-verity hash tree (sha256, 4 KiB blocks, no salt, no superblock). All
that opening it needs is the root hash and the count of data blocks, written as one word,
`ROOTHASH:BLOCKS`, in the signed manifest, in the boot state (grubenv, `cbios_<copy>_verity`)
and on the kernel command line (`cbios.verity=`). The initrd's lib.sh builds the same
device-mapper table in shell (verity_table)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096
ALGORITHM = "sha256"
PARAM = re.compile(r"([0-9a-f]{64}):([1-9][0-9]{0,9})")  # ROOTHASH:BLOCKS
READ_CHUNK = 1 << 20


class VerityError(Exception):
    pass


@dataclass(frozen=True)
class Verity:
    root_hash: str
    data_blocks: int

    @property
    def hash_offset(self) -> int:
        """Where the hash tree starts: right after the data."""
        return self.data_blocks * BLOCK

    @property
    def param(self) -> str:
        return f"{self.root_hash}:{self.data_blocks}"

    @classmethod
    def parse(cls, text: str) -> Verity:
        m = PARAM.fullmatch(text.strip())
        if m is None:
            raise VerityError(f"not a verity parameter (ROOTHASH:BLOCKS): {text.strip()[:80]!r}")
        return cls(root_hash=m.group(1), data_blocks=int(m.group(2)))

    def table(self, device: str) -> str:
        """The device-mapper table of DEVICE opened read-only through dm-verity."""
        return (f"0 {self.data_blocks * (BLOCK // 512)} verity 1 {device} {device} {BLOCK} {BLOCK} "
                f"{self.data_blocks} {self.data_blocks} {ALGORITHM} {self.root_hash} -")


def format_cmd(image: Path, data_blocks: int) -> list[str]:
    """veritysetup's command that appends the hash tree to IMAGE (DATA_BLOCKS blocks of data)."""
    return ["veritysetup", "format", "--no-superblock", f"--hash={ALGORITHM}", "--salt=-",
            f"--data-block-size={BLOCK}", f"--hash-block-size={BLOCK}", f"--data-blocks={data_blocks}",
            f"--hash-offset={data_blocks * BLOCK}", str(image), str(image)]


def root_hash_of(veritysetup_output: str) -> str:
    m = re.search(r"^Root hash:\s*([0-9a-f]{64})\s*$", veritysetup_output, re.MULTILINE)
    if m is None:
        raise VerityError("veritysetup printed no root hash")
    return m.group(1)


def scrub(device: Path, verity: Verity, name: str) -> str | None:
    """Read every data block of DEVICE through dm-verity, so the kernel checks each one and
    the hash blocks above it. None when all match the root hash; otherwise what failed."""
    mapper = Path("/dev/mapper") / name
    subprocess.run(["dmsetup", "remove", name], capture_output=True, check=False, stdin=subprocess.DEVNULL)
    proc = subprocess.run(["dmsetup", "create", name, "--readonly", "--table", verity.table(str(device))],
                          capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        return f"cannot open {device} through dm-verity: {proc.stderr.strip()[-200:]}"
    try:
        subprocess.run(["udevadm", "settle", "--timeout=10"], check=False, stdin=subprocess.DEVNULL)
        done = 0
        with open(mapper, "rb", buffering=0) as f:
            while True:
                try:
                    chunk = f.read(READ_CHUNK)
                except OSError:
                    return f"{device}: corrupt: block {_first_bad(f.fileno(), done)} of {verity.data_blocks} " \
                           "does not match the root hash"
                if not chunk:
                    break
                done += len(chunk)
        if done != verity.hash_offset:
            return f"{device}: {done} bytes read through dm-verity, {verity.hash_offset} expected"
        return None
    finally:
        subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True, check=False,
                       stdin=subprocess.DEVNULL)


def _first_bad(fd: int, start: int) -> int:
    """The first block from START that the kernel refuses to read."""
    block = start // BLOCK
    while True:
        try:
            if not os.pread(fd, BLOCK, block * BLOCK):
                return block
        except OSError:
            return block
        block += 1
