"""`cbios update` on a running node, in order, on one disk: CB-Manager's image store taking a
release and refusing damaged ones; releases not signed for this node
refused with nothing written, a corrupted image never made bootable; the power cut in the
middle of writing; a release whose CB-Manager cannot
start, rolled back with no input; a new copy whose kernel panics, fallen back from by
itself; a good release through CB-Manager, committed. /var, the
slot registry and a slot's volume are checked as kept after each step.

The releases are served as `cbios pxe serve` serves them (its HTTP server on 127.0.0.1),
reached from the node through QEMU's guestfwd at http://10.0.2.100/ on its ctl link."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbios import manifest
from cbios.boot import disk_boot_spec
from cbios.disk import overlay
from cbios.machine import Machine
from cbios.node import contract
from cbios.node.update import IMAGE
from cbios.powercut import KEPT, MARK
from cbios.profile import Profile
from cbios.project import Project
from cbios.pxe.bundle import FILES, PXE_DIR
from cbios.pxe.lab import GUEST_SERVER, JOIN_NODE, PxeLab
from cbios.release import write_release
from tests.vm.images import BROKEN_VERSION, NEXT_MARK, NEXT_VERSION

log = logging.getLogger("cbios")

URL = f"http://{GUEST_SERVER}/"
KEY = Path(__file__).resolve().parents[2] / "profiles/keys/qemu-test-signing.pem"
NODE = "31000040010"  # its slots; `slot list` alone would also ask the cluster's other node


@dataclasses.dataclass
class Node:
    """One node through the module: its disk, the release server it reaches, the VM running now."""

    disk: Path
    logdir: Path
    lab: PxeLab
    vm_project: Project
    profile: Profile
    built: Path
    m: Machine | None = None
    slots: str = ""
    figures: dict[str, float] = dataclasses.field(default_factory=dict)

    def serve(self, bundle: Path, files: list[str] | None = None) -> None:
        """BUNDLE's FILES over HTTP (default: a PXE bundle's)."""
        self.lab.server.bundle = bundle
        self.lab.server.files = set(files or FILES)

    def up(self, name: str) -> Machine:
        """The node running and ready: as it is, or booted from its disk (a fresh QEMU)."""
        if self.m is None or not self.m.running():
            spec = disk_boot_spec(self.vm_project, self.profile, self.built, self.disk, persist=True)
            spec.pxe = self.lab.netdev_options()  # the release server at 10.0.2.100
            self.m = Machine(spec, self.logdir, name=name)
            self.m.start()
            self.m.wait_ready(self.profile.qemu.ready_timeout)
        self.m.succeed(JOIN_NODE)
        if not self.slots:  # the first boot of the module, whichever test runs first
            self.m.succeed(MARK)
            self.slots = self.m.succeed(f"slot list {NODE}")
        return self.m


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, vm_project: Project, profile: Profile, built: Path,
         node_disk: Path) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("update")
    with PxeLab(built / PXE_DIR, work / "server", mode=None) as lab:
        n = Node(overlay(node_disk, work / "node.qcow2"), work / "vm", lab, vm_project, profile, built)
        try:
            yield n
        finally:
            if n.m is not None:
                n.m.kill()
    log.info("update figures: %s", json.dumps(n.figures))


def status(m: Machine) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(m.succeed("cbios status --json"))
    return data


def untouched(m: Machine, vg: str) -> str:
    """What an update must not change before it switches: the spare copy's first 16 MiB and the boot state."""
    return m.succeed(f"head -c 16M /dev/{vg}/root-spare | sha256sum; mount -o ro LABEL=cbios-boot /mnt; "
                     "sha256sum /mnt/grub/grubenv; umount /mnt", timeout=120)


