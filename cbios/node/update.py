"""`cbios update SOURCE`: new firmware into the copy that is not running, tried on the next boot.

SOURCE is a build's or a PXE bundle's directory (or its manifest.json), a release file, or an
http(s) URL of one (`cbios pxe serve`, any web server). The manifest's Ed25519 signature is
checked first, with the key this firmware carries, then what it says (profile, architecture,
version). root.img goes into the copy in one pass as it arrives, never held whole, hashed on
the way; the copy is marked bad while it is written, so a cut-off at any moment leaves the
node booting the copy it runs. Then every block is read back through dm-verity against the
signed root hash, and only then does the copy become the one to try next, with the profile's
tries; the health gate commits it or the boot loader falls back. /var and the slots'
volumes are never touched."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cbios.node import contract
from cbios.node.boot import bootenv, status, verity

MANIFEST, SIGNATURE = contract.MANIFEST, contract.SIGNATURE
IMAGE = "root.img"
KEY = contract.UPDATE_KEY
LOCK = Path("/run/cbios/update.lock")
CHUNK = 1 << 20
PROGRESS_EVERY = 5.0
HTTP_TIMEOUT = 30


class UpdateError(Exception):
    """A refusal or a failure: one line that names what and where."""


class NotThere(UpdateError):
    """The source has no such file."""


# -- the source ----------------------------------------------------------------------


class Source:
    """Where the new firmware is: an http(s) base URL, a directory, or a release file (a tar
    archive of the same files, `cbios release`)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.url: str | None = None
        self.directory: Path | None = None
        self.tar: tarfile.TarFile | None = None
        path = Path(text)
        if re.match(r"^https?://", text):
            self.url = text if text.endswith("/") else text + "/"
        elif path.is_file() and path.name != MANIFEST:
            try:
                self.tar = tarfile.open(path, "r:")
            except (tarfile.TarError, OSError) as e:
                raise UpdateError(f"{text}: not a release file (a tar archive from 'cbios release'): {e}") from None
        else:
            self.directory = path.parent if path.name == MANIFEST else path
            if not (self.directory / MANIFEST).is_file():
                raise UpdateError(f"{text}: no {MANIFEST} there (a build or PXE bundle directory, "
                                  "a release file, or an http(s) URL)")

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def where(self, name: str) -> str:
        if self.url:
            return self.url + name
        if self.tar is not None:
            return f"{self.text}:{name}"
        assert self.directory is not None
        return str(self.directory / name)

    def open(self, name: str) -> IO[bytes]:
        if self.tar is not None:
            try:
                member = self.tar.getmember(name)
            except KeyError:
                raise NotThere(f"{self.where(name)}: not in the release file") from None
            except tarfile.TarError as e:
                raise UpdateError(f"{self.where(name)}: the release file is damaged ({e})") from None
            f = self.tar.extractfile(member) if member.isfile() else None
            if f is None:
                raise UpdateError(f"{self.where(name)}: not a plain file")
            return f
        try:
            if self.url:
                return urllib.request.urlopen(self.where(name), timeout=HTTP_TIMEOUT)  # type: ignore[no-any-return]
            return open(self.where(name), "rb")
        except urllib.error.HTTPError as e:
            error = NotThere if e.code == 404 else UpdateError
            raise error(f"{self.where(name)}: HTTP {e.code} {e.reason}") from None
        except FileNotFoundError:
            raise NotThere(f"{self.where(name)}: no such file") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            raise UpdateError(f"{self.where(name)}: {reason}") from None
        except (ValueError, http.client.HTTPException) as e:  # a malformed URL, a broken reply
            raise UpdateError(f"{self.where(name)}: {e or type(e).__name__}") from None

    def read(self, name: str, limit: int = 1 << 20) -> bytes:
        with self.open(name) as f:
            data = _read(f, self.where(name), 0, limit + 1)
        if len(data) > limit:
            raise UpdateError(f"{self.where(name)}: larger than {limit} bytes")
        return data

    def read_if_there(self, name: str, limit: int) -> bytes | None:
        """NAME's bytes, or None when the source has no such file."""
        try:
            return self.read(name, limit)
        except NotThere:
            return None


