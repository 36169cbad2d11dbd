"""`cbios update` (cbios.node.update) on files standing in for the node's LVs and boot
partition: real veritysetup hash trees (checked in user space here, by the kernel on a node),
real openssl signatures, a real HTTP server."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.server
import json
import os
import re
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbios import signing
from cbios.errors import CbiosError, StepError
from cbios.node import cli, update
from cbios.node.boot import bootenv, status, verity
from cbios.node.executor import requests
from cbios.node.wire import Invalid
from cbios.release import write_release

OWN = {"CBIOS_PROFILE": "qemu-test", "CBIOS_VERSION": "1.0.0", "CBIOS_ARCHITECTURE": "x86-64", "CBIOS_VG": "lvm"}
COPY_SIZE = 4 << 20
DATA = os.urandom(1 << 20) + bytes(1 << 20)  # the file system of a "root.img": 2 MiB


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_tree(tmp: Path, data: bytes) -> tuple[bytes, verity.Verity]:
    """DATA and its dm-verity hash tree, as the build lays them out (veritysetup)."""
    img = tmp / "root.img"
    img.write_bytes(data)
    blocks = len(data) // verity.BLOCK
    out = subprocess.run(verity.format_cmd(img, blocks), capture_output=True, text=True, check=True).stdout
    return img.read_bytes(), verity.Verity(verity.root_hash_of(out), blocks)


def make_release(directory: Path, key: Path | None, *, data: bytes = DATA, **fields: Any) -> Path:
    """A build directory as `cbios build` leaves it: root.img, the boot files, manifest.json
    (signed with KEY)."""
    directory.mkdir(parents=True, exist_ok=True)
    root, v = with_tree(directory, data)
    boot = {"vmlinuz": b"kernel", "initrd.img": b"initrd", "grub.cfg": b"menuentry", "boot.ipxe": b"#!ipxe"}
    for name, content in boot.items():
        (directory / name).write_bytes(content)
    doc = {"format": 1, "profile": "qemu-test", "version": "2.0.0", "architecture": "x86-64",
           "boot": {"tries": 2, "ready_timeout": 300}, "verity": {"param": v.param},
           "artifacts": {"root.img": {"sha256": sha256(root), "size": len(root)},
                         **{n: {"sha256": sha256(c), "size": len(c)} for n, c in boot.items()}}}
    doc.update(fields)
    (directory / "manifest.json").write_text(json.dumps(doc))
    if key is not None:
        sign(key, directory / "manifest.json")
    return directory


def userspace_check(device: Path, v: verity.Verity) -> str | None:
    """What the node's kernel checks through dm-verity, checked by veritysetup in user space."""
    proc = subprocess.run(["veritysetup", "verify", "--no-superblock", "--hash=sha256", "--salt=-",
                           f"--data-blocks={v.data_blocks}", f"--hash-offset={v.hash_offset}",
                           str(device), str(device), v.root_hash], capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else f"{device}: does not match the root hash"



def sign(key: Path, path: Path) -> None:
    subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(path),
                    "-out", f"{path}.sig"], check=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(d / "key.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(d / "key.pem"), "-pubout", "-out", str(d / "pub.pem")], check=True)
    return d / "key.pem", d / "pub.pem"


class FakeNode:
    """Two copy "LVs" (files) and a boot partition's grubenv, as a node has them."""

    def __init__(self, tmp: Path, pub: Path, running: str = "root", **env: str) -> None:
        self.dir = tmp
        self.copies = {c: tmp / f"{c}.lv" for c in bootenv.COPIES}
        for path in self.copies.values():
            path.write_bytes(b"\xaa" * COPY_SIZE)
        self.grubenv = tmp / "grubenv"
        base = {"cbios_active": running, "cbios_root_state": "good", "cbios_spare_state": "good"}
        self.grubenv.write_bytes(bootenv.render({**base, **env}))
        self.node = update.Node(own=dict(OWN), running=running, boot_env=self._env,
                                device=lambda c: self.copies[c], key=pub, lock=tmp / "update.lock",
                                check=userspace_check)

    @contextlib.contextmanager
    def _env(self, writable: bool) -> Iterator[Path]:
        """As the boot partition: mounted read-only unless asked, so a write then is a bug."""
        before = self.grubenv.read_bytes()
        yield self.grubenv
        assert writable or self.grubenv.read_bytes() == before, "boot state written under a read-only mount"

    def env(self) -> dict[str, str]:
        return bootenv.read(self.grubenv)

    def snapshot(self) -> dict[str, str]:
        return {name: sha256(p.read_bytes()) for name, p in [*self.copies.items(), ("env", self.grubenv)]}


def written(node: FakeNode, release: Path, copy: str = "spare") -> bool:
    image = (release / "root.img").read_bytes()
    return node.copies[copy].read_bytes()[:len(image)] == image


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture
def node(tmp_path: Path, keys: tuple[Path, Path]) -> FakeNode:
    return FakeNode(mkdir(tmp_path / "node"), keys[1])


def run(node: FakeNode, source: Path | str, **kw: Any) -> dict[str, Any]:
    lines: list[str] = []
    result = update.update(node.node, str(source), say=lines.append, **kw)
    result["said"] = lines
    return result


def test_an_update_writes_the_copy_not_running_and_makes_it_the_one_to_try(
        node: FakeNode, keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    root_before = node.snapshot()["root"]
    result = run(node, release)
    assert result["copy"] == "spare" and result["version"] == "2.0.0" and result["from"] == "1.0.0"
    assert written(node, release)
    assert node.snapshot()["root"] == root_before  # the running copy is not touched
    env = node.env()
    assert env["cbios_active"] == "spare" and env["cbios_spare_state"] == "new" and env["cbios_spare_tries"] == "2"
    assert env["cbios_spare_verity"] == json.loads((release / "manifest.json").read_text())["verity"]["param"]
    # What GRUB checks the new copy's kernel and initrd against, beside the boot state.
    assert bootenv.sums_path(node.grubenv, "spare").read_text() == \
        f"{sha256(b'kernel')}  vmlinuz\n{sha256(b'initrd')}  initrd.img\n"
    assert not bootenv.sums_path(node.grubenv, "root").exists()
    assert env["cbios_root_state"] == "good"
    assert any("signature good" in line for line in result["said"])
    # The manifest's path works as well as its directory.
    node2 = FakeNode(mkdir(tmp_path / "n2"), keys[1], running="spare")
    assert run(node2, release / "manifest.json")["copy"] == "root"


@pytest.mark.parametrize("tamper, message", [
    ("manifest", "signature does not verify"),
    ("unsigned", "manifest.json.sig: missing"),
    ("other-key", "signature does not verify"),
])
def test_a_manifest_not_signed_by_the_nodes_key_is_refused_before_anything_is_written(
        node: FakeNode, keys: tuple[Path, Path], tmp_path: Path, tamper: str, message: str) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    if tamper == "manifest":
        m = json.loads((release / "manifest.json").read_text())
        m["version"] = "9.0.0"
        (release / "manifest.json").write_text(json.dumps(m))
    elif tamper == "unsigned":
        (release / "manifest.json.sig").unlink()
    elif tamper == "other-key":
        other = tmp_path / "other.pem"
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(other)], check=True)
        sign(other, release / "manifest.json")
    before = node.snapshot()
    with pytest.raises(update.UpdateError, match=message):
        run(node, release)
    assert node.snapshot() == before


