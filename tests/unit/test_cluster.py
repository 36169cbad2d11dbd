"""The cluster, with no VM: two CB-Managers (against recording executors) asking each other
over real TCP sockets on this machine; the credentials every request must carry; a node
that does not answer; the key kept from the slots; the shared build cache."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbios.build import cache_dir
from cbios.node import cluster, contract, manager, wire
from cbios.node.cluster import keyring, members
from cbios.node.executor import lxcconf
from cbios.node.wire import Failed, Invalid
from cbios.ports import free_port, listening
from cbios.profile import load_profile
from cbios.profile import template as slot_template
from cbios.project import Project
from cbios.render import mkosi_configs
from tests.unit.test_node_slots import FakeExecutor, definition

NODE, PEER = "31000040010", "31000041010"
PEER_DNS = "31000041675"
KEY = b"k" * 40


def node_config(project: Project, name: str, port: int) -> dict[str, Any]:
    profile = load_profile(project, name)
    config = slot_template.node_slots(profile, slot_template.templates_of(project, profile))
    config["cluster"]["port"] = port
    config["cluster"]["timeout"] = 1
    for node in config["cluster"]["nodes"]:
        node["address"] = "127.0.0.1"
    return config


def started(config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path,
            key: bytes = KEY) -> tuple[manager.Manager, FakeExecutor]:
    ex = FakeExecutor()
    ex.states[0] = "RUNNING"
    (tmp_path / "key").write_bytes(key)
    m = manager.Manager(config, catalogue, executor=ex, registry_path=tmp_path / "registry.json",
                        sleep=lambda _: None, cluster_key=tmp_path / "key")
    m.start()
    return m, ex


@pytest.fixture
def catalogue(project: Project) -> dict[str, dict[str, Any]]:
    return {name: slot_template.node_template(name, slot_template.load_template(project, name))
            for name in ("cb-manager", "dhcp", "dns_master", "service", "compute", "boot-server")}


@pytest.fixture
def pair(project: Project, catalogue: dict[str, dict[str, Any]],
         tmp_path: Path) -> Iterator[tuple[manager.Manager, manager.Manager, FakeExecutor]]:
    """This node's CB-Manager, and the peer's answering on a real port."""
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = started(node_config(project, "qemu-test", port), catalogue, tmp_path / "a")
    b, ex_b = started(node_config(project, "qemu-test-peer", port), catalogue, tmp_path / "b")
    serving(b, port)
    yield a, b, ex_b


def serving(m: manager.Manager, port: int, addresses: frozenset[str] = frozenset({"127.0.0.1"}),
            host: str = "127.0.0.1") -> None:
    """M's cluster listener on HOST:PORT, as CB-Manager's cluster thread starts it (a node
    that joins welcome), taking the members' requests from ADDRESSES."""
    verifier = cluster.Verifier(m.cluster.keys.keys, m.node_id, lambda: {p.object_id for p in m.cluster.peers})
    ready = threading.Event()
    threading.Thread(target=cluster.serve, daemon=True,
                     args=(port, verifier, lambda op, a: m.cluster.handle_peer(m.handle_peer, op, a),
                           lambda: set(addresses), host),
                     kwargs={"rekey": m.cluster.install_key, "join": m.cluster.accept_join,
                             "ready": ready.set}).start()
    assert ready.wait(5)


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 5
    while not listening(port):
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.05)


def test_slot_show_covers_both_nodes_and_a_peers_slot_is_worked_there(
        pair: tuple[manager.Manager, manager.Manager, FakeExecutor]) -> None:
    a, _, ex_b = pair
    rows = a.handle("slots", {})
    assert [(r["parent"], r["location"], r["status"]) for r in rows] == [
        (NODE, "31000040075", "ON"), (NODE, "31000040275", "ON"), (NODE, "31000040475", "OFF"),
        (NODE, "31000040575", "OFF"),
        (NODE, "31000040675", "ON"), (NODE, "31000040775", "OFF"),
        (PEER, "31000041075", "ON"), (PEER, "31000041275", "OFF"), (PEER, PEER_DNS, "ON"),
        (PEER, "31000041775", "OFF")]
    assert {r["parent"] for r in a.handle("slots", {"object_id": PEER})} == {PEER}
    assert [r["location"] for r in a.handle("slots", {"by_type": "dns_master"})] == ["31000040675", PEER_DNS]
    assert a.handle("stop", {"object_id": PEER_DNS})["status"] == "OFF"
    assert ("container.stop", {"eid": 6, "timeout": 30}) in ex_b.calls
    assert ex_b.states[6] == "STOPPED"
    assert a.handle("start", {"object_id": PEER_DNS})["status"] == "ON"
    with pytest.raises(Invalid, match=f"{PEER}: 31000041975: no such slot on node {PEER}"):
        a.handle("stop", {"object_id": "31000041975"})
    with pytest.raises(Invalid, match="'ready' is not asked of another node"):
        a.handle("ready", {"object_id": PEER_DNS})


