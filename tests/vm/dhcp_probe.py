"""A PXE client's DHCP exchanges, as a node's firmware and then iPXE make them; run in a
network namespace on the server's link. Prints one JSON object per answer.

    dhcp_probe.py IFACE MAC discover-pxe     DHCPDISCOVER from the firmware's PXE ROM
    dhcp_probe.py IFACE MAC request-4011 IP  its boot-server request (PXE menu item 0x8000)
    dhcp_probe.py IFACE MAC discover-ipxe    DHCPDISCOVER from iPXE (user class "iPXE")
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys

HEADER = "!BBBBIHH4s4s4s4s16s64s128s"
MAGIC = b"\x63\x82\x53\x63"


def option(code: int, data: bytes) -> bytes:
    return bytes([code, len(data)]) + data


def packet(mac: str, msg: int, *, ipxe: bool, ciaddr: str = "0.0.0.0", extra: bytes = b"") -> bytes:
    chaddr = bytes.fromhex(mac.replace(":", "")) + bytes(10)
    head = struct.pack(HEADER, 1, 1, 6, 0, random.getrandbits(32), 0, 0x8000, socket.inet_aton(ciaddr),
                       bytes(4), bytes(4), bytes(4), chaddr, b"", b"")
    opts = option(53, bytes([msg])) + option(60, b"PXEClient:Arch:00000:UNDI:002001")
    opts += option(93, b"\0\0") + option(94, b"\x01\x02\x01") + option(97, b"\0" + bytes(range(16)))
    opts += option(55, bytes([1, 3, 43, 60, 66, 67]))
    if ipxe:
        opts += option(77, b"iPXE") + option(175, b"\x13\x01\x01")
    return head + MAGIC + opts + extra + b"\xff"


def parse(data: bytes) -> dict[str, object]:
    fields = struct.unpack(HEADER, data[:236])
    opts: dict[str, str] = {}
    i = 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        code, length = data[i], data[i + 1]
        opts[str(code)] = data[i + 2:i + 2 + length].hex()
        i += 2 + length
    return {"siaddr": socket.inet_ntoa(fields[9]), "file": fields[13].rstrip(b"\0").decode(), "options": opts}


def main() -> None:
    iface, mac, what = sys.argv[1:4]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    if what == "request-4011":
        sock.bind((sys.argv[4], 68))
        boot_item = option(43, option(71, b"\x80\x00\x00\x00") + b"\xff")
        sock.sendto(packet(mac, 3, ipxe=False, ciaddr=sys.argv[4], extra=boot_item), (sys.argv[5], 4011))
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        sock.bind(("0.0.0.0", 68))
        sock.sendto(packet(mac, 1, ipxe=what == "discover-ipxe"), ("255.255.255.255", 67))
    data, _ = sock.recvfrom(4096)
    print(json.dumps(parse(data)))


if __name__ == "__main__":
    main()
