"""The release engineer's verbs. Each task is a thin call into the cbios package.

    invoke doctor [--verb build] [--json]
    invoke build --profile qemu-test
    invoke disk --profile qemu-test
    invoke boot --profile qemu-test [--check] [--disk [--persist]]
    invoke pxe-serve --profile compute --interface eth1 [--mode install]
    invoke publish --profile compute [--address 0.0.0.0]
    invoke release --profile compute [--output FILE]
    invoke pxe-pack --profile compute [--output FILE]
    invoke test [--unit | --vm | -k EXPR]
    invoke bench --profile qemu-test [--cold] [--power-cuts 20]
    invoke bench-pxe --profile qemu-test [--clients 1,10,50,100]
    invoke bench-cluster [--members 100 --unreachable 10]
    invoke power-cuts --profile qemu-test [--count 20] [--phase install ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from invoke import Context, Exit, task


def _cbios(*argv: str) -> None:
    from cbios.cli import main

    _exit_on_failure(main(list(argv)))


def _reported(call: Callable[[], object]) -> None:
    """CALL, its errors reported as `cbios` reports them: its lines, no traceback, its status;
    its progress logged as `cbios` logs it."""
    import logging

    from cbios.cli import reporting

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def step() -> int:
        call()
        return 0

    _exit_on_failure(reporting(step))


def _options(**options: object) -> list[str]:
    """`cbios` options from a task's: the same names, dashes for underscores; unset ones left out."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, "", 0, None):
            argv += [flag, str(value)]
    return argv


@task(help={"verb": "build, disk, boot, pxe-serve, pxe-publish, release or test (default: all)",
            "json": "a JSON list of the checks"})
def doctor(c: Context, verb: str = "", json: bool = False) -> None:
    """Check this host has what a verb needs: a line a check, each problem with its fix."""
    _cbios("doctor", *([verb] if verb else []), *_options(json=json))


@task(help={"profile": "profile to build (profiles/NAME.yaml; default qemu-test)",
            "force": "rebuild even when nothing changed"})
def build(c: Context, profile: str = "qemu-test", force: bool = False) -> None:
    """Build a profile's firmware into build/PROFILE/ (cbios build)."""
    _cbios("build", *_options(profile=profile, force=force))


@task(help={"profile": "profile whose node disk to make, built first if needed (default qemu-test)",
            "force": "remake the disk even when it is up to date"})
def disk(c: Context, profile: str = "qemu-test", force: bool = False) -> None:
    """Make build/PROFILE/disk.qcow2 by booting the flasher in QEMU on a blank disk (cbios disk)."""
    _cbios("build", *_options(profile=profile))
    _cbios("disk", *_options(profile=profile, force=force))


# The verbs that serve or flash nodes name their firmware: no default, so that the test
# firmware (an empty root password, the tests' back door) is never served by a forgotten flag.
@task(auto_shortflags=False,
      help={"profile": "profile whose PXE bundle to serve, built first if needed (or --bundle)",
            "bundle": "serve this bundle folder instead (a copy of build/NAME/pxe)",
            "interface": "the interface on the nodes' network",
            "mode": "boot, update or install for every node (default: iPXE's menu)",
            "http_port": "HTTP port (default 8080)",
            "receipts": "where the flasher's receipts go (default: beside the bundle)"})
def pxe_serve(c: Context, profile: str = "", bundle: str = "", interface: str = "", mode: str = "",
              http_port: int = 8080, receipts: str = "") -> None:
    """Serve a build's PXE bundle to nodes: proxy-DHCP, TFTP and HTTP until Ctrl-C (cbios pxe serve)."""
    if not interface:
        raise Exit("pxe-serve: --interface IF is required: the interface on the nodes' network ('ip -br addr')",
                   code=2)
    if profile:
        _cbios("build", "--profile", profile)
    _cbios("pxe", "serve", *_options(profile=profile, bundle=bundle, interface=interface, http_port=http_port,
                                     mode=mode, receipts=receipts))


@task(auto_shortflags=False,
      help={"profile": "profile whose field kit to write, built first if needed (or --bundle)",
            "bundle": "pack this bundle folder instead (needs --key)",
            "key": "the public key that verifies the manifest (default: the profile's signing key's)",
            "output": "where (default: build/PROFILE/PROFILE-VERSION.cbios-kit.pyz)"})
