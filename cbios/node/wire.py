"""The wire format of CB-Executor and CB-Manager: one JSON request, one JSON answer.

A client connects to a UNIX socket, sends {"v": 1, "op": "...", "args": {...}} on one
line and reads one line back: {"ok": true, "result": ...} or
{"ok": false, "code": "invalid" | "failed", "error": "..."}. "invalid" means the request
was refused and nothing was done; "failed" means the work was tried and did not succeed.

A request may hand over one open file with its line (SCM_RIGHTS): its args then say
"upload": true, and the handler reads the file from args["upload"] (`slot image add` gives
CB-Manager a release so, which it reads with the caller's access, not its own)."""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

PROTOCOL = 1
MAX_REQUEST = 1 << 20
READ_TIMEOUT = 10

log = logging.getLogger("cbios")


class Invalid(Exception):
    """A request refused: nothing was done."""


class Failed(Exception):
    """A request tried and failed."""


class RemoteError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[str, dict[str, Any]], Any]


def decode(line: bytes) -> tuple[str, dict[str, Any]]:
    """A request line to (op, args), or Invalid."""
    if len(line) > MAX_REQUEST:
        raise Invalid(f"request longer than {MAX_REQUEST} bytes")
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Invalid(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise Invalid("a request is a JSON object")
    unknown = sorted(set(msg) - {"v", "op", "args"})
    if unknown:
        raise Invalid(f"unknown field(s) {', '.join(unknown)}")
    if msg.get("v") != PROTOCOL:
        raise Invalid(f"protocol version {msg.get('v')!r}: this side speaks {PROTOCOL}")
    op, args = msg.get("op"), msg.get("args", {})
    if not isinstance(op, str):
        raise Invalid("'op' must be a string")
    if not isinstance(args, dict):
        raise Invalid("'args' must be an object")
    return op, args


def answer(handler: Handler, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """HANDLER's result for one decoded request, as the answer's object."""
    try:
        return {"ok": True, "result": handler(op, args)}
    except Invalid as e:
        log.warning("refused %s: %s", op, e)
        return {"ok": False, "code": "invalid", "error": str(e)}
    except Failed as e:
        log.warning("failed %s: %s", op, e)
        return {"ok": False, "code": "failed", "error": str(e)}
    except Exception as e:  # a bug must not take the daemon down; say what broke
        log.exception("error in %s", op)
        return {"ok": False, "code": "failed", "error": f"internal error: {e}"}


def read_line(sock: socket.socket, timeout: float | None = None, fds: list[int] | None = None) -> bytes | None:
    """One request line, whole within TIMEOUT (not TIMEOUT a read); None if cut off or too
    slow. One longer than MAX_REQUEST comes back as it is, for decode() to refuse. A file
    handed over with it goes into FDS (given: the caller closes them); else it is closed."""
    timeout = READ_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    data = b""
    received: list[int] = []
    while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk, got, _, _ = socket.recv_fds(sock, 65536, 1)
            received += got
        except OSError:  # TimeoutError among them
            chunk = b""
        if not chunk:
            log.warning("refused: no complete request line within %d s", timeout)
            data = b""
            break
        data += chunk
    if fds is None or not data:
        for fd in received:
            os.close(fd)
    else:
        fds += received
    return data or None


def _with_upload(args: dict[str, Any], fds: list[int], taken: bool) -> tuple[dict[str, Any], BinaryIO | None]:
    """ARGS with the file handed over in place of "upload": true, or Invalid."""
    if "upload" in args and not taken:
        raise Invalid("this service takes no file handed over (\"upload\")")
    if args.get("upload") is not True:
        if fds or "upload" in args:
            raise Invalid("a file handed over comes with \"upload\": true, and nothing else says \"upload\"")
        return args, None
    if len(fds) != 1:
        raise Invalid("\"upload\": true, and no file handed over with the request")
    fd = fds.pop()
    try:
        upload = os.fdopen(fd, "rb")
    except OSError:  # a directory, say
        os.close(fd)
        raise Invalid("the file handed over cannot be read") from None
    return {**args, "upload": upload}, upload


SD_LISTEN_FDS_START = 3


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(path: Path, handler: Handler, *, mode: int = 0o600, ready: Callable[[], None] | None = None,
          uploads: bool = False) -> None:
    """Answer requests on PATH (replaced if stale), or on the socket systemd made for it, until
    the process ends. UPLOADS: requests may hand over a file (else one handed over is closed
    unread, and the request refused)."""

    class _Request(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            fds: list[int] = []
            # a caller that never finishes its line does not hold a thread
            line = read_line(self.request, fds=fds if uploads else None)
            if line is None:
                return
            upload = None
            try:
                op, args = decode(line)
                args, upload = _with_upload(args, fds, uploads)
            except Invalid as e:
                log.warning("refused: %s", e)
                reply = {"ok": False, "code": "invalid", "error": str(e)}
            else:
                reply = answer(handler, op, args)
            finally:
                for fd in fds:
                    os.close(fd)
                if upload is not None:
                    upload.close()
            try:
                self.request.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    with _Server(str(path), _Request, bind_and_activate=False) as server:
        if (listening := listen_fd()) is not None:
            # systemd made the socket (its .socket unit) and has been queueing callers on it
            server.socket.close()
            server.socket = socket.socket(fileno=listening)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            server.server_bind()
            server.server_activate()
            os.chmod(path, mode)
        if ready:
            ready()
        server.serve_forever()


def listen_fd() -> int | None:
    """The socket systemd passed this process (socket activation, sd_listen_fds), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the programs this one runs
    if count != "1":  # binding the path instead would take it from the socket unit's callers
        raise OSError(f"systemd passed {count} sockets: one is served")
    os.set_inheritable(SD_LISTEN_FDS_START, False)  # nor is the socket
    return SD_LISTEN_FDS_START


def call(path: Path, op: str, args: dict[str, Any] | None = None, *, timeout: float = 120.0,
         upload: int | None = None) -> Any:
    """Send one request; return its result or raise RemoteError (or OSError: no daemon).
    UPLOAD: a file descriptor handed over with it, for the other side to read."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        line = json.dumps({"v": PROTOCOL, "op": op, "args": {**(args or {}), **(
            {"upload": True} if upload is not None else {})}}).encode() + b"\n"
        try:
            if upload is None:
                s.sendall(line)
            else:  # the descriptor rides on the line's first bytes; the rest follows
                sent = socket.send_fds(s, [line], [upload])
                if sent < len(line):  # an empty send to a peer that has answered and closed is EPIPE
                    s.sendall(line[sent:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered before it read it all (a refusal): its answer says why
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise RemoteError("failed", f"{path}: no answer to {op}")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise RemoteError(answer.get("code", "failed"), answer.get("error", "unknown error"))
    return answer.get("result")


def wait_for(path: Path, timeout: float) -> bool:
    """Until a daemon answers 'hello' on PATH, at most TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call(path, "hello", timeout=5)
            return True
        except (OSError, RemoteError, ValueError):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def notify_ready() -> None:
    """sd_notify(READY=1) for Type=notify units."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(b"READY=1")
