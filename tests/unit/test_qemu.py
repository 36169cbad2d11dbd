"""The code that drives QEMU, against a fake QEMU binary (the real one runs in tests/vm)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cbios import machine, qemu
from cbios.machine import Machine, VmError
from cbios.qemu import VmSpec, choose_accel


def spec(**kw: object) -> VmSpec:
    base: dict[str, object] = {"memory": 512, "cpus": 1, "accel": "tcg", "kernel": Path("/k"),
                               "initrd": Path("/i"), "cmdline": "root=LABEL=x ro"}
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_argv_uses_restricted_user_networking_and_virtio_ports(tmp_path: Path) -> None:
    s = spec(ready_file=tmp_path / "r", shell_socket=tmp_path / "s", drives=["file=x,format=raw,if=virtio"])
    argv = s.argv()
    assert argv[:3] == [qemu.QEMU, "-accel", "tcg"]
    assert argv[argv.index("-cpu") + 1] == "max"
    assert "user,id=n0,restrict=on" in argv
    assert f"virtserialport,chardev=ready,name={qemu.READY_PORT}" in argv
    assert argv[argv.index("-append") + 1] == "root=LABEL=x ro"
    assert spec(accel="kvm").argv()[3:5] == ["-cpu", "host"]


def test_accel_environment_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CBIOS_ACCEL", "tcg")
    assert choose_accel(Path("/nonexistent"), tmp_path) == "tcg"
    monkeypatch.setenv("CBIOS_ACCEL", "xen")
    with pytest.raises(Exception, match="must be 'kvm' or 'tcg'"):
        choose_accel(Path("/nonexistent"), tmp_path)


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm to reach the probe")
def test_kvm_probe_is_bounded_and_cached(fake_qemu: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CBIOS_ACCEL", raising=False)
    monkeypatch.setenv("FAKE_QEMU", "hang")
    monkeypatch.setattr(qemu, "PROBE_TIMEOUT", 1.0)
    assert choose_accel(Path("/vmlinuz"), tmp_path) == "tcg"
    assert "-accel\0kvm" in fake_qemu.read_text()
    cached = json.loads((tmp_path / "accel.json").read_text())
    assert cached["accel"] == "tcg"
    fake_qemu.unlink()
    assert choose_accel(Path("/vmlinuz"), tmp_path) == "tcg"
    assert not fake_qemu.exists()  # answered from the cache, QEMU not run again


def test_machine_runs_commands_through_the_shell_port(fake_qemu: Path, tmp_path: Path) -> None:
    with Machine(spec(), tmp_path / "logs", name="fake") as m:
        assert m.wait_ready(10).startswith("READY")
        assert m.succeed("echo hello; echo world") == "hello\nworld"
        assert m.execute("exit 3") == (3, "")
        assert "boom" in m.fail("echo boom >&2; false")
        with pytest.raises(VmError, match="failed with status 1"):
            m.succeed("test -e /nonexistent-file")
        # set -o pipefail holds in guest commands
        assert m.execute("false | true")[0] == 1
        # The command's text is in no process's command line: a pgrep -f of it finds nothing.
        assert m.succeed("pgrep -f 'fake-marker-[0-9]' || echo none; : fake-marker-7") == "none"


def test_a_command_past_its_bound_is_killed_and_the_shell_goes_on(fake_qemu: Path, tmp_path: Path) -> None:
    with Machine(spec(), tmp_path / "logs", name="fake") as m:
        m.wait_ready(10)
        with pytest.raises(VmError, match="'sleep 60; echo late' did not finish within 1 s"):
            m.execute("sleep 60; echo late", timeout=1)
        # The next command is answered by its own answer, at once: nothing was left running.
        assert m.succeed("echo next; pgrep -f 'sleep 6[0]' || true", timeout=5) == "next"
        assert m.execute("exit 124", timeout=5) == (124, "")  # a status of its own, well within its bound


def test_machine_failure_shows_console_tail_and_log_path(
        fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU", "crash")
    m = Machine(spec(), tmp_path / "logs", name="fake")
    with pytest.raises(VmError) as err:
        m.start()
        m.wait_ready(10)
    m.kill()
    text = str(err.value)
    assert "QEMU exited with status 1" in text
    assert "console line 39" in text and "console line 14" not in text  # the last 25 lines
    assert str(tmp_path / "logs" / "fake.console.log") in text


def test_wait_ready_is_bounded(fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU", "hang")
    monkeypatch.setattr(machine, "SHELL_CONNECT_TIMEOUT", 1.0)
    m = Machine(spec(), tmp_path / "logs", name="fake")
    try:
        with pytest.raises(VmError, match="within 1 s"):
            m.start()  # the hanging fake never opens its shell socket
    finally:
        m.kill()


def test_machine_reads_its_console_from_a_point_and_waits_for_a_line(fake_qemu: Path, tmp_path: Path) -> None:
    with Machine(spec(), tmp_path / "logs", name="fake") as m:
        m.wait_ready(10)
        offset = m.console_log.stat().st_size
        assert "console line 39" in m.console() and m.console(offset) == ""
        m.succeed(f"echo 'cbios: committed copy spare' >> {m.console_log}")  # the fake's shell: as a guest prints
        m.wait_console("committed copy", 10, offset)
        with pytest.raises(VmError, match="no 'console line 5' on the console within 1 s"):
            m.wait_console("console line 5", 1, offset)  # printed, but before OFFSET


def test_shutdown_presses_the_power_button_again_until_the_guest_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that missed the first press (its ACPI button driver not yet loaded) goes off
    at a later one; one that never goes is killed at the bound, with its console shown."""
    import subprocess

    monkeypatch.setattr(machine, "POWER_BUTTON_REPEAT", 0.2)
    presses: list[str] = []

    def booted(goes_off_at: int | None) -> Machine:
        m = Machine(spec(), tmp_path / "logs", name="fake")
        m.proc = subprocess.Popen(["sleep", "60"])

        def press(command: str) -> None:
            presses.append(command)
            if len(presses) == goes_off_at:
                assert m.proc is not None
                m.proc.terminate()
        monkeypatch.setattr(m, "_qmp", press)
        return m

    booted(goes_off_at=3).shutdown(timeout=30)
    assert presses == ["system_powerdown"] * 3
    presses.clear()
    m = booted(goes_off_at=None)
    with pytest.raises(VmError, match="did not power off within 1 s"):
        m.shutdown(timeout=1)
    assert not m.running() and len(presses) >= 4
