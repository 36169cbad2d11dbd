"""The cluster as CB-Manager sees it: the other management nodes, asked and answered over
cluster.py's authenticated protocol, and the key they share (keyring.py). CB-Manager's own
slots are manager.py's; this module only reaches across.

The member list lives on the node, beside CB-Manager's registry on its own volume: updates
and rollbacks keep it. The firmware's list (the profile's cluster.nodes) only seeds it on
the first start. Nodes join and leave at runtime (`cbios cluster join ADDRESS`, `leave`):
a node that holds the key asks any member to JOIN; that member takes it, tells the others
(MEMBER_ADD), and answers with the whole list."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cbios.node import cluster, contract, files
from cbios.node.cluster import keyring
from cbios.node.wire import Failed, Invalid, RemoteError

log = logging.getLogger("cbios")

# What another node's CB-Manager may ask of this one (never a firmware update nor a key
# rotation), and which of those only read: they get the cluster's bound for the whole answer.
PEER_OPS = {"hello", "images", "slots", "runtime", "start", "stop", "restart", "startall", "stopall",
            "install", "remove"}
PEER_QUERIES = {"hello", "images", "slots", "runtime"}
MEMBER_OPS = {"member_add", "member_remove"}  # the list's own, answered here (handle_peer), within the bound
PEER_WORK_TIMEOUT = 840  # work on another node's slot: under the `slot` CLI's own 900 s
MEMBERS_NAME = "cluster-members.json"  # beside the registry (registry.REGISTRY)
FORMAT = 1
CONNECT_TIMEOUT = 1.0  # a member on the management network accepts and challenges well within it

Rows = list[dict[str, Any]]


class Members:
    def __init__(self, node_id: str, inventory: dict[str, Any], keys: keyring.Keyring, path: Path) -> None:
        """INVENTORY: the firmware's cluster (port, bounds, the seed list); PATH: the list kept."""
        self.node_id = node_id
        self.port: int = inventory.get("port", 0)
        self.timeout: float = inventory.get("timeout", 5)
        # The connection's and the challenge's bound: never longer than the answer's.
        self.connect_timeout: float = min(inventory.get("connect_timeout", CONNECT_TIMEOUT), self.timeout)
        # This node's own address, where several nodes share a host (the bench, the unit tests):
        # it listens there alone, and asks from there. Unset, a node listens on all of its own.
        self.address: str | None = inventory.get("address")
        self.keys = keys
        self.path = path
        self.broken: str | None = None  # why the kept list cannot be read: it is then never written over
        self.lock = threading.Lock()
        self.peers: list[cluster.Peer] = self._load(inventory.get("nodes", []))  # replaced whole, never changed

    # -- the list --------------------------------------------------------------------

    def _load(self, seed: list[dict[str, Any]]) -> list[cluster.Peer]:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("not a member list of this format")
            return [self._peer(n["object_id"], n["address"]) for n in data["nodes"]]
        except FileNotFoundError:
            peers = [self._peer(n["object_id"], n["address"]) for n in seed if n["object_id"] != self.node_id]
            self._save(peers)
            log.info("cluster: %d members from the firmware's list, kept in %s", len(peers), self.path)
            return peers
        except (OSError, ValueError, KeyError, TypeError, Invalid) as e:  # never a guess at who is in the cluster
            self.broken = f"{self.path} is unreadable ({e}): no members until it is mended or removed"
            log.error("cluster: %s", self.broken)
            return []

    def _save(self, peers: list[cluster.Peer]) -> None:
        if self.broken:
            raise Failed(f"cluster: {self.broken}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        nodes = [{"object_id": p.object_id, "address": p.address} for p in peers]
        files.replace_path(self.path, (json.dumps({"format": FORMAT, "nodes": nodes}, indent=2) + "\n").encode(),
                           0o600)

    def _peer(self, object_id: Any, address: Any) -> cluster.Peer:
        if not isinstance(object_id, str) or not contract.OBJECT_ID.fullmatch(object_id):
            raise Invalid(f"{object_id!r} is not a node's ObjectID (11 digits)")
        return cluster.Peer(object_id, _address(address), self.port)

    def add(self, object_id: Any, address: Any, move: bool = True) -> bool:
        """OBJECT_ID at ADDRESS a member (its address replaced if it was one, unless not to
        MOVE it); False if it was one there already."""
        peer = self._peer(object_id, address)
        with self.lock:
            if (why := self._refused(peer, self.peers)) is not None:
                raise Invalid(why)
            if peer in self.peers:
                return False
            moved = next((p for p in self.peers if p.object_id == object_id), None)
            if moved is not None and not move:
                raise Invalid(f"{object_id} is a member at {moved.address}: it leaves there first "
                              "(`cbios cluster leave`)")
            self.peers = [p for p in self.peers if p.object_id != object_id] + [peer]
            self._save(self.peers)
        log.info("cluster: %s at %s is a member", object_id, address)
        return True

    def remove(self, object_id: Any) -> bool:
        with self.lock:
            kept = [p for p in self.peers if p.object_id != object_id]
            if len(kept) == len(self.peers):
                return False
            self.peers = kept
            self._save(kept)
        log.info("cluster: %s is no longer a member", object_id)
        return True

    def _refused(self, peer: cluster.Peer, peers: list[cluster.Peer]) -> str | None:
        """Why PEER cannot be a member beside PEERS: this node, or another with its slots' ids."""
        if peer.owns(self.node_id):
            return f"{peer.object_id} is this node"
        clash = next((p for p in peers if p.owns(peer.object_id) and p.object_id != peer.object_id), None)
        if clash is not None:
            return f"{peer.object_id}: node {clash.object_id} has the same first 8 digits (its slots' ids)"
        return None

    def replace(self, peers: list[cluster.Peer]) -> None:
        with self.lock:
            self.peers = peers
            self._save(peers)

    def owner(self, object_id: Any) -> cluster.Peer | None:
        """The other node OBJECT_ID (a node's or a slot's) belongs to; None for this node's."""
        if not isinstance(object_id, str) or not contract.OBJECT_ID.fullmatch(object_id):
            return None
        if object_id[:8] == self.node_id[:8]:
            return None
        return next((p for p in self.peers if p.owns(object_id)), None)

    def ask(self, peer: cluster.Peer, op: str, args: dict[str, Any], new_key: bytes | None = None) -> Any:
        """PEER's answer; Invalid (it said the request is wrong) or Failed (anything else)."""
        keys = self.keys.keys()
        if not keys:
            raise Failed(f"no cluster key on this node ({self.keys.shown}): set one with `cbios cluster set-key`")
        answer_timeout = self.timeout if op in PEER_QUERIES | MEMBER_OPS else PEER_WORK_TIMEOUT
        try:
            return cluster.call(peer, keys, self.node_id, op, args, timeout=self.connect_timeout,
                                answer_timeout=answer_timeout, new_key=new_key, source=self.address)
        except cluster.Unreachable as e:
            raise Failed(f"unreachable: {e}") from None
        except RemoteError as e:
            raise (Invalid if e.code == "invalid" else Failed)(str(e)) from None

    def slots(self, local: Callable[[], Rows], by_type: str | None) -> Rows:
        """LOCAL's rows and every other node's, asked at once: a node that does not answer
        within the cluster's bound is one row, UNREACHABLE."""
        with ThreadPoolExecutor(max_workers=len(self.peers) + 1) as pool:
            mine = pool.submit(local)
            asked = [(peer, pool.submit(self.ask, peer, "slots", {"object_id": peer.object_id, "by_type": by_type}))
                     for peer in self.peers]
            rows: Rows = mine.result()
            for peer, future in asked:
                try:
                    rows += future.result()
                except Invalid as e:
                    if by_type is None:  # by_type: that node's firmware has no such type, so no such slots
                        rows.append(_unreachable(peer, e))
                except Failed as e:
                    rows.append(_unreachable(peer, e))
        return rows

    def serve(self, handle_peer: Callable[[str, dict[str, Any]], Any], ready: Callable[[], None] | None = None) -> None:
        """Answer the other nodes' CB-Managers, and nodes that ask to join, until the process
        ends: with no key (yet), every request is refused until one is set."""
        if not self.port:
            return
        if not self.keys.keys():
            log.error("no cluster key at %s: refusing every node until `cbios cluster set-key`", self.keys.shown)
        log.info("cluster: answering %s on port %d",
                 ", ".join(sorted(p.object_id for p in self.peers)) or "nodes that join", self.port)
        try:
            cluster.serve(self.port, cluster.Verifier(self.keys.keys, self.node_id,
                                                      lambda: {p.object_id for p in self.peers}),
                          lambda op, args: self.handle_peer(handle_peer, op, args),
                          lambda: {p.address for p in self.peers}, host=self.address or "0.0.0.0",
                          rekey=self.install_key, join=self.accept_join, ready=ready)
        except OSError as e:
            log.error("cluster: cannot listen on port %d: %s", self.port, e)

    def handle_peer(self, handle_peer: Callable[[str, dict[str, Any]], Any], op: str, args: dict[str, Any]) -> Any:
        """A member's request: the list's own, or CB-Manager's (HANDLE_PEER)."""
        if op == "member_add":
            return {"added": self.add(args.get("object_id"), args.get("address"))}
        if op == "member_remove":
            return {"removed": self.remove(args.get("object_id"))}
        return handle_peer(op, args)

    # -- joining and leaving ---------------------------------------------------------

    def accept_join(self, address: str, sender: str, args: dict[str, Any]) -> dict[str, Any]:
        """SENDER, a holder of the key at ADDRESS, asks to be a member: taken, the others told
        (at once, each with its bound), and the whole list its answer."""
        if args.get("object_id") != sender or set(args) != {"object_id"}:
            raise Invalid("join: {object_id: the joining node's own}")
        self.add(sender, address, move=False)  # a key holder never takes over another node's place
        others = [p for p in self.peers if p.object_id != sender]
        told = self._tell(others, "member_add", {"object_id": sender, "address": address})
        return {"node": self.node_id, "members": [{"object_id": p.object_id, "address": p.address}
                                                  for p in others], "told": told}

    def join(self, address: str) -> Rows:
        """This node into the cluster of the node at ADDRESS: its list becomes that node's."""
        address = _address(address)
        keys = self.keys.keys()
        if not keys:
            raise Failed(f"no cluster key on this node ({self.keys.shown}): set the cluster's with "
                         "`cbios cluster set-key` first")
        try:
            answer = cluster.call(cluster.Peer("*", address, self.port), keys, self.node_id, cluster.JOIN,
                                  {"object_id": self.node_id}, timeout=self.connect_timeout,
                                  answer_timeout=self.timeout * 3, source=self.address)
        except (cluster.Unreachable, RemoteError) as e:
            raise Failed(f"cannot join: {e}") from None
        try:
            listed = [self._peer(answer["node"], address)] + [
                self._peer(n["object_id"], n["address"]) for n in answer["members"]]
        except (KeyError, TypeError, Invalid) as e:
            raise Failed(f"cannot join: the answer of {address} is not a member list ({e})") from None
        peers: list[cluster.Peer] = []
        for peer in listed:  # as add() takes them
            if self._refused(peer, peers) is None and peer.object_id not in {p.object_id for p in peers}:
                peers.append(peer)
        self.replace(peers)
        log.info("cluster: joined %s's cluster of %d nodes", answer["node"], len(peers) + 1)
        return [{"node": answer["node"], "address": address, "status": "JOINED"}, *answer.get("told", [])]

    def leave(self) -> Rows:
        """Every member told this node is gone (at once, each with its bound), and dropped
        from its list. A member that was not reached stays in it: `cbios cluster leave` again,
        once it is back, tells it too."""
        if not self.peers:
            raise Invalid("this node is in no cluster")
        rows = self._tell(list(self.peers), "member_remove", {"object_id": self.node_id})
        missed = {r["node"] for r in rows if r["status"] != "TOLD"}
        self.replace([p for p in self.peers if p.object_id in missed])
        return rows

    def members(self) -> Rows:
        """This node and every member, each asked 'hello' at once with its bound."""
        return [{"node": self.node_id, "address": "-", "status": "THIS NODE"},
                *self._tell(list(self.peers), "hello", {}, ("REACHABLE", "UNREACHABLE"))]

    def _tell(self, peers: list[cluster.Peer], op: str, args: dict[str, Any],
              statuses: tuple[str, str] = ("TOLD", "MISSED")) -> Rows:
        """PEERS asked OP at once, each with its bound: a row each, its status STATUSES[0]
        if it answered, else STATUSES[1] and why."""
        rows = []
        with ThreadPoolExecutor(max_workers=max(len(peers), 1)) as pool:
            asked = [(p, pool.submit(self.ask, p, op, args)) for p in peers]
            for peer, future in asked:
                try:
                    future.result()
                    rows.append({"node": peer.object_id, "address": peer.address, "status": statuses[0]})
                except (Failed, Invalid) as e:
                    rows.append({"node": peer.object_id, "address": peer.address, "status": statuses[1],
                                 "error": str(e).removeprefix("unreachable: ")})
        return rows

    def install_key(self, key: bytes) -> str:
        try:
            fingerprint = self.keys.install(key)
        except keyring.BadKey as e:
            raise Invalid(str(e)) from None
        log.info("cluster: new key %s", fingerprint)
        return fingerprint

    def rotate_key(self) -> Rows:
        """A new cluster key: to every member first (signed with the key it holds), then to
        this node. A member that does not take it keeps the old key, which every node that
        did keeps as its previous one: the next rotation reaches it."""
        if not self.peers:
            raise Invalid("this node is in no cluster: no key to rotate")
        if not self.keys.keys():
            raise Failed(f"no cluster key on this node ({self.keys.shown}): set one with `cbios cluster set-key`")
        new = keyring.new_key()
        rows = []
        with ThreadPoolExecutor(max_workers=min(len(self.peers), 16)) as pool:
            asked = [(p, pool.submit(self.ask, p, cluster.REKEY, {}, new)) for p in self.peers]
            for peer, future in asked:
                try:
                    rows.append({"node": peer.object_id, "status": "ROTATED",
                                 "fingerprint": future.result()["fingerprint"]})
                except (Failed, Invalid) as e:
                    rows.append({"node": peer.object_id, "status": "KEPT", "error": str(e)})
        rows.insert(0, {"node": self.node_id, "status": "ROTATED", "fingerprint": self.install_key(new)})
        return rows


def _address(address: Any) -> str:
    try:
        if isinstance(address, str) and str(ipaddress.IPv4Address(address)) == address:
            return address
    except ValueError:
        pass
    raise Invalid(f"{address!r} is not an IPv4 address")


def _unreachable(peer: cluster.Peer, why: Exception) -> dict[str, Any]:
    log.warning("%s", why)
    return {"parent": peer.object_id, "location": peer.object_id, "type": "-", "version": "",
            "ip": peer.address, "hostname": "", "status": "UNREACHABLE",
            "description": str(why).removeprefix("unreachable: ")}
