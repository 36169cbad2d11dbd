"""The types a slot template gives its parameters, and the check of a value against one.

A parameter's value ends up in a daemon's command line or configuration (through the
slot's slot.env), so it is checked where it enters: when a profile is loaded, and when
CB-Manager installs a slot for the `slot` CLI or a peer. A value is the canonical text of
its type; the empty value is allowed only where the template's default is empty, meaning
"the template chooses" (for example the upper half of the slot's network)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from cbios.node import contract

MAX_LIST = 8


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError("an IPv4 address, e.g. 10.0.249.52") from None


def _ipv4_list(text: str) -> str:
    parts = text.split(",")
    if len(parts) > MAX_LIST:
        raise ValueError(f"at most {MAX_LIST} IPv4 addresses, separated by ','")
    try:
        return ",".join(_ipv4(p) for p in parts)
    except ValueError:
        raise ValueError("IPv4 addresses separated by ',', e.g. 10.0.249.52,10.0.249.53") from None


def _ipv4_range(text: str) -> str:
    try:
        first, last = (ipaddress.IPv4Address(p) for p in text.split(","))
    except ValueError:
        raise ValueError("the first and last IPv4 address, e.g. 10.0.249.100,10.0.249.200") from None
    if first > last:
        raise ValueError(f"{first} comes after {last}")
    return f"{first},{last}"


def _ipv4_network(text: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text, strict=True))
    except ValueError:
        raise ValueError("an IPv4 network or one address, e.g. 10.0.249.0/24 or 10.0.249.52") from None


def _port(text: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]{0,4}", text) or int(text) > 65535:
        raise ValueError("a TCP or UDP port, 1 to 65535")
    return text


def _domain(text: str) -> str:
    label = contract.HOSTNAME.pattern
    if len(text) > 253 or not re.fullmatch(rf"{label}(\.{label})*", text):
        raise ValueError("a DNS domain in lower case, e.g. cluster.local")
    return text


# A boot server's choice for a node: IMAGE@VERSION:MODE, an image of CB-Manager's store and
# what the node does with it (contract.BOOT_MODES).
BOOT_CHOICE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63})@(\d+(?:\.\d+){0,3}):([a-z]+)")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
OBJECT_ID = contract.OBJECT_ID


@dataclass(frozen=True)
class BootChoice:
    image: str
    version: str
    mode: str

    def __str__(self) -> str:
        return f"{self.image}@{self.version}:{self.mode}"


def boot_choice(text: str) -> BootChoice:
    m = BOOT_CHOICE.fullmatch(text)
    if not m or m.group(3) not in contract.BOOT_MODES:
        raise ValueError(f"IMAGE@VERSION:MODE, MODE one of {', '.join(contract.BOOT_MODES)} "
                         "(e.g. compute@1.0.0:diskless)")
    return BootChoice(*m.groups())


def boot_nodes(text: str) -> dict[str, BootChoice]:
    """{MAC or ObjectID: choice} of 'KEY=IMAGE@VERSION:MODE,...'."""
    out: dict[str, BootChoice] = {}
    for item in text.split(","):
        key, sep, choice = item.partition("=")
        key = key.lower()
        if not sep or not (MAC.fullmatch(key) or OBJECT_ID.fullmatch(key)):
            raise ValueError("NODE=IMAGE@VERSION:MODE separated by ',', NODE a MAC (52:54:00:c0:10:01) "
                             "or an ObjectID (31000050010)")
        if key in out:
            raise ValueError(f"node {key} given twice")
        out[key] = boot_choice(choice)
    return out


def boot_params(params: dict[str, str]) -> tuple[dict[str, BootChoice], BootChoice | None]:
    """A boot server's choices from its params: by node (`nodes`), and for the rest (`default`)."""
    nodes, default = params.get("nodes", ""), params.get("default", "")
    return (boot_nodes(nodes) if nodes else {}), (boot_choice(default) if default else None)


TYPES: dict[str, Callable[[str], str]] = {
    "ipv4": _ipv4,
    "ipv4-list": _ipv4_list,
    "ipv4-range": _ipv4_range,
    "ipv4-network": _ipv4_network,
    "port": _port,
    "domain": _domain,
    "boot-choice": lambda text: str(boot_choice(text)),
    "boot-nodes": lambda text: ",".join(f"{k}={v}" for k, v in boot_nodes(text).items()),
}


def check(kind: str, default: str, value: str) -> str:
    """VALUE as the parameter's canonical text; ValueError saying what it must be."""
    if value == "" and default == "":
        return ""
    if not isinstance(value, str) or len(value) > 1024:
        raise ValueError("a text of at most 1024 characters")
    return TYPES[kind](value)
