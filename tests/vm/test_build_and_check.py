"""The build's artifacts and caches, and the `boot --check` verb, on the real qemu-test build."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from cbios import manifest, signing
from cbios.artifacts import ARTIFACTS
from cbios.node import update
from cbios.node.boot import verity
from cbios.profile import Profile
from cbios.project import Project
from cbios.release import write_release
from tests.vm import images


def test_manifest_lists_every_artifact_with_its_sha256(built: Path, build_manifest: dict[str, Any]) -> None:
    assert sorted(build_manifest["artifacts"]) == sorted(ARTIFACTS)
    for name, meta in build_manifest["artifacts"].items():
        data = (built / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], name
        assert len(data) == meta["size"], name
    packages = build_manifest["packages"]["root"]
    assert all(p["name"] and p["version"] for p in packages)
    assert "linux-image-amd64" in {p["name"] for p in packages}


def initrd_file(built: Path, path: str) -> bytes:
    """A file of the initrd (one xz stream: its cpio archives, the kernel modules last)."""
    cpio = subprocess.run(["xz", "-dc", str(built / "initrd.img")], capture_output=True, check=True).stdout
    return subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", path], input=cpio, capture_output=True,
                          check=True).stdout


def test_the_manifest_is_signed_and_root_and_initrd_hold_the_key_that_verifies_it(
        vm_project: Project, profile: Profile, built: Path, build_manifest: dict[str, Any], tmp_path: Path) -> None:
    assert profile.update.signing_key is not None
    in_firmware = subprocess.run(["unsquashfs", "-cat", str(built / "root.img"), signing.NODE_KEY],
                                 capture_output=True, check=True).stdout
    assert in_firmware == signing.public_key(vm_project.root / profile.update.signing_key)
    assert initrd_file(built, signing.NODE_KEY) == in_firmware  # the flasher's
    (tmp_path / "key.pem").write_bytes(in_firmware)
    data, sig = (built / manifest.MANIFEST).read_bytes(), (built / manifest.SIGNATURE).read_bytes()
    assert update.verify_signature(data, sig, tmp_path / "key.pem")
    assert not update.verify_signature(data.replace(b'"1.0.0"', b'"9.0.0"'), sig, tmp_path / "key.pem")
    assert (build_manifest["architecture"], build_manifest["boot"]["tries"]) == ("x86-64", profile.boot.tries)


def test_no_artifact_holds_the_cluster_key(vm_project: Project, built: Path, tmp_path: Path) -> None:
    """The key the VM tests set on their nodes is in no file of the build, the PXE bundle or
    a release, nor inside root.img's file system or the initrd's archive."""
    key = (vm_project.root / "profiles/keys/qemu-test-cluster.key").read_bytes().strip()
    release = write_release(built, tmp_path / "r.cbios.tar")
    files = [p for p in [*built.rglob("*"), release] if p.is_file() and not p.is_symlink() and p.name != "disk.qcow2"]
    assert {"root.img", "initrd.img", "vmlinuz", "r.cbios.tar"} <= {p.name for p in files}
    for path in files:
        assert key not in path.read_bytes(), path
    subprocess.run(["unsquashfs", "-q", "-no-progress", "-no-xattrs", "-d", str(tmp_path / "root"),
                    str(built / "root.img")], check=True, stdout=subprocess.DEVNULL)
    found = subprocess.run(["grep", "-rlF", key.decode(), str(tmp_path / "root")], capture_output=True, text=True)
    assert found.returncode == 1 and found.stdout == "", found.stdout
    assert (tmp_path / "root" / "usr/lib/cbios/slots.json").is_file()  # the tree is there to search
    cpio = subprocess.run(["xz", "-dc", str(built / "initrd.img")], capture_output=True, check=True).stdout
    assert len(cpio) > 10 << 20 and key not in cpio


def test_root_img_is_squashfs_followed_by_its_verity_tree(built: Path, build_manifest: dict[str, Any]) -> None:
    image = built / "root.img"
    out = subprocess.run(["unsquashfs", "-s", str(image)], capture_output=True, text=True, check=True).stdout
    assert "Compression xz" in out
    v = verity.Verity.parse(build_manifest["verity"]["param"])
    squashfs_bytes = int(re.search(r"Filesystem size (\d+) bytes", out).group(1))  # type: ignore[union-attr]
    assert v.hash_offset == -(-squashfs_bytes // verity.BLOCK) * verity.BLOCK < image.stat().st_size
    check = ["veritysetup", "verify", "--no-superblock", "--salt=-", f"--data-blocks={v.data_blocks}",
             f"--hash-offset={v.hash_offset}", str(image), str(image)]
    assert subprocess.run([*check, v.root_hash], capture_output=True, check=False).returncode == 0
    assert subprocess.run([*check, "0" * 64], capture_output=True, check=False).returncode != 0
    assert build_manifest["layout"]["root_size"] >= image.stat().st_size


def test_unchanged_build_does_nothing(vm_project: Project, built: Path) -> None:
    before = (built / "manifest.json").stat().st_mtime_ns
    images.built(vm_project)  # build(), under the lock the other test process takes
    assert (built / "manifest.json").stat().st_mtime_ns == before


def test_the_next_release_downloads_nothing_and_packs_no_unchanged_initrd_again(
        built: Path, next_build: Path) -> None:
    """The next release (one overlay file changed, in a copy of the project) reuses mkosi's
    incremental images and package cache: no metadata sync, no package fetched; its initrd,
    whose files did not change, is the first build's to the byte (packed once, from the cache)."""
    for log in ("initrd.log", "root.log"):
        text = (next_build / "work" / "logs" / log).read_text()
        last_run = text[text.rindex("+ mkosi"):]
        assert not re.search(r"^(Get|Hit):\d+ ", last_run, re.M), f"{log}: apt fetched something"
        assert "Syncing package manager metadata" not in last_run, log
        assert "not reusing cached images" not in last_run, log
    assert (next_build / "initrd.img").read_bytes() == (built / "initrd.img").read_bytes()
    assert (next_build / "root.img").read_bytes() != (built / "root.img").read_bytes()


