"""The VM tests' switch, with no VM: frames as UDP datagrams between its ports and a VM's."""

from __future__ import annotations

import socket
import struct

import pytest

from tests.vm.vlan_switch import TPID, VlanSwitch

MACS = b"\xff" * 6 + b"\x52\x54\x00\xc0\x00\x01"
PAYLOAD = b"\x08\x00" + b"ip packet"


def test_trunks_hear_each_other_as_is_and_access_ports_hear_the_vlan_untagged() -> None:
    with VlanSwitch(249, access_ports=1, trunks=3) as switch:
        vms = []
        for port in switch.vm_ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", port))
            s.settimeout(5)
            vms.append(s)
        tagged = MACS + struct.pack("!HH", TPID, 249) + PAYLOAD
        vms[0].sendto(tagged, switch.ports[0].getsockname())
        assert [vms[i].recv(2048) for i in (1, 2, 3)] == [tagged, tagged, MACS + PAYLOAD]
        vms[3].sendto(MACS + PAYLOAD, switch.ports[3].getsockname())
        assert [vms[i].recv(2048) for i in (0, 1, 2)] == [tagged] * 3
        other = MACS + struct.pack("!HH", TPID, 7) + PAYLOAD  # another VLAN: between trunks only
        vms[1].sendto(other, switch.ports[1].getsockname())
        assert [vms[i].recv(2048) for i in (0, 2)] == [other, other]
        vms[3].settimeout(0.5)
        with pytest.raises(TimeoutError):
            vms[3].recv(2048)  # nothing reached the access port
        for s in vms:
            s.close()
