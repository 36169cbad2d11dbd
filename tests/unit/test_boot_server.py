"""The boot-server slot, with no VM: its HTTP server over a real socket (each node's script,
the store's files and nothing else, receipts), its dnsmasq configuration, CB-Manager's
checks of what it boots, and how CB-Executor reads its receipts (files a slot wrote)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbios.node import contract, manager, slotcli, slotparams
from cbios.node.boot import bootenv, status
from cbios.node.bootserver import StoreServer, dnsmasq, read_env, settings
from cbios.node.executor import lxcconf, receipts
from cbios.node.wire import Invalid
from tests.unit.test_node_slots import FakeExecutor, definition, make_manager

pytest_plugins = ["tests.unit.test_node_slots"]

DISKLESS_MAC, INSTALL_MAC, OTHER_MAC = "52:54:00:c0:10:01", "52:54:00:c0:10:02", "52:54:00:c0:10:09"


def image(store: Path, name: str, version: str) -> Path:
    d = store / name / version
    d.mkdir(parents=True)
    for f in contract.STORE_FILES:
        (d / f).write_bytes(f"{f} of {name} {version}\n".encode())
    return d


@pytest.fixture
def server(tmp_path: Path) -> Iterator[StoreServer]:
    store = tmp_path / "store"
    image(store, "compute", "1.0.0")
    nodes = slotparams.boot_nodes(f"{DISKLESS_MAC}=compute@1.0.0:diskless,{INSTALL_MAC}=compute@1.0.0:install,"
                                  "31000050010=compute@1.0.0:update")
    s = StoreServer(("127.0.0.1", 0), store, tmp_path / "receipts", nodes, None, "boot server 31000040475")
    s.start()
    yield s
    s.stop()


def get(s: StoreServer, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/{path}", timeout=5) as r:
        return str(r.read().decode())


def post(s: StoreServer, path: str, receipt: dict[str, Any]) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{s.port}/{path}", data=json.dumps(receipt).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


def test_each_node_is_sent_its_image_and_mode(server: StoreServer) -> None:
    entry = get(server, "boot.ipxe")
    assert entry.startswith("#!ipxe\nchain http://127.0.0.1:") and "/node.ipxe?mac=${netX/mac}&serial=" in entry
    script = get(server, f"node.ipxe?mac={DISKLESS_MAC}&serial=")
    base = f"http://127.0.0.1:{server.port}/images/compute/1.0.0/"
    assert f"set cbios-server {base}\nset cbios-mode diskless\nchain ${{cbios-server}}boot.ipxe" in script
    assert "set cbios-mode install" in get(server, f"node.ipxe?mac={INSTALL_MAC}")
    # By ObjectID: the node's SMBIOS serial carries it.
    assert "set cbios-mode update" in get(server, f"node.ipxe?mac={OTHER_MAC}&serial=31000050010")
    # A node set to nothing goes on to its next boot device.
    assert get(server, f"node.ipxe?mac={OTHER_MAC}&serial=").endswith("booting from the next device\nexit 1\n")
    server.default = slotparams.boot_choice("compute@1.0.0:diskless")
    assert "set cbios-mode diskless" in get(server, f"node.ipxe?mac={OTHER_MAC}")
    server.default = slotparams.boot_choice("compute@2.0.0:diskless")  # not in the store: said, then on
    assert "its image compute 2.0.0 is not in the store" in get(server, f"node.ipxe?mac={OTHER_MAC}")


def test_the_store_s_files_are_served_and_nothing_else(server: StoreServer, tmp_path: Path) -> None:
    for name in contract.STORE_FILES:
        assert get(server, f"images/compute/1.0.0/{name}?mac={DISKLESS_MAC}") == f"{name} of compute 1.0.0\n"
    (tmp_path / "store" / "secret").write_text("x")
    (tmp_path / "store" / "compute" / "1.0.0" / "added.json").write_text("{}")
    for path in ["images/compute/1.0.0/added.json", "images/compute/../secret", "images/../store/secret",
                 "images/compute/1.0.0/../../secret", "secret", "images/compute/9.9/root.img", "boot.ipxe/x"]:
        with pytest.raises(urllib.error.HTTPError) as err:
            get(server, path)
        assert err.value.code == 404, path


def test_an_installed_node_boots_from_its_disk_and_its_receipt_is_kept(server: StoreServer) -> None:
    assert "set cbios-mode install" in get(server, f"node.ipxe?mac={INSTALL_MAC}")
    receipt = {"result": "FLASHED", "mode": "install", "mac": INSTALL_MAC, "profile": "compute",
               "version": "1.0.0", "finished": "2026-12-05T10:00:00Z", "bytes_received": 1234}
    post(server, f"images/compute/1.0.0/receipt?mac={INSTALL_MAC}", receipt)
    assert "sanboot --no-describe --drive 0x80" in get(server, f"node.ipxe?mac={INSTALL_MAC}")
    kept = json.loads((server.receipts / "525400c01002.json").read_text())
    assert kept["result"] == "FLASHED" and kept["client"] == "127.0.0.1"
    # A failed install is tried again.
    post(server, "images/compute/1.0.0/receipt", {**receipt, "result": "FAILED", "reason": "disk full"})
    assert "set cbios-mode install" in get(server, f"node.ipxe?mac={INSTALL_MAC}")
    rows = receipts.latest(server.receipts.parent, server.receipts.name)
    assert rows == [{"mac": INSTALL_MAC, "result": "FAILED", "mode": "install", "profile": "compute",
                     "version": "1.0.0", "finished": "2026-12-05T10:00:00Z", "bytes_received": "1234",
                     "reason": "disk full"}]
    text = slotcli.runtime_text({"location": "31000040475", "parent": "31000040010", "type": "boot-server",
                                 "kind": "lxc-service", "version": "0.1.0", "status": "ON", "state": "RUNNING",
                                 "receipts": rows})
    assert f"Receipt {INSTALL_MAC}  FAILED install compute 1.0.0 at 2026-12-05T10:00:00Z, 0.0 MiB received: " \
           "disk full" in text


def test_a_node_set_to_update_is_sent_to_its_disk_once_it_updated_or_was_refused(server: StoreServer) -> None:
    other = "52:54:00:c0:10:09"
    server.nodes[other] = slotparams.boot_choice("compute@1.0.0:update")
    assert "set cbios-mode update" in get(server, f"node.ipxe?mac={other}")
    receipt = {"result": "FAILED", "mode": "update", "mac": other, "profile": "compute", "version": "1.0.0",
               "reason": "version 1.0.0 is not newer than 1.0.0"}
    post(server, "images/compute/1.0.0/receipt", receipt)
    script = get(server, f"node.ipxe?mac={other}")
    assert "update refused (version 1.0.0 is not newer" in script and "sanboot --no-describe --drive 0x80" in script
    post(server, "images/compute/1.0.0/receipt", {**receipt, "result": "FLASHED", "reason": ""})
    assert "compute 1.0.0: updated: booting from its disk" in get(server, f"node.ipxe?mac={other}")
    # A receipt of another version, or a MAC with a line break, changes nothing.
    post(server, "images/compute/1.0.0/receipt", {**receipt, "version": "0.9.0"})
    assert "set cbios-mode update" in get(server, f"node.ipxe?mac={other}")
    with pytest.raises(urllib.error.HTTPError) as err:
        post(server, "images/compute/1.0.0/receipt", {**receipt, "mac": other + "\n"})
    assert err.value.code == 400


def test_receipts_a_slot_planted_are_read_as_data_or_not_at_all(tmp_path: Path) -> None:
    d = tmp_path / "vol" / "lib" / "r"
    d.mkdir(parents=True)
    (d / "a.json").write_text(json.dumps({"mac": "x\x1b[2J", "result": ["list"], "mode": "diskless" * 100}))
    (d / "big.json").write_bytes(b" " * (receipts.MAX_FILE + 1))
    (d / "link.json").symlink_to("/etc/shadow")
    os.mkfifo(d / "fifo.json")
    (d / "not.json").write_text("[1]")
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert receipts.latest(tmp_path / "vol", "lib/r") == [{"mac": "x?[2J", "mode": ("diskless" * 100)[:160]}]
    # A directory on the way that is a link is not followed.
    (tmp_path / "vol2").mkdir()
    (tmp_path / "vol2" / "lib").symlink_to(tmp_path / "vol" / "lib")
    assert receipts.latest(tmp_path / "vol2", "lib/r") == []


def test_dnsmasq_is_a_proxy_or_the_dhcp_server() -> None:
    proxy = dnsmasq.conf(title="CBIOS boot", interface="eth0", network="10.0.249.0", tftp_root=Path("/usr/lib/ipxe"),
                         script_url="http://10.0.249.4/boot.ipxe").splitlines()
    assert {"dhcp-range=10.0.249.0,proxy", "leasefile-ro", "dhcp-boot=tag:ipxe,http://10.0.249.4/boot.ipxe",
            'pxe-service=tag:ipxe,x86PC,"CBIOS boot (script)",http://10.0.249.4/boot.ipxe',
            'pxe-prompt=tag:!ipxe,"CBIOS boot",0'} <= set(proxy)
    server = dnsmasq.conf(title="CBIOS boot", interface="eth0", network="10.0.249.0", tftp_root=Path("/x"),
                          script_url="http://10.0.249.4/boot.ipxe", dhcp_range="10.0.249.100,10.0.249.150",
                          leases=Path("/var/lib/l")).splitlines()
    assert {"dhcp-range=10.0.249.100,10.0.249.150,12h", "dhcp-authoritative", "dhcp-leasefile=/var/lib/l"} <= set(
        server)
    assert not any("proxy" in line for line in server if not line.startswith("#"))


def test_the_slot_s_settings_come_from_its_slot_env(tmp_path: Path) -> None:
    env = tmp_path / "slot.env"
    env.write_text(manager.slot_env({"eid": 4, "object_id": "31000040475", "template": "boot-server",
                                     "address": "10.0.249.4/24", "hostname": "boot4",
                                     "params": {"nodes": f"{DISKLESS_MAC}=compute@1.0.0:diskless", "default": "",
                                                "range": ""}}, {"node": {"object_id": "31000040010"}}))
    s = settings(read_env(env))
    assert str(s["address"]) == "10.0.249.4/24" and s["default"] is None and s["range"] == ""
    assert s["nodes"] == {DISKLESS_MAC: slotparams.BootChoice("compute", "1.0.0", "diskless")}


@pytest.mark.parametrize("value, message", [
    ("52:54:00:c0:10:01=compute@1.0.0:erase", "MODE one of boot, update, install, diskless"),
    ("node7=compute@1.0.0:diskless", "NODE a MAC"),
    ("52:54:00:c0:10:01=compute@1.0.0:diskless,52:54:00:C0:10:01=compute@1.0.0:install", "given twice"),
    ("52:54:00:c0:10:01=../x@1.0.0:diskless", "IMAGE@VERSION:MODE"),
])
def test_boot_assignments_of_another_shape_are_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        slotparams.check("boot-nodes", "", value)


def test_cb_manager_boots_only_what_its_store_holds_and_keeps_what_is_booted(
        config: dict[str, Any], catalogue: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    ex = FakeExecutor()
    ex.states[0] = "RUNNING"
    m = make_manager(config, catalogue, tmp_path, ex)
    m.store = tmp_path / "store"
    image(m.store, "compute", "1.0.0").joinpath("added.json").write_text(json.dumps(
        {"image": "compute", "version": "1.0.0", "added": "2026-12-05T10:00:00Z", "size": 1, "signed_by": "k",
         "architecture": "x86-64", "root_sha256": "0" * 64}))
    m.start()
    m.op_remove("31000040475")
    with pytest.raises(Invalid, match=r"no image compute 2\.0\.0 in the store \(it holds: compute 1\.0\.0\)"):
        m.op_install("boot-server", "31000040475", address="10.0.249.4/24",
                     params={"nodes": f"{DISKLESS_MAC}=compute@2.0.0:diskless"})
    row = m.op_install("boot-server", "31000040475", address="10.0.249.4/24",
                       params={"nodes": f"{DISKLESS_MAC}=compute@1.0.0:diskless"})
    assert row["status"] == "ON"
    with pytest.raises(Invalid, match=f"boot server 31000040475 boots {DISKLESS_MAC} from it"):
        m.op_image_remove("compute", "1.0.0")
    m.op_remove("31000040475")
    assert m.op_image_remove("compute", "1.0.0")["image"] == "compute"


def test_a_boot_server_has_the_store_read_only_in_its_root() -> None:
    conf = lxcconf.render(definition(eid=4, template="boot-server", image_store=True))
    assert (f"lxc.mount.entry = {contract.slot_mounts(4) / contract.STORE_MOUNT} {contract.STORE_TARGET} none "
            "bind,idmap=container,ro 0 0") in conf.splitlines()
    assert contract.STORE_TARGET not in lxcconf.render(definition(eid=2, template="dhcp"))


def test_status_says_a_diskless_node_runs_from_ram(tmp_path: Path) -> None:
    source = tmp_path / "boot-source"
    source.write_text("diskless\n")
    assert bootenv.boot_source(source) == bootenv.DISKLESS
    st = status.gather(None, None, {"CBIOS_PROFILE": "compute", "CBIOS_VERSION": "1.0.0",
                                    "CBIOS_OBJECT_ID": "31000050010"}, bootenv.boot_source(source))
    assert "booted from:   network (diskless): the firmware runs from RAM" in status.render_text(st)
    source.write_text("network\n")
    assert bootenv.boot_source(source) == "network"
    assert bootenv.boot_source(tmp_path / "none") == "disk"
