"""The cluster as CB-Manager sees it: the other management nodes of its inventory, asked
and answered over cluster.py's authenticated protocol, and the key they share
(keyring.py). CB-Manager's own slots are manager.py's; this module only reaches across."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cbios.node import cluster
from cbios.node.cluster import keyring
from cbios.node.wire import Failed, Invalid, RemoteError

log = logging.getLogger("cbios")

# What another node's CB-Manager may ask of this one (never a firmware update nor a key
# rotation), and which of those only read: they get the cluster's bound for the whole answer.
PEER_OPS = {"hello", "images", "slots", "runtime", "start", "stop", "restart", "startall", "stopall",
            "install", "remove"}
PEER_QUERIES = {"hello", "images", "slots", "runtime"}
PEER_WORK_TIMEOUT = 840  # work on another node's slot: under the `slot` CLI's own 900 s

Rows = list[dict[str, Any]]


class Members:
    def __init__(self, node_id: str, inventory: dict[str, Any], keys: keyring.Keyring) -> None:
        self.node_id = node_id
        self.peers = [cluster.Peer(n["object_id"], n["address"], inventory["port"]) for n in inventory.get("nodes", [])]
        self.port: int = inventory.get("port", 0)
        self.timeout: float = inventory.get("timeout", 5)
        self.keys = keys

    def owner(self, object_id: Any) -> cluster.Peer | None:
        """The other node OBJECT_ID (a node's or a slot's) belongs to; None for this node's."""
        if not isinstance(object_id, str) or not re.fullmatch(r"\d{11}", object_id):
            return None
        if object_id[:8] == self.node_id[:8]:
            return None
        return next((p for p in self.peers if p.owns(object_id)), None)

    def ask(self, peer: cluster.Peer, op: str, args: dict[str, Any], new_key: bytes | None = None) -> Any:
        """PEER's answer; Invalid (it said the request is wrong) or Failed (anything else)."""
        keys = self.keys.keys()
        if not keys:
            raise Failed(f"no cluster key on this node ({self.keys.shown}): set one with `cbios cluster set-key`")
        answer_timeout = self.timeout if op in PEER_QUERIES else PEER_WORK_TIMEOUT
        try:
            return cluster.call(peer, keys, self.node_id, op, args, timeout=self.timeout,
                                answer_timeout=answer_timeout, new_key=new_key)
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

    def serve(self, handle_peer: Callable[[str, dict[str, Any]], Any]) -> None:
        """Answer the other nodes' CB-Managers until the process ends: with no key (yet),
        every request is refused until one is set."""
        if not self.peers:
            return
        if not self.keys.keys():
            log.error("cluster of %d nodes but no key at %s: refusing them until `cbios cluster set-key`",
                      len(self.peers) + 1, self.keys.shown)
        members = {p.object_id for p in self.peers}
        log.info("cluster: answering %s on port %d", ", ".join(sorted(members)), self.port)
        try:
            cluster.serve(self.port, cluster.Verifier(self.keys.keys, self.node_id, members),
                          handle_peer, {p.address for p in self.peers}, rekey=self.install_key)
        except OSError as e:
            log.error("cluster: cannot listen on port %d: %s", self.port, e)

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


def _unreachable(peer: cluster.Peer, why: Exception) -> dict[str, Any]:
    log.warning("%s", why)
    return {"parent": peer.object_id, "location": peer.object_id, "type": "-", "version": "",
            "ip": peer.address, "hostname": "", "status": "UNREACHABLE",
            "description": str(why).removeprefix("unreachable: ")}
