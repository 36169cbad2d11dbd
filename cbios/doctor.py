"""`cbios doctor [VERB]`: does this host have what a verb needs, before a long job finds out.

The checks are one table (CHECKS): each names the verbs that need it, what it looks for
(commands on PATH, files, or a probe of its own) and the Debian package of each command and
file, which is the fix. The Makefile's APT_PACKAGES is the same set of packages
(tests/unit/test_doctor.py holds the two together)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cbios import qemu
from cbios.node.bootserver.dnsmasq import IPXE_DIR, IPXE_FILES
from cbios.project import Project

Status = Literal["ok", "warn", "fail"]

VERBS = ("build", "disk", "boot", "pxe-serve", "pxe-pack", "release", "test")  # pxe publish needs Python alone
MKOSI_MIN = 24
GIB = 1 << 30
# Free space where builds write (build/, .cache/, mkosi's workspace in /var/tmp): a build of
# one profile takes about 3 GiB, a cold `make test` (its images, disks and caches) about 10.
SPACE_FAIL = 3 * GIB
SPACE_WARN = 10 * GIB
MKOSI_WORKSPACE = Path("/var/tmp")
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # not on a user's PATH on Debian
FIX_DEPS = "make deps"


@dataclass(frozen=True)
class Finding:
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Host:
    """What the probes read; a test hands in its own statvfs."""

    project: Project
    statvfs: Callable[[str], os.statvfs_result] = os.statvfs


Probe = Callable[[Host], Finding]


@dataclass(frozen=True)
class Check:
    name: str
    verbs: tuple[str, ...]  # the verbs that fail (or, for a warning, suffer) without it
    commands: Mapping[str, str] = field(default_factory=dict)  # command on PATH -> its Debian package
    files: Mapping[str, str] = field(default_factory=dict)  # file (a glob) -> its Debian package
    probe: Probe | None = None  # run once the commands and files are there

    @property
    def packages(self) -> set[str]:
        return {*self.commands.values(), *self.files.values()}


@dataclass(frozen=True)
class Result:
    name: str
    status: Status
    detail: str
    fix: str
    verbs: tuple[str, ...]


def _mkosi_version(host: Host) -> Finding:
    fix = f"{FIX_DEPS} (mkosi {MKOSI_MIN} from bookworm-backports)"
    try:
        proc = subprocess.run(["mkosi", "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return Finding("fail", "`mkosi --version` did not answer within 60 s", fix)
    said = (proc.stdout or proc.stderr).strip()
    m = re.search(r"(\d+)(\.\d+)*", said)
    if proc.returncode != 0 or m is None:
        return Finding("fail", f"`mkosi --version` said {said!r}", fix)
    if int(m[1]) < MKOSI_MIN:
        return Finding("fail", f"mkosi {m[0]} is older than {MKOSI_MIN}", fix)
    return Finding("ok", m[0])


def _kvm(host: Host) -> Finding:
    """qemu.py's own decision, read without booting a guest: the probe's verdict if it ran."""
    slower = "TCG works, slower"
    forced = os.environ.get("CBIOS_ACCEL")
    if forced:
        return Finding("ok" if forced == "kvm" else "warn", f"CBIOS_ACCEL={forced}",
                       "" if forced == "kvm" else f"unset CBIOS_ACCEL to use KVM where it works; {slower}")
    why = qemu.kvm_unusable()
    if why is not None:
        fix = ("modprobe kvm_intel (or kvm_amd), or turn on nested virtualization" if not qemu.KVM_DEVICE.exists()
               else "add the user to group kvm (adduser USER kvm), or run as root")
        return Finding("warn", f"{why}: TCG instead", f"{fix}; {slower}")
    verdict = qemu.probed_accel(host.project.build)
    if verdict == "tcg":
        return Finding("warn", f"guests hang on {qemu.KVM_DEVICE} (the probe since this boot): TCG instead",
                       f"check the host's KVM (dmesg); {slower}")
    return Finding("ok", str(qemu.KVM_DEVICE) + (" (probed since this boot: works)" if verdict else ""))


def _root(host: Host) -> Finding:
    euid = os.geteuid()
    if euid == 0:
        return Finding("ok", "root")
    return Finding("fail", f"euid {euid}, not root: mkosi's builds, dnsmasq's ports (67, 69) and the VM tests need it",
                   "run it as root (sudo)")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _space(host: Host) -> Finding:
    """Free space of each file system that build/, .cache/ and /var/tmp are on, the worst first."""
    places: dict[int, list[Path]] = {}
    for path in (host.project.build, host.project.cache, MKOSI_WORKSPACE):
        places.setdefault(_existing(path).stat().st_dev, []).append(path)
    parts: list[tuple[int, str]] = []
    for paths in places.values():
        st = host.statvfs(str(_existing(paths[0])))
        free = st.f_bavail * st.f_frsize
        parts.append((free, f"{', '.join(host.project.display(p) for p in paths)}: {free / GIB:.1f} GiB free"))
    parts.sort()
    least = parts[0][0]
    detail = "; ".join(text for _, text in parts)
    fix = (f"free space (a build takes about {SPACE_FAIL // GIB} GiB, a cold make test about {SPACE_WARN // GIB}), "
           "or set CBIOS_BUILD_DIR and CBIOS_CACHE_DIR elsewhere")
    if least < SPACE_FAIL:
        return Finding("fail", f"{detail} (under {SPACE_FAIL // GIB} GiB)", fix)
    if least < SPACE_WARN:
        return Finding("warn", f"{detail} (under {SPACE_WARN // GIB} GiB)", fix)
    return Finding("ok", detail)


BUILD = ("build", "test")
QEMU = ("disk", "boot", "test")
PXE = ("pxe-serve", "test")
TEST = ("test",)

CHECKS: tuple[Check, ...] = (
    Check("mkosi", BUILD, commands={"mkosi": "mkosi"}, probe=_mkosi_version),
    Check("bubblewrap", BUILD, commands={"bwrap": "bubblewrap"}),
    Check("systemd-nspawn", BUILD, commands={"systemd-nspawn": "systemd-container"}),
    Check("debian-archive-keyring", BUILD,
          files={"/usr/share/keyrings/debian-archive-keyring.gpg": "debian-archive-keyring"}),
    Check("kmod", BUILD, commands={"depmod": "kmod"}),
    Check("squashfs-tools", BUILD, commands={"mksquashfs": "squashfs-tools", "unsquashfs": "squashfs-tools"}),
    Check("veritysetup", BUILD, commands={"veritysetup": "cryptsetup-bin"}),
    Check("zstd", BUILD, commands={"zstd": "zstd"}),
    Check("xz", BUILD, commands={"xz": "xz-utils"}),
    Check("cpio", BUILD, commands={"cpio": "cpio"}),
    Check("openssl", (*BUILD, "pxe-pack"), commands={"openssl": "openssl"}),
    Check("mkfs.ext4", ("disk", "test"), commands={"mkfs.ext4": "e2fsprogs"}),
    Check("qemu", QEMU, commands={qemu.QEMU: "qemu-system-x86", "qemu-img": "qemu-utils"}),
    Check("kvm", QEMU, probe=_kvm),
    Check("dnsmasq", PXE, commands={"dnsmasq": "dnsmasq-base"}),
    Check("ipxe", PXE, files={str(IPXE_DIR / name): "ipxe" for name in IPXE_FILES}),
    Check("ip", PXE, commands={"ip": "iproute2"}),
    Check("nginx", TEST, commands={"nginx": "nginx-light"}),
    Check("socat", TEST, commands={"socat": "socat"}),
    Check("shellcheck", TEST, commands={"shellcheck": "shellcheck"}),
    Check("grub-common", TEST, commands={"grub-editenv": "grub-common", "grub-script-check": "grub-common"}),
    Check("jq", TEST, commands={"jq": "jq"}),
    Check("gpgv", TEST, commands={"gpgv": "gpgv"}),
    Check("python3-venv", TEST, files={"/usr/lib/python3*/ensurepip/__init__.py": "python3-venv"}),
    Check("root", ("build", "pxe-serve", "test"), probe=_root),
    Check("free space", ("build", "disk", "release", "test"), probe=_space),
)


def _missing(check: Check) -> Finding | None:
    """A failure naming what is not there and the packages that bring it; None if all is."""
    gone = [c for c in check.commands if shutil.which(c) is None]
    gone += [f for f in check.files if not glob.glob(f)]
    if not gone:
        return None
    packages = " ".join(dict.fromkeys({**check.commands, **check.files}[g] for g in gone))
    in_sbin = [c for c in gone if c in check.commands and shutil.which(c, path=SBIN)]
    if in_sbin and len(in_sbin) == len(gone):
        return Finding("fail", f"{', '.join(gone)}: not on PATH (in sbin)", "add /usr/sbin to PATH, or run as root")
    return Finding("fail", f"{', '.join(gone)}: not found", f"{FIX_DEPS} ({packages})")


def run_check(check: Check, host: Host) -> Result:
    finding = _missing(check)
    if finding is None and check.probe is not None:
        finding = check.probe(host)
    if finding is None:
        finding = Finding("ok", ", ".join([*check.commands, *(glob.glob(f)[0] for f in check.files)]))
    return Result(check.name, finding.status, finding.detail, finding.fix, check.verbs)


def diagnose(host: Host, verb: str | None = None) -> list[Result]:
    """The checks VERB needs (every check when None), run."""
    return [run_check(c, host) for c in CHECKS if verb is None or verb in c.verbs]


def line(result: Result) -> str:
    """One line: short when ok; a problem with the verbs it hurts and its fix."""
    if result.status == "ok":
        return f"ok    {result.name}" + (f": {result.detail}" if result.detail != result.name else "")
    fix = f"; fix: {result.fix}" if result.fix else ""
    return f"{result.status.upper():<5} {result.name}: {result.detail} ({', '.join(result.verbs)}){fix}"


def packages() -> set[str]:
    """Every Debian package the doctor names: the Makefile's APT_PACKAGES."""
    return {p for c in CHECKS for p in c.packages}


def report(project: Project, verb: str | None, *, as_json: bool = False) -> int:
    """Print the checks VERB needs, a line each (or JSON); 1 when one of them fails, else 0."""
    results = diagnose(Host(project), verb)
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        for r in results:
            print(line(r))
        failed, warned = (sum(r.status == s for r in results) for s in ("fail", "warn"))
        print(f"doctor ({verb or 'every verb'}): {failed} failed, {warned} warning(s), {len(results)} checks")
    return 1 if any(r.status == "fail" for r in results) else 0
