"""CB-Manager's store of compute-node firmware: `slot image add|list|remove`.

A stored image is a signed release (`cbios release`) of a profile, unpacked into
STORE/PROFILE/VERSION/ (contract.STORE_FILES), for the boot-server slots to serve. It comes
in as a stream (a file or a URL the `slot` CLI opened, handed over as a descriptor), read
once: its manifest and signature come first, and nothing else is taken before that
signature verifies with the key this firmware trusts (contract.UPDATE_KEY); then every
file is hashed as it is written and must be what the signed manifest says. A release that
is not signed by that key, damaged or cut short leaves nothing behind: it is unpacked
beside the store and moved into place whole."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from cbios.node import contract
from cbios.node.update import VERSION, UpdateError, parse_manifest, verify_signature, version_key
from cbios.node.wire import Failed, Invalid

ADDED = "added.json"  # when, by what key, how large: written by add, read by list
SMALL = 1 << 20  # manifest.json, its signature: no larger
CHUNK = 1 << 20
KIND = "compute"  # the Kind column: firmware for compute nodes, next to the templates' kinds
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a profile's name, as the flasher takes it


def key_fingerprint(key: Path) -> str:
    """SHA256:<16 hex> of a PEM public key's DER bytes: what `signed by` shows."""
    body = "".join(line for line in key.read_text().splitlines() if line and not line.startswith("-----"))
    return "SHA256:" + hashlib.sha256(base64.b64decode(body)).hexdigest()[:16]


def _image_dir(store: Path, name: str, version: str) -> Path:
    return store / name / version


class _Bounded:
    """SOURCE as tarfile reads it, within bounds: reads of a chunk at most, and no more than
    UNSIGNED bytes before the manifest's signature has verified; then no more than the
    files it names and their headers (`sign`). tarfile holds a tar header whole in memory:
    one that claims gigabytes ends the read instead."""

    UNSIGNED = 4 << 20
    HEADERS = 16 << 20  # past the signed files' bytes: their tar headers and padding

    def __init__(self, source: IO[bytes], where: str) -> None:
        self.source = source
        self.where = where
        self.taken = 0
        self.limit = self.UNSIGNED

    def sign(self, files: int) -> None:
        self.limit = self.taken + files + self.HEADERS

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > CHUNK:
            raise Invalid(f"{self.where}: not a release file (a read of {size} bytes)")
        data = self.source.read(size)
        self.taken += len(data)
        if self.taken > self.limit:
            raise Invalid(f"{self.where}: more than its signed manifest names (or no signed manifest in its first "
                          f"{self.UNSIGNED >> 20} MiB): not a release from 'cbios release'")
        return data


