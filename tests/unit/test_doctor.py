"""`cbios doctor`: the real CLI on this host, with QEMU hidden from PATH, its JSON, the
Makefile's APT_PACKAGES against the checks, and low disk and missing KVM made up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cbios import doctor, qemu
from cbios.project import Project

ROOT = Path(__file__).resolve().parents[2]
# Every check when root (what `make deps` and this host give); a user who is not root
# is refused `build`, so that run asks for `boot` alone.
VERB = [] if os.geteuid() == 0 else ["boot"]


def cbios_doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cbios.cli", "doctor", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False, env=env, cwd=ROOT, timeout=120)


def check(name: str) -> doctor.Check:
    return next(c for c in doctor.CHECKS if c.name == name)


def test_this_host_passes() -> None:
    proc = cbios_doctor(*VERB)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]


def test_qemu_hidden_from_path_is_one_failure_with_its_fix(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for exe in Path(d).glob("*") if Path(d).is_dir() else ():
            hidden = exe.name.startswith("qemu-system-") or exe.name == "qemu-img"
            if not hidden and exe.is_file() and os.access(exe, os.X_OK) and not (bin_dir / exe.name).exists():
                (bin_dir / exe.name).symlink_to(exe)
    proc = cbios_doctor(*VERB, env={**os.environ, "PATH": str(bin_dir)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert failed == [line for line in lines if re.search("qemu", line, re.I)]
    assert len(failed) == 1
    assert "qemu-system-x86_64, qemu-img: not found" in failed[0]
    assert failed[0].endswith("fix: make deps (qemu-system-x86 qemu-utils)")
    assert proc.stderr == ""


def test_json_lists_the_checks_of_a_verb() -> None:
    proc = cbios_doctor("boot", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(proc.stdout)
    assert [c["name"] for c in checks] == [c.name for c in doctor.CHECKS if "boot" in c.verbs] == ["qemu", "kvm"]
    for c in checks:
        assert set(c) == {"name", "status", "detail", "fix", "verbs"}
        assert c["status"] in ("ok", "warn") and "boot" in c["verbs"]
        assert set(c["verbs"]) <= set(doctor.VERBS)


def makefile_apt_packages() -> set[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    m = re.search(r"^APT_PACKAGES\s*:?=(.*)$", text, re.M)
    assert m, "no APT_PACKAGES in the Makefile"
    return set(m[1].split())


def test_the_makefile_installs_what_the_doctor_checks() -> None:
    named = doctor.packages()
    apt = makefile_apt_packages()
    assert named - apt == set(), "the doctor names packages `make deps` does not install"
    assert apt - named == set(), "`make deps` installs packages the doctor does not check"


def statvfs_of(free: int) -> Callable[[str], os.statvfs_result]:
    def statvfs(path: str) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, free * 2 // 4096, free // 4096, free // 4096, 1000, 500, 500, 0, 255))

    return statvfs


@pytest.mark.parametrize(("gib", "status"), [(1, "fail"), (5, "warn"), (50, "ok")])
def test_free_space_warns_then_fails(tmp_path: Path, gib: int, status: str) -> None:
    host = doctor.Host(Project(tmp_path), statvfs=statvfs_of(gib * doctor.GIB))
    result = doctor.run_check(check("free space"), host)
    assert result.status == status
    assert f"{gib:.1f} GiB free" in result.detail
    assert ("make test" in result.fix) == (status != "ok")
    assert "\n" not in doctor.line(result)


def test_no_kvm_is_a_warning_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CBIOS_ACCEL", raising=False)
    monkeypatch.setattr(qemu, "KVM_DEVICE", tmp_path / "kvm")
    result = doctor.run_check(check("kvm"), doctor.Host(Project(tmp_path)))
    assert result.status == "warn"
    assert doctor.line(result).startswith(f"WARN  kvm: no {tmp_path / 'kvm'} ")
    assert "modprobe" in result.fix and "TCG works" in result.fix
    assert qemu.choose_accel(tmp_path / "vmlinuz", tmp_path) == "tcg"  # the same reason decides QEMU's
