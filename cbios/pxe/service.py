"""The PXE service on one interface, until Ctrl-C or SIGTERM: dnsmasq answers PXE clients as
a proxy-DHCP server (the site's DHCP server keeps giving the addresses) and serves iPXE over
TFTP; iPXE is then sent to the bundle's script on an HTTP server here (BundleServer, or one
of its kind), which also takes the flasher's receipts. What `cbios pxe serve` runs for a
bundle's folder and the field kit (cbios/pxe/kit.py) for the bundle inside it.

Standard library only: the field kit carries it to laptops with python3 and nothing else."""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol

from cbios.errors import CbiosError, StepError
from cbios.node import contract
from cbios.node.bootserver import dnsmasq
from cbios.node.httpd import BundleServer

log = logging.getLogger("cbios")

IPXE_DIR, IPXE_FILES = dnsmasq.IPXE_DIR, dnsmasq.IPXE_FILES
DNSMASQ = "dnsmasq"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
RECEIPTS = "receipts"  # the default folder of the flasher's receipts, beside what is served
MODES = contract.BOOT_MODES


class ServerMaker(Protocol):
    """Makes the HTTP server of a bundle, listening on ADDRESS (it raises OSError if it cannot)."""

    def __call__(self, address: tuple[str, int], receipts: Path, mode: str | None) -> BundleServer: ...


@dataclass(frozen=True)
class Address:
    ip: str
    network: str  # the interface's IPv4 network, for dhcp-range=...,proxy


def interface_address(interface: str) -> Address:
    """The first IPv4 address of INTERFACE, or a clear error."""
    try:
        proc = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", interface], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise StepError("pxe serve", "'ip' is not installed", hint="apt install iproute2") from None
    if proc.returncode != 0:
        raise CbiosError(f"--interface {interface}: no such interface",
                         hint="'ip -br addr' lists them; pick the one on the nodes' network")
    for link in json.loads(proc.stdout or "[]"):
        for info in link.get("addr_info", []):
            net = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
            return Address(ip=str(net.ip), network=str(net.network.network_address))
    raise CbiosError(f"--interface {interface}: has no IPv4 address",
                     hint="give it one on the nodes' network (or let the site's DHCP server do so)")


def dnsmasq_conf(*, profile: str, version: str, interface: str, network: str, tftp_root: Path,
                 script_url: str) -> str:
    """Proxy-DHCP: the site's DHCP server keeps giving the addresses."""
    return dnsmasq.conf(title=f"CBIOS {profile} {version}", interface=interface, network=network,
                        tftp_root=tftp_root, script_url=script_url)


def tftp_tree(dest: Path) -> None:
    """iPXE for BIOS and UEFI clients, readable by dnsmasq once it drops root."""
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    for name in IPXE_FILES:
        if not (IPXE_DIR / name).is_file():
            raise StepError("pxe serve", f"{IPXE_DIR / name} is missing", hint="install Debian's ipxe package "
                            "(apt install ipxe; in a checkout, 'make deps')")
        shutil.copyfile(IPXE_DIR / name, dest / name)
        (dest / name).chmod(0o644)


class Dnsmasq:
    """dnsmasq in the foreground, its log lines relayed: who asked for what."""

    def __init__(self, conf: Path, log_file: Path) -> None:
        self.conf = conf
        self.log_file = log_file
        self.proc: subprocess.Popen[str] | None = None
        self.started = threading.Event()
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        if shutil.which(DNSMASQ) is None:
            raise StepError("pxe serve", "dnsmasq is not installed",
                            hint="apt install dnsmasq-base (in a checkout, 'make deps')")
        argv = [DNSMASQ, "--keep-in-foreground", f"--conf-file={self.conf}", "--log-facility=-", "--pid-file="]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, name="dnsmasq-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.started.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StepError("pxe serve", "dnsmasq did not start: " + " / ".join(self.lines[-5:]),
                                hint=f"is another DHCP proxy or TFTP server running here? (log: {self.log_file})")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_file, "a") as out:
            for raw in self.proc.stdout:
                line = raw.rstrip("\n")
                out.write(line + "\n")
                out.flush()
                self.lines.append(line)
                if "TFTP root is" in line:
                    self.started.set()
                if " PXE(" in line or "sent /" in line or "failed" in line or "error" in line.lower():
                    log.info("  dnsmasq: %s", line.split(": ", 1)[-1])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT)


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise CbiosError(f"--mode {mode}: one of {', '.join(MODES)}")