def test_a_peer_is_asked_about_itself_only_and_never_for_a_firmware_update(
        pair: tuple[manager.Manager, manager.Manager, FakeExecutor]) -> None:
    _, b, ex_b = pair
    with pytest.raises(Invalid, match="'update' is not asked over the cluster"):
        b.handle_peer("update", {"source": "http://10.0.2.100/"})
    with pytest.raises(Invalid, match="not this node"):
        b.handle_peer("stop", {"object_id": "31000040675"})  # no onward hop to a third node
    assert [r["parent"] for r in b.handle_peer("slots", {})] == [PEER] * 4
    assert not any(op == "firmware.update" for op, _ in ex_b.calls)


def test_a_node_that_does_not_answer_is_one_row_within_the_bound(
        project: Project, catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    with socket.socket() as silent:  # takes connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        a, _ = started(node_config(project, "qemu-test", silent.getsockname()[1]), catalogue, tmp_path)
        begun = time.monotonic()
        rows = a.handle("slots", {})
        took = time.monotonic() - begun
    assert took < 2.5, took  # cluster.timeout is 1 s here
    assert rows[-1]["location"] == PEER and rows[-1]["status"] == "UNREACHABLE"
    assert rows[-1]["description"].startswith(f"node {PEER} at 127.0.0.1:") and "no answer" in rows[-1]["description"]
    assert [r["status"] for r in rows[:-1]] == ["ON", "ON", "OFF", "OFF", "ON", "OFF"]
    a.cluster.peers = [cluster.Peer(PEER, "127.0.0.1", free_port())]  # nothing there: refused at once
    with pytest.raises(Failed, match=f"unreachable: node {PEER} at 127.0.0.1:.*Connection refused"):
        a.handle("stop", {"object_id": PEER_DNS})


def test_a_peer_with_another_key_is_not_believed_either_way(
        project: Project, catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "b").mkdir()
    b, ex_b = started(node_config(project, "qemu-test-peer", port), catalogue, tmp_path / "b")
    (tmp_path / "b" / "key").write_bytes(b"o" * 40)
    serving(b, port)
    a, _ = started(node_config(project, "qemu-test", port), catalogue, tmp_path)
    with pytest.raises(Failed, match="does not take our credentials"):
        a.handle("stop", {"object_id": PEER_DNS})
    assert ex_b.states[6] == "RUNNING"
    row = a.handle("slots", {})[-1]
    assert row["status"] == "UNREACHABLE" and "credentials" in row["description"]


@contextlib.contextmanager
def answering(reply: bytes) -> Iterator[cluster.Peer]:
    """A peer that answers REPLY to any request: a forger on the path."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(json.dumps({"challenge": "c" * 32}).encode() + b"\n")
                conn.recv(65536)
                conn.sendall(reply)

        threading.Thread(target=answer, daemon=True).start()
        yield cluster.Peer(PEER, "127.0.0.1", server.getsockname()[1])


@pytest.mark.parametrize(("reply", "reason"), [
    (json.dumps({"ok": True, "result": [], "mac": "0" * 64}).encode() + b"\n", "not made with the cluster's key"),
    (b'{"ok": true, "result": [], "mac": "\xc3\xa9"}\n', "not made with the cluster's key"),
    (b"[1]\n", "no complete answer"),
], ids=["forged-mac", "not-hex", "not-an-object"])
def test_an_answer_without_the_clusters_mac_is_not_believed(reply: bytes, reason: str) -> None:
    with answering(reply) as peer, pytest.raises(cluster.Unreachable, match=reason):
        cluster.call(peer, [KEY], NODE, "slots", {}, timeout=2)


def test_a_listener_that_sends_no_challenge_is_no_member() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        threading.Thread(target=lambda: server.accept()[0].sendall(b"HTTP/1.0 200 OK\n"), daemon=True).start()
        peer = cluster.Peer(PEER, "127.0.0.1", server.getsockname()[1])
        with pytest.raises(cluster.Unreachable, match="no challenge"):
            cluster.call(peer, [KEY], NODE, "slots", {}, timeout=2)


CHALLENGE = "ab" * 16


def signed(**change: Any) -> dict[str, Any]:
    key = change.pop("key", KEY)
    msg = cluster.request(key, change.pop("sender", NODE), change.pop("to", PEER),
                          change.pop("challenge", CHALLENGE), "stop", {"object_id": PEER_DNS})
    return {**msg, **change}


@pytest.mark.parametrize(("msg", "reason"), [
    ({"v": 1, "op": "stop", "args": {"object_id": PEER_DNS}}, "no credentials"),
    (signed(key=b"x" * 40), "wrong MAC"),
    (signed(op="stopall"), "wrong MAC"),  # the MAC covers the request
    (signed(sender="31000099010"), "not a node of this cluster"),
    (signed(to=NODE), "meant for '31000040010'"),
    (signed(challenge="cd" * 16), "not for this connection's challenge"),
    ("stop", "no credentials"),
], ids=["bare", "other-key", "changed", "stranger", "other-node", "other-connection", "not-an-object"])
def test_requests_without_the_clusters_credentials_are_denied(msg: Any, reason: str) -> None:
    verifier = cluster.Verifier(lambda: [KEY], PEER, lambda: {NODE})
    with pytest.raises(cluster.Denied, match=reason):
        verifier.check(msg, CHALLENGE)


def test_a_signed_request_passes_with_the_current_or_the_previous_key_and_no_clock() -> None:
    older = b"p" * 40
    verifier = cluster.Verifier(lambda: [KEY, older], PEER, lambda: {NODE})
    for key in (KEY, older):
        line, used, sender = verifier.check(signed(key=key), CHALLENGE)
        assert wire.decode(line) == ("stop", {"object_id": PEER_DNS}) and (used, sender) == (key, NODE)
    with pytest.raises(cluster.Denied, match="no cluster key"):
        cluster.Verifier(lambda: [], PEER, lambda: {NODE}).check(signed(), CHALLENGE)


def test_a_sealed_key_opens_with_the_same_key_and_challenge_only() -> None:
    new = b"n" * 64
    sealed = cluster.seal(KEY, CHALLENGE, new)
    assert new.hex() not in sealed and bytes.fromhex(sealed) != new
    assert cluster.unseal(KEY, CHALLENGE, sealed) == new
    assert cluster.unseal(KEY, "cd" * 16, sealed) != new and cluster.unseal(b"o" * 40, CHALLENGE, sealed) != new


def test_the_key_is_on_var_and_bound_into_cb_manager_alone(project: Project) -> None:
    conf = lxcconf.render(definition())
    assert "secrets" not in conf and "dac_read_search" in conf
    template_conf = (project.slot_templates / "cb-manager" / "lxc.conf").read_text()
    slot0 = lxcconf.render(definition(eid=0, template="cb-manager", extra=template_conf))
    assert (f"lxc.mount.entry = {contract.SECRETS} {str(contract.MANAGER_SECRETS).lstrip('/')} none bind,create=dir 0 0"
            in slot0)
    assert manager.Manager.__init__.__defaults__[-3] == contract.MANAGER_SECRETS / contract.CLUSTER_KEY.name


def test_profiles_with_the_same_packages_share_mkosis_cache(project: Project) -> None:
    def cache(name: str, image: str) -> Path:
        return cache_dir(project, image, mkosi_configs(project, load_profile(project, name))[image])

    assert cache("qemu-test", "root") == cache("qemu-test-peer", "root")
    assert cache("qemu-test", "root") != cache("service-node", "root")
    assert cache("qemu-test", "root") != cache("qemu-test", "initrd")


def test_strangers_get_nothing_and_garbage_does_not_stop_the_listener(
        pair: tuple[manager.Manager, manager.Manager, FakeExecutor], project: Project,
        catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    a, _, _ = pair
    port = a.cluster.peers[0].port

    def exchange(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            answers = s.makefile("rb")
            assert cluster.CHALLENGE.fullmatch(json.loads(answers.readline())["challenge"])
            s.sendall(data)
            return answers.readline()

    for garbage in (b"[" * 100_000 + b"\n", b'{"v": 1, "mac": "\xc3\xa9", "auth": {}}\n', b"\xff\n"):
        assert json.loads(exchange(garbage)) == cluster.DENIED
    assert a.handle("slots", {"object_id": PEER})[0]["parent"] == PEER  # still answering
    # From an address that is no member's, a request signed with the key is denied all the
    # same, but for a JOIN; and a listener that takes no JOIN closes the connection unanswered.
    other = free_port()
    serving(a, other, frozenset({"127.0.0.2"}))
    stranger = cluster.Peer(a.node_id, "127.0.0.1", other)
    with pytest.raises(wire.RemoteError, match="does not take our credentials"):
        cluster.call(stranger, [KEY], PEER, "slots", {}, timeout=2)
    lone = free_port()
    threading.Thread(target=cluster.serve, daemon=True, args=(
        lone, cluster.Verifier(lambda: [KEY], NODE, lambda: {PEER}), a.handle_peer, lambda: {"127.0.0.2"},
        "127.0.0.1")).start()
    wait_listening(lone)
    with socket.create_connection(("127.0.0.1", lone), timeout=5) as s:
        assert s.makefile("rb").read() == b""


def test_slot_lists_the_rest_and_exits_1_when_a_node_does_not_answer(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cbios.node import slotcli

    rows = [{"parent": NODE, "location": "31000040075", "type": "cb-manager", "status": "ON"},
            {"parent": PEER, "location": PEER, "type": "-", "status": "UNREACHABLE",
             "description": f"node {PEER} at 10.0.249.19:7475: no answer within 5 s"}]
    monkeypatch.setattr(slotcli, "_ask", lambda op, **args: rows)
    assert slotcli.main(["list"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split() == [NODE, "31000040075", "cb-manager", "ON"]
    assert err == f"slot: node {PEER} unreachable: node {PEER} at 10.0.249.19:7475: no answer within 5 s\n"
    monkeypatch.setattr(slotcli, "_ask", lambda op, **args: rows[:1])
    assert slotcli.main(["show"]) == 0


def test_rotation_reaches_every_member_and_one_that_missed_it_is_still_understood(
        pair: tuple[manager.Manager, manager.Manager, FakeExecutor]) -> None:
    a, b, _ = pair
    rows = a.handle("rotate_key", {})
    assert [(r["node"], r["status"]) for r in rows] == [(NODE, "ROTATED"), (PEER, "ROTATED")]
    assert rows[0]["fingerprint"] == rows[1]["fingerprint"]
    assert a.cluster.keys.current() == b.cluster.keys.current() != KEY and b.cluster.keys.keys()[1] == KEY
    assert a.handle("slots", {"object_id": PEER})[0]["parent"] == PEER  # with the new key
    # b misses the next rotation (its listener gone): it keeps the key it has; a asks it with
    # its previous key, which is b's current one, and the rotation after reaches it.
    good = a.cluster.peers[0]
    a.cluster.peers = [cluster.Peer(PEER, "127.0.0.1", free_port())]
    rows = a.handle("rotate_key", {})
    assert [r["status"] for r in rows] == ["ROTATED", "KEPT"] and "unreachable" in rows[1]["error"]
    a.cluster.peers = [good]
    assert a.cluster.keys.current() != b.cluster.keys.current()
    assert a.handle("slots", {"object_id": PEER})[0]["parent"] == PEER
    assert [r["status"] for r in a.handle("rotate_key", {})] == ["ROTATED", "ROTATED"]
    assert a.cluster.keys.current() == b.cluster.keys.current()
    with pytest.raises(Invalid, match="'rotate_key' is not asked over the cluster"):
        b.handle_peer("rotate_key", {})


def test_a_node_with_no_key_runs_its_slots_and_says_why_the_others_are_missing(
        project: Project, catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    a, _ = started(node_config(project, "qemu-test", free_port()), catalogue, tmp_path)
    (tmp_path / "key").unlink()
    rows = a.handle("slots", {})
    assert [r["status"] for r in rows[:-1]] == ["ON", "ON", "OFF", "OFF", "ON", "OFF"]
    assert rows[-1]["status"] == "UNREACHABLE"
    assert rows[-1]["description"].startswith("no cluster key on this node") and "cbios cluster set-key" in \
        rows[-1]["description"]


def test_service_slots_cannot_undo_their_mounts_system_slots_keep_theirs() -> None:
    service = lxcconf.render(definition())
    assert f"lxc.cap.drop = {lxcconf.CAP_DROP} sys_admin" in service and "dac_read_search" in lxcconf.CAP_DROP
    system = lxcconf.render(definition(kind="lxc-system", template="service"))
    assert "sys_admin" not in system


THIRD = "31000042010"


def member(project: Project, catalogue: dict[str, dict[str, Any]], tmp_path: Path, name: str, address: str,
           port: int, node_id: str | None = None, seed: dict[str, str] | None = None,
           key: bytes = KEY) -> manager.Manager:
    """A CB-Manager listening on ADDRESS:PORT (a loopback address of its own) and asking from
    there, as on its own node: its firmware's list is SEED {object_id: address}."""
    config = node_config(project, name, port)
    if node_id is not None:
        config["node"]["object_id"] = node_id
    config["cluster"]["address"] = address
    config["cluster"]["nodes"] = [{"object_id": o, "address": a} for o, a in (seed or {}).items()]
    work = tmp_path / (node_id or name)
    work.mkdir()
    m, _ = started(config, catalogue, work, key)
    ready = threading.Event()
    threading.Thread(target=m.cluster.serve, args=(m.handle_peer, ready.set), daemon=True).start()
    assert ready.wait(5)
    return m


def test_a_third_node_joins_the_running_cluster_and_leaves_it_with_no_new_firmware(
        project: Project, catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    port = free_port()
    a = member(project, catalogue, tmp_path, "qemu-test", "127.0.0.1", port, seed={PEER: "127.0.0.2"})
    b = member(project, catalogue, tmp_path, "qemu-test-peer", "127.0.0.2", port, seed={NODE: "127.0.0.1"})
    c = member(project, catalogue, tmp_path, "qemu-test-peer", "127.0.0.3", port, node_id=THIRD)
    assert c.handle("slots", {}) == c.op_slots()  # in no cluster: its own slots
    rows = c.handle("cluster_join", {"address": "127.0.0.2"})  # through any member
    assert [(r["node"], r["status"]) for r in rows] == [(PEER, "JOINED"), (NODE, "TOLD")]
    for m in (a, b, c):
        parents = [r["parent"] for r in m.handle("slots", {})]
        assert sorted(set(parents)) == [NODE, PEER, THIRD], m.node_id
        assert [r["status"] for r in m.handle("cluster_members", {})] == ["THIS NODE", "REACHABLE", "REACHABLE"]
    assert {p.object_id: p.address for p in a.cluster.peers} == {PEER: "127.0.0.2", THIRD: "127.0.0.3"}
    # The list is the node's, kept on its volume: a restart (or a new firmware) reads it, not the seed.
    again = members.Members(NODE, {"port": port, "nodes": [{"object_id": PEER, "address": "127.0.0.2"}]},
                            a.cluster.keys, a.cluster.path)
    assert {p.object_id for p in again.peers} == {PEER, THIRD}
    # A holder of another key does not get in; nor does an ObjectID whose slots' ids are a member's.
    d = member(project, catalogue, tmp_path, "qemu-test-peer", "127.0.0.4", port, node_id="31000043010",
               key=b"o" * 40)
    with pytest.raises(Failed, match=r"cannot join: .*does not take our credentials"):
        d.handle("cluster_join", {"address": "127.0.0.1"})
    with pytest.raises(Invalid, match="same first 8 digits"):
        a.cluster.accept_join("127.0.0.9", "31000042011", {"object_id": "31000042011"})
    with pytest.raises(Invalid, match="'nope' is not an IPv4 address"):
        c.handle("cluster_join", {"address": "nope"})
    # Leaving: every member told, and the node's own list emptied.
    assert [(r["node"], r["status"]) for r in c.handle("cluster_leave", {})] == [(PEER, "TOLD"), (NODE, "TOLD")]
    assert c.cluster.peers == []
    assert {p.object_id for p in a.cluster.peers} == {PEER} and {p.object_id for p in b.cluster.peers} == {NODE}
    assert THIRD not in {r["parent"] for r in a.handle("slots", {})}


def test_cbios_cluster_members_prints_a_row_a_node_and_exits_1_for_one_unreachable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cbios.node import cli

    asked: list[tuple[str, dict[str, Any]]] = []
    rows = [{"node": NODE, "address": "-", "status": "THIS NODE"},
            {"node": PEER, "address": "10.0.249.19", "status": "UNREACHABLE", "error": "no answer within 1 s"}]

    def call(path: Path, op: str, args: dict[str, Any], timeout: float) -> Any:
        asked.append((op, args))
        if op == "cluster_leave":
            raise wire.RemoteError("invalid", "this node is in no cluster")
        return rows

    monkeypatch.setattr(wire, "call", call)
    assert cli.main(["cluster", "members"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{NODE}  -                THIS NODE", f"{PEER}  10.0.249.19      UNREACHABLE  no answer within 1 s"]
    assert cli.main(["cluster", "join"]) == 2 and "cluster join ADDRESS" in capsys.readouterr().err
    assert cli.main(["cluster", "join", "10.0.249.19", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == rows
    assert cli.main(["cluster", "leave"]) == 2
    assert capsys.readouterr().err == "cbios: cluster leave: this node is in no cluster\n"
    assert asked == [("cluster_members", {}), ("cluster_join", {"address": "10.0.249.19"}), ("cluster_leave", {})]


def test_a_member_list_that_cannot_be_read_is_never_guessed_at_nor_written_over(tmp_path: Path) -> None:
    path = tmp_path / members.MEMBERS_NAME
    path.write_text("[]")
    kept = members.Members(NODE, {"port": 7475, "nodes": [{"object_id": PEER, "address": "10.0.249.19"}]},
                           keyring.Keyring(tmp_path / "key"), path)
    assert kept.peers == [] and "unreadable" in str(kept.broken)
    with pytest.raises(Failed, match="unreadable"):
        kept.add(PEER, "10.0.249.19")
    assert path.read_text() == "[]"


@pytest.mark.parametrize("address", ["010.0.249.9", "10.0.249.256", "\u0661\u0660.0.249.9", "10.0.249", None])
def test_an_address_is_a_plain_ipv4_address(tmp_path: Path, address: Any) -> None:
    m = members.Members(NODE, {"port": 7475}, keyring.Keyring(tmp_path / "key"), tmp_path / "m.json")
    with pytest.raises(Invalid, match="is not an IPv4 address"):
        m.add(PEER, address)
    with pytest.raises(Invalid, match="is not a node's ObjectID"):
        m.add("\u0663" * 11, "10.0.249.19")


def test_strangers_cannot_keep_the_members_out(pair: tuple[manager.Manager, manager.Manager, FakeExecutor]) -> None:
    a, b, _ = pair
    port = free_port()
    serving(b, port, frozenset({"127.0.0.2"}))  # the member asks from 127.0.0.2; 127.0.0.1 is a stranger
    # More silent strangers than CB-Manager takes connections at all, each in (a challenge
    # read: its connection is held) or turned away (closed), before the member asks.
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(cluster.MAX_CLIENTS + 2)]
    opened = [s.makefile("rb").readline() for s in silent]
    assert sum(1 for line in opened if line) == cluster.MAX_STRANGERS
    try:
        a.cluster.address = "127.0.0.2"
        a.cluster.peers = [cluster.Peer(PEER, "127.0.0.1", port)]
        assert a.handle("slots", {"object_id": PEER})[0]["parent"] == PEER
    finally:
        for s in silent:
            s.close()


def test_a_node_that_leaves_keeps_the_members_it_could_not_tell(
        project: Project, catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    port = free_port()
    a = member(project, catalogue, tmp_path, "qemu-test", "127.0.0.1", port,
               seed={PEER: "127.0.0.2", THIRD: "127.0.0.3"})  # nothing listens at 127.0.0.3
    b = member(project, catalogue, tmp_path, "qemu-test-peer", "127.0.0.2", port, seed={NODE: "127.0.0.1"})
    assert [(r["node"], r["status"]) for r in a.handle("cluster_leave", {})] == [(PEER, "TOLD"), (THIRD, "MISSED")]
    assert [p.object_id for p in a.cluster.peers] == [THIRD] and b.cluster.peers == []
    # A JOIN does not move a member that is one at another address.
    with pytest.raises(Invalid, match=r"is a member at 127\.0\.0\.3"):
        a.cluster.accept_join("127.0.0.9", THIRD, {"object_id": THIRD})