def pxe_pack(c: Context, profile: str = "", bundle: str = "", key: str = "", output: str = "") -> None:
    """One file that serves a build over PXE from a laptop with python3, dnsmasq-base and ipxe (cbios pxe pack)."""
    if profile:
        _cbios("build", "--profile", profile)
    _cbios("pxe", "pack", *_options(profile=profile, bundle=bundle, key=key, output=output))


@task(help={"profile": "profile whose release file to write, built first if needed",
            "output": "where (default: build/PROFILE/PROFILE-VERSION.cbios.tar)"})
def release(c: Context, profile: str = "", output: str = "") -> None:
    """One file with a build's update, for `cbios update FILE` on a node (cbios release)."""
    if profile:
        _cbios("build", "--profile", profile)
    _cbios("release", *_options(profile=profile, output=output))


@task(aliases=["pxe-publish"], auto_shortflags=False,
      help={"profile": "profile whose release to publish, built first if needed (or --bundle)",
            "bundle": "serve this bundle folder instead",
            "address": "address to listen on (default 127.0.0.1)",
            "port": "HTTP port (default 8086: VMs of 'invoke boot' reach it at http://10.0.2.100/)"})
def publish(c: Context, profile: str = "", bundle: str = "", address: str = "127.0.0.1", port: int = 8086) -> None:
    """Serve a build's bundle over HTTP for `cbios update URL` on running nodes, until Ctrl-C
    (cbios pxe publish)."""
    if profile:
        _cbios("build", "--profile", profile)
    _cbios("pxe", "publish", *_options(profile=profile, bundle=bundle, address=address, port=port))


@task(help={"profile": "profile to boot (built first if needed)",
            "check": "wait for ready, power off; exit non-zero with the console's tail on failure",
            "timeout": "seconds to wait for ready (default: the profile's qemu.ready_timeout)",
            "disk": "boot the node disk (made first if needed) instead of kernel, initrd and root.img",
            "persist": "with --disk: keep the guest's writes to the disk"})
def boot(c: Context, profile: str = "qemu-test", check: bool = False, timeout: int = 0,
         disk: bool = False, persist: bool = False) -> None:
    """Boot a profile in QEMU: interactive serial console, or --check."""
    _cbios("build", "--profile", profile)
    if disk:
        _cbios("disk", "--profile", profile)
    _cbios("boot", *_options(profile=profile, check=check, timeout=timeout, disk=disk, persist=persist))


# The whole run, in phases: the VM modules that need the machine to themselves (test_slots'
# two nodes, each with a VM inside, meet bounds of seconds; test_compute's management node
# and a compute node at a time), then two processes side by side (a VM under TCG is one
# core's work; the machine has two). Every VM module is in one.
VM_ALONE = ["tests/vm/test_slots.py", "tests/vm/test_compute.py"]
VM_SIDE_BY_SIDE = [["tests/vm/test_disk.py", "tests/vm/test_pxe.py"],
                   ["tests/vm/test_update.py", "tests/vm/test_boot.py", "tests/vm/test_build_and_check.py",
                    "tests/vm/test_pxe_serve.py"]]


@task(help={"unit": "unit tests only (no root, no VM)", "vm": "VM tests only, in one process",
            "k": "pytest -k expression (one process)"})
def test(c: Context, unit: bool = False, vm: bool = False, k: str = "") -> None:
    """Run the tests: unit tests and linters, the test images built once, then the VM tests
    that boot them (two processes side by side for part of them)."""
    pytest = [sys.executable, "-m", "pytest"]
    if unit or vm or k:
        args = [*pytest, *(["-m", "not vm"] if unit else ["-m", "vm"] if vm else []), *(["-k", k] if k else [])]
        _exit_on_failure(subprocess.run(args, check=False).returncode)
        return
    listed = {m for group in [VM_ALONE, *VM_SIDE_BY_SIDE] for m in group}
    found = {str(p) for p in Path("tests/vm").glob("test_*.py")}
    if listed != found:
        raise Exit(f"tasks.py: VM modules not in a phase: {sorted(found - listed)}; gone: {sorted(listed - found)}",
                   code=2)
    _exit_on_failure(subprocess.run([*pytest, "-m", "not vm"], check=False).returncode)
    _exit_on_failure(subprocess.run([sys.executable, "-m", "tests.vm.images"], check=False).returncode)
    base = Path("build/tests")
    status = subprocess.run([*pytest, f"--basetemp={base / 'alone'}", *VM_ALONE], check=False).returncode
    status = max(status, _side_by_side([[*pytest, "-v", f"--basetemp={base / f'side{i}'}", *group]
                                        for i, group in enumerate(VM_SIDE_BY_SIDE)]))
    _exit_on_failure(status)


