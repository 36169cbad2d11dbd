"""`slot`: the node's slots from the command line, as the source document has it.

A client of CB-Manager (manager.py); the same on the node and in CB-Manager's container.
Tables have the document's columns; --json gives the same rows for scripts. Exit status:
0 done, 1 the work failed (a slot that will not become healthy), 2 a bad request (an
unknown ObjectID or slot type), 3 CB-Manager does not answer."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from cbios.node import contract, pipes, wire

HELP = """\
slot: the slots of the management nodes, run by each node's CB-Manager.

A slot is a service in a container of its own (lxc-service: an application container
sharing CBIOS; lxc-system: a whole system in a container), on LVM volumes of its own,
/dev/mapper/<vg>-slot<eid>-<iid>. Slots are named by ObjectID: the node's ObjectID
without its last three digits, the slot's number (eid), then 75: node 31000040010,
slot 2 -> 31000040275. CB-Manager itself is slot 0.

Without a node's ObjectID, list and show cover every management node of the cluster
(the firmware's inventory): each is asked at once, and one that does not answer within
the cluster's bound is a row of its own, UNREACHABLE. Every command takes the ObjectID
of another node's slot too: its CB-Manager does the work (authenticated with the
cluster's key).

  slot image list                      the images: compute-node firmware in CB-Manager's store,
                                       and the slot templates this firmware carries
  slot image add FILE|URL              a signed release (`cbios release`) of a compute profile
                                       into the store, for the boot-server slots to serve
  slot image remove NAME VERSION       an image out of the store
  slot list [<node ObjectID>]          the slots: ParentID Location Type Status
  slot show [<node ObjectID>]          the slots in detail: ParentID Location Type Version
                                       IP Hostname Status Description
  slot show --by-type=TYPE             the slots of one type
  slot show-runtime <slot ObjectID>    state, process, network, volumes, health of a slot
  slot start <slot ObjectID>           start a slot (waits until its health check passes)
  slot stop <slot ObjectID>            stop a slot (its halt signal, then a kill after 30 s)
  slot restart <slot ObjectID>         stop, then start
  slot startall <node ObjectID>        start every slot of the node
  slot stopall <node ObjectID>         stop every slot of the node (not CB-Manager)
  slot install TYPE [<slot ObjectID>] [--address A.B.C.D/N] [--hostname NAME]
               [--param KEY=VALUE]... [--no-autostart] [--no-start]
                                       make a slot from an image: volumes, container, start
  slot remove <slot ObjectID>          stop a slot and delete it, its volumes with it

Status: ON (running, health check passing), OFF (stopped), FAILED (would not start, or
its health check fails); UNREACHABLE: a node that did not answer. Every command takes --json.

Exit status: 0 done; 1 the work failed, or a node did not answer (the others are listed);
2 a bad request (unknown ObjectID, slot type or option); 3 CB-Manager does not answer.
"""

COLUMNS = {
    "show": [("ParentID", "parent"), ("Location", "location"), ("Type", "type"), ("Version", "version"),
             ("IP", "ip"), ("Hostname", "hostname"), ("Status", "status"), ("Description", "description")],
    "list": [("ParentID", "parent"), ("Location", "location"), ("Type", "type"), ("Status", "status")],
    "image": [("Image", "image"), ("Kind", "type"), ("Version", "version"), ("Date", "date"), ("Size", "size"),
              ("Signed-by", "signed_by"), ("Description", "description")],
}


URL_TIMEOUT = 30  # a read of a release from a URL


class Usage(Exception):
    pass


def table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> str:
    widths = [max([len(h), *(len(str(r.get(k, ""))) for r in rows)]) for h, k in columns]
    lines = []
    for cells in [[h for h, _ in columns], *([str(r.get(k, "")) for _, k in columns] for r in rows)]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def runtime_text(info: dict[str, Any]) -> str:
    health = info.get("health") or {}
    rows = [
        ("ObjectID", info["location"]), ("ParentID", info["parent"]), ("Type", info["type"]),
        ("Kind", info["kind"]), ("Architecture", info.get("architecture") or "-"), ("Version", info["version"]),
        ("Status", info["status"]),
        ("State", info["state"]), ("PID", info.get("pid") or "-"),
        ("Hostname", info.get("hostname") or "-"), ("Address", info.get("address") or "-"),
        *([("Root", f"the node's root (privileged: {info['privileged']})" if info.get("privileged")
            else f"node id {info['root_ids']} (a user namespace of its own)")] if "root_ids" in info else []),
        ("Interface", f"eth0 <-> {info['veth']} on {info['bridge']}" if info.get("veth")
         else f"eth0 ({info['mac']}) <-> {info['tap']} on {info['bridge']}" if info.get("tap") else "-"),
        ("IPs", " ".join(info.get("ips") or []) or "-"),
        ("CPU time", f"{info['cpu_seconds']:.2f} s" if info.get("cpu_seconds") is not None else "-"),
        ("Memory", f"{info['memory_bytes'] / (1 << 20):.1f} MiB" if info.get("memory_bytes") else "-"),
        ("Health", ("passing" if health.get("ok") else "failing") + (f": {health['output']}"
                                                                     if health.get("output") else "")
         if health else "-"),
    ]
    if info.get("kind") == "kvm-system":  # the VM: what QEMU was given, and how it runs
        rows[8:9] = [("PID", f"{info['pid']} (qemu-system-x86_64, {info['unit']})" if info.get("pid") else "-"),
                     ("vCPUs", str(info["vcpus"])), ("VM memory", f"{info['memory_mib']} MiB"),
                     ("Acceleration", info["accel"].upper())]
    if info.get("error"):
        rows.append(("Error", info["error"]))
    for vol in info.get("volumes", []):
        size = _mib(vol["size"]) if vol.get("size") else "missing"
        rows.append((f"Volume {vol['volume']}", f"{vol['device']} {size} on {vol['mount']}"))
    rows.append(("Console log", info.get("console_log", "-")))
    if "receipts" in info:  # a boot server: what each node it booted said last
        rows += [(f"Receipt {r.get('mac', '?')}", receipt_text(r)) for r in info["receipts"]] or [("Receipts", "none")]
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k.ljust(width)}  {v}\n" for k, v in rows)


def receipt_text(r: dict[str, str]) -> str:
    size = f", {int(r['bytes_received']) / (1 << 20):.1f} MiB received" if r.get("bytes_received", "").isdigit() else ""
    took = f" in {r['seconds']} s" if r.get("seconds") else ""
    text = (f"{r.get('result', '?')} {r.get('mode', '?')} {r.get('profile', '?')} {r.get('version', '?')}"
            f" at {r.get('finished', '?')}{took}{size}")
    return text + (f": {r['reason']}" if r.get("reason") else "")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slot", add_help=False, usage="slot COMMAND ... (slot help)")
    p.add_argument("--json", action="store_true")
    p.add_argument("words", nargs="*")
    p.add_argument("--by-type", dest="by_type")
    p.add_argument("--address")
    p.add_argument("--hostname")
    p.add_argument("--param", action="append", default=[])
    p.add_argument("--no-autostart", action="store_true")
    p.add_argument("--no-start", action="store_true")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("-h", "--help", action="store_true")
    return p


def _ask(op: str, upload: int | None = None, **args: Any) -> Any:
    return wire.call(contract.MANAGER_SOCKET, op, {k: v for k, v in args.items() if v is not None}, timeout=900,
                     upload=upload)


def _one(words: list[str], command: str, what: str) -> str:
    if len(words) != 1:
        raise Usage(f"slot {command} takes one {what} ObjectID (slot help)")
    return words[0]


def run(args: argparse.Namespace) -> int:
    words = list(args.words)
    if args.help or not words or words[0] == "help":
        sys.stdout.write(HELP)
        return 0
    command, rest = words[0], words[1:]
    out: Any
    text: str
    unreachable: list[dict[str, Any]] = []
    if command == "image":
        out, text = _image(rest)
    elif command in ("list", "show"):
        if len(rest) > 1:
            raise Usage(f"slot {command} [<node ObjectID>]")
        out = _ask("slots", object_id=rest[0] if rest else None, by_type=args.by_type)
        text = table(COLUMNS[command], out)
        unreachable = [row for row in out if row.get("status") == "UNREACHABLE"]
        for row in unreachable:
            print(f"slot: node {row['location']} unreachable: {row.get('description')}", file=sys.stderr)
    elif command == "show-runtime":
        out = _ask("runtime", object_id=_one(rest, command, "slot"))
        text = runtime_text(out)
    elif command in ("start", "stop", "restart"):
        started = time.monotonic()
        out = _ask(command, object_id=_one(rest, command, "slot"))
        text = f"{out['location']} {out['type']}: {out['status']} ({time.monotonic() - started:.1f} s)\n"
    elif command in ("startall", "stopall"):
        out = _ask(command, object_id=_one(rest, command, "node"))
        text = table(COLUMNS["list"], out)
    elif command == "install":
        if not 1 <= len(rest) <= 2:
            raise Usage("slot install TYPE [<slot ObjectID>] [--address A.B.C.D/N] [--hostname NAME]")
        params = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep:
                raise Usage(f"--param {item}: KEY=VALUE")
            params[key] = value
        out = _ask("install", template=rest[0], object_id=rest[1] if len(rest) > 1 else None,
                   address=args.address, hostname=args.hostname, params=params or None,
                   autostart=not args.no_autostart, start=not args.no_start)
        text = table(COLUMNS["show"], [out])
    elif command == "remove":
        out = _ask("remove", object_id=_one(rest, command, "slot"))
        text = f"{out['location']} {out['type']}: removed, with its volumes\n"
    elif command == "wait-ready":
        return _wait_ready(args.timeout)
    else:
        raise Usage(f"unknown command '{command}' (slot help)")
    sys.stdout.write(json.dumps(out, indent=2) + "\n" if args.json else text)
    return 1 if command in ("list", "show") and unreachable else 0


IMAGE_USAGE = "slot image list | add FILE|URL | remove NAME VERSION"


def _image(rest: list[str]) -> tuple[Any, str]:
    verb, words = (rest[0], rest[1:]) if rest else ("", [])
    if verb == "list" and not words:
        out = _ask("images")
        return out, table(COLUMNS["image"], [{**r, "size": _mib(r.get("size"))} for r in out])
    if verb == "add" and len(words) == 1:
        out = _add(words[0])
        done = "already in the store" if out["already"] else "stored"
        return out, (f"{out['image']} {out['version']}: {done} ({_mib(out['size'])}, signed by {out['signed_by']}, "
                     f"root {out['root_sha256'][:12]})\n")
    if verb == "remove" and len(words) == 2:
        out = _ask("image_remove", image=words[0], version=words[1])
        return out, f"{out['image']} {out['version']}: removed from the store\n"
    raise Usage(IMAGE_USAGE)


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / (1 << 20):.0f} MiB"


def _add(source: str) -> Any:
    """SOURCE opened here, with this caller's access, and handed to CB-Manager to read: a
    file as it is; a URL through a pipe that a thread here fills as CB-Manager reads."""
    if not re.match(r"^https?://", source):
        try:
            with open(source, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise Usage(f"{source}: not a file (a release from 'cbios release')")
                return _ask("image_add", where=os.path.abspath(source), upload=f.fileno())
        except OSError as e:
            raise Usage(f"{source}: {e.strerror or e}") from None
    try:
        response = urllib.request.urlopen(source, timeout=URL_TIMEOUT)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        raise Usage(f"{source}: {getattr(e, 'reason', None) or e}") from None
    broke: list[str] = []
    read_end, write_end = os.pipe()

    def pump() -> None:
        try:
            with response, open(write_end, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except (OSError, http.client.HTTPException) as e:  # CB-Manager stopped reading, or the server
            broke.append(str(e))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        return _ask("image_add", where=source, upload=read_end)
    except wire.RemoteError as e:
        if broke:
            raise wire.RemoteError(e.code, f"{e} (the download broke off: {broke[0]})") from None
        raise
    finally:
        os.close(read_end)


def _wait_ready(timeout: int) -> int:
    """For the node's health gate: until CB-Manager is up and every autostart slot is ON."""
    deadline = time.monotonic() + timeout
    last = "CB-Manager does not answer"
    while time.monotonic() < deadline:
        try:
            state = _ask("ready")
            if state["ready"]:
                print("slots ready")
                return 0
            if state.get("failed"):  # final: no use waiting out the bound
                print(f"slots failed: {'; '.join(state['failed'])}", file=sys.stderr)
                return 1
            last = "waiting for " + ", ".join(state["waiting"]) if state["waiting"] else "CB-Manager starting"
        except (OSError, wire.RemoteError) as e:
            last = f"CB-Manager does not answer ({e})"
        time.sleep(1)
    print(f"slots not ready after {timeout} s: {last}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = pipes.parsed(lambda: parser.parse_intermixed_args(argv))
        return pipes.quietly(lambda: run(args))
    except Usage as e:
        print(f"slot: {e}", file=sys.stderr)
        return 2
    except wire.RemoteError as e:
        print(f"slot: {e}", file=sys.stderr)
        return 2 if e.code == "invalid" else 1
    except OSError as e:
        print(f"slot: CB-Manager does not answer on {contract.MANAGER_SOCKET}: {e.strerror or e}", file=sys.stderr)
        return 3
    except SystemExit as e:  # argparse's own errors
        return 2 if e.code else 0


if __name__ == "__main__":
    sys.exit(main())
