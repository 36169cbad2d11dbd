"""CB-Executor's requests (protocol 1): the whole set, and the check of every argument.

Every request is checked in full before anything is done: an unknown op or argument, a
value of the wrong type or out of bounds, a volume outside the slot namespace, a path
that would leave its volume. check() returns the arguments, normalised, or raises
Invalid with a message that names the argument."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from cbios.node.contract import HOSTNAME, PIDS_MAX, PIDS_MIN, VOLUME_NAME
from cbios.node.wire import Invalid

MIN_VOLUME = 4 << 20
MAX_VOLUME = 1 << 40
MAX_CONTENT = 64 << 10

Check = Callable[[Any], Any]


def _int(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"must be a whole number from {lo} to {hi}")
        return v
    return check


def _volume(v: Any) -> str:
    if not isinstance(v, str) or not VOLUME_NAME.fullmatch(v):
        raise ValueError(f"{v!r} is not a slot volume (slot<eid>-<iid>, e.g. slot2-0)")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", v):
        raise ValueError(f"{v!r} is not a template name")
    return v


def _hostname(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not HOSTNAME.fullmatch(v):
        raise ValueError(f"{v!r} is not a host name")
    return v


def _address(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or "/" not in v:
        raise ValueError(f"{v!r} is not an IPv4 address with prefix (10.0.249.52/24)")
    try:
        return str(ipaddress.IPv4Interface(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address with prefix (10.0.249.52/24)") from None


def _path(v: Any) -> str:
    """A relative path inside a volume: no '..', not absolute, no empty or odd parts."""
    if not isinstance(v, str) or not v or len(v) > 255 or "\0" in v:
        raise ValueError("must be a relative path")
    p = PurePosixPath(v)
    if p.is_absolute() or any(part in ("..", ".") for part in v.split("/")) or "//" in v:
        raise ValueError(f"{v!r} leaves its volume or is not a plain relative path")
    return str(p)


def _content(v: Any) -> str:
    if not isinstance(v, str) or len(v.encode()) > MAX_CONTENT:
        raise ValueError(f"must be text of at most {MAX_CONTENT} bytes")
    return v


def _iids(v: Any) -> list[int]:
    if not isinstance(v, list) or not v or len(set(map(str, v))) != len(v):
        raise ValueError("must be a list of distinct volume numbers")
    out = [_int(0, 9)(i) for i in v]
    if 0 not in out:
        raise ValueError("must include volume 0")
    return sorted(out)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _source(v: Any) -> str:
    """Where firmware is, as the node sees it: an http(s) URL or an absolute path."""
    if not isinstance(v, str) or len(v) > 1024 or not re.fullmatch(r"(https?://|/)[^\s\0]*", v):
        raise ValueError("must be an http(s) URL or an absolute path on the node")
    return v


EID = _int(0, 9)
MIN_MEMORY, MAX_MEMORY = 16 << 20, 1 << 40
Schema = dict[str, tuple[Check, bool]]  # argument -> (check, required)

REQUESTS: dict[str, Schema] = {
    "hello": {},
    "volume.list": {},
    "volume.create": {"volume": (_volume, True), "size": (_int(MIN_VOLUME, MAX_VOLUME), True)},
    "volume.write": {"volume": (_volume, True), "template": (_name, True), "if_blank": (_bool, False)},
    "volume.put": {"volume": (_volume, True), "path": (_path, True), "content": (_content, True)},
    "volume.remove": {"volume": (_volume, True)},
    "container.define": {"eid": (EID, True), "template": (_name, True), "hostname": (_hostname, False),
                         "address": (_address, False), "volumes": (_iids, True),
                         "memory": (_int(MIN_MEMORY, MAX_MEMORY), False), "pids": (_int(PIDS_MIN, PIDS_MAX), False)},
    "container.undefine": {"eid": (EID, True)},
    "container.start": {"eid": (EID, True)},
    "container.stop": {"eid": (EID, True), "timeout": (_int(1, 300), False)},
    "container.state": {"eid": (EID, True)},
    "container.list": {},
    "container.runtime": {"eid": (EID, True)},
    "container.health": {"eid": (EID, True)},
    "firmware.update": {"source": (_source, True), "allow_downgrade": (_bool, False), "reboot": (_bool, False)},
}


def check(op: str, args: dict[str, Any]) -> dict[str, Any]:
    schema = REQUESTS.get(op)
    if schema is None:
        raise Invalid(f"unknown request '{op}' (known: {', '.join(sorted(REQUESTS))})")
    unknown = sorted(set(args) - set(schema))
    if unknown:
        raise Invalid(f"{op}: unknown argument(s) {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for name, (fn, required) in schema.items():
        if name not in args:
            if required:
                raise Invalid(f"{op}: missing argument '{name}'")
            continue
        try:
            out[name] = fn(args[name])
        except ValueError as e:
            raise Invalid(f"{op}: {name}: {e}") from None
    return out
