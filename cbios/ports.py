"""Local TCP ports for the servers the tests and benchmarks start on this machine: a free
one, and the wait until a server listens on one (bounded, and cut short if it exits)."""

from __future__ import annotations

import socket
import subprocess
import time

from cbios.errors import StepError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, address: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float, what: str,
                   address: str = "127.0.0.1", hint: str | None = None) -> None:
    """Until PROC listens on ADDRESS:PORT; StepError if it exits or TIMEOUT passes first."""
    deadline = time.monotonic() + timeout
    while not listening(port, address):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise StepError(what, f"did not start on {address}:{port}", hint=hint)
        time.sleep(0.05)


def end(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """PROC terminated (SIGTERM), and killed if it is still there after TIMEOUT."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
