"""An Ethernet switch for VMs, on this machine: trunk ports, and access ports of one VLAN.

A management node's ctl carries the management VLAN tagged (its br0 is on ctl.249); a
compute node's NIC is untagged, as on a switch port in access mode. Each port is a QEMU
netdev `socket,udp=...`: one UDP datagram is one Ethernet frame. A frame from an access
port goes to the other access ports as it is and to the trunks with the VLAN's tag; a
frame from a trunk goes to the other trunks as it is and, with that tag, to the access
ports without it. Anything else is dropped. No learning: every port of the VLAN sees every
frame, as on a hub."""

from __future__ import annotations

import select
import socket
import struct
import threading
from types import TracebackType

TPID = 0x8100


class VlanSwitch:
    def __init__(self, vlan: int, access_ports: int, trunks: int = 1) -> None:
        self.vlan = vlan
        self.trunks = trunks
        self.ports = [self._socket() for _ in range(trunks + access_ports)]  # the trunks first
        self.vm_ports = [self._free_port() for _ in self.ports]
        self.frames = [0] * len(self.ports)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlan-switch", daemon=True)

    @staticmethod
    def _socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        return s

    @staticmethod
    def _free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def netdev(self, port: int) -> str:
        """The netdev options of the VM on PORT (the trunks are the first)."""
        return (f"socket,udp=127.0.0.1:{self.ports[port].getsockname()[1]},"
                f"localaddr=127.0.0.1:{self.vm_ports[port]}")

    def _send(self, port: int, frame: bytes) -> None:
        try:
            self.ports[port].sendto(frame, ("127.0.0.1", self.vm_ports[port]))
        except OSError:  # no VM on that port yet
            pass

    def _forward(self, source: int, frame: bytes) -> None:
        if len(frame) < 14:
            return
        self.frames[source] += 1
        access = range(self.trunks, len(self.ports))
        if source < self.trunks:
            for port in range(self.trunks):
                if port != source:
                    self._send(port, frame)
            if len(frame) < 18 or struct.unpack("!HH", frame[12:16]) != (TPID, self.vlan):
                return
            untagged = frame[:12] + frame[16:]
            for port in access:
                self._send(port, untagged)
            return
        tagged = frame[:12] + struct.pack("!HH", TPID, self.vlan) + frame[12:]
        for port in range(self.trunks):
            self._send(port, tagged)
        for port in access:
            if port != source:
                self._send(port, frame)

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select(self.ports, [], [], 0.2)
            for s in readable:
                frame = s.recv(65536)
                self._forward(self.ports.index(s), frame)

    def __enter__(self) -> VlanSwitch:
        self._thread.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.ports:
            s.close()
