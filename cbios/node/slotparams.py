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


TYPES: dict[str, Callable[[str], str]] = {
    "ipv4": _ipv4,
    "ipv4-list": _ipv4_list,
    "ipv4-range": _ipv4_range,
    "ipv4-network": _ipv4_network,
    "port": _port,
    "domain": _domain,
}


def check(kind: str, default: str, value: str) -> str:
    """VALUE as the parameter's canonical text; ValueError saying what it must be."""
    if value == "" and default == "":
        return ""
    if not isinstance(value, str) or len(value) > 1024:
        raise ValueError("a text of at most 1024 characters")
    return TYPES[kind](value)