def _cbios(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cbios.cli", *argv], capture_output=True, text=True, check=False)


def test_boot_check_reaches_ready_and_powers_off(built: Path) -> None:
    proc = _cbios("boot", "qemu-test", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "reached ready" in proc.stderr and "powered off" in proc.stderr


def test_boot_check_failure_shows_console_tail_and_log_path(built: Path) -> None:
    proc = _cbios("boot", "qemu-test", "--check", "--timeout", "10")
    assert proc.returncode == 1
    assert "no READY within 10 s" in proc.stderr
    assert "--- last 25 console lines ---" in proc.stderr
    assert "console log: " in proc.stderr and "Traceback" not in proc.stderr


def test_a_release_made_after_the_node_disk_verifies_with_the_firmwares_key(
        built: Path, node_disk: Path, tmp_path: Path) -> None:
    """make image (the build, then its node disk), then cbios release: nothing rewrote the
    signed manifest, so the release file still verifies with the key inside root.img."""
    assert (built / "disk.json").is_file()
    path = write_release(built, tmp_path / "r.cbios.tar")
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "r", filter="data")
    key = subprocess.run(["unsquashfs", "-cat", str(tmp_path / "r" / "root.img"), signing.NODE_KEY],
                         capture_output=True, check=True).stdout
    (tmp_path / "key.pem").write_bytes(key)
    doc = (tmp_path / "r" / manifest.MANIFEST).read_bytes()
    assert update.verify_signature(doc, (tmp_path / "r" / manifest.SIGNATURE).read_bytes(), tmp_path / "key.pem")
    assert b'"disk"' not in doc
