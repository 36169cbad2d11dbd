"""qemu-test, booted once: what a node's firmware must be, checked from inside the guest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cbios import manifest
from cbios.machine import Machine
from cbios.profile import Profile
from cbios.render import architecture


def test_ready_reports_profile_and_version(machine: Machine, profile: Profile) -> None:
    text = (machine.spec.ready_file or Path()).read_text()
    assert f"READY profile={profile.name} version={profile.version}" in text


def test_boot_finished_with_no_failed_unit(machine: Machine) -> None:
    assert machine.succeed("systemctl is-system-running") == "running"
    assert machine.succeed("systemctl list-units --failed --plain --no-legend") == ""


def test_root_is_the_image_read_through_dm_verity(machine: Machine, built: Path) -> None:
    source, fstype, options = machine.succeed("findmnt -n -o SOURCE,FSTYPE,OPTIONS / | tr -s ' ' '\\n'").split("\n")
    assert (source, fstype, options.split(",")[0]) == ("/dev/mapper/cbios-root", "squashfs", "ro")
    table = machine.succeed("dmsetup table cbios-root").split()
    assert table[2] == "verity" and manifest.read(built / manifest.MANIFEST)["verity"]["root_hash"] in table
    assert machine.succeed("dmsetup status cbios-root").split()[-1] == "V"  # no block found corrupt
    assert "Read-only file system" in machine.fail("touch /usr/cbios-write-test")


def test_var_and_tmp_are_writable_and_var_is_filled_from_the_image(machine: Machine) -> None:
    assert machine.succeed("findmnt -n -o FSTYPE /var") == "tmpfs"
    assert machine.succeed("findmnt -n -o FSTYPE /tmp") == "tmpfs"
    machine.succeed("echo x > /var/lib/cbios-test && echo y > /tmp/cbios-test")
    machine.succeed("test -s /var/lib/dpkg/status")  # copied from /usr/share/factory/var


def test_node_identity_comes_from_the_profile(machine: Machine, profile: Profile) -> None:
    assert machine.succeed("hostname") == profile.node.hostname
    release = dict(line.split("=", 1) for line in machine.succeed("cat /usr/lib/cbios/release").splitlines())
    assert release == {"CBIOS_PROFILE": profile.name, "CBIOS_VERSION": profile.version,
                       "CBIOS_ARCHITECTURE": architecture(),
                       "CBIOS_OBJECT_ID": profile.node.object_id, "CBIOS_VG": profile.storage.vg,
                       "CBIOS_READY_TIMEOUT": str(profile.boot.ready_timeout)}
    cmdline = machine.succeed("cat /proc/cmdline").split()
    assert set(profile.kernel_cmdline()) <= set(cmdline) and f"panic={profile.boot.panic_reboot}" in cmdline


def test_systemd_keeps_the_boards_watchdog_running(machine: Machine, profile: Profile) -> None:
    """QEMU's i6300esb, as a node's board has one: systemd pings it, so a hung node is reset."""
    watchdog = "/sys/class/watchdog/watchdog0"
    assert machine.succeed(f"cat {watchdog}/identity") == "i6300ESB timer"
    assert machine.wait_until_succeeds(f"grep -x active {watchdog}/state", timeout=30) == "active"
    assert machine.succeed(f"cat {watchdog}/timeout") == str(profile.boot.watchdog)


def test_no_first_boot_prompt(machine: Machine) -> None:
    assert machine.execute("systemctl is-enabled systemd-firstboot.service")[1] == "masked"


def test_root_carries_its_own_kernel_and_initrd(machine: Machine, build_manifest: dict[str, Any]) -> None:
    sums = machine.succeed("sha256sum /boot/vmlinuz /boot/initrd.img | cut -d' ' -f1").split()
    artifacts = build_manifest["artifacts"]
    assert sums == [artifacts["vmlinuz"]["sha256"], artifacts["initrd.img"]["sha256"]]


def test_kernel_modules_are_trimmed_to_the_profile(machine: Machine, build_manifest: dict[str, Any]) -> None:
    kernel = build_manifest["kernel"]
    assert machine.succeed("uname -r") == kernel
    machine.succeed("modprobe bridge && modprobe 8021q && modprobe veth")
    modules = f"/usr/lib/modules/{kernel}/kernel"
    assert machine.succeed(f"find {modules}/sound {modules}/drivers/gpu -name '*.ko*' | wc -l") == "0"
    assert int(machine.succeed(f"find {modules} -name '*.ko*' | wc -l")) < 1000  # of about 4000


def test_manifest_package_versions_are_what_the_root_has(
        machine: Machine, build_manifest: dict[str, Any]) -> None:
    listed = {p["name"]: p["version"] for p in build_manifest["packages"]["root"]}
    installed = dict(line.split("\t") for line in machine.succeed(
        "dpkg-query -W -f '${Package}\\t${Version}\\n' systemd lvm2 python3 linux-image-amd64").splitlines())
    assert installed == {name: listed[name] for name in installed}
    assert json.dumps(build_manifest["packages"]["initrd"])  # the initrd's packages are recorded too
    assert {"systemd", "lvm2", "udev"} <= {p["name"] for p in build_manifest["packages"]["initrd"]}
