"""VM tests: build the qemu-test profile once per session (mkosi's caches make a rebuild
cheap) and boot it in QEMU. Chosen with `pytest -m vm`; they need root, mkosi and QEMU."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cbios import manifest
from cbios.boot import kernel_boot_spec
from cbios.build import build
from cbios.machine import Machine
from cbios.profile import Profile, load_profile
from cbios.project import Project

PROFILE = "qemu-test"
PEER_PROFILE = "qemu-test-peer"  # the cluster's second node
NEXT_VERSION = "2.0.1"  # qemu-test with a changed overlay file
NEXT_MARK = f"# qemu-test {NEXT_VERSION}: journald as before"
BROKEN_VERSION = "2.0.0"  # qemu-test whose CB-Manager cannot start


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def vm_project() -> Project:
    if os.geteuid() != 0:
        pytest.fail("VM tests build images with mkosi and need root")
    return Project.find()


@pytest.fixture(scope="session")
def profile(vm_project: Project) -> Profile:
    return load_profile(vm_project, PROFILE)


@pytest.fixture(scope="session")
def built(vm_project: Project, profile: Profile) -> Path:
    """build/qemu-test, built (or found up to date) once per session."""
    return build(vm_project, profile)


@pytest.fixture(scope="session")
def peer_profile(vm_project: Project) -> Profile:
    return load_profile(vm_project, PEER_PROFILE)


@pytest.fixture(scope="session")
def peer_disk(vm_project: Project, peer_profile: Profile, built: Path) -> Path:
    """The second node's build (warm: it installs qemu-test's packages) and disk."""
    from cbios.disk import make_disk

    build(vm_project, peer_profile)
    return make_disk(vm_project, peer_profile)


@pytest.fixture
def build_manifest(built: Path) -> dict[str, object]:
    """The build's manifest as it is now (a forced rebuild in a test before may have changed it)."""
    return manifest.read(built / manifest.MANIFEST)


@pytest.fixture(scope="session")
def scratch_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A blank second disk (/dev/vdb in the guest) for tests that need one."""
    path = tmp_path_factory.mktemp("disks") / "scratch.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    return path


@pytest.fixture(scope="module")
def machine(vm_project: Project, profile: Profile, built: Path, scratch_disk: Path) -> Iterator[Machine]:
    """qemu-test booted from kernel, initrd and root.img (plus a scratch disk), ready;
    powered off after the module."""
    spec = kernel_boot_spec(vm_project, profile, built)
    spec.drives.append(f"file={scratch_disk},format=qcow2,if=virtio")
    yield from ready_machine(Machine(spec, built / "work" / "vm-tests", name="qemu-test"), profile)


def ready_machine(m: Machine, profile: Profile) -> Iterator[Machine]:
    """For module fixtures: M started and ready; powered off after the module, killed if that fails."""
    try:
        m.start()
        m.wait_ready(profile.qemu.ready_timeout)
        yield m
        m.shutdown()
    finally:
        m.kill()


@pytest.fixture(scope="session")
def node_disk(vm_project: Project, profile: Profile, built: Path) -> Path:
    """build/qemu-test/disk.qcow2, made by the flasher once per session (or found up to date)."""
    from cbios.disk import make_disk

    return make_disk(vm_project, profile)


@pytest.fixture
def disk_copy(node_disk: Path, tmp_path: Path) -> Path:
    """A writable copy of the node disk for one test (a qcow2 overlay: the built disk stays)."""
    from cbios.disk import overlay

    return overlay(node_disk, tmp_path / "node.qcow2")


def release(vm_project: Project, work: Path, version: str, change: Callable[[Path], None]) -> Path:
    """qemu-test at VERSION, built from a copy of the project's inputs that CHANGE edits, as
    a release engineer makes the next release; mkosi's caches are shared with the first build."""
    root = work / "project"
    for name in ("profiles", "overlays", "initrd", "slot-templates"):
        shutil.copytree(vm_project.root / name, root / name, symlinks=True)
    (root / ".cache").symlink_to(vm_project.cache.resolve())
    yaml = root / "profiles" / f"{PROFILE}.yaml"
    yaml.write_text(yaml.read_text().replace('version: "1.0.0"', f'version: "{version}"', 1))
    change(root)
    project = Project(root, build_dir=work / "build")
    return build(project, load_profile(project, PROFILE))


@pytest.fixture(scope="session")
def next_build(vm_project: Project, built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The next release: NEXT_VERSION, one overlay file changed."""
    def change(root: Path) -> None:
        conf = root / "overlays/base/etc/systemd/journald.conf.d/cbios.conf"
        conf.write_text(conf.read_text() + NEXT_MARK + "\n")
    return release(vm_project, tmp_path_factory.mktemp("next-release"), NEXT_VERSION, change)


@pytest.fixture(scope="session")
def broken_build(vm_project: Project, built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bad release: BROKEN_VERSION, whose CB-Manager exits at once. One try to become ready
    (its profile says so), so that its rollback costs one failed boot, not two."""
    def change(root: Path) -> None:
        (root / "slot-templates/cb-manager/run").write_text(
            "#!/bin/sh\necho 'CB-Manager: a broken release: exiting' >&2\nexit 1\n")
        yaml = root / "profiles" / f"{PROFILE}.yaml"
        yaml.write_text(yaml.read_text().replace("  tries: 2\n", "  tries: 1\n", 1))
    return release(vm_project, tmp_path_factory.mktemp("broken-release"), BROKEN_VERSION, change)
