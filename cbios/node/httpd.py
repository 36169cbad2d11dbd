"""The HTTP side of a PXE server: a bundle's files for iPXE and the flasher, and the
flasher's receipts. Only the bundle's own files are served (no paths, no listing). The
server of `cbios pxe serve` and of a boot-server slot (which serves many bundles, one
chosen for each node: cbios/node/bootserver.py).

boot.ipxe is served with `cbios-server` set to the URL the client used, so one bundle
works behind any address. Every transfer is logged with the node's MAC (the clients put
it in the query: ?mac=...), and `stop()` ends transfers under way: a node never waits on
a server that has gone."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

from cbios.node.printable import printable

log = logging.getLogger("cbios")

SLICE = 1 << 20  # sendfile's bytes per call: a stop or a hold is seen within one
RECEIPT_MAX = 64 << 10
IDLE_TIMEOUT = 60
TRANSFERS_KEPT = 1000
RANGE = re.compile(r"bytes=(\d{1,19})-(\d{1,19})?")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")  # fullmatch


@dataclass
class Transfer:
    client: str
    mac: str
    name: str
    size: int
    sent: int = 0
    offset: int = 0  # where in the file it starts (a Range request)
    done: bool = False  # every byte sent; decided once the transfer has ended
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None  # time.monotonic() when the server was through with it
    # Set when the server is through with it: a client can have read the last byte before then.
    ended: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


def ipxe_presets(mode: str | None, args: str = "") -> str:
    """The iPXE lines that set what boot.ipxe does without its menu (cbios-mode) and what it
    adds to the kernel command line (cbios-args), before it is chained."""
    return "".join(f"set {k} {v}\n" for k, v in (("cbios-mode", mode), ("cbios-args", args)) if v)


class BundleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], bundle: Path, files: list[str], receipts: Path,
                 *, preset_mode: str | None = None, preset_args: str = "",
                 hold_after: tuple[str, int] | None = None) -> None:
        """HOLD_AFTER (NAME, BYTES): as `hold(NAME, BYTES)` from the start."""
        self.bundle = bundle
        self.hold_after = hold_after
        self.held = threading.Event()
        self.released = threading.Event()
        self.preset = ipxe_presets(preset_mode, preset_args)
        self.files = set(files)
        self.receipts = receipts
        self.transfers: list[Transfer] = []  # the last TRANSFERS_KEPT
        self.forgotten: dict[str, int] = {}  # bytes sent by the transfers before them, by file
        self.forgotten_done = 0
        self.received: list[dict[str, object]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        super().__init__(address, Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="cbios-httpd", daemon=True)
        self._thread.start()

    def hold(self, name: str, after: int) -> None:
        """For tests that cut a node off in the middle of a transfer, at a point they choose
        rather than one they race: once AFTER bytes of NAME are sent, that transfer sends
        nothing more (`held` is set) and breaks off at `release()` or `stop()`."""
        self.held.clear()
        self.released.clear()
        self.hold_after = (name, after)

    def release(self) -> None:
        """End the hold: the held transfer breaks off; transfers after it are whole."""
        self.hold_after = None
        self.released.set()

    def stop(self) -> None:
        """Stop serving, and break off every transfer under way."""
        self.stopping.set()
        self.released.set()
        self.shutdown()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.server_close()

    def locate(self, name: str) -> Path | None:
        """The file to send for the path NAME, or None: not served here."""
        path = self.bundle / name
        return path if name in self.files and path.is_file() else None

    def open_file(self, name: str) -> tuple[BinaryIO, int, int] | None:
        """The file that holds the path NAME, open, and where in it NAME's bytes are (offset,
        size); None: not served here. One file a name, but for a server that keeps its files
        in an archive (the field kit's)."""
        if (path := self.locate(name)) is None:
            return None
        f = open(path, "rb")
        return f, 0, os.fstat(f.fileno()).st_size

    def script(self, name: str, host: str, mac: str, query: dict[str, list[str]]) -> bytes | None:
        """An iPXE script made for this request, or None: NAME is a plain file. HOST is the
        server as the client named it."""
        if name != "boot.ipxe" or (opened := self.open_file(name)) is None:
            return None
        f, base, size = opened
        with f:
            text = os.pread(f.fileno(), size, base)
        preset = f"set cbios-server http://{host}/\n{self.preset}"
        return text.replace(b"\n", b"\n" + preset.encode(), 1)

    def keep_receipt(self, receipt: dict[str, object], name: str) -> Path:
        """A receipt the flasher (or a diskless boot) sent to NAME, kept; where."""
        self.receipts.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = self.receipts / f"{stamp}-{str(receipt['mac']).replace(':', '')}.json"
        path.write_text(json.dumps(receipt, indent=2, sort_keys=True) + "\n")
        return path

    def bytes_sent(self, name: str | None = None) -> int:
        """Bytes sent so far, of NAME or of every file."""
        with self._lock:
            return sum(t.sent for t in self.transfers if name is None or t.name == name) + \
                sum(sent for n, sent in self.forgotten.items() if name is None or n == name)

    def snapshot(self) -> list[Transfer]:
        """The transfers kept, oldest first, as they stand: for a display that reads them
        (their `sent`, `finished`, `ended`) while they go on."""
        with self._lock:
            return list(self.transfers)

    def transfers_done(self) -> int:
        """Transfers sent whole so far."""
        with self._lock:
            return sum(1 for t in self.transfers if t.done) + self.forgotten_done

    def track(self, transfer: Transfer) -> None:
        """TRANSFER, kept among the last TRANSFERS_KEPT (a server that runs for months, and
        clients that ask for a byte at a time, never fill its memory); the ones before are
        kept as their sums."""
        with self._lock:
            self.transfers.append(transfer)
            while len(self.transfers) > TRANSFERS_KEPT and self.transfers[0].ended.is_set():
                old = self.transfers.pop(0)
                self.forgotten[old.name] = self.forgotten.get(old.name, 0) + old.sent
                self.forgotten_done += old.done

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket],
                        client_address: tuple[str, int]) -> None:
        if isinstance(request, socket.socket):
            with self._lock:
                self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        if isinstance(request, socket.socket):
            with self._lock:
                self._conns.discard(request)
        super().shutdown_request(request)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes [start, end) a Range header asks of a file of SIZE: the whole file without
    one (or with one this server does not read: several ranges, a suffix); None if it asks
    for bytes past the end (416)."""
    if header is None or not (m := RANGE.fullmatch(header.strip())):
        return 0, size
    start = int(m[1])
    end = size if m[2] is None else min(int(m[2]) + 1, size)
    if start >= size:
        return None
    return (start, end) if end > start else (0, size)  # "bytes=9-3" is no range: the whole file


class Handler(BaseHTTPRequestHandler):
    server: BundleServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT  # a client that sends or reads nothing for this long is dropped
    server_version = "cbios-pxe"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s: %s", self.client_address[0], format % args)

    def _mac(self) -> str:
        mac = parse_qs(urlsplit(self.path).query).get("mac", ["?"])[0].lower()
        return mac if MAC.fullmatch(mac) else "?"

    def _name(self) -> str:
        return urlsplit(self.path).path.lstrip("/")

    def do_HEAD(self) -> None:
        self._get(body=False)

    def do_GET(self) -> None:
        self._get(body=True)

    def _get(self, body: bool) -> None:
        name = self._name()
        host = self.headers.get("Host") or f"{self.server.server_address[0]!s}:{self.server.port}"
        text = self.server.script(name, host, self._mac(), parse_qs(urlsplit(self.path).query))
        if text is not None:
            self._reply(HTTPStatus.OK, text, body=body, content_type="text/plain")
            if body:
                log.info("  %s %s: %s", self._mac(), self.client_address[0], name)
            return
        opened = self.server.open_file(name)
        if opened is None:
            self._reply(HTTPStatus.NOT_FOUND, b"not served here\n")
            log.info("  %s %s: %s not found", self._mac(), self.client_address[0], printable(name or "/"))
            return
        f, base, size = opened
        with f:
            span = byte_range(self.headers.get("Range"), size)
            if span is None:
                self._reply(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"no such range\n", body=body,
                            headers={"Content-Range": f"bytes */{size}"})
                return
            start, end = span
            self.send_response(HTTPStatus.PARTIAL_CONTENT if end - start < size else HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            if end - start < size:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if body:
                self._send_file(f, name, size, start, end, base)

    def _send_file(self, f: BinaryIO, name: str, size: int, start: int, end: int, base: int = 0) -> None:
        """Bytes START..END of NAME, which begins at BASE in F, from the page cache to the
        socket (sendfile), a slice at a time so that stop() and a hold are seen between slices."""
        transfer = Transfer(self.client_address[0], self._mac(), name, end - start, offset=start)
        self.server.track(transfer)
        log.info("  %s %s: %s (%d MiB%s) ...", transfer.mac, transfer.client, name, size >> 20,
                 f", from byte {start}" if start else "")
        hold = self.server.hold_after[1] if self.server.hold_after and self.server.hold_after[0] == name else None
        while not self.server.stopping.is_set() and (left := end - start - transfer.sent) > 0:
            count = min(SLICE, left)
            if hold is not None and start + transfer.sent + count > hold:
                count = hold - start - transfer.sent
                if count <= 0:
                    self.server.held.set()
                    self.server.released.wait()
                    break
            try:
                sent = self.connection.sendfile(f, base + start + transfer.sent, count)
            except OSError:
                break
            if sent == 0:
                break
            transfer.sent += sent
        transfer.done = transfer.sent == transfer.size
        transfer.finished = time.monotonic()
        transfer.ended.set()
        seconds = transfer.finished - transfer.started
        if transfer.done:
            log.info("  %s %s: %s sent, %d bytes in %.1f s", transfer.mac, transfer.client, name, transfer.size,
                     seconds)
        else:
            log.info("  %s %s: %s broken off after %d of %d bytes", transfer.mac, transfer.client, name,
                     start + transfer.sent, size)
            self.close_connection = True

    def do_POST(self) -> None:
        if self._name().rsplit("/", 1)[-1] != "receipt":
            self._reply(HTTPStatus.NOT_FOUND, b"only receipts are taken here\n")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reply(HTTPStatus.LENGTH_REQUIRED, b"Content-Length required\n")
            return
        if not 0 < length <= RECEIPT_MAX:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"a receipt is at most 64 KiB\n")
            return
        try:
            receipt = json.loads(self.rfile.read(length))
        except ValueError:
            receipt = None
        if not isinstance(receipt, dict) or not MAC.fullmatch(str(receipt.get("mac", ""))):
            self._reply(HTTPStatus.BAD_REQUEST, b"a receipt is a JSON object with the node's mac\n")
            return
        receipt["client"] = self.client_address[0]
        self.server.received.append(receipt)
        path = self.server.keep_receipt(receipt, self._name())
        shown = [printable(receipt.get(k)) for k in ("mac", "object_id", "result", "mode", "profile", "version")]
        log.info("‣ Receipt from %s (%s): %s %s %s %s %s; %s", *shown,
                 printable(receipt.get("reason") or f"root.img {str(receipt.get('root_sha256'))[:12]}"), path)
        self._reply(HTTPStatus.OK, b"receipt taken\n")

    def _reply(self, status: HTTPStatus, data: bytes, *, body: bool = True, content_type: str = "text/plain",
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
