"""The release engineer's verbs. Each task is a thin call into the cbios package.

    invoke build --profile qemu-test
    invoke disk --profile qemu-test
    invoke boot --profile qemu-test [--check] [--disk [--persist]]
    invoke pxe-serve --profile qemu-test --interface eth1 [--mode install]
    invoke test [--unit | --vm]
    invoke bench --profile qemu-test [--cold] [--power-cuts 20]
"""

from __future__ import annotations

import subprocess
import sys

from invoke import Context, Exit, task


def _cbios(*argv: str) -> None:
    from cbios.cli import main

    status = main(list(argv))
    if status != 0:
        raise Exit(code=status)


@task(help={"profile": "profile to build (profiles/NAME.yaml)",
            "force": "rebuild even when nothing changed"})
def build(c: Context, profile: str = "qemu-test", force: bool = False) -> None:
    """Build a profile's firmware into build/PROFILE/."""
    _cbios("build", profile, *(["--force"] if force else []))


@task(help={"profile": "profile whose node disk to make (built first if needed)",
            "force": "remake the disk even when it is up to date"})
def disk(c: Context, profile: str = "qemu-test", force: bool = False) -> None:
    """Make build/PROFILE/disk.qcow2 by booting the flasher in QEMU on a blank disk."""
    _cbios("build", profile)
    _cbios("disk", profile, *(["--force"] if force else []))


@task(help={"profile": "profile whose PXE bundle to serve (built first if needed)",
            "interface": "the interface on the nodes' network",
            "mode": "boot, update or install for every node (default: iPXE's menu)",
            "http_port": "HTTP port (default 8080)"})
def pxe_serve(c: Context, profile: str = "qemu-test", interface: str = "", mode: str = "",
              http_port: int = 8080) -> None:
    """Serve build/PROFILE/pxe to nodes: proxy-DHCP, TFTP and HTTP until Ctrl-C."""
    if not interface:
        raise Exit("pxe-serve: --interface IF is required: the interface on the nodes' network ('ip -br addr')",
                   code=2)
    _cbios("build", profile)
    _cbios("pxe", "serve", "--profile", profile, "--interface", interface, "--http-port", str(http_port),
           *(["--mode", mode] if mode else []))


@task(help={"profile": "profile whose release file to write (built first if needed)",
            "output": "where (default: build/PROFILE/PROFILE-VERSION.cbios.tar)"})
def release(c: Context, profile: str = "qemu-test", output: str = "") -> None:
    """One file with a build's update, for `cbios update FILE` on a node."""
    _cbios("build", profile)
    _cbios("release", profile, *(["--output", output] if output else []))


@task(help={"profile": "profile whose release to publish (built first if needed)",
            "port": "HTTP port on 127.0.0.1 (default 8086: VMs of 'invoke boot' reach it at http://10.0.2.100/)"})
def publish(c: Context, profile: str = "qemu-test", port: int = 8086) -> None:
    """Serve build/PROFILE/pxe over HTTP for `cbios update URL` on running nodes, until Ctrl-C."""
    _cbios("build", profile)
    _cbios("pxe", "publish", "--profile", profile, "--port", str(port))


@task(help={"profile": "profile to boot (built first if needed)",
            "check": "wait for ready, power off; exit non-zero with the console's tail on failure",
            "timeout": "seconds to wait for ready (default: the profile's qemu.ready_timeout)",
            "disk": "boot the node disk (made first if needed) instead of kernel, initrd and root.img",
            "persist": "with --disk: keep the guest's writes to the disk"})
def boot(c: Context, profile: str = "qemu-test", check: bool = False, timeout: int = 0,
         disk: bool = False, persist: bool = False) -> None:
    """Boot a profile in QEMU: interactive serial console, or --check."""
    _cbios("build", profile)
    if disk:
        _cbios("disk", profile)
    _cbios("boot", profile, *(["--check"] if check else []), *(["--timeout", str(timeout)] if timeout else []),
           *(["--disk"] if disk else []), *(["--persist"] if persist else []))


@task(help={"unit": "unit tests only (no root, no VM)", "vm": "VM tests only",
            "k": "pytest -k expression"})
def test(c: Context, unit: bool = False, vm: bool = False, k: str = "") -> None:
    """Run the tests: unit tests and linters, then VM tests that build and boot images."""
    args = [sys.executable, "-m", "pytest"]
    if unit:
        args += ["-m", "not vm"]
    elif vm:
        args += ["-m", "vm"]
    if k:
        args += ["-k", k]
    status = subprocess.run(args, check=False).returncode
    # pytest's 5 means "no tests collected": a suite that ran nothing has not passed.
    if status != 0:
        raise Exit(code=status)


@task(help={"profile": "profile to measure", "cold": "also measure a build from empty caches",
            "power_cuts": "also cut the power N times in each phase (install, update, first boot) and count "
                          "the recoveries (about 3 minutes a trial under TCG)"})
def bench(c: Context, profile: str = "qemu-test", cold: bool = False, power_cuts: int = 0) -> None:
    """Measure build times, artifact sizes, boot time to ready (and against a stock Debian root),
    PXE install time; write build/PROFILE/bench.json."""
    from cbios.bench import run_bench

    run_bench(profile, cold=cold, power_cuts=power_cuts)