@pytest.mark.parametrize("tamper, message", [
    ("image", "checksum mismatch"),
    ("truncated", "the transfer broke off"),
    ("longer", "more than the .* bytes the manifest says"),
    ("wrong-sum", "checksum mismatch"),
    ("wrong-root-hash", "does not match the root hash"),
])
def test_a_tampered_image_leaves_the_copy_it_was_written_to_bad_and_the_running_one_as_it_was(
        node: FakeNode, keys: tuple[Path, Path], tmp_path: Path, tamper: str, message: str) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    image = release / "root.img"
    m = json.loads((release / "manifest.json").read_text())
    if tamper == "image":
        data = bytearray(image.read_bytes())
        data[len(data) // 3] ^= 0x01
        image.write_bytes(bytes(data))
    elif tamper == "truncated":
        image.write_bytes(image.read_bytes()[:-100])
    elif tamper == "longer":
        image.write_bytes(image.read_bytes() + b"more")
    elif tamper == "wrong-sum":  # signed, but the image is not what it names
        m["artifacts"]["root.img"]["sha256"] = sha256(b"other")
    elif tamper == "wrong-root-hash":  # signed, and its sha256 right, but not its hash tree's root
        m["verity"]["param"] = verity.Verity("ab" * 32, len(DATA) // verity.BLOCK).param
    (release / "manifest.json").write_text(json.dumps(m))
    sign(keys[0], release / "manifest.json")
    before = node.snapshot()
    with pytest.raises(update.UpdateError, match=message):
        run(node, release)
    env = node.env()
    assert node.snapshot()["root"] == before["root"]
    assert (env["cbios_active"], env["cbios_root_state"], env["cbios_spare_state"]) == ("root", "good", "bad")
    assert "cbios_spare_verity" not in env


@pytest.mark.parametrize("fields, message", [
    ({"profile": "service-node"}, "firmware of profile service-node, this node runs qemu-test"),
    ({"architecture": "arm64"}, "firmware for arm64, this node is x86-64"),
    ({"version": "0.9.9"}, "version 0.9.9 is older than 1.0.0"),
    ({"version": "1.0.0"}, "version 1.0.0 is the one this node runs"),
    ({"artifacts": {}}, "not a CBIOS manifest"),
])
def test_firmware_of_another_kind_or_older_is_refused(
        node: FakeNode, keys: tuple[Path, Path], tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    release = make_release(tmp_path / "v", keys[0], **fields)
    before = node.snapshot()
    with pytest.raises(update.UpdateError, match=message):
        run(node, release)
    assert node.snapshot() == before


def test_a_downgrade_is_written_when_allowed(node: FakeNode, keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v", keys[0], version="0.9.9")
    assert run(node, release, allow_downgrade=True)["version"] == "0.9.9"


def test_no_update_from_a_copy_still_on_trial_nor_into_a_copy_too_small(
        keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    trial = FakeNode(mkdir(tmp_path / "trial"), keys[1], cbios_root_state="new", cbios_root_tries="1")
    with pytest.raises(update.UpdateError, match="copy root \\(running\\) is not committed yet"):
        run(trial, release)
    small = FakeNode(mkdir(tmp_path / "small"), keys[1])
    small.copies["spare"].write_bytes(bytes(1 << 20))
    before = small.snapshot()
    with pytest.raises(update.UpdateError, match=r"too small for root\.img"):
        run(small, release)
    assert small.snapshot() == before


def test_a_firmware_without_a_key_takes_no_update(keys: tuple[Path, Path], tmp_path: Path) -> None:
    n = FakeNode(mkdir(tmp_path / "n"), tmp_path / "no-key.pem")
    release = make_release(tmp_path / "v2", keys[0])
    before = n.snapshot()
    with pytest.raises(update.UpdateError, match="carries no signing key"):
        run(n, release)
    assert n.snapshot() == before


class _Handler(http.server.SimpleHTTPRequestHandler):
    cut_after: int | None = None
    served: list[str]

    def log_message(self, *args: Any) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        self.served.append(self.path)
        if self.cut_after is None or not self.path.endswith("root.img"):
            super().copyfile(source, outputfile)
        else:
            outputfile.write(source.read(self.cut_after))  # then the connection closes


@contextlib.contextmanager
def http_server(directory: Path, cut_after: int | None = None) -> Iterator[str]:
    handler = type("H", (_Handler,), {"cut_after": cut_after, "served": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_update_from_a_url(node: FakeNode, keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    with http_server(release) as url:
        assert run(node, url.rstrip("/"))["copy"] == "spare"
    assert written(node, release)


def test_a_url_that_breaks_off_leaves_the_running_copy_to_boot(
        node: FakeNode, keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    before = node.snapshot()
    with http_server(release, cut_after=1000) as url, pytest.raises(update.UpdateError, match="broke off after"):
        run(node, url)
    assert node.snapshot()["root"] == before["root"]
    assert (node.env()["cbios_active"], node.env()["cbios_spare_state"]) == ("root", "bad")
    with http_server(tmp_path / "nothing-here") as url, pytest.raises(update.UpdateError, match="HTTP 404"):
        run(node, url)


def test_versions_compare_as_numbers() -> None:
    assert update.version_key("1.10.0") > update.version_key("1.9.2")
    assert update.version_key("2") > update.version_key("1.99")
    assert update.version_key("1.0.1") > update.version_key("1.0")


def test_a_failed_boot_is_kept_for_status_in_the_boot_block() -> None:
    env = bootenv.with_failure({"cbios_active": "spare"}, "spare", "2.0.1", "state=degraded\nunits=x " * 100)
    assert env["cbios_failure"].startswith("copy spare (2.0.1): state=degraded units=x")
    assert len(bootenv.render(env)) == bootenv.SIZE  # still fits
    st = status.gather(env, "root", OWN)
    assert st["last_failure"] == env["cbios_failure"]
    assert "last failure:  copy spare (2.0.1): state=degraded" in status.render_text(st)


def test_cb_executor_checks_an_update_request() -> None:
    assert requests.check("firmware.update", {"source": "http://10.0.2.100/", "reboot": True})["reboot"] is True
    for bad in ({"source": "relative/dir"}, {"source": "http://x/ y"}, {"source": 5}, {},
                {"source": "/srv", "allow_downgrade": "yes"}, {"source": "/srv", "force": True}):
        with pytest.raises(Invalid):
            requests.check("firmware.update", bad)


def test_cbios_update_says_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, keys: tuple[Path, Path]) -> None:
    n = FakeNode(mkdir(tmp_path / "n"), keys[1])
    monkeypatch.setattr(update, "node_here", lambda: n.node)
    assert cli.main(["update", str(tmp_path / "nowhere"), "--no-reboot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere: no manifest.json there" in err


def test_what_the_build_signs_the_node_verifies(keys: tuple[Path, Path], tmp_path: Path) -> None:
    doc = tmp_path / "manifest.json"
    doc.write_text('{"version": "2.0.0"}')
    signing.sign(keys[0], doc)
    (tmp_path / "pub.pem").write_bytes(signing.public_key(keys[0]))
    sig = (tmp_path / "manifest.json.sig").read_bytes()
    assert update.verify_signature(doc.read_bytes(), sig, tmp_path / "pub.pem")
    assert not update.verify_signature(b'{"version": "9.0.0"}', sig, tmp_path / "pub.pem")
    rsa = tmp_path / "rsa.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024", "-out", str(rsa)],
                   check=True, capture_output=True)
    with pytest.raises(StepError, match="not an Ed25519 key"):
        signing.public_key(rsa)


def test_an_update_from_a_release_file(node: FakeNode, keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    (release / "SHA256SUMS").write_text("")
    path = write_release(release, tmp_path / "qemu-test-2.0.0.cbios.tar")
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["manifest.json", "manifest.json.sig", "SHA256SUMS", "boot.ipxe", "grub.cfg",
                                  "vmlinuz", "initrd.img", "root.img"]
    assert run(node, path)["copy"] == "spare"
    assert written(node, release)


def test_a_damaged_release_file_changes_nothing(node: FakeNode, keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    path = write_release(release, tmp_path / "r.cbios.tar")
    before = node.snapshot()
    cut = tmp_path / "cut.cbios.tar"
    cut.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # a copy broken off half-way
    with pytest.raises(update.UpdateError, match=r"cut\.cbios\.tar:\S+: the release file is damaged"):
        run(node, cut)
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(update.UpdateError, match=r"junk\.tar: not a release file"):
        run(node, tmp_path / "junk.tar")
    assert node.snapshot() == before


def test_cbios_release_refuses_a_build_whose_image_is_not_its_manifests(
        keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    (release / "root.img").write_bytes(b"other")
    with pytest.raises(CbiosError, match="not what the manifest says"):
        write_release(release)
    assert not list(release.glob("*.tar*"))


def test_a_write_cut_off_leaves_the_running_copy_to_boot_even_when_the_other_was_next(
        keys: tuple[Path, Path], tmp_path: Path) -> None:
    # An earlier update with --no-reboot made spare the copy to try; this one fails while writing it.
    n = FakeNode(mkdir(tmp_path / "n"), keys[1], cbios_active="spare", cbios_spare_state="new",
                 cbios_spare_tries="2")
    release = make_release(tmp_path / "v2", keys[0])
    root_before = n.snapshot()["root"]
    with http_server(release, cut_after=300_000) as url, \
            pytest.raises(update.UpdateError, match="broke off after"):
        run(n, url)
    env = n.env()
    assert (env["cbios_active"], env["cbios_spare_state"], env["cbios_root_state"]) == ("root", "bad", "good")
    assert "cbios_spare_tries" not in env
    assert n.snapshot()["root"] == root_before


def test_one_update_at_a_time(node: FakeNode, keys: tuple[Path, Path], tmp_path: Path) -> None:
    release = make_release(tmp_path / "v2", keys[0])
    before = node.snapshot()
    with open(node.node.lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(update.UpdateError, match="another update is running"):
            run(node, release)
    assert node.snapshot() == before
    assert run(node, release)["copy"] == "spare"  # the lock is free again


@pytest.mark.parametrize("source, message", [
    ("http://127.0.0.1:abc/", "http://127.0.0.1:abc/manifest.json: "),
    ("http://127.0.0.1:9/", "http://127.0.0.1:9/manifest.json: "),
])
def test_a_bad_url_is_one_error(node: FakeNode, source: str, message: str) -> None:
    with pytest.raises(update.UpdateError, match=re.escape(message)):
        run(node, source)


@pytest.mark.parametrize("fields", [{"version": "2.0.0-rc1"}, {"boot": {"tries": 0}}, {"boot": {"tries": 12}}])
def test_a_manifest_out_of_bounds_is_refused(node: FakeNode, keys: tuple[Path, Path], tmp_path: Path,
                                             fields: dict[str, Any]) -> None:
    release = make_release(tmp_path / "v", keys[0], **fields)
    with pytest.raises(update.UpdateError, match="not a CBIOS manifest"):
        run(node, release)


def test_the_same_version_spelt_shorter_is_the_same(node: FakeNode, keys: tuple[Path, Path], tmp_path: Path) -> None:
    assert update.version_key("1.0") == update.version_key("1.0.0")
    with pytest.raises(update.UpdateError, match="is the one this node runs"):
        run(node, make_release(tmp_path / "v", keys[0], version="1.0"))