def tampered(source: Path, work: Path, how: str) -> Path:
    bundle = work / how
    shutil.copytree(source, bundle, copy_function=os.link)
    if how == "image":
        data = bytearray((source / "root.img").read_bytes())
        data[len(data) // 2] ^= 0x01
        (bundle / "root.img").unlink()
        (bundle / "root.img").write_bytes(bytes(data))
    elif how == "manifest":  # the version raised after signing
        text = (source / manifest.MANIFEST).read_text().replace(f'"version": "{NEXT_VERSION}"', '"version": "9.0.0"')
        (bundle / manifest.MANIFEST).unlink()
        (bundle / manifest.MANIFEST).write_text(text)
    elif how == "other-profile":  # signed with the right key, for another profile
        data = json.loads((source / manifest.MANIFEST).read_text())
        data["profile"] = "service-node"
        for name in (manifest.MANIFEST, manifest.SIGNATURE):
            (bundle / name).unlink()
        (bundle / manifest.MANIFEST).write_text(json.dumps(data))
        subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(KEY), "-in",
                        str(bundle / manifest.MANIFEST), "-out", str(bundle / manifest.SIGNATURE)], check=True)
    return bundle


def test_cb_managers_image_store_takes_signed_whole_releases_only(next_build: Path, node: Node,
                                                                  tmp_path: Path) -> None:
    """`slot image add` of a release over HTTP (read by CB-Manager as it arrives) and of a
    file on the node; a release with a bad signature, or cut short, leaves the store as it was."""
    m = node.up("v1")
    good = write_release(next_build, tmp_path / "good.cbios.tar")
    (tmp_path / "cut.cbios.tar").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    with tarfile.open(good) as src, tarfile.open(tmp_path / "forged.cbios.tar", "w") as forged:
        for member in src.getmembers():  # the version raised after signing
            body = src.extractfile(member)
            assert body is not None
            data = body.read()
            if member.name == manifest.MANIFEST:
                data = data.replace(f'"version": "{NEXT_VERSION}"'.encode(), b'"version": "9.0.0"')
                member.size = len(data)
            forged.addfile(member, io.BytesIO(data))
    node.serve(tmp_path, ["good.cbios.tar", "cut.cbios.tar", "forged.cbios.tar"])
    store = f"/run/cbios/slots/slot0/volume{contract.IMAGE_STORE_IID}"
    empty = m.succeed(f"ls -A {store}")
    added = m.succeed(f"slot image add {URL}good.cbios.tar", timeout=600)
    assert added.startswith(f"qemu-test {NEXT_VERSION}: stored (")
    rows = json.loads(m.succeed("slot image list --json"))
    assert (rows[0]["image"], rows[0]["type"], rows[0]["version"]) == ("qemu-test", "compute", NEXT_VERSION)
    held = m.succeed(f"cd {store}/qemu-test/{NEXT_VERSION} && sha256sum {' '.join(contract.STORE_FILES)}")
    with tarfile.open(good) as tar:
        for line in held.splitlines():
            digest, name = line.split()
            body = tar.extractfile(name)
            assert body is not None and digest == hashlib.sha256(body.read()).hexdigest(), name
    before = m.succeed(f"find {store} | sort")
    m.succeed(f"python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(*sys.argv[1:])' "
              f"{URL}forged.cbios.tar /var/tmp/forged.cbios.tar", timeout=300)
    for source, message in [("/var/tmp/forged.cbios.tar", "its signature does not verify with this firmware's key"),
                            (f"{URL}cut.cbios.tar", "not a whole release file")]:
        rc, out = m.execute(f"slot image add {source}", timeout=600)
        assert rc == 2 and out.strip().count("\n") == 0 and out.startswith(f"slot: {source}") and message in out, out
        assert m.succeed(f"find {store} | sort") == before
    removed = m.succeed(f"slot image remove qemu-test {NEXT_VERSION}")
    assert removed == f"qemu-test {NEXT_VERSION}: removed from the store"
    assert m.succeed(f"ls -A {store}") == empty
    m.succeed("rm /var/tmp/forged.cbios.tar")
    node.serve(node.built / PXE_DIR)


