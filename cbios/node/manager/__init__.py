"""CB-Manager: the node's slots, from a service in a container (slot 0).

It owns the registry (registry.py) and the catalogue of templates baked into the
firmware, and installs, removes, starts and stops slots. It does no privileged work
itself: that is asked of CB-Executor over the socket bound into its container. The
`slot` CLI talks to it over /run/cbios/manager/manager.sock (the same path on the node
and in the container)."""

from __future__ import annotations

import ipaddress
import logging
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cbios.node import contract, slotparams, wire
from cbios.node.cluster import keyring, members
from cbios.node.manager import registry, store
from cbios.node.wire import Failed, Invalid, RemoteError

log = logging.getLogger("cbios")
Executor = Callable[..., Any]
MONITOR_PERIOD = 15.0


EXECUTOR_TIMEOUT = 600
UPDATE_TIMEOUT = 1800  # a firmware update writes a whole copy: minutes under TCG


def executor_client(op: str, **args: Any) -> Any:
    timeout = UPDATE_TIMEOUT if op == "firmware.update" else EXECUTOR_TIMEOUT
    try:
        return wire.call(contract.EXECUTOR_SOCKET, op, args, timeout=timeout)
    except RemoteError as e:
        raise (Invalid if e.code == "invalid" else Failed)(str(e)) from None
    except OSError as e:
        raise Failed(f"CB-Executor does not answer: {e}") from None


def slot_env(entry: dict[str, Any], config: dict[str, Any]) -> str:
    """The slot's own settings, as a shell file its run and health scripts source."""
    values = {
        "SLOT_EID": str(entry["eid"]),
        "SLOT_OBJECT_ID": entry["object_id"],
        "SLOT_TEMPLATE": entry["template"],
        "SLOT_ADDRESS": entry.get("address") or "",
        "SLOT_HOSTNAME": entry.get("hostname") or "",
        "SLOT_NODE": config["node"]["object_id"],
        "SLOT_DOMAIN": config.get("domain", ""),
        **{f"SLOT_PARAM_{k.upper()}": v for k, v in sorted(entry.get("params", {}).items())},
    }
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def _checked_params(template: str, declared: dict[str, dict[str, str]], given: dict[str, str]) -> dict[str, str]:
    """The slot's parameters: the template's defaults, and GIVEN checked against the types it
    declares (slotparams.py); Invalid naming the first one that is not."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise Invalid(f"{template} has no parameter {', '.join(unknown)} (has: "
                      f"{', '.join(sorted(declared)) or 'none'})")
    values = {k: p["default"] for k, p in declared.items()}
    for key, value in given.items():
        try:
            values[key] = slotparams.check(declared[key]["type"], declared[key]["default"], value)
        except ValueError as e:
            raise Invalid(f"--param {key}: '{value}' is not {e}") from None
    return values


def _boot_choices(params: dict[str, str]) -> dict[str, slotparams.BootChoice]:
    """What a boot-server slot's params boot: {node (or 'default'): choice}."""
    nodes, default = slotparams.boot_params(params)
    return {**nodes, **({"default": default} if default else {})}


def env_path(kind: str) -> str:
    """Where slot.env goes in volume 0: the slot's /var, or its own root's /etc."""
    return "slot.env" if kind == "lxc-service" else "etc/cbios/slot.env"


