"""Bring CB-Manager up at boot, and every slot down at shutdown (cbios-slots.service).

CB-Manager is slot 0: its volume, definition and container are made here through
CB-Executor, exactly as CB-Manager makes the other slots; once it answers, it starts them."""

from __future__ import annotations

import logging
from typing import Any

from cbios.node import contract, wire
from cbios.node.boot import bootenv

log = logging.getLogger("cbios")
EXECUTOR_WAIT = 60
STOP_TIMEOUT = 30


def up(config: dict[str, Any] | None = None) -> int:
    config = config or contract.node_config()
    entry = next((s for s in config["slots"] if s["eid"] == contract.MANAGER_EID), None)
    if entry is None:
        log.info("cbios: no CB-Manager in this firmware: no slots")
        return 0
    if bootenv.running_copy() is None:
        log.info("cbios: not booted from a node disk (an image alone): no slots")
        return 0
    if not wire.wait_for(contract.EXECUTOR_SOCKET, EXECUTOR_WAIT):
        log.error("cbios: CB-Executor does not answer on %s", contract.EXECUTOR_SOCKET)
        return 1
    from cbios.node import manager  # here: a node booted from an image alone does not need it

    catalogue = contract.catalogue()
    ex = manager.executor_client
    try:
        if ex("container.state", eid=contract.MANAGER_EID)["state"] != "RUNNING":
            mgr = manager.Manager(config, catalogue, executor=ex)
            mgr.provision(mgr.entry_for(entry))
            ex("container.start", eid=contract.MANAGER_EID)
    except (wire.Invalid, wire.Failed) as e:
        log.error("cbios: CB-Manager: %s", e)
        return 1
    timeout = catalogue[entry["template"]]["start_timeout"]
    if not wire.wait_for(contract.MANAGER_SOCKET, timeout):
        log.error("cbios: CB-Manager does not answer on %s after %d s", contract.MANAGER_SOCKET, timeout)
        return 1
    log.info("cbios: CB-Manager is up (%s)", contract.slot_object_id(config["node"]["object_id"], 0))
    return 0


def down() -> int:
    """Every running slot, CB-Manager last, each with its bound."""
    from cbios.node import manager

    ex = manager.executor_client
    status = 0
    try:
        running = [s["eid"] for s in ex("container.list") if s["state"] == "RUNNING"]
    except (wire.Invalid, wire.Failed) as e:
        log.error("cbios: %s", e)
        return 1
    for eid in sorted(running, key=lambda e: (e == contract.MANAGER_EID, -e)):
        try:
            ex("container.stop", eid=eid, timeout=STOP_TIMEOUT)
            log.info("cbios: slot %d stopped", eid)
        except (wire.Invalid, wire.Failed) as e:
            log.error("cbios: slot %d: %s", eid, e)
            status = 1
    return status