def _side_by_side(commands: list[list[str]]) -> int:
    """Run COMMANDS at once, each output line prefixed with its command's number; the worst status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
             for cmd in commands]

    def relay(i: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{i}] {line}", end="", flush=True)

    threads = [threading.Thread(target=relay, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(p.wait() for p in procs)


def _exit_on_failure(status: int) -> None:
    # pytest's 5 means "no tests collected": a suite that ran nothing has not passed.
    if status != 0:
        raise Exit(code=status)


@task(help={"profile": "profile to measure", "cold": "also measure a build from empty caches",
            "power_cuts": "also cut the power N times in each phase (install, update, first boot) and count "
                          "the recoveries (about 3 minutes a trial under TCG)",
            "boots": "boots to ready of CBIOS and of the stock baseline, in turn (medians; default 3)"})
def bench(c: Context, profile: str = "qemu-test", cold: bool = False, power_cuts: int = 0, boots: int = 3) -> None:
    """Measure build times, artifact sizes, boot time to ready (and against a stock Debian root),
    PXE install time; write build/PROFILE/bench.json."""
    from cbios.bench import run_bench

    _reported(lambda: run_bench(profile, cold=cold, power_cuts=power_cuts, boots=boots))


@task(help={"profile": "profile whose PXE bundle to serve (built first if needed)",
            "clients": "the numbers of nodes at once, comma-separated (default 1,10,50,100)"})
def bench_pxe(c: Context, profile: str = "qemu-test", clients: str = "1,10,50,100") -> None:
    """N nodes fetching the bundle at once from `cbios pxe publish` and from nginx, on loopback:
    throughput, the slowest client, failures; write build/PROFILE/pxe-scale.json."""
    from cbios.pxe.scale import run_scale

    _reported(lambda: run_scale(profile, tuple(int(n) for n in clients.split(","))))


@task(help={"members": "management nodes in the cluster (default 100)",
            "unreachable": "of them, how many are down (default 10)"})
def bench_cluster(c: Context, members: int = 100, unreachable: int = 10) -> None:
    """`slot show` and `slot show --by-type=sysmon` over a cluster of MEMBERS peer processes on
    loopback addresses, all up and then UNREACHABLE of them down; write build/cluster-scale.json."""
    from cbios.cluster_scale import run_scale

    _reported(lambda: run_scale(members, unreachable, Path("build") / "cluster-scale.json"))


@task(iterable=["phase"],
      help={"profile": "profile whose node to cut (built, and its node disk made, first if needed)",
            "count": "trials in each phase",
            "phase": "install, update or first-boot (repeatable; default: all three)",
            "seed": "seed of the random moments (default: the time)"})
def power_cuts(c: Context, profile: str = "qemu-test", count: int = 20, phase: list[str] | None = None,
               seed: int = 0) -> None:
    """Cut the node's power at random moments of an install, an update and a new copy's first
    boot; count the trials after which it booted to ready on a good copy with /var and its
    slots' volumes kept; write build/PROFILE/power-cuts.json (about 3 minutes a trial under TCG)."""
    from cbios.powercut import PHASES, run_power_cuts

    _reported(lambda: run_power_cuts(profile, count, tuple(phase or PHASES), seed or None))


@task
def docs(c: Context) -> None:
    """Make the README's tables (verbs, exit codes, a build's files) and build/man/cbios.1 from the code."""
    from cbios.cli import parser
    from cbios.docs import write_docs

    for path in write_docs(Path("README.md"), Path("build/man/cbios.1"), parser()):
        print(f"‣ wrote {path}")
