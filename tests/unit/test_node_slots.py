"""Slots, with no VM: CB-Executor's request checks, the LXC configuration it writes,
CB-Manager's registry and operations against a recording executor, the slot CLI's tables,
and the baked slots.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cbios import render
from cbios.errors import ProfileError
from cbios.node import contract, manager, slotcli, wire
from cbios.node.executor import lxcconf, requests
from cbios.node.manager import registry
from cbios.node.wire import Failed, Invalid
from cbios.profile import load_profile
from cbios.profile import template as slot_template
from cbios.project import Project

NODE = "31000040010"

# -- CB-Executor's requests ------------------------------------------------------------

REFUSED = [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "a request is a JSON object"),
    (b'{"v": 2, "op": "hello"}', "protocol version 2"),
    (b'{"v": 1, "op": "hello", "extra": 1}', "unknown field(s) extra"),
    (b'{"v": 1, "op": 7}', "'op' must be a string"),
]


@pytest.mark.parametrize("line,message", REFUSED)
def test_malformed_lines_are_refused(line: bytes, message: str) -> None:
    with pytest.raises(Invalid, match=message.replace("(", r"\(").replace(")", r"\)")):
        wire.decode(line)


BAD_REQUESTS = [
    ("lv.destroy", {}, "unknown request 'lv.destroy'"),
    ("volume.remove", {"volume": "root"}, "'root' is not a slot volume"),
    ("volume.remove", {"volume": "../root"}, "is not a slot volume"),
    ("volume.remove", {"volume": "slot2-0", "vg": "other"}, "unknown argument(s) vg"),
    ("volume.create", {"volume": "slot2-0"}, "missing argument 'size'"),
    ("volume.create", {"volume": "slot2-0", "size": 1 << 50}, "size: must be a whole number"),
    ("volume.create", {"volume": "slot2-0", "size": True}, "size: must be a whole number"),
    ("volume.put", {"volume": "slot2-0", "path": "../../etc/shadow", "content": ""}, "leaves its volume"),
    ("volume.put", {"volume": "slot2-0", "path": "/etc/shadow", "content": ""}, "leaves its volume"),
    ("volume.put", {"volume": "slot2-0", "path": "a/./b", "content": ""}, "leaves its volume"),
    ("container.start", {"eid": 10}, "eid: must be a whole number from 0 to 9"),
    ("container.define", {"eid": 2, "template": "dhcp", "volumes": [1]}, "must include volume 0"),
    ("container.define", {"eid": 2, "template": "dhcp", "volumes": [0], "address": "10.0.0.1"},
     "not an IPv4 address with prefix"),
    ("container.define", {"eid": 2, "template": "dhcp", "volumes": [0], "hostname": "Bad_Name"},
     "not a host name"),
    ("container.define", {"eid": 2, "template": "../x", "volumes": [0]}, "not a template name"),
]


@pytest.mark.parametrize("op,args,message", BAD_REQUESTS)
def test_bad_requests_are_refused_before_anything_is_done(op: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(Invalid) as err:
        requests.check(op, args)
    assert message in str(err.value)


def test_good_requests_are_normalised() -> None:
    args = requests.check("container.define", {"eid": 2, "template": "dhcp", "volumes": [1, 0],
                                               "address": "10.0.249.52/24"})
    assert args == {"eid": 2, "template": "dhcp", "volumes": [0, 1], "address": "10.0.249.52/24"}
    assert requests.check("volume.put", {"volume": "slot2-0", "path": "etc/cbios/slot.env", "content": "x"})


def test_executor_keeps_slot_0_for_cb_manager_alone(tmp_path: Path) -> None:
    from cbios.node.executor import Executor

    ex = Executor({"vg": "lvm", "bridge": "br0", "node": {"object_id": NODE}},
                  {"dhcp": {"type": "lxc-service"}, "cb-manager": {"type": "lxc-service"}}, templates=tmp_path)
    for eid, template in ((3, "cb-manager"), (0, "dhcp")):
        with pytest.raises(Invalid, match=rf"slot 0 is cb-manager, and cb-manager only slot 0 \(asked: {template}"):
            ex.handle("container.define", {"eid": eid, "template": template, "volumes": [0]})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("kind", "default", "value", "expected"), [
    ("ipv4-range", "", "10.0.0.100,10.0.0.200", "10.0.0.100,10.0.0.200"),
    ("ipv4-range", "", "", ""),
    ("ipv4-list", "10.0.0.1", "10.0.0.1,10.0.0.2", "10.0.0.1,10.0.0.2"),
    ("ipv4-network", "", "10.0.249.0/24", "10.0.249.0/24"),
    ("ipv4-network", "", "10.0.249.52", "10.0.249.52/32"),
    ("port", "9100", "8080", "8080"),
    ("domain", "", "cluster.local", "cluster.local"),
])
def test_slot_parameters_of_their_type_pass(kind: str, default: str, value: str, expected: str) -> None:
    from cbios.node import slotparams
    assert slotparams.check(kind, default, value) == expected


@pytest.mark.parametrize(("kind", "default", "value"), [
    ("ipv4-range", "", "10.0.0.200,10.0.0.100"),
    ("ipv4-list", "10.0.0.1", "10.0.0.1 -a eth1"),
    ("ipv4-list", "10.0.0.1", ""),
    ("ipv4-network", "", "*"),
    ("ipv4-network", "", "10.0.249.1/24"),
    ("port", "9100", "0"),
    ("port", "9100", "65536"),
    ("domain", "", "a..b"),
    ("domain", "", "x; rm -rf /"),
])
def test_slot_parameters_of_another_shape_are_refused(kind: str, default: str, value: str) -> None:
    from cbios.node import slotparams
    with pytest.raises(ValueError):
        slotparams.check(kind, default, value)


def test_executor_refuses_unknown_templates(tmp_path: Path) -> None:
    from cbios.node.executor import Executor

    ex = Executor({"vg": "lvm", "bridge": "br0", "node": {"object_id": NODE}}, {"dhcp": {"type": "lxc-service"}},
                  templates=tmp_path)
    with pytest.raises(Invalid, match="no template 'ldap'"):
        ex.handle("volume.write", {"volume": "slot2-0", "template": "ldap"})


def test_the_wire_round_trip_over_a_real_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading

    monkeypatch.setattr(wire, "READ_TIMEOUT", 0.5)
    sock = tmp_path / "s.sock"
    ready = threading.Event()

    def handler(op: str, args: dict[str, Any]) -> Any:
        if op == "fail":
            raise Failed("it broke")
        return requests.check(op, args)

    threading.Thread(target=wire.serve, args=(sock, handler), kwargs={"ready": ready.set}, daemon=True).start()
    assert ready.wait(5)
    assert wire.call(sock, "container.state", {"eid": 3}) == {"eid": 3}
    with pytest.raises(wire.RemoteError) as err:
        wire.call(sock, "volume.remove", {"volume": "lvm/root"})
    assert err.value.code == "invalid" and "not a slot volume" in str(err.value)
    with pytest.raises(wire.RemoteError) as err:
        wire.call(sock, "fail")
    assert err.value.code == "failed"
    # A caller that never ends its line is dropped, and nothing is done for it.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b'{"v": 1, "op": "hello"')
        assert s.recv(100) == b""


def test_cb_executor_takes_the_socket_systemd_made_for_it(tmp_path: Path) -> None:
    """Socket activation, with systemd's own tool: a caller waits on the socket until
    CB-Executor has started, and the daemon makes no socket of its own."""
    import os
    import subprocess
    import sys

    listening, own = tmp_path / "activated.sock", tmp_path / "own.sock"
    server = ("import os, sys; from pathlib import Path; from cbios.node import wire; "
              "wire.serve(Path(sys.argv[1]), lambda op, args: {'op': op, 'inherited': os.get_inheritable(3), "
              "'env': sorted(k for k in os.environ if k.startswith('LISTEN_'))})")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(listening), sys.executable, "-c", server, str(own)],
                            env=env, stderr=subprocess.PIPE)
    try:
        assert wire.wait_for(listening, 10), proc.stderr
        # The daemon's children neither see the socket as theirs nor inherit it.
        assert wire.call(listening, "container.list") == {"op": "container.list", "inherited": False, "env": []}
        assert not own.exists()
    finally:
        proc.terminate()
        proc.wait(10)


def test_cb_executor_socket_is_where_the_node_calls_and_cb_managers_alone(project: Project, tmp_path: Path) -> None:
    render.render_overlays(project, load_profile(project, "qemu-test"), tmp_path)
    unit = (tmp_path / "usr/lib/systemd/system/cbios-executor.socket").read_text().splitlines()
    assert f"ListenStream={contract.EXECUTOR_SOCKET}" in unit
    assert {"SocketMode=0660", f"SocketGroup={contract.MANAGER_USER}"} <= set(unit)
    # That group is slot 0's root on the node: the first id of its user namespace.
    users = (tmp_path / "usr/lib/sysusers.d/cbios.conf").read_text()
    assert f"u {contract.MANAGER_USER} {contract.slot_ids(contract.MANAGER_EID)} " in users
    tmpfiles = (tmp_path / "usr/lib/tmpfiles.d/cbios-slots.conf").read_text().splitlines()
    assert f"d {contract.EXECUTOR_SOCKET.parent} 0750 root {contract.MANAGER_USER} -" in tmpfiles


# -- the LXC configuration ---------------------------------------------------------------

def definition(**kw: Any) -> lxcconf.Definition:
    base: dict[str, Any] = dict(eid=2, template="dhcp", kind="lxc-service", vg="lvm", bridge="br0", node_id=NODE,
                                hostname="dhcpd52", address="10.0.249.52/24", volumes=(0,))
    base.update(kw)
    return lxcconf.Definition(**base)


def test_lxc_service_shares_the_root_and_has_its_volume_as_var() -> None:
    text = lxcconf.render(definition())
    assert "lxc.rootfs.path = dir:/\n" in text
    mounts = contract.SLOT_MOUNTS / "slot2"
    assert f"lxc.mount.entry = {mounts}/volume0 var none bind,idmap=container 0 0\n" in text
    assert f"lxc.init.cmd = {contract.TEMPLATES}/dhcp/run\n" in text
    assert "lxc.net.0.link = br0\nlxc.net.0.name = eth0\nlxc.net.0.veth.pair = veth2\n" in text
    assert "lxc.net.0.ipv4.address = 10.0.249.52/24\n" in text
    assert "lxc.uts.name = dhcpd52\n" in text


def test_lxc_system_boots_its_own_root_from_volume_0() -> None:
    text = lxcconf.render(definition(kind="lxc-system", template="ldap", volumes=(0, 1)))
    mounts = contract.SLOT_MOUNTS / "slot2"
    assert f"lxc.rootfs.path = dir:{mounts}/volume0\nlxc.rootfs.options = idmap=container\n" in text
    assert "lxc.init.cmd" not in text
    assert f"lxc.mount.entry = {mounts}/volume1 srv/volume1 none bind,idmap=container 0 0" in text


@pytest.mark.parametrize("kind", ["lxc-service", "lxc-system"])
def test_every_slot_has_a_user_namespace_of_its_own(kind: str) -> None:
    maps = [[line for line in lxcconf.render(definition(kind=kind, eid=eid)).splitlines()
             if line.startswith("lxc.idmap")] for eid in (0, 2)]
    assert maps[0] == [f"lxc.idmap = u 0 {contract.slot_ids(0)} 65536", f"lxc.idmap = g 0 {contract.slot_ids(0)} 65536"]
    assert maps[1] == [f"lxc.idmap = u 0 {contract.slot_ids(2)} 65536", f"lxc.idmap = g 0 {contract.slot_ids(2)} 65536"]
    assert contract.slot_ids(0) > 0 and contract.slot_ids(0) + 65536 <= contract.slot_ids(1)  # none shared


def test_a_privileged_template_is_the_stated_exception(project: Project) -> None:
    text = lxcconf.render(definition(template="nfs", volumes=(0, 1), privileged=True))
    assert "lxc.idmap" not in text and "idmap=container" not in text
    assert f"lxc.mount.entry = {contract.SLOT_MOUNTS}/slot2/volume1 srv/volume1 none bind,create=dir 0 0" in text
    stated = {name: slot_template.load_template(project, name).privileged for name in slot_template.available(project)}
    assert [name for name, why in stated.items() if why] == ["nfs"]
    assert "nfsd" in str(stated["nfs"])


def test_an_i386_slot_has_lxcs_32_bit_personality_and_a_node_architecture_slot_none() -> None:
    text = lxcconf.render(definition(kind="lxc-system", template="legacy32", architecture="i386"))
    assert "lxc.arch = i686" in text.splitlines()
    for kind in ("lxc-service", "lxc-system"):
        assert "lxc.arch" not in lxcconf.render(definition(kind=kind))


def test_cb_executor_defines_a_slot_with_its_templates_architecture_and_shows_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cbios.node.executor as executor

    monkeypatch.setattr(executor, "LXC_PATH", tmp_path / "lxc")
    monkeypatch.setattr(executor, "_run", lambda argv, **kw: "")  # no LVM, no LXC here: nothing runs
    monkeypatch.setattr(lxcconf, "LOG_DIR", str(tmp_path / "logs"))
    catalogue = {"legacy32": {"type": "lxc-system", "architecture": "i386"}, "service": {"type": "lxc-system"}}
    ex = executor.Executor({"vg": "lvm", "bridge": "br0", "node": {"object_id": NODE}}, catalogue,
                           templates=tmp_path / "templates")
    monkeypatch.setattr(ex, "_stopped", lambda eid, what: None)
    monkeypatch.setattr(ex, "_need", lambda volume: None)
    for eid, template in ((8, "legacy32"), (5, "service")):
        ex.handle("container.define", {"eid": eid, "template": template, "volumes": [0]})
    config = (tmp_path / "lxc/slot8/config").read_text().splitlines()
    assert "lxc.arch = i686" in config
    assert "lxc.arch" not in (tmp_path / "lxc/slot5/config").read_text()
    # template.json without an architecture (an older firmware's) is the node's.
    assert ex.handle("container.runtime", {"eid": 8})["architecture"] == "i386"
    assert ex.handle("container.runtime", {"eid": 5})["architecture"] == contract.NODE_ARCHITECTURE


def test_show_runtime_names_the_slots_architecture() -> None:
    info = {"location": "31000040875", "parent": NODE, "type": "legacy32", "kind": "lxc-system",
            "architecture": "i386", "version": "1.0", "status": "ON", "state": "RUNNING", "pid": 42,
            "veth": "veth8", "bridge": "br0", "root_ids": contract.slot_ids(8), "ips": ["10.0.249.8"],
            "health": {"ok": True, "output": "legacy32 runs on i686 i386"}, "volumes": [], "console_log": "x"}
    rows = dict(line.split(None, 1) for line in slotcli.runtime_text(info).splitlines() if line.strip())
    assert rows["Architecture"] == "i386" and rows["PID"] == "42" and rows["Kind"] == "lxc-system"
    del info["architecture"]  # a node whose CB-Executor is older than architectures
    assert "Architecture  -" in slotcli.runtime_text(info)


@pytest.mark.parametrize(("kind", "architecture", "message"), [
    ("lxc-service", "i386", "architecture: i386 is for lxc-system templates: an lxc-service slot runs from "
     "the node's root, so it is the node's (amd64)"),
    ("kvm-system", "i386", "architecture: i386 is not supported for kvm-system templates: the VM boots "
     "the node's amd64 kernel"),
    ("lxc-system", "arm64", "slot.yaml:4: architecture: Value error, 'arm64' is none of amd64, i386"),
])
def test_only_an_lxc_system_template_names_another_architecture(
        tmp_path: Path, kind: str, architecture: str, message: str) -> None:
    fake = Project(tmp_path, build_dir=tmp_path / "build")
    d = fake.slot_templates / "old"
    (d / "vm").mkdir(parents=True)
    for f in ("health", "run", "mkosi.conf", "vm/init"):
        (d / f).write_text("")
    vm = "vm: {memory: 128}\n" if kind == "kvm-system" else ""
    (d / "slot.yaml").write_text(f"type: {kind}\nversion: '1'\ndescription: x\narchitecture: {architecture}\n{vm}")
    with pytest.raises(ProfileError) as err:
        slot_template.load_template(fake, "old")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_templates_name_their_architecture_the_nodes_unless_they_say_otherwise(project: Project) -> None:
    archs = {name: slot_template.load_template(project, name).architecture for name in slot_template.available(project)}
    assert archs.pop("legacy32") == "i386"
    assert set(archs.values()) == {"amd64"}
    baked = slot_template.node_template("legacy32", slot_template.load_template(project, "legacy32"))
    assert baked["architecture"] == "i386" and baked["type"] == "lxc-system"


@pytest.mark.parametrize("kind", ["lxc-service", "lxc-system"])
def test_every_slot_is_confined_to_its_devices_system_calls_and_limits(kind: str) -> None:
    text = lxcconf.render(definition(kind=kind, memory=128 << 20, pids=64))
    lines = text.splitlines()
    assert "lxc.cgroup2.devices.deny = a" in lines
    allowed = [line.split(" = ")[1] for line in lines if line.startswith("lxc.cgroup2.devices.allow")]
    assert allowed and all(rule.startswith("c ") for rule in allowed)  # character devices only: no disk
    assert "c 1:3 rwm" in allowed and not any(rule.startswith("c 254:") or "*:*" in rule for rule in allowed)
    assert f"lxc.seccomp.profile = {lxcconf.SECCOMP}" in lines
    assert "mknod" in next(line for line in lines if line.startswith("lxc.cap.drop")).split()
    assert "lxc.cgroup2.memory.max = 134217728" in lines and "lxc.cgroup2.pids.max = 64" in lines
    assert "lxc.cgroup2.memory.swap.max = 0" in lines
    assert "lxc.console.size = 1MB" in lines and "lxc.console.rotate = 1" in lines


def test_a_log_past_its_bound_is_rotated_at_a_start(tmp_path: Path) -> None:
    log = tmp_path / "slot7.console.log"
    log.write_bytes(b"x" * 100)
    lxcconf.rotated(log, limit=100)
    assert log.exists() and not (tmp_path / "slot7.console.log.1").exists()
    log.write_bytes(b"y" * 101)
    lxcconf.rotated(log, limit=100)
    assert not log.exists() and (tmp_path / "slot7.console.log.1").read_bytes() == b"y" * 101
    lxcconf.rotated(log, limit=100)  # none yet: nothing to do


def test_a_log_past_its_bound_while_its_writer_runs_is_trimmed_in_place(tmp_path: Path) -> None:
    """QEMU's console (append=on) and LXC's log are written with O_APPEND by a process that
    keeps the file open: emptied in place, the writer goes on at the new end."""
    log = tmp_path / "slot7.console.log"
    with log.open("ab", buffering=0) as writer:
        writer.write(b"a" * 100)
        assert not lxcconf.trimmed(log, limit=100)
        writer.write(b"b" * 50)
        assert lxcconf.trimmed(log, limit=100)
        writer.write(b"c" * 10)
    assert log.read_bytes() == b"c" * 10  # no hole where the old bytes were
    assert (tmp_path / "slot7.console.log.1").read_bytes() == b"a" * 100 + b"b" * 50
    assert not lxcconf.trimmed(tmp_path / "none.log")


def test_cb_executor_trims_a_vms_console_and_lxcs_logs_of_running_slots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cbios.node.executor as executor

    monkeypatch.setattr(executor, "LXC_PATH", tmp_path / "lxc")
    monkeypatch.setattr(lxcconf, "LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(lxcconf, "LOG_MAX", 100)
    (tmp_path / "logs").mkdir()
    for eid, kind in ((2, "lxc-service"), (7, "kvm-system")):
        (tmp_path / "lxc" / f"slot{eid}").mkdir(parents=True)
        (tmp_path / "lxc" / f"slot{eid}" / executor.SIDE_FILE).write_text(json.dumps({"eid": eid, "kind": kind}))
        for path in (lxcconf.console_log(eid), lxcconf.lxc_log(eid)):
            path.write_bytes(b"x" * 101)
    executor.Executor({"vg": "lvm", "bridge": "br0", "node": {"object_id": NODE}}, {}).trim_logs_once()
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "logs").iterdir()}
    assert sizes == {"slot2.lxc.log": 0, "slot2.lxc.log.1": 101, "slot2.console.log": 101,  # LXC bounds it
                     "slot7.console.log": 0, "slot7.console.log.1": 101, "slot7.lxc.log": 101}


def test_the_seccomp_policy_is_lxcs_denylist_format(project: Project) -> None:
    policy = (project.overlays / "base" / lxcconf.SECCOMP.lstrip("/")).read_text().splitlines()
    assert policy[:2] == ["2", "denylist"]
    rules = [line.split() for line in policy[policy.index("[all]") + 1:] if line and not line.startswith("#")]
    assert {r[0] for r in rules} >= {"open_by_handle_at", "init_module", "finit_module", "kexec_load", "bpf"}
    assert all(r[1:] == ["errno", "1"] for r in rules)


def test_limits_come_from_the_template_unless_the_profile_sets_them(project: Project) -> None:
    base = load_profile(project, "qemu-test")
    changed = base.slots[1].model_copy(update={"limits": base.slots[1].limits.model_copy(update={"memory": "96M"})})
    profile = base.model_copy(update={"slots": [base.slots[0], changed, *base.slots[2:]]})
    slots = {s["eid"]: s for s in slot_template.node_slots(profile, slot_template.templates_of(project, profile))[
        "slots"]}
    eid = profile.slots[1].eid
    template = slot_template.load_template(project, profile.slots[1].template)
    assert slots[eid]["limits"] == {"memory": 96 << 20, "pids": template.limits.pids}
    assert slots[0]["limits"] == {"memory": 256 << 20, "pids": 256}  # cb-manager's slot.yaml
    for name in slot_template.available(project):
        text = (project.slot_templates / name / "slot.yaml").read_text()
        assert "kvm-system" in text or "\nlimits: {memory: " in text, f"{name} states no limits"


def test_template_configuration_is_substituted_and_strict() -> None:
    text = lxcconf.render(definition(extra="lxc.mount.entry = ${volume0} x none bind 0 0\n"))
    assert "lxc.mount.entry = /dev/mapper/lvm-slot2-0 x none bind 0 0" in text
    with pytest.raises(KeyError):
        lxcconf.render(definition(extra="${nope}"))


def test_macs_are_stable_and_distinct() -> None:
    assert lxcconf.mac_address(NODE, 2) == lxcconf.mac_address(NODE, 2)
    assert len({lxcconf.mac_address(NODE, e) for e in range(10)}) == 10


# -- CB-Manager --------------------------------------------------------------------------

class FakeExecutor:
    """Records requests; keeps volumes and container states as CB-Executor would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.volumes: dict[str, int] = {}
        self.states: dict[int, str] = {}
        self.healthy = True

    def __call__(self, op: str, **args: Any) -> Any:
        args = requests.check(op, args)  # what the manager sends must pass the executor's checks
        self.calls.append((op, args))
        if op == "volume.list":
            return [{"volume": v, "size": s} for v, s in sorted(self.volumes.items())]
        if op == "volume.create":
            self.volumes[args["volume"]] = args["size"]
        elif op == "volume.remove":
            del self.volumes[args["volume"]]
        elif op == "container.define":
            self.states.setdefault(args["eid"], "STOPPED")
        elif op == "container.undefine":
            del self.states[args["eid"]]
        elif op == "container.start":
            self.states[args["eid"]] = "RUNNING"
        elif op == "container.stop":
            self.states[args["eid"]] = "STOPPED"
        elif op == "container.state":
            return {"eid": args["eid"], "state": self.states.get(args["eid"], "UNDEFINED")}
        elif op == "container.list":
            return [{"eid": e, "state": s} for e, s in sorted(self.states.items())]
        elif op == "container.health":
            return {"ok": self.healthy, "output": "" if self.healthy else "port 67 closed"}
        elif op == "container.runtime":
            return {"kind": "lxc-service", "state": self.states[args["eid"]], "pid": 42, "veth": "veth2",
                    "bridge": "br0", "volumes": []}
        return None


