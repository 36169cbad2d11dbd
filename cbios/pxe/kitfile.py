"""A field kit (`cbios pxe pack`), read in place: one Python zipapp holding the PXE server
(the standard-library modules of this package it needs), a bundle's files under BUNDLE
stored uncompressed, and KEY, the public key that verifies the bundle's manifest. A stored
member is a run of bytes at a known offset in the kit: it is checked, and served, from there
(no copy is unpacked anywhere).

Standard library only: the kit carries it."""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cbios.errors import CbiosError
from cbios.node import contract, ed25519
from cbios.node.httpd import BundleServer
from cbios.pxe import bundle
from cbios.pxe.bundle import FILES

BUNDLE = "bundle/"  # the bundle's files, by their names
KEY = contract.UPDATE_KEY.name
LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
LOCAL_SIGNATURE = b"PK\x03\x04"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Span:
    """Where a stored member's bytes are in the kit."""

    offset: int
    size: int


class Kit:
    """A kit file's members (a bundle.Members): what it holds, where, and its check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spans: dict[str, Span] = {}  # the bundle's files
        self.key_span: Span | None = None
        try:
            # Kept open: what is checked and what is served are the bytes of this one file,
            # even if the path is copied over or removed while the kit serves.
            self._file = open(path, "rb")
            with zipfile.ZipFile(self._file) as archive:
                names = [info.filename for info in archive.infolist()]
                if len(set(names)) != len(names):
                    raise ValueError("a name is in it twice")
                for info in archive.infolist():
                    if info.filename.startswith(BUNDLE):
                        self.spans[info.filename.removeprefix(BUNDLE)] = _span(self._file, info)
                    elif info.filename == KEY:
                        self.key_span = _span(self._file, info)
        except FileNotFoundError:
            raise CbiosError(f"{path}: no such file") from None
        except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError, EOFError, struct.error) as e:
            raise CbiosError(f"{path}: not a field kit, or a damaged one ({e})") from None
        if contract.MANIFEST not in self.spans or self.key_span is None:
            raise CbiosError(f"{path}: not a field kit (no {BUNDLE}{contract.MANIFEST} or {KEY} in it)")

    def where(self, name: str) -> str:
        return f"{self.path}: {name}"

    def size(self, name: str) -> int | None:
        return self.spans[name].size if name in self.spans else None

    def open(self, name: str) -> tuple[BinaryIO, Span]:
        """The kit opened again (its own file position, for one transfer), and NAME's span."""
        return open(f"/proc/self/fd/{self._file.fileno()}", "rb"), self.spans[name]

    def read(self, name: str) -> bytes:
        return self._read(self.spans[name])

    def _read(self, span: Span) -> bytes:
        return os.pread(self._file.fileno(), span.size, span.offset)

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        span, done = self.spans[name], 0
        while done < span.size and (chunk := os.pread(self._file.fileno(), min(CHUNK, span.size - done),
                                                      span.offset + done)):
            h.update(chunk)
            done += len(chunk)
        return h.hexdigest()

    def key(self) -> bytes:
        """The DER of the kit's own key."""
        assert self.key_span is not None
        return key_der(self._read(self.key_span), self.where(KEY))

    def manifest(self) -> dict[str, Any]:
        """The manifest, unverified (what `info` shows)."""
        return bundle.parse_manifest(self.read(contract.MANIFEST), self.where(contract.MANIFEST))

    def check_signature(self, key: bytes) -> dict[str, Any]:
        """The manifest, once its signature verifies with KEY (DER)."""
        if contract.SIGNATURE not in self.spans:
            raise CbiosError(f"{self.where(contract.SIGNATURE)}: missing: the manifest is not signed")
        raw = self.read(contract.MANIFEST)
        if not ed25519.verify(ed25519.raw_key(key), raw, self.read(contract.SIGNATURE)):
            raise CbiosError(f"{self.where(contract.MANIFEST)}: its signature does not verify with key "
                             f"{ed25519.fingerprint(key)}: not what the release engineer signed")
        return bundle.parse_manifest(raw, self.where(contract.MANIFEST))

    def check(self, key: bytes, checked: Callable[[str, int], None] = lambda name, size: None) -> dict[str, Any]:
        """The manifest, once its signature verifies with KEY (DER) and every file of the
        bundle matches it, each one CHECKED as it does."""
        data = self.check_signature(key)
        bundle.check_members(self, data, checked)
        return data


def key_der(pem: bytes, where: str) -> bytes:
    """The DER of the Ed25519 public key in PEM, or a clear error naming WHERE. A file that
    holds a private key too is refused: it is never to travel in a kit."""
    if b"PRIVATE KEY" in pem:
        raise CbiosError(f"{where}: holds a private key", hint="give the public key alone: openssl pkey -in KEY "
                         "-pubout")
    try:
        return ed25519.public_key_der(pem.decode("ascii", errors="replace"))
    except ValueError as e:
        raise CbiosError(f"{where}: {e}", hint="a public key: openssl pkey -in KEY -pubout") from None


def _span(f: BinaryIO, info: zipfile.ZipInfo) -> Span:
    """Where INFO's bytes are in F (the local header before them has its own extra field)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{info.filename} is compressed")
    f.seek(info.header_offset)
    head = f.read(LOCAL_HEADER.size)
    if len(head) != LOCAL_HEADER.size or LOCAL_HEADER.unpack(head)[0] != LOCAL_SIGNATURE:
        raise ValueError(f"no local header for {info.filename}")
    _, name_length, extra_length = LOCAL_HEADER.unpack(head)
    offset = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
    if offset + info.file_size > os.fstat(f.fileno()).st_size:
        raise ValueError(f"{info.filename} is cut short")
    return Span(offset, info.file_size)


class KitServer(BundleServer):
    """A kit's bundle over HTTP, each file sent from where it is in the kit."""

    def __init__(self, address: tuple[str, int], kit: Kit, receipts: Path, *, preset_mode: str | None) -> None:
        super().__init__(address, kit.path, FILES, receipts, preset_mode=preset_mode)
        self.kit = kit

    def locate(self, name: str) -> Path | None:
        return None  # no file of its own: open_file says what is served

    def open_file(self, name: str) -> tuple[BinaryIO, int, int] | None:
        if name not in self.files or name not in self.kit.spans:
            return None
        f, span = self.kit.open(name)
        return f, span.offset, span.size
