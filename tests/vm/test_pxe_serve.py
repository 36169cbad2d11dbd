"""`cbios pxe serve` for real: dnsmasq and the HTTP server on one side of a veth pair in
network namespaces, a PXE client's exchanges (DHCP, the boot-server request, TFTP, HTTP)
from the other side. The same for the field kit (`cbios pxe pack`), run as on a laptop:
python3 -I, from a folder where the cbios package cannot be imported, no venv. Needs root
and dnsmasq; no VM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbios.pxe.bundle import make_bundle
from cbios.pxe.pack import pack
from cbios.pxe.service import IPXE_DIR
from tests.unit.test_kit import CLEAN_ENV, PYTHON, laptop_in, signed_build
from tests.unit.test_pxe_bundle import fake_build

SERVER_IP, CLIENT_IP = "10.77.0.1", "10.77.0.2"
MAC = "52:54:00:aa:bb:cc"
PROBE = Path(__file__).with_name("dhcp_probe.py")
REPO = Path(__file__).resolve().parents[2]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout


@pytest.fixture
def link() -> Iterator[tuple[str, str]]:
    """Namespaces (server, client) joined by a veth pair named like them."""
    srv, cli = f"cbts{os.getpid() % 10000}", f"cbtc{os.getpid() % 10000}"
    for ns in (srv, cli):
        sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", srv, "netns", srv, "type", "veth", "peer", "name", cli, "netns", cli)
        for ns, ip in ((srv, SERVER_IP), (cli, CLIENT_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ns)
            sh("ip", "-n", ns, "link", "set", ns, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield srv, cli
    finally:
        for ns in (srv, cli):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def in_ns(ns: str, *argv: str, timeout: float = 20) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{argv}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout.decode(errors="replace")


def probe(ns: str, *args: str) -> dict[str, object]:
    answer: dict[str, object] = json.loads(in_ns(ns, sys.executable, str(PROBE), ns, MAC, *args))
    return answer


def server(how: str, bundle: Path, public_key: Path, interface: str, receipts: Path,
           tmp_path: Path) -> tuple[list[str], Path, dict[str, str] | None]:
    """The command that serves BUNDLE on INTERFACE, where it runs, its environment: `cbios
    pxe serve` from the checkout, or the bundle's field kit on a "laptop"."""
    if how == "cbios pxe serve":
        return [sys.executable, "-m", "cbios.cli", "pxe", "serve", "--bundle", str(bundle), "--interface", interface,
                "--receipts", str(receipts)], REPO, None
    kit = pack(bundle, public_key.read_bytes(), tmp_path / "field.pyz")
    return [PYTHON, "-I", str(kit), "serve", "--interface", interface, "--receipts", str(receipts)], \
        laptop_in(tmp_path / "laptop"), CLEAN_ENV


@pytest.mark.parametrize("how", ["cbios pxe serve", "field kit"])
def test_pxe_serve_answers_a_pxe_client_then_stops_cleanly(link: tuple[str, str], tmp_path: Path, how: str) -> None:
    srv, cli = link
    bundle, public_key = signed_build(tmp_path / "build")
    receipts = tmp_path / "receipts"
    log = tmp_path / "serve.log"
    argv, cwd, env = server(how, bundle, public_key, srv, receipts, tmp_path)
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", srv, *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=env)
    try:
        deadline = time.monotonic() + 20
        while "Serving CBIOS" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

        # The firmware's PXE ROM: a menu in the proxy offer (no address: that is the site's
        # DHCP server's job), then iPXE by TFTP from the boot-server request.
        offer = probe(cli, "discover-pxe")
        assert offer["file"] == "" and "50" not in offer["options"]  # no requested address
        assert bytes.fromhex(str(offer["options"]["60"])) == b"PXEClient"  # type: ignore[index]
        assert b"CBIOS qemu-test 1.0.0 (iPXE)" in bytes.fromhex(str(offer["options"]["43"]))  # type: ignore[index]
        ack = probe(cli, "request-4011", CLIENT_IP, SERVER_IP)
        assert (ack["siaddr"], ack["file"]) == (SERVER_IP, "undionly.kpxe")
        got = subprocess.run(["ip", "netns", "exec", cli, "curl", "-fsS", "--max-time", "20",
                              f"tftp://{SERVER_IP}/undionly.kpxe"], capture_output=True, check=True).stdout
        assert hashlib.sha256(got).digest() == hashlib.sha256((IPXE_DIR / "undionly.kpxe").read_bytes()).digest()

        # iPXE asks again and is sent to the bundle's script, which knows its server.
        offer = probe(cli, "discover-ipxe")
        assert offer["file"] == f"http://{SERVER_IP}:8080/boot.ipxe"
        script = in_ns(cli, "curl", "-fsS", "--max-time", "10", f"{offer['file']}?mac={MAC}")
        assert script.splitlines()[:2] == ["#!ipxe", f"set cbios-server http://{SERVER_IP}:8080/"]
        kernel = in_ns(cli, "curl", "-fsS", "--max-time", "10", f"http://{SERVER_IP}:8080/vmlinuz?mac={MAC}")
        assert kernel == (bundle / "vmlinuz").read_text()
        root = subprocess.run(["ip", "netns", "exec", cli, "curl", "-fsS", "--max-time", "20",
                               f"http://{SERVER_IP}:8080/root.img?mac={MAC}"], capture_output=True, check=True).stdout
        assert hashlib.sha256(root).hexdigest() == hashlib.sha256((bundle / "root.img").read_bytes()).hexdigest()
        receipt = json.dumps({"result": "FLASHED", "mode": "install", "mac": MAC, "object_id": "31000040010"})
        in_ns(cli, "curl", "-fsS", "--max-time", "10", "--data-binary", receipt, f"http://{SERVER_IP}:8080/receipt")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"PXE({srv}) {MAC} proxy" in text  # dnsmasq's word for each client, relayed
    assert "sent /" in text and f"undionly.kpxe to {CLIENT_IP}" in text
    assert f"{MAC} {CLIENT_IP}: vmlinuz sent" in text
    assert f"Receipt from {MAC} (31000040010): FLASHED install" in text
    assert f"{MAC} {CLIENT_IP}: root.img sent" in text
    assert "Stopped: 2 transfers (3 MiB), 1 receipts" in text
    assert len(list(receipts.glob("*-525400aabbcc.json"))) == 1
    assert subprocess.run(["pgrep", "-f", "cbios-pxe-.*/dnsmasq.conf"], check=False).returncode == 1


def test_pxe_serve_on_a_missing_interface_says_so_in_one_line(tmp_path: Path) -> None:
    bundle = make_bundle(fake_build(tmp_path / "build"))
    proc = subprocess.run([sys.executable, "-m", "cbios.cli", "pxe", "serve", "--bundle", str(bundle),
                           "--interface", "cbios-nonesuch"], capture_output=True, text=True, cwd=REPO, timeout=30,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "cbios: --interface cbios-nonesuch: no such interface"
    assert "Traceback" not in proc.stderr