# -- the manifest --------------------------------------------------------------------


def verify_signature(data: bytes, signature: bytes, key: Path) -> bool:
    """An Ed25519 signature of DATA with KEY (PEM public key), checked by openssl."""
    with tempfile.TemporaryDirectory(prefix="cbios-update-") as tmp:
        (Path(tmp) / "data").write_bytes(data)
        (Path(tmp) / "sig").write_bytes(signature)
        proc = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(key), "-rawin",
                               "-in", f"{tmp}/data", "-sigfile", f"{tmp}/sig"],
                              capture_output=True, stdin=subprocess.DEVNULL, check=False)
    return proc.returncode == 0


VERSION = re.compile(r"\d+(\.\d+){0,3}")  # as a profile's version
SHA256 = re.compile(r"[0-9a-f]{64}")


def version_key(text: str) -> tuple[int, ...]:
    """'1.10.0' > '1.9.2', and '1.0' == '1.0.0'."""
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (4 - len(parts)))


@dataclass(frozen=True)
class Firmware:
    """What the manifest says the update is."""

    profile: str
    version: str
    architecture: str
    tries: int
    root_sha256: str
    root_size: int
    verity: verity.Verity
    kernel_sha256: str  # root.img's /boot/vmlinuz and /boot/initrd.img, which GRUB checks
    initrd_sha256: str