def run(make_server: ServerMaker, *, profile: str, version: str, interface: str, http_port: int, receipts: Path,
        mode: str | None = None, ready: threading.Event | None = None, stop: threading.Event | None = None,
        on_tick: Callable[[BundleServer], None] | None = None) -> int:
    """Serve PROFILE VERSION (the bundle MAKE_SERVER serves) on INTERFACE until SIGINT/SIGTERM
    (or STOP is set); 0 on a clean stop. ON_TICK sees the server twice a second (the nodes'
    progress, shown by `cbios pxe serve`)."""
    check_mode(mode)
    address = interface_address(interface)
    stop = stop or threading.Event()
    try:
        receipts.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CbiosError(f"{receipts}: cannot keep receipts there ({e.strerror})",
                         hint="name a folder of yours: --receipts DIR") from None
    try:
        httpd = make_server((address.ip, http_port), receipts, mode)
    except OSError as e:
        raise CbiosError(f"cannot serve HTTP on {address.ip}:{http_port}: {e.strerror}",
                         hint="pick another --http-port") from None
    script_url = f"http://{address.ip}:{httpd.port}/boot.ipxe"
    with _socket_closed(httpd), _runtime() as runtime, stopped_by_signals(stop):
        httpd.start()
        dnsmasq = Dnsmasq(runtime / "dnsmasq.conf", receipts / "dnsmasq.log")
        try:
            tftp_tree(runtime / "tftp")
            dnsmasq.conf.write_text(dnsmasq_conf(profile=profile, version=version, interface=interface,
                                                 network=address.network, tftp_root=runtime / "tftp",
                                                 script_url=script_url))
            dnsmasq.start()
            log.info("‣ Serving CBIOS %s %s on %s (%s): proxy-DHCP and TFTP (dnsmasq), %s%s",
                     profile, version, interface, address.ip, script_url,
                     f"; every node: {mode}" if mode else "; nodes choose in iPXE's menu (default: boot)")
            log.info("  receipts and dnsmasq's log: %s. Ctrl-C stops.", receipts)
            if ready is not None:
                ready.set()
            while not stop.wait(0.5):
                if on_tick is not None:
                    on_tick(httpd)
                if not dnsmasq.running():
                    raise StepError("pxe serve", "dnsmasq exited: " + " / ".join(dnsmasq.lines[-3:]),
                                    hint=f"log: {dnsmasq.log_file}")
        finally:
            httpd.stop()
            dnsmasq.stop()
    log.info("‣ Stopped: %d transfers (%d MiB), %d receipts", httpd.transfers_done(), httpd.bytes_sent() >> 20,
             len(httpd.received))
    return 0


@contextmanager
def _socket_closed(httpd: BundleServer) -> Iterator[None]:
    """HTTPD's socket closed at the end, whatever fails before it serves (stop() closes it
    too: closing twice is harmless)."""
    try:
        yield
    finally:
        httpd.server_close()


@contextmanager
def _runtime() -> Iterator[Path]:
    """A folder for dnsmasq's configuration and TFTP tree, readable by dnsmasq once it drops root."""
    runtime = Path(tempfile.mkdtemp(prefix="cbios-pxe-"))
    try:
        runtime.chmod(0o755)
        yield runtime
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


@contextmanager
def stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set STOP while in the block (in the main thread; elsewhere, only STOP does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _stopper(stop)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopper(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
    return handler
