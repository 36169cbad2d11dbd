"""The cluster: the CB-Managers of the management nodes asking each other over TCP on the
management network, every request and every answer authenticated with the cluster key.

A request is wire.py's request with two more fields: "auth" {from, to, time, nonce} and
"mac", HMAC-SHA256 with the cluster key over the canonical JSON of the rest. The answer
carries a "mac" too, over the answer and the request's nonce, so a caller believes only
answers from a holder of the key. A request that is not authenticated (no MAC, another
key, meant for another node, from a node not in the inventory, more than MAX_SKEW
seconds off, sent before this listener started, or replayed) is refused with one word and
nothing else; a connection from an address that is no member's is closed unanswered.
Connections are few (MAX_CLIENTS) and short (a whole request within wire.READ_TIMEOUT)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cbios.node import wire

log = logging.getLogger("cbios")

MAX_SKEW = 60  # seconds between two nodes' clocks, and how long a nonce is remembered for
MAX_ANSWER = 16 << 20
MAX_CLIENTS = 16  # connections being read or answered at once; more are closed at once
LOGGED_REFUSALS = 10  # a minute: a flood of strangers does not fill the log
DENIED = {"ok": False, "code": "denied", "error": "not authenticated"}
HEX_MAC = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Peer:
    """Another management node: its ObjectID and its CB-Manager's address."""

    object_id: str
    address: str
    port: int

    def owns(self, object_id: str) -> bool:
        """Its ObjectID or one of its slots': the same first 8 digits."""
        return object_id[:8] == self.object_id[:8]


class Denied(Exception):
    """A request that is not the cluster's."""


class Unreachable(Exception):
    """No (authentic) answer from a node within the bound."""


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sign(key: bytes, obj: Any) -> str:
    return hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()


def request(key: bytes, sender: str, peer: str, op: str, args: dict[str, Any],
            now: Callable[[], float] = time.time) -> dict[str, Any]:
    auth = {"from": sender, "to": peer, "time": int(now()), "nonce": secrets.token_hex(16)}
    body = {"v": wire.PROTOCOL, "op": op, "args": args, "auth": auth}
    return {**body, "mac": sign(key, body)}