def test_releases_not_signed_for_this_node_are_refused_before_anything_is_written(
        profile: Profile, next_build: Path, node: Node, tmp_path: Path) -> None:
    vg = profile.storage.vg
    cases = [("manifest", "manifest.json: signature does not verify with this node's key"),
             ("other-profile", "firmware of profile service-node, this node runs qemu-test")]
    m = node.up("v1")
    before = untouched(m, vg)
    for how, message in cases:
        node.serve(tampered(next_build / PXE_DIR, tmp_path, how))
        for through in ("", " --through-manager"):
            rc, err = m.execute(f"cbios update {URL}{through} 2>&1 >/dev/null", timeout=300)  # stderr only
            assert rc == 2, f"{how}{through}: status {rc}: {err}"
            assert len(err.splitlines()) == 1 and message in err, f"{how}{through}: {err}"
    assert untouched(m, vg) == before
    assert status(m)["copies"]["spare"]["state"] == "good"


def test_a_corrupted_image_is_written_only_into_a_copy_marked_bad(
        next_build: Path, node: Node, tmp_path: Path) -> None:
    m = node.up("v1")
    node.serve(tampered(next_build / PXE_DIR, tmp_path, "image"))
    rc, err = m.execute(f"cbios update {URL} 2>&1 >/dev/null", timeout=600)
    assert rc == 2 and len(err.splitlines()) == 1 and "root.img: checksum mismatch" in err, err
    st = status(m)
    assert (st["running"], st["next_boot"]) == ("root", "root")
    assert (st["copies"]["root"]["state"], st["copies"]["spare"]["state"]) == ("good", "bad")
    assert m.succeed(KEPT) == "kept\nkept"


def test_power_cut_while_writing_leaves_the_node_on_its_firmware(next_build: Path, node: Node) -> None:
    m = node.up("v1")
    node.serve(next_build / PXE_DIR)
    half = (next_build / PXE_DIR / IMAGE).stat().st_size // 2
    node.lab.server.hold(IMAGE, half)  # the write stops half way until the power is cut
    m.in_background(f"cbios update {URL}")
    m.wait_console("cbios: writing copy spare (", 300)
    if not node.lab.server.held.wait(300):
        raise m.error(f"{IMAGE}: the node did not fetch half of it within 300 s")
    m.kill()  # the power cut
    node.lab.server.release()
    m = node.up("after-power-cut")
    assert "version=1.0.0 copy=root" in m.reports[-1]
    st = status(m)
    assert (st["running"], st["next_boot"]) == ("root", "root")
    assert st["copies"]["spare"]["state"] == "bad"  # half written: never booted
    assert m.succeed(KEPT) == "kept\nkept"


def test_a_release_that_is_not_ready_is_rolled_back_with_no_input(
        profile: Profile, broken_build: Path, node: Node) -> None:
    m = node.up("broken")
    node.serve(broken_build / PXE_DIR)
    m.in_background(f"cbios update {URL}")  # and it reboots by itself
    failed = m.wait_report(("FAILED",), 600)
    start = m.uptime()
    assert f"version={BROKEN_VERSION} copy=spare" in failed and "cbios-slots.service" in failed, failed
    ready = m.wait_report(("READY",), 2 * profile.qemu.ready_timeout)
    node.figures["rollback_s"] = round(m.uptime() - start, 1)
    assert "version=1.0.0 copy=root" in ready
    console = m.console_log.read_text(errors="replace")
    assert f"cbios: UPDATED qemu-test 1.0.0 -> {BROKEN_VERSION}: copy spare boots next" in console
    st = status(m)
    assert (st["running"], st["next_boot"], st["version"]) == ("root", "root", "1.0.0")
    assert st["copies"]["spare"]["state"] == "bad"
    assert st["copies"]["spare"]["version"] == BROKEN_VERSION
    assert st["last_fallback"] == "copy spare did not become ready in its tries"
    assert st["last_failure"].startswith(f"copy spare ({BROKEN_VERSION}): "), st["last_failure"]
    assert "cbios-slots.service" in st["last_failure"]
    assert f"last failure:  copy spare ({BROKEN_VERSION})" in m.succeed("cbios status")
    assert m.succeed(KEPT) == "kept\nkept"
    assert m.succeed(f"slot list {NODE}") == node.slots
    # The node remembers it: the same release again is refused, with nothing written, unless forced.
    assert st["refused_versions"] == [BROKEN_VERSION]
    m = node.up("broken")  # rebooted twice by itself: on its server link again
    before = untouched(m, profile.storage.vg)
    rc, err = m.execute(f"cbios update {URL} --no-reboot 2>&1 >/dev/null", timeout=300)
    assert rc == 2 and f"version {BROKEN_VERSION} failed the health gate on this node before" in err, err
    assert untouched(m, profile.storage.vg) == before


