"""CB-Manager's store of compute-node firmware, with no VM: `slot image add|list|remove`
through the real slot CLI, a real socket (the release handed over as a file descriptor) and
a real CB-Manager over a recording executor; signatures checked with openssl."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbios.node import contract, manager, slotcli, wire
from cbios.node.manager import store
from cbios.release import write_release
from tests.unit.test_node_slots import FakeExecutor, make_manager
from tests.unit.test_node_update import make_release

pytest_plugins = ["tests.unit.test_node_slots"]  # its config and catalogue fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    for name in ("key", "other"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(d / f"{name}.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(d / "key.pem"), "-pubout", "-out", str(d / "pub.pem")], check=True)
    return d / "key.pem", d / "pub.pem", d / "other.pem"


@pytest.fixture
def node(config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path,
         keys: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[manager.Manager]:
    """CB-Manager with its store, answering the slot CLI on a socket of its own."""
    m = make_manager(config, catalogue, tmp_path, FakeExecutor())
    m.store = tmp_path / "store"
    m.store.mkdir()
    m.update_key = keys[1]
    sock = tmp_path / "manager.sock"
    monkeypatch.setattr(contract, "MANAGER_SOCKET", sock)
    ready = threading.Event()
    threading.Thread(target=wire.serve, args=(sock, m.handle), kwargs={"ready": ready.set, "uploads": True},
                     daemon=True).start()
    assert ready.wait(5)
    yield m


def release(tmp_path: Path, key: Path, name: str = "compute.cbios.tar", **fields: Any) -> Path:
    build = make_release(tmp_path / f"build-{name}", key, **{"profile": "compute", "version": "1.2.0", **fields})
    return write_release(build, tmp_path / name)


def slot(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = slotcli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def stored(m: manager.Manager) -> list[str]:
    return sorted(str(p.relative_to(m.store)) for p in m.store.rglob("*"))


def test_a_signed_release_is_stored_listed_and_removed(
        node: manager.Manager, keys: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = release(tmp_path, keys[0])
    rc, out, err = slot(capsys, "image", "add", str(path))
    assert (rc, err) == (0, "")
    assert out.startswith(f"compute 1.2.0: stored (2 MiB, signed by {store.key_fingerprint(keys[1])}, root ")
    held = node.store / "compute" / "1.2.0"
    assert sorted(p.name for p in held.iterdir()) == sorted([*contract.STORE_FILES, store.ADDED])
    for name in contract.STORE_FILES:
        with tarfile.open(path) as tar:
            member = tar.extractfile(name)
            assert member is not None and (held / name).read_bytes() == member.read()
    # The same release again changes nothing; the listing has it beside the templates.
    assert slot(capsys, "image", "add", str(path))[1].startswith("compute 1.2.0: already in the store")
    rc, out, _ = slot(capsys, "image", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["Image", "Kind", "Version", "Date", "Size", "Signed-by", "Description"]
    assert lines[1].split()[:3] == ["compute", "compute", "1.2.0"] and "SHA256:" in lines[1]
    assert any(line.split()[:2] == ["cb-manager", "lxc-service"] and " firmware " in line for line in lines)
    rows = json.loads(slot(capsys, "image", "list", "--json")[1])
    assert rows[0]["image"] == "compute" and rows[0]["size"] == sum(
        (held / n).stat().st_size for n in contract.STORE_FILES)
    assert slot(capsys, "image", "remove", "compute", "1.2.0") == (
        0, "compute 1.2.0: removed from the store\n", "")
    assert stored(node) == []
    rc, _, err = slot(capsys, "image", "remove", "compute", "1.2.0")
    assert (rc, err) == (2, "slot: no image compute 1.2.0 in the store (it holds: none)\n")


@pytest.mark.parametrize("damage, message", [
    ("other-key", "its signature does not verify with this firmware's key"),
    ("no-signature", "boot.ipxe comes before a signed manifest"),
    ("truncated", "not a whole release file"),
    ("cut-at-a-member", "cut short or incomplete, no root.img"),
    ("tampered-kernel", "vmlinuz: its sha256 is not the one its signed manifest says"),
    ("stranger", "'evil.sh' is not what a release holds"),
    ("not-a-tar", "not a whole release file"),
])
def test_a_release_that_is_not_signed_whole_and_ours_is_refused_and_nothing_stored(
        node: manager.Manager, keys: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], damage: str, message: str) -> None:
    path = release(tmp_path, keys[2] if damage == "other-key" else keys[0])
    bad = tmp_path / "bad.cbios.tar"
    data = path.read_bytes()
    if damage in ("truncated", "not-a-tar"):
        bad.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a tar" * 1000)
    else:
        with tarfile.open(path) as src, tarfile.open(bad, "w") as out:
            for member in src.getmembers():
                content = src.extractfile(member)
                assert content is not None
                if damage == "no-signature" and member.name == contract.SIGNATURE:
                    continue
                if damage == "cut-at-a-member" and member.name == "root.img":
                    break
                if damage == "tampered-kernel" and member.name == "vmlinuz":
                    body = content.read().replace(b"kernel", b"kErnel")
                    out.addfile(member, io.BytesIO(body))
                    continue
                out.addfile(member, content)
                if damage == "stranger" and member.name == contract.SIGNATURE:
                    extra = tarfile.TarInfo("evil.sh")
                    out.addfile(extra, io.BytesIO(b""))
    rc, out, err = slot(capsys, "image", "add", str(bad))
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"slot: {bad}") and message in err
    assert stored(node) == []


def test_a_release_from_a_url_is_read_as_it_arrives(
        node: manager.Manager, keys: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = release(tmp_path, keys[0], name="compute-1.2.0.cbios.tar")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        rc, out, err = slot(capsys, "image", "add", f"{base}/{path.name}")
        assert (rc, err) == (0, "") and out.startswith("compute 1.2.0: stored")
        assert json.loads((node.store / "compute" / "1.2.0" / store.ADDED).read_text())["image"] == "compute"
        rc, out, err = slot(capsys, "image", "add", f"{base}/missing.cbios.tar")
        assert rc == 2 and err == f"slot: {base}/missing.cbios.tar: File not found\n"
        server.shutdown()


def test_a_file_that_cannot_be_read_is_said_before_cb_manager_is_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contract, "MANAGER_SOCKET", tmp_path / "none.sock")
    assert slot(capsys, "image", "add", str(tmp_path / "none.tar")) == (
        2, "", f"slot: {tmp_path / 'none.tar'}: No such file or directory\n")
    assert slot(capsys, "image", "add", str(tmp_path))[0] == 2
    assert slot(capsys, "image", "frob")[2] == f"slot: {slotcli.IMAGE_USAGE}\n"


def test_a_store_without_room_refuses_before_writing(
        node: manager.Manager, keys: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "statvfs", lambda _: os.statvfs_result((4096, 4096, 10, 0, 0, 10, 0, 0, 0, 255)))
    rc, _, err = slot(capsys, "image", "add", str(release(tmp_path, keys[0])))
    assert rc == 1 and "the image store has 0 MiB free" in err
    assert stored(node) == []


def test_a_file_is_handed_over_only_to_a_server_that_takes_one(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    seen: list[Any] = []
    ready = threading.Event()
    threading.Thread(target=wire.serve, args=(sock, lambda op, args: seen.append(args)),
                     kwargs={"ready": ready.set}, daemon=True).start()
    assert ready.wait(5)
    r, w = os.pipe()
    with pytest.raises(wire.RemoteError, match="this service takes no file"):
        wire.call(sock, "hello", upload=r)
    os.close(r)
    # The server kept no copy of it: the pipe's reading end is closed everywhere.
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)
    with pytest.raises(wire.RemoteError, match="takes no file"):
        wire.call(sock, "hello", {"upload": True})
    with socket.socket(socket.AF_UNIX) as s:  # a caller who sends the line in pieces
        s.connect(str(sock))
        s.sendall(b'{"v": 1, "op": "x",')
        s.sendall(b' "args": {}}\n')
        assert json.loads(s.recv(1000)) == {"ok": True, "result": None}
    assert seen == [{}]


def test_a_refusal_sent_before_the_caller_is_done_sending_is_what_the_caller_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon reads the line, answers and closes while the caller is still in its send:
    # the caller is paced here (it sends on only once the daemon has closed), not raced.
    sock = tmp_path / "s.sock"
    closed = threading.Event()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        listener.listen()

        def daemon() -> None:
            conn, _ = listener.accept()
            with conn:
                fds: list[int] = []
                assert wire.read_line(conn, fds=fds) is not None
                for fd in fds:
                    os.close(fd)
                conn.sendall(b'{"ok": false, "code": "invalid", "error": "no uploads here"}\n')
            closed.set()

        threading.Thread(target=daemon, daemon=True).start()
        real_send_fds = socket.send_fds

        def send_fds_then_wait(s: socket.socket, *a: Any) -> int:
            sent = real_send_fds(s, *a)
            assert closed.wait(5)
            return sent

        monkeypatch.setattr(socket, "send_fds", send_fds_then_wait)
        r, w = os.pipe()
        try:
            with pytest.raises(wire.RemoteError, match="no uploads here"):
                wire.call(sock, "hello", upload=r)
        finally:
            os.close(r)
            os.close(w)


def test_cb_manager_takes_a_file_only_with_a_request_that_says_so(node: manager.Manager) -> None:
    with pytest.raises(wire.RemoteError, match="no file handed over with the request"):
        wire.call(contract.MANAGER_SOCKET, "image_add", {"where": "x", "upload": True})
    r, w = os.pipe()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(contract.MANAGER_SOCKET))
        socket.send_fds(s, [b'{"v": 1, "op": "images", "args": {}}\n'], [r])
        assert "a file handed over comes with" in json.loads(s.recv(1000))["error"]
    os.close(r)
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)


def test_a_release_whose_headers_would_fill_memory_is_refused_before_its_signature(
        node: manager.Manager, keys: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bomb.cbios.tar"
    with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as out:
        info = tarfile.TarInfo(contract.MANIFEST)
        info.pax_headers = {"comment": "x" * (6 << 20)}  # read whole by tarfile: bounded here
        out.addfile(info, io.BytesIO(b""))
    rc, _, err = slot(capsys, "image", "add", str(bad))
    assert rc == 2 and "no signed manifest in its first 4 MiB" in err, err
    twice = tmp_path / "twice.cbios.tar"
    with tarfile.open(release(tmp_path, keys[0])) as src, tarfile.open(twice, "w") as out:
        for member in src.getmembers():
            out.addfile(member, src.extractfile(member))
            if member.name == contract.SIGNATURE:
                for _ in range(2):
                    out.addfile(tarfile.TarInfo("SHA256SUMS"), io.BytesIO(b""))
    rc, _, err = slot(capsys, "image", "add", str(twice))
    assert rc == 2 and "'SHA256SUMS' is not what a release holds" in err, err
    assert stored(node) == []
