"""Debian 13's iPXE ROMs, for the VMs that boot a bundle from a server of plain files.

boot.ipxe finds its own folder through ${cwduri}, which iPXE has had since 2024; Debian 12's
iPXE (QEMU's NIC ROMs, ipxe-qemu) is from 2019. The test lab gives the PXE NIC Debian 13's
ROM instead, as a site gives its nodes a newer iPXE over TFTP. Debian 12 does not carry it,
so it is taken from Debian 13's archive and believed only through the archive's signature:
InRelease verified with Debian's keyring (debian-archive-keyring), the package index
against InRelease's sha256, the package against the index's; then unpacked into the cache.
Nothing is installed on the host."""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from cbios.errors import StepError

log = logging.getLogger("cbios")

MIRROR = os.environ.get("CBIOS_DEBIAN_MIRROR", "http://deb.debian.org/debian").rstrip("/")
SUITE = "trixie"
PACKAGE = "ipxe-qemu"
INDEX = "main/binary-amd64/Packages.xz"  # it lists the Architecture: all packages too
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ROM = "pxe-virtio.rom"  # virtio-net's BIOS ROM: the NIC of the test VMs
ROM_PATH = f"usr/share/qemu/{ROM}"
FETCH_TIMEOUT = 120
STEP = "newer iPXE"


def rom(cache: Path) -> Path:
    """The ROM, fetched once into CACHE (and checked as it comes)."""
    dest = cache / "ipxe" / SUITE / ROM
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        work = Path(tmp)
        release = verified_release(_get(f"{MIRROR}/dists/{SUITE}/InRelease"), work)
        index = lzma.decompress(_checked(_get(f"{MIRROR}/dists/{SUITE}/{INDEX}"), _release_sha256(release), INDEX))
        filename, sha256 = package_entry(index.decode(), PACKAGE)
        deb = work / "package.deb"
        deb.write_bytes(_checked(_get(f"{MIRROR}/{filename}"), sha256, filename))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True, stdin=subprocess.DEVNULL)
        shutil.copyfile(work / "root" / ROM_PATH, work / ROM)
        os.replace(work / ROM, dest)
    log.info("‣ %s: %s from Debian %s (%s), signature and checksums good", STEP, ROM, SUITE, filename)
    return dest


def verified_release(inrelease: bytes, work: Path) -> str:
    """The Release text of INRELEASE, once its signature verifies with Debian's keyring."""
    (work / "InRelease").write_bytes(inrelease)
    argv = ["gpgv", "--keyring", str(KEYRING), "--output", str(work / "Release"), str(work / "InRelease")]
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise StepError(STEP, f"{MIRROR}/dists/{SUITE}/InRelease: its signature does not verify with {KEYRING}",
                        hint="is the mirror Debian's? (CBIOS_DEBIAN_MIRROR)")
    return (work / "Release").read_text()


def _release_sha256(release: str) -> str:
    for line in release.split("SHA256:", 1)[-1].splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == INDEX:
            return parts[0]
    raise StepError(STEP, f"Debian {SUITE}'s Release does not list {INDEX}")


def package_entry(index: str, package: str) -> tuple[str, str]:
    """PACKAGE's pool path and sha256 in a Packages index."""
    for stanza in index.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", stanza, re.M):
            filename = re.search(r"^Filename: (pool/\S+\.deb)$", stanza, re.M)
            sha256 = re.search(r"^SHA256: ([0-9a-f]{64})$", stanza, re.M)
            if filename and sha256:
                return filename[1], sha256[1]
    raise StepError(STEP, f"Debian {SUITE} has no package {package}")


def _checked(data: bytes, sha256: str, name: str) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StepError(STEP, f"{name}: checksum mismatch with Debian {SUITE}'s signed index")
    return data


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as resp:
            data: bytes = resp.read()
            return data
    except OSError as e:
        raise StepError(STEP, f"{url}: {e}", hint="the Debian archive must be reachable (CBIOS_DEBIAN_MIRROR)") \
            from None
