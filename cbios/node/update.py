"""`cbios update SOURCE`: new firmware into the copy that is not running, tried on the next boot.

SOURCE is a build's or a PXE bundle's directory (or its manifest.json), or an http(s) URL of
one (`cbios pxe serve`, any web server). The manifest is checked first (its signature against
this firmware's key, when it has one; profile, architecture, version); then root.img.zst is
streamed twice, never held whole: once only to check both sha256s, once to write the copy
(checked again as it streams, then read back). The copy is marked bad while it is written,
so a cut-off at any moment leaves the node booting the copy it runs. Only then does it
become the copy to try next, with the profile's tries; the health gate commits it or the
boot loader falls back. /var and the slots' volumes are never touched."""

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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cbios.node import bootenv, status

MANIFEST = "manifest.json"
SIGNATURE = MANIFEST + ".sig"
IMAGE = "root.img.zst"
KEY = Path("/usr/lib/cbios/update-key.pem")
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
    zst_sha256: str
    zst_size: int


def parse_manifest(data: bytes, where: str) -> Firmware:
    try:
        m = json.loads(data)
        arts = m["artifacts"]
        firmware = Firmware(
            profile=str(m["profile"]), version=str(m["version"]), architecture=str(m["architecture"]),
            tries=int(m["boot"]["tries"]),
            root_sha256=str(arts["root.img"]["sha256"]), root_size=int(arts["root.img"]["size"]),
            zst_sha256=str(arts[IMAGE]["sha256"]), zst_size=int(arts[IMAGE]["size"]))
    except json.JSONDecodeError as e:
        raise UpdateError(f"{where}: not JSON ({e.msg}, line {e.lineno})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UpdateError(f"{where}: not a CBIOS manifest (no {e})") from None
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
    if key.is_file():
        signature = source.read_if_there(SIGNATURE, 4096)
        if signature is None:
            raise UpdateError(f"{source.where(SIGNATURE)}: missing: this firmware accepts signed updates only")
        if not verify_signature(data, signature, key):
            raise UpdateError(f"{where}: signature does not verify with this node's key ({key})")
        say(f"{MANIFEST}: signature good ({key})")
    else:
        say(f"{MANIFEST}: this firmware has no signing key: checked by sha256 only")
    new = parse_manifest(data, where)
    check_firmware(new, own, allow_downgrade=allow_downgrade, where=where)
    return new


# -- streaming -----------------------------------------------------------------------


@dataclass
class Stream:
    """One pass over root.img.zst: its bytes, and what zstd made of them."""

    zst_sha256: str = ""
    zst_bytes: int = 0
    root_sha256: str = ""
    root_bytes: int = 0


def stream(source: Source, new: Firmware, sink: IO[bytes] | None, say: Callable[[str], None],
           doing: str) -> Stream:
    """Pass root.img.zst through zstd; the output goes to SINK (None: only hashed).

    Both ends are always read to their end, whatever goes wrong (zstd refusing the data, a
    write failing, more output than the manifest says), so that neither pipe can stall and
    the verdict is the checksum's."""
    zst, root = hashlib.sha256(), hashlib.sha256()
    out = Stream()
    write_error: list[OSError] = []
    proc = subprocess.Popen(["zstd", "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None

    def unpacked() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(CHUNK):
            root.update(chunk)
            out.root_bytes += len(chunk)
            if sink is not None and not write_error and out.root_bytes <= new.root_size:
                try:
                    sink.write(chunk)
                except OSError as e:
                    write_error.append(e)

    t = threading.Thread(target=unpacked, daemon=True)
    t.start()
    last = time.monotonic()
    where = source.where(IMAGE)
    unpacking = True
    try:
        with source.open(IMAGE) as f:
            while chunk := _read(f, where, out.zst_bytes, CHUNK):
                zst.update(chunk)
                out.zst_bytes += len(chunk)
                if out.zst_bytes > new.zst_size:
                    raise UpdateError(f"{where}: more than the {new.zst_size} bytes the manifest says")
                if unpacking:
                    try:
                        proc.stdin.write(chunk)
                    except BrokenPipeError:
                        unpacking = False  # zstd gave up on the data: the checksums will say why
                if time.monotonic() - last >= PROGRESS_EVERY:
                    last = time.monotonic()
                    say(f"{doing}: {out.zst_bytes >> 20}/{new.zst_size >> 20} MiB "
                        f"({100 * out.zst_bytes // max(new.zst_size, 1)}%)")
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        t.join()
        proc.wait()
    finally:
        # Whatever happened, zstd is gone and the reader has stopped before SINK is closed.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        t.join()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
    out.zst_sha256, out.root_sha256 = zst.hexdigest(), root.hexdigest()
    if out.zst_bytes < new.zst_size:
        raise UpdateError(f"{where}: the transfer broke off after {out.zst_bytes >> 20} MiB "
                          f"({out.zst_bytes} of {new.zst_size} bytes)")
    if out.zst_sha256 != new.zst_sha256:
        raise UpdateError(f"{where}: checksum mismatch (sha256 {out.zst_sha256[:12]}, "
                          f"the manifest says {new.zst_sha256[:12]})")
    if proc.returncode != 0 or out.root_bytes != new.root_size or out.root_sha256 != new.root_sha256:
        raise UpdateError(f"{where}: does not unpack to the manifest's root.img (zstd status {proc.returncode}, "
                          f"{out.root_bytes} bytes, sha256 {out.root_sha256[:12]})")
    if write_error:
        raise UpdateError(f"{getattr(sink, 'name', 'the copy')}: writing failed: {write_error[0]}")
    return out


def _read(f: IO[bytes], where: str, done: int, size: int) -> bytes:
    try:
        return f.read(size)
    except (OSError, urllib.error.URLError, http.client.HTTPException, tarfile.TarError) as e:
        raise UpdateError(f"{where}: the transfer broke off after {done >> 20} MiB ({e})") from None


def readback(device: Path, size: int) -> str:
    h = hashlib.sha256()
    left = size
    with open(device, "rb") as f:
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


# -- the boot state ------------------------------------------------------------------


def other(copy: str) -> str:
    return "spare" if copy == "root" else "root"


def target_copy(env: dict[str, str], running: str) -> str:
    """The copy to write: the one not running, and only from a committed one."""
    if env.get(f"cbios_{running}_state") != "good":
        raise UpdateError(f"copy {running} (running) is not committed yet: update once the node is ready "
                          f"(cbios status)")
    return other(running)


def marked_bad(env: dict[str, str], copy: str) -> dict[str, str]:
    """COPY bad, and the other one (the running one) to boot: GRUB boots an active copy that
    is bad (it counts tries of new copies only), so a bad copy must never be the active one."""
    new = dict(env)
    new[f"cbios_{copy}_state"] = "bad"
    new.pop(f"cbios_{copy}_tries", None)
    new["cbios_active"] = other(copy)
    return new


def to_try(env: dict[str, str], copy: str, tries: int) -> dict[str, str]:
    """COPY on trial next boot, with TRIES boots to become ready."""
    new = dict(env)
    new[f"cbios_{copy}_state"] = "new"
    new[f"cbios_{copy}_tries"] = str(tries)
    new["cbios_active"] = copy
    return new


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


def update(node: Node, source_text: str, *, allow_downgrade: bool = False,
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
            return _update(node, source, allow_downgrade=allow_downgrade, say=say)


def _update(node: Node, source: Source, *, allow_downgrade: bool, say: Callable[[str], None]) -> dict[str, Any]:
    assert node.running is not None
    start = time.monotonic()
    new = load_manifest(source, node.own, node.key, allow_downgrade=allow_downgrade, say=say)
    with node.boot_env(False) as path:
        env = bootenv.read(path)
    target = target_copy(env, node.running)
    device = node.device(target)
    room = _size(device)
    if new.root_size > room:
        raise UpdateError(f"{device}: {room} bytes, too small for root.img ({new.root_size} bytes)")
    say(f"{node.own['CBIOS_PROFILE']} {node.own['CBIOS_VERSION']} -> {new.version}: "
        f"checking {source.where(IMAGE)} ({new.zst_size >> 20} MiB)")
    stream(source, new, None, say, "checking")
    checked = time.monotonic()

    # From here on the target copy is bad until it is whole and checked: a cut-off never boots it.
    with node.boot_env(True) as path:
        env = bootenv.read(path)
        target_copy(env, node.running)  # still so, now that the block is ours to write
        bootenv.write(path, marked_bad(env, target))
    say(f"writing copy {target} ({device})")
    with open(device, "r+b", buffering=0) as dev:
        stream(source, new, dev, say, f"writing copy {target}")
        os.fsync(dev.fileno())
        os.posix_fadvise(dev.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read back the disk, not the cache
    if readback(device, new.root_size) != new.root_sha256:
        raise UpdateError(f"{device}: read back, it does not match root.img: copy {target} stays bad")
    with node.boot_env(True) as path:
        bootenv.write(path, to_try(bootenv.read(path), target, new.tries))
    result = {
        "profile": new.profile, "from": node.own["CBIOS_VERSION"], "version": new.version,
        "copy": target, "device": str(device), "tries": new.tries, "root_sha256": new.root_sha256,
        "check_seconds": round(checked - start, 1), "seconds": round(time.monotonic() - start, 1),
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

