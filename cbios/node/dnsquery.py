"""A DNS query over UDP, standard library only: the health check of a dns_master slot.

  python3 -m cbios.node.dnsquery SERVER NAME [TYPE]   (TYPE: A or SOA)

Prints the answers and exits 0 when the server answers authoritatively with at least
one record; 1 otherwise."""

from __future__ import annotations

import random
import socket
import struct
import sys

TYPES = {"A": 1, "NS": 2, "SOA": 6}


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        length = data[pos]
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length == 0:
            return pos + 1
        pos += 1 + length


def query(server: str, name: str, qtype: str = "A", timeout: float = 3.0) -> tuple[bool, list[str]]:
    """(authoritative, answers): A answers as addresses, others as their type's name."""
    ident = random.randrange(1 << 16)
    packet = struct.pack(">HHHHHH", ident, 0x0000, 1, 0, 0, 0) + encode_name(name) + struct.pack(
        ">HH", TYPES[qtype], 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, 53))
        data, _ = s.recvfrom(4096)
    rid, flags, qd, an, _, _ = struct.unpack(">HHHHHH", data[:12])
    if rid != ident or flags & 0x000F:
        return False, []
    pos = 12
    for _ in range(qd):
        pos = _skip_name(data, pos) + 4
    answers = []
    for _ in range(an):
        pos = _skip_name(data, pos)
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[pos:pos + 10])
        pos += 10
        rdata = data[pos:pos + rdlen]
        pos += rdlen
        if rtype == 1 and rdlen == 4:
            answers.append(socket.inet_ntoa(rdata))
        else:
            answers.append(next((k for k, v in TYPES.items() if v == rtype), str(rtype)))
    return bool(flags & 0x0400), answers


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: dnsquery SERVER NAME [A|SOA|NS]", file=sys.stderr)
        return 2
    server, name = argv[0], argv[1]
    qtype = argv[2] if len(argv) == 3 else "A"
    try:
        aa, answers = query(server, name, qtype)
    except OSError as e:
        print(f"{server}: no answer for {name} {qtype}: {e}")
        return 1
    if not (aa and answers):
        print(f"{server}: no authoritative answer for {name} {qtype}")
        return 1
    print(" ".join(answers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
