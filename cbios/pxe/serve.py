"""`cbios pxe serve` and `cbios pxe publish`: a build's PXE bundle (its folder) served to real
nodes on one interface (cbios/pxe/service.py: proxy-DHCP, TFTP and HTTP), or over HTTP only
for `cbios update URL` on running nodes. Both run until Ctrl-C or SIGTERM, then stop and say
what they served."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from cbios.errors import CbiosError
from cbios.node.httpd import BundleServer
from cbios.progress import TransferBoard
from cbios.pxe import service
from cbios.pxe.bundle import FILES, check_bundle
from cbios.pxe.transfers import node_rows
from cbios.qemu import GUEST_FORWARD

log = logging.getLogger("cbios")

RELEASE_PORT = 8086  # `cbios pxe publish`; QEMU VMs of `cbios boot` reach it at VM_RELEASE_SERVER
VM_RELEASE_SERVER = GUEST_FORWARD


def serve(bundle: Path, interface: str, *, http_port: int, receipts: Path, mode: str | None = None,
          ready: threading.Event | None = None, stop: threading.Event | None = None) -> int:
    """Serve BUNDLE on INTERFACE until SIGINT/SIGTERM (or STOP is set); 0 on a clean stop."""
    data = check_bundle(bundle)

    def make_server(address: tuple[str, int], receipts: Path, mode: str | None) -> BundleServer:
        return BundleServer(address, bundle, FILES, receipts, preset_mode=mode)

    with TransferBoard() as board:
        return service.run(make_server, profile=str(data["profile"]), version=str(data["version"]),
                           interface=interface, http_port=http_port, receipts=receipts, mode=mode, ready=ready,
                           stop=stop, on_tick=lambda httpd: board.update(node_rows(httpd.snapshot(), time.monotonic())))


def publish(bundle: Path, *, address: str, port: int, stop: threading.Event | None = None,
            ready: threading.Event | None = None) -> int:
    """Serve BUNDLE over HTTP only, for `cbios update SOURCE` on running nodes, until SIGINT/SIGTERM."""
    data = check_bundle(bundle)
    stop = stop or threading.Event()
    try:
        httpd = BundleServer((address, port), bundle, FILES, bundle.resolve().parent / service.RECEIPTS)
    except OSError as e:
        raise CbiosError(f"cannot serve HTTP on {address}:{port}: {e.strerror}", hint="pick another --port") from None
    with service.stopped_by_signals(stop):
        httpd.start()
        try:
            log.info("‣ Publishing CBIOS %s %s on http://%s:%d/ (%s). On a node: cbios update http://%s:%d/",
                     data["profile"], data["version"], address, httpd.port, bundle, address, httpd.port)
            if address == "127.0.0.1" and port == RELEASE_PORT:
                log.info("  VMs of 'cbios boot' reach it as http://%s/ (give ctl an address in 10.0.2.0/24 first)",
                         VM_RELEASE_SERVER)
            log.info("  Ctrl-C stops.")
            if ready is not None:
                ready.set()
            stop.wait()
        finally:
            httpd.stop()
    log.info("‣ Stopped: %d transfers (%d MiB)", httpd.transfers_done(), httpd.bytes_sent() >> 20)
    return 0
