"""The PXE bundle and its HTTP server, over real sockets; dnsmasq's configuration as rendered."""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from cbios import manifest
from cbios.errors import CbiosError
from cbios.node.httpd import BundleServer
from cbios.pxe.bundle import FILES, PXE_DIR, check_bundle, make_bundle
from cbios.pxe.serve import publish
from cbios.pxe.service import dnsmasq_conf

BIG = 3 << 20


def fake_build(out: Path) -> Path:
    """A published build's files (small stand-ins), with its manifest."""
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in FILES if n not in (manifest.SUMS, manifest.MANIFEST, manifest.SIGNATURE)]
    for name in names:
        (out / name).write_bytes(os.urandom(BIG) if name == "root.img" else f"{name}\n".encode())
    (out / "boot.ipxe").write_text("#!ipxe\necho hello\n")
    artifacts = manifest.describe(out, names)
    (out / "SHA256SUMS").write_text("".join(f"{m['sha256']}  {n}\n" for n, m in artifacts.items()))
    manifest.write(out / manifest.MANIFEST, {"profile": "qemu-test", "version": "1.0.0", "artifacts": artifacts})
    (out / manifest.SIGNATURE).write_bytes(b"signature")
    return out


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(fake_build(tmp_path / "build"))


@pytest.fixture
def server(bundle: Path, tmp_path: Path) -> Iterator[BundleServer]:
    srv = BundleServer(("127.0.0.1", 0), bundle, FILES, tmp_path / "receipts", preset_mode="install",
                       preset_args="cbios.flash.done=poweroff")
    srv.start()
    yield srv
    srv.stop()