class Verifier:
    """Decides whether a request comes from a member of the cluster, and is fresh."""

    def __init__(self, key: bytes, node_id: str, members: set[str], clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.node_id = node_id
        self.members = members
        self.clock = clock
        self.started = int(clock())  # the nonces seen before a restart are forgotten: so are their requests
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()

    def check(self, msg: Any) -> tuple[bytes, str]:
        """The request without its credentials (a wire.py line), and its nonce; or Denied."""
        if not isinstance(msg, dict) or not isinstance(msg.get("mac"), str) or not isinstance(msg.get("auth"), dict):
            raise Denied("no credentials")
        if not HEX_MAC.fullmatch(msg["mac"]):
            raise Denied("no MAC")
        body = {k: v for k, v in msg.items() if k != "mac"}
        if not hmac.compare_digest(sign(self.key, body), msg["mac"]):
            raise Denied("wrong MAC: not made with this cluster's key")
        auth = body.pop("auth")
        if auth.get("to") != self.node_id:
            raise Denied(f"meant for {auth.get('to')!r}, this is {self.node_id}")
        if auth.get("from") not in self.members:
            raise Denied(f"from {auth.get('from')!r}, not a node of this cluster")
        sent, nonce, now = auth.get("time"), auth.get("nonce"), self.clock()
        if not isinstance(sent, int) or abs(now - sent) > MAX_SKEW:
            raise Denied(f"sent at {sent!r}, more than {MAX_SKEW} s from this node's clock ({int(now)})")
        if sent < self.started:
            raise Denied(f"sent at {sent}, before this CB-Manager started ({self.started})")
        if not isinstance(nonce, str) or not re.fullmatch(r"[0-9a-f]{32}", nonce):
            raise Denied("no nonce")
        with self.lock:
            self.seen = {n: t for n, t in self.seen.items() if now - t <= 2 * MAX_SKEW}
            if nonce in self.seen:
                raise Denied("replayed")
            self.seen[nonce] = now
        return canonical(body) + b"\n", nonce


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Refusals:
    """Logs refusals, at most LOGGED_REFUSALS a minute."""

    def __init__(self) -> None:
        self.minute, self.count = 0, 0
        self.lock = threading.Lock()

    def log(self, address: str, reason: object) -> None:
        with self.lock:
            minute = int(time.monotonic() // 60)
            self.minute, self.count = minute, (self.count + 1 if minute == self.minute else 1)
            if self.count <= LOGGED_REFUSALS:
                log.warning("cluster: refused a request from %s: %s", address, reason)
            elif self.count == LOGGED_REFUSALS + 1:
                log.warning("cluster: more refusals this minute, not logged")


def serve(port: int, key: bytes, verifier: Verifier, handler: wire.Handler, members: set[str],
          host: str = "0.0.0.0") -> None:
    """Answer authenticated requests from the addresses MEMBERS on HOST:PORT until the process ends."""
    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    refusals = _Refusals()

    class _Request(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            address = self.client_address[0]
            if address not in members:
                refusals.log(address, "not a member's address (closed unanswered)")
                return
            if not slots.acquire(blocking=False):
                refusals.log(address, f"{MAX_CLIENTS} connections already (closed unanswered)")
                return
            try:
                self._answer(address)
            finally:
                slots.release()

        def _answer(self, address: str) -> None:
            line = wire.read_line(self.request)
            if line is None:
                return
            try:
                inner, nonce = verifier.check(json.loads(line))
            except Exception as e:  # a stranger's bytes: anything is a refusal (RecursionError too)
                refusals.log(address, e if isinstance(e, Denied) else f"unreadable ({type(e).__name__})")
                self._send(DENIED)
                return
            try:
                op, args = wire.decode(inner)
            except wire.Invalid as e:
                reply = {"ok": False, "code": "invalid", "error": str(e)}
            else:
                log.info("cluster: %s from %s", op, address)
                reply = wire.answer(handler, op, args)
            self._send({**reply, "mac": sign(key, {"nonce": nonce, "answer": reply})})

        def _send(self, reply: dict[str, Any]) -> None:
            try:
                self.request.settimeout(wire.READ_TIMEOUT)
                self.request.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    with _Server((host, port), _Request) as server:
        server.serve_forever()


def call(peer: Peer, key: bytes, sender: str, op: str, args: dict[str, Any], *,
         timeout: float, answer_timeout: float | None = None) -> Any:
    """Ask PEER; its result, or wire.RemoteError (it said no), or Unreachable. The connection
    has TIMEOUT; the answer ANSWER_TIMEOUT (TIMEOUT if not given), counted from the start."""
    started = time.monotonic()
    deadline = started + (answer_timeout or timeout)
    req = request(key, sender, peer.object_id, op, args)
    where = f"node {peer.object_id} at {peer.address}:{peer.port}"
    data = b""
    try:
        with socket.create_connection((peer.address, peer.port), timeout=timeout) as s:
            s.sendall(canonical(req) + b"\n")
            while not data.endswith(b"\n") and len(data) <= MAX_ANSWER:
                s.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise Unreachable(f"{where}: no answer within {deadline - started:g} s") from None
    except OSError as e:
        raise Unreachable(f"{where}: {e.strerror or e}") from None
    try:
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except Exception:  # whatever came back, it is not an answer (RecursionError too)
        raise Unreachable(f"{where}: no complete answer") from None
    if answer == DENIED:
        raise wire.RemoteError("denied", f"{where} does not take our credentials: is its cluster key ours?")
    mac = answer.pop("mac", None)
    if not isinstance(mac, str) or not HEX_MAC.fullmatch(mac) or not hmac.compare_digest(
            sign(key, {"nonce": req["auth"]["nonce"], "answer": answer}), mac):
        raise Unreachable(f"{where}: an answer not made with the cluster's key")
    if not answer.get("ok"):
        raise wire.RemoteError(str(answer.get("code", "failed")), f"{peer.object_id}: {answer.get('error')}")
    return answer.get("result")
