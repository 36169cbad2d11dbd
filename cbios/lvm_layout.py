"""Where an LV's bytes are inside a node disk image, found from the host: the GPT, then the
PV's text metadata. Tests and benchmarks use it to damage a copy of the firmware from outside the guest."""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SECTOR = 512


def _read(image: Path, offset: int, length: int) -> bytes:
    first, skew = divmod(offset, SECTOR)
    count = -(-(skew + length) // SECTOR)
    with tempfile.NamedTemporaryFile() as out:
        # qemu-img dd counts from the start of the image, skipped blocks included.
        subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={image}", f"of={out.name}",
                        f"bs={SECTOR}", f"skip={first}", f"count={first + count}"], check=True)
        return Path(out.name).read_bytes()[skew:skew + length]


def partition_start(image: Path, number: int) -> int:
    header = _read(image, SECTOR, SECTOR)
    assert header[:8] == b"EFI PART", "no GPT"
    entries_lba, _, entry_size = struct.unpack_from("<QII", header, 72)
    entry = _read(image, entries_lba * SECTOR + (number - 1) * entry_size, entry_size)
    first_lba = struct.unpack_from("<Q", entry, 32)[0]
    return int(first_lba * SECTOR)


def parse_metadata(text: str) -> dict[str, Any]:
    """LVM's text format: name { ... } sections and key = value lines."""
    tokens = re.findall(r'"[^"]*"|[\w.-]+|[{}\[\]=,]', re.sub(r"#.*", "", text))
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                if tokens[pos] != ",":
                    items.append(value())
                else:
                    pos += 1
            pos += 1
            return items
        return tok.strip('"') if tok.startswith('"') else int(tok) if tok.isdigit() else tok

    def section() -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens) and tokens[pos] != "}":
            name = tokens[pos]
            if tokens[pos + 1] == "{":
                pos += 2
                out[name] = section()
                pos += 1
            else:
                pos += 2
                out[name] = value()
        return out

    return section()


def lv_offset(image: Path, vg: str, lv: str, pv_partition: int = 3) -> int:
    """Byte offset of LV's first extent in IMAGE (a linear LV on the one PV)."""
    start = partition_start(image, pv_partition)
    area = _read(image, start, 1 << 20).decode(errors="replace")
    chunks = [c for c in area.split("\0") if f"{vg} {{" in c and "seqno" in c]
    latest = max(chunks, key=lambda c: int(re.search(r"seqno = (\d+)", c).group(1)))  # type: ignore[union-attr]
    meta = parse_metadata(latest[latest.index(f"{vg} {{"):])[vg]
    pe_start = meta["physical_volumes"]["pv0"]["pe_start"]
    segment = meta["logical_volumes"][lv]["segment1"]
    first_extent = segment["stripes"][1]
    return int(start + (pe_start + first_extent * meta["extent_size"]) * SECTOR)


def overwrite(image: Path, offset: int, length: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0 {offset} {length}", str(image)],
                   check=True, capture_output=True)


def flip_byte(image: Path, offset: int) -> tuple[int, int]:
    """One byte of IMAGE (a qcow2) inverted in place; its value before and after."""
    old = _read(image, offset, 1)[0]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {old ^ 0xFF} {offset} 1", str(image)],
                   check=True, capture_output=True)
    return old, old ^ 0xFF
