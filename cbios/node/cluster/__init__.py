"""The cluster: the CB-Managers of the management nodes asking each other over TCP on the
management network, every request and every answer authenticated with the cluster key.

Challenge and response, so that nothing depends on the nodes' clocks (they run no time
sync) and nothing can be replayed: the answering node opens every connection with a
fresh random challenge; the request is wire.py's request with two more fields, "auth"
{from, to, challenge} and "mac", HMAC-SHA256 with the cluster key over the canonical JSON
of the rest; the answer carries a "mac" over the answer and the challenge, so a caller
believes only answers from a holder of the key. A request that is not authenticated (no
MAC, another key, meant for another node, from a node not in the inventory, or for
another connection's challenge) is refused with one word and nothing else; a connection
from an address that is no member's is closed unanswered. Connections are few
(MAX_CLIENTS) and short (a whole request within wire.READ_TIMEOUT).

A node accepts its current key and the one it replaced (keyring.py). REKEY hands a member
a new key: sealed with a key stream from the key the request is signed with and the
connection's challenge, so the management network never carries it in the clear.

Why HMAC and not mutual TLS: the nodes share one secret that the operator sets, the node
side is the standard library only, and there is no certificate authority to run, no
certificate to expire and no clock to trust; what TLS would add, secrecy of slot
listings, is not a secret on the management network."""

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

MAX_ANSWER = 16 << 20
MAX_CLIENTS = 16  # connections being read or answered at once; more are closed at once
MAX_STRANGERS = 2  # the same, from addresses that are no member's (JOIN)
STRANGER_TIMEOUT = 3.0  # their whole request within it
LOGGED_REFUSALS = 10  # a minute: a flood of strangers does not fill the log
DENIED = {"ok": False, "code": "denied", "error": "not authenticated"}
HEX_MAC = re.compile(r"[0-9a-f]{64}")
CHALLENGE = re.compile(r"[0-9a-f]{32}")
REKEY = "rekey"  # answered by this module: the argument is sealed to the connection
JOIN = "join"  # the one request taken from an address that is no member's (signed with the key)


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


