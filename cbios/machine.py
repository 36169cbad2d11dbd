"""A QEMU guest under control: start it, wait for ready, run commands, power it off.

The guest reports ready on a virtio-serial port backed by a file, never through the
console the kernel writes to. Test images also carry a root shell on a second port
(the 'test-backdoor' overlay), through which tests run commands. Every wait is bounded;
every failure carries the last console lines and the path of the whole log."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from cbios.errors import CbiosError
from cbios.qemu import VmSpec
from cbios.run import tail

log = logging.getLogger("cbios")

CONSOLE_TAIL = 25
SHELL_CONNECT_TIMEOUT = 10.0
MARK = "__CBIOS__"
KILL_GRACE = 5  # s from timeout(1)'s TERM to its KILL
TIMED_OUT = (124, 137)  # timeout(1): TERM worked, KILL was needed
POWER_BUTTON_REPEAT = 15.0


class VmError(CbiosError):
    status = 1


class Machine:
    def __init__(self, spec: VmSpec, logdir: Path, name: str = "vm") -> None:
        self.name = name
        self.logdir = logdir
        self.sockdir = Path(tempfile.mkdtemp(prefix="cbios-vm-"))  # short paths for sockets
        self.console_log = logdir / f"{name}.console.log"
        self.qemu_log = logdir / f"{name}.qemu.log"
        spec.serial = f"file:{self.console_log}"
        spec.ready_file = logdir / f"{name}.ready"
        spec.shell_socket = self.sockdir / "shell"
        spec.qmp_socket = self.sockdir / "qmp"
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self._shell: socket.socket | None = None
        self._buf = b""
        self._seq = 0  # of the last command sent to the shell
        self._reports_seen = 0
        self.reports: list[str] = []  # every line the guest reported, in order
        self.started_at = 0.0

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        if self.proc is not None:
            raise VmError(f"{self.name}: already started")  # a second QEMU would leak the first
        self.logdir.mkdir(parents=True, exist_ok=True)
        for path in (self.console_log, self.qemu_log, self.spec.ready_file):
            if path is not None:
                path.unlink(missing_ok=True)
        argv = self.spec.argv()
        self.qemu_log.write_text("+ " + shlex.join(argv) + "\n")
        log.info("‣ Booting %s (%s; console: %s)", self.name, self.spec.accel, self.console_log)
        self.started_at = time.monotonic()
        with open(self.qemu_log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self._connect_shell()

    def _connect_shell(self) -> None:
        assert self.spec.shell_socket is not None
        deadline = time.monotonic() + SHELL_CONNECT_TIMEOUT
        while time.monotonic() < deadline:
            self._check_running("connecting to the guest's shell port")
            if self.spec.shell_socket.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(self.spec.shell_socket))
                except OSError:
                    sock.close()
                else:
                    self._shell = sock
                    return
            time.sleep(0.1)
        raise self.error(f"QEMU did not open its shell socket within {SHELL_CONNECT_TIMEOUT:.0f} s")

    def wait_ready(self, timeout: float) -> str:
        """Wait for the guest's READY line; return it. FAILED, an exit or the bound: VmError."""
        return self.wait_report(("READY",), timeout)

    def wait_report(self, accept: tuple[str, ...], timeout: float, *, skip_failed: bool = False,
                    on_poll: Callable[[], None] | None = None) -> str:
        """Wait for the next line on the report port that starts with one of ACCEPT.

        A FAILED line raises, unless SKIP_FAILED (a guest that reboots after a failed boot
        reports again). Lines are consumed: the next call sees only later ones. ON_POLL is
        called before each look (to show the console's progress meanwhile)."""
        assert self.spec.ready_file is not None
        deadline = time.monotonic() + timeout
        while True:
            # Looked at before the file: a guest that reports and powers off at once is heard.
            gone = self.proc is not None and self.proc.poll() is not None
            if on_poll is not None:
                on_poll()  # before the report: what led to it is shown first
            text = self.spec.ready_file.read_text(errors="replace") if self.spec.ready_file.exists() else ""
            lines = text.splitlines(keepends=True)
            complete = [line.strip() for line in lines if line.endswith("\n")]
            while self._reports_seen < len(complete):
                line = complete[self._reports_seen]
                self._reports_seen += 1
                self.reports.append(line)
                if line.startswith(accept):
                    if on_poll is not None:
                        on_poll()  # what the guest printed between the last look and its report
                    log.info("  %s after %.1f s: %s", self.name, self.uptime(), line)
                    return line
                if line.startswith("FAILED") and not skip_failed:
                    raise self.error(f"the guest reported: {line}")
            if gone:
                self._check_running(f"waiting for {'/'.join(accept)}")
            if time.monotonic() > deadline:
                raise self.error(f"no {'/'.join(accept)} within {timeout:.0f} s")
            time.sleep(0.5)

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    def shutdown(self, timeout: float = 120) -> None:
        """ACPI power-off, and wait (bounded) for QEMU to exit. The button is pressed again
        every POWER_BUTTON_REPEAT seconds: a press before the guest has loaded its ACPI button
        driver (udev loads it, late in a fast boot under TCG) is lost."""
        deadline = time.monotonic() + timeout
        while self.running():
            try:
                self._qmp("system_powerdown")
            except OSError:
                if not self.running():
                    break  # it went off between the check and the press
                raise
            if self.wait_exit(max(0.0, min(POWER_BUTTON_REPEAT, deadline - time.monotonic()))):
                break
            if time.monotonic() >= deadline:
                self.kill()
                raise self.error(f"did not power off within {timeout:.0f} s")

    def wait_exit(self, timeout: float) -> bool:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Machine:
        self.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()

    # -- commands in the guest ------------------------------------------------------

    def execute(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run COMMAND (bash, under set -euo pipefail) as root in the guest. Past TIMEOUT the
        guest kills it (timeout(1), its process group), so the shell is free for the next
        command; a VmError says so. Each answer carries its command's number: a late one,
        of a command given up on, is never taken for another's."""
        if self._shell is None:
            raise self.error("no shell connection to the guest")
        self._seq += 1
        encoded = base64.b64encode(command.encode()).decode()
        # The command reaches bash encoded: its text is in no process's argv, where a
        # `pgrep -f` of the command itself would find it.
        line = (f'__o=$(cd / && timeout -k {KILL_GRACE} {math.ceil(timeout)} bash -c '
                f'\'set -euo pipefail; eval "$(printf %s "$1" | base64 -d)"\' command {encoded} </dev/null 2>&1); '
                f'__r=$?; '
                f'printf "{MARK} {self._seq} %s %s\\n" "$__r" "$(printf %s "$__o" | base64 -w0)"\n')
        started = time.monotonic()
        self._shell.sendall(line.encode())
        # The guest's bound, then its kill, then a margin for the answer to come back.
        deadline = started + timeout + KILL_GRACE + 10
        while True:
            for raw in self._lines():
                fields = raw.split(" ")  # MARK, number, status, output (base64; none when empty)
                if fields[:2] != [MARK, str(self._seq)] or len(fields) not in (3, 4):
                    continue  # console noise, or the late answer of a command given up on
                rc = int(fields[2])
                if rc in TIMED_OUT and time.monotonic() - started >= timeout:
                    raise self.error(f"{command!r} did not finish within {timeout:.0f} s (killed in the guest)")
                return rc, base64.b64decode(fields[3] if len(fields) == 4 else "").decode(errors="replace")
            self._check_running(f"running {command!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error(f"{command!r} did not finish within {timeout:.0f} s, and the guest's shell "
                                 "did not answer since")
            self._shell.settimeout(min(remaining, 1.0))
            with contextlib.suppress(TimeoutError):
                chunk = self._shell.recv(65536)
                if not chunk:
                    raise self.error("the guest's shell port closed")
                self._buf += chunk

    def _lines(self) -> list[str]:
        *complete, self._buf = self._buf.split(b"\n")
        return [c.decode(errors="replace").strip() for c in complete]

    def succeed(self, command: str, timeout: float = 60) -> str:
        rc, out = self.execute(command, timeout)
        if rc != 0:
            raise self.error(f"{command!r} failed with status {rc}:\n{out}")
        return out

    def fail(self, command: str, timeout: float = 60) -> str:
        rc, out = self.execute(command, timeout)
        if rc == 0:
            raise self.error(f"{command!r} succeeded but should have failed:\n{out}")
        return out

    def wait_until_succeeds(self, command: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.execute(command, timeout=max(deadline - time.monotonic(), 1))
            if rc == 0:
                return out
            if time.monotonic() > deadline:
                raise self.error(f"{command!r} did not succeed within {timeout:.0f} s; last output:\n{out}")
            time.sleep(1)

    def in_background(self, command: str) -> None:
        """COMMAND left running in the guest past this shell's command, its output on the console."""
        self.succeed(f"setsid -f sh -c '{command}' </dev/null >/dev/console 2>&1")

    # -- the console ----------------------------------------------------------------

    def console(self, offset: int = 0) -> str:
        """What the guest printed on its console, from byte OFFSET (the log's size taken earlier)."""
        with self.console_log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def wait_console(self, text: str, timeout: float, offset: int = 0) -> None:
        """Until TEXT is on the console past OFFSET (a line some program printed), within TIMEOUT."""
        deadline = time.monotonic() + timeout
        while text not in self.console(offset):
            if time.monotonic() > deadline:
                raise self.error(f"no {text!r} on the console within {timeout:.0f} s")
            if not self.running():
                raise self.error(f"QEMU exited while waiting for {text!r} on the console")
            time.sleep(0.5)

    def wait_console_match(self, pattern: str, timeout: float, accept: Callable[[re.Match[str]], bool] | None = None,
                           offset: int = 0) -> re.Match[str]:
        """The first match of PATTERN on the console past OFFSET that ACCEPT takes, within TIMEOUT."""
        deadline = time.monotonic() + timeout
        while True:
            for found in re.finditer(pattern, self.console(offset)):
                if accept is None or accept(found):
                    return found
            if time.monotonic() > deadline:
                raise self.error(f"no line matching {pattern!r} on the console within {timeout:.0f} s")
            if not self.running():
                raise self.error(f"QEMU exited while waiting for {pattern!r} on the console")
            time.sleep(0.5)

    # -- helpers --------------------------------------------------------------------

    def _qmp(self, command: str) -> None:
        assert self.spec.qmp_socket is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.spec.qmp_socket))
            reader = sock.makefile("r")
            reader.readline()  # greeting
            for execute in ("qmp_capabilities", command):
                sock.sendall(json.dumps({"execute": execute}).encode() + b"\n")
                while "return" not in (reply := json.loads(reader.readline())):
                    if "error" in reply:
                        raise self.error(f"QMP {execute}: {reply['error']}")

    def _check_running(self, doing: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise self.error(f"QEMU exited with status {self.proc.returncode} while {doing}")

    def console_tail(self, lines: int = CONSOLE_TAIL) -> str:
        return tail(self.console_log, lines)

    def error(self, message: str) -> VmError:
        return VmError(
            f"{self.name}: {message}\n"
            f"--- last {CONSOLE_TAIL} console lines ---\n{self.console_tail()}\n"
            f"--- console log: {self.console_log}; QEMU log: {self.qemu_log}"
        )
