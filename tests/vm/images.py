"""The images the VM tests boot, each built once per run and shared by every pytest process
of it: qemu-test and its node disk, the cluster's second node and a third, with their disks,
the next release and a broken one, and a compute node's release. Made under one lock, so that
two test processes never build at once (the second finds the first's work up to date); the
releases live at fixed places in build/tests/, so they are found again. `python -m
tests.vm.images` makes them all before the tests run, each disk flashed beside the builds."""

from __future__ import annotations

import fcntl
import logging
import queue
import shutil
import sys
import threading
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
    return _locked(_disk, project, PROFILE)


def peer_disk(project: Project) -> Path:
    """The second node's build (warm: it installs qemu-test's packages) and disk."""
    return _locked(_disk, project, PEER_PROFILE)


def third_disk(project: Project) -> Path:
    """The node that joins the cluster at runtime: its build (warm too) and disk."""
    return _locked(_disk, project, THIRD_PROFILE)


def next_build(project: Project) -> Path:
    """The next release: NEXT_VERSION, one overlay file changed."""
    return _locked(_next_build, project)


def broken_build(project: Project) -> Path:
    """A bad release: BROKEN_VERSION, whose CB-Manager exits at once. One try to become ready
    (its profile says so), so that its rollback costs one failed boot, not two."""
    return _locked(_broken_build, project)


def compute_release(project: Project) -> Path:
    """qemu-test-compute, built, and its release file: what a management node's image store takes."""
    return _locked(_compute_release, project)


def _locked(make: Callable[..., Path], project: Project, *args: str) -> Path:
    with images_lock(project):
        return make(project, *args)


def _disk(project: Project, name: str) -> Path:
    profile = load_profile(project, name)
    build(project, profile)
    return make_disk(project, profile)


def _release(project: Project, name: str, version: str, change: Callable[[Path], None]) -> Path:
    """qemu-test at VERSION, built from a copy of the project's inputs that CHANGE edits, as
    a release engineer makes the next release; mkosi's caches are shared with the first build."""
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


def _next_build(project: Project) -> Path:
    def change(root: Path) -> None:
        conf = root / "overlays/base/etc/systemd/journald.conf.d/cbios.conf"
        conf.write_text(conf.read_text() + NEXT_MARK + "\n")
    return _release(project, "next-release", NEXT_VERSION, change)


def _broken_build(project: Project) -> Path:
    def change(root: Path) -> None:
        (root / "slot-templates/cb-manager/run").write_text(
            "#!/bin/sh\necho 'CB-Manager: a broken release: exiting' >&2\nexit 1\n")
        yaml = root / "profiles" / f"{PROFILE}.yaml"
        yaml.write_text(yaml.read_text().replace("  tries: 2\n", "  tries: 1\n", 1))
    return _release(project, "broken-release", BROKEN_VERSION, change)


def _compute_release(project: Project) -> Path:
    out = build(project, load_profile(project, COMPUTE_PROFILE))
    path = out / "release" / f"{COMPUTE_PROFILE}{SUFFIX}"
    if not path.is_file() or path.stat().st_mtime < (out / MANIFEST).stat().st_mtime:
        path.parent.mkdir(exist_ok=True)
        write_release(out, path)
    return path


def make_all(project: Project) -> None:
    """Every image, under the lock: the builds one after another, and each node disk flashed
    (a VM, one core's work) beside the builds that come after its own, on the other core."""
    with images_lock(project):
        built = queue.Queue[str | None]()
        failed: list[BaseException] = []

        def flash() -> None:
            while (name := built.get()) is not None:
                if not failed:
                    try:
                        make_disk(project, load_profile(project, name))
                    except BaseException as e:  # reported by the builds' thread, at its end
                        failed.append(e)

        flasher = threading.Thread(target=flash, name="flasher")
        flasher.start()
        try:
            for name in (PROFILE, PEER_PROFILE, THIRD_PROFILE):
                build(project, load_profile(project, name))
                built.put(name)
            _next_build(project)
            _broken_build(project)
            _compute_release(project)
        finally:
            built.put(None)
            flasher.join()
        if failed:
            raise failed[0]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    make_all(Project.find())
    return 0


if __name__ == "__main__":
    sys.exit(main())