def request(key: bytes, sender: str, peer: str, challenge: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
    auth = {"from": sender, "to": peer, "challenge": challenge}
    body = {"v": wire.PROTOCOL, "op": op, "args": args, "auth": auth}
    return {**body, "mac": sign(key, body)}


def seal(key: bytes, challenge: str, data: bytes) -> str:
    """DATA (at most 4096 bytes) XOR a key stream of HMAC(KEY, challenge, block number), hex."""
    stream = b"".join(hmac.new(key, f"cbios rekey {challenge} {i}".encode(), hashlib.sha256).digest()
                      for i in range(-(-len(data) // 32)))
    return bytes(a ^ b for a, b in zip(data, stream, strict=False)).hex()


def unseal(key: bytes, challenge: str, text: str) -> bytes:
    return bytes.fromhex(seal(key, challenge, bytes.fromhex(text)))


class Verifier:
    """Decides whether a request comes from a member of the cluster, for this connection: a
    holder of the key that is a member, or one that asks to JOIN (to any node: "*")."""

    def __init__(self, keys: Callable[[], list[bytes]], node_id: str, members: Callable[[], set[str]]) -> None:
        self.keys = keys
        self.node_id = node_id
        self.members = members

    def check(self, msg: Any, challenge: str) -> tuple[bytes, bytes, str]:
        """The request without its credentials (a wire.py line), the key it was signed with,
        and its sender; or Denied."""
        if not isinstance(msg, dict) or not isinstance(msg.get("mac"), str) or not isinstance(msg.get("auth"), dict):
            raise Denied("no credentials")
        if not HEX_MAC.fullmatch(msg["mac"]):
            raise Denied("no MAC")
        body = {k: v for k, v in msg.items() if k != "mac"}
        keys = self.keys()
        if not keys:
            raise Denied("this node has no cluster key")
        key = next((k for k in keys if hmac.compare_digest(sign(k, body), msg["mac"])), None)
        if key is None:
            raise Denied("wrong MAC: not made with this cluster's key")
        auth = body.pop("auth")
        joining = body.get("op") == JOIN
        if auth.get("to") != self.node_id and not (joining and auth.get("to") == "*"):
            raise Denied(f"meant for {auth.get('to')!r}, this is {self.node_id}")
        if auth.get("from") not in self.members() and not joining:
            raise Denied(f"from {auth.get('from')!r}, not a node of this cluster")
        if auth.get("challenge") != challenge:
            raise Denied("not for this connection's challenge (replayed?)")
        return canonical(body) + b"\n", key, str(auth.get("from"))


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


Join = Callable[[str, str, dict[str, Any]], Any]  # (address, sender, args) -> result


def serve(port: int, verifier: Verifier, handler: wire.Handler, members: Callable[[], set[str]],
          host: str = "0.0.0.0", rekey: Callable[[bytes], str] | None = None, join: Join | None = None,
          ready: Callable[[], None] | None = None) -> None:
    """Answer authenticated requests from the addresses MEMBERS() on HOST:PORT until the
    process ends; from another address, JOIN only (when given). REKEY installs a new key
    handed over by a member and returns its fingerprint."""
    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    # Addresses that are no member's (a node that joins) have a few connections of their own,
    # and little time: strangers holding connections open never keep the members out.
    strangers = threading.BoundedSemaphore(MAX_STRANGERS)
    refusals = _Refusals()

    class _Request(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            address = self.client_address[0]
            member = address in members()
            if not member and join is None:
                refusals.log(address, "not a member's address (closed unanswered)")
                return
            pool = slots if member else strangers
            if not pool.acquire(blocking=False):
                refusals.log(address, "too many connections already (closed unanswered)")
                return
            try:
                self._answer(address, member)
            finally:
                pool.release()

        def _answer(self, address: str, member: bool) -> None:
            challenge = secrets.token_hex(16)
            if not self._send({"challenge": challenge}):
                return
            line = wire.read_line(self.request, wire.READ_TIMEOUT if member else STRANGER_TIMEOUT)
            if line is None:
                return
            try:
                inner, key, sender = verifier.check(json.loads(line), challenge)
                op, args = wire.decode(inner)
                if not member and op != JOIN:
                    raise Denied(f"{op} from {address}, not a member's address")
            except wire.Invalid as e:
                reply = {"ok": False, "code": "invalid", "error": str(e)}
            except Exception as e:  # a stranger's bytes: anything is a refusal (RecursionError too)
                refusals.log(address, e if isinstance(e, Denied) else f"unreadable ({type(e).__name__})")
                self._send(DENIED)
                return
            else:
                log.info("cluster: %s from %s", op, address)
                if op == REKEY:
                    reply = wire.answer(lambda _op, a: _rekey(rekey, key, challenge, a), op, args)
                elif op == JOIN and join is not None:
                    reply = wire.answer(lambda _op, a: join(address, sender, a), op, args)
                else:
                    reply = wire.answer(handler, op, args)
            self._send({**reply, "mac": sign(key, {"nonce": challenge, "answer": reply})})

        def _send(self, reply: dict[str, Any]) -> bool:
            try:
                self.request.settimeout(wire.READ_TIMEOUT)
                self.request.sendall(json.dumps(reply).encode() + b"\n")
                return True
            except OSError:
                return False

    with _Server((host, port), _Request) as server:
        if ready is not None:
            ready()
        server.serve_forever()


def _rekey(install: Callable[[bytes], str] | None, key: bytes, challenge: str, args: dict[str, Any]) -> Any:
    if install is None:
        raise wire.Failed("this node does not take keys over the cluster")
    if set(args) != {"key"} or not isinstance(args["key"], str) or not re.fullmatch(r"(?:[0-9a-f]{2}){32,4096}",
                                                                                     args["key"]):
        raise wire.Invalid("rekey: {key: sealed hex}")
    return {"fingerprint": install(unseal(key, challenge, args["key"]))}


def call(peer: Peer, keys: list[bytes], sender: str, op: str, args: dict[str, Any], *,
         timeout: float, answer_timeout: float | None = None, new_key: bytes | None = None,
         source: str | None = None) -> Any:
    """Ask PEER with the first of KEYS it takes (a member that missed a rotation still has
    the previous key); its result, or wire.RemoteError (it said no), or Unreachable. The
    connection and the challenge have TIMEOUT; the answer ANSWER_TIMEOUT (TIMEOUT if not
    given), counted from the start. NEW_KEY: the REKEY request, with the new key sealed to
    the connection. A PEER whose ObjectID is "*" is any node (JOIN). SOURCE: the address to
    ask from (else the kernel's choice)."""
    if not keys:
        raise ValueError("no key")
    for key in keys[:-1]:
        try:
            return _call(peer, key, sender, op, args, timeout=timeout, answer_timeout=answer_timeout,
                         new_key=new_key, source=source)
        except wire.RemoteError as e:
            if e.code != "denied":
                raise
    return _call(peer, keys[-1], sender, op, args, timeout=timeout, answer_timeout=answer_timeout, new_key=new_key,
                 source=source)


def _call(peer: Peer, key: bytes, sender: str, op: str, args: dict[str, Any], *,
          timeout: float, answer_timeout: float | None, new_key: bytes | None, source: str | None) -> Any:
    started = time.monotonic()
    deadline = started + (answer_timeout or timeout)
    where = f"node {peer.object_id} at {peer.address}:{peer.port}" if peer.object_id != "*" else \
        f"the node at {peer.address}:{peer.port}"
    bound = timeout  # the connection's and the challenge's, then the answer's
    try:
        with socket.create_connection((peer.address, peer.port), timeout=timeout,
                                      source_address=(source, 0) if source else None) as s:
            opening = _read_line(s, started + timeout, 1024)
            bound = deadline - started
            try:
                challenge = json.loads(opening)["challenge"]
                if not isinstance(challenge, str) or not CHALLENGE.fullmatch(challenge):
                    raise ValueError(challenge)
            except Exception:  # whatever came, it is not a challenge
                raise Unreachable(f"{where}: no challenge: not a CB-Manager of the cluster?") from None
            if new_key is not None:
                args = {"key": seal(key, challenge, new_key)}
            s.sendall(canonical(request(key, sender, peer.object_id, challenge, op, args)) + b"\n")
            data = _read_line(s, deadline, MAX_ANSWER)
    except TimeoutError:
        raise Unreachable(f"{where}: no answer within {bound:g} s") from None
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
            sign(key, {"nonce": challenge, "answer": answer}), mac):
        raise Unreachable(f"{where}: an answer not made with the cluster's key")
    if not answer.get("ok"):
        raise wire.RemoteError(str(answer.get("code", "failed")), f"{peer.object_id}: {answer.get('error')}")
    return answer.get("result")


def _read_line(s: socket.socket, deadline: float, limit: int) -> bytes:
    """One line (or what came before the connection closed), by DEADLINE; TimeoutError."""
    data = b""
    while not data.endswith(b"\n") and len(data) <= limit:
        s.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