def request(srv: BundleServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, dict(resp.getheaders())


def test_bundle_links_the_builds_files_and_is_remade_whole(tmp_path: Path) -> None:
    out = fake_build(tmp_path / "build")
    pxe = make_bundle(out)
    assert pxe == out / PXE_DIR and sorted(p.name for p in pxe.iterdir()) == sorted(FILES)
    assert (pxe / "root.img").stat().st_ino == (out / "root.img").stat().st_ino  # no copy
    assert check_bundle(pxe)["version"] == "1.0.0"
    (out / "grub.cfg").unlink()
    (out / "grub.cfg").write_text("changed\n")
    make_bundle(out)
    assert (pxe / "grub.cfg").read_text() == "changed\n"
    assert not list(out.glob(".pxe*"))


def test_a_test_firmware_is_named_as_one_wherever_it_is_served(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    out = fake_build(tmp_path / "build")
    assert check_bundle(make_bundle(out)) and "TEST firmware" not in caplog.text
    data = manifest.read(out / manifest.MANIFEST)
    manifest.write(out / manifest.MANIFEST, {**data, "test": True})
    check_bundle(make_bundle(out))
    assert "qemu-test 1.0.0 is a TEST firmware" in caplog.text and "never for real nodes" in caplog.text


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "root.img").write_bytes(b"x"), "root.img: does not match its sha256"),
    (lambda b: (b / "initrd.img").unlink(), "initrd.img: missing from the bundle"),
    (lambda b: (b / manifest.MANIFEST).write_text("{"), "unreadable manifest"),
    (lambda b: (b / manifest.MANIFEST).unlink(), "not a PXE bundle"),
])
def test_a_damaged_bundle_is_refused_by_name(bundle: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    (bundle / "root.img").unlink()  # unlink the hard link first: the build's file stays intact
    (bundle / "root.img").write_bytes((bundle.parent / "root.img").read_bytes())
    damage(bundle)
    with pytest.raises(CbiosError, match=message):
        check_bundle(bundle)


def test_files_are_served_whole_and_nothing_else(server: BundleServer, bundle: Path) -> None:
    status, data, headers = request(server, "GET", "/root.img?mac=52:54:00:c0:00:01")
    assert status == 200 and data == (bundle / "root.img").read_bytes()
    assert headers["Content-Length"] == str(BIG)
    status, data, headers = request(server, "HEAD", "/root.img")
    assert status == 200 and data == b"" and headers["Content-Length"] == str(BIG)
    for path in ("/", "/../build/root.img", "/receipts", "/root.img.zst", "/%2e%2e/SHA256SUMS"):
        assert request(server, "GET", path)[0] == 404, path
    assert server.transfers[0].ended.wait(10)  # the server is through with it, as the client was
    assert server.bytes_sent("root.img") == BIG
    assert [(t.mac, t.name, t.done) for t in server.transfers] == [("52:54:00:c0:00:01", "root.img", True)]


def test_a_transfer_broken_off_is_resumed_from_where_it_stopped(server: BundleServer, bundle: Path) -> None:
    whole = (bundle / "root.img").read_bytes()
    status, data, headers = request(server, "GET", "/root.img", headers={"Range": "bytes=1000-"})
    assert status == 206 and data == whole[1000:]
    assert headers["Content-Range"] == f"bytes 1000-{BIG - 1}/{BIG}" and headers["Content-Length"] == str(BIG - 1000)
    status, data, headers = request(server, "GET", "/root.img", headers={"Range": "bytes=10-19"})
    assert (status, data, headers["Content-Range"]) == (206, whole[10:20], f"bytes 10-19/{BIG}")
    status, _, headers = request(server, "GET", "/root.img", headers={"Range": f"bytes={BIG}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{BIG}"
    # What this server does not read (several ranges, a suffix) gets the whole file, as RFC 9110 allows.
    for unread in ("bytes=0-1,5-9", "bytes=-100", "pages=1-"):
        status, data, headers = request(server, "GET", "/root.img", headers={"Range": unread})
        assert (status, len(data), "Content-Range" in headers) == (200, BIG, False), unread
    assert all(t.ended.wait(10) for t in server.transfers)
    assert [(t.offset, t.sent, t.done) for t in server.transfers[:2]] == [(1000, BIG - 1000, True), (10, 10, True)]


def test_a_hold_is_where_in_the_file_whatever_range_was_asked(server: BundleServer, bundle: Path) -> None:
    server.hold("root.img", 5000)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/root.img", headers={"Range": "bytes=1000-"})
    resp = conn.getresponse()
    assert resp.status == 206 and resp.read(4000) == (bundle / "root.img").read_bytes()[1000:5000]
    assert server.held.wait(10) and server.bytes_sent("root.img") == 4000
    server.release()
    with pytest.raises(http.client.IncompleteRead):
        resp.read()


def test_the_script_is_told_its_server_and_the_preset_mode(server: BundleServer) -> None:
    status, data, _ = request(server, "GET", "/boot.ipxe", headers={"Host": "10.0.2.100"})
    assert status == 200
    assert data.decode().splitlines() == ["#!ipxe", "set cbios-server http://10.0.2.100/", "set cbios-mode install",
                                          "set cbios-args cbios.flash.done=poweroff", "echo hello"]


def test_receipts_are_kept_and_bad_ones_refused(server: BundleServer, tmp_path: Path) -> None:
    receipt = {"result": "FLASHED", "mode": "install", "mac": "52:54:00:c0:00:01", "object_id": "31000040010",
               "profile": "qemu-test", "version": "1.0.0", "root_sha256": "ab" * 32}
    status, _, _ = request(server, "POST", "/receipt?mac=52:54:00:c0:00:01", json.dumps(receipt).encode())
    assert status == 200
    [saved] = (tmp_path / "receipts").glob("*-525400c00001.json")
    assert json.loads(saved.read_text())["root_sha256"] == "ab" * 32
    assert server.received[0]["client"] == "127.0.0.1"
    for body in (b"{", b"[]", json.dumps({"mac": "nope"}).encode(), b"x" * (65 << 10)):
        assert request(server, "POST", "/receipt", body)[0] in (400, 413)
    assert request(server, "POST", "/root.img", b"{}")[0] == 404
    assert len(server.received) == 1 and len(list((tmp_path / "receipts").iterdir())) == 1


def test_stop_breaks_off_a_transfer_under_way(bundle: Path, tmp_path: Path) -> None:
    (bundle / "root.img").unlink()
    with open(bundle / "root.img", "wb") as f:
        f.truncate(256 << 20)  # more than the sockets' buffers hold
    srv = BundleServer(("127.0.0.1", 0), bundle, FILES, tmp_path / "receipts")
    srv.start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/root.img")
    resp = conn.getresponse()
    first = resp.read(1 << 16)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    stopper.join(10)
    assert not stopper.is_alive() and len(first) == 1 << 16
    assert srv.transfers[0].done is False and srv.transfers[0].sent < 256 << 20


def test_a_held_transfer_stops_where_told_and_breaks_off_at_release(server: BundleServer, bundle: Path) -> None:
    server.hold("root.img", 1 << 16)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/root.img")
    resp = conn.getresponse()
    assert resp.read(1 << 16) == (bundle / "root.img").read_bytes()[: 1 << 16]
    assert server.held.wait(10) and server.bytes_sent("root.img") == 1 << 16
    server.release()
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    status, data, _ = request(server, "GET", "/root.img")  # the hold is over: whole again
    assert status == 200 and len(data) == BIG
    assert all(t.ended.wait(10) for t in server.transfers)
    assert [t.done for t in server.transfers] == [False, True]


def test_dnsmasq_configuration_is_a_proxy_with_tftp_and_the_ipxe_chain() -> None:
    conf = dnsmasq_conf(profile="qemu-test", version="1.0.0", interface="eth1", network="192.168.7.0",
                        tftp_root=Path("/run/x/tftp"), script_url="http://192.168.7.1:8080/boot.ipxe")
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    assert "port=0" in lines  # no DNS
    assert "dhcp-range=192.168.7.0,proxy" in lines  # never hands out addresses
    assert {"interface=eth1", "bind-interfaces", "enable-tftp", "tftp-root=/run/x/tftp"} <= set(lines)
    assert 'pxe-service=tag:!ipxe,x86PC,"CBIOS qemu-test 1.0.0 (iPXE)",undionly.kpxe' in lines
    assert 'pxe-service=tag:!ipxe,X86-64_EFI,"CBIOS qemu-test 1.0.0 (iPXE)",ipxe.efi' in lines
    assert "dhcp-boot=tag:ipxe,http://192.168.7.1:8080/boot.ipxe" in lines


def test_publish_serves_a_release_over_http_until_stopped(tmp_path: Path) -> None:
    bundle = make_bundle(fake_build(tmp_path / "build"))
    assert (bundle / manifest.SIGNATURE).read_bytes() == b"signature"  # the bundle carries the signature
    stop, ready = threading.Event(), threading.Event()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = threading.Thread(target=publish, args=(bundle,), kwargs={"address": "127.0.0.1", "port": port,
                                                                  "stop": stop, "ready": ready})
    t.start()
    try:
        assert ready.wait(10)
        for name in (manifest.MANIFEST, manifest.SIGNATURE, "root.img"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}") as r:
                assert r.read() == (bundle / name).read_bytes()
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


LIB_SH = Path(__file__).resolve().parents[2] / "initrd/tree/usr/lib/cbios/lib.sh"


def fetch_stream(url: str, size: int, out: Path) -> subprocess.Popen[str]:
    """The initrd's fetch_stream, as the flasher runs it: the bytes to OUT, the rest on stderr."""
    script = f'. "{LIB_SH}"; fetch_stream "$1" "$2" "$3" >"$4"'
    return subprocess.Popen(["bash", "-c", script, "fetch", url, str(size), str(out.with_suffix("")), str(out)],
                            stderr=subprocess.PIPE, text=True)


def test_the_flasher_takes_up_a_transfer_where_it_broke_off(server: BundleServer, bundle: Path,
                                                           tmp_path: Path) -> None:
    server.hold("root.img", 1 << 20)  # the server sets the pace: it breaks the transfer off at 1 MiB
    proc = fetch_stream(f"http://127.0.0.1:{server.port}/root.img?mac=52:54:00:c0:00:01", BIG, tmp_path / "got")
    assert server.held.wait(20)
    server.release()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "got").read_bytes() == (bundle / "root.img").read_bytes()
    assert (tmp_path / "got.got").read_text().strip() == str(BIG)
    assert "root.img: broken off at 1 of 3 MiB (curl status 18" in err and "resuming in 2 s, try 2 of 6" in err
    assert [(t.offset, t.sent) for t in server.transfers] == [(0, 1 << 20), (1 << 20, BIG - (1 << 20))]


def fetch_from(handler: type[http.server.BaseHTTPRequestHandler], size: int, out: Path) -> tuple[int, str]:
    """fetch_stream of SIZE bytes from a server of HANDLER's: its status and its stderr."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        proc = fetch_stream(f"http://127.0.0.1:{srv.server_address[1]}/root.img", size, out)
        _, err = proc.communicate(timeout=60)
    finally:
        srv.shutdown()
        srv.server_close()
    return proc.returncode, err


class _NoRanges(http.server.BaseHTTPRequestHandler):
    """Half of DATA and a broken connection the first time; then the whole of it, whatever the Range."""
    data = b""
    asked: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        self.asked.append(self.headers.get("Range"))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data if len(self.asked) > 1 else self.data[: len(self.data) // 2])
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_that_cannot_resume_fails_the_transfer_rather_than_send_the_start_again(tmp_path: Path) -> None:
    _NoRanges.data, _NoRanges.asked = os.urandom(1 << 20), []
    returncode, err = fetch_from(_NoRanges, 1 << 20, tmp_path / "got")
    assert returncode == 63, err  # the whole file is more than the bytes left: curl takes none of it
    assert _NoRanges.asked == [None, f"bytes={1 << 19}-"]
    assert (tmp_path / "got").read_bytes() == _NoRanges.data[: 1 << 19]  # nothing after what came first
    assert "it does not resume (HTTP Range)" in (tmp_path / "got.err").read_text()


class _TooMuch(http.server.BaseHTTPRequestHandler):
    """Half of DATA and a broken connection; then a 206 from there with no Content-Length,
    and more bytes than the file has left (curl's --max-filesize cannot see it coming)."""
    data = b""
    asked: ClassVar[list[str | None]] = []
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self.asked.append(self.headers.get("Range"))
        half = len(self.data) // 2
        if len(self.asked) == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.data)))
            self.end_headers()
            self.wfile.write(self.data[:half])
        else:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {half}-{len(self.data) - 1}/{len(self.data)}")
            self.end_headers()
            self.wfile.write(self.data[half:] + b"x" * 100_000)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_that_sends_more_than_the_signed_size_gets_no_byte_past_it(tmp_path: Path) -> None:
    _TooMuch.data, _TooMuch.asked = os.urandom(1 << 20), []
    returncode, err = fetch_from(_TooMuch, 1 << 20, tmp_path / "got")
    assert returncode == 63, err
    assert (tmp_path / "got").read_bytes() == _TooMuch.data  # what it passed on: the size, not a byte past it
    assert "the server sent other bytes than the 524288 left" in (tmp_path / "got.err").read_text()


