"""Where a file's data blocks are in a squashfs image (format 4, as mksquashfs writes it),
read from the image's own tables, so a test can damage exactly the blocks of one file."""

from __future__ import annotations

import lzma
import struct
import zlib
from pathlib import Path

MAGIC = 0x73717368
NO_FRAGMENT = 0xFFFFFFFF
UNCOMPRESSED_BLOCK = 1 << 24
BASIC_DIR, BASIC_FILE, EXT_DIR, EXT_FILE = 1, 2, 8, 9


class Metadata:
    """A metadata table (inodes, directories), unpacked, addressed as squashfs addresses it:
    the start of a block relative to the table, and an offset in what that block unpacks to."""

    def __init__(self, image: bytes, start: int, end: int, unpack) -> None:
        self.data = bytearray()
        self.at: dict[int, int] = {}  # block start (relative) -> its place in self.data
        pos = start
        while pos + 2 <= end:
            header, = struct.unpack_from("<H", image, pos)
            size = header & 0x7FFF
            raw = image[pos + 2:pos + 2 + size]
            self.at[pos - start] = len(self.data)
            self.data += raw if header & 0x8000 else unpack(raw)
            pos += 2 + size

    def read(self, block: int, offset: int, size: int) -> bytes:
        at = self.at[block] + offset
        return bytes(self.data[at:at + size])

    def view(self, block: int, offset: int) -> memoryview:
        return memoryview(self.data)[self.at[block] + offset:]


def data_extent(image_path: Path, path: str) -> tuple[int, int]:
    """(start, end) in the image of PATH's full data blocks (not its fragment, if any)."""
    image = image_path.read_bytes()
    magic, _, _, block_size, _, comp = struct.unpack_from("<IIIIIH", image, 0)
    assert magic == MAGIC, f"{image_path}: not a squashfs image"
    root_ref, = struct.unpack_from("<Q", image, 32)
    tables = struct.unpack_from("<QQQQQQ", image, 48)  # id, xattr, inode, directory, fragment, export
    inode_start, dir_start = tables[2], tables[3]
    dir_end = min(t for t in (tables[0], tables[1], tables[4], tables[5]) if dir_start < t < len(image))
    unpack = {1: zlib.decompress, 4: lzma.decompress}[comp]
    inodes = Metadata(image, inode_start, dir_start, unpack)
    dirs = Metadata(image, dir_start, dir_end, unpack)

    ref = root_ref
    for name in [p for p in path.strip("/").split("/") if p]:
        ref = _lookup(inodes, dirs, ref, name.encode())
    kind, = struct.unpack_from("<H", inodes.view(ref >> 16, ref & 0xFFFF), 0)
    body = inodes.view(ref >> 16, (ref & 0xFFFF) + 16)
    if kind == BASIC_FILE:
        start, fragment, _, size = struct.unpack_from("<IIII", body, 0)
        sizes_at = 16
    elif kind == EXT_FILE:
        start, size, _, _, fragment = struct.unpack_from("<QQQII", body, 0)
        sizes_at = 40
    else:
        raise ValueError(f"{path}: not a regular file (inode type {kind})")
    blocks = size // block_size if fragment != NO_FRAGMENT else -(-size // block_size)
    sizes = struct.unpack_from(f"<{blocks}I", body, sizes_at)
    length = sum(s & (UNCOMPRESSED_BLOCK - 1) for s in sizes)
    if length == 0:
        raise ValueError(f"{path}: no full data block (its data is all in a fragment)")
    return start, start + length


def _lookup(inodes: Metadata, dirs: Metadata, ref: int, name: bytes) -> int:
    """The inode reference of NAME in the directory whose inode reference is REF."""
    kind, = struct.unpack_from("<H", inodes.view(ref >> 16, ref & 0xFFFF), 0)
    body = inodes.view(ref >> 16, (ref & 0xFFFF) + 16)
    if kind == BASIC_DIR:
        block, _, size, offset = struct.unpack_from("<IIHH", body, 0)
    elif kind == EXT_DIR:
        _, size, block, _, _, offset = struct.unpack_from("<IIIIHH", body, 0)
    else:
        raise ValueError(f"{name.decode()}: its parent is not a directory")
    listing = dirs.read(block, offset, size - 3)  # a directory's size counts 3 bytes more
    pos = 0
    while pos < len(listing):
        count, inode_block, _ = struct.unpack_from("<III", listing, pos)
        pos += 12
        for _ in range(count + 1):
            inode_offset, _, _, name_size = struct.unpack_from("<HhHH", listing, pos)
            entry = listing[pos + 8:pos + 9 + name_size]
            pos += 9 + name_size
            if entry == name:
                return inode_block << 16 | inode_offset
    raise FileNotFoundError(name.decode())
