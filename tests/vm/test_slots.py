"""Slots on a node booted from its disk: CB-Executor, CB-Manager in slot 0, the dhcp and
dns_master slots serving for real on br0, the slot CLI, the cluster with a second node,
and reboots. One boot for the module (then two reboots at its end): the tests run in
order on the same node. The second node (qemu-test-peer) boots beside it from the start,
its ctl on the same hub, and is powered off by the last test of the cluster; a third
(qemu-test-third) boots on the hub to join the cluster at runtime, and leaves it."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbios.boot import disk_boot_spec
from cbios.disk import overlay
from cbios.machine import Machine
from cbios.node import contract
from cbios.profile import Profile
from cbios.project import Project
from tests.vm.conftest import ready_machine
from tests.vm.vlan_switch import VlanSwitch

NODE = "31000040010"
MANAGER, DHCP, SERVICE, DNS, COMPUTE = "31000040075", "31000040275", "31000040575", "31000040675", "31000040775"
BOOT = "31000040475"  # the boot-server slot: not autostart (test_compute.py installs and runs it)
PEER, PEER_MANAGER, PEER_DHCP, PEER_DNS, PEER_COMPUTE = (
    "31000041010", "31000041075", "31000041275", "31000041675", "31000041775")
THIRD, THIRD_MANAGER = "31000042010", "31000042075"
CLUSTER_BOUND = 5  # qemu-test's cluster.timeout
COLUMNS = ["ParentID", "Location", "Type", "Version", "IP", "Hostname", "Status", "Description"]


@pytest.fixture(scope="module")
def hub(profile: Profile) -> Iterator[VlanSwitch]:
    """The management network: the management nodes' ctl links, each a trunk port of one hub."""
    with VlanSwitch(profile.network.vlan, access_ports=0, trunks=3) as switch:
        yield switch