def add(source: IO[bytes], store: Path, key: Path, where: str) -> dict[str, Any]:
    """The release read from SOURCE, checked and stored; its row. Invalid when it is not a
    release signed with KEY, whole; nothing is left in STORE then."""
    if not key.is_file():
        raise Failed(f"this firmware carries no signing key ({key}): it stores no image")
    for left in [*store.glob(".incoming-*"), *store.glob(".removing-*")]:  # of a CB-Manager that was killed
        shutil.rmtree(left, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store))
    except OSError as e:
        raise Failed(f"the image store {store} cannot be written ({e.strerror or e}): does CB-Manager "
                     f"have its volume {contract.volume_name(contract.MANAGER_EID, contract.IMAGE_STORE_IID)}?"
                     ) from None
    try:
        meta = _unpack(source, staging, store, key, where)
        dest = _image_dir(store, meta["image"], meta["version"])
        if dest.is_dir():
            held = json.loads((dest / ADDED).read_text())
            if held.get("root_sha256") != meta["root_sha256"]:
                raise Invalid(f"{where}: the store holds another {meta['image']} {meta['version']}: "
                              f"remove it first (slot image remove {meta['image']} {meta['version']})")
            return {**_row(dest), "already": True}
        (staging / ADDED).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for path in staging.iterdir():
            path.chmod(0o644)  # the boot-server slots serve them
        staging.chmod(0o755)
        dest.parent.mkdir(mode=0o755, exist_ok=True)
        try:
            os.rename(staging, dest)
        except OSError:  # another add of the same release got there first
            if not (dest / ADDED).is_file():
                raise
        return {**_row(dest), "already": False}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack(source: IO[bytes], staging: Path, store: Path, key: Path, where: str) -> dict[str, Any]:
    """The release's files into STAGING, each checked; what added.json records."""
    small: dict[str, bytes] = {}
    firmware = None
    artifacts: dict[str, Any] = {}
    taken: set[str] = set()
    bounded = _Bounded(source, where)
    try:
        with tarfile.open(fileobj=bounded, mode="r|", bufsize=CHUNK) as tar:  # type: ignore[call-overload]
            for member in tar:
                name = member.name
                if name == contract.SUMS and name not in taken:  # for people (sha256sum -c); nothing trusts it
                    taken.add(name)
                    continue
                if name not in contract.STORE_FILES or name in taken or not member.isfile():
                    raise Invalid(f"{where}: '{name[:60]}' is not what a release holds (a file from 'cbios release')")
                taken.add(name)
                data = tar.extractfile(member)
                assert data is not None  # a regular file
                if name in (contract.MANIFEST, contract.SIGNATURE):
                    if member.size > SMALL:
                        raise Invalid(f"{where}: {name} is larger than {SMALL} bytes")
                    small[name] = data.read()
                    (staging / name).write_bytes(small[name])
                    if len(small) == 2:
                        firmware, artifacts = _signed(small, key, where)
                        bounded.sign(sum(int(a["size"]) for a in artifacts.values()))
                        _room(store, artifacts, where)
                    continue
                if firmware is None:
                    raise Invalid(f"{where}: {name} comes before a signed manifest: not a release from "
                                  "'cbios release' (nothing is taken before its signature verifies)")
                _copy(data, staging / name, artifacts[name], f"{where}:{name}")
    except (tarfile.TarError, EOFError) as e:
        raise Invalid(f"{where}: not a whole release file (a tar archive from 'cbios release'): {e}") from None
    if firmware is None:
        raise Invalid(f"{where}: no signed manifest ({contract.MANIFEST} and {contract.SIGNATURE}): "
                      "not a release from 'cbios release'")
    missing = [n for n in contract.STORE_FILES if n not in taken]
    if missing:
        raise Invalid(f"{where}: cut short or incomplete, no {', '.join(missing)}: "
                      "a release made by 'cbios release' holds them all")
    return {"image": firmware.profile, "version": firmware.version, "architecture": firmware.architecture,
            "root_sha256": firmware.root_sha256, "verity": firmware.verity.param,
            "size": sum(int(a["size"]) for a in artifacts.values()) + sum(len(b) for b in small.values()),
            "signed_by": key_fingerprint(key), "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _signed(small: dict[str, bytes], key: Path, where: str) -> tuple[Any, dict[str, Any]]:
    """The manifest, once its signature verifies with KEY, and the artifacts it names."""
    manifest, signature = small[contract.MANIFEST], small[contract.SIGNATURE]
    if not verify_signature(manifest, signature, key):
        raise Invalid(f"{where}: {contract.MANIFEST}: its signature does not verify with this firmware's key "
                      f"({key_fingerprint(key)}): nothing stored")
    try:
        firmware = parse_manifest(manifest, f"{where}:{contract.MANIFEST}")
        data = json.loads(manifest)
        artifacts = {n: {"sha256": str(data["artifacts"][n]["sha256"]), "size": int(data["artifacts"][n]["size"])}
                     for n in contract.STORE_FILES if n not in (contract.MANIFEST, contract.SIGNATURE)}
    except UpdateError as e:
        raise Invalid(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise Invalid(f"{where}:{contract.MANIFEST}: names no {e}: it cannot be booted over the network") from None
    if not NAME.fullmatch(firmware.profile):
        raise Invalid(f"{where}:{contract.MANIFEST}: profile '{firmware.profile[:40]}' is not a profile's name")
    return firmware, artifacts


def _room(store: Path, artifacts: dict[str, Any], where: str) -> None:
    need = sum(int(a["size"]) for a in artifacts.values())
    st = os.statvfs(store)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise Failed(f"{where}: needs {need >> 20} MiB, the image store has {free >> 20} MiB free "
                     "(slot image remove an image it no longer needs)")


def _copy(data: IO[bytes], dest: Path, meta: dict[str, Any], where: str) -> None:
    """DATA into DEST, no more than the manifest's size, hashed on the way."""
    h = hashlib.sha256()
    got = 0
    with open(dest, "wb") as out:
        while chunk := data.read(CHUNK):
            got += len(chunk)
            if got > meta["size"]:
                raise Invalid(f"{where}: larger than the {meta['size']} bytes its signed manifest says")
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if got != meta["size"]:
        raise Invalid(f"{where}: {got} bytes, its signed manifest says {meta['size']}")
    if h.hexdigest() != meta["sha256"]:
        raise Invalid(f"{where}: its sha256 is not the one its signed manifest says")


def _row(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / ADDED).read_text())
    return {"image": meta["image"], "type": KIND, "version": meta["version"], "date": meta["added"],
            "size": meta["size"], "signed_by": meta["signed_by"], "architecture": meta["architecture"],
            "root_sha256": meta["root_sha256"], "path": str(directory),
            "description": f"CBIOS {meta['image']} {meta['version']} ({meta['architecture']})"}


def images(store: Path) -> list[dict[str, Any]]:
    """The store's images, by name and version (none when it is not there; one whose
    added.json cannot be read, after a power cut, is left out)."""
    found = []
    for path in store.glob(f"*/*/{ADDED}"):
        if not path.parent.parent.name.startswith("."):
            try:
                found.append(_row(path.parent))
            except (OSError, ValueError, KeyError):
                continue
    return sorted(found, key=lambda r: (r["image"], version_key(r["version"])))


def find(store: Path, name: str, version: str) -> Path:
    directory = _image_dir(store, name, version)
    if not NAME.fullmatch(name) or not VERSION.fullmatch(version) or not (directory / ADDED).is_file():
        held = ", ".join(f"{r['image']} {r['version']}" for r in images(store)) or "none"
        raise Invalid(f"no image {name} {version} in the store (it holds: {held})")
    return directory


def remove(store: Path, name: str, version: str) -> dict[str, Any]:
    """The image out of the store; its row."""
    directory = find(store, name, version)
    row = _row(directory)
    # Renamed first: a boot server never serves a half-removed image.
    gone = store / f".removing-{name}-{version}"
    os.rename(directory, gone)
    shutil.rmtree(gone)
    if not any(directory.parent.iterdir()):
        directory.parent.rmdir()
    return row
