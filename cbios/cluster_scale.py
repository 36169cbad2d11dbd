"""The cluster at scale, measured: `slot show` and `slot show --by-type=sysmon` over a cluster
of many management nodes, some of them down, on this machine.

Every peer is a process of its own running the project's cluster code (cluster.serve through
Members.serve, the key, the challenge, the MAC), listening on a loopback address of its own
(127.0.1.N), with a CB-Manager's answers to `slots` (eight slots, one of them a sysmon). The
node that asks is a Members of this process, with every peer in its list, asking from
127.0.2.1 as `slot show` does (Members.slots). A node that is down is a peer stopped with
SIGSTOP: the kernel still takes its connections, and no challenge ever comes, so that it
costs the asking node its whole connection bound (cluster.connect_timeout) rather than a
refusal at once. Figures, never assertions."""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cbios import ports
from cbios.errors import StepError
from cbios.node import contract
from cbios.node.cluster import keyring, members

log = logging.getLogger("cbios")

PORT = 7475
ASKER_ID, ASKER_ADDRESS = "39999999010", "127.0.2.1"
SLOT_TYPES = [contract.MANAGER_TEMPLATE, "dhcp", "dns_master", "sysmon", "service", "service", "compute", "boot-server"]
START_TIMEOUT = 60.0
RUNS = 5


def peer_id(i: int) -> str:
    return f"3{i:07d}010"


def peer_address(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def peer_rows(node_id: str, by_type: str | None) -> list[dict[str, Any]]:
    """What a CB-Manager answers to `slots`: its slots, or those of one type."""
    rows = [{"parent": node_id, "location": f"{node_id[:8]}{eid}75", "type": kind, "version": "1.0",
             "ip": f"10.0.249.{eid}", "hostname": kind, "status": "ON", "description": ""}
            for eid, kind in enumerate(SLOT_TYPES)]
    return [r for r in rows if by_type is None or r["type"] == by_type]


def peer_main(node_id: str, address: str, port: str, key: str, work: str) -> None:
    """One peer: the cluster code answering the asking node, until SIGTERM."""
    inventory = {"port": int(port), "timeout": 5, "address": address,
                 "nodes": [{"object_id": ASKER_ID, "address": ASKER_ADDRESS}]}
    cluster = members.Members(node_id, inventory, keyring.Keyring(Path(key)), Path(work) / f"{node_id}.json")

    def handle(op: str, args: dict[str, Any]) -> Any:
        if op == "slots":
            return peer_rows(node_id, args.get("by_type"))
        return {"node": node_id}

    cluster.serve(handle)


def _start_peers(count: int, port: int, key: Path, work: Path) -> list[subprocess.Popen[bytes]]:
    code = "import sys; from cbios.cluster_scale import peer_main; peer_main(*sys.argv[1:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, peer_id(i), peer_address(i), str(port), str(key),
                               str(work)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(count)]
    started = time.monotonic()
    try:
        for i, proc in enumerate(procs):
            ports.wait_listening(proc, port, START_TIMEOUT - (time.monotonic() - started), f"peer {peer_id(i)}",
                                 address=peer_address(i))
    except StepError:
        _stop(procs)
        raise
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a stopped one takes its SIGTERM only once it runs
    for proc in procs:
        ports.end(proc)


def _timed(asker: members.Members, by_type: str | None, runs: int) -> dict[str, Any]:
    seconds, rows = [], []
    for _ in range(runs):
        started = time.monotonic()
        rows = asker.slots(lambda: peer_rows(ASKER_ID, by_type), by_type)
        seconds.append(time.monotonic() - started)
    return {"median_s": round(statistics.median(seconds), 3), "max_s": round(max(seconds), 3),
            "rows": len(rows), "unreachable_rows": sum(1 for r in rows if r["status"] == "UNREACHABLE")}


def measure(count: int = 100, unreachable: int = 10, runs: int = RUNS, port: int = PORT) -> dict[str, Any]:
    """Both listings over COUNT peers, all up, then with UNREACHABLE of them down."""
    with tempfile.TemporaryDirectory(prefix="cbios-cluster-scale-") as tmp:
        work = Path(tmp)
        key = work / "cluster.key"
        key.write_bytes(keyring.new_key())
        os.chmod(key, 0o600)
        procs = _start_peers(count, port, key, work)
        try:
            inventory = {"port": port, "timeout": 5, "address": ASKER_ADDRESS,
                         "nodes": [{"object_id": peer_id(i), "address": peer_address(i)} for i in range(count)]}
            asker = members.Members(ASKER_ID, inventory, keyring.Keyring(key), work / "asker.json")
            figures: dict[str, Any] = {"members": count, "connect_timeout_s": asker.connect_timeout,
                                       "answer_timeout_s": asker.timeout}
            for state in ("all_reachable", f"{unreachable}_unreachable"):
                if state != "all_reachable":
                    for proc in procs[-unreachable:]:
                        proc.send_signal(signal.SIGSTOP)
                figures[state] = {"slot_show": _timed(asker, None, runs),
                                  "slot_show_by_type_sysmon": _timed(asker, "sysmon", runs)}
                log.info("  %s: %s", state, json.dumps(figures[state]))
        finally:
            _stop(procs)
    return figures


def run_scale(count: int, unreachable: int, out: Path) -> dict[str, Any]:
    log.info("‣ The cluster at scale: %d peers (processes on 127.0.1.x), %d of them down", count, unreachable)
    figures = measure(count, unreachable)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    log.info("‣ Written: %s", out)
    return figures
