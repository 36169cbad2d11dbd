"""The build's artifacts and caches, and the `boot --check` verb, on the real qemu-test build."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from cbios import manifest, signing
from cbios.build import ARTIFACTS, build
from cbios.node import update
from cbios.profile import Profile
from cbios.project import Project


def test_manifest_lists_every_artifact_with_its_sha256(built: Path, build_manifest: dict[str, Any]) -> None:
    assert sorted(build_manifest["artifacts"]) == sorted(ARTIFACTS)
    for name, meta in build_manifest["artifacts"].items():
        data = (built / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], name
        assert len(data) == meta["size"], name
    packages = build_manifest["packages"]["root"]
    assert all(p["name"] and p["version"] for p in packages)
    assert "linux-image-amd64" in {p["name"] for p in packages}


def test_the_manifest_is_signed_and_the_firmware_holds_the_key_that_verifies_it(
        vm_project: Project, profile: Profile, built: Path, build_manifest: dict[str, Any], tmp_path: Path) -> None:
    assert profile.update.signing_key is not None
    in_firmware = subprocess.run(["debugfs", "-R", f"cat /{signing.NODE_KEY}", str(built / "root.img")],
                                 capture_output=True, check=True).stdout
    assert in_firmware == signing.public_key(vm_project.root / profile.update.signing_key)
    (tmp_path / "key.pem").write_bytes(in_firmware)
    data, sig = (built / manifest.MANIFEST).read_bytes(), (built / manifest.SIGNATURE).read_bytes()
    assert update.verify_signature(data, sig, tmp_path / "key.pem")
    assert not update.verify_signature(data.replace(b'"1.0.0"', b'"9.0.0"'), sig, tmp_path / "key.pem")
    assert (build_manifest["architecture"], build_manifest["boot"]["tries"]) == ("x86-64", profile.boot.tries)


def test_root_img_is_ext4_sized_to_contents_plus_headroom(built: Path, profile: Profile) -> None:
    out = subprocess.run(["dumpe2fs", "-h", str(built / "root.img")], capture_output=True, text=True, check=True)
    fields = dict(re.findall(r"^([^:]+):\s+(.*)$", out.stdout, re.M))
    assert fields["Filesystem volume name"] == "cbios-root"
    free = int(fields["Free blocks"]) * int(fields["Block size"])
    assert free >= 64 << 20  # the profile's headroom
    assert free < 200 << 20  # and not much more
    decompressed = subprocess.run(["zstd", "-dc", str(built / "root.img.zst")], capture_output=True, check=True)
    assert decompressed.stdout == (built / "root.img").read_bytes()


def test_unchanged_build_does_nothing(vm_project: Project, profile: Profile, built: Path) -> None:
    before = (built / "manifest.json").stat().st_mtime_ns
    build(vm_project, profile)
    assert (built / "manifest.json").stat().st_mtime_ns == before


def test_forced_rebuild_downloads_nothing(vm_project: Project, profile: Profile, built: Path) -> None:
    """mkosi's incremental image and package cache: no metadata sync, no package fetched."""
    build(vm_project, profile, force=True)
    for log in ("initrd.log", "root.log"):
        text = (built / "work" / "logs" / log).read_text()
        last_run = text[text.rindex("+ mkosi"):]
        assert not re.search(r"^(Get|Hit):\d+ ", last_run, re.M), f"{log}: apt fetched something"
        assert "Syncing package manager metadata" not in last_run, log
        assert "not reusing cached images" not in last_run, log


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
