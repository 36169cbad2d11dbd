"""VM tests: build the qemu-test profile once per session (mkosi's caches make a rebuild
cheap) and boot it in QEMU. Chosen with `pytest -m vm`; they need root, mkosi and QEMU."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbios import manifest
from cbios.boot import kernel_boot_spec
from cbios.machine import Machine
from cbios.profile import Profile, load_profile
from cbios.project import Project
from tests.vm import images
from tests.vm.images import PEER_PROFILE, PROFILE


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
def built(vm_project: Project) -> Path:
    """build/qemu-test, built (or found up to date) once per session."""
    return images.built(vm_project)


@pytest.fixture(scope="session")
def peer_profile(vm_project: Project) -> Profile:
    return load_profile(vm_project, PEER_PROFILE)


@pytest.fixture(scope="session")
def peer_disk(vm_project: Project, peer_profile: Profile, built: Path) -> Path:
    """The second node's build (warm: it installs qemu-test's packages) and disk."""
    return images.peer_disk(vm_project)


@pytest.fixture(scope="session")
def third_profile(vm_project: Project) -> Profile:
    return load_profile(vm_project, images.THIRD_PROFILE)


@pytest.fixture(scope="session")
def third_disk(vm_project: Project, built: Path) -> Path:
    """The build and disk of the node that joins the cluster at runtime."""
    return images.third_disk(vm_project)


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
    return images.node_disk(vm_project)


@pytest.fixture
def disk_copy(node_disk: Path, tmp_path: Path) -> Path:
    """A writable copy of the node disk for one test (a qcow2 overlay: the built disk stays)."""
    from cbios.disk import overlay

    return overlay(node_disk, tmp_path / "node.qcow2")


@pytest.fixture(scope="session")
def next_build(vm_project: Project, built: Path) -> Path:
    return images.next_build(vm_project)


@pytest.fixture(scope="session")
def broken_build(vm_project: Project, built: Path) -> Path:
    return images.broken_build(vm_project)