class Manager:
    def __init__(self, config: dict[str, Any], catalogue: dict[str, dict[str, Any]],
                 executor: Executor = executor_client, registry_path: Any = registry.REGISTRY,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 cluster_key: Path = contract.MANAGER_SECRETS / contract.CLUSTER_KEY.name,
                 image_store: Path = contract.IMAGE_STORE, update_key: Path = contract.UPDATE_KEY) -> None:
        self.config = config
        self.node_id: str = config["node"]["object_id"]
        self.catalogue = catalogue
        self.ex = executor
        self.registry_path = registry_path
        self.slots: dict[int, dict[str, Any]] = {}
        self.health: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, str] = {}
        self.reconciled = False
        self.lock = threading.RLock()
        self.clock = clock
        self.sleep = sleep
        self.store = image_store
        self.update_key = update_key
        self.store_lock = threading.Lock()  # one release unpacked at a time: the volume's room is checked once
        self.cluster = members.Members(self.node_id, config.get("cluster", {}), keyring.Keyring(cluster_key),
                                       Path(registry_path).with_name(members.MEMBERS_NAME))

    # -- startup -------------------------------------------------------------------

    def start(self) -> None:
        """Load the registry (or make it from the firmware's slots on the first start),
        refresh every slot's definition, and start the autostart ones."""
        with self.lock:
            loaded = registry.load(self.registry_path)
            if loaded is None:
                log.info("no registry: first start, slots from the firmware")
                self.slots = {s["eid"]: self.entry_for(s) for s in self.config["slots"]}
                registry.save(self.slots, self.registry_path)
            else:
                self.slots = loaded
            states = self._states()
            for eid, entry in sorted(self.slots.items()):
                if eid == contract.MANAGER_EID:
                    continue
                try:
                    if states.get(eid) != "RUNNING":
                        self.provision(entry)
                        if entry["autostart"]:
                            self._start(eid)
                except (Invalid, Failed) as e:
                    self.failed[eid] = str(e)
                    log.error("slot %s: %s", entry["object_id"], e)
            self.reconciled = True
            log.info("slots ready: %s", ", ".join(f"{r['location']} {r['status']}" for r in self.rows()))

    def entry_for(self, s: dict[str, Any]) -> dict[str, Any]:
        return {"eid": s["eid"], "object_id": contract.slot_object_id(self.node_id, s["eid"]),
                "template": s["template"], "address": s.get("address"), "hostname": s.get("hostname"),
                "autostart": s.get("autostart", True), "volumes": s["volumes"], "params": s.get("params", {}),
                **({"limits": s["limits"]} if s.get("limits") else {})}

    def provision(self, entry: dict[str, Any]) -> None:
        """Volumes (made and filled if missing or blank), slot.env, container definition."""
        eid, template = entry["eid"], entry["template"]
        tpl = self._template(template)
        existing = {v["volume"] for v in self.ex("volume.list")}
        for vol in entry["volumes"]:
            name = contract.volume_name(eid, vol["iid"])
            if name not in existing:
                self.ex("volume.create", volume=name, size=vol["size"])
            self.ex("volume.write", volume=name, template=template, if_blank=True)
        self.ex("volume.put", volume=contract.volume_name(eid, 0), path=env_path(tpl["type"]),
                content=slot_env(entry, self.config))
        limits = entry.get("limits") or tpl.get("limits") or {}
        self.ex("container.define", eid=eid, template=template, hostname=entry.get("hostname"),
                address=entry.get("address"), volumes=[v["iid"] for v in entry["volumes"]], **limits)

    # -- requests ------------------------------------------------------------------

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        """A request from this node (the `slot` CLI): a slot or node of another node's goes there."""
        peer = self.cluster.owner(args.get("object_id"))
        if peer is not None:
            if op not in members.PEER_OPS:
                raise Invalid(f"'{op}' is not asked of another node")
            return self.cluster.ask(peer, op, args)
        if op == "slots" and args.get("object_id") is None and self.cluster.peers:
            by_type = args.get("by_type")
            if by_type is not None:
                self._template(by_type)
            return self.cluster.slots(lambda: self.op_slots(by_type=by_type), by_type)
        return self.handle_local(op, args)

    def handle_peer(self, op: str, args: dict[str, Any]) -> Any:
        """A request from another node's CB-Manager (authenticated): about this node only."""
        if op not in members.PEER_OPS:
            raise Invalid(f"'{op}' is not asked over the cluster")
        if op == "slots" and args.get("object_id") is None:
            args = {**args, "object_id": self.node_id}
        return self.handle_local(op, args)

    def handle_local(self, op: str, args: dict[str, Any]) -> Any:
        handlers: dict[str, Callable[..., Any]] = {
            "hello": self.op_hello, "images": self.op_images, "slots": self.op_slots,
            "runtime": self.op_runtime, "start": self.op_start, "stop": self.op_stop,
            "restart": self.op_restart, "startall": self.op_startall, "stopall": self.op_stopall,
            "install": self.op_install, "remove": self.op_remove, "ready": self.op_ready,
            "update": self.op_update, "rotate_key": self.op_rotate_key,
            "cluster_join": self.cluster.join, "cluster_leave": self.cluster.leave,
            "cluster_members": self.cluster.members,
            "image_add": self.op_image_add, "image_remove": self.op_image_remove,
        }
        if op not in handlers:
            raise Invalid(f"unknown request '{op}' (known: {', '.join(sorted(handlers))})")
        try:
            return handlers[op](**args)
        except TypeError as e:
            raise Invalid(f"{op}: bad arguments ({e})") from None

    def op_rotate_key(self) -> members.Rows:
        return self.cluster.rotate_key()

    def op_update(self, source: str, allow_downgrade: bool = False, reboot: bool = True) -> dict[str, Any]:
        """The node's firmware update (CB-Executor writes it: the disk is the host's)."""
        result: dict[str, Any] = self.ex("firmware.update", source=source, allow_downgrade=allow_downgrade,
                                         reboot=reboot)
        return result

    def op_hello(self) -> dict[str, Any]:
        return {"protocol": wire.PROTOCOL, "node": self.node_id, "reconciled": self.reconciled}

    def op_images(self) -> list[dict[str, Any]]:
        """The store's compute images, then the slot templates this firmware carries."""
        templates = [{"image": name, "type": t["type"], "version": t["version"], "date": t.get("released") or "-",
                      "size": None, "signed_by": "firmware", "description": t["description"]}
                     for name, t in sorted(self.catalogue.items())]
        return [*store.images(self.store), *templates]

    def op_image_add(self, upload: BinaryIO, where: str) -> dict[str, Any]:
        """A signed release, read from the file the caller handed over, into the store."""
        if not isinstance(where, str) or not where:
            raise Invalid("image_add: 'where' names the release (a path or URL)")
        with self.store_lock:
            row = store.add(upload, self.store, self.update_key, where[:200])
        log.info("image %s %s %s (%s)", row["image"], row["version"], "already stored" if row["already"] else "stored",
                 where[:200])
        return row

    def op_image_remove(self, image: str, version: str) -> dict[str, Any]:
        """An image out of the store, unless a boot-server slot boots nodes from it."""
        with self.lock:  # no boot server installed for it meanwhile (an add goes on: its own lock)
            for entry in self.slots.values():
                if not self.catalogue.get(entry["template"], {}).get("image_store"):
                    continue
                users = [node for node, c in _boot_choices(entry.get("params", {})).items()
                         if (c.image, c.version) == (image, version)]
                if users:
                    raise Invalid(f"{image} {version}: boot server {entry['object_id']} boots "
                                  f"{', '.join(users)} from it: give them another image first "
                                  f"(slot remove {entry['object_id']}, then slot install it again)")
            row = store.remove(self.store, str(image), str(version))
        log.info("image %s %s removed", row["image"], row["version"])
        return row

    def op_slots(self, object_id: str | None = None, by_type: str | None = None) -> list[dict[str, Any]]:
        if object_id is not None:
            self._node(object_id)
        if by_type is not None:
            self._template(by_type)
        return [r for r in self.rows() if by_type is None or r["type"] == by_type]

    def op_runtime(self, object_id: str) -> dict[str, Any]:
        eid = self._slot(object_id)
        info: dict[str, Any] = self.ex("container.runtime", eid=eid)
        return {**info, **self.rows([eid])[0], "health": self.health.get(eid),
                "error": self.failed.get(eid)}

    def op_start(self, object_id: str) -> dict[str, Any]:
        eid = self._slot(object_id)
        with self.lock:
            self._start(eid)
        return self.rows([eid])[0]

    def op_stop(self, object_id: str) -> dict[str, Any]:
        eid = self._slot(object_id, changing=True)
        with self.lock:
            self._stop(eid)
        return self.rows([eid])[0]

    def op_restart(self, object_id: str) -> dict[str, Any]:
        eid = self._slot(object_id, changing=True)
        with self.lock:
            self._stop(eid)
            self._start(eid)
        return self.rows([eid])[0]

    def op_startall(self, object_id: str) -> list[dict[str, Any]]:
        self._node(object_id)
        errors = []
        with self.lock:
            for eid in sorted(self.slots):
                if eid != contract.MANAGER_EID:
                    try:
                        self._start(eid)
                    except Failed as e:
                        errors.append(str(e))
        if errors:
            raise Failed("; ".join(errors))
        return self.rows()

    def op_stopall(self, object_id: str) -> list[dict[str, Any]]:
        self._node(object_id)
        with self.lock:
            for eid in sorted(self.slots, reverse=True):
                if eid != contract.MANAGER_EID:
                    self._stop(eid)
        return self.rows()

    def op_install(self, template: str, object_id: str | None = None, address: str | None = None,
                   hostname: str | None = None, params: dict[str, str] | None = None,
                   autostart: bool = True, start: bool = True) -> dict[str, Any]:
        tpl = self._template(template)
        if template == contract.MANAGER_TEMPLATE:
            raise Invalid(f"{template} is slot {contract.MANAGER_EID} of the firmware, and there is one only")
        with self.lock:
            if object_id is None:
                free = [e for e in range(1, 10) if e not in self.slots]
                if not free:
                    raise Invalid("no free slot on this node (eids 1 to 9 are all used)")
                eid = free[0]
            else:
                eid = self._slot(object_id, known=False)
                if eid in self.slots:
                    raise Invalid(f"{object_id} is already a {self.slots[eid]['template']} slot: remove it first")
                if eid == contract.MANAGER_EID:
                    raise Invalid(f"{object_id} is CB-Manager's place")
            if tpl["address"] == "required" and not address:
                raise Invalid(f"a {template} slot needs an address (--address A.B.C.D/N)")
            if address is not None:
                try:
                    address = str(ipaddress.IPv4Interface(address)) if "/" in address else ""
                except ValueError:
                    address = ""
                if not address:
                    raise Invalid("--address: an IPv4 address with prefix, e.g. 10.0.249.52/24")
            if hostname is not None and not contract.HOSTNAME.fullmatch(hostname):
                raise Invalid(f"--hostname: '{hostname}' is not a host name")
            values = _checked_params(template, tpl["params"], params or {})
            if tpl.get("image_store"):  # under self.lock, as a removal's check
                for choice in _boot_choices(values).values():
                    store.find(self.store, choice.image, choice.version)
            entry = self.entry_for({"eid": eid, "template": template, "address": address, "hostname": hostname,
                                 "autostart": autostart, "params": values,
                                 "volumes": tpl["volumes"]})
            log.info("install %s as %s", template, entry["object_id"])
            self.provision(entry)
            self.slots[eid] = entry
            registry.save(self.slots, self.registry_path)
            if start:
                self._start(eid)
            return self.rows([eid])[0]

    def op_remove(self, object_id: str) -> dict[str, Any]:
        eid = self._slot(object_id, changing=True)
        with self.lock:
            entry = self.slots[eid]
            row = self.rows([eid])[0]
            self._stop(eid)
            if self.ex("container.state", eid=eid)["state"] != "UNDEFINED":
                self.ex("container.undefine", eid=eid)
            existing = {v["volume"] for v in self.ex("volume.list")}
            for vol in entry["volumes"]:
                name = contract.volume_name(eid, vol["iid"])
                if name in existing:
                    self.ex("volume.remove", volume=name)
            del self.slots[eid]
            self.health.pop(eid, None)
            self.failed.pop(eid, None)
            registry.save(self.slots, self.registry_path)
            log.info("removed %s (%s)", object_id, entry["template"])
            return {**row, "status": "REMOVED"}

    def op_ready(self) -> dict[str, Any]:
        rows = self.rows()
        waiting = [f"{r['location']} {r['type']} {r['status']}" for r in rows
                   if self.slots[int(r["location"][-3])]["autostart"] and r["status"] != "ON"]
        # Once the slots are reconciled, FAILED stays until someone starts the slot again.
        failed = [f"{r['location']} {r['type']}: {self.failed.get(int(r['location'][-3])) or 'not healthy'}"
                  for r in rows if self.slots[int(r["location"][-3])]["autostart"] and r["status"] == "FAILED"]
        return {"ready": self.reconciled and not waiting, "reconciled": self.reconciled, "waiting": waiting,
                "failed": failed if self.reconciled else []}

    # -- slots ---------------------------------------------------------------------

    def _template(self, name: str) -> dict[str, Any]:
        if name not in self.catalogue:
            raise Invalid(f"no slot type '{name}' in this firmware (known: {', '.join(sorted(self.catalogue))})")
        return self.catalogue[name]

    def _node(self, object_id: Any) -> None:
        kind, _ = self._parse(object_id)
        if kind != "node":
            raise Invalid(f"{object_id} is a slot; this needs a node's ObjectID ({self.node_id})")

    def _slot(self, object_id: Any, *, known: bool = True, changing: bool = False) -> int:
        kind, eid = self._parse(object_id)
        if kind != "slot" or eid is None:
            raise Invalid(f"{object_id} is a node; this needs a slot's ObjectID (e.g. "
                          f"{contract.slot_object_id(self.node_id, 1)})")
        if known and eid not in self.slots:
            raise Invalid(f"{object_id}: no such slot on node {self.node_id}")
        if changing and eid == contract.MANAGER_EID:
            raise Invalid(f"{object_id} is CB-Manager: it stops with the node, not by itself")
        return eid

    def _parse(self, object_id: Any) -> tuple[str, int | None]:
        if not isinstance(object_id, str):
            raise Invalid("an ObjectID is a string of 11 digits")
        try:
            return contract.parse_object_id(self.node_id, object_id)
        except ValueError as e:
            raise Invalid(str(e)) from None

    def _states(self) -> dict[int, str]:
        return {s["eid"]: s["state"] for s in self.ex("container.list")}

    def _start(self, eid: int) -> None:
        entry = self.slots[eid]
        tpl = self._template(entry["template"])
        self.failed.pop(eid, None)
        self.ex("container.start", eid=eid)
        deadline = self.clock() + tpl["start_timeout"]
        while True:
            health: dict[str, Any] = self.ex("container.health", eid=eid)
            self.health[eid] = health
            if health["ok"]:
                return
            if self.clock() > deadline:
                self.failed[eid] = f"not healthy {tpl['start_timeout']} s after start: {health['output']}"
                raise Failed(f"slot {entry['object_id']} ({entry['template']}) started but is "
                             f"{self.failed[eid]}")
            self.sleep(1.0)

    def _stop(self, eid: int) -> None:
        tpl = self.catalogue.get(self.slots[eid]["template"], {})
        self.ex("container.stop", eid=eid, timeout=tpl.get("stop_timeout", 30))
        self.health.pop(eid, None)
        self.failed.pop(eid, None)

    def rows(self, eids: list[int] | None = None) -> list[dict[str, Any]]:
        """The source document's columns, one row a slot."""
        states = self._states()
        slots = dict(self.slots)  # a snapshot: a remove under the lock does not pull a row away mid-way
        out = []
        for eid in sorted(slots) if eids is None else eids:
            entry = slots[eid]
            tpl = self.catalogue.get(entry["template"], {"version": "?", "description": "(not in this firmware)"})
            state = states.get(eid, "UNDEFINED")
            if state != "RUNNING":
                status = "FAILED" if eid in self.failed else "OFF"
            elif eid == contract.MANAGER_EID:
                status = "ON"
            elif eid in self.failed or not self.health.get(eid, {"ok": True})["ok"]:
                status = "FAILED"
            else:
                status = "ON"
            out.append({
                "parent": self.node_id, "location": entry["object_id"], "type": entry["template"],
                "version": contract.version_text(tpl) if "type" in tpl else "",
                "ip": (entry.get("address") or "").split("/")[0], "hostname": entry.get("hostname") or "",
                "status": status, "description": tpl["description"],
            })
        return out

    def monitor(self) -> None:
        """Keep the health of running slots fresh, for `slot show` and the node's ready."""
        while True:
            self.sleep(MONITOR_PERIOD)
            try:
                states = self._states()
                for eid in list(self.slots):
                    if eid != contract.MANAGER_EID and states.get(eid) == "RUNNING" and self.reconciled:
                        self.health[eid] = self.ex("container.health", eid=eid)
            except (Invalid, Failed) as e:
                log.warning("monitor: %s", e)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="cb-manager: %(message)s", stream=sys.stderr)
    # PID 1 of its container: a signal with no handler would be ignored, and the stop
    # would wait for its bound and then kill.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    manager = Manager(contract.node_config(), contract.catalogue())
    threading.Thread(target=manager.start, name="start", daemon=True).start()
    threading.Thread(target=manager.monitor, name="monitor", daemon=True).start()
    threading.Thread(target=manager.cluster.serve, args=(manager.handle_peer,), name="cluster", daemon=True).start()
    log.info("node %s, %d templates; socket %s", manager.node_id, len(manager.catalogue), contract.MANAGER_SOCKET)
    wire.serve(contract.MANAGER_SOCKET, manager.handle, uploads=True)
    return 0