def test_a_server_keeps_the_last_transfers_and_the_sums_of_the_rest(server: BundleServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cbios.node.httpd.TRANSFERS_KEPT", 3)
    for i in range(10):  # one byte at a time, as a client that wants to fill the server's memory would
        status, data, _ = request(server, "GET", "/root.img", headers={"Range": f"bytes={i}-{i}"})
        assert (status, len(data)) == (206, 1)
        assert server.transfers[-1].ended.wait(10)
    assert len(server.transfers) <= 4 and server.bytes_sent("root.img") == 10 and server.transfers_done() == 10
    assert server.bytes_sent("vmlinuz") == 0


def test_what_a_client_sends_reaches_the_log_without_control_characters(server: BundleServer,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cbios")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:  # http.client refuses these
        raw.sendall(b"GET /x\x1b]0;owned\x07 HTTP/1.0\r\n\r\n")
        assert raw.makefile("rb").readline().split()[1] == b"404"
    receipt = {"result": "FLASHED\x1b[31m", "mode": "install", "mac": "52:54:00:aa:bb:cc", "reason": "a\rb"}
    assert request(server, "POST", "/receipt", body=json.dumps(receipt).encode())[0] == 200
    assert "\x1b" not in caplog.text and "\r" not in caplog.text and "\x07" not in caplog.text
    assert "\\x1b]0;owned\\x07 not found" in caplog.text and "FLASHED\\x1b[31m" in caplog.text
