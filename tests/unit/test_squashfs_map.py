"""The test helper that finds a file's data blocks in a squashfs image, on images mksquashfs
makes here: the blocks it names are the file's, whether stored as they are or compressed."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.vm.squashfs_map import data_extent

pytestmark = pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="needs mksquashfs (make deps)")


def squashfs(tree: Path, out: Path) -> Path:
    subprocess.run(["mksquashfs", tree, out, "-noappend", "-quiet", "-no-progress", "-comp", "xz", "-b", "128K"],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def test_the_blocks_of_a_file_stored_as_it_is_hold_its_bytes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a/b").mkdir(parents=True)
    for i in range(300):  # a directory listing longer than one header's run, in several blocks
        (tree / "a" / f"small-{i:03}").write_text(f"{i}\n" * i)
    noise = os.urandom(3 * 131072 + 1000)  # xz cannot shrink it: four blocks, the last short
    (tree / "a/b/noise").write_bytes(noise)
    image = squashfs(tree, tmp_path / "x.sqfs").read_bytes()
    start, end = data_extent(tmp_path / "x.sqfs", "/a/b/noise")
    assert image[start:end] == noise


def test_the_blocks_of_a_compressed_file_unpack_to_its_first_block(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    text = b"".join(b"line %d of a file that compresses well\n" % i for i in range(20000))
    (tree / "text").write_bytes(text)
    (tree / "other").write_bytes(text[::-1])
    image = squashfs(tree, tmp_path / "x.sqfs").read_bytes()
    start, end = data_extent(tmp_path / "x.sqfs", "text")
    assert end - start < len(text) // 4
    first = lzma.LZMADecompressor().decompress(image[start:end])
    assert first.startswith(text[:131072])


def test_a_missing_file_and_a_directory_are_errors(tmp_path: Path) -> None:
    (tmp_path / "tree/d").mkdir(parents=True)
    squashfs(tmp_path / "tree", tmp_path / "x.sqfs")
    with pytest.raises(FileNotFoundError):
        data_extent(tmp_path / "x.sqfs", "d/none")
    with pytest.raises(ValueError):
        data_extent(tmp_path / "x.sqfs", "d")
