"""The images the VM tests boot, each built once per run and shared by every pytest process
of it: qemu-test and its node disk, the cluster's second node and its disk, the next release
and a broken one, and a compute node's release. Made under one lock, so that two test processes never build at once (the
second finds the first's work up to date); the releases live at fixed places in build/tests/,
so they are found again. `python -m tests.vm.images` makes them all before the tests run."""

from __future__ import annotations

import fcntl
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cbios.build import build
from cbios.disk import make_disk
from cbios.manifest import MANIFEST
from cbios.profile import load_profile
from cbios.project import Project
from cbios.release import SUFFIX, write_release

PROFILE = "qemu-test"
PEER_PROFILE = "qemu-test-peer"  # the cluster's second node
THIRD_PROFILE = "qemu-test-third"  # a third, which joins at runtime
COMPUTE_PROFILE = "qemu-test-compute"  # booted by qemu-test's boot-server slot
NEXT_VERSION = "2.0.1"  # qemu-test with a changed overlay file
NEXT_MARK = f"# qemu-test {NEXT_VERSION}: journald as before"
BROKEN_VERSION = "2.0.0"  # qemu-test whose CB-Manager cannot start


def tests_dir(project: Project) -> Path:
    return project.build / "tests"


@contextmanager
def images_lock(project: Project) -> Iterator[None]:
    tests_dir(project).mkdir(parents=True, exist_ok=True)
    with open(tests_dir(project) / "images.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def built(project: Project) -> Path:
    """build/qemu-test, built (or found up to date)."""
    with images_lock(project):
        return build(project, load_profile(project, PROFILE))


def node_disk(project: Project) -> Path:
    """build/qemu-test/disk.qcow2, made by the flasher (or found up to date)."""
    with images_lock(project):
        return make_disk(project, load_profile(project, PROFILE))


def peer_disk(project: Project) -> Path:
    """The second node's build (warm: it installs qemu-test's packages) and disk."""
    return _node_of(project, PEER_PROFILE)


def third_disk(project: Project) -> Path:
    """The node that joins the cluster at runtime: its build (warm too) and disk."""
    return _node_of(project, THIRD_PROFILE)


def _node_of(project: Project, name: str) -> Path:
    with images_lock(project):
        profile = load_profile(project, name)
        build(project, profile)
        return make_disk(project, profile)


def release(project: Project, name: str, version: str, change: Callable[[Path], None]) -> Path:
    """qemu-test at VERSION, built from a copy of the project's inputs that CHANGE edits, as
    a release engineer makes the next release; mkosi's caches are shared with the first build."""
    with images_lock(project):
        work = tests_dir(project) / name
        root = work / "project"
        shutil.rmtree(root, ignore_errors=True)
        for sub in ("profiles", "overlays", "initrd", "slot-templates"):
            shutil.copytree(project.root / sub, root / sub, symlinks=True)
        (root / ".cache").symlink_to(project.cache.resolve())
        yaml = root / "profiles" / f"{PROFILE}.yaml"
        yaml.write_text(yaml.read_text().replace('version: "1.0.0"', f'version: "{version}"', 1))
        change(root)
        copy = Project(root, build_dir=work / "build")
        return build(copy, load_profile(copy, PROFILE))


def next_build(project: Project) -> Path:
    """The next release: NEXT_VERSION, one overlay file changed."""
    def change(root: Path) -> None:
        conf = root / "overlays/base/etc/systemd/journald.conf.d/cbios.conf"
        conf.write_text(conf.read_text() + NEXT_MARK + "\n")
    return release(project, "next-release", NEXT_VERSION, change)


def broken_build(project: Project) -> Path:
    """A bad release: BROKEN_VERSION, whose CB-Manager exits at once. One try to become ready
    (its profile says so), so that its rollback costs one failed boot, not two."""
    def change(root: Path) -> None:
        (root / "slot-templates/cb-manager/run").write_text(
            "#!/bin/sh\necho 'CB-Manager: a broken release: exiting' >&2\nexit 1\n")
        yaml = root / "profiles" / f"{PROFILE}.yaml"
        yaml.write_text(yaml.read_text().replace("  tries: 2\n", "  tries: 1\n", 1))
    return release(project, "broken-release", BROKEN_VERSION, change)


def compute_release(project: Project) -> Path:
    """qemu-test-compute, built, and its release file: what a management node's image store takes."""
    with images_lock(project):
        out = build(project, load_profile(project, COMPUTE_PROFILE))
        path = out / "release" / f"{COMPUTE_PROFILE}{SUFFIX}"
        if not path.is_file() or path.stat().st_mtime < (out / MANIFEST).stat().st_mtime:
            path.parent.mkdir(exist_ok=True)
            write_release(out, path)
        return path


ALL = (built, node_disk, peer_disk, third_disk, next_build, broken_build, compute_release)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    project = Project.find()
    for make in ALL:
        make(project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