def test_a_new_copy_whose_kernel_panics_falls_back_by_itself(profile: Profile, next_build: Path, node: Node) -> None:
    """A good release, tried with a kernel parameter that leaves its kernel no init (it
    panics at every boot): panic= reboots it, each boot spends a try, and the node comes
    back on its committed copy with no hand on it."""
    m = node.up("panic")
    node.serve(next_build / PXE_DIR)
    m.succeed(f"cbios update {URL} --no-reboot", timeout=900)
    m.succeed("cbios bootenv cbios_spare_cmdline=rdinit=/nonexistent")
    mark = m.console_log.stat().st_size
    start = m.uptime()
    m.succeed("systemctl reboot")
    bound = profile.boot.tries * (profile.boot.panic_reboot + 120) + profile.qemu.ready_timeout
    ready = m.wait_report(("READY",), bound)
    node.figures["panic_fallback_s"] = round(m.uptime() - start, 1)
    assert "version=1.0.0 copy=root" in ready, ready
    console = m.console(mark)
    assert console.count("Kernel panic - not syncing") == profile.boot.tries, console[-3000:]
    assert f"Rebooting in {profile.boot.panic_reboot} seconds" in console
    assert "CBIOS: copy spare did not become ready in its tries: falling back to root" in console
    st = status(m)
    assert (st["running"], st["copies"]["spare"]["state"]) == ("root", "bad")
    assert st["last_fallback"] == "copy spare did not become ready in its tries"
    assert NEXT_VERSION not in st["refused_versions"]  # it never ran: the next update may bring it again
    assert m.succeed(KEPT) == "kept\nkept"


def test_a_good_release_through_cb_manager_is_committed_and_keeps_the_slots(
        profile: Profile, next_build: Path, node: Node) -> None:
    m = node.up("next")
    node.serve(next_build / PXE_DIR)
    start = m.uptime()
    result = json.loads(m.succeed(f"cbios update {URL} --through-manager --json", timeout=900))
    node.figures["update_write_s"] = result["seconds"]
    assert (result["from"], result["version"], result["copy"]) == ("1.0.0", NEXT_VERSION, "spare")
    ready = m.wait_report(("READY",), profile.qemu.ready_timeout)  # CB-Executor reboots the node
    node.figures["update_to_ready_s"] = round(m.uptime() - start, 1)
    assert f"version={NEXT_VERSION} copy=spare" in ready
    st = status(m)
    assert (st["running"], st["version"], st["next_boot"]) == ("spare", NEXT_VERSION, "spare")
    assert st["copies"]["spare"]["state"] == "good"  # committed once ready
    assert (st["copies"]["root"]["version"], st["copies"]["root"]["state"]) == ("1.0.0", "good")
    assert m.succeed("tail -n 1 /etc/systemd/journald.conf.d/cbios.conf") == NEXT_MARK
    assert m.succeed(KEPT) == "kept\nkept"
    assert m.succeed(f"slot list {NODE}") == node.slots
    m.shutdown()
