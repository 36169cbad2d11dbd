"""Debian 13's iPXE is believed only through the archive's signature: no network here, the
checks themselves with real gpgv against Debian's keyring."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbios.errors import StepError
from cbios.pxe import newer_ipxe

INDEX = """Package: ipxe
Filename: pool/main/i/ipxe/ipxe_1_all.deb
SHA256: {a}

Package: ipxe-qemu
Version: 1.21.1
Filename: pool/main/i/ipxe/ipxe-qemu_1_all.deb
SHA256: {b}
"""


def test_a_release_not_signed_by_debian_is_refused(tmp_path: Path) -> None:
    forged = b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSHA256:\n x 1 main/binary-amd64/Packages.xz\n"
    with pytest.raises(StepError, match="its signature does not verify"):
        newer_ipxe.verified_release(forged, tmp_path)


def test_the_package_is_found_by_name_with_its_checksum() -> None:
    index = INDEX.format(a="a" * 64, b="b" * 64)
    assert newer_ipxe.package_entry(index, "ipxe-qemu") == ("pool/main/i/ipxe/ipxe-qemu_1_all.deb", "b" * 64)
    with pytest.raises(StepError, match="has no package ipxe-efi"):
        newer_ipxe.package_entry(index, "ipxe-efi")


def test_bytes_that_do_not_match_the_signed_index_are_refused() -> None:
    with pytest.raises(StepError, match="checksum mismatch"):
        newer_ipxe._checked(b"tampered", "0" * 64, "pool/x.deb")