def on_hub(vm_project: Project, profile: Profile, disk: Path, hub: VlanSwitch, port: int,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """For module fixtures: a management node from (a copy of) DISK, its ctl on the hub's
    PORT, started (not yet ready), and killed after the module."""
    copy = overlay(disk, tmp_path_factory.mktemp(profile.name) / "node.qcow2")
    spec = disk_boot_spec(vm_project, profile, disk.parent, copy, persist=True)
    spec.links[0] = hub.netdev(port)
    m = Machine(spec, copy.parent / "vm", name=profile.name.removeprefix("qemu-test-"))
    try:
        m.start()
        yield m
    finally:
        m.kill()


@pytest.fixture(scope="module")
def peer(vm_project: Project, peer_profile: Profile, peer_disk: Path, hub: VlanSwitch,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """The cluster's second node, started (not yet ready: it boots while the tests of the
    first run)."""
    yield from on_hub(vm_project, peer_profile, peer_disk, hub, 1, tmp_path_factory)


@pytest.fixture(scope="module")
def third(vm_project: Project, third_profile: Profile, third_disk: Path, hub: VlanSwitch,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """A third management node, in no cluster: started by the kvm-system test (it boots on
    the core that test leaves idle), or by the first test that needs it."""
    yield from on_hub(vm_project, third_profile, third_disk, hub, 2, tmp_path_factory)


@pytest.fixture(scope="module")
def node(vm_project: Project, profile: Profile, built: Path, node_disk: Path, hub: VlanSwitch,
         peer: Machine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """qemu-test from (a copy of) its disk, with two NICs (ctl on the hub), ready: slots up."""
    disk = overlay(node_disk, tmp_path_factory.mktemp("slots") / "node.qcow2")
    spec = disk_boot_spec(vm_project, profile, built, disk, persist=True)
    spec.links[0] = hub.netdev(0)
    yield from ready_machine(Machine(spec, disk.parent / "vm", name="slots"), profile)


def ready_peer(peer: Machine, profile: Profile) -> Machine:
    """PEER (or the third node), once ready."""
    if not any(line.startswith("READY") for line in peer.reports):
        peer.wait_ready(profile.qemu.ready_timeout)
    return peer


def slot_json(m: Machine, *args: str) -> Any:
    return json.loads(m.succeed("slot --json " + " ".join(args)))


def status_of(m: Machine, location: str) -> str:
    rows = {r["location"]: r for r in slot_json(m, "show", NODE)}
    return str(rows[location]["status"])


def lxc_state(m: Machine, eid: int) -> str:
    return m.succeed(f"lxc-info -n slot{eid} -s -H")


def pid_of(m: Machine, pattern: str) -> str:
    """PIDs of processes whose command line matches PATTERN ('' for none)."""
    return m.succeed(f"pgrep -f '{pattern}' || true")


def processes(m: Machine) -> str:
    return m.succeed("ps -eo pid,ppid,stat,args")


def test_ready_means_every_autostart_slot_is_on(node: Machine) -> None:
    # The node said READY only after `slot wait-ready` (ready.d/50-slots) passed.
    assert "slots ready" in node.succeed("journalctl -b -u cbios-health --no-pager -o cat")
    rows = slot_json(node, "show", NODE)
    # service (an lxc-system slot) is not autostart: ready did not wait for it.
    assert [(r["location"], r["type"], r["status"]) for r in rows] == [
        (MANAGER, "cb-manager", "ON"), (DHCP, "dhcp", "ON"), (BOOT, "boot-server", "OFF"), (SERVICE, "service", "OFF"),
        (DNS, "dns_master", "ON"), (COMPUTE, "compute", "OFF")]
    # The boot server is test_compute.py's: out of the way of the lists and the startall here.
    assert node.succeed(f"slot remove {BOOT}") == f"{BOOT} boot-server: removed, with its volumes"
    assert node.succeed("lxc-info -n slot5 -s -H") == "STOPPED"
    out = node.succeed(f"slot start {SERVICE}", timeout=300)
    print(f"slot start {SERVICE}: {out}")
    assert out.startswith(f"{SERVICE} service: ON")
    assert node.succeed("systemctl is-active cbios-executor cbios-slots").split() == ["active", "active"]
    # Each lxc slot in a user namespace of its own: its PID 1 is no one on the node, slot 0's
    # its root by name (the group of CB-Executor's socket), the lxc-system slot's too.
    for eid in (0, 2, 5, 6):
        pid = node.succeed(f"lxc-info -n slot{eid} -p -H")
        assert node.succeed(f"cat /proc/{pid}/uid_map").split() == ["0", str(contract.slot_ids(eid)), "65536"], eid
    assert node.succeed("ps -o user= -p $(lxc-info -n slot0 -p -H)") == contract.MANAGER_USER
    assert node.succeed("cbios status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)"
                        "[\"copies\"][\"root\"][\"state\"])'") == "good"


def test_slot_show_has_the_source_documents_columns_and_object_ids(node: Machine) -> None:
    lines = node.succeed(f"slot show {NODE}").splitlines()
    assert lines[0].split() == COLUMNS
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert rows[DHCP] == [NODE, DHCP, "dhcp", "0.901.25.28", "2010-09-10", "10.0.249.52", "dhcpd52", "ON",
                          "Sysmon", "Slot", "(DHCP)"]
    assert rows[DNS][:3] == [NODE, DNS, "dns_master"] and rows[DNS][4:8] == ["10.0.249.1", "dns-master", "ON",
                                                                             "Master"]
    assert lines[0].index("Status") == lines[1].index("ON")
    listed = [line.split() for line in node.succeed(f"slot list {NODE}").splitlines()]
    assert listed[0] == ["ParentID", "Location", "Type", "Status"]
    assert [row[1] for row in listed[1:]] == [MANAGER, DHCP, SERVICE, DNS, COMPUTE]
    assert [line.split()[1] for line in node.succeed(f"slot show {NODE} --by-type=dhcp").splitlines()[1:]] == [DHCP]
    images = [line.split()[0] for line in node.succeed("slot image list").splitlines()]
    assert images == ["Image", "boot-server", "cb-manager", "compute", "dhcp", "dns_master", "service"]
    runtime = node.succeed(f"slot show-runtime {DHCP}")
    assert re.search(r"^State\s+RUNNING$", runtime, re.M)
    assert re.search(r"^Interface\s+eth0 <-> veth2 on br0$", runtime, re.M)
    assert re.search(r"^Volume slot2-0\s+/dev/mapper/lvm-slot2-0 16 MiB on /var$", runtime, re.M)
    assert re.search(r"^Health\s+passing", runtime, re.M)
    pid = re.search(r"^PID\s+(\d+)$", runtime, re.M)
    assert pid and "dnsmasq" in node.succeed(f"cat /proc/{pid.group(1)}/cmdline | tr '\\0' ' '")
    assert "slot show-runtime <slot ObjectID>" in node.succeed("bash -lc 'help slot'")


def test_bad_object_ids_and_types_exit_2_with_one_line(node: Machine) -> None:
    for command, message in [
        ("slot stop 31000040975", "31000040975: no such slot on node 31000040010"),
        ("slot show 31000050010", "31000050010: not this node (31000040010) nor one of its slots"),
        ("slot show --by-type=dchp", "no slot type 'dchp'"),
        ("slot install ldap", "no slot type 'ldap' in this firmware"),
        ("slot stop 31000040075", "is CB-Manager"),
    ]:
        rc, out = node.execute(f"{command} 2>&1")
        assert rc == 2, (command, out)
        assert out.startswith("slot: ") and message in out and len(out.splitlines()) == 1, out
    assert status_of(node, DHCP) == "ON"


def test_network_of_the_node(node: Machine) -> None:
    links = node.succeed("ip -o link show | awk -F': ' '{print $2}'").split()
    for name in ("ctl", "svn", "vlan249@ctl", "br0", "veth0", "veth2", "veth5", "veth6"):
        assert any(link.split("@")[0] == name.split("@")[0] for link in links), (name, links)
    assert "vlan249@ctl" in links
    assert node.succeed("cat /sys/class/net/ctl/address") == "52:54:00:c0:00:01"
    assert node.succeed("cat /sys/class/net/br0/bridge/stp_state") == "1"
    assert node.succeed("ls /sys/class/net/br0/brif").split() == ["veth0", "veth2", "veth5", "veth6", "vlan249"]
    assert node.succeed("ip -4 -o addr show br0 | awk '{print $4}'") == "10.0.249.10/24"
    assert node.succeed("lxc-attach -n slot2 -- cat /proc/sys/kernel/hostname") == "dhcpd52"
    assert node.succeed("lxc-attach -n slot2 -- ip -4 -o addr show eth0 | awk '{print $4}'") == "10.0.249.52/24"


def test_dhcp_slot_gives_an_address_to_a_client_on_br0(node: Machine) -> None:
    node.succeed("ip netns add client && ip link add vc0 type veth peer name vc1 && ip link set vc1 netns client"
                 " && ip link set vc0 master br0 up && ip -n client link set vc1 up && ip -n client link set lo up")
    # udhcpc retries for at most 10 x 3 s; a new bridge port forwards after 2 x forward_delay.
    out = node.succeed("ip netns exec client busybox udhcpc -i vc1 -n -q -f -t 10 -T 3 -s /bin/true 2>&1",
                       timeout=60)
    lease = re.search(r"lease of (10\.0\.249\.\d+) obtained from 10\.0\.249\.52", out)
    assert lease, out
    assert 128 <= int(lease.group(1).split(".")[-1]) <= 254
    node.succeed(f"ip -n client addr add {lease.group(1)}/24 dev vc1")
    # The lease is on the slot's own volume.
    assert lease.group(1) in node.succeed("lxc-attach -n slot2 -- cat /var/lib/dnsmasq/leases")


def test_system_slot_runs_its_own_init_on_its_own_root(node: Machine) -> None:
    assert node.succeed("lxc-attach -n slot5 -- cat /proc/1/comm") == "systemd"
    assert node.succeed("lxc-attach -n slot5 -- systemctl is-system-running") == "running"
    assert "SLOT_OBJECT_ID=31000040575" in node.succeed("lxc-attach -n slot5 -- cat /etc/cbios/slot.env")
    node.fail("lxc-attach -n slot5 -- test -e /usr/lib/cbios/release")  # not CBIOS's root
    assert node.succeed("lxc-attach -n slot5 -- cat /proc/sys/kernel/hostname") == "service5"
    runtime = node.succeed(f"slot show-runtime {SERVICE}")
    assert re.search(r"^Kind\s+lxc-system$", runtime, re.M)
    assert re.search(rf"^Root\s+node id {contract.slot_ids(5)} \(a user namespace of its own\)$", runtime, re.M)
    # Its root file system, idmapped: root's files are its root's, and stay root's on the volume.
    assert node.succeed("lxc-attach -n slot5 -- stat -c %U:%G /etc/passwd") == "root:root"
    assert node.succeed("stat -c %u /run/cbios/slots/slot5/volume0/etc/passwd") == "0"
    assert re.search(r"^Volume slot5-0\s+/dev/mapper/lvm-slot5-0 256 MiB on /$", runtime, re.M)
    assert re.search(r"^Memory\s+\d+\.\d MiB$", runtime, re.M)
    # Its file system fills its volume (the image was grown to it).
    assert int(node.succeed("lxc-attach -n slot5 -- df -B1M --output=size / | tail -1")) > 200


def test_dns_master_answers_for_its_zone(node: Machine) -> None:
    query = "env PYTHONPATH=/usr/lib/cbios/python python3 -m cbios.node.dnsquery"
    assert node.succeed(f"{query} 10.0.249.1 cluster SOA") == "SOA"
    assert node.succeed(f"{query} 10.0.249.1 dhcpd52.cluster A") == "10.0.249.52"
    assert node.succeed(f"ip netns exec client {query} 10.0.249.1 dns-master.cluster A") == "10.0.249.1"
    assert node.fail(f"{query} 10.0.249.1 nosuch.cluster A")


@pytest.mark.usefixtures("third")  # it boots meanwhile: this test's VM in a VM is one core's work
def test_kvm_system_slot_boots_a_compute_node_vm_and_powers_it_off(node: Machine) -> None:
    console = "/var/log/cbios/slots/slot7.console.log"
    assert node.succeed("blockdev --getsize64 /dev/mapper/lvm-slot7-0") == str(64 << 20)
    out = node.succeed(f"slot start {COMPUTE}", timeout=900)  # ON: its health check passed
    print(f"slot start {COMPUTE} (a VM under nested TCG): {out}")
    assert out.startswith(f"{COMPUTE} compute: ON")
    rt = slot_json(node, "show-runtime", COMPUTE)
    assert (rt["kind"], rt["state"], rt["status"]) == ("kvm-system", "RUNNING", "ON")
    assert (rt["vcpus"], rt["memory_mib"], rt["accel"], rt["tap"]) == (1, 192, "tcg", "tap7")
    assert rt["health"]["ok"] and rt["health"]["output"].startswith(f"compute70 ready: {COMPUTE}, boot 1")
    assert rt["console_log"] == console
    qemu = node.succeed(f"tr '\\0' ' ' < /proc/{rt['pid']}/cmdline")
    assert qemu.split()[0].endswith("/qemu-system-x86_64") and "file=/dev/mapper/lvm-slot7-0," in qemu, qemu
    assert node.succeed("systemctl is-active cbios-slot7.service") == "active"
    text = node.succeed(f"slot show-runtime {COMPUTE}")
    assert re.search(rf"^PID\s+{rt['pid']} \(qemu-system-x86_64, cbios-slot7.service\)$", text, re.M)
    assert re.search(r"^Acceleration\s+TCG$", text, re.M) and re.search(r"^vCPUs\s+1$", text, re.M)
    assert re.search(r"^Volume slot7-0\s+/dev/mapper/lvm-slot7-0 64 MiB on /dev/vda in the VM$", text, re.M)
    assert re.search(rf"^Console log\s+{console}$", text, re.M)
    # Its own kernel on its own disk, its tap on br0, and it answers the node over br0.
    assert "compute: compute70 ready at 10.0.249.70/24 (boot 1)" in node.succeed(f"cat {console}")
    assert "tap7" in node.succeed("ls /sys/class/net/br0/brif").split()
    page = node.succeed("python3 -c 'import urllib.request; "
                        "print(urllib.request.urlopen(\"http://10.0.249.70/\", timeout=10).read().decode())'")
    assert page.startswith(f"compute70 ready: {COMPUTE}, boot 1, kernel ")
    assert "lvm-slot7-0" in node.succeed("ls /dev/mapper")

    # Stop: the ACPI power button, and the guest powers itself off within the bound.
    out = node.succeed(f"slot stop {COMPUTE}", timeout=300)
    print(f"slot stop {COMPUTE}: {out}")
    assert out.startswith(f"{COMPUTE} compute: OFF")
    took = re.search(r"\(([\d.]+) s\)$", out)
    assert took and float(took.group(1)) < 60, out  # powered off by itself: the kill comes at 120 s
    log = node.succeed(f"cat {console}")
    assert "compute: power button: shutting down" in log and "compute: system disk unmounted" in log, log[-2000:]
    assert node.execute("systemctl is-active cbios-slot7.service")[1] in ("inactive", "unknown")
    node.fail("test -e /sys/class/net/tap7")
    node.fail("test -e /run/cbios/kvm/slot7")
    # Its disk kept what the VM wrote on it: the count of its boots.
    assert node.succeed("mount -o ro /dev/mapper/lvm-slot7-0 /mnt && cat /mnt/var/lib/compute/boots; "
                        "umount /mnt") == "1"
    # Removed like any slot: its volumes with it (and `slot startall` further on does not wait for a VM).
    assert node.succeed(f"slot remove {COMPUTE}") == f"{COMPUTE} compute: removed, with its volumes"
    node.fail("test -e /dev/mapper/lvm-slot7-0")


def test_stop_start_and_restart_really_stop_and_start_the_container(node: Machine) -> None:
    before = pid_of(node, "dnsmasq --keep-in-foreground")
    assert before
    assert node.succeed(f"slot stop {DHCP}").startswith(f"{DHCP} dhcp: OFF")
    assert status_of(node, DHCP) == "OFF" and lxc_state(node, 2) == "STOPPED"
    assert pid_of(node, "dnsmasq --keep-in-foreground") == ""
    assert "veth2" not in node.succeed("ls /sys/class/net")
    assert node.succeed(f"slot start {DHCP}").startswith(f"{DHCP} dhcp: ON")
    assert lxc_state(node, 2) == "RUNNING"
    started = pid_of(node, "dnsmasq --keep-in-foreground")
    assert started and started != before
    t0 = time.monotonic()
    out = node.succeed(f"slot restart {DHCP}")
    print(f"slot restart {DHCP}: {out} (round trip {time.monotonic() - t0:.1f} s)")
    restarted = pid_of(node, "dnsmasq --keep-in-foreground")
    assert restarted and restarted != started and status_of(node, DHCP) == "ON"

    rows = [line.split() for line in node.succeed(f"slot stopall {NODE}").splitlines()[1:]]
    assert [(r[1], r[3]) for r in rows] == [(MANAGER, "ON"), (DHCP, "OFF"), (SERVICE, "OFF"), (DNS, "OFF")]
    assert lxc_state(node, 6) == "STOPPED" and lxc_state(node, 5) == "STOPPED"
    assert pid_of(node, "^nsd -d -c /run/nsd/nsd.conf") == "", processes(node)
    rows = [line.split() for line in node.succeed(f"slot startall {NODE}").splitlines()[1:]]
    assert {r[3] for r in rows} == {"ON"}
    assert lxc_state(node, 6) == "RUNNING" and pid_of(node, "^nsd -d -c /run/nsd/nsd.conf")


def test_remove_then_install_makes_and_deletes_the_volumes(node: Machine) -> None:
    assert node.succeed("test -b /dev/mapper/lvm-slot6-0 && echo yes") == "yes"
    assert node.succeed(f"slot remove {DNS}") == f"{DNS} dns_master: removed, with its volumes"
    node.fail("test -e /dev/mapper/lvm-slot6-0")
    assert "slot6" not in node.succeed("lvs --noheadings -o lv_name lvm")
    assert node.fail("lxc-info -n slot6 -s")
    assert [r["location"] for r in slot_json(node, "show", NODE)] == [MANAGER, DHCP, SERVICE]

    out = node.succeed(f"slot install dns_master {DNS} --address 10.0.249.1/24 --hostname dns1", timeout=180)
    assert out.splitlines()[1].split()[:3] == [NODE, DNS, "dns_master"]
    assert node.succeed("blockdev --getsize64 /dev/mapper/lvm-slot6-0") == str(16 << 20)
    assert status_of(node, DNS) == "ON"
    query = "env PYTHONPATH=/usr/lib/cbios/python python3 -m cbios.node.dnsquery"
    # ON means its health check passed inside the slot; from the node, its new bridge port
    # forwards after STP's 2 x forward_delay.
    assert node.wait_until_succeeds(f"{query} 10.0.249.1 cluster SOA", timeout=30) == "SOA"


MALFORMED = [
    (b"this is not json\n", "not JSON"),
    (b'{"v": 1, "op": "lv.destroy", "args": {}}\n', "unknown request 'lv.destroy'"),
    (b'{"v": 1, "op": "volume.remove", "args": {"volume": "root"}}\n', "'root' is not a slot volume"),
    (b'{"v": 1, "op": "volume.write", "args": {"volume": "var", "template": "dhcp"}}\n', "not a slot volume"),
    (b'{"v": 1, "op": "volume.put", "args": {"volume": "slot2-0", "path": "../../etc/shadow", "content": "x"}}\n',
     "leaves its volume"),
    (b'{"v": 1, "op": "container.start", "args": {"eid": "2; reboot"}}\n', "must be a whole number"),
]


# One request to CB-Executor, base64 in REQUEST; its answer within a bound: a request that
# blocks it shows as a timeout here, not as a hung test.
EXECUTOR_ASK = ("python3 -c 'import base64,socket; s=socket.socket(socket.AF_UNIX); s.settimeout(20); "
                "s.connect(\"/run/cbios/executor/executor.sock\"); "
                "s.sendall(base64.b64decode(\"{request}\") + b\"\\n\"); "
                "print(s.makefile().readline())'")


def test_executor_refuses_malformed_requests_and_changes_nothing(node: Machine) -> None:
    before = node.succeed("lvs --noheadings -o lv_name,lv_size lvm; ls /var/lib/lxc; sha256sum /etc/shadow")
    for raw, message in MALFORMED:
        node.succeed(f"echo {base64.b64encode(raw).decode()} | base64 -d > /tmp/req")
        answer = json.loads(node.succeed(
            "python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.settimeout(20); "
            "s.connect(\"/run/cbios/executor/executor.sock\"); s.sendall(open(\"/tmp/req\",\"rb\").read()); "
            "print(s.makefile().readline())'"))
        assert answer["ok"] is False and answer["code"] == "invalid", (raw, answer)
        assert message in answer["error"], (raw, answer)
    # A symbolic link planted in a volume does not lead out of it.
    node.succeed(f"slot stop {DHCP} && mount /dev/mapper/lvm-slot2-0 /mnt && ln -s /etc /mnt/etc && umount /mnt")
    answer = json.loads(node.succeed(
        "python3 -c 'import socket,json; s=socket.socket(socket.AF_UNIX); "
        "s.connect(\"/run/cbios/executor/executor.sock\"); s.sendall(json.dumps({\"v\": 1, \"op\": \"volume.put\", "
        "\"args\": {\"volume\": \"slot2-0\", \"path\": \"etc/shadow\", \"content\": \"x\"}}).encode() + b\"\\n\"); "
        "print(s.makefile().readline())'"))
    assert answer["ok"] is False and "not a directory of the volume" in answer["error"], answer
    node.succeed("mount /dev/mapper/lvm-slot2-0 /mnt && rm /mnt/etc && umount /mnt")
    # A FIFO the slot left where CB-Executor writes its settings: refused, not waited on.
    node.succeed(f"slot start {DHCP}")
    node.succeed("lxc-attach -n slot2 -- sh -c 'mv /var/slot.env /var/slot.env.kept && mkfifo /var/slot.env'")
    node.succeed(f"slot stop {DHCP}")
    put = json.dumps({"v": 1, "op": "volume.put", "args": {"volume": "slot2-0", "path": "slot.env", "content": "x"}})
    answer = json.loads(node.succeed(EXECUTOR_ASK.format(request=base64.b64encode(put.encode()).decode())))
    assert answer["ok"] is False and answer["error"] == "slot2-0: slot.env: not a plain file of the volume", answer
    listed = json.loads(node.succeed(EXECUTOR_ASK.format(request=base64.b64encode(
        b'{"v": 1, "op": "volume.list", "args": {}}').decode())))
    assert listed["ok"] and "slot2-0" in [v["volume"] for v in listed["result"]], listed
    node.succeed("mount /dev/mapper/lvm-slot2-0 /mnt && rm /mnt/slot.env && mv /mnt/slot.env.kept /mnt/slot.env "
                 f"&& umount /mnt && slot start {DHCP}")
    assert node.succeed("lvs --noheadings -o lv_name,lv_size lvm; ls /var/lib/lxc; sha256sum /etc/shadow") == before
    journal = node.succeed("journalctl -b -u cbios-executor --no-pager -o cat")
    assert "refused volume.remove: volume.remove: volume: 'root' is not a slot volume" in journal


# Root in a slot, as a compromised daemon of it would be: forks until the kernel says no.
FORKS = """lxc-attach -n slot2 -- python3 -c '
import os, signal
n = 0
try:
    while n < 100000:
        if os.fork() == 0:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            signal.pause()
        n += 1
except OSError as e:
    print(n, e.errno)'"""


def test_a_compromised_service_slot_cannot_reach_the_node_nor_exhaust_it(node: Machine, profile: Profile) -> None:
    """Root in the dhcp slot (lxc-attach: its namespaces, cgroup, capabilities and system-call
    filter). Its root is not the node's; the node's disks, its cluster key and its firmware are
    out of reach; a fork bomb and a memory hog stop at the slot's own limits, and the node
    stays ready."""
    slot = "lxc-attach -n slot2 --"
    pid = node.succeed("lxc-info -n slot2 -p -H")
    # A user namespace of its own: the slot's ids 0..65535 are the node's from contract.slot_ids(2).
    assert node.succeed(f"{slot} cat /proc/self/uid_map").split() == ["0", str(contract.slot_ids(2)), "65536"]
    assert node.succeed(f"stat -c %u /proc/{pid}") != "0"
    major, minor = node.succeed("cat /sys/block/$(basename $(readlink -f /dev/mapper/lvm-root))/dev").split(":")
    assert "Operation not permitted" in node.fail(f"{slot} mknod /tmp/root b {major} {minor} 2>&1")
    # Its volumes as the node mounts them: the node's root's and the slot's root's alone.
    assert node.succeed("stat -c %a:%u:%g /run/cbios/slots/slot2") == f"710:0:{contract.slot_ids(2)}"
    assert "Permission denied" in node.fail("setpriv --reuid=65534 --regid=65534 --clear-groups "
                                            "ls /run/cbios/slots/slot2/volume0 2>&1")
    # A device node the slot did not make, put on its volume by the node: opening it is refused.
    node.succeed(f"mknod /run/cbios/slots/slot2/volume0/cbios-root b {major} {minor}")
    assert "Permission denied" in node.fail(f"{slot} head -c 512 /var/cbios-root 2>&1")
    node.succeed("rm /run/cbios/slots/slot2/volume0/cbios-root")
    node.fail(f"{slot} cat /var/lib/cbios/secrets/cluster.key")
    assert "Read-only file system" in node.fail(f"{slot} touch /usr/lib/cbios/cbios-was-here 2>&1")
    # System calls that reach past the slot are refused by its filter (seccomp), even those
    # any process may make elsewhere: keyctl (250), the kernel's keyring, here.
    assert node.succeed(f"{slot} python3 -c 'import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
                        "print(libc.syscall(250, 0, -3, 1), ctypes.get_errno())'") == "-1 1"
    assert node.succeed("python3 -c 'import ctypes; print(ctypes.CDLL(None).syscall(250, 0, -3, 1) > 0)'") == "True"
    cgroup = "/sys/fs/cgroup" + node.succeed(f"sed -n 's/^0:://p' /proc/{pid}/cgroup")
    limit = int(node.succeed(f"cat {cgroup}/pids.max"))
    assert limit == 128, limit  # the dhcp template's
    forks, errno = node.succeed(FORKS, timeout=120).split()
    print(f"fork bomb in slot 2: {forks} forks, then errno {errno}; pids.max {limit}")
    assert int(forks) < limit and errno == "11"  # EAGAIN: the slot's pids are spent, not the node's
    assert status_of(node, DNS) == "ON" and node.succeed("echo answered") == "answered"
    node.succeed("pkill -KILL -f 'import os, signa[l]'")  # the bomb's children ([l]: not this shell)
    node.wait_until_succeeds(f"test $(cat {cgroup}/pids.current) -lt 16", timeout=60)
    assert int(node.succeed(f"cat {cgroup}/memory.max")) == 128 << 20
    rc, out = node.execute(f"{slot} python3 -c 'b = bytearray(192 << 20); print(len(b))' 2>&1", timeout=120)
    assert rc != 0 and "201326592" not in out, (rc, out)
    assert int(node.succeed(f"grep -w oom_kill {cgroup}/memory.events").split()[1]) >= 1
    assert node.succeed(f"slot restart {DHCP}", timeout=180).startswith(f"{DHCP} dhcp: ON")


# -- the cluster: this node and the peer ------------------------------------------------

def timed(m: Machine, command: str) -> tuple[int, str, str, float]:
    """COMMAND's status, stdout, stderr, and its time measured in the guest."""
    out = m.succeed(f"s=$(date +%s%N); rc=0; {command} >/tmp/t.out 2>/tmp/t.err || rc=$?; e=$(date +%s%N); "
                    "echo $rc $(( (e - s) / 1000000 )); cat /tmp/t.out; echo @@; cat /tmp/t.err", timeout=120)
    head, _, rest = out.partition("\n")
    stdout, _, stderr = rest.partition("@@")
    rc, ms = head.split()
    return int(rc), stdout.strip("\n"), stderr.strip("\n"), int(ms) / 1000


KEY_FILE = Path(__file__).resolve().parents[2] / "profiles/keys/qemu-test-cluster.key"


def test_a_node_without_the_cluster_key_runs_its_slots_and_says_why_the_others_are_missing(
        node: Machine, peer: Machine, peer_profile: Profile) -> None:
    ready_peer(peer, peer_profile)
    rc, out, err, _ = timed(node, "slot show")
    assert rc == 1, (out, err)
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    assert rows[DHCP][7] == "ON" and rows[PEER][:5] == [PEER, PEER, "-", "10.0.249.19", "UNREACHABLE"], rows
    assert err == (f"slot: node {PEER} unreachable: no cluster key on this node (/var/lib/cbios/secrets/cluster.key): "
                   "set one with `cbios cluster set-key`"), err
    rc, out = node.execute("cbios cluster key")
    assert rc == 1 and out.startswith("no cluster key"), out
    # The operator sets it on each node: it is in no artifact of the build (test_build_and_check).
    for m in (node, peer):
        assert "cluster key" in set_key(m)
    assert node.succeed("cbios cluster key") == peer.succeed("cbios cluster key")


def set_key(m: Machine) -> str:
    """`cbios cluster set-key` on M with the tests' key, as the operator does."""
    return m.succeed(f"echo {base64.b64encode(KEY_FILE.read_bytes()).decode()} | base64 -d | cbios cluster set-key -")


@pytest.fixture(scope="module")
def keyed(node: Machine, peer: Machine, peer_profile: Profile) -> None:
    """Both nodes ready and holding the cluster key (the test above sets it the same way;
    this lets each cluster test run alone with -k)."""
    ready_peer(peer, peer_profile)
    for m in (node, peer):
        set_key(m)


@pytest.mark.usefixtures("keyed")
def test_slot_show_lists_the_slots_of_every_node_of_the_cluster(node: Machine, peer: Machine) -> None:
    rc, out, err, seconds = timed(node, "slot show")
    alone = [timed(node, f"slot show {n}")[3] for n in (NODE, PEER)]
    print(f"slot show across two nodes: {seconds:.2f} s; this node's alone {alone[0]:.2f} s, "
          f"the other's {alone[1]:.2f} s")
    assert rc == 0 and err == "", (out, err)
    lines = out.splitlines()
    assert lines[0].split() == COLUMNS
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    mine = [r["location"] for r in slot_json(node, "list", NODE)]  # as the tests before left them
    assert mine[:2] == [MANAGER, DHCP]
    assert list(rows) == [*mine, PEER_MANAGER, PEER_DHCP, PEER_DNS, PEER_COMPUTE]
    assert rows[PEER_DNS][:3] == [PEER, PEER_DNS, "dns_master"]
    assert rows[PEER_DNS][4:7] == ["10.0.249.101", "dns-master2", "ON"]
    assert rows[PEER_MANAGER][-2:] == ["ON", "CB-Manager"] and rows[PEER_DHCP][7] == "OFF"
    assert all(row[0] == NODE for loc, row in rows.items() if loc.startswith(NODE[:8]))
    # One node: asked by its ObjectID; one of its slots in detail; and the other way round.
    listed = [line.split() for line in node.succeed(f"slot list {PEER}").splitlines()]
    assert listed[0] == ["ParentID", "Location", "Type", "Status"]
    assert [row[:2] for row in listed[1:]] == [[PEER, loc] for loc in (PEER_MANAGER, PEER_DHCP, PEER_DNS,
                                                                      PEER_COMPUTE)]
    runtime = node.succeed(f"slot show-runtime {PEER_DNS}")
    assert re.search(rf"^ObjectID\s+{PEER_DNS}$", runtime, re.M) and re.search(r"^State\s+RUNNING$", runtime, re.M)
    assert re.search(r"^Hostname\s+dns-master2$", runtime, re.M)
    assert [r["location"] for r in slot_json(peer, "list") if r["parent"] == NODE] == mine


@pytest.mark.usefixtures("keyed")
def test_slot_stop_and_start_of_the_other_nodes_slot_act_there(node: Machine, peer: Machine) -> None:
    out = node.succeed(f"slot stop {PEER_DNS}", timeout=120)
    assert out.startswith(f"{PEER_DNS} dns_master: OFF"), out
    assert peer.succeed("lxc-info -n slot6 -s -H") == "STOPPED"
    assert {r["location"]: r["status"] for r in slot_json(peer, "show", PEER)}[PEER_DNS] == "OFF"
    assert lxc_state(node, 6) == "RUNNING"  # this node's slot 6 is another slot
    out = node.succeed(f"slot start {PEER_DNS}", timeout=300)
    assert out.startswith(f"{PEER_DNS} dns_master: ON"), out
    assert peer.succeed("lxc-info -n slot6 -s -H") == "RUNNING"
    rc, out = node.execute("slot stop 31000041975 2>&1")
    assert rc == 2 and out == "slot: 31000041010: 31000041975: no such slot on node 31000041010", out


# Requests to the peer's CB-Manager from this node's CB-Manager's container (a member's
# address, and the key at hand), made by hand: with no MAC, another key, and so on.
CREDENTIALS_PROBE = r"""lxc-attach -n slot0 -- python3 - <<'EOF'
import json, socket, sys
sys.path.insert(0, "/usr/lib/cbios/python")
from cbios.node import cluster
KEY = open("/run/cbios/secrets/cluster.key", "rb").read().strip()
ME, PEER = "31000040010", "31000041010"

def send(make):
    with socket.create_connection(("10.0.249.19", 7475), timeout=10) as s:
        answers = s.makefile("rb")
        msg = make(json.loads(answers.readline())["challenge"])
        s.sendall((msg if isinstance(msg, bytes) else json.dumps(msg).encode()) + b"\n")
        return json.loads(answers.readline())

stop = {"object_id": "31000041675"}
kept = {}

def signed(challenge):
    kept["msg"] = cluster.request(KEY, ME, PEER, challenge, "slots", {"object_id": PEER})
    return kept["msg"]

print(json.dumps({
    "bare": send(lambda c: {"v": 1, "op": "stop", "args": stop}),
    "wrong key": send(lambda c: cluster.request(b"k" * 32, ME, PEER, c, "stop", stop)),
    "not a member": send(lambda c: cluster.request(KEY, "31000099010", PEER, c, "stop", stop)),
    "for another node": send(lambda c: cluster.request(KEY, ME, ME, c, "stop", stop)),
    "another challenge": send(lambda c: cluster.request(KEY, ME, PEER, "0" * 32, "stop", stop)),
    "not JSON": send(lambda c: b"stop 31000041675"),
    "signed": send(signed),
    "replayed": send(lambda c: kept["msg"]),
}))
EOF"""
# From the node's own address, which is no member's: a challenge (a node may ask to join,
# with the key), and the request denied.
STRANGER_PROBE = """python3 -c '
import socket
s = socket.create_connection(("10.0.249.19", 7475), timeout=10)
s.sendall(b"{\\"v\\": 1, \\"op\\": \\"slots\\", \\"args\\": {}}\\n")
print(s.makefile("rb").read().decode())'"""


@pytest.mark.usefixtures("keyed")
def test_requests_without_the_clusters_credentials_are_refused(node: Machine, peer: Machine) -> None:
    answers = json.loads(node.succeed(CREDENTIALS_PROBE))
    signed = answers.pop("signed")
    assert signed["ok"] and PEER_DNS in [r["location"] for r in signed["result"]] and len(signed["mac"]) == 64
    for what, answer in answers.items():
        assert answer == {"ok": False, "code": "denied", "error": "not authenticated"}, (what, answer)
    stranger = node.succeed(STRANGER_PROBE).splitlines()
    assert [sorted(json.loads(line)) for line in stranger] == [["challenge"], ["code", "error", "ok"]], stranger
    assert json.loads(stranger[1]) == {"ok": False, "code": "denied", "error": "not authenticated"}
    assert peer.succeed("lxc-info -n slot6 -s -H") == "RUNNING"  # none of the stops was done
    log = "/var/log/cbios/slots/slot0.console.log"
    peer.wait_until_succeeds(f"grep -c 'cluster: refused a request from 10.0.249.9: ' {log} | grep -qx 7", timeout=30)
    peer.succeed(f"grep -q 'cluster: refused a request from 10.0.249.10: no credentials' {log}")
    # The key: root's on the node's /var and CB-Manager's group's (slot 0, where it is under
    # /run), no other slot's; none in the firmware.
    assert node.succeed("stat -c %a:%U:%G /var/lib/cbios/secrets /var/lib/cbios/secrets/cluster.key").split() == [
        "2770:root:cbios-manager", "640:root:cbios-manager"]
    node.succeed("lxc-attach -n slot0 -- test -s /run/cbios/secrets/cluster.key")
    for eid in (2, 6):
        node.fail(f"lxc-attach -n slot{eid} -- cat /var/lib/cbios/secrets/cluster.key")
    node.fail("ls -A /usr/lib/cbios/secrets")


@pytest.mark.usefixtures("keyed")
def test_the_key_rotates_on_both_nodes_with_no_reflash(node: Machine, peer: Machine) -> None:
    before = node.succeed("cbios cluster key").split()[1]
    rows = [line.split() for line in node.succeed("cbios cluster rotate-key").splitlines()]
    assert [r[:2] for r in rows] == [[NODE, "ROTATED"], [PEER, "ROTATED"]] and rows[0][2] == rows[1][2] != before
    for m in (node, peer):
        assert m.succeed("cbios cluster key").splitlines() == [f"current:  {rows[0][2]}", f"previous: {before}"]
    for m, other in ((node, PEER_DNS), (peer, DNS)):
        rc, out, err, _ = timed(m, "slot show")
        assert rc == 0 and other in out, (out, err)


@pytest.mark.usefixtures("keyed")
def test_a_third_node_joins_the_running_cluster_with_no_new_firmware_on_the_other_two(
        node: Machine, peer: Machine, third: Machine, third_profile: Profile) -> None:
    ready_peer(third, third_profile)
    boots = [m.succeed("cat /proc/sys/kernel/random/boot_id") for m in (node, peer)]
    assert {r["parent"] for r in slot_json(third, "show")} == {THIRD}  # its firmware lists no other node
    # The operator gives it the cluster's key as it is now (rotated above), from a member.
    key = node.succeed("base64 -w0 /var/lib/cbios/secrets/cluster.key")
    third.succeed(f"echo {key} | base64 -d | cbios cluster set-key -")
    rows = [line.split() for line in third.succeed("cbios cluster join 10.0.249.9", timeout=120).splitlines()]
    assert rows == [[NODE, "10.0.249.9", "JOINED"], [PEER, "10.0.249.19", "TOLD"]], rows
    for m in (node, peer, third):
        rc, out, err, seconds = timed(m, "slot show")
        print(f"slot show across three nodes, on {m.name}: {seconds:.2f} s")
        assert rc == 0 and err == "", (m.name, out, err)
        assert {line.split()[0] for line in out.splitlines()[1:]} == {NODE, PEER, THIRD}, (m.name, out)
        assert THIRD_MANAGER in out
    members = [line.split() for line in third.succeed("cbios cluster members").splitlines()]
    assert members == [[THIRD, "-", "THIS", "NODE"], [NODE, "10.0.249.9", "REACHABLE"],
                       [PEER, "10.0.249.19", "REACHABLE"]], members
    # Kept on CB-Manager's volume, not in any firmware; and the other two neither rebooted nor reflashed.
    kept = json.loads(node.succeed("lxc-attach -n slot0 -- cat /var/lib/cbios/cluster-members.json"))
    assert {n["object_id"]: n["address"] for n in kept["nodes"]} == {PEER: "10.0.249.19", THIRD: "10.0.249.29"}
    assert [m.succeed("cat /proc/sys/kernel/random/boot_id") for m in (node, peer)] == boots
    # It leaves: both told; the cluster is the two again.
    rows = [line.split() for line in third.succeed("cbios cluster leave", timeout=120).splitlines()]
    assert rows == [[NODE, "10.0.249.9", "TOLD"], [PEER, "10.0.249.19", "TOLD"]], rows
    for m in (node, peer):
        assert {r["parent"] for r in slot_json(m, "show")} == {NODE, PEER}
    third.shutdown()


@pytest.mark.usefixtures("keyed")
def test_with_the_other_node_off_slot_show_reports_it_unreachable_within_the_bound(
        node: Machine, peer: Machine) -> None:
    peer.shutdown()
    rc, out, err, seconds = timed(node, "slot show")
    print(f"slot show with the other node off: {seconds:.2f} s")
    assert rc == 1 and seconds < CLUSTER_BOUND + 3, (rc, seconds, out, err)  # listed, but not all answered
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    assert list(rows) == [*(r["location"] for r in slot_json(node, "list", NODE)), PEER]
    # ParentID Location Type (-), no Version, IP, no Hostname, Status, Description
    assert rows[PEER][:5] == [PEER, PEER, "-", "10.0.249.19", "UNREACHABLE"], rows[PEER]
    assert rows[DHCP][7] == "ON"
    assert err.startswith(f"slot: node {PEER} unreachable: ") and len(err.splitlines()) == 1, err
    rc, out, err, seconds = timed(node, f"slot stop {PEER_DNS}")
    assert rc == 1 and seconds < CLUSTER_BOUND + 3 and out == "", (rc, seconds, out, err)
    assert err.startswith(f"slot: unreachable: node {PEER} at 10.0.249.19:7475") and len(err.splitlines()) == 1, err


@pytest.mark.usefixtures("keyed")
def test_after_a_reboot_the_registry_is_intact_and_autostart_slots_are_on(node: Machine, profile: Profile) -> None:
    leases = node.succeed("lxc-attach -n slot2 -- cat /var/lib/dnsmasq/leases")
    key = node.succeed("cbios cluster key").splitlines()[0]
    node.succeed("systemctl reboot")
    node.wait_ready(profile.qemu.ready_timeout)
    rows = {r["location"]: r for r in slot_json(node, "show", NODE)}
    assert sorted(rows) == [MANAGER, DHCP, SERVICE, DNS]
    assert {r["location"] for r in rows.values() if r["status"] == "ON"} == {MANAGER, DHCP, DNS}
    assert rows[SERVICE]["status"] == "OFF"  # not autostart
    assert rows[DNS]["hostname"] == "dns1"  # as installed, not as the firmware first had it
    assert node.succeed("lxc-attach -n slot2 -- cat /var/lib/dnsmasq/leases") == leases
    assert lxc_state(node, 6) == "RUNNING"
    assert node.succeed("cbios cluster key").splitlines()[0] == key  # on /var: kept


def test_a_committed_copy_whose_autostart_slot_never_gets_healthy_stays_up(node: Machine, profile: Profile) -> None:
    """The dhcp slot, broken or hostile, leaves a file where its run script makes dnsmasq's
    directory: it can never start again. The committed copy says FAILED and stays up."""
    node.succeed("lxc-attach -n slot2 -- sh -c 'rm -rf /var/lib/dnsmasq && touch /var/lib/dnsmasq'")
    node.succeed("systemctl reboot")
    verdict = node.wait_report(("FAILED", "READY"), profile.qemu.ready_timeout)
    assert verdict.startswith("FAILED") and "copy=root" in verdict and "check=50-slots" in verdict, verdict
    boot = node.succeed("cat /proc/sys/kernel/random/boot_id")
    node.wait_until_succeeds("systemctl show -p ActiveState --value cbios-health | grep -qx failed", timeout=60)
    journal = node.succeed("journalctl -b -u cbios-health --no-pager -o cat")
    assert "copy root is committed: it stays up, and says so (no reboot loop)" in journal, journal
    rows = {r["location"]: r for r in slot_json(node, "show", NODE)}
    assert rows[DHCP]["status"] == "FAILED" and rows[DNS]["status"] == "ON"
    st = json.loads(node.succeed("cbios status --json"))
    assert st["copies"]["root"]["state"] == "good" and "50-slots" in st["last_failure"], st
    assert node.succeed("cat /proc/sys/kernel/random/boot_id") == boot