def parse_manifest(data: bytes, where: str) -> Firmware:
    try:
        m = json.loads(data)
        arts = m["artifacts"]
        firmware = Firmware(
            profile=str(m["profile"]), version=str(m["version"]), architecture=str(m["architecture"]),
            tries=int(m["boot"]["tries"]),
            root_sha256=str(arts[IMAGE]["sha256"]), root_size=int(arts[IMAGE]["size"]),
            verity=verity.Verity.parse(str(m["verity"]["param"])),
            kernel_sha256=str(arts["vmlinuz"]["sha256"]), initrd_sha256=str(arts["initrd.img"]["sha256"]))
    except json.JSONDecodeError as e:
        raise UpdateError(f"{where}: not JSON ({e.msg}, line {e.lineno})") from None
    except verity.VerityError as e:
        raise UpdateError(f"{where}: not a CBIOS manifest ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UpdateError(f"{where}: not a CBIOS manifest (no {e})") from None
    if not all(SHA256.fullmatch(h) for h in (firmware.root_sha256, firmware.kernel_sha256, firmware.initrd_sha256)):
        raise UpdateError(f"{where}: not a CBIOS manifest (a sha256 that is not one)")
    if firmware.verity.hash_offset >= firmware.root_size:
        raise UpdateError(f"{where}: not a CBIOS manifest (its verity data blocks overrun root.img)")
    if not VERSION.fullmatch(firmware.version) or not 1 <= firmware.tries <= 9:
        raise UpdateError(f"{where}: not a CBIOS manifest (version {firmware.version!r}, "
                          f"tries {firmware.tries}: a version like 1.2.3 and 1 to 9 tries)")
    return firmware


def check_firmware(new: Firmware, own: dict[str, str], *, allow_downgrade: bool, where: str) -> None:
    """Refuse firmware of another profile or architecture, and an older (or the same) version."""
    if new.profile != own["CBIOS_PROFILE"]:
        raise UpdateError(f"{where}: firmware of profile {new.profile}, this node runs {own['CBIOS_PROFILE']}")
    if new.architecture != own.get("CBIOS_ARCHITECTURE"):
        raise UpdateError(f"{where}: firmware for {new.architecture}, this node is "
                          f"{own.get('CBIOS_ARCHITECTURE', 'of an unknown architecture')}")
    running = own["CBIOS_VERSION"]
    if not allow_downgrade and version_key(new.version) <= version_key(running):
        what = ("the one this node runs" if version_key(new.version) == version_key(running)
                else f"older than {running}, which this node runs")
        raise UpdateError(f"{where}: version {new.version} is {what}; add --allow-downgrade to write it anyway")


def load_manifest(source: Source, own: dict[str, str], key: Path, *, allow_downgrade: bool,
                  say: Callable[[str], None]) -> Firmware:
    data = source.read(MANIFEST)
    where = source.where(MANIFEST)
    if not key.is_file():
        raise UpdateError(f"this firmware carries no signing key ({key}): it takes no update")
    signature = source.read_if_there(SIGNATURE, 4096)
    if signature is None:
        raise UpdateError(f"{source.where(SIGNATURE)}: missing: this firmware accepts signed updates only")
    if not verify_signature(data, signature, key):
        raise UpdateError(f"{where}: signature does not verify with this node's key ({key})")
    say(f"{MANIFEST}: signature good ({key})")
    new = parse_manifest(data, where)
    check_firmware(new, own, allow_downgrade=allow_downgrade, where=where)
    return new


# -- streaming -----------------------------------------------------------------------


def stream(source: Source, new: Firmware, sink: IO[bytes], say: Callable[[str], None], doing: str) -> str:
    """root.img from SOURCE into SINK as it arrives, never more than the manifest's size;
    its sha256 must be the manifest's. A write that fails or a transfer cut short is a verdict."""
    h = hashlib.sha256()
    done = 0
    start = last = time.monotonic()
    where = source.where(IMAGE)
    with source.open(IMAGE) as f:
        while chunk := _read(f, where, done, CHUNK):
            done += len(chunk)
            if done > new.root_size:
                raise UpdateError(f"{where}: more than the {new.root_size} bytes the manifest says")
            h.update(chunk)
            try:
                sink.write(chunk)
            except OSError as e:
                raise UpdateError(f"{getattr(sink, 'name', 'the copy')}: writing failed: {e}") from None
            if time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                say(_progress(doing, done, new.root_size))
    if done < new.root_size:
        raise UpdateError(f"{where}: the transfer broke off after {done >> 20} MiB ({done} of {new.root_size} bytes)")
    if h.hexdigest() != new.root_sha256:
        raise UpdateError(f"{where}: checksum mismatch (sha256 {h.hexdigest()[:12]}, "
                          f"the manifest says {new.root_sha256[:12]})")
    say(f"{_progress(doing, done, new.root_size)} in {time.monotonic() - start:.1f} s")
    return h.hexdigest()


def _progress(doing: str, done: int, total: int) -> str:
    return f"{doing}: {done >> 20}/{total >> 20} MiB ({100 * done // max(total, 1)}%)"


def _read(f: IO[bytes], where: str, done: int, size: int) -> bytes:
    try:
        return f.read(size)
    except (OSError, urllib.error.URLError, http.client.HTTPException, tarfile.TarError) as e:
        raise UpdateError(f"{where}: the transfer broke off after {done >> 20} MiB ({e})") from None


# -- the boot state ------------------------------------------------------------------


def target_copy(env: dict[str, str], running: str) -> str:
    """The copy to write: the one not running, and only from a committed one."""
    if env.get(f"cbios_{running}_state") != "good":
        raise UpdateError(f"copy {running} (running) is not committed yet: update once the node is ready "
                          f"(cbios status)")
    return bootenv.other(running)


# -- the whole update ----------------------------------------------------------------


@dataclass
class Node:
    """The node's side of an update; paths are parameters so that tests can use files."""

    own: dict[str, str]
    running: str | None
    boot_env: Callable[[bool], Any]  # context manager yielding the grubenv path
    device: Callable[[str], Path]  # copy -> its block device
    key: Path = KEY
    lock: Path = LOCK
    # Every block of a written copy read back through dm-verity: None, or what failed.
    check: Callable[[Path, verity.Verity], str | None] = lambda device, v: verity.scrub(device, v, "cbios-update")


def update(node: Node, source_text: str, *, allow_downgrade: bool = False, force: bool = False,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """One update at a time on a node, whoever asks (the CLI, CB-Executor)."""
    if node.running is None:
        raise UpdateError("not booted from a node disk (no copy is running): nothing to update")
    node.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(node.lock, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpdateError(f"another update is running ({node.lock})") from None
        with contextlib.closing(Source(source_text)) as source:
            return _update(node, source, allow_downgrade=allow_downgrade, force=force, say=say)


def _update(node: Node, source: Source, *, allow_downgrade: bool, force: bool,
            say: Callable[[str], None]) -> dict[str, Any]:
    assert node.running is not None
    start = time.monotonic()
    new = load_manifest(source, node.own, node.key, allow_downgrade=allow_downgrade, say=say)
    with node.boot_env(False) as path:
        env = bootenv.read(path)
    if new.version in bootenv.refused(env) and not force:
        raise UpdateError(f"{source.where(MANIFEST)}: version {new.version} failed the health gate on this node "
                          f"before; add --force to write it anyway")
    target = target_copy(env, node.running)
    device = node.device(target)
    room = _size(device)
    if new.root_size > room:
        raise UpdateError(f"{device}: {room} bytes, too small for root.img ({new.root_size} bytes)")
    say(f"{node.own['CBIOS_PROFILE']} {node.own['CBIOS_VERSION']} -> {new.version}: "
        f"from {source.where(IMAGE)} ({new.root_size >> 20} MiB)")

    # From here on the target copy is bad until it is whole and checked: a cut-off never boots it.
    with node.boot_env(True) as path:
        env = bootenv.read(path)
        target_copy(env, node.running)  # still so, now that the block is ours to write
        bootenv.write(path, bootenv.marked_bad(env, target))
    say(f"writing copy {target} ({device})")
    with open(device, "r+b", buffering=0) as dev:
        stream(source, new, dev, say, f"writing copy {target}")
        os.fsync(dev.fileno())
        os.posix_fadvise(dev.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read back the disk, not the cache
    written = time.monotonic()
    say(f"reading copy {target} back through dm-verity")
    if problem := node.check(device, new.verity):
        raise UpdateError(f"{problem}: copy {target} stays bad")
    with node.boot_env(True) as path:
        bootenv.write_sums(path, target, new.kernel_sha256, new.initrd_sha256)
        bootenv.write(path, bootenv.to_try(bootenv.read(path), target, new.tries, new.verity.param))
    result = {
        "profile": new.profile, "from": node.own["CBIOS_VERSION"], "version": new.version,
        "copy": target, "device": str(device), "tries": new.tries, "root_sha256": new.root_sha256,
        "write_seconds": round(written - start, 1), "seconds": round(time.monotonic() - start, 1),
    }
    say(f"UPDATED {new.profile} {node.own['CBIOS_VERSION']} -> {new.version}: copy {target} boots next, "
        f"with {new.tries} {'try' if new.tries == 1 else 'tries'} to become ready ({result['seconds']} s)")
    return result


def _size(device: Path) -> int:
    with open(device, "rb") as f:
        return f.seek(0, os.SEEK_END)


def node_here() -> Node:
    """This node: its release, the running copy, the boot partition, the copies' LVs."""
    own = status.release(status.RELEASE.read_text())
    vg = own.get("CBIOS_VG", "lvm")
    return Node(own=own, running=bootenv.running_copy(),
                boot_env=lambda writable: bootenv.boot_partition(writable=writable),
                device=lambda copy: Path(f"/dev/{vg}/{bootenv.COPIES[copy]}"))