@pytest.fixture
def config(project: Project) -> dict[str, Any]:
    profile = load_profile(project, "qemu-test")
    return slot_template.node_slots(profile, slot_template.templates_of(project, profile))


@pytest.fixture
def catalogue(project: Project) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ("cb-manager", "dhcp", "dns_master", "service", "sysmon", "compute", "boot-server"):
        out[name] = slot_template.node_template(name, slot_template.load_template(project, name))
    return out


def make_manager(config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path,
                 ex: FakeExecutor) -> manager.Manager:
    clock = iter(range(0, 10_000, 5))
    return manager.Manager(config, catalogue, executor=ex, registry_path=tmp_path / "registry.json",
                           clock=lambda: float(next(clock)), sleep=lambda _: None)


def test_first_start_installs_the_firmwares_slots_and_starts_them(
        config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    ex = FakeExecutor()
    ex.states[0] = "RUNNING"  # CB-Manager itself, brought up by cbios-slots.service
    m = make_manager(config, catalogue, tmp_path, ex)
    m.start()
    assert ex.volumes == {"slot2-0": 16 << 20, "slot4-0": 16 << 20, "slot5-0": 256 << 20, "slot6-0": 16 << 20,
                          "slot7-0": 64 << 20}
    assert ("volume.put", {"volume": "slot2-0", "path": "slot.env", "content": manager.slot_env(
        m.slots[2], config)}) in ex.calls
    rows = m.op_slots(NODE)
    assert [(r["location"], r["type"], r["ip"], r["hostname"], r["status"]) for r in rows] == [
        ("31000040075", "cb-manager", "10.0.249.9", "cbmanager", "ON"),
        ("31000040275", "dhcp", "10.0.249.52", "dhcpd52", "ON"),
        ("31000040475", "boot-server", "10.0.249.4", "boot4", "OFF"),  # not autostart
        ("31000040575", "service", "10.0.249.5", "service5", "OFF"),
        ("31000040675", "dns_master", "10.0.249.1", "dns-master", "ON"),
        ("31000040775", "compute", "10.0.249.70", "compute70", "OFF"),  # not autostart
    ]
    assert rows[1]["version"] == "0.901.25.28 2010-09-10" and rows[1]["description"] == "Sysmon Slot (DHCP)"
    assert m.op_ready()["ready"]
    saved = registry.load(tmp_path / "registry.json")
    assert saved is not None and sorted(saved) == [0, 2, 4, 5, 6, 7]
    assert ("volume.put", {"volume": "slot5-0", "path": "etc/cbios/slot.env", "content": manager.slot_env(
        m.slots[5], config)}) in ex.calls


def test_a_second_start_keeps_the_registry_and_does_not_rewrite_data(
        config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    ex = FakeExecutor()
    ex.states[0] = "RUNNING"
    make_manager(config, catalogue, tmp_path, ex).start()
    removed = make_manager(config, catalogue, tmp_path, ex)
    removed.start()
    removed.op_remove("31000040675")
    ex.states = {0: "RUNNING", 2: "STOPPED", 5: "STOPPED"}  # a reboot
    ex.calls.clear()
    m = make_manager(config, catalogue, tmp_path, ex)
    m.start()
    assert sorted(m.slots) == [0, 2, 4, 5, 7]  # the removal survived
    writes = [a for op, a in ex.calls if op == "volume.write"]
    assert writes and all(a["if_blank"] for a in writes)
    assert not [a for op, a in ex.calls if op == "volume.create"]


def test_unknown_object_ids_and_types_are_refused(
        config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    m = make_manager(config, catalogue, tmp_path, FakeExecutor())
    m.start()
    cases = [
        (lambda: m.op_stop("31000040975"), "31000040975: no such slot on node 31000040010"),
        (lambda: m.op_stop("31000050275"), "not this node"),
        (lambda: m.op_stop("3100"), "is not an ObjectID"),
        (lambda: m.op_stop(NODE), "is a node"),
        (lambda: m.op_startall("31000040275"), "is a slot"),
        (lambda: m.op_slots(by_type="dchp"), "no slot type 'dchp'"),
        (lambda: m.op_install("ldap"), "no slot type 'ldap' in this firmware"),
        (lambda: m.op_install("dhcp", "31000040375"), "needs an address"),
        (lambda: m.op_install("dhcp", "31000040275", address="10.0.249.9/24"), "already a dhcp slot"),
        (lambda: m.op_install("sysmon", address="10.0.249.9"), "with prefix"),
        (lambda: m.op_install("sysmon", address="10.0.249.9/24", params={"prot": "1"}), "no parameter prot"),
        (lambda: m.op_install("sysmon", address="10.0.249.9/24", params={"port": "9100 --x"}),
         "--param port: '9100 --x' is not a TCP or UDP port, 1 to 65535"),
        (lambda: m.op_install("sysmon", address="10.0.249.9/24", params={"port": ""}), "is not a TCP or UDP port"),
        (lambda: m.op_install("dhcp", address="10.0.249.9/24", params={"range": "10.0.249.9,* -x"}),
         "is not the first and last IPv4 address"),
        (lambda: m.op_install("cb-manager"), "cb-manager is slot 0 of the firmware, and there is one only"),
        (lambda: m.op_install("cb-manager", "31000040375"), "there is one only"),
        (lambda: m.op_stop("31000040075"), "is CB-Manager"),
        (lambda: m.op_remove("31000040075"), "is CB-Manager"),
        (lambda: m.handle("reboot", {}), "unknown request 'reboot'"),
        (lambda: m.handle("start", {"slot": 1}), "bad arguments"),
    ]
    for call, message in cases:
        with pytest.raises(Invalid) as err:
            call()
        assert message in str(err.value)


def test_install_remove_and_stop_start(
        config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    ex = FakeExecutor()
    ex.states[0] = "RUNNING"
    m = make_manager(config, catalogue, tmp_path, ex)
    m.start()
    row = m.op_install("sysmon", address="10.0.249.17/24", hostname="sysmon17")
    assert row["location"] == "31000040175" and row["status"] == "ON"
    assert "slot1-0" in ex.volumes
    assert m.op_stop("31000040175")["status"] == "OFF" and ex.states[1] == "STOPPED"
    assert m.op_restart("31000040175")["status"] == "ON"
    assert {r["status"] for r in m.op_stopall(NODE) if r["type"] != "cb-manager"} == {"OFF"}
    assert {r["status"] for r in m.op_startall(NODE)} == {"ON"}
    m.op_remove("31000040175")
    assert "slot1-0" not in ex.volumes and 1 not in ex.states
    assert [r["location"] for r in m.op_slots()] == ["31000040075", "31000040275", "31000040475", "31000040575",
                                                     "31000040675", "31000040775"]
    # A VM is given its template's bound for the power button before it is killed.
    m.op_start("31000040775")
    m.op_stop("31000040775")
    assert ("container.stop", {"eid": 7, "timeout": 120}) in ex.calls


def test_a_slot_that_never_gets_healthy_is_failed_with_its_reason(
        config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    ex = FakeExecutor()
    ex.healthy = False
    m = make_manager(config, catalogue, tmp_path, ex)
    m.start()  # does not raise: one bad slot must not keep the others down
    autostart = [r for r in m.op_slots() if r["type"] not in ("cb-manager", "service", "compute", "boot-server")]
    assert {r["status"] for r in autostart} == {"FAILED"}
    ready = m.op_ready()
    assert not ready["ready"] and "31000040275 dhcp FAILED" in ready["waiting"]
    assert "31000040275 dhcp: slot 31000040275 (dhcp) started but is not healthy 60 s after start: port 67 closed" \
        in ready["failed"]
    with pytest.raises(Failed, match="not healthy 60 s after start: port 67 closed"):
        m.op_restart("31000040275")


def test_slot_env_is_shell_quoted(config: dict[str, Any]) -> None:
    env = manager.slot_env({"eid": 2, "object_id": "31000040275", "template": "dhcp", "address": None,
                            "hostname": None, "params": {"range": "10.0.0.100,10.0.0.200 x"}}, config)
    assert "SLOT_PARAM_RANGE='10.0.0.100,10.0.0.200 x'\n" in env
    assert "SLOT_ADDRESS=''\n" in env


# -- the slot CLI --------------------------------------------------------------------

def test_wait_ready_ends_at_once_when_an_autostart_slot_has_failed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter([{"ready": False, "reconciled": False, "waiting": [], "failed": []},
                    {"ready": False, "reconciled": True, "waiting": ["31000040275 dhcp FAILED"],
                     "failed": ["31000040275 dhcp: not healthy"]}])
    monkeypatch.setattr(slotcli, "_ask", lambda op, **args: next(answers))
    monkeypatch.setattr(slotcli.time, "sleep", lambda _: None)
    assert slotcli.main(["wait-ready", "--timeout", "600"]) == 1
    assert capsys.readouterr().err == "slots failed: 31000040275 dhcp: not healthy\n"


def test_tables_have_the_source_documents_columns() -> None:
    rows = [{"parent": NODE, "location": "31000040275", "type": "dhcp", "version": "0.901.25.28 2010-09-10",
             "ip": "10.0.249.52", "hostname": "dhcpd52", "status": "ON", "description": "Sysmon Slot (DHCP)"}]
    lines = slotcli.table(slotcli.COLUMNS["show"], rows).splitlines()
    assert lines[0].split() == ["ParentID", "Location", "Type", "Version", "IP", "Hostname", "Status", "Description"]
    assert lines[1].split() == [NODE, "31000040275", "dhcp", "0.901.25.28", "2010-09-10", "10.0.249.52",
                                "dhcpd52", "ON", "Sysmon", "Slot", "(DHCP)"]
    assert lines[0].index("Status") == lines[1].index("ON")


def test_cli_usage_errors_exit_2_without_asking_anyone(capsys: pytest.CaptureFixture[str]) -> None:
    assert slotcli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert slotcli.main(["stop"]) == 2
    assert slotcli.main(["help"]) == 0
    assert "slot show-runtime <slot ObjectID>" in capsys.readouterr().out


def test_cli_without_cb_manager_says_so(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setattr(contract, "MANAGER_SOCKET", tmp_path / "none.sock")
    assert slotcli.main(["list"]) == 3
    assert "CB-Manager does not answer" in capsys.readouterr().err


def test_object_ids_follow_the_document() -> None:
    assert contract.slot_object_id(NODE, 1) == "31000040175"
    assert contract.parse_object_id(NODE, "31000040875") == ("slot", 8)
    assert contract.parse_object_id(NODE, NODE) == ("node", None)


# -- the build's view ----------------------------------------------------------------

def test_baked_slots_json_resolves_templates(project: Project, tmp_path: Path) -> None:
    profile = load_profile(project, "service-node")
    slot_template.bake(project, profile, tmp_path)
    data = json.loads((tmp_path / slot_template.NODE_SLOTS).read_text())
    assert [s["object_id"] for s in data["slots"]] == [
        "31000040075", "31000040175", "31000040275", "31000040375", "31000040475", "31000040575",
        "31000040675", "31000040875"]
    nfs = data["slots"][1]
    assert nfs["volumes"] == [{"iid": 0, "size": 16 << 20}, {"iid": 1, "size": 1 << 30}]
    cat = contract.catalogue(tmp_path / slot_template.NODE_TEMPLATES)
    assert cat["ldap"]["type"] == "lxc-system" and (tmp_path / slot_template.NODE_TEMPLATES / "dhcp" / "run").is_file()
    assert slot_template.packages(slot_template.templates_of(project, profile)) == [
        "dnsmasq-base", "isc-dhcp-relay", "nfs-kernel-server", "nsd"]
    # The mount points of lxc-service slots' further volumes, in the root they share.
    assert all((tmp_path / "srv" / f"volume{iid}").is_dir() for iid in range(1, 10))


# -- CB-Executor's writes into a slot's volume: the slot wrote that volume -----------------

def test_volume_put_replaces_a_file_whole(tmp_path: Path) -> None:
    from cbios.node.executor import _replace
    (tmp_path / "slot.env").write_text("OLD=1\n")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _replace(fd, "slot.env", b"NEW=1\n", "slot2-0: slot.env")
        _replace(fd, "fresh.env", b"A=1\n", "slot2-0: fresh.env")
    finally:
        os.close(fd)
    assert (tmp_path / "slot.env").read_text() == "NEW=1\n"
    assert (tmp_path / "fresh.env").read_text() == "A=1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.env", "slot.env"]


@pytest.mark.parametrize("plant", ["fifo", "symlink", "directory"])
def test_volume_put_refuses_what_is_not_a_plain_file_without_blocking(tmp_path: Path, plant: str) -> None:
    from cbios.node.executor import _replace
    target = tmp_path / "slot.env"
    elsewhere = tmp_path / "shadow"
    elsewhere.write_text("root:x\n")
    {"fifo": lambda: os.mkfifo(target), "symlink": lambda: target.symlink_to(elsewhere),
     "directory": target.mkdir}[plant]()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Invalid, match=r"slot2-0: slot\.env: not a plain file of the volume"):
            _replace(fd, "slot.env", b"X=1\n", "slot2-0: slot.env")
    finally:
        os.close(fd)
    assert elsewhere.read_text() == "root:x\n"
    assert not (tmp_path / ".slot.env.cbios-new").exists()


def test_an_lxc_system_slots_mount_points_are_made_in_its_root_without_following_its_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cbios.node.executor as executor

    monkeypatch.setattr(contract, "SLOT_MOUNTS", tmp_path / "slots")
    ex = executor.Executor({"vg": "lvm", "bridge": "br0", "node": {"object_id": NODE}}, {})
    root = contract.slot_mount(5, 0)
    root.mkdir(parents=True)
    ex._make_targets(5, [0, 1, 2])
    assert (root / "srv/volume1").is_dir() and (root / "srv/volume2").is_dir()
    # The slot's root is the slot's to write: a link where a mount point goes leads nowhere.
    elsewhere = tmp_path / "node"
    elsewhere.mkdir()
    (root / "srv/volume2").rmdir()
    (root / "srv/volume2").symlink_to(elsewhere)
    with pytest.raises(Invalid, match=r"slot5-0: /srv/volume2: 'volume2' is not a directory of the volume"):
        ex._make_targets(5, [0, 2])
    assert not list(elsewhere.iterdir())
